//! The cloud service's settings. Every limit is here, with its default; `devtables cloud` reads
//! them from a JSON5 file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use devtables_sync::rate::RateLimit;
use serde::Deserialize;

use crate::store::{ChangeRetention, DeviceQuotas, Retention};

/// Where the service's MQTT traffic goes.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerMode {
    /// Run the embedded broker (rmqtt) on this address; it authenticates every client against
    /// the device registry and confines each device to its own topics.
    Embedded { listen: SocketAddr },
    /// Use an external broker (Mosquitto, EMQX, ...); its ACLs are configured there.
    External {
        host: String,
        port: u16,
        username: Option<String>,
        password: Option<String>,
    },
}

/// The cloud's database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseChoice {
    /// `cloud.db` in the data folder: the embedded default, one cloud process.
    Sqlite,
    /// A PostgreSQL database (`postgres://user@host:port/db`), its tables in `schema`: the
    /// production store, shared by several cloud processes.
    Postgres { url: String, schema: String },
}

/// How the nodes of a scaled-out cloud share the fleet (PostgreSQL and an external broker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Partitions the devices are hashed into; each is leased to one node. Every node of a
    /// cluster must use the same number. Default 64.
    pub partitions: u32,
    /// How long a node's lease runs without renewal (renewed every third of it): the longest a
    /// killed node's devices wait for another node. Default 5 s.
    pub lease: Duration,
    /// How long a node that took over partitions (or started with them) waits for the devices
    /// the registry shows online in them to answer its prompt; those it heard nothing from by
    /// then are marked offline (`cluster_presence_marked_offline`): they left while their
    /// node was dead. Default 60 s, two prompt intervals (a lost prompt is sent again once).
    pub presence_check: Duration,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            partitions: 64,
            lease: Duration::from_secs(5),
            presence_check: Duration::from_secs(60),
        }
    }
}

/// Settings of the cloud service.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// Holds `cloud.db` (SQLite), the node's name (`node-name`) and the device CA.
    pub data_dir: PathBuf,
    /// Where the items live: SQLite in `data_dir` (the default) or PostgreSQL.
    pub database: DatabaseChoice,
    /// With PostgreSQL: TLS to the server, checked against this CA (required when set).
    /// Default none: clear text, warned about when the server is not on the loopback.
    pub database_tls: Option<crate::tls::ClientTls>,
    /// With PostgreSQL and an external broker: how the nodes of a scaled-out cloud share the
    /// devices (docs/scale-out.md).
    pub cluster: ClusterConfig,
    pub api_listen: SocketAddr,
    /// Serve the HTTP API over TLS with this certificate and key. Default none: plain HTTP, which
    /// the service warns about at start (`the HTTP API ... is plain HTTP`).
    pub api_tls: Option<crate::tls::ServerTls>,
    pub broker: BrokerMode,
    /// With the embedded broker: serve clear-text MQTT on its `listen` address. Default true
    /// (warned about at start); false needs `broker_tls`.
    pub broker_plain: bool,
    /// With the embedded broker: a TLS listener, besides or instead of the clear-text one. The
    /// service's own client uses it when it is the only listener. Default none.
    pub broker_tls: Option<crate::broker::BrokerTls>,
    /// With the embedded broker: its packet size, session count and what one client or device
    /// may hold (file key `embedded_broker_limits`). Default [`crate::broker::BrokerLimits`]'s.
    pub broker_limits: crate::broker::BrokerLimits,
    /// With the embedded broker and its TLS listener: a further listener for devices that
    /// authenticate with a client certificate from the cloud's device CA (`ca/` in the data
    /// folder, created on first use), and the validity of the certificates the cloud issues.
    /// Default none.
    pub device_certificates: Option<DeviceCertificates>,
    /// With an external broker: connect with TLS, checking its certificate against this CA.
    /// Default none: clear text, warned about at start.
    pub external_tls: Option<crate::tls::ClientTls>,
    /// First segment of every topic; must match the agents'.
    pub topic_prefix: String,
    /// Protocol limits and timings, the per-device message rate (`device_rate`, default 50 a
    /// second, burst 100) and the most changes per push (`max_push_changes`, default 1000)
    /// among them.
    pub sync: devtables_sync::cloud::CloudEngineConfig,
    /// What each device may store in the cloud and push in one change: item size (64 KiB),
    /// rows (100 000), bytes (256 MiB), conflict records (1000). See [`DeviceQuotas`].
    pub quotas: DeviceQuotas,
    /// The request rate of each API key: a request over it is answered 429 with `Retry-After`.
    /// Default 100 a second, burst 200; `per_sec: 0` turns it off.
    pub api_rate: RateLimit,
    /// Most API keys whose request rate is tracked at once; beyond it the key closest to a full
    /// bucket is forgotten (it loses nothing: a new key starts full). Default 10 000.
    pub api_rate_keys: usize,
    /// What retention keeps: tombstones 30 days, 10 000 conflict records per account; each
    /// store transaction of a retention pass removes at most `batch` (1000) tombstones (see
    /// [`Retention`]; the change log's pass uses the same `batch`, set by the file's
    /// `retention_batch`).
    pub retention: Retention,
    /// How often retention runs.
    pub purge_interval: Duration,
    /// SQLite `synchronous=FULL`: an acknowledged write survives power loss, not only a crash.
    pub sqlite_full_sync: bool,
    /// Most devices one store transaction appends a broadcast's feed entry to: the write's own
    /// transaction reaches the first ones, fan-out steps the rest (default
    /// [`DEFAULT_FANOUT_BATCH`](crate::store::DEFAULT_FANOUT_BATCH), at least 1).
    pub fanout_batch: usize,
    /// Largest HTTP request body.
    pub max_request_bytes: usize,
    /// Most items per API page.
    pub max_page_items: usize,
    /// This cloud process's node name: its versions carry `node_id_for("devtables/cloud/{name}")`,
    /// so two cloud nodes never mint equal versions. Empty (the default): a random name per start.
    pub node_name: String,
    /// The service's own MQTT client.
    pub mqtt: MqttClientConfig,
    /// How the devices that have changes waiting at start are prompted to say hello.
    pub startup_prompts: StartupPrompts,
    /// Most store jobs of the sync loop (applying pushes, reading pages, recording status)
    /// queued or running at once. Beyond it, further engine work waits inside the engine until
    /// one completes; the MQTT connection is polled all the while. Default 64.
    pub sync_store_jobs: usize,
    /// Most of those jobs that share one commit of the store (group commit: one flush to disk
    /// for all of them; each job's answer waits for it). 1 commits every job on its own, as
    /// the store did before group commit (for comparison). Default 1024.
    pub store_group_max: usize,
    /// Serve the HTTP API without API keys: every request may read and write every account.
    /// For a throwaway local setup only; the service warns loudly at start. Default false.
    pub insecure_no_auth: bool,
    /// Serve `GET /metrics` without an API key, for a Prometheus scraper on a private network
    /// (the numbers tell how busy the service is and what it refuses, never an item). Off by
    /// default: then the scraper needs an admin key, as `/v1/status` does. Warned at start.
    pub metrics_open: bool,
    /// How long the embedded broker trusts a device's credentials from its cache before it reads
    /// the store again: the longest a revocation or rotation made by another process on the same
    /// store (`devtables devices revoke`) takes to refuse new connections here. Changes made
    /// through this process apply at once. Default 5 s ([`crate::auth::DEFAULT_CREDENTIALS_TTL`]).
    pub credentials_ttl: Duration,
    /// Most devices whose credentials the embedded broker caches. Default 100,000
    /// ([`crate::auth::DEFAULT_CREDENTIALS_CACHE`]).
    pub credentials_cache: usize,
    /// The change log's readers (`GET /v1/accounts/{a}/changes`) and its webhooks: every limit
    /// with its default (docs/api.md, "Reacting to changes").
    pub changes: ChangesConfig,
}

/// The limits of the change log's readers and webhooks.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangesConfig {
    /// How much of the log is kept: 7 days, and 1 000 000 changes per account. A reader or
    /// webhook whose cursor falls behind it is told (410 `cursor_expired`, or a `gap`).
    pub retention: ChangeRetention,
    /// Most changes in one answer of `GET .../changes` (its `limit` is capped at this). Default
    /// 1000.
    pub max_page: usize,
    /// Most log entries one read examines for its filters (`model`, `device`), so a filter that
    /// matches little still answers in bounded time (its `next` moves past what it examined).
    /// Default 10 000.
    pub max_scan: usize,
    /// Longest `wait` of a long poll (a larger one is capped). Default 60 s.
    pub max_wait: Duration,
    /// Most readers waiting at once: SSE streams and long polls that wait; beyond it a reader is
    /// answered 503 `busy` with `Retry-After`. Default 256.
    pub max_readers: usize,
    /// How often an idle SSE stream sends a comment, so proxies keep it open and a vanished
    /// reader is noticed. Default 15 s.
    pub keepalive: Duration,
    /// Shortest time between two reads of the store by one waiting reader or webhook: a busy
    /// store wakes them at most this often. Default 100 ms.
    pub read_interval: Duration,
    /// Most webhooks per account. Default 16.
    pub webhooks_per_account: usize,
    /// Most changes in one webhook delivery. Default 100.
    pub webhook_batch: usize,
    /// Largest body of one webhook delivery: a batch is cut before the change that would pass
    /// it (a single larger change is still sent alone). Default 1 MiB.
    pub webhook_max_body_bytes: usize,
    /// How long a delivery may take (connect, send, the answer's head). Default 10 s.
    pub webhook_timeout: Duration,
    /// The first wait after a failed delivery; it doubles with each failure, with jitter, up to
    /// `webhook_retry_max`. Defaults 1 s and 60 s.
    pub webhook_retry_min: Duration,
    pub webhook_retry_max: Duration,
    /// Most deliveries in flight at once, over every webhook. Default 32.
    pub webhook_in_flight: usize,
    /// Certificate authorities (PEM) an `https` receiver may chain to, besides the system's
    /// (for a private CA). Default none.
    pub webhook_ca: Option<PathBuf>,
}

impl Default for ChangesConfig {
    fn default() -> ChangesConfig {
        ChangesConfig {
            retention: ChangeRetention::default(),
            max_page: 1000,
            max_scan: 10_000,
            max_wait: Duration::from_secs(60),
            max_readers: 256,
            keepalive: Duration::from_secs(15),
            read_interval: Duration::from_millis(100),
            webhooks_per_account: 16,
            webhook_batch: 100,
            webhook_max_body_bytes: 1024 * 1024,
            webhook_timeout: Duration::from_secs(10),
            webhook_retry_min: Duration::from_secs(1),
            webhook_retry_max: Duration::from_secs(60),
            webhook_in_flight: 32,
            webhook_ca: None,
        }
    }
}

impl ChangesConfig {
    fn validate(&self) -> Result<(), String> {
        for (name, n) in [
            ("changes_max_page", self.max_page),
            ("changes_max_scan", self.max_scan),
            ("changes_max_readers", self.max_readers),
            ("webhook_batch", self.webhook_batch),
            ("webhook_in_flight", self.webhook_in_flight),
        ] {
            if n == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.keepalive.is_zero() || self.webhook_timeout.is_zero() {
            return Err("changes_keepalive_secs and webhook_timeout_secs must be above 0".into());
        }
        if self.webhook_retry_min.is_zero() || self.webhook_retry_max < self.webhook_retry_min {
            return Err(format!(
                "webhook retries need 0 < webhook_retry_min_ms <= webhook_retry_max_ms, got {:?} \
                 and {:?}",
                self.webhook_retry_min, self.webhook_retry_max
            ));
        }
        Ok(())
    }
}

/// Devices with client certificates (mutual TLS).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceCertificates {
    /// Address of the embedded broker's listener that requires a client certificate from the
    /// device CA. It serves with the TLS listener's certificate (`broker_tls`). Port 0 picks a
    /// free port ([`crate::Cloud::mqtt_cert_addr`] reports it).
    pub listen: SocketAddr,
    /// Validity of each device certificate the cloud issues, in days (1 to
    /// [`crate::ca::MAX_VALIDITY_DAYS`]). Default [`crate::ca::DEFAULT_VALIDITY_DAYS`].
    pub validity_days: u32,
}

impl DeviceCertificates {
    /// A listener on `listen` and the default validity.
    pub fn new(listen: SocketAddr) -> DeviceCertificates {
        DeviceCertificates {
            listen,
            validity_days: crate::ca::DEFAULT_VALIDITY_DAYS,
        }
    }
}

/// Settings of the service's MQTT clients (the sync loop's connections to an external broker:
/// ingress and egress, one each unless `ingress_clients` / `egress_clients` say more; see
/// `mqtt_link`). With the embedded broker the service has no client (both
/// directions are in-process) and none of these apply: the broker hands device messages over
/// with a bound per device (`embedded_broker_limits.max_device_messages_waiting`).
#[derive(Clone, Debug, PartialEq)]
pub struct MqttClientConfig {
    /// Capacity of each client's request queue: publishes and subscribe requests waiting for
    /// the connection. Default 4096. Publishes may use all of it but a reserve (an eighth, at
    /// least one and at most 64 slots) kept for subscribing and disconnecting, so a burst of
    /// publishes can never lock the subscription out; a publish that finds no room waits for it
    /// (the sync loop reads no device message meanwhile: backpressure, counted in
    /// `egress_waits` of `GET /v1/status`), it is never dropped.
    pub request_queue: usize,
    /// Most MQTT events waiting between the tasks that poll one direction's connections and
    /// the sync loop. Default 1024.
    pub event_queue: usize,
    /// QoS 1 publishes each egress connection may have unacknowledged by the broker at once
    /// (rumqttc's window). A small window caps the publish rate at window / round trip. Default
    /// 1024.
    pub egress_inflight: u16,
    /// The username of the egress connections to an external broker (default none: the
    /// broker username; see the file's `broker_egress_username`).
    pub egress_username: Option<String>,
    /// MQTT keep-alive. Default 30 s.
    pub keep_alive: Duration,
    /// First wait before reconnecting after the connection failed; it doubles after every
    /// failure up to `reconnect_max`. Defaults 500 ms and 10 s.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// First wait before subscribing again after a subscription failed (refused in the SUBACK,
    /// not queued, or unanswered); it doubles up to `subscribe_retry_max`. Defaults 200 ms and
    /// 30 s.
    pub subscribe_retry_min: Duration,
    pub subscribe_retry_max: Duration,
    /// How long a SUBSCRIBE may wait for its SUBACK before it is sent again. Default 10 s.
    pub suback_timeout: Duration,
    /// How long a connection may go without its subscription granted, over at least three
    /// refused or unanswered SUBSCRIBEs, before it is given up for the next broker address.
    /// Default 20 s: a cluster node electing leaders refuses for seconds; one that still
    /// refuses after this is left for another node.
    pub subscribe_give_up: Duration,
    /// How often the cloud sends a probe of its own under the device topic filter and expects
    /// it back through its subscription (`probe`): three lost in a row (while it was reading)
    /// say the subscription went deaf though the connections stayed up (a NATS node whose
    /// consumer lost its quorum), and every connection is made again. `Duration::ZERO` turns it
    /// off. Default 10 s. External brokers only; the brokers' access control must let the
    /// publishing user write `{prefix}/_devtables/+/up` (docs/deployment.md).
    pub probe_interval: Duration,
    /// Further addresses of an external broker (the other nodes of a broker cluster), tried in
    /// turn after [`BrokerMode::External`]'s `host:port`: every failed attempt and every lost
    /// connection moves that connection's next attempt to the next address, round the list
    /// (see `external_brokers`). Default none.
    pub external_fallbacks: Vec<(String, u16)>,
    /// How many connections subscribe to the device topics, 1 to [`MAX_BROKER_CLIENTS`].
    /// Default 1: one plain subscription to `{prefix}/+/+/up`. More than 1 share one
    /// subscription (`$share/devtables-{node}/{prefix}/+/+/up`, MQTT 5's shared subscriptions,
    /// which Mosquitto 2, EMQX, HiveMQ and VerneMQ also grant to MQTT 3.1.1 clients): the broker
    /// hands each device message to one of them, so reading device traffic is spread over
    /// several sessions. Only for brokers that have shared subscriptions (NATS's MQTT gateway
    /// has not: keep 1 there). One device's messages may then arrive over different
    /// connections, out of order; the protocol tolerates it (docs/scale-out.md).
    pub ingress_clients: usize,
    /// How many connections publish to devices, 1 to [`MAX_BROKER_CLIENTS`]. Default 1. A
    /// device's publishes always go through the same one (chosen by a hash of its id), so its
    /// messages keep their order on the wire; each has its own request queue of
    /// `request_queue` slots and its own backpressure.
    pub egress_clients: usize,
}

/// Most connections per direction to an external broker ([`MqttClientConfig::ingress_clients`],
/// [`MqttClientConfig::egress_clients`]).
pub const MAX_BROKER_CLIENTS: usize = 16;

impl Default for MqttClientConfig {
    fn default() -> MqttClientConfig {
        MqttClientConfig {
            request_queue: 4096,
            event_queue: 1024,
            egress_inflight: 1024,
            egress_username: None,
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(10),
            subscribe_retry_min: Duration::from_millis(200),
            subscribe_retry_max: Duration::from_secs(30),
            suback_timeout: Duration::from_secs(10),
            subscribe_give_up: Duration::from_secs(20),
            probe_interval: Duration::from_secs(10),
            external_fallbacks: Vec::new(),
            ingress_clients: 1,
            egress_clients: 1,
        }
    }
}

/// Pacing of the start-up prompts.
///
/// Sessions live in memory, so after a restart the cloud prompts every device whose feed head is
/// above its acknowledged cursor (an idle device would otherwise never say hello again and never
/// get its changes). On a large fleet these prompts would fill the MQTT request queue at once;
/// they are released only once the device topics are subscribed, at most `per_tick` every
/// `tick`, and never more than half of the request queue's free room. The same queue paces the
/// wake-ups of a write that advances more than `per_tick` feeds at once (a broadcast to a large
/// account: one feed per device).
#[derive(Clone, Debug, PartialEq)]
pub struct StartupPrompts {
    /// Most devices prompted per tick. Default 256.
    pub per_tick: usize,
    /// Default 100 ms (with the defaults: about 2 500 devices a second).
    pub tick: Duration,
}

impl Default for StartupPrompts {
    fn default() -> StartupPrompts {
        StartupPrompts {
            per_tick: 256,
            tick: Duration::from_millis(100),
        }
    }
}

impl CloudConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> CloudConfig {
        CloudConfig {
            data_dir: data_dir.into(),
            database: DatabaseChoice::Sqlite,
            database_tls: None,
            cluster: ClusterConfig::default(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_tls: None,
            broker_plain: true,
            broker_tls: None,
            broker_limits: crate::broker::BrokerLimits::default(),
            device_certificates: None,
            external_tls: None,
            broker: BrokerMode::Embedded {
                listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            },
            topic_prefix: devtables_sync::topics::DEFAULT_PREFIX.into(),
            sync: devtables_sync::cloud::CloudEngineConfig::default(),
            quotas: DeviceQuotas::default(),
            api_rate: RateLimit {
                per_sec: 100,
                burst: 200,
            },
            api_rate_keys: 10_000,
            retention: Retention::default(),
            purge_interval: Duration::from_secs(3600),
            sqlite_full_sync: true,
            fanout_batch: crate::store::DEFAULT_FANOUT_BATCH,
            max_request_bytes: 1024 * 1024,
            max_page_items: 1000,
            node_name: String::new(),
            mqtt: MqttClientConfig::default(),
            startup_prompts: StartupPrompts::default(),
            sync_store_jobs: 64,
            store_group_max: 1024,
            insecure_no_auth: false,
            metrics_open: false,
            credentials_ttl: crate::auth::DEFAULT_CREDENTIALS_TTL,
            credentials_cache: crate::auth::DEFAULT_CREDENTIALS_CACHE,
            changes: ChangesConfig::default(),
        }
    }

    /// Checks the settings that would make the service unable to run.
    pub fn validate(&self) -> Result<(), String> {
        if let DatabaseChoice::Postgres { schema, .. } = &self.database {
            let plain = !schema.is_empty()
                && schema.len() <= 40
                && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !plain {
                return Err(format!(
                    "database_schema {schema:?} must be lower-case letters, digits and _ (at most 40)"
                ));
            }
        }
        if self.retention.batch == 0 || self.changes.retention.batch == 0 {
            return Err("retention_batch must be at least 1".into());
        }
        if self.fanout_batch == 0 {
            return Err("fanout_batch must be at least 1".into());
        }
        if !(1..=4096).contains(&self.cluster.partitions) {
            return Err(format!(
                "cluster_partitions must be 1 to 4096, got {}",
                self.cluster.partitions
            ));
        }
        if self.cluster.lease < Duration::from_millis(300) {
            return Err(format!(
                "cluster_lease_ms must be at least 300, got {}",
                self.cluster.lease.as_millis()
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400))
            .contains(&self.cluster.presence_check)
        {
            return Err(format!(
                "cluster_presence_check_ms must be 1000 to 86400000, got {}",
                self.cluster.presence_check.as_millis()
            ));
        }
        if self.mqtt.request_queue < 2 {
            return Err(format!(
                "mqtt request_queue must be at least 2 (one slot is kept for subscribing), got {}",
                self.mqtt.request_queue
            ));
        }
        // Whole seconds the MQTT keep-alive field holds (rumqttc refuses less than a second).
        if self.mqtt.probe_interval > Duration::from_secs(3600) {
            return Err(format!(
                "mqtt_probe_secs must be 0 (off) to 3600, got {}",
                self.mqtt.probe_interval.as_secs()
            ));
        }
        let keep_alive = self.mqtt.keep_alive;
        if keep_alive < Duration::from_secs(1)
            || keep_alive > Duration::from_secs(u64::from(u16::MAX))
            || keep_alive.subsec_nanos() != 0
        {
            return Err(format!(
                "mqtt_keep_alive_secs must be whole seconds from 1 to 65535, got {keep_alive:?}"
            ));
        }
        if self.mqtt.event_queue == 0 {
            return Err("mqtt event_queue must be at least 1".into());
        }
        for (name, n) in [
            ("mqtt_ingress_clients", self.mqtt.ingress_clients),
            ("mqtt_egress_clients", self.mqtt.egress_clients),
        ] {
            if !(1..=MAX_BROKER_CLIENTS).contains(&n) {
                return Err(format!("{name} must be 1 to {MAX_BROKER_CLIENTS}, got {n}"));
            }
        }
        if self.sync_store_jobs == 0 {
            return Err("sync_store_jobs must be at least 1".into());
        }
        if self.store_group_max == 0 {
            return Err("store_group_max must be at least 1".into());
        }
        if !self.broker_plain && self.broker_tls.is_none() {
            return Err("the embedded broker needs a listener: broker_plain or broker_tls".into());
        }
        if let Some(certs) = &self.device_certificates {
            if !matches!(self.broker, BrokerMode::Embedded { .. }) {
                return Err(
                    "device_certificates needs the embedded broker (an external \
                            broker's client certificates are configured there)"
                        .into(),
                );
            }
            if self.broker_tls.is_none() {
                return Err(
                    "device_certificates needs embedded_broker_tls: its listener \
                            serves with the same certificate"
                        .into(),
                );
            }
            crate::ca::validity_days(u64::from(certs.validity_days)).map_err(|e| e.to_string())?;
        }
        if self.startup_prompts.per_tick == 0 || self.startup_prompts.tick.is_zero() {
            return Err("startup prompts need at least 1 per tick and a tick above 0".into());
        }
        validate_sync_engine(&self.sync)?;
        let wire = &self.sync.wire;
        if self.sync.max_push_changes == 0 || self.sync.max_push_changes > wire.max_changes {
            return Err(format!(
                "max_push_changes must be 1 to {} (the wire's limit), got {}",
                wire.max_changes, self.sync.max_push_changes
            ));
        }
        if self.quotas.max_item_bytes == 0
            || self.quotas.max_item_bytes > wire.max_message_bytes as u64
        {
            return Err(format!(
                "max_item_bytes must be 1 to {} (the message limit), got {}",
                wire.max_message_bytes, self.quotas.max_item_bytes
            ));
        }
        for (name, rate) in [
            ("device_message_burst", self.sync.device_rate),
            ("api_request_burst", self.api_rate),
        ] {
            if rate.per_sec > 0 && rate.burst == 0 {
                return Err(format!(
                    "{name} must be at least 1 when its rate is set (a burst of 0 refuses all)"
                ));
            }
        }
        if self.api_rate_keys == 0 {
            return Err("api_rate_keys must be at least 1".into());
        }
        self.changes.validate()
    }
}

/// The sync engine's limits and timers as the cloud's file sets them (`sync_engine`, each key
/// optional; a key left out keeps [`CloudEngineConfig`](devtables_sync::cloud::CloudEngineConfig)'s
/// default, documented there). Their ranges are checked by [`CloudConfig::validate`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncEngineFile {
    pub max_sessions: Option<usize>,
    pub feed_window: Option<usize>,
    pub feed_page_changes: Option<usize>,
    pub snapshot_page_items: Option<usize>,
    pub ack_timeout_ms: Option<u64>,
    pub ack_timeout_max_ms: Option<u64>,
    pub max_page_retries: Option<u32>,
    pub max_pushes_in_progress: Option<usize>,
    pub max_covered_changes: Option<usize>,
    pub remembered_answers: Option<usize>,
    pub busy_retry_ms: Option<u64>,
    pub prompt_interval_ms: Option<u64>,
}

impl SyncEngineFile {
    fn apply(self, engine: &mut devtables_sync::cloud::CloudEngineConfig) {
        let SyncEngineFile {
            max_sessions,
            feed_window,
            feed_page_changes,
            snapshot_page_items,
            ack_timeout_ms,
            ack_timeout_max_ms,
            max_page_retries,
            max_pushes_in_progress,
            max_covered_changes,
            remembered_answers,
            busy_retry_ms,
            prompt_interval_ms,
        } = self;
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(value) = value {
                *slot = value;
            }
        }
        set(&mut engine.max_sessions, max_sessions);
        set(&mut engine.feed_window, feed_window);
        set(&mut engine.feed_page_changes, feed_page_changes);
        set(&mut engine.snapshot_page_items, snapshot_page_items);
        set(&mut engine.ack_timeout_ms, ack_timeout_ms);
        set(&mut engine.ack_timeout_max_ms, ack_timeout_max_ms);
        set(&mut engine.max_page_retries, max_page_retries);
        set(&mut engine.max_pushes_in_progress, max_pushes_in_progress);
        set(&mut engine.max_covered_changes, max_covered_changes);
        set(&mut engine.remembered_answers, remembered_answers);
        set(&mut engine.busy_retry_ms, busy_retry_ms);
        set(&mut engine.prompt_interval_ms, prompt_interval_ms);
    }
}

/// Checks the sync engine's limits and timers, naming the file key (`sync_engine.KEY`) of the
/// first out of range. The upper bounds keep one session's state small (docs/security.md) and
/// a page within one message.
fn validate_sync_engine(engine: &devtables_sync::cloud::CloudEngineConfig) -> Result<(), String> {
    let max_changes = engine.wire.max_changes as u64;
    let checks: [(&str, u64, u64, u64); 12] = [
        ("max_sessions", engine.max_sessions as u64, 1, 10_000_000),
        ("feed_window", engine.feed_window as u64, 1, 64),
        (
            "feed_page_changes",
            engine.feed_page_changes as u64,
            1,
            max_changes,
        ),
        (
            "snapshot_page_items",
            engine.snapshot_page_items as u64,
            1,
            max_changes,
        ),
        (
            "ack_timeout_ms",
            engine.ack_timeout_ms,
            100,
            engine.ack_timeout_max_ms,
        ),
        (
            "ack_timeout_max_ms",
            engine.ack_timeout_max_ms,
            100,
            3_600_000,
        ),
        (
            "max_page_retries",
            u64::from(engine.max_page_retries),
            1,
            1000,
        ),
        (
            "max_pushes_in_progress",
            engine.max_pushes_in_progress as u64,
            1,
            1024,
        ),
        (
            "max_covered_changes",
            engine.max_covered_changes as u64,
            0,
            65_536,
        ),
        (
            "remembered_answers",
            engine.remembered_answers as u64,
            0,
            4096,
        ),
        ("busy_retry_ms", engine.busy_retry_ms, 1, 3_600_000),
        (
            "prompt_interval_ms",
            engine.prompt_interval_ms,
            100,
            3_600_000,
        ),
    ];
    for (name, value, least, most) in checks {
        if !(least..=most).contains(&value) {
            return Err(format!(
                "sync_engine.{name} must be {least} to {most}, got {value}"
            ));
        }
    }
    Ok(())
}

/// The configuration file of `devtables cloud`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct CloudFile {
    /// The schema (JSON5), relative to this file.
    pub schema: PathBuf,
    /// Data folder, relative to this file.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub api: Option<SocketAddr>,
    /// `{cert, key}` (PEM files, relative to this file): serve the API over HTTPS.
    #[serde(default)]
    pub api_tls: Option<ServerTlsFile>,
    /// `host:port` of the embedded broker's clear-text listener (default 127.0.0.1:1883 unless
    /// only `embedded_broker_tls` is set) ...
    #[serde(default)]
    pub embedded_broker: Option<SocketAddr>,
    /// `{listen, cert, key}`: the embedded broker's TLS listener (alone, or with
    /// `embedded_broker`) ...
    #[serde(default)]
    pub embedded_broker_tls: Option<BrokerTlsFile>,
    /// `{max_packet_bytes, max_connections, max_inflight, max_queued_messages,
    /// max_device_messages_waiting}`, each optional: the embedded broker's limits
    /// ([`crate::broker::BrokerLimits`]; refused with an external broker, which has its own).
    #[serde(default)]
    pub embedded_broker_limits: Option<crate::broker::BrokerLimits>,
    /// `{listen, validity_days}`: the embedded broker's listener for devices with client
    /// certificates (needs `embedded_broker_tls`, whose certificate it serves with); the cloud
    /// issues them from its CA in `data_dir/ca/`, valid `validity_days` (default 90).
    #[serde(default)]
    pub device_certificates: Option<DeviceCertificatesFile>,
    /// `'sqlite'` (the default: `cloud.db` in the data folder) or a PostgreSQL URL
    /// (`postgres://user@host:port/database`).
    #[serde(default)]
    pub database: Option<String>,
    /// With PostgreSQL: the schema holding devtables' tables (default `devtables`).
    #[serde(default)]
    pub database_schema: Option<String>,
    /// `{ca, server_name, client_cert, client_key}`: TLS to PostgreSQL, the server checked
    /// against `ca` (required when set; the same block as `external_broker_tls`).
    #[serde(default)]
    pub database_tls: Option<ClientTlsFile>,
    /// Partitions of a scaled-out cloud (default 64; the same on every node).
    #[serde(default)]
    pub cluster_partitions: Option<u32>,
    /// A node's lease in ms (default 5000): the longest a killed node's devices wait.
    #[serde(default)]
    pub cluster_lease_ms: Option<u64>,
    /// How long a node that took over partitions waits for their devices shown online to
    /// answer before marking the silent ones offline, in ms (default 60000).
    #[serde(default)]
    pub cluster_presence_check_ms: Option<u64>,
    /// ... or an external broker: `mqtts://host:port` (needs `external_broker_tls`),
    /// `mqtt://host:port` or `host:port` (clear text); a list of them (also spelt
    /// `external_brokers`, or one string with commas between the addresses) names the nodes of
    /// a broker cluster, tried in turn.
    #[serde(default, alias = "external_brokers")]
    pub external_broker: Option<ExternalBrokerSetting>,
    /// `{ca, server_name}`: the external broker's CA (PEM) and, optionally, the name its
    /// certificate carries (default: its host).
    #[serde(default)]
    pub external_broker_tls: Option<ClientTlsFile>,
    #[serde(default)]
    pub broker_username: Option<String>,
    #[serde(default)]
    pub broker_password: Option<String>,
    /// The username of the cloud's publishing (egress) connection to an external broker, with
    /// the same password (default: `broker_username`). Needed by brokers that take the client
    /// id from the username (Mosquitto's `use_username_as_clientid`, as `devtables
    /// broker-config mosquitto` writes it): the cloud's two connections must not share one.
    #[serde(default)]
    pub broker_egress_username: Option<String>,
    #[serde(default)]
    pub topic_prefix: Option<String>,
    #[serde(default)]
    pub tombstone_retention_hours: Option<u64>,
    /// The same in seconds (wins over the hours; for tests and short-lived fleets).
    #[serde(default)]
    pub tombstone_retention_secs: Option<u64>,
    /// How often retention runs, in seconds (default 3600).
    #[serde(default)]
    pub purge_interval_secs: Option<u64>,
    /// Most tombstones (and conflict records, and change-log entries) one store transaction of
    /// a retention pass removes; a pass takes as many transactions as its backlog needs, other
    /// work on the store running in between (default 1000, at least 1).
    #[serde(default)]
    pub retention_batch: Option<u64>,
    /// Most devices one store transaction appends a broadcast's feed entry to (default 500,
    /// at least 1).
    #[serde(default)]
    pub fanout_batch: Option<usize>,
    #[serde(default)]
    pub max_conflicts: Option<u64>,
    /// Capacity of the service's MQTT request queue (default 4096).
    #[serde(default)]
    pub mqtt_request_queue: Option<usize>,
    /// The keep-alive of the cloud's connections to an external broker, in seconds (default 30,
    /// 1 to 65535). While the store does not answer, the reading connections stop reading
    /// (backpressure) and send no PINGREQ either: the broker drops one after 1.5 times this,
    /// and the cloud reconnects and restarts every device session. Raise it to ride out longer
    /// store outages (a PostgreSQL failover); a dead broker is then noticed later.
    #[serde(default)]
    pub mqtt_keep_alive_secs: Option<u64>,
    /// Seconds an ingress connection to an external broker may go without its subscription
    /// granted (over at least three refused or unanswered SUBSCRIBEs) before it is given up
    /// for the broker's next address (default 20; see [`MqttClientConfig::subscribe_give_up`]).
    #[serde(default)]
    pub mqtt_subscribe_give_up_secs: Option<u64>,
    /// Seconds between the cloud's path probes through an external broker, 0 to turn them off
    /// (default 10; see [`MqttClientConfig::probe_interval`]).
    #[serde(default)]
    pub mqtt_probe_secs: Option<u64>,
    /// Connections of an external broker that read device messages, over one shared
    /// subscription when more than 1 (default 1; see [`MqttClientConfig::ingress_clients`]).
    #[serde(default)]
    pub mqtt_ingress_clients: Option<usize>,
    /// Connections of an external broker that publish to devices (default 1; see
    /// [`MqttClientConfig::egress_clients`]).
    #[serde(default)]
    pub mqtt_egress_clients: Option<usize>,
    /// Devices prompted per start-up tick (default 256).
    #[serde(default)]
    pub startup_prompts_per_tick: Option<usize>,
    /// The start-up prompt tick in milliseconds (default 100).
    #[serde(default)]
    pub startup_prompt_tick_ms: Option<u64>,
    /// Serve the HTTP API without API keys (default false; see [`CloudConfig::insecure_no_auth`]).
    #[serde(default)]
    pub insecure_no_auth: bool,
    /// Serve `GET /metrics` without a key (default false; see [`CloudConfig::metrics_open`]).
    #[serde(default)]
    pub metrics_open: bool,
    /// Seconds the embedded broker trusts cached device credentials (default 5; see
    /// [`CloudConfig::credentials_ttl`]).
    #[serde(default)]
    pub credentials_ttl_secs: Option<u64>,
    /// Messages a second one device session may send (default 50; 0: no limit).
    #[serde(default)]
    pub device_messages_per_sec: Option<u32>,
    /// Messages one device may send at once after a quiet time (default 100).
    #[serde(default)]
    pub device_message_burst: Option<u32>,
    /// Most changes in one push (default 1000, the wire's limit).
    #[serde(default)]
    pub max_push_changes: Option<usize>,
    /// Largest item a device may push, in bytes of JSON (default 65536).
    #[serde(default)]
    pub max_item_bytes: Option<u64>,
    /// Most live items stored per device (default 100000).
    #[serde(default)]
    pub max_rows_per_device: Option<u64>,
    /// Most bytes of live items stored per device (default 268435456, 256 MiB).
    #[serde(default)]
    pub max_bytes_per_device: Option<u64>,
    /// Most conflict records kept per device (default 1000).
    #[serde(default)]
    pub max_conflicts_per_device: Option<u64>,
    /// HTTP API requests a second per API key (default 100; 0: no limit).
    #[serde(default)]
    pub api_requests_per_sec: Option<u32>,
    /// HTTP API requests one key may make at once after a quiet time (default 200).
    #[serde(default)]
    pub api_request_burst: Option<u32>,
    /// This cloud node's name, in the versions it mints (default: a random name per start; give
    /// each node of a scaled-out cloud its own, stable name).
    #[serde(default)]
    pub node_name: Option<String>,
    /// How far past the cloud's time a pushed version may be, in ms (default 60000): a device
    /// whose clock runs further ahead is told to re-stamp, and never moves the fleet's clock.
    #[serde(default)]
    pub max_drift_ms: Option<u64>,
    /// `{max_sessions, feed_window, feed_page_changes, snapshot_page_items, ack_timeout_ms,
    /// ack_timeout_max_ms, max_page_retries, max_pushes_in_progress, max_covered_changes,
    /// remembered_answers, busy_retry_ms, prompt_interval_ms}`, each optional: the sync
    /// engine's limits and timers ([`SyncEngineFile`]); a value out of range is refused, naming
    /// the key.
    #[serde(default)]
    pub sync_engine: Option<SyncEngineFile>,
    /// Most store jobs of the sync loop out at once (default 64).
    #[serde(default)]
    pub sync_store_jobs: Option<usize>,
    /// Most store jobs sharing one commit (default 1024; 1: a commit per job).
    #[serde(default)]
    pub store_group_max: Option<usize>,
    /// Hours the change log keeps a change (default 168, 7 days).
    #[serde(default)]
    pub changes_retention_hours: Option<u64>,
    /// The same in seconds (wins over the hours; for tests).
    #[serde(default)]
    pub changes_retention_secs: Option<u64>,
    /// Most changes the log keeps per account (default 1000000).
    #[serde(default)]
    pub changes_max_per_account: Option<u64>,
    /// Most changes in one answer of `GET .../changes` (default 1000).
    #[serde(default)]
    pub changes_max_page: Option<usize>,
    /// Most log entries one read examines for its filters (default 10000).
    #[serde(default)]
    pub changes_max_scan: Option<usize>,
    /// Longest long-poll `wait`, in seconds (default 60).
    #[serde(default)]
    pub changes_max_wait_secs: Option<u64>,
    /// Most readers (SSE streams, waiting long polls) at once (default 256).
    #[serde(default)]
    pub changes_max_readers: Option<usize>,
    /// Seconds between the comments of an idle SSE stream (default 15).
    #[serde(default)]
    pub changes_keepalive_secs: Option<u64>,
    /// Shortest time between two store reads of one waiting reader or webhook, in ms (default
    /// 100).
    #[serde(default)]
    pub changes_read_interval_ms: Option<u64>,
    /// Most webhooks per account (default 16).
    #[serde(default)]
    pub webhooks_per_account: Option<usize>,
    /// Most changes in one webhook delivery (default 100).
    #[serde(default)]
    pub webhook_batch: Option<usize>,
    /// Largest webhook delivery body in bytes (default 1048576).
    #[serde(default)]
    pub webhook_max_body_bytes: Option<usize>,
    /// Seconds one webhook delivery may take (default 10).
    #[serde(default)]
    pub webhook_timeout_secs: Option<u64>,
    /// The first wait after a failed webhook delivery, in ms (default 1000).
    #[serde(default)]
    pub webhook_retry_min_ms: Option<u64>,
    /// The longest wait between webhook delivery attempts, in ms (default 60000).
    #[serde(default)]
    pub webhook_retry_max_ms: Option<u64>,
    /// Most webhook deliveries in flight at once (default 32).
    #[serde(default)]
    pub webhook_in_flight: Option<usize>,
    /// CA certificates (PEM, relative to this file) an `https` webhook receiver may chain to,
    /// besides the system's.
    #[serde(default)]
    pub webhook_ca: Option<PathBuf>,
}

/// A certificate and key in the cloud's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFile {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The embedded broker's TLS listener in the cloud's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsFile {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The device-certificate listener in the cloud's file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCertificatesFile {
    pub listen: SocketAddr,
    #[serde(default)]
    pub validity_days: Option<u32>,
}

/// The external broker's TLS in the cloud's file (the same format as the agent's `tls`).
pub use devtables_tls::ClientTlsFile;

/// The file's `external_broker`: one address, or the addresses of a broker cluster.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ExternalBrokerSetting {
    One(String),
    Many(Vec<String>),
}

impl ExternalBrokerSetting {
    /// The addresses as written.
    pub fn entries(&self) -> Vec<&str> {
        match self {
            // Commas separate addresses here too, as on the command line (`--mqtt a:1,b:1`).
            ExternalBrokerSetting::One(s) => s.split(',').map(str::trim).collect(),
            ExternalBrokerSetting::Many(list) => list.iter().map(String::as_str).collect(),
        }
    }
}

/// Most addresses an external broker list may hold (a broker cluster has a handful of nodes).
pub const MAX_EXTERNAL_BROKERS: usize = 16;

/// What the scheme of an external broker list asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalScheme {
    /// `mqtts://`
    Tls,
    /// `mqtt://`
    Clear,
}

/// A parsed external broker list: `host:port` in order, and the scheme the entries share (none
/// when every entry is a bare `host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalBrokers {
    pub addresses: Vec<(String, u16)>,
    pub scheme: Option<ExternalScheme>,
}

/// Parses the addresses of an external broker, each `mqtts://host:port`, `mqtt://host:port` or
/// `host:port`. Refused, naming the entry: an empty list, more than [`MAX_EXTERNAL_BROKERS`], an
/// address listed twice, another scheme, and `mqtt://` mixed with `mqtts://` (one TLS setting
/// serves every address).
pub fn parse_external_brokers<'a>(
    entries: impl IntoIterator<Item = &'a str>,
) -> Result<ExternalBrokers, String> {
    let mut list = ExternalBrokers {
        addresses: Vec::new(),
        scheme: None,
    };
    for entry in entries {
        if list.addresses.len() == MAX_EXTERNAL_BROKERS {
            return Err(format!(
                "external_broker lists more than {MAX_EXTERNAL_BROKERS} addresses"
            ));
        }
        let (scheme, addr) = match entry.split_once("://") {
            Some(("mqtts", rest)) => (Some(ExternalScheme::Tls), rest),
            Some(("mqtt", rest)) => (Some(ExternalScheme::Clear), rest),
            Some((other, _)) => {
                return Err(format!(
                    "external_broker scheme {other:?} is not mqtt or mqtts"
                ))
            }
            None => (None, entry),
        };
        list.scheme = match (list.scheme, scheme) {
            (None, s) | (s, None) => s,
            (Some(a), Some(b)) if a == b => Some(a),
            _ => {
                return Err(format!(
                    "external_broker {entry:?}: the list mixes mqtt:// and mqtts://; one TLS \
                     setting serves every address"
                ))
            }
        };
        let (host, port) = addr
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty() && !host.contains(char::is_whitespace))
            .ok_or_else(|| format!("external_broker {addr:?} must be host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("external_broker port {port:?} is not a number"))?;
        let address = (host.to_string(), port);
        if list.addresses.contains(&address) {
            return Err(format!("external_broker {host}:{port} is listed twice"));
        }
        list.addresses.push(address);
    }
    if list.addresses.is_empty() {
        return Err("external_broker lists no address".into());
    }
    Ok(list)
}

impl CloudFile {
    pub fn load(path: &Path) -> Result<(PathBuf, CloudConfig), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file: CloudFile =
            json5::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut config = CloudConfig::new(dir.join(&file.data_dir));
        if let Some(api) = file.api {
            config.api_listen = api;
        }
        if let Some(tls) = &file.api_tls {
            config.api_tls = Some(crate::tls::ServerTls {
                cert: dir.join(&tls.cert),
                key: dir.join(&tls.key),
            });
        }
        if let Some(tls) = &file.embedded_broker_tls {
            config.broker_tls = Some(crate::broker::BrokerTls {
                listen: tls.listen,
                files: crate::tls::ServerTls {
                    cert: dir.join(&tls.cert),
                    key: dir.join(&tls.key),
                },
            });
            // A TLS listener alone replaces the clear-text default.
            config.broker_plain = file.embedded_broker.is_some();
        }
        if let Some(certs) = &file.device_certificates {
            let mut c = DeviceCertificates::new(certs.listen);
            if let Some(days) = certs.validity_days {
                c.validity_days = days;
            }
            config.device_certificates = Some(c);
        }
        let embedded = file.embedded_broker.is_some() || file.embedded_broker_tls.is_some();
        if let Some(limits) = file.embedded_broker_limits {
            if file.external_broker.is_some() {
                return Err(
                    "embedded_broker_limits is set but the cloud uses an external \
                            broker: set the limits in that broker's configuration"
                        .into(),
                );
            }
            limits
                .validate()
                .map_err(|e| format!("embedded_broker_limits: {e}"))?;
            config.broker_limits = limits;
        }
        config.broker = match (embedded, &file.external_broker) {
            (true, Some(_)) => {
                return Err("set either embedded_broker(_tls) or external_broker, not both".into())
            }
            (true, None) => match file.embedded_broker {
                Some(listen) => BrokerMode::Embedded { listen },
                None => config.broker,
            },
            (false, Some(setting)) => {
                let list = parse_external_brokers(setting.entries())?;
                config.external_tls = match (list.scheme, &file.external_broker_tls) {
                    (Some(ExternalScheme::Clear), Some(_)) => {
                        return Err(
                            "external_broker is mqtt:// (clear text) but external_broker_tls \
                                    is set: use mqtts://"
                                .into(),
                        )
                    }
                    (Some(ExternalScheme::Tls), None) => {
                        return Err(
                            "external_broker is mqtts:// but no external_broker_tls gives \
                                    the CA file"
                                .into(),
                        )
                    }
                    (_, Some(tls)) => Some(
                        tls.resolve(dir)
                            .map_err(|e| format!("external_broker_tls: {e}"))?,
                    ),
                    (_, None) => None,
                };
                let mut addresses = list.addresses.into_iter();
                let (host, port) = addresses.next().ok_or("external_broker lists no address")?;
                config.mqtt.external_fallbacks = addresses.collect();
                BrokerMode::External {
                    host,
                    port,
                    username: file.broker_username.clone(),
                    password: file.broker_password.clone(),
                }
            }
            (false, None) => config.broker,
        };
        file.apply_changes(dir, &mut config.changes);
        if let Some(p) = file.topic_prefix {
            config.topic_prefix = p;
        }
        config.mqtt.egress_username = file.broker_egress_username.clone();
        if let Some(secs) = file.credentials_ttl_secs {
            config.credentials_ttl = Duration::from_secs(secs);
        }
        if let Some(h) = file.tombstone_retention_hours {
            config.retention.tombstone_ms = h.saturating_mul(3600 * 1000);
        }
        if let Some(secs) = file.tombstone_retention_secs {
            config.retention.tombstone_ms = secs.saturating_mul(1000);
        }
        if let Some(secs) = file.purge_interval_secs {
            config.purge_interval = Duration::from_secs(secs.max(1));
        }
        if let Some(n) = file.max_conflicts {
            config.retention.max_conflicts = n;
        }
        if let Some(n) = file.retention_batch {
            config.retention.batch = n;
            config.changes.retention.batch = n;
        }
        if let Some(n) = file.fanout_batch {
            config.fanout_batch = n;
        }
        if let Some(n) = file.mqtt_request_queue {
            config.mqtt.request_queue = n;
        }
        if let Some(secs) = file.mqtt_keep_alive_secs {
            config.mqtt.keep_alive = Duration::from_secs(secs);
        }
        if let Some(secs) = file.mqtt_subscribe_give_up_secs {
            config.mqtt.subscribe_give_up = Duration::from_secs(secs);
        }
        if let Some(secs) = file.mqtt_probe_secs {
            config.mqtt.probe_interval = Duration::from_secs(secs);
        }
        if let Some(n) = file.mqtt_ingress_clients {
            config.mqtt.ingress_clients = n;
        }
        if let Some(n) = file.mqtt_egress_clients {
            config.mqtt.egress_clients = n;
        }
        if let Some(n) = file.startup_prompts_per_tick {
            config.startup_prompts.per_tick = n;
        }
        if let Some(ms) = file.startup_prompt_tick_ms {
            config.startup_prompts.tick = Duration::from_millis(ms);
        }
        config.insecure_no_auth = file.insecure_no_auth;
        config.metrics_open = file.metrics_open;
        if let Some(n) = file.device_messages_per_sec {
            config.sync.device_rate.per_sec = n;
        }
        if let Some(n) = file.device_message_burst {
            config.sync.device_rate.burst = n;
        }
        if let Some(n) = file.max_push_changes {
            config.sync.max_push_changes = n;
        }
        if let Some(n) = file.max_item_bytes {
            config.quotas.max_item_bytes = n;
        }
        if let Some(n) = file.max_rows_per_device {
            config.quotas.max_rows = n;
        }
        if let Some(n) = file.max_bytes_per_device {
            config.quotas.max_bytes = n;
        }
        if let Some(n) = file.max_conflicts_per_device {
            config.quotas.max_conflicts = n;
        }
        if let Some(n) = file.api_requests_per_sec {
            config.api_rate.per_sec = n;
        }
        if let Some(n) = file.api_request_burst {
            config.api_rate.burst = n;
        }
        if let Some(name) = file.node_name {
            config.node_name = name;
        }
        match file.database.as_deref() {
            None | Some("sqlite") => {}
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                config.database = DatabaseChoice::Postgres {
                    url: url.to_string(),
                    schema: file
                        .database_schema
                        .clone()
                        .unwrap_or_else(|| "devtables".into()),
                };
            }
            Some(other) => {
                let shown = other.split('@').next_back().unwrap_or(other);
                return Err(format!(
                    "database {shown:?} is neither 'sqlite' nor a postgres:// URL"
                ));
            }
        }
        if let Some(tls) = &file.database_tls {
            if config.database == DatabaseChoice::Sqlite {
                return Err("database_tls is set but the database is SQLite (a file)".into());
            }
            config.database_tls = Some(tls.resolve(dir).map_err(|e| format!("database_tls: {e}"))?);
        }
        if let Some(n) = file.cluster_partitions {
            config.cluster.partitions = n;
        }
        if let Some(ms) = file.cluster_lease_ms {
            config.cluster.lease = Duration::from_millis(ms);
        }
        if let Some(ms) = file.cluster_presence_check_ms {
            config.cluster.presence_check = Duration::from_millis(ms);
        }
        if let Some(ms) = file.max_drift_ms {
            config.sync.max_drift_ms = ms;
        }
        if let Some(n) = file.sync_store_jobs {
            config.sync_store_jobs = n;
        }
        if let Some(engine) = file.sync_engine {
            engine.apply(&mut config.sync);
        }
        if let Some(n) = file.store_group_max {
            config.store_group_max = n;
        }
        config
            .validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((dir.join(file.schema), config))
    }

    /// The change log's and the webhooks' keys.
    fn apply_changes(&self, dir: &Path, c: &mut ChangesConfig) {
        if let Some(h) = self.changes_retention_hours {
            c.retention.max_age_ms = h.saturating_mul(3600 * 1000);
        }
        if let Some(secs) = self.changes_retention_secs {
            c.retention.max_age_ms = secs.saturating_mul(1000);
        }
        if let Some(n) = self.changes_max_per_account {
            c.retention.max_per_account = n;
        }
        let set = |target: &mut usize, value: Option<usize>| {
            if let Some(v) = value {
                *target = v;
            }
        };
        set(&mut c.max_page, self.changes_max_page);
        set(&mut c.max_scan, self.changes_max_scan);
        set(&mut c.max_readers, self.changes_max_readers);
        set(&mut c.webhooks_per_account, self.webhooks_per_account);
        set(&mut c.webhook_batch, self.webhook_batch);
        set(&mut c.webhook_max_body_bytes, self.webhook_max_body_bytes);
        set(&mut c.webhook_in_flight, self.webhook_in_flight);
        if let Some(secs) = self.changes_max_wait_secs {
            c.max_wait = Duration::from_secs(secs);
        }
        if let Some(secs) = self.changes_keepalive_secs {
            c.keepalive = Duration::from_secs(secs);
        }
        if let Some(ms) = self.changes_read_interval_ms {
            c.read_interval = Duration::from_millis(ms);
        }
        if let Some(secs) = self.webhook_timeout_secs {
            c.webhook_timeout = Duration::from_secs(secs);
        }
        if let Some(ms) = self.webhook_retry_min_ms {
            c.webhook_retry_min = Duration::from_millis(ms);
        }
        if let Some(ms) = self.webhook_retry_max_ms {
            c.webhook_retry_max = Duration::from_millis(ms);
        }
        if let Some(ca) = &self.webhook_ca {
            c.webhook_ca = Some(dir.join(ca));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads a cloud file in `dir` holding the required keys and `body`.
    fn load_body(dir: &Path, body: &str) -> Result<(PathBuf, CloudConfig), String> {
        let path = dir.join("cloud.json5");
        std::fs::write(
            &path,
            format!("{{schema: 's.json5', data_dir: 'd', {body}}}"),
        )
        .unwrap();
        CloudFile::load(&path)
    }

    #[test]
    fn the_defaults_are_valid() {
        let c = CloudConfig::new("data");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.mqtt.request_queue, 4096);
        assert_eq!(c.startup_prompts.per_tick, 256);
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let mut c = CloudConfig::new("data");
        c.mqtt.request_queue = 1;
        assert!(c.validate().unwrap_err().contains("request_queue"));
        let mut c = CloudConfig::new("data");
        c.sync_store_jobs = 0;
        assert!(c.validate().is_err());
        let mut c = CloudConfig::new("data");
        c.startup_prompts.tick = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_file_sets_the_limits_and_quotas_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let load = |body: &str| load_body(dir.path(), body);
        let c = load("").unwrap().1;
        assert_eq!(
            (c.sync.device_rate, c.api_rate, c.quotas),
            (
                RateLimit {
                    per_sec: 50,
                    burst: 100
                },
                RateLimit {
                    per_sec: 100,
                    burst: 200
                },
                DeviceQuotas {
                    max_item_bytes: 65_536,
                    max_rows: 100_000,
                    max_bytes: 256 * 1024 * 1024,
                    max_conflicts: 1000
                }
            ),
            "the documented defaults"
        );
        assert_eq!(c.sync.max_push_changes, 1000);
        let c = load(
            "device_messages_per_sec: 5, device_message_burst: 7, max_push_changes: 20, \
             max_item_bytes: 1000, max_rows_per_device: 3, max_bytes_per_device: 4000, \
             max_conflicts_per_device: 9, api_requests_per_sec: 2, api_request_burst: 4, \
             node_name: 'eu-1', max_drift_ms: 5000, sync_store_jobs: 256, store_group_max: 1",
        )
        .unwrap()
        .1;
        assert_eq!((c.node_name.as_str(), c.sync.max_drift_ms), ("eu-1", 5000));
        assert_eq!((c.sync_store_jobs, c.store_group_max), (256, 1));
        assert_eq!(
            c.sync.device_rate,
            RateLimit {
                per_sec: 5,
                burst: 7
            }
        );
        assert_eq!(c.sync.max_push_changes, 20);
        assert_eq!(
            c.quotas,
            DeviceQuotas {
                max_item_bytes: 1000,
                max_rows: 3,
                max_bytes: 4000,
                max_conflicts: 9
            }
        );
        assert_eq!(
            c.api_rate,
            RateLimit {
                per_sec: 2,
                burst: 4
            }
        );
        for (bad, says) in [
            ("max_push_changes: 0", "max_push_changes"),
            ("max_push_changes: 5000", "max_push_changes"),
            ("max_item_bytes: 1000000", "max_item_bytes"),
            ("device_message_burst: 0", "device_message_burst"),
            ("api_request_burst: 0", "api_request_burst"),
        ] {
            let e = load(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // A rate of 0 turns the limit off; its burst then does not matter.
        assert!(load("api_requests_per_sec: 0, api_request_burst: 0").is_ok());
    }

    #[test]
    fn retention_batch_bounds_both_retention_passes_and_is_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let load = |body: &str| load_body(dir.path(), body);
        let c = load("").unwrap().1;
        assert_eq!(
            (c.retention.batch, c.changes.retention.batch),
            (1000, 1000),
            "the documented default"
        );
        let c = load("retention_batch: 50, max_conflicts: 7").unwrap().1;
        assert_eq!((c.retention.batch, c.changes.retention.batch), (50, 50));
        assert_eq!(c.retention.max_conflicts, 7);
        let e = load("retention_batch: 0").unwrap_err();
        assert!(e.contains("retention_batch"), "{e}");
    }

    #[test]
    fn fanout_batch_is_read_and_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let load = |body: &str| load_body(dir.path(), body);
        assert_eq!(
            load("").unwrap().1.fanout_batch,
            500,
            "the documented default"
        );
        assert_eq!(load("fanout_batch: 7").unwrap().1.fanout_batch, 7);
        let e = load("fanout_batch: 0").unwrap_err();
        assert!(e.contains("fanout_batch"), "{e}");
    }

    #[test]
    fn the_file_sets_the_change_log_and_webhook_limits_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let load = |body: &str| load_body(dir.path(), body);
        let c = load("").unwrap().1.changes;
        assert_eq!(c, ChangesConfig::default(), "the documented defaults");
        assert_eq!(
            (c.retention.max_age_ms, c.retention.max_per_account),
            (7 * 24 * 3600 * 1000, 1_000_000)
        );
        assert_eq!(
            (c.max_page, c.max_wait, c.webhook_batch),
            (1000, Duration::from_secs(60), 100)
        );
        let c = load(
            "changes_retention_hours: 2, changes_max_per_account: 50, changes_max_page: 10, \
             changes_max_scan: 20, changes_max_wait_secs: 3, changes_max_readers: 4, \
             changes_keepalive_secs: 5, changes_read_interval_ms: 6, webhooks_per_account: 7, \
             webhook_batch: 8, webhook_max_body_bytes: 9000, webhook_timeout_secs: 10, \
             webhook_retry_min_ms: 11, webhook_retry_max_ms: 12, webhook_in_flight: 13, \
             webhook_ca: 'ca.pem'",
        )
        .unwrap()
        .1
        .changes;
        assert_eq!(
            c,
            ChangesConfig {
                retention: ChangeRetention {
                    max_age_ms: 2 * 3600 * 1000,
                    max_per_account: 50,
                    batch: 1000,
                },
                max_page: 10,
                max_scan: 20,
                max_wait: Duration::from_secs(3),
                max_readers: 4,
                keepalive: Duration::from_secs(5),
                read_interval: Duration::from_millis(6),
                webhooks_per_account: 7,
                webhook_batch: 8,
                webhook_max_body_bytes: 9000,
                webhook_timeout: Duration::from_secs(10),
                webhook_retry_min: Duration::from_millis(11),
                webhook_retry_max: Duration::from_millis(12),
                webhook_in_flight: 13,
                webhook_ca: Some(dir.path().join("ca.pem")),
            }
        );
        assert_eq!(
            load("changes_retention_secs: 30")
                .unwrap()
                .1
                .changes
                .retention
                .max_age_ms,
            30_000
        );
        for (bad, says) in [
            ("changes_max_page: 0", "changes_max_page"),
            ("webhook_batch: 0", "webhook_batch"),
            (
                "webhook_retry_min_ms: 500, webhook_retry_max_ms: 100",
                "webhook_retry",
            ),
            ("changes_keepalive_secs: 0", "changes_keepalive_secs"),
        ] {
            let e = load(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_file_sets_tls_on_every_hop() {
        let dir = tempfile::tempdir().unwrap();
        let load = |body: &str| load_body(dir.path(), body);
        let c = load(
            "api_tls: {cert: 'a.pem', key: 'a.key'}, \
             embedded_broker_tls: {listen: '127.0.0.1:8883', cert: 'b.pem', key: 'b.key'}",
        )
        .unwrap()
        .1;
        assert_eq!(c.api_tls.unwrap().cert, dir.path().join("a.pem"));
        assert!(
            !c.broker_plain,
            "a TLS listener alone replaces the clear-text one"
        );
        assert_eq!(c.broker_tls.unwrap().files.key, dir.path().join("b.key"));
        let c = load(
            "embedded_broker: '127.0.0.1:1883', \
             embedded_broker_tls: {listen: '127.0.0.1:8883', cert: 'b.pem', key: 'b.key'}",
        )
        .unwrap()
        .1;
        assert!(c.broker_plain && c.broker_tls.is_some());
        let c = load("").unwrap().1;
        assert!(c.broker_plain && c.broker_tls.is_none() && c.api_tls.is_none());
        let c =
            load("external_broker: 'mqtts://b.example:8883', external_broker_tls: {ca: 'ca.pem'}")
                .unwrap()
                .1;
        assert_eq!(c.external_tls.unwrap().ca_file, dir.path().join("ca.pem"));
        assert!(matches!(c.broker, BrokerMode::External { port: 8883, .. }));
        assert!(load("external_broker: 'mqtts://b:8883'").is_err());
        assert!(load("external_broker: 'mqtt://b:1883', external_broker_tls: {ca: 'x'}").is_err());
        // The cloud's own client certificate, for a broker that authenticates it by certificate.
        let c = load(
            "external_broker: 'mqtts://b:8883', \
             external_broker_tls: {ca: 'ca.pem', client_cert: 'c.pem', client_key: 'c.key'}",
        )
        .unwrap()
        .1;
        let id = c.external_tls.unwrap().identity.unwrap();
        assert_eq!(
            (id.cert, id.key),
            (dir.path().join("c.pem"), dir.path().join("c.key"))
        );
        let half = load(
            "external_broker: 'mqtts://b:8883', external_broker_tls: {ca: 'ca.pem', client_cert: 'c.pem'}",
        )
        .unwrap_err();
        assert!(half.contains("client_key"), "{half}");
        assert!(load("external_broker: 'b:1883'")
            .unwrap()
            .1
            .external_tls
            .is_none());
        // The nodes of a broker cluster: the first in the broker mode, the others after it.
        let c = load(
            "external_brokers: ['mqtts://a:8883', 'b:8884', 'mqtts://c:8885'], \
             external_broker_tls: {ca: 'ca.pem'}",
        )
        .unwrap()
        .1;
        assert!(matches!(&c.broker, BrokerMode::External { host, port: 8883, .. } if host == "a"));
        assert_eq!(
            c.mqtt.external_fallbacks,
            [("b".to_string(), 8884), ("c".to_string(), 8885)]
        );
        assert!(c.external_tls.is_some());
        assert!(load("external_broker: 'b:1883'")
            .unwrap()
            .1
            .mqtt
            .external_fallbacks
            .is_empty());
        assert_eq!(
            load("external_broker: 'a:1,b:2'")
                .unwrap()
                .1
                .mqtt
                .external_fallbacks,
            [("b".to_string(), 2)],
            "commas separate addresses"
        );
        for (bad, says) in [
            ("external_broker: []", "no address"),
            ("external_broker: ['a:1', 'a:1']", "listed twice"),
            ("external_broker: ['mqtt://a:1', 'mqtts://b:2']", "mixes"),
            ("external_broker: ['a:1', 'ws://b:2']", "not mqtt or mqtts"),
            ("external_broker: ['a:1', ':2']", "host:port"),
            (
                "external_broker: ['a:1', 'mqtts://b:2']",
                "external_broker_tls",
            ),
        ] {
            let err = load(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many: Vec<String> = (0..=MAX_EXTERNAL_BROKERS)
            .map(|i| format!("'h{i}:1'"))
            .collect();
        assert!(load(&format!("external_broker: [{}]", many.join(",")))
            .unwrap_err()
            .contains("more than"));
    }

    #[test]
    fn the_file_sets_the_device_certificate_listener() {
        let dir = tempfile::tempdir().unwrap();
        let load = |body: &str| load_body(dir.path(), body);
        let tls = "embedded_broker_tls: {listen: '127.0.0.1:8883', cert: 'b.pem', key: 'b.key'}";
        let c = load(&format!(
            "{tls}, device_certificates: {{listen: '127.0.0.1:8884', validity_days: 7}}"
        ))
        .unwrap()
        .1;
        let certs = c.device_certificates.unwrap();
        assert_eq!(certs.listen, "127.0.0.1:8884".parse().unwrap());
        assert_eq!(certs.validity_days, 7);
        let c = load(&format!(
            "{tls}, device_certificates: {{listen: '127.0.0.1:8884'}}"
        ))
        .unwrap()
        .1;
        assert_eq!(
            c.device_certificates.unwrap().validity_days,
            crate::ca::DEFAULT_VALIDITY_DAYS
        );
        // Without the TLS listener (whose certificate it serves with), with an external broker,
        // or with a validity out of range: refused, saying why.
        let err = load("device_certificates: {listen: '127.0.0.1:8884'}").unwrap_err();
        assert!(err.contains("embedded_broker_tls"), "{err}");
        let err =
            load("external_broker: 'b:1883', device_certificates: {listen: '127.0.0.1:8884'}")
                .unwrap_err();
        assert!(err.contains("embedded broker"), "{err}");
        let err = load(&format!(
            "{tls}, device_certificates: {{listen: '127.0.0.1:8884', validity_days: 0}}"
        ))
        .unwrap_err();
        assert!(err.contains("validity"), "{err}");
        assert!(load("device_certificates: {listen: '127.0.0.1:8884', ca: 'x'}").is_err());
    }

    #[test]
    fn the_file_sets_the_embedded_brokers_limits_and_refuses_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load_body(dir.path(), text).map(|(_, c)| c);
        let c = load("").unwrap();
        assert_eq!(c.broker_limits, crate::broker::BrokerLimits::default());
        let c = load(
            "embedded_broker_limits: {max_device_messages_waiting: 4, max_inflight: 8, \
             max_queued_messages: 50, max_connections: 2000, max_packet_bytes: 65536}",
        )
        .unwrap();
        let l = c.broker_limits;
        assert_eq!(
            (
                l.max_device_messages_waiting,
                l.max_inflight,
                l.max_queued_messages,
                l.max_connections,
                l.max_packet_bytes
            ),
            (4, 8, 50, 2000, 65536)
        );
        // Keys left out keep their defaults.
        let c = load("embedded_broker_limits: {max_inflight: 2}").unwrap();
        assert_eq!(c.broker_limits.max_inflight, 2);
        assert_eq!(
            c.broker_limits.max_queued_messages,
            crate::broker::DEFAULT_MAX_QUEUED_MESSAGES
        );
        for (bad, named) in [
            (
                "{max_device_messages_waiting: 0}",
                "max_device_messages_waiting",
            ),
            ("{max_packet_bytes: 100}", "max_packet_bytes"),
            ("{max_inflight: 0}", "max_inflight"),
            ("{max_queud_messages: 5}", "max_queud_messages"),
        ] {
            let err = load(&format!("embedded_broker_limits: {bad}")).unwrap_err();
            assert!(err.contains(named), "{bad}: {err}");
        }
        let err = load(
            "external_broker: 'mqtt://127.0.0.1:1883', embedded_broker_limits: {max_inflight: 2}",
        )
        .unwrap_err();
        assert!(err.contains("external broker"), "{err}");
    }

    #[test]
    fn the_file_sets_the_sync_engine_limits_and_refuses_them_out_of_range_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load_body(dir.path(), text).map(|(_, c)| c);
        let defaults = devtables_sync::cloud::CloudEngineConfig::default();
        let c = load(
            "sync_engine: {max_sessions: 20000, feed_window: 4, feed_page_changes: 100, \
             snapshot_page_items: 50, ack_timeout_ms: 2000, ack_timeout_max_ms: 30000, \
             max_page_retries: 3, max_pushes_in_progress: 8, max_covered_changes: 0, \
             remembered_answers: 64, busy_retry_ms: 500, prompt_interval_ms: 10000}",
        )
        .unwrap();
        let e = &c.sync;
        assert_eq!(
            (
                e.max_sessions,
                e.feed_window,
                e.feed_page_changes,
                e.snapshot_page_items,
                e.ack_timeout_ms,
                e.ack_timeout_max_ms
            ),
            (20_000, 4, 100, 50, 2000, 30_000)
        );
        assert_eq!(
            (
                e.max_page_retries,
                e.max_pushes_in_progress,
                e.max_covered_changes,
                e.remembered_answers,
                e.busy_retry_ms,
                e.prompt_interval_ms
            ),
            (3, 8, 0, 64, 500, 10_000)
        );
        // Keys left out keep their defaults.
        let c = load("sync_engine: {feed_window: 3}").unwrap();
        assert_eq!(c.sync.feed_window, 3);
        assert_eq!(c.sync.max_sessions, defaults.max_sessions);
        assert_eq!(c.sync.remembered_answers, defaults.remembered_answers);
        for (bad, named) in [
            ("{max_sessions: 0}", "sync_engine.max_sessions"),
            ("{feed_window: 65}", "sync_engine.feed_window"),
            ("{feed_page_changes: 1001}", "sync_engine.feed_page_changes"),
            ("{ack_timeout_ms: 90000}", "sync_engine.ack_timeout_ms"),
            (
                "{max_pushes_in_progress: 0}",
                "sync_engine.max_pushes_in_progress",
            ),
            (
                "{remembered_answers: 5000}",
                "sync_engine.remembered_answers",
            ),
            ("{max_sesions: 5}", "max_sesions"),
        ] {
            let err = load(&format!("sync_engine: {bad}")).unwrap_err();
            assert!(err.contains(named), "{bad}: {err}");
        }
    }

    #[test]
    fn the_file_sets_the_brokers_keep_alive_within_what_mqtt_can_say() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load_body(dir.path(), text).map(|(_, c)| c);
        assert_eq!(load("").unwrap().mqtt.keep_alive, Duration::from_secs(30));
        let c =
            load("mqtt_keep_alive_secs: 120, mqtt_subscribe_give_up_secs: 60, mqtt_probe_secs: 0")
                .unwrap();
        assert_eq!(c.mqtt.probe_interval, Duration::ZERO);
        let err = load("mqtt_probe_secs: 3601").unwrap_err();
        assert!(err.contains("mqtt_probe_secs"), "{err}");
        assert_eq!(c.mqtt.keep_alive, Duration::from_secs(120));
        assert_eq!(c.mqtt.subscribe_give_up, Duration::from_secs(60));
        for bad in [0, 65_536] {
            let err = load(&format!("mqtt_keep_alive_secs: {bad}")).unwrap_err();
            assert!(err.contains("mqtt_keep_alive_secs"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_file_sets_the_queue_and_the_pacing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.json5");
        std::fs::write(
            &path,
            "{schema: 's.json5', data_dir: 'd', mqtt_request_queue: 64, \
             startup_prompts_per_tick: 10, startup_prompt_tick_ms: 50}",
        )
        .unwrap();
        let (_, c) = CloudFile::load(&path).unwrap();
        assert_eq!(c.mqtt.request_queue, 64);
        assert_eq!(c.startup_prompts.per_tick, 10);
        assert_eq!(c.startup_prompts.tick, Duration::from_millis(50));
        assert!(
            !c.insecure_no_auth,
            "the API requires keys unless the file says otherwise"
        );
        std::fs::write(
            &path,
            "{schema: 's.json5', data_dir: 'd', insecure_no_auth: true}",
        )
        .unwrap();
        assert!(CloudFile::load(&path).unwrap().1.insecure_no_auth);
        assert!(
            !c.metrics_open,
            "/metrics needs a key unless the file says otherwise"
        );
        std::fs::write(
            &path,
            "{schema: 's.json5', data_dir: 'd', metrics_open: true}",
        )
        .unwrap();
        assert!(CloudFile::load(&path).unwrap().1.metrics_open);
        std::fs::write(
            &path,
            "{schema: 's.json5', data_dir: 'd', mqtt_request_queue: 0}",
        )
        .unwrap();
        assert!(CloudFile::load(&path)
            .unwrap_err()
            .contains("request_queue"));
    }

    #[test]
    fn the_file_sets_the_broker_clients_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.json5");
        std::fs::write(&path, "{schema: 's.json5', data_dir: 'd'}").unwrap();
        let (_, c) = CloudFile::load(&path).unwrap();
        assert_eq!((c.mqtt.ingress_clients, c.mqtt.egress_clients), (1, 1));
        std::fs::write(
            &path,
            "{schema: 's.json5', data_dir: 'd', mqtt_ingress_clients: 3, mqtt_egress_clients: 16}",
        )
        .unwrap();
        let (_, c) = CloudFile::load(&path).unwrap();
        assert_eq!((c.mqtt.ingress_clients, c.mqtt.egress_clients), (3, 16));
        for bad in ["mqtt_ingress_clients: 0", "mqtt_egress_clients: 17"] {
            std::fs::write(
                &path,
                format!("{{schema: 's.json5', data_dir: 'd', {bad}}}"),
            )
            .unwrap();
            let e = CloudFile::load(&path).unwrap_err();
            assert!(e.contains(bad.split(':').next().unwrap()), "{e}");
        }
    }
}
