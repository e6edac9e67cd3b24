//! Mutual TLS with a real agent: a device whose configuration has a client certificate from the
//! cloud's device CA and no secret connects to the embedded broker's device-certificate
//! listener and syncs both ways; once the device is revoked, its still valid certificate gets
//! it nowhere, and the agent says why.

use std::net::SocketAddr;
use std::path::Path;

use devtables_agent::tls::{ClientIdentity, ClientTls};
use devtables_agent::Agent;
use devtables_cloud::broker::BrokerTls;
use devtables_cloud::tls::ServerTls;
use devtables_cloud::{BrokerMode, Cloud, CloudConfig, DeviceCertificates};

use super::support::{agent_config, device, eventually, schema, syncs_both_ways};
use super::tls::Ca;

/// A cloud whose embedded broker has its plain listener (for the service), a TLS listener and
/// the device-certificate listener.
async fn start_mtls_cloud(data_dir: &Path, server: &ServerTls) -> Cloud {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = CloudConfig::new(data_dir);
    config.api_listen = any;
    config.broker = BrokerMode::Embedded { listen: any };
    config.broker_tls = Some(BrokerTls {
        listen: any,
        files: server.clone(),
    });
    config.device_certificates = Some(DeviceCertificates::new(any));
    config.sqlite_full_sync = false;
    Cloud::start(config, schema()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_an_agent_with_a_certificate_and_no_secret_syncs_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("devtables test CA");
    let server_ca = ca.write_ca(dir.path(), "server");
    let server = ca.server(dir.path(), "server");
    let cloud = start_mtls_cloud(&dir.path().join("cloud"), &server).await;
    let cert_addr = cloud.mqtt_cert_addr.expect("a device-certificate listener");
    cloud.register_device(&device()).await.unwrap();
    let issued = cloud.issue_device_certificate(&device()).await.unwrap();
    let identity = ClientIdentity {
        cert: dir.path().join("d1.pem"),
        key: dir.path().join("d1.key"),
    };
    std::fs::write(&identity.cert, &issued.cert_pem).unwrap();
    std::fs::write(&identity.key, &issued.key_pem).unwrap();

    // No secret: the certificate is the device's only credential.
    let mut config = agent_config(dir.path(), "", cert_addr.port());
    let mut tls = ClientTls::new(&server_ca);
    tls.identity = Some(identity);
    config.tls = Some(tls);
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "ready over mutual TLS", |a| a.status().ready).await;

    syncs_both_ways(&cloud, &agent).await;

    // Revoked: the session is closed and every reconnect with the certificate is refused.
    cloud.revoke_device(&device(), false).await.unwrap();
    eventually(&agent, "the refusal of a revoked device", |a| {
        let s = a.status();
        !s.ready
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("NotAuthorized"))
    })
    .await;
    agent.shutdown().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_an_agent_without_secret_or_certificate_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent_config(dir.path(), "", 1);
    config.tls = Some(ClientTls::new(dir.path().join("ca.pem")));
    let err = Agent::start(config, schema()).err().expect("refused");
    assert!(err.to_string().contains("no credentials"), "{err}");
    // Nothing was created for it.
    assert!(!dir.path().join("d1.db").exists());
}
