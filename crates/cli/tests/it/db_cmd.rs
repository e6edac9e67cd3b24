//! `devtables db` on the example schema.

use std::io::Write;
use std::process::Stdio;

use super::{bin, example_schema, stdout_json};

fn db(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    bin()
        .arg("db")
        .arg("--schema")
        .arg(example_schema())
        .arg("--db")
        .arg(dir.join("dev.redb"))
        .args(args)
        .output()
        .expect("devtables runs")
}

#[test]
fn create_get_find_update_remove() {
    let dir = tempfile::tempdir().unwrap();
    let fault = stdout_json(&db(
        dir.path(),
        &[
            "create",
            "Fault",
            r#"{"deviceId":"d1","severity":"warn","message":"fan"}"#,
        ],
    ));
    let id = fault["id"].as_str().expect("generated id").to_string();
    assert_eq!(id.len(), 26, "a ulid");
    assert!(
        fault.get("pk").is_none(),
        "hidden key fields are not printed"
    );

    let key = format!(r#"{{"deviceId":"d1","id":"{id}"}}"#);
    let got = stdout_json(&db(dir.path(), &["get", "Fault", &key, "--hidden"]));
    assert_eq!(got["sk"], format!("fault#{id}"));

    let page = stdout_json(&db(dir.path(), &["find", "Fault", r#"{"deviceId":"d1"}"#]));
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let by_index = stdout_json(&db(
        dir.path(),
        &[
            "find",
            "Fault",
            r#"{"gs1pk":"fault#warn"}"#,
            "--index",
            "gs1",
        ],
    ));
    assert_eq!(by_index["items"][0]["id"], id.as_str());

    let patch = format!(r#"{{"deviceId":"d1","id":"{id}","severity":"critical"}}"#);
    let updated = stdout_json(&db(dir.path(), &["update", "Fault", &patch]));
    assert_eq!(updated["severity"], "critical");
    assert_eq!(updated["message"], "fan");

    stdout_json(&db(dir.path(), &["remove", "Fault", &key]));
    let missing = db(dir.path(), &["get", "Fault", &key]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[test]
fn bad_input_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = db(
        dir.path(),
        &["create", "Fault", r#"{"deviceId":"d1","severity":"boom"}"#],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Fault.severity"),
        "error names model and field: {err}"
    );

    let out = db(dir.path(), &["create", "Status", r#"{"deviceId":"d1"}"#]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only in the cloud"));

    let out = db(dir.path(), &["create", "Fault", "not json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    let out = bin()
        .args(["db", "--schema", "/nonexistent.json5", "--db"])
        .arg(dir.path().join("x.redb"))
        .args(["get", "Fault", "{}"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot load schema"));

    // Reads never create the file they are asked to read.
    let missing = dir.path().join("typo.redb");
    for read in [
        &["get", "Fault", "{}"][..],
        &["find", "Fault", "{}"],
        &["export"],
    ] {
        let out = bin()
            .arg("db")
            .arg("--schema")
            .arg(super::example_schema())
            .arg("--db")
            .arg(&missing)
            .args(read)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{read:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("typo.redb"), "{read:?} names the file: {err}");
        assert!(!missing.exists(), "{read:?} created {}", missing.display());
    }

    // --limit 0 is refused, as the HTTP API's limit=0 is.
    let out = db(dir.path(), &["find", "Fault", "{}", "--limit", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--limit"), "{err}");
}

#[test]
fn export_then_import_into_another_file() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let setting = format!(r#"{{"deviceId":"d1","name":"s{i}","value":"v{i}"}}"#);
        stdout_json(&db(dir.path(), &["create", "Setting", &setting]));
    }
    let export = db(dir.path(), &["export"]);
    assert!(export.status.success());
    assert_eq!(String::from_utf8_lossy(&export.stdout).lines().count(), 5);

    let mut child = bin()
        .arg("db")
        .arg("--schema")
        .arg(example_schema())
        .arg("--db")
        .arg(dir.path().join("copy.redb"))
        .args(["import", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&export.stdout)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 5 items"));
}

#[test]
fn example_configs_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let (schema, cloud) =
        devtables_cloud::CloudFile::load(&dir.join("cloud.json5")).expect("cloud.json5 loads");
    assert!(schema.ends_with("schema.json5"));
    assert!(matches!(
        cloud.broker,
        devtables_cloud::BrokerMode::Embedded { .. }
    ));
    let (file, agent) = devtables_agent::config::AgentFile::load(&dir.join("agent.json5"))
        .expect("agent.json5 loads");
    assert_eq!(
        (agent.account.as_str(), agent.device.as_str()),
        ("acme", "gw-1")
    );
    assert!(devtables_schema::Schema::load(&file.schema).is_ok());
}
