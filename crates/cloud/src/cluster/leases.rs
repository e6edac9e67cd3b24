//! The partition leases of a scaled-out cloud in PostgreSQL: a thread of each node that renews
//! what it holds, claims what is free or expired and releases what is beyond its share
//! ([`super::plan`]), and tells the sync loop what it serves ([`Serving`]).
//!
//! Why it is safe:
//! - Every time is the database's clock (`clock_timestamp()`), so nodes' clocks do not matter.
//! - A claim is one conditional `UPDATE` (free or expired only): two nodes never both get a
//!   partition, whatever they planned.
//! - A node serves a partition only while its lease surely runs: until the start of the round
//!   that last renewed it plus the lease minus a fifth of it (on this node's monotonic clock). A
//!   node that cannot reach the database stops serving before another may take over.
//! - A release is published (the node stops serving) before it is committed; a claim only after.
//! - Two processes under one node name would share leases: a node registers its name with a
//!   random instance id, and a second process waits until the first stopped renewing (a node
//!   restarted after `kill -9` waits one lease), or refuses to start after two.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::Client;
use tokio::sync::watch;

use super::{plan, Lease, Serving};
use crate::status::SyncStatus;

/// Settings of a node's leases (`cluster_*` keys of the cloud's file).
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    /// PostgreSQL URL, as the store's.
    pub url: String,
    /// Schema holding the lease tables (the store's).
    pub schema: String,
    /// This node's name (unique in the cluster).
    pub node: String,
    /// Partitions of the fleet; every node must use the same number.
    pub partitions: u32,
    /// How long a lease runs without renewal: the longest a dead node's devices wait.
    pub lease: Duration,
    pub connect_timeout: Duration,
    /// TLS to PostgreSQL, as the store's.
    pub tls: Option<crate::store::postgres::PostgresTls>,
}

/// Why the leases could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster leases: cannot connect to PostgreSQL: {0}")]
    Connect(#[source] postgres::Error),
    #[error("cluster leases: {what}: {source}")]
    Database {
        what: &'static str,
        #[source]
        source: postgres::Error,
    },
    #[error(
        "cluster leases: the cluster has {found} partitions but this node is configured with \
         {configured}: every node must use the same `cluster_partitions`"
    )]
    Partitions { found: u64, configured: u32 },
    #[error(
        "cluster leases: another cloud process runs as node {0:?} (it renewed within the last \
         two leases): give each node its own `node_name`"
    )]
    NodeTaken(String),
    #[error("cluster leases: cannot start the lease thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cluster leases: schema name {0:?} is not a plain identifier")]
    Schema(String),
}

/// The running lease thread; stop it with [`LeaseThread::stop`] (it releases every partition,
/// so a graceful stop hands over at once).
pub struct LeaseThread {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LeaseThread {
    /// Connects, creates the lease tables, registers the node and starts the thread. Blocking:
    /// call it off the async runtime (`spawn_blocking`), as every use of the synchronous
    /// `postgres` client.
    pub fn start(
        options: LeaseOptions,
        serving: watch::Sender<Serving>,
        status: Arc<SyncStatus>,
    ) -> Result<LeaseThread, ClusterError> {
        if !super::wakeups::is_identifier(&options.schema) {
            return Err(ClusterError::Schema(options.schema));
        }
        let mut node = Node::connect(&options)?;
        node.prepare()?;
        node.register()?;
        // The first round before the service serves: a node that starts holds its partitions
        // from its first message on (a lone node all of them), not a round later.
        node.round(Instant::now(), &serving, &status)
            .map_err(|source| ClusterError::Database {
                what: "the first lease round",
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let serving = Arc::new(serving);
        // The watchdog stops serving when the safe part of the leases ran out, even while a
        // round hangs (a database that stopped answering).
        let watchdog = {
            let (stop, serving, status) = (stop.clone(), serving.clone(), status.clone());
            let (safe_until, node_name, partitions) = (
                node.safe_until.clone(),
                options.node.clone(),
                options.partitions,
            );
            std::thread::Builder::new()
                .name("devtables-lease-watchdog".into())
                .spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                        let mut safe = safe_until.lock().unwrap_or_else(|e| e.into_inner());
                        if safe.is_some_and(|t| Instant::now() >= t) {
                            *safe = None;
                            if !serving.borrow().is_empty() {
                                status.cluster.leases_lost.fetch_add(1, Ordering::Relaxed);
                                status.cluster.partitions_held.store(0, Ordering::Relaxed);
                                tracing::warn!(
                                    node = %node_name,
                                    "the leases could not be renewed in time: serving no device \
                                     until they are"
                                );
                                serving.send_replace(Serving::nothing(partitions));
                            }
                        }
                    }
                })
                .map_err(ClusterError::Thread)?
        };
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("devtables-leases".into())
            .spawn(move || node.run(&serving, &status, &stopping))
            .map_err(ClusterError::Thread)?;
        Ok(LeaseThread {
            stop,
            threads: vec![thread, watchdog],
        })
    }

    /// Stops serving, releases the partitions and ends the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The database's clock in ms.
const DB_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

struct Node {
    options: LeaseOptions,
    client: Option<Client>,
    instance: i64,
    /// Until when the held partitions are surely this node's (the watchdog's deadline).
    safe_until: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Node {
    fn connect(options: &LeaseOptions) -> Result<Node, ClusterError> {
        let client = connect(options).map_err(ClusterError::Connect)?;
        Ok(Node {
            options: options.clone(),
            client: Some(client),
            instance: (rand::random::<u64>() >> 1) as i64,
            safe_until: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    fn table(&self, name: &str) -> String {
        format!("\"{}\".{name}", self.options.schema)
    }

    fn client(&mut self) -> Result<&mut Client, postgres::Error> {
        let client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => connect(&self.options)?,
        };
        Ok(self.client.insert(client))
    }

    /// Creates the tables and the partitions' rows once, whichever node comes first.
    fn prepare(&mut self) -> Result<(), ClusterError> {
        let (nodes, leases) = (self.table("cluster_nodes"), self.table("cluster_leases"));
        let schema = self.options.schema.clone();
        let partitions = self.options.partitions;
        let db = |what| move |source| ClusterError::Database { what, source };
        let client = self.client().map_err(ClusterError::Connect)?;
        let mut tx = client
            .transaction()
            .map_err(db("opening the set-up transaction"))?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('devtables cluster ' || $1))",
            &[&schema],
        )
        .map_err(db("locking the set-up"))?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS {nodes} (
                 node TEXT COLLATE \"C\" PRIMARY KEY,
                 instance BIGINT NOT NULL,
                 seen_ms BIGINT NOT NULL,
                 started_ms BIGINT NOT NULL);
             CREATE TABLE IF NOT EXISTS {leases} (
                 part INTEGER PRIMARY KEY,
                 node TEXT COLLATE \"C\",
                 expires_ms BIGINT NOT NULL DEFAULT 0);"
        ))
        .map_err(db("creating the lease tables"))?;
        let found: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {leases}"), &[])
            .map_err(db("counting the partitions"))?
            .get(0);
        if found == 0 {
            tx.execute(
                &format!("INSERT INTO {leases} (part) SELECT generate_series(0, $1 - 1)"),
                &[&(partitions as i32)],
            )
            .map_err(db("creating the partitions"))?;
        } else if found != i64::from(partitions) {
            return Err(ClusterError::Partitions {
                found: found as u64,
                configured: partitions,
            });
        }
        tx.commit().map_err(db("committing the set-up"))
    }

    /// Registers the node name with this process's instance id, waiting while another process
    /// of the same name still renews (at most two leases).
    fn register(&mut self) -> Result<(), ClusterError> {
        let nodes = self.table("cluster_nodes");
        let lease_ms = self.options.lease.as_millis() as i64;
        let (node, instance) = (self.options.node.clone(), self.instance);
        let deadline = Instant::now() + 2 * self.options.lease + Duration::from_secs(1);
        let mut warned = false;
        loop {
            let client = self.client().map_err(ClusterError::Connect)?;
            let rows = client
                .query(
                    &format!(
                        "INSERT INTO {nodes} AS n (node, instance, seen_ms, started_ms)
                         VALUES ($1, $2, {DB_NOW}, {DB_NOW})
                         ON CONFLICT (node) DO UPDATE
                             SET instance = EXCLUDED.instance, seen_ms = EXCLUDED.seen_ms,
                                 started_ms = EXCLUDED.started_ms
                             WHERE n.instance = EXCLUDED.instance
                                OR n.seen_ms <= EXCLUDED.seen_ms - $3
                         RETURNING node"
                    ),
                    &[&node, &instance, &lease_ms],
                )
                .map_err(|source| ClusterError::Database {
                    what: "registering the node",
                    source,
                })?;
            if !rows.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::NodeTaken(node));
            }
            if !std::mem::replace(&mut warned, true) {
                tracing::warn!(
                    %node,
                    "another process of this node renewed its leases recently (a restart after a \
                     crash?): waiting for them to run out"
                );
            }
            std::thread::sleep(self.options.lease / 10);
        }
    }

    fn run(mut self, serving: &watch::Sender<Serving>, status: &SyncStatus, stop: &AtomicBool) {
        let every = self.options.lease / 3;
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            if let Err(e) = self.round(started, serving, status) {
                status
                    .cluster
                    .lease_rounds_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.options.node, "a lease round failed: {e}");
                // A broken connection is made again next round.
                if self.client.as_ref().is_some_and(Client::is_closed) {
                    self.client = None;
                }
            }
            let wait = every.saturating_sub(started.elapsed());
            let until = Instant::now() + wait;
            while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
            }
        }
        self.publish(serving, status, Serving::nothing(self.options.partitions));
        if let Err(e) = self.leave() {
            tracing::warn!(node = %self.options.node, "could not release the leases at stop (they run out on their own): {e}");
        }
    }

    fn publish(&mut self, serving: &watch::Sender<Serving>, status: &SyncStatus, to: Serving) {
        if *serving.borrow() == to {
            return;
        }
        status
            .cluster
            .partitions_held
            .store(to.held().unwrap_or(0) as u64, Ordering::Relaxed);
        tracing::info!(node = %self.options.node, partitions = to.held().unwrap_or(0), "serving partitions");
        serving.send_replace(to);
    }

    /// One round on the node's connection (made again when it broke).
    fn round(
        &mut self,
        started: Instant,
        serving: &watch::Sender<Serving>,
        status: &SyncStatus,
    ) -> Result<(), postgres::Error> {
        let mut client = match self.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => connect(&self.options)?,
        };
        let result = self.round_on(started, &mut client, serving, status);
        self.client = Some(client);
        result
    }

    /// One round: heartbeat, read, plan, release, renew, claim: one transaction.
    fn round_on(
        &mut self,
        started: Instant,
        client: &mut Client,
        serving: &watch::Sender<Serving>,
        status: &SyncStatus,
    ) -> Result<(), postgres::Error> {
        let (nodes, leases) = (self.table("cluster_nodes"), self.table("cluster_leases"));
        let lease_ms = self.options.lease.as_millis() as i64;
        let (node, instance, partitions) = (
            self.options.node.clone(),
            self.instance,
            self.options.partitions,
        );
        let mut tx = client.transaction()?;
        let now: i64 = tx.query_one(&format!("SELECT {DB_NOW}"), &[])?.get(0);
        let mine = tx.execute(
            &format!("UPDATE {nodes} SET seen_ms = $3 WHERE node = $1 AND instance = $2"),
            &[&node, &instance, &now],
        )?;
        if mine == 0 {
            // Another process took this node's name while this one could not renew.
            drop(tx);
            tracing::error!(%node, "another process runs as this node: serving nothing");
            self.publish(serving, status, Serving::nothing(partitions));
            return Ok(());
        }
        let live: i64 = tx
            .query_one(
                &format!("SELECT count(*) FROM {nodes} WHERE seen_ms > $1"),
                &[&(now - lease_ms)],
            )?
            .get(0);
        let table: Vec<Lease> = tx
            .query(&format!("SELECT part, node, expires_ms FROM {leases}"), &[])?
            .iter()
            .map(|r| Lease {
                partition: r.get::<_, i32>(0) as u32,
                node: r.get(1),
                expires_ms: r.get::<_, i64>(2).max(0) as u64,
            })
            .collect();
        let p = plan(&node, now.max(0) as u64, partitions, &table, live as usize);
        let as_i32 = |v: &[u32]| v.iter().map(|p| *p as i32).collect::<Vec<i32>>();
        if !p.release.is_empty() {
            // Stop serving them before anyone may take them.
            let keep = Serving::Partitions {
                partitions,
                held: p.renew.iter().copied().collect(),
            };
            let published = serving.borrow().clone();
            let keep = match (&published, keep) {
                (Serving::Partitions { held: old, .. }, Serving::Partitions { held, .. }) => {
                    Serving::Partitions {
                        partitions,
                        held: old.intersection(&held).copied().collect(),
                    }
                }
                (_, keep) => keep,
            };
            self.publish(serving, status, keep);
            tx.execute(
                &format!(
                    "UPDATE {leases} SET node = NULL, expires_ms = 0
                     WHERE node = $1 AND part = ANY($2)"
                ),
                &[&node, &as_i32(&p.release)],
            )?;
        }
        let renewed = tx.query(
            &format!(
                "UPDATE {leases} SET expires_ms = $3 + $4
                 WHERE node = $1 AND expires_ms > $3 AND part = ANY($2) RETURNING part"
            ),
            &[&node, &as_i32(&p.renew), &now, &lease_ms],
        )?;
        let claimed = tx.query(
            &format!(
                "UPDATE {leases} SET node = $1, expires_ms = $3 + $4
                 WHERE part = ANY($2) AND (node IS NULL OR expires_ms <= $3) RETURNING part"
            ),
            &[&node, &as_i32(&p.claim), &now, &lease_ms],
        )?;
        tx.commit()?;
        // What was renewed or claimed now runs for a lease from before this round began.
        *self.safe_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(started + self.options.lease - self.options.lease / 5);
        status
            .cluster
            .partitions_released
            .fetch_add(p.release.len() as u64, Ordering::Relaxed);
        status
            .cluster
            .partitions_claimed
            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
        status
            .cluster
            .live_nodes
            .store(live as u64, Ordering::Relaxed);
        let held = renewed
            .iter()
            .chain(claimed.iter())
            .map(|r| r.get::<_, i32>(0) as u32)
            .collect();
        self.publish(serving, status, Serving::Partitions { partitions, held });
        Ok(())
    }

    /// At a graceful stop: every partition released at once, the node unregistered.
    fn leave(&mut self) -> Result<(), postgres::Error> {
        let (nodes, leases) = (self.table("cluster_nodes"), self.table("cluster_leases"));
        let (node, instance) = (self.options.node.clone(), self.instance);
        let client = self.client()?;
        let mut tx = client.transaction()?;
        let mine = tx.execute(
            &format!("DELETE FROM {nodes} WHERE node = $1 AND instance = $2"),
            &[&node, &instance],
        )?;
        if mine > 0 {
            tx.execute(
                &format!("UPDATE {leases} SET node = NULL, expires_ms = 0 WHERE node = $1"),
                &[&node],
            )?;
        }
        tx.commit()
    }
}

/// A connection of the cluster's own (the store's is busy on the store thread).
pub(crate) fn connect(options: &LeaseOptions) -> Result<Client, postgres::Error> {
    let mut config: postgres::Config = options.url.parse()?;
    // A round must not hang past the lease: connecting is bounded by half of it, and a
    // connection whose server stopped answering is noticed by TCP keepalives within it.
    config.connect_timeout(options.connect_timeout.min(options.lease / 2));
    config.keepalives(true);
    // (In whole seconds: the socket option has no finer unit, and 0 is refused.)
    config.keepalives_idle((options.lease / 2).max(Duration::from_secs(1)));
    config.application_name(&format!("devtables-cloud {}", options.node));
    crate::store::postgres::tls::connect(&config, options.tls.as_ref())
}
