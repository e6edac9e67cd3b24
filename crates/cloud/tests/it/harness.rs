//! Helpers of the cloud's integration tests: the example schema, configurations on free ports,
//! a fleet seeded through the public store path, a plain HTTP client and a raw MQTT device.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devtables_cloud::ops::{self, WriteKind};
use devtables_cloud::service::{StoreCtx, StoreHandle};
use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::{BrokerMode, CloudConfig};
use devtables_schema::Schema;
use devtables_sync::hlc::{node_id_for, Hlc, HlcClock, CLOUD_NODE_NAME};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{self, Change, DownMsg, Op, UpMsg, WireConfig};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// How long any condition may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub const ACCOUNT: &str = "acme";

pub fn schema() -> Arc<Schema> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/schema.json5");
    Arc::new(Schema::load(&path).expect("the example schema loads"))
}

/// A configuration on free ports (API and embedded broker) for `dir`.
pub fn config(dir: &Path) -> CloudConfig {
    let mut c = CloudConfig::new(dir);
    c.api_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    c.broker = BrokerMode::Embedded {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    c.sqlite_full_sync = false;
    c
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("its address").port()
}

pub fn device(i: usize) -> DeviceId {
    DeviceId::new(ACCOUNT, format!("dev{i}")).expect("a valid device id")
}

/// Registers `n` devices in the store of `dir` and writes one item to each through the API's
/// write path, so every feed head is above its device's cursor (0): after a start, all of them
/// are behind. Returns the devices' secrets.
pub async fn seed_behind_fleet(dir: &Path, n: usize) -> Vec<String> {
    let schema = schema();
    let store = SqliteStore::open(
        &dir.join("cloud.db"),
        SqliteOptions {
            synchronous_full: false,
            ..SqliteOptions::default()
        },
    )
    .expect("open the store");
    let handle = StoreHandle::spawn(
        StoreCtx::new(
            Box::new(store),
            HlcClock::new(node_id_for(CLOUD_NODE_NAME)),
            schema,
        ),
        1024,
        Box::new(|_| {}),
    )
    .expect("the store thread");
    // No sync loop runs here: the feed advances are only recorded in the store.
    let (sync, _) = mpsc::channel(1);
    let max = WireConfig::default().max_message_bytes;
    let mut secrets = Vec::with_capacity(n);
    for i in 0..n {
        let id = device(i);
        let secret = ops::register_device(&handle, None, &id)
            .await
            .expect("register");
        let item = setting(i);
        ops::write_item(
            &handle,
            &sync,
            max,
            Owner::Device(id),
            "Setting",
            item,
            WriteKind::Create,
        )
        .await
        .expect("write");
        secrets.push(secret);
    }
    secrets
}

/// A put of device 0's `Setting` named `name` under `model` (the schema's `Setting`, or a model
/// the cloud does not know), at version `wall_ms`.
pub fn put(model: &str, name: &str, wall_ms: u64) -> Change {
    put_of(&device(0), model, name, wall_ms)
}

/// A put of `id`'s `Setting` named `name` under `model`, at version `wall_ms`.
pub fn put_of(id: &DeviceId, model: &str, name: &str, wall_ms: u64) -> Change {
    let schema = schema();
    let setting = schema.model("Setting").expect("the Setting model");
    let input = json!({"deviceId": id.device, "name": name, "value": "on"});
    let item = setting
        .prepare_create(input.as_object().expect("an object"), wall_ms as i64)
        .expect("a valid Setting");
    Change {
        model: model.into(),
        key: setting.primary_key(&item).expect("its key"),
        op: Op::Put,
        item: Some(item),
        version: Hlc {
            wall_ms,
            counter: 0,
            node: 7,
        },
        base: None,
    }
}

/// A `Setting` item (syncs both ways, so a cloud write lands in the device's feed).
pub fn setting(i: usize) -> devtables_schema::Item {
    json!({"name": "mode", "value": format!("v{i}")})
        .as_object()
        .cloned()
        .expect("an object")
}

/// `GET path` on the API without a key: (status code, JSON body).
/// Starts a cloud and waits until it is ready (its device subscription is granted), so a
/// device's hello is heard.
pub async fn started(config: CloudConfig) -> devtables_cloud::Cloud {
    let cloud = devtables_cloud::Cloud::start(config, schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    eventually("the cloud to be ready", move || async move {
        match get(api, "/ready").await {
            (200, _) => Ok(()),
            (code, body) => Err(format!("{code} {body}")),
        }
    })
    .await;
    cloud
}

pub async fn get(api: SocketAddr, path: &str) -> (u16, Value) {
    request(api, "GET", path, None, None).await
}

/// `GET path` on the API with `key` as the bearer token.
pub async fn get_as(api: SocketAddr, path: &str, key: &str) -> (u16, Value) {
    request(api, "GET", path, Some(key), None).await
}

/// An admin API key of [`ACCOUNT`], created through the service.
pub async fn admin_key(cloud: &devtables_cloud::Cloud) -> String {
    cloud
        .create_api_key(ACCOUNT, devtables_cloud::store::KeyScope::Admin)
        .await
        .expect("an admin key")
        .key
}

/// One HTTP/1.1 request over a fresh TCP connection: `Authorization: Bearer <key>` when a key
/// is given, a JSON body when one is given. Returns (status code, JSON body or null).
pub async fn request(
    api: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    request_with_header(
        api,
        method,
        path,
        key.map(|k| format!("Authorization: Bearer {k}")).as_deref(),
        body,
    )
    .await
}

/// Like [`request`], with a raw header line (or none) in place of the bearer token.
pub async fn request_with_header(
    api: SocketAddr,
    method: &str,
    path: &str,
    header: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut headers: Vec<&str> = header.into_iter().collect();
    let payload = body.map(Value::to_string);
    if payload.is_some() {
        headers.push("Content-Type: application/json");
    }
    let answer = exchange(
        api,
        method,
        path,
        &headers,
        payload.as_deref().map(str::as_bytes),
    )
    .await;
    (answer.code, answer.json())
}

/// An HTTP answer as received.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    /// Header lines as (lowercase name, value).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// The value of header `name` (lowercase), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (null when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 exchange over a fresh TCP connection, with raw header lines and body bytes (a
/// `Content-Length` is added).
pub async fn exchange(
    api: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&[u8]>,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(api)
        .await
        .expect("connect to the API");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    let body = body.unwrap_or_default();
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read the answer");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let code = lines
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        code,
        headers,
        body: body.to_string(),
    }
}

/// Polls `check` until it returns `Some`, failing the test after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for {what}: {last}");
        }
        // A short pause between polls of the condition (not a synchronization).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A device speaking the protocol by hand over a real MQTT connection.
pub struct RawDevice {
    pub id: DeviceId,
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Event>,
    prefix: String,
    schema_version: String,
}

impl RawDevice {
    /// Connects with the device's credentials and subscribes to its down topic (waits for the
    /// SUBACK).
    pub async fn connect(mqtt: &str, id: DeviceId, secret: &str) -> RawDevice {
        let (host, port) = mqtt.rsplit_once(':').expect("host:port");
        let mut options = MqttOptions::new(id.node_name(), host, port.parse().expect("a port"));
        options.set_credentials(id.node_name(), secret);
        RawDevice::connect_with(options, id).await
    }

    /// Like [`RawDevice::connect`], with the connection options given (TLS, a client
    /// certificate, no secret...).
    pub async fn connect_with(mut options: MqttOptions, id: DeviceId) -> RawDevice {
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        // As the agent does: small messages must not wait for the peer's delayed ACK.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (tx, events) = mpsc::unbounded_channel();
        // The event loop runs on its own task: its poll must not be cancelled, so the test
        // waits on the channel instead.
        tokio::spawn(async move {
            // rmqtt answers "service unavailable" to a CONNECT that races the close of an
            // earlier session of the same client id (its session entry is still locked); a
            // device retries that, and so does this one, until its first CONNACK.
            let mut unavailable_retries = 50;
            let mut accepted = false;
            loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        accepted |= matches!(event, Event::Incoming(Packet::ConnAck(_)));
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                    Err(rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::ServiceUnavailable,
                    )) if !accepted && unavailable_retries > 0 => {
                        unavailable_retries -= 1;
                        eprintln!("device connection refused as unavailable: retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        eprintln!("device connection ended: {e}");
                        return;
                    }
                }
            }
        });
        let mut device = RawDevice {
            id,
            client,
            events,
            prefix: devtables_sync::topics::DEFAULT_PREFIX.to_string(),
            schema_version: schema().version().to_string(),
        };
        let down = devtables_sync::topics::down_topic(&device.prefix, &device.id);
        device
            .client
            .subscribe(down, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        device
            .next_event(|e| matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(()))
            .await
            .expect("a SUBACK for the down topic");
        device
    }

    pub async fn send(&self, msg: &UpMsg) {
        let bytes =
            wire::encode_up(&self.schema_version, msg, &WireConfig::default()).expect("encode");
        let up = devtables_sync::topics::up_topic(&self.prefix, &self.id);
        self.client
            .publish(up, QoS::AtLeastOnce, false, bytes)
            .await
            .expect("publish");
    }

    async fn next_event<T>(&mut self, mut pick: impl FnMut(&Event) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .ok()??;
            if let Some(v) = pick(&event) {
                return Some(v);
            }
        }
    }

    /// The next cloud message `pick` accepts (others are skipped), or `None` after [`WAIT`].
    pub async fn recv<T>(&mut self, mut pick: impl FnMut(&DownMsg) -> Option<T>) -> Option<T> {
        self.next_event(|e| match e {
            Event::Incoming(Packet::Publish(p)) => {
                let msg = wire::decode_down(&p.payload, &WireConfig::default()).ok()?;
                pick(&msg.msg)
            }
            _ => None,
        })
        .await
    }

    /// How many changes the cloud's answer to push `batch` carries (other messages are
    /// skipped), or `None` after [`WAIT`].
    pub async fn push_answered(&mut self, batch: u64) -> Option<usize> {
        self.recv(|m| match m {
            DownMsg::PushAck {
                batch: b, results, ..
            } if *b == batch => Some(results.len()),
            _ => None,
        })
        .await
    }

    /// Whether the broker closed this connection within [`WAIT`] (the event loop ended; packets
    /// still arriving before that are skipped).
    pub async fn closed(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Takes and acknowledges every page of the full resync a new device starts with; returns
    /// the items the pages carried and the cursor the final page set.
    pub async fn finish_resync(&mut self) -> (Vec<Change>, u64) {
        let mut items = Vec::new();
        loop {
            let page = self
                .recv(|m| match m {
                    DownMsg::Snapshot {
                        resync,
                        last,
                        done,
                        items,
                        cursor,
                        ..
                    } => Some((*resync, last.clone(), *done, items.clone(), *cursor)),
                    _ => None,
                })
                .await;
            let Some((resync, pos, done, page_items, cursor)) = page else {
                panic!("the resync stalled: no page came");
            };
            items.extend(page_items);
            self.send(&UpMsg::SnapshotAck { resync, pos, done }).await;
            if done {
                return (items, cursor);
            }
        }
    }

    /// Registers a device through `POST /v1/devices` with an admin key.
    pub async fn register_over_api(api: SocketAddr, key: &str, device: &str) {
        let (code, body) = request(
            api,
            "POST",
            "/v1/devices",
            Some(key),
            Some(&json!({"account": ACCOUNT, "device": device})),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }

    /// Says hello and waits for the welcome of this session.
    pub async fn hello(&mut self, session: u64, cursor: u64) -> bool {
        self.send(&UpMsg::Hello {
            session,
            cursor,
            pending: 0,
            mark: None,
        })
        .await;
        self.recv(|m| {
            matches!(m, DownMsg::Welcome { session: s, .. } if *s == session).then_some(())
        })
        .await
        .is_some()
    }
}
