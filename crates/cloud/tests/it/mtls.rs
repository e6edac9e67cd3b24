//! Mutual TLS for devices, against a started cloud over real TCP with real TLS handshakes: a
//! device registered through the API with `"certificate": true` connects to the embedded
//! broker's device-certificate listener with that certificate alone (no secret) and syncs; the
//! CA lives in the data folder and survives a restart; a certificate that does not prove the
//! device is refused, in the handshake (none, expired, another CA) or at CONNECT (another
//! device's, counted in `mqtt_certificates_refused`); and the registry still decides: revoking
//! the device refuses its valid certificate, rotating its secret cuts off every certificate
//! issued before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use devtables_cloud::broker::BrokerTls;
use devtables_cloud::ca::DeviceCa;
use devtables_cloud::tls::{ClientIdentity, ClientTls, ServerTls};
use devtables_cloud::{Cloud, CloudConfig, DeviceCertificates};
use devtables_sync::identity::DeviceId;
use devtables_tls::test_pki::TestCa;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use serde_json::{json, Value};

use crate::harness::{admin_key, config, device, request, started, RawDevice, WAIT};

/// The broker's server certificate (for 127.0.0.1) and the CA file clients check it with.
struct ServerFiles {
    files: ServerTls,
    ca: PathBuf,
}

fn server_files(dir: &Path) -> ServerFiles {
    let ca = TestCa::new("mtls test CA");
    let server = ca.server(dir, "server");
    ServerFiles {
        files: ServerTls {
            cert: server.cert,
            key: server.key,
        },
        ca: ca.write_ca(dir, "server"),
    }
}

/// A cloud with the plain listener (the service's), the TLS listener and the device-certificate
/// listener, all on free ports; data in `data`.
fn mtls_config(data: &Path, server: &ServerFiles) -> CloudConfig {
    let mut c = config(data);
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    c.broker_tls = Some(BrokerTls {
        listen: any,
        files: server.files.clone(),
    });
    let mut certs = DeviceCertificates::new(any);
    certs.validity_days = 2;
    c.device_certificates = Some(certs);
    c
}

/// Writes a certificate and key (PEM texts) to `dir/{name}.pem|.key`.
fn write_identity(dir: &Path, name: &str, cert: &str, key: &str) -> ClientIdentity {
    let id = ClientIdentity {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&id.cert, cert).unwrap();
    std::fs::write(&id.key, key).unwrap();
    id
}

/// Registers `id` through the API with a certificate; the answer's body.
async fn register_with_certificate(cloud: &Cloud, admin: &str, id: &DeviceId) -> Value {
    let body = json!({"account": id.account, "device": id.device, "certificate": true});
    let (code, body) = request(
        cloud.api_addr,
        "POST",
        "/v1/devices",
        Some(admin),
        Some(&body),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    body
}

/// MQTT options for `client_id` to `addr` over TLS (checking the broker with `server_ca`),
/// presenting `identity` when given; no username or password.
fn tls_options(
    addr: SocketAddr,
    server_ca: &Path,
    client_id: &str,
    identity: Option<ClientIdentity>,
) -> MqttOptions {
    let mut tls = ClientTls::new(server_ca);
    tls.identity = identity;
    let config = devtables_cloud::tls::client_config(&tls).expect("a client TLS configuration");
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ));
    o
}

/// What the broker answers to a CONNECT with these options: `Ok` on an accepting CONNACK, else
/// the error (a refusing CONNACK, or the TLS failure).
async fn connack(options: MqttOptions) -> Result<(), ConnectionError> {
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return Ok(());
            }
        }
    })
    .await
    .expect("no answer in time")
}

fn not_authorized(result: &Result<(), ConnectionError>) -> bool {
    matches!(
        result,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized
        ))
    )
}

/// A refusal in the TLS handshake: the broker's TLS alert `alert` reached the client instead of
/// a CONNACK, so no MQTT was spoken.
fn handshake_refused(result: &Result<(), ConnectionError>, alert: &str) -> bool {
    match result {
        Err(ConnectionError::ConnectionRefused(_)) | Ok(()) => false,
        Err(e) => format!("{e:?}").contains(&format!("AlertReceived({alert})")),
    }
}

async fn status(cloud: &Cloud, admin: &str) -> Value {
    let (code, body) = request(cloud.api_addr, "GET", "/v1/status", Some(admin), None).await;
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_a_device_registered_with_a_certificate_syncs_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_files(dir.path());
    let data = dir.path().join("cloud");
    let cloud = started(mtls_config(&data, &server)).await;
    let cert_addr = cloud.mqtt_cert_addr.expect("a device-certificate listener");
    let admin = admin_key(&cloud).await;
    let id = device(1);
    let body = register_with_certificate(&cloud, &admin, &id).await;
    let cert = &body["certificate"];
    assert_eq!(cert["mqtt_address"], cert_addr.to_string(), "{body}");
    assert!(body["secret"].is_string(), "the secret is issued too");
    // The CA is the one kept in the data folder.
    let ca_pem = std::fs::read_to_string(data.join("ca/ca.pem")).unwrap();
    assert_eq!(cert["ca"], ca_pem.as_str());
    let identity = write_identity(
        dir.path(),
        "dev1",
        cert["cert"].as_str().unwrap(),
        cert["key"].as_str().unwrap(),
    );

    // The certificate alone: the cloud's sync loop welcomes the device.
    let options = tls_options(
        cert_addr,
        &server.ca,
        &id.node_name(),
        Some(identity.clone()),
    );
    let mut dev = RawDevice::connect_with(options, id.clone()).await;
    assert!(dev.hello(1, 0).await, "no welcome over mutual TLS");
    drop(dev);
    cloud.shutdown().await;

    // Restarted on the same data folder: the same CA, so the certificate still works.
    let cloud = started(mtls_config(&data, &server)).await;
    assert_eq!(
        std::fs::read_to_string(data.join("ca/ca.pem")).unwrap(),
        ca_pem
    );
    let cert_addr = cloud.mqtt_cert_addr.unwrap();
    let options = tls_options(cert_addr, &server.ca, &id.node_name(), Some(identity));
    let mut dev = RawDevice::connect_with(options, id.clone()).await;
    assert!(dev.hello(2, 0).await, "no welcome after a restart");
    let admin = admin_key(&cloud).await;
    assert_eq!(status(&cloud, &admin).await["mqtt_certificates_refused"], 0);
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_certificates_that_do_not_prove_the_device_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_files(dir.path());
    let data = dir.path().join("cloud");
    let cloud = started(mtls_config(&data, &server)).await;
    let cert_addr = cloud.mqtt_cert_addr.unwrap();
    let admin = admin_key(&cloud).await;
    let (a, b) = (device(1), device(2));
    register_with_certificate(&cloud, &admin, &a).await;
    let body_b = register_with_certificate(&cloud, &admin, &b).await;
    let cert_b = write_identity(
        dir.path(),
        "dev2",
        body_b["certificate"]["cert"].as_str().unwrap(),
        body_b["certificate"]["key"].as_str().unwrap(),
    );
    let connect = |identity: Option<ClientIdentity>| {
        tls_options(cert_addr, &server.ca, &a.node_name(), identity)
    };

    // B's valid certificate with A's client id: refused at CONNECT, and counted.
    let result = connack(connect(Some(cert_b.clone()))).await;
    assert!(not_authorized(&result), "{result:?}");
    assert_eq!(status(&cloud, &admin).await["mqtt_certificates_refused"], 1);
    // ... while B's own client id with it connects.
    let own = tls_options(cert_addr, &server.ca, &b.node_name(), Some(cert_b));
    assert!(connack(own).await.is_ok());

    // A's certificate from the cloud's own CA, but expired: refused in the handshake.
    let ca = DeviceCa::open_or_create(&data).unwrap();
    let record_hash = {
        let who = a.clone();
        cloud
            .store
            .call(move |c| c.store.device(&who))
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .secret_hash
    };
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let expired = ca
        .issue_between(&a, &record_hash, now - 2 * day, now - day)
        .unwrap();
    let expired = write_identity(dir.path(), "expired", &expired.cert_pem, &expired.key_pem);
    let result = connack(connect(Some(expired))).await;
    assert!(
        handshake_refused(&result, "CertificateExpired"),
        "{result:?}"
    );

    // A's name from another CA (another cloud's), with the right binding: refused.
    let other = DeviceCa::open_or_create(&dir.path().join("other")).unwrap();
    let forged = other.issue(&a, &record_hash, day).unwrap();
    let forged = write_identity(dir.path(), "forged", &forged.cert_pem, &forged.key_pem);
    let result = connack(connect(Some(forged))).await;
    assert!(handshake_refused(&result, "DecryptError"), "{result:?}");

    // A's name from a CA of another name altogether: refused too.
    let foreign_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let foreign_ca = params.self_signed(&foreign_key).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, a.node_name());
    params.distinguished_name.push(
        rcgen::DnType::OrganizationName,
        devtables_cloud::ca::credential_binding(&record_hash),
    );
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &foreign_ca, &foreign_key).unwrap();
    let foreign = write_identity(dir.path(), "foreign", &cert.pem(), &key.serialize_pem());
    let result = connack(connect(Some(foreign))).await;
    assert!(handshake_refused(&result, "UnknownCA"), "{result:?}");

    // No certificate at all: refused, even with A's correct secret.
    let mut options = connect(None);
    let secret = cloud.rotate_device_secret(&a).await.unwrap();
    options.set_credentials(a.node_name(), secret);
    let result = connack(options).await;
    assert!(
        handshake_refused(&result, "CertificateRequired"),
        "{result:?}"
    );

    // Only the CONNECT refusal reached the counter: rmqtt refuses handshakes on its own.
    assert_eq!(status(&cloud, &admin).await["mqtt_certificates_refused"], 1);
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_the_registry_still_decides_revoked_or_rotated_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_files(dir.path());
    let cloud = started(mtls_config(&dir.path().join("cloud"), &server)).await;
    let cert_addr = cloud.mqtt_cert_addr.unwrap();
    let admin = admin_key(&cloud).await;
    let id = device(1);
    let body = register_with_certificate(&cloud, &admin, &id).await;
    let identity = write_identity(
        dir.path(),
        "dev1",
        body["certificate"]["cert"].as_str().unwrap(),
        body["certificate"]["key"].as_str().unwrap(),
    );
    let options = |identity: &ClientIdentity| {
        tls_options(
            cert_addr,
            &server.ca,
            &id.node_name(),
            Some(identity.clone()),
        )
    };
    let mut dev = RawDevice::connect_with(options(&identity), id.clone()).await;
    assert!(dev.hello(1, 0).await);

    // Revoked: the live session is closed and the still valid certificate is refused.
    let path = format!("/v1/devices/{}/{}", id.account, id.device);
    let (code, body) = request(cloud.api_addr, "DELETE", &path, Some(&admin), None).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        dev.closed().await,
        "the revoked device's session is still open"
    );
    let result = connack(options(&identity)).await;
    assert!(not_authorized(&result), "{result:?}");
    let numbers = status(&cloud, &admin).await;
    assert_eq!(numbers["mqtt_certificates_refused"], 1, "{numbers}");
    assert!(
        numbers["mqtt_refused_revoked"].as_u64() >= Some(1),
        "{numbers}"
    );
    // A revoked device gets no new certificate either.
    let err = cloud.issue_device_certificate(&id).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");

    // Rotating the secret makes the device usable again, but not the old certificate.
    let (code, body) = request(
        cloud.api_addr,
        "POST",
        &format!("{path}/secret"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let result = connack(options(&identity)).await;
    assert!(
        not_authorized(&result),
        "a certificate from before the rotation: {result:?}"
    );
    // A certificate issued for the new credentials works.
    let fresh = cloud.issue_device_certificate(&id).await.unwrap();
    let fresh = write_identity(dir.path(), "fresh", &fresh.cert_pem, &fresh.key_pem);
    let mut dev = RawDevice::connect_with(options(&fresh), id.clone()).await;
    assert!(dev.hello(2, 0).await);
    assert_eq!(status(&cloud, &admin).await["mqtt_certificates_refused"], 2);
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_registering_with_a_certificate_needs_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    assert_eq!(cloud.mqtt_cert_addr, None);
    let admin = admin_key(&cloud).await;
    let id = device(1);
    let body = json!({"account": id.account, "device": id.device, "certificate": true});
    let (code, answer) = request(
        cloud.api_addr,
        "POST",
        "/v1/devices",
        Some(&admin),
        Some(&body),
    )
    .await;
    assert_eq!(code, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("device_certificates"),
        "{answer}"
    );
    // Nothing was registered, and no CA was made.
    let path = format!("/v1/devices/{}/{}", id.account, id.device);
    let (code, _) = request(cloud.api_addr, "GET", &path, Some(&admin), None).await;
    assert_eq!(code, 404);
    assert!(!dir.path().join("ca").exists());
    let err = cloud.issue_device_certificate(&id).await.unwrap_err();
    assert!(err.to_string().contains("device_certificates"), "{err}");
    cloud.shutdown().await;
}
