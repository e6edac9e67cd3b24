//! TLS on every hop, with a real handshake: certificates made by the test with rcgen, a cloud
//! whose embedded broker and HTTP API serve only TLS, and agents that trust the right CA, the
//! wrong one, or use clear text where it is configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devtables_agent::tls::ClientTls;
use devtables_agent::Agent;
use devtables_cloud::broker::BrokerTls;
use devtables_cloud::tls::ServerTls;
use devtables_cloud::{BrokerMode, Cloud, CloudConfig};
use devtables_tls::test_pki::TestCa;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::{
    agent_config, device, eventually, eventually_in_cloud, item, schema, syncs_both_ways,
};

/// A certificate authority made for one test (the mutual TLS tests use it too), whose server
/// certificates come as the cloud's [`ServerTls`].
pub struct Ca(TestCa);

impl Ca {
    pub fn new(name: &str) -> Ca {
        Ca(TestCa::new(name))
    }

    /// Writes the CA certificate to `dir/<name>-ca.pem`.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        self.0.write_ca(dir, name)
    }

    /// A server certificate for `localhost` and 127.0.0.1, signed by this CA, written to `dir`.
    pub fn server(&self, dir: &Path, name: &str) -> ServerTls {
        let files = self.0.server(dir, name);
        ServerTls {
            cert: files.cert,
            key: files.key,
        }
    }
}

/// A cloud whose embedded broker has `plain` and/or a TLS listener, and whose API is HTTPS.
async fn start_tls_cloud(data_dir: &Path, server: &ServerTls, plain: bool) -> Cloud {
    let mut config = CloudConfig::new(data_dir);
    config.api_listen = "127.0.0.1:0".parse().unwrap();
    config.api_tls = Some(server.clone());
    config.broker = BrokerMode::Embedded {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    config.broker_plain = plain;
    config.broker_tls = Some(BrokerTls {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        files: server.clone(),
    });
    config.sqlite_full_sync = false;
    Cloud::start(config, schema()).await.unwrap()
}

/// One `GET /health` over HTTPS, trusting `ca`; the status code.
async fn https_health(api: SocketAddr, ca: &Path) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in devtables_agent::tls::read_certs(ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    // A peer may close without close_notify; what was read is enough.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_broker_and_api_carry_data_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("devtables test CA");
    let ca_file = ca.write_ca(dir.path(), "good");
    let server = ca.server(dir.path(), "server");
    // TLS only: the service's own client must reach its broker over TLS too.
    let cloud = start_tls_cloud(&dir.path().join("cloud"), &server, false).await;
    let tls_addr = cloud.mqtt_tls_addr.expect("a TLS listener");
    assert!(cloud.api_tls);
    assert_eq!(
        cloud.mqtt_addr,
        tls_addr.to_string(),
        "TLS is the only listener"
    );
    let secret = cloud.register_device(&device()).await.unwrap();

    let mut config = agent_config(dir.path(), &secret, tls_addr.port());
    config.tls = Some(ClientTls {
        ca_file: ca_file.clone(),
        server_name: None,
        identity: None,
    });
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "ready over TLS", |a| a.status().ready).await;

    syncs_both_ways(&cloud, &agent).await;

    // The API answers over HTTPS to a client trusting the CA, and not in clear text.
    assert_eq!(https_health(cloud.api_addr, &ca_file).await, Ok(200));
    let plain = super::support::plain_http_status(cloud.api_addr).await;
    assert_eq!(plain, None, "the HTTPS port must not answer plain HTTP");
    // A client trusting another CA is refused by its own check, and the refusal is counted.
    let other = Ca::new("another CA").write_ca(dir.path(), "other");
    assert!(https_health(cloud.api_addr, &other).await.is_err());
    let deadline = std::time::Instant::now() + super::support::WAIT;
    while cloud.status().api_tls_handshakes_failed < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the two refused handshakes are counted: {:?}",
            cloud.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    agent.shutdown().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_trusting_another_ca_is_refused_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = Ca::new("devtables test CA").server(dir.path(), "server");
    let wrong_ca = Ca::new("another CA").write_ca(dir.path(), "wrong");
    let cloud = start_tls_cloud(&dir.path().join("cloud"), &server, false).await;
    let secret = cloud.register_device(&device()).await.unwrap();

    let mut config = agent_config(dir.path(), &secret, cloud.mqtt_tls_addr.unwrap().port());
    config.tls = Some(ClientTls {
        ca_file: wrong_ca,
        server_name: None,
        identity: None,
    });
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "a certificate error", |a| {
        a.status()
            .last_error
            .is_some_and(|e| e.contains("certificate"))
    })
    .await;
    let status = agent.status();
    assert!(
        !status.ready,
        "no session without a trusted broker: {status:?}"
    );
    let error = status.last_error.unwrap();
    assert!(
        error.contains("UnknownIssuer"),
        "the reason is named: {error}"
    );
    let said = status.connection.unwrap_or_default();
    assert!(
        said.starts_with("cannot connect: the TLS handshake failed"),
        "the status says what failed: {said}"
    );
    agent.shutdown().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mqtt_still_works_beside_the_tls_listener_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = Ca::new("devtables test CA").server(dir.path(), "server");
    let cloud = start_tls_cloud(&dir.path().join("cloud"), &server, true).await;
    let tls_addr = cloud.mqtt_tls_addr.unwrap();
    let plain_port = super::support::mqtt_port(&cloud);
    assert_ne!(plain_port, tls_addr.port(), "two listeners");
    let secret = cloud.register_device(&device()).await.unwrap();

    // No `tls`: clear text, to the plain listener.
    let agent = Agent::start(agent_config(dir.path(), &secret, plain_port), schema()).unwrap();
    agent
        .db()
        .create(
            "Fault",
            &item(json!({"deviceId": "d1", "id": "f1", "severity": "info"})),
        )
        .unwrap();
    eventually_in_cloud(&cloud, &agent, "Fault", 1).await;
    agent.shutdown().await;
    cloud.shutdown().await;
}
