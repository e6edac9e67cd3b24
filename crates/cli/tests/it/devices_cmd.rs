//! `devtables devices revoke` against a running `devtables cloud` process: a revocation written
//! to the cloud's data folder by another process reaches the cloud's embedded broker within its
//! `credentials_ttl`, so the device's reconnects are refused (CONNACK "not authorized"), and its
//! items stay. `devtables devices cert` issues a client certificate from the data folder's
//! device CA that a cloud on that folder accepts on its device-certificate listener.

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

/// `devtables devices cert --data DATA --account acme --device DEVICE --out OUT`: (success,
/// stderr).
fn issue_cert(data: &Path, device: &str, out: &Path) -> (bool, String) {
    let out = bin()
        .args([
            "devices",
            "cert",
            "--account",
            KEY_ACCOUNT,
            "--device",
            device,
        ])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .expect("devtables devices cert runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A server certificate for 127.0.0.1 and the CA file that checks it, written to `dir`.
fn server_tls(dir: &Path) -> (devtables_cloud::tls::ServerTls, std::path::PathBuf) {
    let ca = devtables_tls::test_pki::TestCa::new("devices test CA");
    let server = ca.server(dir, "server");
    let files = devtables_cloud::tls::ServerTls {
        cert: server.cert,
        key: server.key,
    };
    (files, ca.write_ca(dir, "server"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_by_the_command_is_accepted_by_the_cloud() {
    use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
    use devtables_cloud::store::CloudStore;
    use devtables_cloud::tls::{ClientIdentity, ClientTls};
    use devtables_sync::identity::DeviceId;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = dir.path().join("d1-cert");
    // Without a store, nothing is issued and no CA is made.
    let (ok, stderr) = issue_cert(&data, "d1", &out);
    assert!(!ok && stderr.contains("no cloud store"), "{stderr}");
    assert!(!data.join("ca").exists());

    // A device registered in the store, as the cloud registers it.
    std::fs::create_dir_all(&data).unwrap();
    let id = DeviceId::new(KEY_ACCOUNT, "d1").unwrap();
    {
        let mut store =
            SqliteStore::open(&data.join("cloud.db"), SqliteOptions::default()).expect("the store");
        let secret = devtables_cloud::auth::generate_secret();
        store
            .register_device(&id, &devtables_cloud::auth::hash_secret(&secret), None, 0)
            .unwrap();
    }
    let (ok, stderr) = issue_cert(&data, "nobody", &out);
    assert!(!ok && stderr.contains("not registered"), "{stderr}");
    let (ok, stderr) = issue_cert(&data, "d1", &out);
    assert!(ok, "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is owner-only");
    }
    // The files are never replaced.
    let cert = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let (ok, stderr) = issue_cert(&data, "d1", &out);
    assert!(!ok && stderr.contains("exists"), "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("cert.pem")).unwrap(), cert);
    assert_eq!(
        std::fs::read_to_string(out.join("ca.pem")).unwrap(),
        std::fs::read_to_string(data.join("ca/ca.pem")).unwrap(),
        "ca.pem is the data folder's device CA"
    );

    // A cloud on that data folder accepts the certificate, with no secret, over mutual TLS.
    let (server, server_ca) = server_tls(dir.path());
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = devtables_cloud::CloudConfig::new(&data);
    config.api_listen = any;
    config.broker = devtables_cloud::BrokerMode::Embedded { listen: any };
    config.broker_tls = Some(devtables_cloud::broker::BrokerTls {
        listen: any,
        files: server,
    });
    config.device_certificates = Some(devtables_cloud::DeviceCertificates::new(any));
    config.sqlite_full_sync = false;
    let schema = devtables_schema::Schema::load(&super::example_schema()).unwrap();
    let cloud = devtables_cloud::Cloud::start(config, std::sync::Arc::new(schema))
        .await
        .expect("the cloud starts");
    let addr = cloud.mqtt_cert_addr.unwrap();
    let mut tls = ClientTls::new(&server_ca);
    tls.identity = Some(ClientIdentity {
        cert: out.join("cert.pem"),
        key: out.join("key.pem"),
    });
    let tls = devtables_cloud::tls::client_config(&tls).unwrap();
    let mut options = MqttOptions::new(id.node_name(), "127.0.0.1", addr.port());
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let connack = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .expect("an answer in time");
    assert_eq!(connack, Ok(ConnectReturnCode::Success));
    cloud.shutdown().await;

    // A revoked device gets no certificate.
    let (ok, stderr) = revoke(&data, "d1");
    assert!(ok, "{stderr}");
    let (ok, stderr) = issue_cert(&data, "d1", &dir.path().join("again"));
    assert!(!ok && stderr.contains("revoked"), "{stderr}");
}
