//! The cloud service's settings. Every limit is here, with its default; `devtables cloud` reads
//! them from a JSON5 file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::Retention;

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

/// Settings of the cloud service.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// Holds `cloud.db` (SQLite).
    pub data_dir: PathBuf,
    pub api_listen: SocketAddr,
    pub broker: BrokerMode,
    /// First segment of every topic; must match the agents'.
    pub topic_prefix: String,
    /// Protocol limits and timings.
    pub sync: devtables_sync::cloud::CloudConfig,
    pub retention: Retention,
    /// How often retention runs.
    pub purge_interval: Duration,
    /// SQLite `synchronous=FULL`: an acknowledged write survives power loss, not only a crash.
    pub sqlite_full_sync: bool,
    /// Largest HTTP request body.
    pub max_request_bytes: usize,
    /// Most items per API page.
    pub max_page_items: usize,
    /// This cloud process's node name: its versions carry `node_id_for("devtables/cloud/{name}")`,
    /// so two cloud nodes never mint equal versions. Empty (the default): a random name per start.
    pub node_name: String,
}

impl CloudConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> CloudConfig {
        CloudConfig {
            data_dir: data_dir.into(),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            broker: BrokerMode::Embedded {
                listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            },
            topic_prefix: devtables_sync::topics::DEFAULT_PREFIX.into(),
            sync: devtables_sync::cloud::CloudConfig::default(),
            retention: Retention {
                tombstone_ms: 30 * 24 * 3600 * 1000,
                max_conflicts: 10_000,
            },
            purge_interval: Duration::from_secs(3600),
            sqlite_full_sync: true,
            max_request_bytes: 1024 * 1024,
            max_page_items: 1000,
            node_name: String::new(),
        }
    }
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
    /// `host:port` of the embedded broker (default 127.0.0.1:1883) ...
    #[serde(default)]
    pub embedded_broker: Option<SocketAddr>,
    /// ... or of an external broker.
    #[serde(default)]
    pub external_broker: Option<String>,
    #[serde(default)]
    pub broker_username: Option<String>,
    #[serde(default)]
    pub broker_password: Option<String>,
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
    #[serde(default)]
    pub max_conflicts: Option<u64>,
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
        config.broker = match (file.embedded_broker, &file.external_broker) {
            (Some(_), Some(_)) => {
                return Err("set either embedded_broker or external_broker, not both".into())
            }
            (Some(listen), None) => BrokerMode::Embedded { listen },
            (None, Some(addr)) => {
                let addr = addr.strip_prefix("mqtt://").unwrap_or(addr);
                let (host, port) = addr
                    .rsplit_once(':')
                    .ok_or_else(|| format!("external_broker {addr:?} must be host:port"))?;
                BrokerMode::External {
                    host: host.to_string(),
                    port: port
                        .parse()
                        .map_err(|_| format!("external_broker port {port:?} is not a number"))?,
                    username: file.broker_username.clone(),
                    password: file.broker_password.clone(),
                }
            }
            (None, None) => config.broker,
        };
        if let Some(p) = file.topic_prefix {
            config.topic_prefix = p;
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
        Ok((dir.join(file.schema), config))
    }
}
