//! The agent's settings. Every limit is here, with its default; the standalone agent reads them
//! from a JSON5 file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devtables_db::{DbOptions, Durability};
use devtables_sync::device::DeviceConfig;
use serde::Deserialize;

use crate::changelog::ChangeLogLimits;
use crate::{AgentError, LocalApiConfig};

/// Settings of one agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub account: String,
    pub device: String,
    /// The device's secret, issued by the cloud when the device was registered. Empty: none,
    /// which needs a client certificate (`tls.identity`) on the cloud's device-certificate
    /// listener instead.
    pub secret: String,
    /// The broker's first address.
    pub broker_host: String,
    pub broker_port: u16,
    /// Further addresses of the same broker (the other nodes of a broker cluster), tried in
    /// turn after `broker_host:broker_port`: every failed attempt and every lost connection
    /// moves to the next address, round the list, after the usual backoff wait. Default none.
    /// The status ([`crate::AgentStatus::broker`]) and the log say which address is in use.
    pub broker_fallbacks: Vec<BrokerAddress>,
    /// TLS to the broker, with the device's client certificate when `identity` is set (mutual
    /// TLS). Default `None`: clear-text MQTT, which the agent warns about at start (`MQTT to
    /// HOST:PORT is in clear text`).
    pub tls: Option<crate::tls::ClientTls>,
    /// First segment of every topic; must match the cloud's.
    pub topic_prefix: String,
    pub db_path: PathBuf,
    /// Hold the database in memory instead of at `db_path` (which is then unused): nothing
    /// survives the agent. Default false. For simulations and tests; a device that must keep
    /// its outbox across a restart needs the file.
    pub db_in_memory: bool,
    pub durability: Durability,
    /// Open the database even when the schema differs from the one it was written with in
    /// ways its items may not survive ([`DbOptions::allow_schema_change`]). Default false.
    pub allow_schema_change: bool,
    /// Most unacknowledged local changes (one per item key); see [`crate::OutboxFull`].
    pub outbox_limit: u64,
    /// Name of the command model.
    pub command_model: String,
    pub keep_alive: Duration,
    /// First wait before reconnecting after a lost connection or a failed attempt. Each
    /// further failed attempt doubles it, up to [`Self::reconnect_max_delay`]; every wait is
    /// drawn at random between half of that and all of it, so a fleet that lost its broker at
    /// once (a cloud restart) does not come back in step. A CONNACK resets it. Default 500 ms.
    pub reconnect_delay: Duration,
    /// Longest wait between reconnect attempts. Default 15 s.
    pub reconnect_max_delay: Duration,
    /// How long a connection may go without the device's subscription granted, over at least
    /// three refused or unanswered SUBSCRIBEs, before it is given up for the next broker
    /// address (`AgentStatus::subscriptions_abandoned`). Default 20 s: a cluster node electing
    /// leaders refuses for seconds; one that still refuses after this is left for another.
    ///
    /// It also bounds how long a connection whose subscription was granted may stay deaf: no
    /// answer of the cloud (a welcome, an acknowledgement, a feed page, a busy refusal) heard
    /// that long while the session waits for one (its hello, or pushes in flight), it is given
    /// up the same way (`AgentStatus::deaf_connections`): a cluster node may grant a
    /// subscription it cannot deliver to while it elects leaders. A cloud that is down answers
    /// on no connection, so each further deaf connection in a row waits twice as long (up to 32
    /// times this) before it is left.
    pub subscribe_give_up: Duration,
    /// Most MQTT requests queued toward the client's event loop. Default 1024. A publish that
    /// finds it full is dropped, counted (`AgentStatus::publish_dropped`) and logged; the
    /// protocol retransmits it.
    pub mqtt_queue: usize,
    /// Most notifications (committed local changes, arrived commands) waiting for the agent's
    /// event loop. Default 4096. The database's commit hook never blocks on it: when it is full
    /// the notification is counted (`AgentStatus::inputs_missed`) and the event loop reloads the
    /// durable outbox and the pending commands instead, so a miss only delays a send.
    pub input_queue: usize,
    /// Attempts to write a command's result back to its item before giving up (the command
    /// then stays `pending` and runs again after a restart). Default 8.
    pub command_result_attempts: u32,
    /// Wait before the first retry of a failed result write; doubles per attempt up to 30 s.
    /// Default 200 ms.
    pub command_result_backoff: Duration,
    /// Most command results waiting for a retry. Default 256; beyond it a failed result write
    /// is given up at once (counted, logged; the command runs again after a restart).
    pub max_result_retries: usize,
    /// Tombstone versions (the version of a deleted key) older than this are forgotten. Default
    /// 30 days, the cloud's default tombstone retention: after it the cloud itself no longer
    /// remembers the delete.
    pub tombstone_retention: Duration,
    /// Pause between two passes of the version collection. Default 10 minutes.
    pub version_gc_interval: Duration,
    /// Most versions examined per transaction of the version collection. Default 1000: a slice
    /// holds the database's write lock for a few milliseconds only.
    pub version_gc_slice: usize,
    /// Keep the local change log (every committed change under a local sequence number, in a
    /// side table: see [`crate::changelog`]) within these limits. Default `None`: not kept. The
    /// local API needs it ([`crate::LocalApiConfig::prepare_agent`] sets it).
    pub change_log: Option<ChangeLogLimits>,
    /// A command that arrives with no handler registered for its name stays `pending`, for an
    /// application to take through the local API (or for a handler registered later), instead
    /// of being answered `failed` ("no handler") at once. Default false; the local API sets it.
    pub hold_unhandled_commands: bool,
    /// Protocol limits and timings (batching, retransmits).
    pub sync: DeviceConfig,
}

impl AgentConfig {
    pub fn new(account: &str, device: &str, secret: &str, db_path: impl Into<PathBuf>) -> Self {
        AgentConfig {
            account: account.into(),
            device: device.into(),
            secret: secret.into(),
            broker_host: "127.0.0.1".into(),
            broker_port: 1883,
            broker_fallbacks: Vec::new(),
            tls: None,
            topic_prefix: devtables_sync::topics::DEFAULT_PREFIX.into(),
            db_path: db_path.into(),
            db_in_memory: false,
            durability: Durability::Immediate,
            allow_schema_change: false,
            outbox_limit: 100_000,
            command_model: "Command".into(),
            keep_alive: Duration::from_secs(30),
            reconnect_delay: Duration::from_millis(500),
            reconnect_max_delay: Duration::from_secs(15),
            subscribe_give_up: Duration::from_secs(20),
            mqtt_queue: 1024,
            input_queue: 4096,
            command_result_attempts: 8,
            command_result_backoff: Duration::from_millis(200),
            max_result_retries: 256,
            tombstone_retention: Duration::from_secs(30 * 24 * 3600),
            version_gc_interval: Duration::from_secs(600),
            version_gc_slice: 1000,
            change_log: None,
            hold_unhandled_commands: false,
            sync: DeviceConfig::default(),
        }
    }

    /// Every address of the broker, in the order they are tried: `broker_host:broker_port`,
    /// then [`Self::broker_fallbacks`].
    pub fn broker_addresses(&self) -> Vec<BrokerAddress> {
        let first = BrokerAddress {
            host: self.broker_host.clone(),
            port: self.broker_port,
        };
        std::iter::once(first)
            .chain(self.broker_fallbacks.iter().cloned())
            .collect()
    }

    /// Sets the broker's addresses (the first, then the fallbacks) from a parsed list.
    pub fn set_broker_addresses(&mut self, list: &BrokerList) {
        let mut addresses = list.addresses.iter().cloned();
        if let Some(first) = addresses.next() {
            self.broker_host = first.host;
            self.broker_port = first.port;
        }
        self.broker_fallbacks = addresses.collect();
    }

    /// How the device proves who it is: its secret, its client certificate, or both. Neither is
    /// a configuration error (the broker would refuse every connection).
    pub(crate) fn credentials(&self) -> Result<(Option<&str>, bool), AgentError> {
        let secret = (!self.secret.is_empty()).then_some(self.secret.as_str());
        let certificate = self.tls.as_ref().is_some_and(|t| t.identity.is_some());
        if secret.is_none() && !certificate {
            return Err(AgentError::Config(
                "the device has no credentials: set its secret, or a client certificate \
                 (tls: {client_cert, client_key}) for the cloud's device-certificate listener"
                    .into(),
            ));
        }
        Ok((secret, certificate))
    }

    /// The options [`crate::Agent::start`] opens the database with.
    pub fn db_options(&self) -> DbOptions {
        DbOptions {
            durability: self.durability,
            allow_schema_change: self.allow_schema_change,
            ..DbOptions::default()
        }
    }
}

/// The standalone agent's configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct AgentFile {
    pub account: String,
    pub device: String,
    /// The device's secret; may be left out when `tls` gives a client certificate.
    #[serde(default)]
    pub secret: Option<String>,
    /// The schema file (JSON5), relative to the config file.
    pub schema: PathBuf,
    /// The database file, relative to the config file.
    pub db: PathBuf,
    /// `mqtts://host:port` (TLS; needs `tls.ca`), `mqtt://host:port` or a bare `host:port`
    /// (clear text, unless a `tls` block is given). Default `127.0.0.1:1883`. A list of them
    /// (`broker: ['mqtts://a:8883', 'mqtts://b:8883']`, also spelt `brokers`, or one string
    /// with commas between the addresses) names the nodes of a broker cluster: the agent moves to the next one whenever an attempt fails or the
    /// connection is lost (see [`AgentConfig::broker_fallbacks`]).
    #[serde(default = "default_broker", alias = "brokers")]
    pub broker: BrokerSetting,
    /// TLS to the broker: `{ca: "ca.pem", server_name: "broker.example", client_cert:
    /// "device.pem", client_key: "device.key"}`; paths are relative to the config file,
    /// `server_name` defaults to the broker host, the client certificate (both files or neither)
    /// is the one the cloud issued at registration (mutual TLS).
    #[serde(default)]
    pub tls: Option<TlsFile>,
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// `immediate` (default) or `periodic`.
    #[serde(default)]
    pub durability: Option<String>,
    #[serde(default)]
    pub periodic_flush_ms: Option<u64>,
    #[serde(default)]
    pub outbox_limit: Option<u64>,
    /// Accept a schema change the database file would refuse (see
    /// [`AgentConfig::allow_schema_change`]).
    #[serde(default)]
    pub allow_schema_change: bool,
    #[serde(default)]
    pub batch_delay_ms: Option<u64>,
    /// First retransmit timeout of an unacknowledged push, in ms (default 1000).
    #[serde(default)]
    pub retransmit_base_ms: Option<u64>,
    /// Longest retransmit timeout, in ms (default 30 000): the exponential backoff stops here.
    #[serde(default)]
    pub retransmit_max_ms: Option<u64>,
    #[serde(default)]
    pub command_model: Option<String>,
    /// MQTT keep-alive in seconds (default 30; 0 turns it off): a dead connection that sends
    /// no error (a half-open one) is noticed after one to two of these.
    #[serde(default)]
    pub keep_alive_secs: Option<u64>,
    /// First wait before a reconnect, in ms (default 500); doubled per failed attempt, with
    /// jitter (see [`AgentConfig::reconnect_delay`]).
    #[serde(default)]
    pub reconnect_delay_ms: Option<u64>,
    /// Longest wait between reconnect attempts, in ms (default 15 000).
    #[serde(default)]
    pub reconnect_max_delay_ms: Option<u64>,
    /// See [`AgentConfig::subscribe_give_up`], in ms (default 20 000).
    #[serde(default)]
    pub subscribe_give_up_ms: Option<u64>,
    /// See [`AgentConfig::input_queue`].
    #[serde(default)]
    pub input_queue: Option<usize>,
    /// See [`AgentConfig::tombstone_retention`], in hours.
    #[serde(default)]
    pub tombstone_retention_hours: Option<u64>,
    /// The standalone agent in `--stdin` mode: how long the end of its input waits for the
    /// cloud to acknowledge every queued change before the agent stops, in seconds (default 10;
    /// see [`crate::standalone::StandaloneOptions::stdin_drain`]).
    #[serde(default)]
    pub stdin_drain_secs: Option<u64>,
    /// The local API for applications (see [`LocalApiFile`]): on by default, on a Unix socket
    /// next to the database.
    #[serde(default)]
    pub local_api: LocalApiFile,
}

/// The `local_api` block of the agent's file: `{socket: 'gw-1.sock', tcp: '127.0.0.1:7070'}`.
/// Every key is optional; see [`LocalApiConfig`] for the defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LocalApiFile {
    /// Default true; `false` serves nothing (and keeps no change log).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The Unix socket, relative to the config file. Default: the database file with the
    /// extension `.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// See [`LocalApiConfig::socket_group`].
    #[serde(default)]
    pub socket_group: Option<String>,
    /// A loopback `host:port` to serve on as well. Default: none.
    #[serde(default)]
    pub tcp: Option<String>,
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    #[serde(default)]
    pub default_page: Option<usize>,
    #[serde(default)]
    pub max_page: Option<usize>,
    #[serde(default)]
    pub max_wait_secs: Option<u64>,
    #[serde(default)]
    pub command_lease_secs: Option<u64>,
    #[serde(default)]
    pub max_streams: Option<usize>,
    /// See [`ChangeLogLimits::kept`].
    #[serde(default)]
    pub changes_kept: Option<u64>,
    /// See [`ChangeLogLimits::max_bytes`].
    #[serde(default)]
    pub changes_max_bytes: Option<u64>,
}

impl AgentFile {
    /// The command line's local API options over the file's: `--local-api-socket PATH`
    /// (relative to the working directory), `--local-api-tcp ADDR`, `--no-local-api`.
    pub fn override_local_api(&mut self, socket: Option<PathBuf>, tcp: Option<String>, off: bool) {
        if off {
            self.local_api.enabled = Some(false);
        }
        if socket.is_some() {
            self.local_api.socket = socket;
        }
        if tcp.is_some() {
            self.local_api.tcp = tcp;
        }
    }

    /// The local API's settings, `None` when it is turned off. The socket defaults to the
    /// database file (as it is now: after a `--db` override) with the extension `.sock`.
    pub fn local_api_config(&self) -> Result<Option<LocalApiConfig>, AgentError> {
        let f = &self.local_api;
        if f.enabled == Some(false) {
            return Ok(None);
        }
        let socket = match &f.socket {
            Some(socket) => socket.clone(),
            None => {
                let socket = self.db.with_extension("sock");
                if f.tcp.is_none() && socket.as_os_str().len() > crate::local_api::MAX_SOCKET_PATH {
                    // Only the default is too long: the agent runs as it did before the local
                    // API, and says how to have it.
                    tracing::warn!(
                        socket = %socket.display(),
                        "no local API: the default socket path (the database file with .sock) is \
                         longer than a Unix socket path may be; set local_api.socket to a \
                         shorter path to have it"
                    );
                    return Ok(None);
                }
                socket
            }
        };
        let mut c = LocalApiConfig::new(socket);
        c.socket_group = f.socket_group.clone();
        if let Some(tcp) = &f.tcp {
            c.tcp = Some(tcp.parse().map_err(|_| {
                AgentError::Config(format!(
                    "local_api.tcp {tcp:?} is not an address like 127.0.0.1:7070"
                ))
            })?);
        }
        if let Some(n) = f.max_body_bytes {
            c.max_body_bytes = n;
        }
        if let Some(n) = f.default_page {
            c.default_page = n;
        }
        if let Some(n) = f.max_page {
            c.max_page = n;
            if f.default_page.is_none() {
                c.default_page = c.default_page.min(n);
            }
        }
        if let Some(secs) = f.max_wait_secs {
            c.max_wait = Duration::from_secs(secs);
        }
        if let Some(secs) = f.command_lease_secs {
            c.command_lease = Duration::from_secs(secs);
        }
        if let Some(n) = f.max_streams {
            c.max_streams = n;
        }
        if let Some(n) = f.changes_kept {
            c.change_log.kept = n;
        }
        if let Some(n) = f.changes_max_bytes {
            c.change_log.max_bytes = n;
        }
        c.validate()
            .map_err(|e| AgentError::Config(e.to_string()))?;
        Ok(Some(c))
    }
}

/// The `tls` block of the agent's file (the same format as the cloud's `external_broker_tls`).
pub use devtables_tls::ClientTlsFile as TlsFile;

fn default_broker() -> BrokerSetting {
    BrokerSetting::One("127.0.0.1:1883".into())
}

/// The file's `broker`: one address, or the addresses of a broker cluster.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BrokerSetting {
    One(String),
    Many(Vec<String>),
}

impl BrokerSetting {
    /// The addresses as written.
    pub fn entries(&self) -> Vec<&str> {
        match self {
            // Commas separate addresses here too, as on the command line (`--mqtt a:1,b:1`).
            BrokerSetting::One(s) => s.split(',').map(str::trim).collect(),
            BrokerSetting::Many(list) => list.iter().map(String::as_str).collect(),
        }
    }
}

/// Most addresses a broker list may hold: a broker cluster has a handful of nodes, and a
/// device tries them in turn.
pub const MAX_BROKER_ADDRESSES: usize = 16;

/// One address of the broker.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Whether a broker list asked for TLS (`mqtts://`), clear text (`mqtt://`), or left it to the
/// `tls` block (bare `host:port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerScheme {
    Tls,
    Clear,
    Unsaid,
}

/// A parsed broker list: the addresses in order, and the one scheme they share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerList {
    pub addresses: Vec<BrokerAddress>,
    pub scheme: BrokerScheme,
}

/// Parses a broker list (each entry as [`parse_broker`] takes it). Refused: an empty list, more
/// than [`MAX_BROKER_ADDRESSES`], an address listed twice, and `mqtt://` mixed with `mqtts://`
/// (one TLS setting serves every address).
pub fn parse_broker_list<'a>(
    entries: impl IntoIterator<Item = &'a str>,
) -> Result<BrokerList, AgentError> {
    let mut addresses: Vec<BrokerAddress> = Vec::new();
    let mut scheme = BrokerScheme::Unsaid;
    for entry in entries {
        if addresses.len() == MAX_BROKER_ADDRESSES {
            return Err(AgentError::Config(format!(
                "the broker list holds more than {MAX_BROKER_ADDRESSES} addresses"
            )));
        }
        let (host, port) = parse_broker(entry)?;
        let this = match entry.split_once("://").map(|(s, _)| s) {
            Some("mqtts") => BrokerScheme::Tls,
            Some(_) => BrokerScheme::Clear,
            None => BrokerScheme::Unsaid,
        };
        scheme = match (scheme, this) {
            (BrokerScheme::Unsaid, s) | (s, BrokerScheme::Unsaid) => s,
            (a, b) if a == b => a,
            _ => {
                return Err(AgentError::Config(format!(
                    "broker {entry:?}: the list mixes mqtt:// and mqtts://; one TLS setting \
                     serves every address"
                )))
            }
        };
        let address = BrokerAddress { host, port };
        if addresses.contains(&address) {
            return Err(AgentError::Config(format!(
                "broker {address} is listed twice"
            )));
        }
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(AgentError::Config(
            "the broker list is empty: give at least one address".into(),
        ));
    }
    Ok(BrokerList { addresses, scheme })
}

impl AgentFile {
    /// Reads the file; relative paths in it are resolved against its folder.
    pub fn load(path: &Path) -> Result<(AgentFile, AgentConfig), AgentError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentError::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut file: AgentFile = json5::from_str(&text)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        file.schema = dir.join(&file.schema);
        file.db = dir.join(&file.db);
        if let Some(socket) = &file.local_api.socket {
            file.local_api.socket = Some(dir.join(socket));
        }
        let brokers = parse_broker_list(file.broker.entries())?;
        let secret = file.secret.clone().unwrap_or_default();
        let mut config = AgentConfig::new(&file.account, &file.device, &secret, file.db.clone());
        config.set_broker_addresses(&brokers);
        config.tls = match (brokers.scheme, &file.tls) {
            (BrokerScheme::Clear, Some(_)) => {
                return Err(AgentError::Config(
                    "broker is mqtt:// (clear text) but a tls block is set: use mqtts://".into(),
                ))
            }
            (BrokerScheme::Tls, None) => {
                return Err(AgentError::Config(
                    "broker is mqtts:// but no tls block gives the CA file (tls: {ca: ...})".into(),
                ))
            }
            (_, Some(tls)) => Some(
                tls.resolve(dir)
                    .map_err(|e| AgentError::Config(format!("tls: {e}")))?,
            ),
            (_, None) => None,
        };
        config.credentials()?;
        if let Some(p) = &file.topic_prefix {
            config.topic_prefix = p.clone();
        }
        config.durability = match file.durability.as_deref() {
            None | Some("immediate") => Durability::Immediate,
            Some("periodic") => Durability::Periodic {
                interval: Duration::from_millis(file.periodic_flush_ms.unwrap_or(100)),
            },
            Some(other) => {
                return Err(AgentError::Config(format!(
                    "durability must be 'immediate' or 'periodic', not {other:?}"
                )))
            }
        };
        if let Some(n) = file.outbox_limit {
            config.outbox_limit = n;
        }
        config.allow_schema_change = file.allow_schema_change;
        if let Some(ms) = file.retransmit_base_ms {
            config.sync.retransmit_base_ms = ms.max(1);
        }
        if let Some(ms) = file.retransmit_max_ms {
            config.sync.retransmit_max_ms = ms.max(config.sync.retransmit_base_ms);
        }
        if let Some(ms) = file.batch_delay_ms {
            config.sync.batch_delay_ms = ms;
        }
        if let Some(m) = &file.command_model {
            config.command_model = m.clone();
        }
        if let Some(secs) = file.keep_alive_secs {
            config.keep_alive = Duration::from_secs(secs);
        }
        if let Some(ms) = file.reconnect_delay_ms {
            config.reconnect_delay = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = file.reconnect_max_delay_ms {
            config.reconnect_max_delay = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = file.subscribe_give_up_ms {
            config.subscribe_give_up = Duration::from_millis(ms);
        }
        if let Some(n) = file.input_queue {
            config.input_queue = n;
        }
        if let Some(h) = file.tombstone_retention_hours {
            config.tombstone_retention = Duration::from_secs(h.saturating_mul(3600));
        }
        Ok((file, config))
    }
}

/// `host:port` (an `mqtt://` or `mqtts://` prefix is accepted; whether TLS is used is decided
/// by [`AgentFile::load`]).
pub fn parse_broker(s: &str) -> Result<(String, u16), AgentError> {
    let s = match s.split_once("://") {
        Some(("mqtt" | "mqtts", rest)) => rest,
        Some((scheme, _)) => {
            return Err(AgentError::Config(format!(
                "broker scheme {scheme:?} is not mqtt or mqtts"
            )))
        }
        None => s,
    };
    let (host, port) = s
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains(char::is_whitespace))
        .ok_or_else(|| AgentError::Config(format!("broker {s:?} must be host:port")))?;
    let port = port
        .parse()
        .map_err(|_| AgentError::Config(format!("broker port {port:?} is not a number")))?;
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(broker_and_tls: &str) -> Result<AgentConfig, AgentError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json5");
        std::fs::write(
            &path,
            format!("{{account: 'a', device: 'd', secret: 's', schema: 's.json5', db: 'x.db', {broker_and_tls}}}"),
        )
        .unwrap();
        AgentFile::load(&path).map(|(_, c)| c)
    }

    #[test]
    fn the_example_file_loads_with_its_reconnect_waits() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agent.json5");
        let (_, c) = AgentFile::load(&example).unwrap();
        assert_eq!(c.reconnect_delay, Duration::from_millis(500));
        assert_eq!(c.reconnect_max_delay, Duration::from_secs(15));
        assert_eq!(c.subscribe_give_up, Duration::from_secs(20));
        let c = load(
            "broker: 'b:1883', reconnect_delay_ms: 20, reconnect_max_delay_ms: 900, \
             subscribe_give_up_ms: 5000",
        )
        .unwrap();
        assert_eq!(c.subscribe_give_up, Duration::from_secs(5));
        assert_eq!(
            (c.reconnect_delay, c.reconnect_max_delay),
            (Duration::from_millis(20), Duration::from_millis(900))
        );
    }

    #[test]
    fn the_broker_url_chooses_tls_or_clear_text() {
        let c = load("broker: 'mqtts://b.example:8883', tls: {ca: 'ca.pem', server_name: 'b'}")
            .unwrap();
        let tls = c.tls.unwrap();
        assert!(tls.ca_file.ends_with("ca.pem") && tls.ca_file.is_absolute());
        assert_eq!(tls.server_name.as_deref(), Some("b"));
        assert_eq!((c.broker_host.as_str(), c.broker_port), ("b.example", 8883));
        assert!(load("broker: 'b:1883', tls: {ca: 'ca.pem'}")
            .unwrap()
            .tls
            .is_some());
        assert!(load("broker: 'mqtt://b:1883'").unwrap().tls.is_none());
        assert!(load("broker: 'b:1883'").unwrap().tls.is_none());
        assert!(
            load("broker: 'mqtts://b:8883'").is_err(),
            "mqtts needs a CA"
        );
        assert!(load("broker: 'mqtt://b:1883', tls: {ca: 'ca.pem'}").is_err());
        assert!(load("broker: 'http://b:1883'").is_err());
    }

    #[test]
    fn a_broker_list_names_the_nodes_of_a_cluster_in_order() {
        let c = load("broker: ['mqtts://a:8883', 'b:8884', 'mqtts://c:8885'], tls: {ca: 'ca.pem'}")
            .unwrap();
        let said: Vec<String> = c.broker_addresses().iter().map(|a| a.to_string()).collect();
        assert_eq!(said, ["a:8883", "b:8884", "c:8885"]);
        assert_eq!((c.broker_host.as_str(), c.broker_port), ("a", 8883));
        assert!(c.tls.is_some());
        // `brokers` is the same key; the single string still works and has no fallbacks.
        let c = load("brokers: ['x:1', 'y:2']").unwrap();
        assert_eq!(
            c.broker_fallbacks,
            [BrokerAddress {
                host: "y".into(),
                port: 2
            }]
        );
        assert!(c.tls.is_none());
        assert!(load("broker: 'x:1'").unwrap().broker_fallbacks.is_empty());
        let c = load("broker: 'x:1, y:2'").unwrap();
        assert_eq!(c.broker_addresses().len(), 2, "commas separate addresses");
        // Refused, each naming what is wrong.
        let err = |body: &str| load(body).unwrap_err().to_string();
        assert!(err("broker: []").contains("empty"));
        assert!(err("broker: ['a:1', 'a:1']").contains("listed twice"));
        assert!(
            err("broker: ['mqtt://a:1', 'mqtts://b:2'], tls: {ca: 'ca.pem'}").contains("mixes")
        );
        assert!(err("broker: ['mqtts://a:1', 'mqtts://b:2']").contains("tls block"));
        assert!(err("broker: ['a:1', 'b']").contains("host:port"));
        assert!(err("broker: [':1']").contains("host:port"));
        let many: Vec<String> = (0..=MAX_BROKER_ADDRESSES)
            .map(|i| format!("'h{i}:1'"))
            .collect();
        assert!(err(&format!("broker: [{}]", many.join(","))).contains("more than"));
        assert!(
            load("broker: ['a:1'], brokers: ['b:1']").is_err(),
            "one key, two spellings"
        );
    }

    #[test]
    fn a_client_certificate_may_replace_the_secret() {
        let c = load(
            "broker: 'mqtts://b:8884', \
             tls: {ca: 'ca.pem', client_cert: 'd.pem', client_key: 'd.key'}",
        )
        .unwrap();
        let id = c.tls.as_ref().unwrap().identity.clone().unwrap();
        assert!(id.cert.ends_with("d.pem") && id.cert.is_absolute());
        assert!(id.key.ends_with("d.key"));
        // Half an identity is refused, naming what is missing.
        let err = load("broker: 'mqtts://b:8884', tls: {ca: 'ca.pem', client_cert: 'd.pem'}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_key"), "{err}");
    }

    #[test]
    fn the_local_api_is_on_by_default_next_to_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json5");
        let write = |extra: &str| {
            std::fs::write(
                &path,
                format!("{{account: 'a', device: 'd', secret: 's', schema: 's.json5', db: 'data/x.db', {extra}}}"),
            )
            .unwrap();
            let (file, _) = AgentFile::load(&path)?;
            file.local_api_config()
        };
        let c = write("").unwrap().expect("on by default");
        assert_eq!(c.socket, Some(dir.path().join("data/x.sock")));
        assert_eq!(c.tcp, None, "no network listener by default");
        let c = write(
            "local_api: {socket: 'run/app.sock', tcp: '127.0.0.1:7070', command_lease_secs: 2, \
             changes_kept: 50, max_page: 20, socket_group: 'dialout'}",
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.socket, Some(dir.path().join("run/app.sock")));
        assert_eq!(c.tcp, Some("127.0.0.1:7070".parse().unwrap()));
        assert_eq!(c.command_lease, Duration::from_secs(2));
        assert_eq!(c.change_log.kept, 50);
        assert_eq!((c.default_page, c.max_page), (20, 20));
        assert_eq!(c.socket_group.as_deref(), Some("dialout"));
        assert!(write("local_api: {enabled: false}").unwrap().is_none());
        // A default socket path too long for the kernel: no local API, rather than no agent.
        let deep = format!("db: '{}/x.db'", "d".repeat(120));
        std::fs::write(
            &path,
            format!("{{account: 'a', device: 'd', secret: 's', schema: 's.json5', {deep}}}"),
        )
        .unwrap();
        assert!(AgentFile::load(&path)
            .unwrap()
            .0
            .local_api_config()
            .unwrap()
            .is_none());
        let err = write("local_api: {tcp: '0.0.0.0:7070'}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        let err = write("local_api: {tcp: 'localhost'}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1:7070"), "{err}");
        let err = write("local_api: {sockets: 'x'}").unwrap_err().to_string();
        assert!(err.contains("sockets"), "{err}");
    }

    #[test]
    fn a_device_without_secret_or_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json5");
        let write = |body: &str| {
            std::fs::write(
                &path,
                format!("{{account: 'a', device: 'd', schema: 's.json5', db: 'x.db', {body}}}"),
            )
            .unwrap();
            AgentFile::load(&path).map(|(_, c)| c)
        };
        let err = write("broker: 'mqtts://b:8884', tls: {ca: 'ca.pem'}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no credentials"), "{err}");
        let c = write(
            "broker: 'mqtts://b:8884', \
             tls: {ca: 'ca.pem', client_cert: 'd.pem', client_key: 'd.key'}",
        )
        .unwrap();
        assert_eq!(c.credentials().unwrap(), (None, true));
        let c = write("secret: 's', broker: 'b:1883'").unwrap();
        assert_eq!(c.credentials().unwrap(), (Some("s"), false));
    }
}
