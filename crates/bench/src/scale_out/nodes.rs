//! The `devtables cloud` processes of `scale-out`, started as an operator starts them: a
//! configuration file per node in a folder of its own (API on a port the system picks, the
//! store and broker of the variant, a `node_name` per node), the first admin key made with
//! `devtables keys create` on the store, each node's stderr kept in its folder's `cloud.log`.
//! Real processes, so a node can be killed with SIGKILL and its CPU read from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::http;

/// The example schema: the fleet simulator writes its models.
const SCHEMA: &str = include_str!("../../../../examples/schema.json5");
/// Longest wait for a node to say where it serves, and then for its `/ready`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a node to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often `/ready` is asked while a node starts.
const READY_POLL: Duration = Duration::from_millis(50);
/// The line `devtables cloud` prints once it serves.
/// Partitions of a scaled-out cloud (its default, written out so the sum of the nodes' shares
/// is known).
pub const PARTITIONS: u64 = 64;

/// Where a node keeps its items.
#[derive(Clone, Debug)]
pub enum Store {
    /// `cloud.db` in the node's data folder.
    Sqlite,
    /// A PostgreSQL schema (`database`, `database_schema`).
    Postgres { url: String, schema: String },
}

/// The broker the devices and the node use.
#[derive(Clone, Debug)]
pub enum Broker {
    /// The node's own, on a port the system picks.
    Embedded,
    /// A running broker at `HOST:PORT` (Mosquitto).
    External(String),
}

/// One node to start.
pub struct NodeSpec<'a> {
    /// The `devtables` binary.
    pub program: &'a Path,
    /// The node's folder (created): configuration, schema, `data/`, `cloud.log`.
    pub dir: PathBuf,
    /// Its `node_name`: its HLC node id and MQTT client ids.
    pub name: String,
    pub store: &'a Store,
    pub broker: &'a Broker,
    /// `cluster_lease_ms` (a scaled-out cloud's lease); `None`: the default.
    pub lease_ms: Option<u64>,
}

/// A running node.
pub struct Node {
    child: Child,
    pub pid: u32,
    pub name: String,
    /// `HOST:PORT` of its API.
    pub api: String,
    /// `HOST:PORT` of the broker its devices connect to.
    pub mqtt: String,
    dir: PathBuf,
}

/// A JSON string (valid JSON5) of `s`.
fn quoted(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The node's configuration file.
fn config_text(spec: &NodeSpec<'_>) -> String {
    let mut lines = vec![
        "schema: 'schema.json5'".to_string(),
        "data_dir: 'data'".to_string(),
        "api: '127.0.0.1:0'".to_string(),
        // The simulator registers and writes through the API as fast as it can.
        "api_requests_per_sec: 0".to_string(),
        format!("node_name: {}", quoted(&spec.name)),
    ];
    match spec.broker {
        Broker::Embedded => lines.push("embedded_broker: '127.0.0.1:0'".into()),
        Broker::External(addr) => lines.push(format!("external_broker: {}", quoted(addr))),
    }
    if let Store::Postgres { url, schema } = spec.store {
        lines.push(format!("database: {}", quoted(url)));
        lines.push(format!("database_schema: {}", quoted(schema)));
        lines.push(format!("cluster_partitions: {PARTITIONS}"));
    }
    if let Some(ms) = spec.lease_ms {
        lines.push(format!("cluster_lease_ms: {ms}"));
    }
    format!(
        "// Written by devtables bench scale-out: node {}.\n{{\n  {},\n}}\n",
        spec.name,
        lines.join(",\n  ")
    )
}

/// An admin key of `account` made with `devtables keys create` on the store: on the data
/// folder `data` for SQLite, in the database for PostgreSQL (the bootstrap of each).
pub async fn admin_key(
    program: &Path,
    store: &Store,
    data: &Path,
    account: &str,
) -> anyhow::Result<String> {
    let mut command = Command::new(program);
    command.args(["keys", "create", "--scope", "admin", "--account", account]);
    match store {
        Store::Sqlite => {
            command.arg("--data").arg(data);
        }
        Store::Postgres { url, schema } => {
            // The URL through the environment, as the command's help advises.
            command
                .env("DEVTABLES_DATABASE", url)
                .args(["--database-schema", schema]);
        }
    }
    let out = command
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {} keys create", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} keys create failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !key.starts_with("dt_") {
        bail!("{} keys create printed no key: {key:?}", program.display());
    }
    Ok(key)
}

impl Node {
    /// Writes the node's folder and starts it; returns once it says where it serves (see
    /// [`Node::wait_ready`] for serving devices).
    pub async fn start(spec: NodeSpec<'_>) -> anyhow::Result<Node> {
        std::fs::create_dir_all(spec.dir.join("data"))
            .with_context(|| format!("cannot create {}", spec.dir.display()))?;
        std::fs::write(spec.dir.join("schema.json5"), SCHEMA).context("cannot write the schema")?;
        let config_path = spec.dir.join("cloud.json5");
        std::fs::write(&config_path, config_text(&spec))
            .context("cannot write the node's configuration")?;
        let log_path = spec.dir.join("cloud.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut child = Command::new(spec.program)
            .arg("cloud")
            .arg("--config")
            .arg(&config_path)
            .env("DEVTABLES_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {} cloud", spec.program.display()))?;
        let pid = child.id().context("the node exited at once")?;
        let stderr = child
            .stderr
            .take()
            .context("the node's stderr is not piped")?;
        let (addrs_tx, addrs_rx) = oneshot::channel();
        tokio::spawn(devtables_fleet::copy_cloud_log(stderr, log, addrs_tx));
        let addrs = tokio::select! {
            found = addrs_rx => found.ok(),
            _ = tokio::time::sleep(START_TIMEOUT) => None,
            status = child.wait() => bail!(
                "node {} exited ({}) before it served; see {}",
                spec.name,
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                log_path.display()
            ),
        };
        let Some((api, mqtt)) = addrs else {
            bail!(
                "node {} did not say where it serves within {START_TIMEOUT:?}; see {}",
                spec.name,
                log_path.display()
            );
        };
        Ok(Node {
            child,
            pid,
            name: spec.name,
            api,
            mqtt,
            dir: spec.dir,
        })
    }

    /// Waits until `GET /ready` answers 200: the store answers, the broker is connected and
    /// the device topics are subscribed.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < START_TIMEOUT {
            match http::get(&self.api, "/ready", None).await {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(READY_POLL).await;
        }
        bail!(
            "node {} not ready within {START_TIMEOUT:?} (last answer: {last}); see {}",
            self.name,
            self.dir.join("cloud.log").display()
        )
    }

    /// Its `GET /v1/status`.
    pub async fn status(&self, key: &str) -> anyhow::Result<Value> {
        match http::get(&self.api, "/v1/status", Some(key)).await? {
            (200, v) => Ok(v),
            (status, body) => bail!("node {}: GET /v1/status: {status} {body}", self.name),
        }
    }

    /// `http://HOST:PORT` of its API.
    pub fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// SIGKILL, and reaps it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill node {}", self.name))
    }

    /// Stops it as an operator would: SIGTERM, then SIGKILL if it has not exited in time.
    pub async fn stop(mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) sends a signal to our own child, whose pid we hold until reaped.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "node {} did not stop within {STOP_TIMEOUT:?}: killing it",
                self.name
            );
            let _ = self.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_config_names_its_store_broker_and_lease() {
        let store = Store::Postgres {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            schema: "dt_bench_1".into(),
        };
        let broker = Broker::External("127.0.0.1:1883".into());
        let text = config_text(&NodeSpec {
            program: Path::new("devtables"),
            dir: PathBuf::from("/tmp/x"),
            name: "node-2".into(),
            store: &store,
            broker: &broker,
            lease_ms: Some(1500),
        });
        let v: Value = json5::from_str(&text).expect("the configuration is JSON5");
        assert_eq!(v["database"], "postgres://postgres@127.0.0.1:5432/test");
        assert_eq!(v["database_schema"], "dt_bench_1");
        assert_eq!(v["external_broker"], "127.0.0.1:1883");
        assert_eq!(v["node_name"], "node-2");
        assert_eq!(v["cluster_lease_ms"], 1500);
        assert_eq!(v["cluster_partitions"], PARTITIONS);
        assert_eq!(v["api"], "127.0.0.1:0");
        assert!(v.get("embedded_broker").is_none());
    }

    #[test]
    fn a_single_sqlite_node_config_has_the_embedded_broker_and_no_database() {
        let text = config_text(&NodeSpec {
            program: Path::new("devtables"),
            dir: PathBuf::from("/tmp/x"),
            name: "solo".into(),
            store: &Store::Sqlite,
            broker: &Broker::Embedded,
            lease_ms: None,
        });
        let v: Value = json5::from_str(&text).expect("the configuration is JSON5");
        assert_eq!(v["embedded_broker"], "127.0.0.1:0");
        assert!(v.get("database").is_none());
        assert!(v.get("cluster_lease_ms").is_none());
    }
}
