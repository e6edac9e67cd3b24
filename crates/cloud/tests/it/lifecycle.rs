//! A device's lifecycle after registration, against a started cloud over real TCP with the real
//! embedded broker: revoking it closes its live MQTT session at once and refuses its reconnects
//! (CONNACK "not authorized") while its items stay (unless asked otherwise); rotating its secret
//! refuses the old one, closes the session that used it, and keeps its items and feed cursor;
//! only an admin key of the device's own account may do either; and a registration or revocation
//! written to the store by another connection (as `devtables devices revoke` does) reaches the
//! broker within `credentials_ttl` (a revoked device's live session is closed too).

use std::time::Duration;

use devtables_cloud::ops::WriteKind;
use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::{CloudStore, KeyScope};
use devtables_cloud::{auth, Cloud};
use devtables_sync::hlc::Hlc;
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{Change, Op, UpMsg};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};
use serde_json::Value;

use crate::harness::{
    admin_key, config, device, eventually, request, schema, setting, started, RawDevice, ACCOUNT,
    WAIT,
};

/// What the broker answers to a CONNECT with these credentials: `Ok` on a CONNACK accepting
/// it, else the refusal.
async fn connack(mqtt: &str, id: &DeviceId, secret: &str) -> Result<(), ConnectionError> {
    let (host, port) = mqtt.rsplit_once(':').expect("host:port");
    let mut options = MqttOptions::new(id.node_name(), host, port.parse().expect("a port"));
    options.set_credentials(id.node_name(), secret);
    let (_client, mut eventloop) = AsyncClient::new(options, 10);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return Ok(());
            }
        }
    })
    .await
    .expect("no CONNACK in time")
}

fn refused_with(result: Result<(), ConnectionError>, code: ConnectReturnCode) -> bool {
    matches!(result, Err(ConnectionError::ConnectionRefused(c)) if c == code)
}

/// A registered device with one item written for it through the cloud.
async fn device_with_an_item(cloud: &Cloud, i: usize) -> (DeviceId, String) {
    let id = device(i);
    let secret = cloud.register_device(&id).await.expect("register");
    cloud
        .write_item(
            Owner::Device(id.clone()),
            "Setting",
            setting(i),
            WriteKind::Create,
        )
        .await
        .expect("an item for the device");
    (id, secret)
}

async fn items_of(cloud: &Cloud, key: &str, id: &DeviceId) -> usize {
    let path = format!(
        "/v1/accounts/{}/devices/{}/items/Setting",
        id.account, id.device
    );
    let (code, body) = request(cloud.api_addr, "GET", &path, Some(key), None).await;
    assert_eq!(code, 200, "{body}");
    body["items"].as_array().expect("items").len()
}

async fn device_record(cloud: &Cloud, key: &str, id: &DeviceId) -> Value {
    let path = format!("/v1/devices/{}/{}", id.account, id.device);
    let (code, body) = request(cloud.api_addr, "GET", &path, Some(key), None).await;
    assert_eq!(code, 200, "{body}");
    body
}

/// Only an admin key of the device's account may revoke or rotate; the refusal leaves the
/// device connected.
async fn assert_only_own_admin_may(cloud: &Cloud, method: &str, path: &str, dev: &mut RawDevice) {
    let write = cloud
        .create_api_key(ACCOUNT, KeyScope::Write)
        .await
        .expect("a key")
        .key;
    let other_admin = cloud
        .create_api_key("globex", KeyScope::Admin)
        .await
        .expect("a key")
        .key;
    for key in [&write, &other_admin] {
        let (code, body) = request(cloud.api_addr, method, path, Some(key), None).await;
        assert_eq!(code, 403, "{method} {path}: {body}");
        assert_eq!(body["kind"], "forbidden", "{body}");
    }
    assert!(
        dev.hello(77, 0).await,
        "a refused request disturbed the device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_device_closes_its_session_and_refuses_its_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let admin = admin_key(&cloud).await;
    let (id, secret) = device_with_an_item(&cloud, 1).await;
    let (other, other_secret) = device_with_an_item(&cloud, 2).await;
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id.clone(), &secret).await;
    assert!(dev.hello(1, 0).await);
    let mut bystander = RawDevice::connect(&cloud.mqtt_addr, other.clone(), &other_secret).await;

    let path = format!("/v1/devices/{}/{}", id.account, id.device);
    assert_only_own_admin_may(&cloud, "DELETE", &path, &mut dev).await;

    let (code, body) = request(cloud.api_addr, "DELETE", &path, Some(&admin), None).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        dev.closed().await,
        "the revoked device's session is still open"
    );
    assert!(
        refused_with(
            connack(&cloud.mqtt_addr, &id, &secret).await,
            ConnectReturnCode::NotAuthorized
        ),
        "a revoked device may not connect again"
    );
    // Its items stay; the other device is untouched.
    assert_eq!(items_of(&cloud, &admin, &id).await, 1);
    assert!(
        bystander.hello(2, 0).await,
        "another device lost its session"
    );
    let (code, status) = request(cloud.api_addr, "GET", "/v1/status", Some(&admin), None).await;
    assert_eq!(code, 200, "{status}");
    assert!(
        status["mqtt_refused_revoked"].as_u64() >= Some(1),
        "{status}"
    );

    // Asked again with delete_items, its rows go.
    let (code, body) = request(
        cloud.api_addr,
        "DELETE",
        &format!("{path}?delete_items=true"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(items_of(&cloud, &admin, &id).await, 0);
    assert_eq!(items_of(&cloud, &admin, &other).await, 1);

    let (code, body) = request(
        cloud.api_addr,
        "DELETE",
        &format!("/v1/devices/{ACCOUNT}/nobody"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_replaces_the_old_one_and_keeps_the_devices_data() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let admin = admin_key(&cloud).await;
    let (id, old) = device_with_an_item(&cloud, 1).await;
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id.clone(), &old).await;
    assert!(dev.hello(1, 0).await);
    let before = device_record(&cloud, &admin, &id).await;
    assert!(before["feed_head"].as_u64() > Some(0), "{before}");

    let path = format!("/v1/devices/{}/{}/secret", id.account, id.device);
    assert_only_own_admin_may(&cloud, "POST", &path, &mut dev).await;
    let (code, body) = request(cloud.api_addr, "POST", &path, Some(&admin), None).await;
    assert_eq!(code, 200, "{body}");
    let new = body["secret"]
        .as_str()
        .expect("the new secret, once")
        .to_string();
    assert_ne!(new, old);

    assert!(
        dev.closed().await,
        "the session of the old secret is still open"
    );
    assert!(
        refused_with(
            connack(&cloud.mqtt_addr, &id, &old).await,
            ConnectReturnCode::BadUserNamePassword
        ),
        "the old secret still works"
    );
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id.clone(), &new).await;
    assert!(dev.hello(2, 0).await, "the new secret does not work");
    // The device kept its items, its feed and its cursor.
    assert_eq!(items_of(&cloud, &admin, &id).await, 1);
    let after = device_record(&cloud, &admin, &id).await;
    for field in ["feed_head", "cursor_acked", "registered_ms"] {
        assert_eq!(after[field], before[field], "{field}: {before} → {after}");
    }
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_by_another_process_reach_the_broker_within_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.credentials_ttl = Duration::from_millis(300);
    let cloud = started(config).await;
    // Another connection to the same store file, as the `devtables` command or a second cloud
    // node would hold.
    let mut other =
        SqliteStore::open(&dir.path().join("cloud.db"), SqliteOptions::default()).unwrap();

    // A device registered elsewhere, after this broker already refused (and cached) it.
    let id = device(1);
    let secret = auth::generate_secret();
    assert!(refused_with(
        connack(&cloud.mqtt_addr, &id, &secret).await,
        ConnectReturnCode::BadUserNamePassword
    ));
    other
        .register_device(&id, &auth::hash_secret(&secret), None, 1)
        .unwrap();
    eventually("the registration to reach the broker", || async {
        connack(&cloud.mqtt_addr, &id, &secret)
            .await
            .map_err(|e| e.to_string())
    })
    .await;

    // Revoked elsewhere, after this broker accepted (and cached) it: the live session is closed
    // by the sweep, and reconnects are refused once the cache expires.
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id.clone(), &secret).await;
    assert!(other.revoke_device(&id, false).unwrap());
    assert!(
        dev.closed().await,
        "the session of a device revoked elsewhere stays open"
    );
    eventually("the revocation to reach the broker", || async {
        match connack(&cloud.mqtt_addr, &id, &secret).await {
            Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let key = admin_key(&cloud).await;
    let (_, status) = request(cloud.api_addr, "GET", "/v1/status", Some(&key), None).await;
    assert_eq!(status["mqtt_revoked_sessions_closed"], 1, "{status}");
    cloud.shutdown().await;
}

/// A push a revoked device sent before its session was closed (it was in flight) is not applied:
/// the store refuses it inside the push's own transaction, and the refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_arriving_after_the_revocation_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    // Long enough that neither the cache nor the sweep closes the session during the test: the
    // push below reaches the store after the revocation, as one in flight would.
    config.credentials_ttl = Duration::from_secs(600);
    let cloud = started(config).await;
    let admin = admin_key(&cloud).await;
    let id = device(1);
    let secret = cloud.register_device(&id).await.expect("register");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id.clone(), &secret).await;
    assert!(dev.hello(1, 0).await);

    let mut other =
        SqliteStore::open(&dir.path().join("cloud.db"), SqliteOptions::default()).unwrap();
    assert!(other.revoke_device(&id, false).unwrap());

    let schema = schema();
    let model = schema.model("Setting").expect("the Setting model");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut input = setting(1);
    input.insert("deviceId".into(), Value::String(id.device.clone()));
    let item = model
        .prepare_create(&input, now as i64)
        .expect("a valid item");
    let change = Change {
        model: "Setting".into(),
        key: model.primary_key(&item).expect("a key"),
        op: Op::Put,
        item: Some(item),
        version: Hlc {
            wall_ms: now,
            counter: 0,
            node: 7,
        },
        base: None,
    };
    dev.send(&UpMsg::Push {
        batch: 1,
        changes: vec![change],
        session: None,
    })
    .await;
    let api = cloud.api_addr;
    eventually("the push to be refused", || {
        let admin = admin.clone();
        async move {
            let (_, status) = request(api, "GET", "/v1/status", Some(&admin), None).await;
            if status["pushes_revoked"].as_u64() >= Some(1) {
                Ok(())
            } else {
                Err(status.to_string())
            }
        }
    })
    .await;
    assert_eq!(
        items_of(&cloud, &admin, &id).await,
        0,
        "the push was applied"
    );
    let record = device_record(&cloud, &admin, &id).await;
    assert_eq!(record["changes_applied"], 0, "{record}");
    cloud.shutdown().await;
}
