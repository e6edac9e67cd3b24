//! The agent's settings. Every limit is here, with its default; the standalone agent reads them
//! from a JSON5 file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devtables_db::{DbOptions, Durability};
use devtables_sync::device::DeviceConfig;
use serde::Deserialize;

use crate::AgentError;

/// Settings of one agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub account: String,
    pub device: String,
    /// The device's secret, issued by the cloud when the device was registered.
    pub secret: String,
    pub broker_host: String,
    pub broker_port: u16,
    /// First segment of every topic; must match the cloud's.
    pub topic_prefix: String,
    pub db_path: PathBuf,
    pub durability: Durability,
    /// Most unacknowledged local changes (one per item key); see [`crate::OutboxFull`].
    pub outbox_limit: u64,
    /// Name of the command model.
    pub command_model: String,
    pub keep_alive: Duration,
    /// Wait between reconnect attempts.
    pub reconnect_delay: Duration,
    /// Most MQTT requests queued toward the client's event loop.
    pub mqtt_queue: usize,
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
            topic_prefix: devtables_sync::topics::DEFAULT_PREFIX.into(),
            db_path: db_path.into(),
            durability: Durability::Immediate,
            outbox_limit: 100_000,
            command_model: "Command".into(),
            keep_alive: Duration::from_secs(30),
            reconnect_delay: Duration::from_millis(500),
            mqtt_queue: 1024,
            sync: DeviceConfig::default(),
        }
    }

    pub(crate) fn db_options(&self) -> DbOptions {
        DbOptions {
            durability: self.durability,
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
    pub secret: String,
    /// The schema file (JSON5), relative to the config file.
    pub schema: PathBuf,
    /// The database file, relative to the config file.
    pub db: PathBuf,
    #[serde(default = "default_broker")]
    pub broker: String,
    #[serde(default)]
    pub topic_prefix: Option<String>,
    /// `immediate` (default) or `periodic`.
    #[serde(default)]
    pub durability: Option<String>,
    #[serde(default)]
    pub periodic_flush_ms: Option<u64>,
    #[serde(default)]
    pub outbox_limit: Option<u64>,
    #[serde(default)]
    pub batch_delay_ms: Option<u64>,
    #[serde(default)]
    pub command_model: Option<String>,
    /// MQTT keep-alive in seconds (default 30; 0 turns it off): a dead connection that sends
    /// no error (a half-open one) is noticed after one to two of these.
    #[serde(default)]
    pub keep_alive_secs: Option<u64>,
}

fn default_broker() -> String {
    "127.0.0.1:1883".into()
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
        let (host, port) = parse_broker(&file.broker)?;
        let mut config =
            AgentConfig::new(&file.account, &file.device, &file.secret, file.db.clone());
        config.broker_host = host;
        config.broker_port = port;
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
        if let Some(ms) = file.batch_delay_ms {
            config.sync.batch_delay_ms = ms;
        }
        if let Some(m) = &file.command_model {
            config.command_model = m.clone();
        }
        if let Some(secs) = file.keep_alive_secs {
            config.keep_alive = Duration::from_secs(secs);
        }
        Ok((file, config))
    }
}

/// `host:port` (an `mqtt://` prefix is accepted).
pub fn parse_broker(s: &str) -> Result<(String, u16), AgentError> {
    let s = s.strip_prefix("mqtt://").unwrap_or(s);
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| AgentError::Config(format!("broker {s:?} must be host:port")))?;
    let port = port
        .parse()
        .map_err(|_| AgentError::Config(format!("broker port {port:?} is not a number")))?;
    Ok((host.to_string(), port))
}
