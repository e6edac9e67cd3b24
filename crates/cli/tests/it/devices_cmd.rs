//! `devtables devices revoke` against a running `devtables cloud` process: a revocation written
//! to the cloud's data folder by another process reaches the cloud's embedded broker within its
//! `credentials_ttl`, so the device's reconnects are refused (CONNACK "not authorized"), and its
//! items stay.

use std::path::Path;

use rumqttc::{Client, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use serde_json::json;

use super::bin;
use super::harness::{eventually, unique_prefix, BrokerChoice, CloudProc, KEY_ACCOUNT};

/// What the broker answers to a CONNECT of `account/device` with `secret`: `Ok` on a CONNACK
/// accepting it, else the refusal code (`None`: another connection error).
fn connack(mqtt: &str, device: &str, secret: &str) -> Result<(), Option<ConnectReturnCode>> {
    let (host, port) = mqtt.rsplit_once(':').expect("host:port");
    let name = format!("{KEY_ACCOUNT}/{device}");
    let mut options = MqttOptions::new(&name, host, port.parse().expect("a port"));
    options.set_credentials(&name, secret);
    let (_client, mut connection) = Client::new(options, 10);
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => continue,
            Err(ConnectionError::ConnectionRefused(code)) => return Err(Some(code)),
            Err(e) => {
                eprintln!("connection error: {e}");
                return Err(None);
            }
        }
    }
    unreachable!("the connection iterator ends only after an error")
}

/// `devtables devices revoke --data DATA --account acme --device DEVICE`: (success, stderr).
fn revoke(data: &Path, device: &str) -> (bool, String) {
    let out = bin()
        .args([
            "devices",
            "revoke",
            "--account",
            KEY_ACCOUNT,
            "--device",
            device,
        ])
        .arg("--data")
        .arg(data)
        .output()
        .expect("devtables devices revoke runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn a_revocation_by_the_command_reaches_the_running_cloud_within_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    // The documented setting, short here so the test waits little (it waits on the condition).
    let cloud = CloudProc::start_with(
        dir.path(),
        &unique_prefix(),
        BrokerChoice::Embedded(0),
        "credentials_ttl_secs: 1,",
    );
    let secret = cloud.register(KEY_ACCOUNT, "d1");
    let (status, body) = cloud.send(
        "POST",
        &format!("/v1/accounts/{KEY_ACCOUNT}/devices/d1/items/Setting"),
        json!({"name": "mode", "value": "x"}),
    );
    assert_eq!(status, 201, "{body}");
    connack(&cloud.mqtt, "d1", &secret).expect("the registered device connects");
    let data = dir.path().join("cloud-data");

    let (ok, stderr) = revoke(&data, "nobody");
    assert!(!ok, "revoking an unknown device succeeded: {stderr}");
    assert!(stderr.contains("not registered"), "{stderr}");

    let (ok, stderr) = revoke(&data, "d1");
    assert!(ok, "{stderr}");
    eventually(
        "the running cloud to refuse the revoked device",
        || match connack(&cloud.mqtt, "d1", &secret) {
            Err(Some(ConnectReturnCode::NotAuthorized)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // Its items stay (only its credentials were revoked).
    let items = cloud.items(KEY_ACCOUNT, "d1", "Setting").expect("items");
    assert_eq!(items.len(), 1, "{items:?}");
}
