//! One cloud deployment of `scale-out`, as an operator runs it: a single node on SQLite with
//! its embedded broker (the default install), or N nodes on one PostgreSQL schema and one
//! Mosquitto (a scaled-out cloud, docs/scale-out.md), with the first admin key made on the
//! store, every node ready, and for a cluster every node holding its share of the partitions.
//! The fleet simulator then runs against node 1's API ([`Deployment::fleet_config`]).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_fleet::{FleetConfig, Phase, Progress, ProgressSink, Target};
use tokio::sync::watch;

use super::cpu::Group;
use super::http::counter;
use super::nodes::{self, Broker, Node, NodeSpec, Store, PARTITIONS};

/// The account of the simulated devices (the admin key's).
pub const ACCOUNT: &str = "bench";
/// Longest wait for the nodes to share the partitions.
const SPREAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the nodes' status is read while waiting on them.
const POLL: Duration = Duration::from_millis(20);

/// What runs: the store and broker, and how many nodes.
#[derive(Clone, Debug)]
pub enum Variant {
    /// One node, SQLite, the embedded broker.
    SqliteEmbedded,
    /// `nodes` nodes on PostgreSQL (`url`, `schema`) and Mosquitto at `mosquitto`.
    Postgres {
        url: String,
        schema: String,
        mosquitto: String,
        nodes: usize,
    },
}

impl Variant {
    /// The column heading of the variant.
    pub fn label(&self) -> String {
        match self {
            Variant::SqliteEmbedded => "SQLite + embedded broker, 1 node".into(),
            Variant::Postgres { nodes: 1, .. } => "PostgreSQL + Mosquitto, 1 node".into(),
            Variant::Postgres { nodes, .. } => format!("PostgreSQL + Mosquitto, {nodes} nodes"),
        }
    }

    pub fn nodes(&self) -> usize {
        match self {
            Variant::SqliteEmbedded => 1,
            Variant::Postgres { nodes, .. } => *nodes,
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Variant::Postgres { .. })
    }
}

/// The running nodes of a variant.
pub struct Deployment {
    pub nodes: Vec<Node>,
    pub key: String,
    /// `HOST:PORT` the devices connect to.
    pub mqtt: String,
    pub variant: Variant,
    _dir: tempfile::TempDir,
}

impl Deployment {
    /// Starts every node of `variant` (`lease_ms`: the cluster's lease, `None` its default)
    /// and waits until each is ready and, for a cluster, the partitions are shared.
    pub async fn start(
        program: &Path,
        variant: Variant,
        lease_ms: Option<u64>,
    ) -> anyhow::Result<Deployment> {
        let dir = tempfile::Builder::new()
            .prefix("devtables-bench-scale-out-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let (store, broker) = match &variant {
            Variant::SqliteEmbedded => (Store::Sqlite, Broker::Embedded),
            Variant::Postgres {
                url,
                schema,
                mosquitto,
                ..
            } => (
                Store::Postgres {
                    url: url.clone(),
                    schema: schema.clone(),
                },
                Broker::External(mosquitto.clone()),
            ),
        };
        // The key goes into the first node's data folder (SQLite) or the database.
        let key =
            nodes::admin_key(program, &store, &dir.path().join("node-1/data"), ACCOUNT).await?;
        let mut started = Vec::new();
        for i in 1..=variant.nodes() {
            let node = Node::start(NodeSpec {
                program,
                dir: dir.path().join(format!("node-{i}")),
                name: format!("node-{i}"),
                store: &store,
                broker: &broker,
                lease_ms: lease_ms.filter(|_| variant.is_postgres()),
            })
            .await;
            match node {
                Ok(node) => started.push(node),
                Err(e) => {
                    for n in started {
                        n.stop().await;
                    }
                    return Err(e);
                }
            }
        }
        let mqtt = started[0].mqtt.clone();
        let deployment = Deployment {
            nodes: started,
            key,
            mqtt,
            variant,
            _dir: dir,
        };
        if let Err(e) = deployment.settle().await {
            deployment.stop().await;
            return Err(e);
        }
        Ok(deployment)
    }

    async fn settle(&self) -> anyhow::Result<()> {
        for node in &self.nodes {
            node.wait_ready().await?;
        }
        if self.nodes.len() > 1 {
            self.wait_spread().await?;
        }
        Ok(())
    }

    /// Waits until every node holds some partitions and together all of them.
    pub async fn wait_spread(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let held = self.counters("cluster_partitions_held").await?;
            if held.iter().sum::<u64>() == PARTITIONS && held.iter().all(|h| *h > 0) {
                return Ok(());
            }
            if started.elapsed() > SPREAD_TIMEOUT {
                bail!("the nodes did not share the {PARTITIONS} partitions within {SPREAD_TIMEOUT:?}: they hold {held:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// One counter of `GET /v1/status` of every node, in node order.
    pub async fn counters(&self, field: &str) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            out.push(counter(&node.status(&self.key).await?, field));
        }
        Ok(out)
    }

    /// The nodes' processes, for their CPU.
    pub fn cloud_group(&self) -> Group {
        Group::Pids(self.nodes.iter().map(|n| n.pid).collect())
    }

    /// The simulator's configuration against node 1: `devices` writing `rate` readings a
    /// second each for `duration`, nothing else (no down writes, broadcasts, commands, churn).
    pub fn fleet_config(
        &self,
        devices: usize,
        rate: f64,
        duration: Duration,
        drain: Duration,
    ) -> FleetConfig {
        let first = &self.nodes[0];
        let mut config = FleetConfig::new(Target::Running {
            url: first.url(),
            admin_key: self.key.clone(),
            mqtt: self.mqtt.clone(),
            cloud_pid: Some(first.pid),
        });
        config.account = ACCOUNT.into();
        config.devices = devices;
        config.rate_per_device = rate;
        config.duration = duration;
        config.connect_rate = 1000.0;
        config.register_rate = 1000.0;
        config.down_rate = 0.0;
        config.broadcast_every = None;
        config.command_rate = 0.0;
        config.churn = 0.0;
        config.drain_timeout = drain;
        config
    }

    /// Stops every node (SIGTERM) and removes their folders.
    pub async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
    }
}

/// A progress sink that prints the simulator's status line (prefixed with `what`) and hands
/// its phase to the returned receiver.
pub fn phase_sink(what: String) -> (ProgressSink, watch::Receiver<Phase>) {
    let (tx, rx) = watch::channel(Phase::Starting);
    let sink: ProgressSink = Arc::new(move |p: &Progress| {
        eprintln!("[{what}] {}", p.status_line());
        tx.send_if_modified(|phase| {
            let changed = *phase != p.phase;
            *phase = p.phase;
            changed
        });
    });
    (sink, rx)
}

/// Waits until the simulation reaches `phase` or a later one; `false` when it ended first.
pub async fn reached(rx: &mut watch::Receiver<Phase>, phase: Phase) -> bool {
    let order = |p: Phase| match p {
        Phase::Starting => 0,
        Phase::Registering => 1,
        Phase::Connecting => 2,
        Phase::Writing => 3,
        Phase::Draining => 4,
        Phase::Stopping => 5,
    };
    rx.wait_for(|p| order(*p) >= order(phase)).await.is_ok()
}
