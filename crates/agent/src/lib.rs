//! The devtables device agent: the device database plus replication over MQTT.
//!
//! A device application links this crate, opens its database through [`Agent::start`], registers
//! command handlers, and writes items as usual: every local write of a model that syncs up gets
//! its outbox entry in the same transaction (see `state`), and the agent's event loop (`driver`)
//! sends it, applies what the cloud sends down, and catches up after every reconnect.
//! `devtables agent --config FILE` and the device-only `devtables-agent --config FILE` run the
//! same agent standalone ([`standalone`]).
//!
//! # Layout
//! - [`config`]: the agent's settings (a JSON5 file for the standalone agent).
//! - `state`: replication state in the database's side tables; the outbox recorder; the
//!   `DeviceTxn` the replication rules run in.
//! - `driver`: the event loop around the sans-IO `DeviceEngine`.
//! - `counted`: the event loop's database transactions, counted (`db_reads`, `db_writes`).
//! - `outbox_status`: the status's `pending` and `dropped`, read only when they may change.
//! - `commands`: running command items at least once.
//! - [`changelog`]: the durable local change log (every committed change under a local
//!   sequence number), written in the transaction of the change when the agent keeps it.
//! - [`local_api`]: the HTTP API on a Unix socket (and optionally loopback TCP) through which
//!   applications in any language read and write items, follow changes and answer commands.
//! - [`standalone`]: the standalone agent's loop, shared by both binaries.

pub mod changelog;
mod commands;
pub mod config;
mod counted;
mod driver;
mod link;
pub mod local_api;
mod outbox_status;
pub mod standalone;
mod state;
/// TLS to the broker (CA file, server name, client certificate): the shared client side.
pub use devtables_tls as tls;

use std::collections::HashMap;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use devtables_db::{Db, DbError, HookId, ItemChange, Origin};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::device::{DeviceEngine, Restored};
use devtables_sync::hlc::{node_id_for, Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, IdError};
use devtables_sync::wire::UpMsg;
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS};
use serde::Serialize;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch, Notify};

pub use changelog::ChangeLogLimits;
pub use config::AgentConfig;
pub use local_api::{LocalApi, LocalApiConfig, LocalApiError};
pub use state::{ChangeTooLarge, OutboxFull};

/// A handler for one command name: gets the command item, returns the result to record (or an
/// error message). It runs on the agent's task: keep it short, or hand the work to a thread.
pub type CommandHandler = Arc<dyn Fn(&Item) -> Result<serde_json::Value, String> + Send + Sync>;

/// Called when the cloud rejects a local change (model, key, reason); it is not retried.
pub type RejectedHook = Arc<dyn Fn(&str, &ItemKey, &str) + Send + Sync>;

/// Called with the outbox entries (model, key, version) the cloud answered for, once they have
/// left the durable outbox: applied, or refused for good (rejected, or stale: then a
/// [`RejectedHook`] or the `superseded` count tells). An entry a newer remote write superseded
/// in a feed page leaves without an answer and is not reported here.
pub type AckedHook = Arc<dyn Fn(&[(String, ItemKey, Hlc)]) + Send + Sync>;

#[derive(Default)]
pub(crate) struct HandlerSet {
    commands: HashMap<String, CommandHandler>,
    rejected: Vec<RejectedHook>,
    acked: Vec<AckedHook>,
}

pub(crate) type Handlers = Arc<Mutex<HandlerSet>>;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid device identity: {0}")]
    Identity(#[from] IdError),
    #[error("cannot open the device database: {0}")]
    Open(#[from] devtables_db::OpenError),
    #[error("cannot read the replication state: {0}")]
    State(#[from] DbError),
    #[error("invalid agent configuration: {0}")]
    Config(String),
}

/// What the agent is doing, for the application and the status line.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AgentStatus {
    /// Connected to the broker.
    pub connected: bool,
    /// The cloud welcomed this session: changes flow both ways. Clears `last_error`.
    pub ready: bool,
    /// Feed cursor applied (after every feed page and at the end of a full resync).
    pub cursor: u64,
    /// Local changes not yet acknowledged: the durable outbox's size. [`Agent::status`] reads it
    /// from the database, so it is exact as soon as a write returns; [`Agent::watch_status`]
    /// sees it once the event loop has handled the change.
    pub pending: usize,
    /// Batches sent and not yet acknowledged.
    pub in_flight: usize,
    /// Outbox entries the cloud answered for that left the outbox (see [`AckedHook`]).
    pub acked: u64,
    /// Local changes the cloud rejected (not retried).
    pub rejected: u64,
    /// Local changes that lost to a newer version in the cloud (left the outbox; for models
    /// that sync down the winner arrives through the feed).
    pub superseded: u64,
    /// Local changes re-stamped on the cloud's time (the device clock was ahead).
    pub restamped: u64,
    /// Times the cloud told this device to slow down (over its message rate, or too many pushes
    /// being applied); pushes then wait the time it said. Nothing is lost: what the cloud did not
    /// take stays in the outbox and is sent again.
    pub throttled: u64,
    /// Pushes the cloud did not answer within their retransmit timeout: their changes were
    /// sent again (a slow or unreachable cloud). Nothing is lost, and a cloud that still holds
    /// the original answers it once; a count that grows says the cloud is behind.
    pub push_timeouts: u64,
    /// Full resyncs finished (the first sync of a new device is one; later ones mean the
    /// device was away longer than the cloud keeps deletes).
    pub resyncs: u64,
    /// Established MQTT connections that were lost (a clean stop is not counted).
    pub disconnects: u64,
    /// The broker address (`host:port`) of the current connection; while not connected, the
    /// one the next attempt goes to. With several addresses (a broker cluster) it moves to the
    /// next after every failed attempt or lost connection.
    pub broker: Option<String>,
    /// Connections made to another broker address than the previous connection's: failovers
    /// to another node of a broker cluster.
    pub broker_failovers: u64,
    /// SUBACKs that refused the subscription to the device's topics; each made the agent
    /// subscribe again after a backoff wait (a broker cluster refuses while it cannot store the
    /// subscription). A connection's session (its hello) starts only once it is granted.
    pub subscriptions_refused: u64,
    /// Connections given up because the broker refused or left unanswered three SUBSCRIBEs in
    /// a row, over at least [`AgentConfig::subscribe_give_up`]: the next attempt goes to the
    /// next broker address (a node of a cluster that cannot store subscriptions, while another
    /// one can).
    pub subscriptions_abandoned: u64,
    /// Connections given up because the cloud answered nothing for
    /// [`AgentConfig::subscribe_give_up`] (doubled for each such connection in a row) while the
    /// session waited, for the welcome to its hello or for acknowledgements of pushes in
    /// flight: a broker node that takes the device's messages but does not deliver the answers
    /// (or does not pass them on). The next attempt goes to the next address.
    pub deaf_connections: u64,
    /// Local items a resync deleted because the cloud does not hold them.
    pub swept: u64,
    /// Cloud time minus this device's clock, in ms, from the last welcome.
    pub clock_offset_ms: i64,
    /// Changes of lossy models dropped by a full outbox.
    pub dropped: u64,
    /// Sync messages published to the cloud, and their payload bytes.
    pub messages_up: u64,
    pub bytes_up: u64,
    /// Messages not handed to the MQTT client because its request queue (`mqtt_queue`) was
    /// full; the protocol sends them again, so this costs time, not data.
    pub publish_dropped: u64,
    /// Notifications the full input queue (`input_queue`) could not take; each made the event
    /// loop reload the durable outbox and the pending commands.
    pub inputs_missed: u64,
    /// Commands run because they were found pending in the database (a restart, a handler
    /// registered late, a missed notification) rather than as they arrived.
    pub commands_recovered: u64,
    /// Failed writes of a command's result that were scheduled for another attempt.
    pub command_result_retries: u64,
    /// Command results given up (attempts exhausted, retry queue full, or a permanent error);
    /// such a command stays `pending` and runs again after a restart.
    pub command_results_abandoned: u64,
    /// Tombstone versions forgotten after `tombstone_retention`.
    pub tombstones_collected: u64,
    /// Versions of live items forgotten because their model does not sync down and nothing is
    /// pending.
    pub versions_collected: u64,
    /// Writes this device held that it put back into its outbox because the cloud had lost
    /// them, or may have (it was restored from a backup older than what the device heard from
    /// it); they are sent again, and what the cloud still holds is answered as a duplicate.
    pub restore_repushed: u64,
    /// Changes the cloud could not take yet because this device runs a newer schema than the
    /// cloud's (a model the cloud lacks); they stay queued and go again in the next session.
    pub deferred: u64,
    /// Items stored whole although they hold fields or enum values the receiver's schema does
    /// not define (this device and the cloud run neighbouring schema versions): down items this
    /// device kept, plus up items the cloud kept.
    pub kept_from_neighbour_schema: u64,
    /// The cloud's schema version tag, when it differs from this device's (set at each welcome).
    pub cloud_schema: Option<String>,
    /// Database transactions the agent's event loop ran since it started: reads and writes
    /// (the application's own writes are not counted). What syncing costs the device: per
    /// acknowledged write of a device that writes now and then, one read (the new outbox entry)
    /// and one write (its removal once the cloud answered); a batch of writes answered at once
    /// shares them.
    pub db_reads: u64,
    pub db_writes: u64,
    /// The last error; cleared when the cloud welcomes a session.
    pub last_error: Option<String>,
    /// Why the agent is not connected, while it is not: `cannot connect: ...` with the kind of
    /// failure (the broker refused the credentials, it is unreachable, the TLS handshake failed)
    /// and what to check, or `connection lost: ...` while it reconnects. `None` while connected
    /// and before the first attempt ends.
    pub connection: Option<String>,
}

/// Shared by the database's commit hook and the event loop: what the bounded input queue could
/// not take.
#[derive(Default)]
pub(crate) struct Inbox {
    /// Set when a notification was lost; the event loop clears it and reloads from the database.
    missed: AtomicBool,
    /// Notifications lost since the start.
    missed_total: AtomicU64,
    /// Wakes the event loop when a notification was lost (the queue may be drained already).
    wake: Notify,
}

impl Inbox {
    /// Queues `input` without ever blocking the caller (a database writer); when the queue is
    /// full the input is recorded as missed instead.
    pub(crate) fn offer(&self, tx: &mpsc::Sender<driver::Input>, input: driver::Input) {
        match tx.try_send(input) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.missed_total.fetch_add(1, Ordering::Relaxed);
                // One warning per reload, not per lost notification.
                if !self.missed.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        "the agent's input queue is full: the event loop will reload the outbox \
                         and the pending commands from the database (raise input_queue if this \
                         repeats)"
                    );
                }
                self.wake.notify_one();
            }
            // The event loop has stopped: nothing is waiting for the notification.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Whether notifications were lost since the last call (clears the flag).
    pub(crate) fn take_missed(&self) -> bool {
        self.missed.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn missed_total(&self) -> u64 {
        self.missed_total.load(Ordering::Relaxed)
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }
}

/// A running agent. Dropping it does not stop the event loop: call [`Agent::shutdown`].
pub struct Agent {
    id: DeviceId,
    db: Db,
    /// The agent opened the database (and closes it at shutdown), or was given it.
    owns_db: bool,
    /// The commit hook that feeds the event loop, removed at shutdown.
    commit_hook: HookId,
    handlers: Handlers,
    inputs: mpsc::Sender<driver::Input>,
    inbox: Arc<Inbox>,
    status: watch::Receiver<AgentStatus>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// The command model's name (the local API offers its pending items to applications).
    command_model: String,
    /// This device's HLC node id (tells the commands the cloud wrote from the device's own).
    node: u64,
    /// The agent keeps the local change log ([`AgentConfig::change_log`]).
    change_log: bool,
}

impl Agent {
    /// Opens the database (the file at `db_path`, or in memory with `db_in_memory`) and starts
    /// replicating, on the current tokio runtime.
    pub fn start(config: AgentConfig, schema: Arc<Schema>) -> Result<Agent, AgentError> {
        // A configuration that cannot work leaves no database file behind.
        DeviceId::new(config.account.clone(), config.device.clone())?;
        config.credentials()?;
        let db = if config.db_in_memory {
            Db::open_in_memory(schema, config.db_options())?
        } else {
            Db::open(&config.db_path, schema, config.db_options())?
        };
        let mut agent = Agent::start_with_db(config, db)?;
        agent.owns_db = true;
        Ok(agent)
    }

    /// Starts replicating a database the caller opened (with the schema it was opened for);
    /// the database settings of `config` are not used. [`Agent::shutdown`] flushes it but does
    /// not close it: a caller can start another agent on it later, as a device that restarts
    /// (the fleet simulator does so with in-memory databases). One agent at a time per database.
    pub fn start_with_db(config: AgentConfig, db: Db) -> Result<Agent, AgentError> {
        let schema = db.schema().clone();
        let id = DeviceId::new(config.account.clone(), config.device.clone())?;
        // With a client certificate alone the broker identifies the device by its certificate,
        // and the CONNECT carries no username or password.
        let secret = config.credentials()?.0.map(str::to_string);
        if let Some(problem) = devtables_sync::wire::schema_tag_problem(schema.tag()) {
            return Err(AgentError::Config(problem));
        }
        if let Some(old) = db.write(Origin::Remote, |t| state::note_schema(t, schema.tag()))? {
            tracing::info!(
                device = %id, from = %old, to = %schema.tag(),
                "the device's schema changed: catching up the cloud's feed from the start, so \
                 what the old schema could not hold arrives now"
            );
        }
        changelog::on_start(&db, config.change_log.is_some())?;
        let restored = state::restore(&db)?;
        let node = node_id_for(&id.node_name());
        let clock = match restored.last_hlc {
            Some(last) => HlcClock::restore(node, last),
            None => HlcClock::new(node),
        };
        let clock = Arc::new(Mutex::new(clock));
        let cloud_offset_ms = Arc::new(AtomicI64::new(0));
        let push_overhead = devtables_sync::wire::up_overhead(
            schema.tag(),
            &UpMsg::Push {
                batch: u64::MAX,
                changes: Vec::new(),
                session: None,
            },
        );
        let outbox = state::OutboxRecorder {
            schema: schema.clone(),
            clock: clock.clone(),
            cloud_offset_ms: cloud_offset_ms.clone(),
            limit: config.outbox_limit,
            max_change_bytes: config
                .sync
                .max_batch_bytes
                .min(config.sync.wire.max_message_bytes)
                .saturating_sub(push_overhead),
        };
        let interceptor: Arc<dyn devtables_db::WriteInterceptor> = match config.change_log {
            Some(limits) => Arc::new(changelog::WithChangeLog {
                outbox,
                log: changelog::ChangeLogRecorder {
                    schema: schema.clone(),
                    limits,
                },
            }),
            None => Arc::new(outbox),
        };
        db.set_interceptor(Some(interceptor));

        if config.input_queue == 0 {
            return Err(AgentError::Config("input_queue must be at least 1".into()));
        }
        let (inputs_tx, inputs) = mpsc::channel(config.input_queue);
        let inbox = Arc::new(Inbox::default());
        let hook_schema = schema.clone();
        let command_model = config.command_model.clone();
        let (hook_tx, hook_inbox) = (inputs_tx.clone(), inbox.clone());
        let commit_hook = db.subscribe(Arc::new(move |change: &ItemChange| {
            on_commit(&hook_schema, &command_model, &hook_tx, &hook_inbox, change)
        }));

        let mut sync = config.sync.clone();
        if sync.seed == 0 {
            sync.seed = node ^ devtables_db::system_now_ms() as u64;
        }
        let dropped = state::dropped(&db)?;
        let initial = AgentStatus {
            cursor: restored.cursor,
            pending: restored.outbox.len(),
            dropped,
            ..AgentStatus::default()
        };
        let outbox_status = outbox_status::OutboxStatus::new(
            config.outbox_limit,
            restored.outbox.len() as u64,
            dropped,
        );
        let engine = DeviceEngine::new(
            sync,
            schema.tag().to_string(),
            Restored {
                cursor: restored.cursor,
                outbox: restored.outbox,
                mark: restored.mark,
                answered: restored.answered,
            },
        );
        // If the connection dies, the broker tells the cloud on the device's behalf.
        let bye = devtables_sync::wire::encode_up(schema.tag(), &UpMsg::Bye, &config.sync.wire)
            .map_err(|e| AgentError::Config(format!("cannot encode the last will: {e}")))?;
        let up_topic = devtables_sync::topics::up_topic(&config.topic_prefix, &id);
        let max_packet = config.sync.wire.max_message_bytes + 4096;
        let transport = match &config.tls {
            Some(tls) => {
                let tls_config =
                    tls::client_config(tls).map_err(|e| AgentError::Config(e.to_string()))?;
                Some(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config)),
                ))
            }
            None => None,
        };
        let addresses = config.broker_addresses();
        if transport.is_none() {
            let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            tracing::warn!(
                device = %id,
                "MQTT to {} is in clear text (no TLS configured): the device secret and its \
                 items cross the network readable",
                list.join(", ")
            );
        }
        // The same options for every address of the broker (rumqttc holds the address in them).
        let options_for = |broker: &config::BrokerAddress| {
            let mut options = MqttOptions::new(id.node_name(), broker.host.clone(), broker.port);
            options.set_keep_alive(config.keep_alive);
            options.set_clean_session(true);
            if let Some(secret) = &secret {
                options.set_credentials(id.node_name(), secret.clone());
            }
            options.set_last_will(LastWill::new(
                up_topic.clone(),
                bye.clone(),
                QoS::AtLeastOnce,
                false,
            ));
            options.set_max_packet_size(max_packet, max_packet);
            if let Some(transport) = &transport {
                options.set_transport(transport.clone());
            }
            options
        };
        let addresses: Vec<_> = addresses
            .into_iter()
            .map(|broker| {
                let options = options_for(&broker);
                (broker, options)
            })
            .collect();
        let first = addresses[0].clone();
        let brokers = link::BrokerRotation::new(addresses)
            .ok_or_else(|| AgentError::Config("no broker address".into()))?;
        let (client, mut eventloop) = AsyncClient::new(first.1, config.mqtt_queue);
        // Small protocol messages must not wait for the delayed-ACK timer (about 40 ms).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let initial = AgentStatus {
            broker: Some(first.0.to_string()),
            ..initial
        };

        let (status_tx, status) = watch::channel(initial);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (link_tx, link_rx) = mpsc::channel(link::LINK_EVENTS);
        let (abandon_tx, abandon_rx) = mpsc::channel(1);
        let link_task = tokio::spawn(link::run(
            eventloop,
            brokers,
            link_tx,
            shutdown_rx.clone(),
            abandon_rx,
            link::Backoff::new(config.reconnect_delay, config.reconnect_max_delay),
        ));
        let handlers: Handlers = Arc::default();
        let driver = driver::Driver {
            id: id.clone(),
            db: counted::CountedDb::new(db.clone()),
            schema,
            engine,
            clock,
            cloud_offset_ms,
            node,
            client,
            link: link_rx,
            link_task: Some(link_task),
            abandon: abandon_tx,
            subscribe_give_up: config.subscribe_give_up,
            deaf_give_up: config.subscribe_give_up,
            deaf_at: None,
            progress: (false, 0, 0, 0),
            prefix: config.topic_prefix.clone(),
            inputs,
            inbox: inbox.clone(),
            shutdown: shutdown_rx,
            status: status_tx,
            handlers: handlers.clone(),
            command_model: config.command_model.clone(),
            started: Instant::now(),
            bye,
            mqtt_queue: config.mqtt_queue,
            publish_dropped: 0,
            last_publish_warning: None,
            results: Vec::new(),
            result_attempts: config.command_result_attempts.max(1),
            result_backoff: config.command_result_backoff,
            max_result_retries: config.max_result_retries,
            gc: driver::GcState::new(&config),
            repush: None,
            hold_unhandled_commands: config.hold_unhandled_commands,
            subscribe_backoff: link::Backoff::new(
                config.reconnect_delay,
                config.reconnect_max_delay,
            ),
            outbox: outbox_status,
            turn_entries: driver::TurnEntries::default(),
            turn_entries_budget: config.sync.max_batch_bytes,
        };
        let task = tokio::spawn(driver.run());
        Ok(Agent {
            id,
            db,
            owns_db: false,
            commit_hook,
            handlers,
            inputs: inputs_tx,
            inbox,
            status,
            shutdown,
            task,
            command_model: config.command_model.clone(),
            node,
            change_log: config.change_log.is_some(),
        })
    }

    pub fn id(&self) -> &DeviceId {
        &self.id
    }

    /// The device database: read and write it as usual; synced models replicate.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Runs `handler` for every command item named `name` that arrives with status `pending`;
    /// the result is written back to the item (status `done` or `failed`, and `result`).
    /// Commands named `name` already waiting in the database (they arrived before a crash, or
    /// before this registration) run too: a handler runs at least once per command, and may run
    /// again for a command whose result was not stored before a crash.
    pub fn on_command(&self, name: &str, handler: CommandHandler) {
        self.handlers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .commands
            .insert(name.to_string(), handler);
        self.inbox
            .offer(&self.inputs, driver::Input::Recover(name.to_string()));
    }

    /// Called for every local change the cloud rejects.
    pub fn on_rejected(&self, hook: RejectedHook) {
        self.handlers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rejected
            .push(hook);
    }

    /// Called with every batch of outbox entries the cloud answered for, after they left the
    /// durable outbox (see [`AckedHook`]). It runs on the agent's task: keep it short.
    pub fn on_acked(&self, hook: AckedHook) {
        self.handlers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .acked
            .push(hook);
    }

    /// The current status. `pending` is read from the durable outbox at the time of the call.
    pub fn status(&self) -> AgentStatus {
        let mut status = self.status.borrow().clone();
        match state::outbox_len(&self.db) {
            Ok(n) => status.pending = n as usize,
            Err(e) => tracing::warn!(device = %self.id, "cannot read the outbox size: {e}"),
        }
        status
    }

    /// A receiver that sees every status change.
    pub fn watch_status(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Stops the event loop, flushes the database and closes it if [`Agent::start`] opened it.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        self.db.unsubscribe(self.commit_hook);
        if !self.owns_db {
            // The caller keeps the database and may write to it unlogged: no clean stop is
            // recorded, so the next agent with the change log begins a new era.
            self.db.set_interceptor(None);
            return;
        }
        // The interceptor stays until the file is closed: a TTL purge after the clean-stop mark
        // is still logged (and then the mark no longer matches: the next start begins a new
        // era, which costs readers a re-read, never a missed change).
        if self.change_log {
            if let Err(e) = changelog::mark_clean_stop(&self.db) {
                tracing::error!(device = %self.id, "cannot mark the change log complete: {e}");
            }
        }
        if let Err(e) = self.db.close() {
            tracing::error!(device = %self.id, "closing the database failed: {e}");
        }
    }
}

/// The size of the durable outbox of a database an agent ran on: the local changes not yet
/// acknowledged (what [`AgentStatus::pending`] shows), readable while no agent runs.
pub fn outbox_len(db: &Db) -> Result<u64, DbError> {
    state::outbox_len(db)
}

/// The database's commit hook: tells the event loop about committed local changes of synced
/// models and about commands that arrived. It runs on the writer's thread and never blocks.
fn on_commit(
    schema: &Schema,
    command_model: &str,
    inputs: &mpsc::Sender<driver::Input>,
    inbox: &Inbox,
    change: &ItemChange,
) {
    let Some(model) = schema.model(&change.model) else {
        return;
    };
    match change.origin {
        Origin::Local if model.process().syncs_up() => {
            inbox.offer(inputs, driver::Input::LocalChange(change.key.clone()));
        }
        Origin::Remote if change.model == command_model => {
            let Some(item) = &change.new else { return };
            if !commands::is_pending(item) {
                return;
            }
            let name = commands::name_of(item);
            inbox.offer(inputs, driver::Input::Command(name, item.clone()));
        }
        _ => {}
    }
}

/// Test access to the replication state, for the store-conformance suite
/// (`devtables-conformance`): the same recorder, transaction and restore the agent runs, over a
/// database the test opened. Not an API: hidden, and free to change with the suite.
#[doc(hidden)]
pub mod testing {
    use std::sync::atomic::AtomicI64;
    use std::sync::{Arc, Mutex};

    use devtables_db::{Db, DbError, Origin};
    use devtables_schema::{ItemKey, Schema};
    use devtables_sync::apply::{DeviceTxn, FeedMark, StoredVersion};
    use devtables_sync::hlc::{Hlc, HlcClock};
    use devtables_sync::wire::Change;

    use crate::state;

    /// Installs the outbox recorder on `db`, as [`crate::Agent::start`] does, with a clock for
    /// `node` restored from the database; returns the clock.
    pub fn install_recorder(
        db: &Db,
        schema: Arc<Schema>,
        node: u64,
    ) -> Result<Arc<Mutex<HlcClock>>, DbError> {
        let restored = state::restore(db)?;
        let clock = Arc::new(Mutex::new(match restored.last_hlc {
            Some(last) => HlcClock::restore(node, last),
            None => HlcClock::new(node),
        }));
        db.set_interceptor(Some(Arc::new(state::OutboxRecorder {
            schema,
            clock: clock.clone(),
            cloud_offset_ms: Arc::new(AtomicI64::new(0)),
            limit: u64::MAX,
            max_change_bytes: usize::MAX,
        })));
        Ok(clock)
    }

    /// Runs `f` over the agent's [`DeviceTxn`] in one remote write transaction, as the driver
    /// applies a page; commits when `commit` is true and `f` succeeds, rolls back otherwise (by
    /// refusing the transaction with [`super::RolledBackOnPurpose`], which no stored-data check can
    /// mistake for damage).
    pub fn device_txn<R>(
        db: &Db,
        schema: &Schema,
        commit: bool,
        f: impl FnOnce(&mut dyn DeviceTxn<Error = DbError>) -> Result<R, DbError>,
    ) -> Result<R, DbError> {
        let mut out = None;
        let res = db.write(Origin::Remote, |txn| {
            let mut t = state::AgentTxn { txn, schema };
            out = Some(f(&mut t)?);
            if commit {
                Ok(())
            } else {
                Err(DbError::Refused(Box::new(super::RolledBackOnPurpose)))
            }
        });
        match (res, out) {
            (Ok(()), Some(r)) => Ok(r),
            (Err(DbError::Refused(e)), Some(r)) if e.is::<super::RolledBackOnPurpose>() => Ok(r),
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(DbError::Corrupt("the transaction ran nothing".into())),
        }
    }

    /// The version the agent holds for a key (item or tombstone).
    pub fn stored_version(
        db: &Db,
        schema: &Schema,
        key: &ItemKey,
    ) -> Result<Option<StoredVersion>, DbError> {
        device_txn(db, schema, false, |t| t.stored_version("", key))
    }

    /// Removes acknowledged outbox entries and raises the answered count, as the driver does
    /// on `OutboxRemove`.
    pub fn outbox_remove(
        db: &Db,
        acked: &[(String, ItemKey, Hlc)],
        answered: Option<u64>,
    ) -> Result<u64, DbError> {
        db.write(Origin::Remote, |txn| {
            state::outbox_remove(txn, acked, answered)
        })
    }

    /// Replaces the answered count, as the driver does on `StoreAnswered`.
    pub fn store_answered(db: &Db, answered: u64) -> Result<(), DbError> {
        db.write(Origin::Remote, |txn| state::store_answered(txn, answered))
    }

    /// The whole re-push after a cloud restore, as the driver runs it on `Repush`, in slices of
    /// `slice` held writes examined: (entries added, slices).
    pub fn repush(
        db: &Db,
        schema: &Schema,
        clock: &Mutex<HlcClock>,
        slice: usize,
    ) -> Result<(u64, u64), DbError> {
        let mut pos = state::RepushPos::Items {
            model: 0,
            next: None,
        };
        let (mut requeued, mut slices) = (0, 0);
        loop {
            let stamp = devtables_db::system_now_ms().max(0) as u64;
            let done = state::repush_slice(db, schema, clock, stamp, pos, slice)?;
            requeued += done.requeued.len() as u64;
            slices += 1;
            match done.next {
                Some(next) => pos = next,
                None => return Ok((requeued, slices)),
            }
        }
    }

    /// What a restart restores.
    pub struct Restore {
        /// The feed cursor.
        pub cursor: u64,
        /// The outbox, oldest first.
        pub outbox: Vec<Change>,
        /// The last issued version.
        pub last_hlc: Option<Hlc>,
        /// The feed mark.
        pub mark: FeedMark,
        /// The answered count.
        pub answered: u64,
    }

    /// What a restart restores: the cursor, the outbox (oldest first), the last issued
    /// version, the feed mark and the answered count.
    pub fn restore(db: &Db) -> Result<Restore, DbError> {
        let r = state::restore(db)?;
        let mut outbox = Vec::with_capacity(r.outbox.len());
        for meta in &r.outbox {
            if let Some(change) = state::outbox_entry(db, &meta.key)? {
                outbox.push(change);
            }
        }
        Ok(Restore {
            cursor: r.cursor,
            outbox,
            last_hlc: r.last_hlc,
            mark: r.mark,
            answered: r.answered,
        })
    }
}

/// The error a conformance transaction that must not commit returns to roll itself back.
#[doc(hidden)]
#[derive(Debug, thiserror::Error)]
#[error("rolled back on purpose")]
pub struct RolledBackOnPurpose;
