//! The HTTP API's keys, against a started cloud over real TCP: every route but `/health` and
//! `/ready` refuses a request without a valid key (401), a valid key is confined to its account
//! and its scope (403, the same answer whether the target exists or not), a revoked key stops
//! working, and `insecure_no_auth` opens the API.

use devtables_cloud::store::KeyScope;
use devtables_cloud::Cloud;
use serde_json::{json, Value};

use crate::harness::{config, get, request, request_with_header, schema, ACCOUNT};

const OTHER: &str = "globex";

/// Every protected route once: (method, path, body).
fn routes() -> Vec<(&'static str, String, Option<Value>)> {
    let dev = format!("/v1/accounts/{ACCOUNT}/devices/dev0/items/Setting");
    let bcast = format!("/v1/accounts/{ACCOUNT}/items/Firmware");
    let setting = json!({"name": "mode", "value": "x"});
    let firmware = json!({"version": "9.9.9"});
    vec![
        ("GET", "/v1/status".into(), None),
        (
            "POST",
            "/v1/devices".into(),
            Some(json!({"account": ACCOUNT, "device": "intruder"})),
        ),
        ("GET", "/v1/devices".into(), None),
        ("GET", format!("/v1/devices/{ACCOUNT}/dev0"), None),
        ("DELETE", format!("/v1/devices/{ACCOUNT}/dev0"), None),
        (
            "DELETE",
            format!("/v1/devices/{ACCOUNT}/dev0?delete_items=true"),
            None,
        ),
        ("POST", format!("/v1/devices/{ACCOUNT}/dev0/secret"), None),
        ("GET", format!("/v1/accounts/{ACCOUNT}/items/Setting"), None),
        ("POST", bcast.clone(), Some(firmware.clone())),
        ("PATCH", bcast.clone(), Some(firmware.clone())),
        ("DELETE", bcast, Some(firmware)),
        ("GET", dev.clone(), None),
        (
            "GET",
            format!("{dev}/key?pk=device%23dev0&sk=setting%23mode"),
            None,
        ),
        ("POST", dev.clone(), Some(setting.clone())),
        ("PATCH", dev.clone(), Some(setting.clone())),
        ("DELETE", dev, Some(setting)),
        ("GET", format!("/v1/accounts/{ACCOUNT}/conflicts"), None),
        (
            "POST",
            format!("/v1/accounts/{ACCOUNT}/keys"),
            Some(json!({"scope": "admin"})),
        ),
        ("GET", format!("/v1/accounts/{ACCOUNT}/keys"), None),
        (
            "DELETE",
            format!("/v1/accounts/{ACCOUNT}/keys/0123456789abcdef"),
            None,
        ),
    ]
}

async fn key_of(cloud: &Cloud, account: &str, scope: KeyScope) -> String {
    cloud
        .create_api_key(account, scope)
        .await
        .expect("a key")
        .key
}

fn assert_refused(code: u16, body: &Value, want: u16, what: &str) {
    let kind = if want == 401 {
        "unauthorized"
    } else {
        "forbidden"
    };
    assert_eq!(code, want, "{what}: {body}");
    assert_eq!(body["kind"], kind, "{what}: {body}");
    assert!(body["error"].is_string(), "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_a_request_without_a_valid_key() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(config(dir.path()), schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    let admin = cloud
        .create_api_key(ACCOUNT, KeyScope::Admin)
        .await
        .expect("a key");
    let (id, _) = devtables_cloud::auth::parse_api_key(&admin.key).expect("the key parses");
    let wrong_secret = format!("Authorization: Bearer dt_{id}_{}", "0".repeat(64));
    let unknown_id = format!(
        "Authorization: Bearer dt_ffffffffffffffff_{}",
        &admin.key[20..]
    );
    let headers: Vec<Option<String>> = vec![
        None,
        Some("Authorization: Basic YWNtZTpzZWNyZXQ=".into()),
        Some("Authorization: Bearer".into()),
        Some("Authorization: Bearer not-a-key".into()),
        Some(format!(
            "Authorization: Bearer {}",
            admin.key.to_uppercase()
        )),
        Some(format!("Authorization: Bearer {}x", admin.key)),
        Some(format!("Authorization: {}", admin.key)),
        Some(unknown_id),
        Some(wrong_secret),
    ];
    let mut refused = 0u64;
    for (method, path, body) in routes() {
        for header in &headers {
            let (code, answer) =
                request_with_header(api, method, &path, header.as_deref(), body.as_ref()).await;
            assert_refused(
                code,
                &answer,
                401,
                &format!("{method} {path} with {header:?}"),
            );
            refused += 1;
        }
    }
    // Liveness and readiness stay open.
    let (code, _) = get(api, "/health").await;
    assert_eq!(code, 200);
    let (code, body) = get(api, "/ready").await;
    assert_ne!(code, 401, "{body}");

    // Nothing went through, and every refusal was counted.
    let (code, devices) = request(api, "GET", "/v1/devices", Some(&admin.key), None).await;
    assert_eq!(code, 200, "{devices}");
    assert_eq!(
        devices["devices"],
        json!([]),
        "a refused request registered a device"
    );
    let (_, status) = request(api, "GET", "/v1/status", Some(&admin.key), None).await;
    assert_eq!(status["api_unauthorized"], refused, "{status}");
    assert_eq!(status["api_forbidden"], 0, "{status}");
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_confined_to_its_account_and_scope_and_stops_when_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(config(dir.path()), schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    let call = |method: &'static str, path: String, key: String, body: Option<Value>| async move {
        request(api, method, &path, Some(&key), body.as_ref()).await
    };
    let admin = key_of(&cloud, ACCOUNT, KeyScope::Admin).await;
    let other_admin = key_of(&cloud, OTHER, KeyScope::Admin).await;

    // An admin registers its account's devices and creates its keys over the API.
    let register = |account: &str, device: &str| json!({"account": account, "device": device});
    let (code, body) = call(
        "POST",
        "/v1/devices".into(),
        admin.clone(),
        Some(register(ACCOUNT, "dev0")),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert!(body["secret"].is_string(), "{body}");
    let (code, body) = call(
        "POST",
        "/v1/devices".into(),
        other_admin.clone(),
        Some(register(OTHER, "g1")),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let keys_path = format!("/v1/accounts/{ACCOUNT}/keys");
    let new_key = |scope: &'static str| {
        let (admin, keys_path) = (admin.clone(), keys_path.clone());
        async move {
            let (code, body) = call("POST", keys_path, admin, Some(json!({"scope": scope}))).await;
            assert_eq!(code, 201, "{body}");
            assert_eq!(body["scope"], scope, "{body}");
            assert_eq!(body["account"], ACCOUNT, "{body}");
            (
                body["id"].as_str().expect("an id").to_string(),
                body["key"].as_str().expect("the key, once").to_string(),
            )
        }
    };
    let (_, read) = new_key("read").await;
    let (write_id, write) = new_key("write").await;
    let (code, body) = call(
        "POST",
        keys_path.clone(),
        admin.clone(),
        Some(json!({"scope": "root"})),
    )
    .await;
    assert_eq!(code, 422, "an unknown scope is refused: {body}");

    let dev_items = format!("/v1/accounts/{ACCOUNT}/devices/dev0/items/Setting");
    let setting = |v: &str| Some(json!({"name": "mode", "value": v}));
    let firmware = Some(json!({"version": "1.0.0", "url": "https://fw.example/1.bin"}));
    let bcast = format!("/v1/accounts/{ACCOUNT}/items/Firmware");

    // read: GET only.
    for path in [
        format!("/v1/devices/{ACCOUNT}/dev0"),
        dev_items.clone(),
        format!("/v1/accounts/{ACCOUNT}/conflicts"),
        "/v1/devices".into(),
    ] {
        let (code, body) = call("GET", path.clone(), read.clone(), None).await;
        assert_eq!(code, 200, "read key GET {path}: {body}");
    }
    for (method, path, body) in [
        ("POST", dev_items.clone(), setting("r")),
        ("POST", bcast.clone(), firmware.clone()),
        (
            "POST",
            "/v1/devices".into(),
            Some(register(ACCOUNT, "dev9")),
        ),
        ("GET", keys_path.clone(), None),
        ("GET", "/v1/status".into(), None),
    ] {
        let (code, answer) = call(method, path.clone(), read.clone(), body).await;
        assert_refused(code, &answer, 403, &format!("read key {method} {path}"));
    }

    // write: items too, but no devices, keys or status.
    let (code, body) = call("POST", dev_items.clone(), write.clone(), setting("w")).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = call("PATCH", dev_items.clone(), write.clone(), setting("w2")).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = call("POST", bcast.clone(), write.clone(), firmware.clone()).await;
    assert_eq!(code, 201, "{body}");
    for (method, path, body) in [
        (
            "POST",
            "/v1/devices".to_string(),
            Some(register(ACCOUNT, "dev9")),
        ),
        ("POST", keys_path.clone(), Some(json!({"scope": "admin"}))),
        ("GET", keys_path.clone(), None),
        ("GET", "/v1/status".into(), None),
    ] {
        let (code, answer) = call(method, path.clone(), write.clone(), body).await;
        assert_refused(code, &answer, 403, &format!("write key {method} {path}"));
    }

    // admin: everything of its account, and the service status.
    let (code, body) = call(
        "POST",
        "/v1/devices".into(),
        admin.clone(),
        Some(register(ACCOUNT, "dev1")),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = call("GET", "/v1/status".into(), admin.clone(), None).await;
    assert_eq!(code, 200, "{body}");
    let (code, listed) = call("GET", keys_path.clone(), admin.clone(), None).await;
    assert_eq!(code, 200, "{listed}");
    let scopes: Vec<&str> = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["scope"].as_str())
        .collect();
    assert_eq!(scopes.len(), 3, "{listed}");
    for scope in ["admin", "read", "write"] {
        assert!(scopes.contains(&scope), "{listed}");
    }
    let text = listed.to_string();
    for key in [&admin, &read, &write] {
        let secret = &key[20..];
        assert!(!text.contains(secret), "a listing shows a secret: {listed}");
    }
    assert!(
        !text.contains("secret_hash") && !text.contains("sha256"),
        "{listed}"
    );

    // Another account, existing or not: the same 403, before anything is looked up.
    let (code, exists) = call(
        "GET",
        format!("/v1/devices/{OTHER}/g1"),
        admin.clone(),
        None,
    )
    .await;
    assert_refused(code, &exists, 403, "another account's device");
    let (code, missing) = call(
        "GET",
        format!("/v1/devices/{OTHER}/nope"),
        admin.clone(),
        None,
    )
    .await;
    assert_refused(code, &missing, 403, "another account's missing device");
    assert_eq!(
        exists, missing,
        "the answer hints whether the target exists"
    );
    for (method, path, body) in [
        ("GET", format!("/v1/accounts/{OTHER}/items/Setting"), None),
        (
            "GET",
            format!("/v1/accounts/{OTHER}/devices/g1/items/Setting"),
            None,
        ),
        (
            "POST",
            format!("/v1/accounts/{OTHER}/devices/g1/items/Setting"),
            setting("x"),
        ),
        (
            "POST",
            format!("/v1/accounts/{OTHER}/items/Firmware"),
            firmware.clone(),
        ),
        ("GET", format!("/v1/accounts/{OTHER}/conflicts"), None),
        ("POST", "/v1/devices".into(), Some(register(OTHER, "mine"))),
        ("GET", format!("/v1/devices?account={OTHER}"), None),
        ("GET", format!("/v1/accounts/{OTHER}/keys"), None),
        (
            "POST",
            format!("/v1/accounts/{OTHER}/keys"),
            Some(json!({"scope": "admin"})),
        ),
    ] {
        let (code, answer) = call(method, path.clone(), admin.clone(), body).await;
        assert_refused(code, &answer, 403, &format!("acme admin {method} {path}"));
    }
    let other_id = devtables_cloud::auth::parse_api_key(&other_admin)
        .expect("parses")
        .0
        .to_string();
    let (code, answer) = call(
        "DELETE",
        format!("/v1/accounts/{OTHER}/keys/{other_id}"),
        admin.clone(),
        None,
    )
    .await;
    assert_refused(code, &answer, 403, "revoking another account's key");
    // Naming the other account's key under one's own account finds nothing.
    let (code, answer) = call(
        "DELETE",
        format!("/v1/accounts/{ACCOUNT}/keys/{other_id}"),
        admin.clone(),
        None,
    )
    .await;
    assert_eq!(code, 404, "{answer}");

    // The device list shows the key's account only.
    let names = |v: &Value| -> Vec<String> {
        v["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        format!(
                            "{}/{}",
                            d["account"].as_str().unwrap_or(""),
                            d["device"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (_, mine) = call("GET", "/v1/devices".into(), read.clone(), None).await;
    assert_eq!(names(&mine), ["acme/dev0", "acme/dev1"], "{mine}");
    let (_, theirs) = call("GET", "/v1/devices".into(), other_admin.clone(), None).await;
    assert_eq!(names(&theirs), ["globex/g1"], "{theirs}");
    let (code, body) = call(
        "GET",
        format!("/v1/devices/{OTHER}/g1"),
        other_admin.clone(),
        None,
    )
    .await;
    assert_eq!(code, 200, "the other account's key still works: {body}");

    // Revoking: the key worked before, and is refused after (401, not 403).
    let (code, body) = call(
        "DELETE",
        format!("{keys_path}/{write_id}"),
        admin.clone(),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, answer) = call("GET", dev_items.clone(), write.clone(), None).await;
    assert_refused(code, &answer, 401, "a revoked key");
    let (code, answer) = call("POST", dev_items.clone(), write.clone(), setting("late")).await;
    assert_refused(code, &answer, 401, "a revoked key writing");
    let (_, listed) = call("GET", keys_path.clone(), admin.clone(), None).await;
    let revoked = listed["keys"]
        .as_array()
        .and_then(|a| a.iter().find(|k| k["id"] == write_id.as_str()).cloned())
        .expect("the revoked key is still listed");
    assert!(revoked["revoked_ms"].is_u64(), "{revoked}");

    let (_, status) = call("GET", "/v1/status".into(), admin.clone(), None).await;
    assert!(
        status["api_forbidden"].as_u64().unwrap_or(0) >= 20,
        "{status}"
    );
    assert_eq!(status["api_unauthorized"], 2, "{status}");
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_no_auth_serves_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.insecure_no_auth = true;
    let cloud = Cloud::start(config, schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    let body = json!({"account": OTHER, "device": "open"});
    let (code, answer) = request(api, "POST", "/v1/devices", None, Some(&body)).await;
    assert_eq!(code, 201, "{answer}");
    let (code, answer) = get(api, "/v1/devices").await;
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["devices"][0]["device"], "open", "{answer}");
    let (code, answer) = get(api, "/v1/status").await;
    assert_eq!(code, 200, "{answer}");
    cloud.shutdown().await;
}
