//! What the tests share: the example schema, an offline agent, a cloud on a chosen port, and
//! waiting for a condition with a deadline.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devtables_agent::{Agent, AgentConfig};
use devtables_cloud::store::ItemQuery;
use devtables_cloud::{BrokerMode, Cloud, CloudConfig};
use devtables_schema::{Item, Schema};
use devtables_sync::identity::DeviceId;

/// How long a condition may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn schema() -> Arc<Schema> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/schema.json5");
    Arc::new(Schema::load(Path::new(path)).unwrap())
}

pub fn item(v: serde_json::Value) -> Item {
    v.as_object().cloned().unwrap()
}

/// A port that was free a moment ago: nothing listens there until a test starts a cloud on it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Agent `acme/d1` with its database in `dir`, talking to a broker on `port` of loopback.
pub fn agent_config(dir: &Path, secret: &str, port: u16) -> AgentConfig {
    let mut c = AgentConfig::new("acme", "d1", secret, dir.join("d1.db"));
    c.broker_port = port;
    c.reconnect_delay = Duration::from_millis(100);
    c.reconnect_max_delay = Duration::from_millis(400);
    c
}

/// A config whose broker is a port nobody listens on: the device is offline throughout.
pub fn offline(dir: &Path) -> AgentConfig {
    agent_config(dir, "secret", free_port())
}

pub fn device() -> DeviceId {
    DeviceId::new("acme", "d1").unwrap()
}

/// A cloud with its data in `data_dir` and its embedded broker on `mqtt_port` (0: any).
pub async fn start_cloud(data_dir: &Path, mqtt_port: u16) -> Cloud {
    let mut config = CloudConfig::new(data_dir);
    config.api_listen = "127.0.0.1:0".parse().unwrap();
    config.broker = BrokerMode::Embedded {
        listen: SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
    };
    config.sqlite_full_sync = false;
    Cloud::start(config, schema()).await.unwrap()
}

/// Registers `acme/d1` in the cloud whose data is in `data_dir` (started and stopped for it);
/// returns the device's secret.
pub async fn register(data_dir: &Path) -> String {
    let cloud = start_cloud(data_dir, 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    cloud.shutdown().await;
    secret
}

/// The port the cloud's embedded broker listens on.
pub fn mqtt_port(cloud: &Cloud) -> u16 {
    devtables_agent::config::parse_broker(&cloud.mqtt_addr)
        .unwrap()
        .1
}

/// Polls `f` until it holds; fails with `what` and the last status at the deadline.
pub async fn eventually(agent: &Agent, what: &str, mut f: impl FnMut(&Agent) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f(agent) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; status {:?}",
            agent.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Live items of `model` the cloud holds for `acme/d1`.
pub async fn cloud_items(cloud: &Cloud, model: &str) -> Vec<Item> {
    let query = ItemQuery {
        account: "acme".into(),
        model: model.into(),
        device: Some("d1".into()),
        limit: 10_000,
        ..ItemQuery::default()
    };
    cloud
        .store
        .call(move |c| c.store.query_items(&query))
        .await
        .unwrap()
        .unwrap()
        .items
        .into_iter()
        .filter_map(|i| i.item)
        .collect()
}

/// Waits until the cloud holds `n` live items of `model` for `acme/d1`.
pub async fn eventually_in_cloud(cloud: &Cloud, agent: &Agent, model: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let have = cloud_items(cloud, model).await.len();
        if have == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} {model} items in the cloud (have {have}); status {:?}",
            agent.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status code of a plain-HTTP `GET /health` to `api`, or `None` when no HTTP answer came
/// (a TLS port closes the connection or answers with a TLS alert).
pub async fn plain_http_status(api: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(api).await.ok()?;
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Device `d1`'s data flows both ways: a device write (a `Fault`) reaches the cloud's store, and
/// a cloud write (a `Setting`) reaches the device's database.
pub async fn syncs_both_ways(cloud: &Cloud, agent: &Agent) {
    agent
        .db()
        .create(
            "Fault",
            &item(serde_json::json!({"deviceId": "d1", "id": "f1", "severity": "warn"})),
        )
        .unwrap();
    eventually_in_cloud(cloud, agent, "Fault", 1).await;
    cloud
        .write_item(
            devtables_sync::identity::Owner::Device(device()),
            "Setting",
            item(serde_json::json!({"name": "mode", "value": "eco"})),
            devtables_cloud::ops::WriteKind::Create,
        )
        .await
        .unwrap();
    let key = item(serde_json::json!({"deviceId": "d1", "name": "mode"}));
    eventually(agent, "the cloud's setting on the device", |a| {
        a.db().get("Setting", &key).unwrap().is_some()
    })
    .await;
}
