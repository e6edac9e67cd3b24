//! `devtables broker-config mosquitto`: the files it writes from a registry (always run), and a
//! real Mosquitto started on them (a service test: with DEVTABLES_SERVICES set it must run, and
//! it needs the `mosquitto` binary): the isolation checks of `isolation.rs` pass against it, and
//! a device revoked or rotated in the registry is refused with its old secret once the command
//! has run again with `--reload-pid`, without a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use devtables_cloud::auth::hash_secret;
use devtables_cloud::broker_hash::mosquitto_hash;
use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::CloudStore;
use devtables_sync::identity::DeviceId;
use rumqttc::ConnectReturnCode;
use serde_json::Value;

use super::bin;
use super::harness::{
    create_admin_key, eventually, free_port, unique_prefix, BrokerChoice, CloudProc, MosquittoProc,
    KEY_ACCOUNT,
};
use super::isolation::{two_devices_are_isolated, BrokerKind, Deployment, RawMqtt};
use super::services::services_on;

/// Runs `devtables broker-config mosquitto --data DATA --out OUT ARGS...`: (success, the JSON
/// report on stdout, stderr).
fn broker_config(data: &Path, out: &Path, args: &[&str]) -> (bool, Value, String) {
    let output = bin()
        .args(["broker-config", "mosquitto", "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("devtables broker-config runs");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let report = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output.status.success(), report, stderr)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_command_writes_owner_only_files_from_the_registry_and_lists_devices_to_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cloud-data");
    let out = dir.path().join("mosquitto");

    let (ok, _, stderr) = broker_config(&data, &out, &[]);
    assert!(!ok && stderr.contains("holds no cloud store"), "{stderr}");
    assert!(!out.exists(), "nothing written without a registry");

    create_admin_key(&data);
    let mut store = SqliteStore::open(&data.join("cloud.db"), SqliteOptions::default()).unwrap();
    let id = |d: &str| DeviceId::new(KEY_ACCOUNT, d).unwrap();
    let fresh_hash = mosquitto_hash("fresh-secret");
    store
        .register_device(
            &id("fresh"),
            &hash_secret("fresh-secret"),
            Some(&fresh_hash),
            1,
        )
        .unwrap();
    // Registered before the registry kept a Mosquitto hash (or by an older cloud).
    store
        .register_device(&id("old"), &hash_secret("old-secret"), None, 1)
        .unwrap();
    store
        .register_device(
            &id("gone"),
            &hash_secret("gone"),
            Some(&mosquitto_hash("gone")),
            1,
        )
        .unwrap();
    assert!(store.revoke_device(&id("gone"), false).unwrap());
    drop(store);

    // `--user root`: this test must not depend on a `mosquitto` account (it is used only when
    // the command runs as root).
    // Ports only written into the configuration (nothing listens here), free all the same.
    let (port, plain_port) = (free_port().to_string(), free_port().to_string());
    let args = [
        "--port",
        port.as_str(),
        "--bind",
        "127.0.0.1",
        "--topic-prefix",
        "fleet",
        "--user",
        "root",
    ];
    let (ok, report, stderr) = broker_config(&data, &out, &args);
    assert!(ok, "{stderr}");
    assert_eq!(report["devices"], 1, "{report}");
    assert_eq!(report["revoked"], 1, "{report}");
    assert_eq!(report["to_rotate_count"], 1, "{report}");
    assert_eq!(
        report["to_rotate"],
        serde_json::json!(["acme/old"]),
        "{report}"
    );
    assert!(
        stderr.contains("acme/old") && stderr.contains("rotate its secret"),
        "the device to rotate is named, with what to do: {stderr}"
    );

    let passwords = read(&out.join("passwords"));
    let users: Vec<&str> = passwords
        .lines()
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(
        users,
        [
            "devtables-service",
            "devtables-service-egress",
            "acme/fresh"
        ],
        "{passwords}"
    );
    assert_eq!(report["service_egress_user"], "devtables-service-egress");
    assert!(passwords.contains(&format!("acme/fresh:{fresh_hash}\n")));
    let acl = read(&out.join("acl"));
    assert!(
        acl.contains(
            "user acme/fresh\ntopic write fleet/acme/fresh/up\ntopic read fleet/acme/fresh/down\n\
             topic read fleet/acme/_all/down\n"
        ),
        "{acl}"
    );
    assert!(
        acl.contains(
            "user devtables-service\ntopic read fleet/+/+/up\n\n\
             user devtables-service-egress\ntopic write fleet/+/+/down\n\
             topic write fleet/_devtables/+/up\n"
        ),
        "{acl}"
    );
    assert!(!acl.contains("old") && !acl.contains("gone"), "{acl}");
    let conf = read(&out.join("mosquitto.conf"));
    for line in [
        "allow_anonymous false\n",
        &format!(
            "password_file {}\n",
            out.canonicalize().unwrap().join("passwords").display()
        ),
        &format!("listener {port} 127.0.0.1\n"),
        "use_username_as_clientid true\n",
        "certfile ",
        "keyfile ",
    ] {
        assert!(conf.contains(line), "{line:?} in {conf}");
    }
    assert_eq!(
        conf.matches("\nlistener ").count(),
        1,
        "no clear-text listener: {conf}"
    );
    for secret in ["passwords", "acl", "server.key", "service-password"] {
        assert_eq!(mode(&out.join(secret)), 0o600, "{secret}");
    }
    for public in ["mosquitto.conf", "ca.pem", "server.pem"] {
        assert_eq!(mode(&out.join(public)), 0o644, "{public}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Again, with a clear-text listener asked for: the service password and the certificate are
    // kept (a running cloud and agents keep working), the listener is added.
    let password = read(&out.join("service-password"));
    let cert = read(&out.join("server.pem"));
    let mut again = args.to_vec();
    again.extend(["--plain-port", plain_port.as_str()]);
    let (ok, _, stderr) = broker_config(&data, &out, &again);
    assert!(ok, "{stderr}");
    assert_eq!(read(&out.join("service-password")), password);
    assert_eq!(read(&out.join("server.pem")), cert);
    let conf = read(&out.join("mosquitto.conf"));
    assert!(
        conf.contains(&format!("listener {plain_port} 127.0.0.1\n")),
        "{conf}"
    );

    // --reload-pid never signals a process that is not Mosquitto.
    let mut other = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = other.id().to_string();
    let untouched = dir.path().join("untouched");
    let (ok, _, stderr) = broker_config(
        &data,
        &untouched,
        &[&args[..], &["--reload-pid", &pid]].concat(),
    );
    assert!(!ok && stderr.contains("not mosquitto"), "{stderr}");
    assert!(!untouched.exists(), "nothing written for a wrong pid");
    assert!(
        other.try_wait().unwrap().is_none(),
        "the other process was not signalled"
    );
    let _ = other.kill();
    let _ = other.wait();

    // A certificate without its key is refused before anything is written.
    let (ok, _, stderr) = broker_config(&data, &out, &["--tls-cert", "x.pem"]);
    assert!(!ok && stderr.contains("--tls-key"), "{stderr}");
}

/// A Mosquitto of this test's own on the generated configuration, and a cloud using it over TLS
/// as its external broker.
struct MosquittoDeployment {
    /// Holds every file; dropped last.
    dir: tempfile::TempDir,
    data: PathBuf,
    out: PathBuf,
    prefix: String,
    broker: MosquittoProc,
    cloud: CloudProc,
}

impl MosquittoDeployment {
    /// `None` (with a SKIPPED line) when the service suites are off.
    fn start() -> Option<MosquittoDeployment> {
        if !services_on() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to its own user, which must reach the files.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("cloud-data");
        let out = dir.path().join("mosquitto");
        let key = create_admin_key(&data);
        let prefix = unique_prefix();
        let port = free_port();
        let (ok, report, stderr) = broker_config(
            &data,
            &out,
            &[
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--topic-prefix",
                &prefix,
            ],
        );
        assert!(ok, "{stderr}");
        let broker = MosquittoProc::start(&out.join("mosquitto.conf"), port);
        let password = read(Path::new(report["service_password_file"].as_str().unwrap()));
        let ca = report["ca"].as_str().expect("a generated CA").to_string();
        let cloud = CloudProc::start_keyed(
            dir.path(),
            &prefix,
            BrokerChoice::Configured(format!(
                "external_broker: 'mqtts://{}', external_broker_tls: {{ca: '{ca}'}}, \
                 broker_username: '{}', broker_egress_username: '{}', broker_password: '{}',",
                broker.addr,
                report["service_user"].as_str().unwrap(),
                report["service_egress_user"].as_str().unwrap(),
                password.trim()
            )),
            "",
            key,
        );
        Some(MosquittoDeployment {
            dir,
            data,
            out,
            prefix,
            broker,
            cloud,
        })
    }

    fn ca(&self) -> PathBuf {
        self.out.join("ca.pem")
    }

    /// Writes the configuration again from the registry and has Mosquitto reload it; the report.
    fn regenerate(&self) -> Value {
        let port = self.broker.addr.rsplit(':').next().unwrap().to_string();
        let (ok, report, stderr) = broker_config(
            &self.data,
            &self.out,
            &[
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--topic-prefix",
                &self.prefix,
                "--reload-pid",
                &self.broker.pid().to_string(),
            ],
        );
        assert!(ok, "{stderr}");
        report
    }

    fn connack(&self, device: &str, secret: &str) -> Result<(), Option<ConnectReturnCode>> {
        let name = format!("{KEY_ACCOUNT}/{device}");
        RawMqtt::connect(&self.broker.addr, &self.ca(), &name, &name, secret).connack()
    }
}

#[test]
fn generated_mosquitto_config_passes_the_isolation_checks() {
    let Some(m) = MosquittoDeployment::start() else {
        return;
    };
    two_devices_are_isolated(&Deployment {
        kind: BrokerKind::Mosquitto,
        cloud: &m.cloud,
        mqtt: m.broker.addr.clone(),
        ca: m.ca(),
        prefix: m.prefix.clone(),
        registry_changed: &|| {
            m.regenerate();
        },
    });
    let _ = &m.dir;
}

#[test]
fn mosquitto_refuses_a_revoked_or_rotated_secret_after_the_command_reloads_it() {
    let Some(m) = MosquittoDeployment::start() else {
        return;
    };
    let secret = m.cloud.register(KEY_ACCOUNT, "d1");
    assert_eq!(
        m.connack("d1", &secret),
        Err(Some(ConnectReturnCode::NotAuthorized)),
        "not in Mosquitto's files before the command runs again"
    );
    let report = m.regenerate();
    assert_eq!(report["devices"], 1, "{report}");
    eventually("Mosquitto accepting the registered device", || {
        m.connack("d1", &secret).map_err(|e| format!("{e:?}"))
    });

    // Revoked through the API: until the files are written again, Mosquitto still knows the
    // device (this session proves it, and must then be closed by the reload).
    let (status, body) = m.cloud.send(
        "DELETE",
        &format!("/v1/devices/{KEY_ACCOUNT}/d1"),
        Value::Null,
    );
    assert_eq!(status, 200, "{body}");
    let name = format!("{KEY_ACCOUNT}/d1");
    let mut live = RawMqtt::connect(&m.broker.addr, &m.ca(), &name, &name, &secret);
    live.connack().expect("the old files still hold the device");
    live.subscribe(&[format!("{}/{name}/down", m.prefix)])
        .expect("a SUBACK");
    let report = m.regenerate();
    assert_eq!(
        (report["devices"].as_u64(), report["revoked"].as_u64()),
        (Some(0), Some(1)),
        "{report}"
    );
    let reason = live.wait_closed();
    eprintln!("the revoked device's session ended: {reason}");
    assert_eq!(
        m.connack("d1", &secret),
        Err(Some(ConnectReturnCode::NotAuthorized)),
        "a revoked device is refused after the reload"
    );

    // A rotation gives it a new secret (and a Mosquitto hash of it); the old one stays refused.
    let (status, body) = m.cloud.send(
        "POST",
        &format!("/v1/devices/{KEY_ACCOUNT}/d1/secret"),
        Value::Null,
    );
    assert_eq!(status, 200, "{body}");
    let rotated = body["secret"].as_str().expect("a new secret").to_string();
    m.regenerate();
    eventually("Mosquitto accepting the rotated secret", || {
        m.connack("d1", &rotated).map_err(|e| format!("{e:?}"))
    });
    assert_eq!(
        m.connack("d1", &secret),
        Err(Some(ConnectReturnCode::NotAuthorized)),
        "the old secret stays refused"
    );
}

/// A broker that authenticates by certificate only (Mosquitto with `require_certificate`, as AWS
/// IoT Core does): the cloud presents `external_broker_tls.client_cert` and becomes ready; a
/// client without a certificate is refused in the handshake, so the cloud's own certificate is
/// what let it in.
#[test]
fn the_cloud_presents_its_client_certificate_to_a_broker_that_requires_one() {
    if !services_on() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Mosquitto started as root drops to its own user, which must reach the files.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca = devtables_tls::test_pki::TestCa::new("broker test CA");
    let ca_file = ca.write_ca(dir.path(), "broker");
    let server = ca.server(dir.path(), "server");
    std::fs::set_permissions(&server.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (server_cert, server_key) = (server.cert, server.key);
    let cloud_id = ca.client(dir.path(), "cloud", "devtables-cloud");
    let (cloud_cert, cloud_key) = (cloud_id.cert, cloud_id.key);
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings true\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\n\
             keyfile {}\nrequire_certificate true\nuse_identity_as_username true\n\
             allow_anonymous false\n",
            ca_file.display(),
            server_cert.display(),
            server_key.display()
        ),
    )
    .unwrap();
    let broker = MosquittoProc::start(&conf, port);

    // Control: without a certificate, nobody gets in.
    let mut anonymous = RawMqtt::connect(&broker.addr, &ca_file, "nobody", "nobody", "x");
    assert_eq!(
        anonymous.connack(),
        Err(None),
        "refused in the TLS handshake"
    );

    // The cloud with its certificate: connected and subscribed (the harness waits for /ready).
    let cloud = CloudProc::start(
        dir.path(),
        &unique_prefix(),
        BrokerChoice::Configured(format!(
            "external_broker: 'mqtts://{}', external_broker_tls: {{ca: '{}', client_cert: '{}', \
             client_key: '{}'}},",
            broker.addr,
            ca_file.display(),
            cloud_cert.display(),
            cloud_key.display()
        )),
    );
    let status = cloud.get("/v1/status").unwrap();
    assert_eq!(status["broker_connected"], true, "{status}");
    assert_eq!(status["subscribed"], true, "{status}");
    broker
        .logs
        .wait_for("the broker naming the cloud by its certificate", |l| {
            l.contains("devtables-cloud")
        });
}
