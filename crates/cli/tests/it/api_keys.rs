//! `devtables keys` against a running `devtables cloud` process: the bootstrap path of the HTTP
//! API's keys (create, list, revoke on the cloud's data folder while it runs), and the warnings
//! of a cloud that has no key or runs without keys.

use std::path::Path;

use serde_json::{json, Value};

use super::bin;
use super::harness::{unique_prefix, ApiClient, BrokerChoice, CloudProc, KEY_ACCOUNT};

/// `devtables keys ARGS --data DATA --account acme`: (success, stdout, stderr).
fn keys(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = bin()
        .arg("keys")
        .args(args)
        .args(["--account", KEY_ACCOUNT, "--data"])
        .arg(data)
        .output()
        .expect("devtables keys runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The status code of `GET path` with `key` (or without any key).
fn status_of(cloud: &CloudProc, path: &str, key: Option<&str>) -> u16 {
    let mut request = ureq::get(&cloud.url(path));
    if let Some(key) = key {
        request = request.set("authorization", &format!("Bearer {key}"));
    }
    match request.call() {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("GET {path}: {e}"),
    }
}

#[test]
fn keys_created_listed_and_revoked_on_a_running_cloud_take_effect_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProc::start(dir.path(), &unique_prefix(), BrokerChoice::Embedded(0));
    let data = dir.path().join("cloud-data");

    // The harness's admin key (from `devtables keys create` before the start) works; no key
    // does not.
    assert_eq!(status_of(&cloud, "/v1/devices", None), 401);
    assert_eq!(status_of(&cloud, "/v1/devices", Some(&cloud.key)), 200);
    assert_eq!(status_of(&cloud, "/health", None), 200);

    // A read key created while the cloud runs (a second connection to its WAL-mode store).
    let (ok, read, stderr) = keys(&data, &["create", "--scope", "read"]);
    assert!(ok, "{stderr}");
    assert!(read.starts_with("dt_") && !read.contains('\n'), "{read:?}");
    assert!(!stderr.contains(&read), "the key is printed on stdout only");
    let reader = ApiClient {
        addr: cloud.api.clone(),
        key: read.clone(),
    };
    assert!(reader.get("/v1/devices").is_ok());
    let (code, body) = reader.send(
        "POST",
        "/v1/devices",
        json!({"account": KEY_ACCOUNT, "device": "d1"}),
    );
    assert_eq!(code, 403, "a read key registered a device: {body}");
    assert_eq!(body["kind"], "forbidden", "{body}");

    // The listing shows both keys, without their secrets.
    let (ok, listing, stderr) = keys(&data, &["list"]);
    assert!(ok, "{stderr}");
    let listed: Vec<Value> = listing
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    let mut scopes: Vec<&str> = listed.iter().filter_map(|k| k["scope"].as_str()).collect();
    scopes.sort_unstable();
    assert_eq!(scopes, ["admin", "read"], "{listing}");
    for key in [&cloud.key, &read] {
        assert!(
            !listing.contains(&key[20..]),
            "a secret in the listing: {listing}"
        );
    }

    // Revoking takes effect on the running cloud's next request.
    let id = &read[3..19];
    let (ok, _, stderr) = keys(&data, &["revoke", "--id", id]);
    assert!(ok, "{stderr}");
    assert_eq!(status_of(&cloud, "/v1/devices", Some(&read)), 401);
    assert_eq!(status_of(&cloud, "/v1/devices", Some(&cloud.key)), 200);

    // Mistakes fail clearly.
    let (ok, _, stderr) = keys(&data, &["revoke", "--id", "0000000000000000"]);
    assert!(!ok && stderr.contains("no API key"), "{stderr}");
    let (ok, _, _) = keys(&data, &["create", "--scope", "root"]);
    assert!(!ok, "an unknown scope was accepted");
}

#[test]
fn a_cloud_without_keys_says_how_to_make_one_and_an_insecure_one_says_it_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = CloudProc::start(dir.path(), &unique_prefix(), BrokerChoice::Embedded(0));
    assert!(
        cloud.logs.matching("no API key exists").is_empty(),
        "the harness made a key before the start"
    );
    // Its only key revoked, the restarted cloud has none left.
    let (ok, _, stderr) = keys(
        &dir.path().join("cloud-data"),
        &["revoke", "--id", &cloud.key[3..19]],
    );
    assert!(ok, "{stderr}");
    cloud.kill_and_restart();
    let line = cloud.logs.wait_for("the no-key warning", |l| {
        l.contains("WARN") && l.contains("no API key exists")
    });
    assert!(line.contains("devtables keys create --data"), "{line}");
    assert_eq!(status_of(&cloud, "/v1/devices", Some(&cloud.key)), 401);
    drop(cloud);

    let dir = tempfile::tempdir().unwrap();
    let cloud = CloudProc::start_with(
        dir.path(),
        &unique_prefix(),
        BrokerChoice::Embedded(0),
        "insecure_no_auth: true,",
    );
    let line = cloud
        .logs
        .wait_for("the insecure warning", |l| l.contains("INSECURE"));
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(status_of(&cloud, "/v1/devices", None), 200);
}
