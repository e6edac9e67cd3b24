//! The agent's event loop: the thin driver around [`DeviceEngine`].
//!
//! One task owns the engine and feeds it a closed set of inputs (MQTT events, committed local
//! changes, commands to run, timer expiry, shutdown); after each input it drains the engine's
//! outputs in the documented order: storage actions, transmits, events, then the next timeout.
//! It makes no protocol decision of its own.
//!
//! Besides the engine it keeps four pieces of bounded housekeeping: command results waiting
//! for another write attempt (`commands`), the periodic collection of the `versions` table in
//! slices (`GcState`), the re-push after a cloud restore in slices (`RepushScan`), and the
//! reload of the durable outbox when the input queue overflowed.
//!
//! Every database transaction it runs is counted ([`CountedDb`]), and it runs few per
//! application write: the turn that handles a write's notification reads its outbox entry once
//! (the batch built in the same turn is served from it, [`TurnEntries`]) and the outbox's size
//! once for the status; the turn that handles the cloud's answer trims every entry it answered
//! in one write, which says how many it removed. The status's view of the outbox is read only
//! when it may have changed ([`OutboxStatus`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devtables_db::Origin;
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::device_apply;
use devtables_sync::device::{DeviceAction, DeviceEngine, DeviceEvent};
use devtables_sync::hlc::HlcClock;
use devtables_sync::identity::DeviceId;
use devtables_sync::topics;
use devtables_sync::wire;
use rumqttc::{AsyncClient, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch};

use crate::commands::{self, ResultRetry};
use crate::config::AgentConfig;
use crate::counted::{CountedDb, DbAccess};
use crate::link::{ConnectFailure, LinkEvent};
use crate::outbox_status::OutboxStatus;
use crate::state::{self, AgentTxn};
use crate::{AgentStatus, CommandHandler, Handlers, Inbox};

/// Shortest pause between two warnings about dropped publishes.
const PUBLISH_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Held writes examined per transaction of a re-push after a cloud restore: each slice is one
/// write transaction, so the event loop (and the application's writes) wait at most one slice.
const REPUSH_SLICE: usize = 500;

/// How long a re-push waits before retrying a slice whose transaction failed.
const REPUSH_RETRY: Duration = Duration::from_secs(1);

/// Inputs from outside the event loop.
pub(crate) enum Input {
    /// A local write of a synced model committed; its outbox entry is ready.
    LocalChange(ItemKey),
    /// A command item arrived from the cloud with status `pending`.
    Command(String, Item),
    /// A handler was registered for this command name: run the pending commands in the database.
    Recover(String),
}

/// Where the collection of the `versions` table stands.
pub(crate) struct GcState {
    retention_ms: u64,
    interval: Duration,
    slice: usize,
    /// When the next slice runs.
    due: tokio::time::Instant,
    /// Where the next slice starts, while a pass is under way.
    next: Option<Vec<u8>>,
}

impl GcState {
    pub(crate) fn new(config: &AgentConfig) -> GcState {
        GcState {
            retention_ms: config.tombstone_retention.as_millis() as u64,
            interval: config.version_gc_interval,
            slice: config.version_gc_slice.max(1),
            due: tokio::time::Instant::now() + config.version_gc_interval,
            next: None,
        }
    }
}

/// A re-push after a cloud restore, under way ([`DeviceAction::Repush`]): one slice at a time,
/// between the other inputs; the engine sends no push until it ends.
pub(crate) struct RepushScan {
    /// Where the next slice starts.
    pos: state::RepushPos,
    /// Held writes put back so far.
    count: u64,
    /// When the next slice runs (later after a failed one).
    due: tokio::time::Instant,
}

/// Why a command runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// It arrived (the commit hook's notification).
    Arrived,
    /// It was found pending in the database.
    Found,
}

/// The outbox entries read in one turn of the event loop for its notified writes, kept until
/// the turn ends so that the batch the engine builds from them in the same turn
/// ([`DeviceAction::LoadBatch`]) is not read again. Bounded by bytes (one batch's worth), and
/// emptied by every transaction of the event loop's own: an entry served from here is what a
/// read at the start of the turn returned, as if the batch had been read then.
#[derive(Default)]
pub(crate) struct TurnEntries {
    entries: HashMap<ItemKey, wire::Change>,
    bytes: usize,
}

impl TurnEntries {
    /// Keeps `change` if it fits in `budget` bytes with the others.
    fn keep(&mut self, change: &wire::Change, budget: usize) {
        let len = wire::change_len(change);
        if self.bytes.saturating_add(len) <= budget {
            self.bytes += len;
            self.entries.insert(change.key.clone(), change.clone());
        }
    }

    fn take(&mut self, key: &ItemKey) -> Option<wire::Change> {
        self.entries.remove(key)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

/// Longest wait for the SUBACK of the device's subscription before asking again (at least; the
/// subscription backoff's wait when longer).
const SUBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Subscriptions sent on one connection, refused or left unanswered, before the driver gives
/// the connection up (once it has also been up for [`AgentConfig::subscribe_give_up`]) and the
/// link moves to the next broker address: a node of a broker cluster may refuse (or hold)
/// subscriptions for minutes after losing a peer, while another node grants at once.
///
/// [`AgentConfig::subscribe_give_up`]: crate::AgentConfig::subscribe_give_up
const SUBSCRIBES_PER_CONNECTION: u32 = 3;

/// The longest a connection may stay deaf before it is given up, in multiples of
/// [`AgentConfig::subscribe_give_up`] (20 s × 32: about ten minutes): a cloud that is down
/// costs each device a reconnect that often, no more.
///
/// [`AgentConfig::subscribe_give_up`]: crate::AgentConfig::subscribe_give_up
const DEAF_GIVE_UP_CEILING: u32 = 32;

pub(crate) struct Driver {
    pub(crate) id: DeviceId,
    /// The device database; every transaction through it is counted (`db_reads`, `db_writes`).
    pub(crate) db: CountedDb,
    pub(crate) schema: Arc<Schema>,
    pub(crate) engine: DeviceEngine,
    pub(crate) clock: Arc<Mutex<HlcClock>>,
    /// Cloud time minus this device's clock (ms), shared with the outbox recorder.
    pub(crate) cloud_offset_ms: Arc<AtomicI64>,
    /// This device's HLC node id (tells its own writes from the cloud's).
    pub(crate) node: u64,
    pub(crate) client: AsyncClient,
    /// Events of the MQTT connection task ([`crate::link`]).
    pub(crate) link: mpsc::Receiver<LinkEvent>,
    /// That task, awaited at shutdown so the goodbye goes out.
    pub(crate) link_task: Option<tokio::task::JoinHandle<()>>,
    /// Tells that task to give the connection up (why), so it moves to the next address.
    pub(crate) abandon: mpsc::Sender<String>,
    /// Least time a connection stays up without its subscription before it is given up.
    pub(crate) subscribe_give_up: Duration,
    /// How long the next connection may stay deaf (the session waits for an answer, its hello's
    /// or its pushes', and none comes) before it is given up: `subscribe_give_up`, doubled for
    /// each deaf connection in a row (a cloud that is down is deaf on every connection), reset
    /// by an answer.
    pub(crate) deaf_give_up: Duration,
    /// When this connection counts as deaf: the clock runs while the session waits for an
    /// answer and starts again with every answer (a welcome, an acknowledgement, a feed page,
    /// a busy or rate-limit refusal).
    pub(crate) deaf_at: Option<tokio::time::Instant>,
    /// What the cloud's answers moved last: (ready, pushes acknowledged, feed cursor, busy or
    /// rate-limit refusals).
    pub(crate) progress: (bool, u64, u64, u64),
    pub(crate) prefix: String,
    pub(crate) inputs: mpsc::Receiver<Input>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) status: watch::Sender<AgentStatus>,
    pub(crate) handlers: Handlers,
    pub(crate) command_model: String,
    /// Monotonic origin of the engine's clock (ms since the agent started).
    pub(crate) started: Instant,
    /// The encoded `Bye` (also the MQTT last will), sent before a clean disconnect.
    pub(crate) bye: Vec<u8>,
    /// The MQTT client's request queue capacity (for the warning).
    pub(crate) mqtt_queue: usize,
    /// Publishes the MQTT client's full request queue refused.
    pub(crate) publish_dropped: u64,
    pub(crate) last_publish_warning: Option<Instant>,
    /// Command results waiting for another write attempt (at most `max_result_retries`).
    pub(crate) results: Vec<ResultRetry>,
    pub(crate) result_attempts: u32,
    pub(crate) result_backoff: Duration,
    pub(crate) max_result_retries: usize,
    pub(crate) gc: GcState,
    /// The re-push after a cloud restore, while one is under way.
    pub(crate) repush: Option<RepushScan>,
    /// A command without a handler stays pending (for an application to take through the local
    /// API) instead of failing with "no handler" ([`AgentConfig::hold_unhandled_commands`]).
    pub(crate) hold_unhandled_commands: bool,
    /// The waits before subscribing again after the broker refused a subscription (reset by
    /// every connection).
    pub(crate) subscribe_backoff: crate::link::Backoff,
    /// The status's view of the durable outbox (`pending`, `dropped`).
    pub(crate) outbox: OutboxStatus,
    /// Outbox entries read this turn, for the batch built in the same turn.
    pub(crate) turn_entries: TurnEntries,
    /// Most bytes of entries kept in `turn_entries` (one batch's worth).
    pub(crate) turn_entries_budget: usize,
}

impl Driver {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The time versions are stamped with: this device's clock corrected by the cloud's.
    fn stamp_ms(&self) -> u64 {
        devtables_db::system_now_ms()
            .saturating_add(self.cloud_offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    pub(crate) async fn run(mut self) {
        let mut connected = false;
        // The address of the last connection made, to tell a failover from a reconnect.
        let mut last_broker: Option<crate::config::BrokerAddress> = None;
        // When to subscribe again after the broker refused the subscription.
        let mut resubscribe_at: Option<tokio::time::Instant> = None;
        // The protocol session runs on this connection: its subscription was granted.
        let mut session = false;
        // SUBSCRIBEs sent on this connection, and when it came up.
        let mut subscribes: u32 = 0;
        let mut connected_at = tokio::time::Instant::now();
        loop {
            let deadline = self.engine.poll_timeout().map(|at| {
                let wait = at.saturating_sub(self.now());
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let resubscribe = async {
                match resubscribe_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let retry_due = self.results.iter().map(|r| r.due).min();
            let retry = async {
                match retry_due {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let deaf_at = self.deaf_at;
            let deaf = async {
                match deaf_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let gc_due = self.gc.due;
            let repush_due = self.repush.as_ref().map(|r| r.due);
            let repush = async {
                match repush_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = self.link.recv() => match event {
                    Some(LinkEvent::Connected { broker }) => {
                        connected = true;
                        session = false;
                        self.subscribe_backoff.reset();
                        subscribes = 0;
                        connected_at = tokio::time::Instant::now();
                        self.deaf_at = None;
                        resubscribe_at = self.subscribe(&mut subscribes);
                        let failover = last_broker.as_ref().is_some_and(|last| *last != broker);
                        if failover {
                            tracing::info!(device = %self.id, "connected to the broker at {broker} (another address than the last connection's)");
                        } else {
                            tracing::info!(device = %self.id, "connected to the broker at {broker}");
                        }
                        self.set_status(|s| {
                            s.connected = true;
                            s.connection = None;
                            s.broker = Some(broker.to_string());
                            s.broker_failovers += u64::from(failover);
                        });
                        last_broker = Some(broker);
                    }
                    Some(LinkEvent::SubAck { granted: true }) => {
                        // The cloud's answers have somewhere to arrive: the session starts (a
                        // hello). A SUBACK of an earlier attempt on this connection changes
                        // nothing once it runs.
                        if connected && !session {
                            session = true;
                            resubscribe_at = None;
                            let now = self.now();
                            self.engine.handle_connected(now);
                        }
                    }
                    Some(LinkEvent::SubAck { granted: false }) => {
                        let wait = self.subscribe_backoff.next_wait();
                        tracing::warn!(device = %self.id, "the broker refused the subscription to the device's topics; subscribing again in {wait:?}");
                        if connected && !session {
                            resubscribe_at = Some(tokio::time::Instant::now() + wait);
                        }
                        self.set_status(|s| {
                            s.subscriptions_refused += 1;
                            s.last_error = Some("the broker refused the subscription to the device's topics".into());
                        });
                    }
                    Some(LinkEvent::Message(payload)) => {
                        let now = self.now();
                        self.engine.handle_message(now, &payload);
                    }
                    Some(LinkEvent::Lost { broker, next, was_connected, error, failure, warn }) => {
                        let then = match &next {
                            Some(next) => format!("; the next attempt goes to {next}"),
                            None => String::new(),
                        };
                        let trying = next.as_ref().unwrap_or(&broker).to_string();
                        // The next connection subscribes anew.
                        resubscribe_at = None;
                        self.deaf_at = None;
                        session = false;
                        if was_connected {
                            tracing::warn!(device = %self.id, "MQTT connection lost: {error} (broker {broker}{then})");
                            connected = false;
                            let now = self.now();
                            self.engine.handle_disconnected(now);
                            self.set_status(|s| {
                                s.disconnects += 1;
                                s.connected = false;
                                s.ready = false;
                                s.last_error = Some(error.clone());
                                s.connection = Some(format!("connection lost: {error} (broker {broker}); reconnecting"));
                                s.broker = Some(trying);
                            });
                        } else {
                            // Said as a warning when it is news (link::FailureLog), so a device
                            // that cannot connect tells why without a line per retry.
                            let said = failure.unwrap_or(ConnectFailure::Other).describe(&broker, &error);
                            if warn {
                                tracing::warn!(device = %self.id, "{said}; retrying with backoff{then}");
                            } else {
                                tracing::debug!(device = %self.id, "{said}{then}");
                            }
                            self.set_status(|s| {
                                s.last_error = Some(error.clone());
                                s.connection = Some(said);
                                s.broker = Some(trying);
                            });
                        }
                    }
                    None => break,
                },
                input = self.inputs.recv() => match input {
                    Some(input) => self.handle_input(input),
                    None => break,
                },
                _ = sleep => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                }
                _ = retry => self.retry_results(),
                _ = resubscribe => {
                    resubscribe_at = None;
                    if connected && !session {
                        if subscribes >= SUBSCRIBES_PER_CONNECTION
                            && connected_at.elapsed() >= self.subscribe_give_up
                        {
                            self.abandon_connection(subscribes);
                        } else {
                            resubscribe_at = self.subscribe(&mut subscribes);
                        }
                    }
                }
                _ = deaf => {
                    self.deaf_at = None;
                    if connected && session {
                        self.abandon_deaf_connection();
                    }
                }
                _ = tokio::time::sleep_until(gc_due) => self.collect_versions().await,
                _ = repush => self.repush_slice().await,
                _ = self.inbox.woken() => {}
                _ = self.shutdown.changed() => {}
            }
            if *self.shutdown.borrow() {
                break;
            }
            if self.inbox.take_missed() {
                self.reload();
            }
            self.drain_outputs().await;
            self.watch_answers(connected && session);
        }
        if connected {
            // A clean disconnect suppresses the last will: say goodbye first; the link task
            // lets both out before it ends.
            let topic = topics::up_topic(&self.prefix, &self.id);
            let _ = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, self.bye.clone());
            let _ = self.client.try_disconnect();
        }
        if let Some(task) = self.link_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(device = %self.id, "final flush failed: {e}");
        }
    }

    /// Subscribes to the device's own down topic and its account's broadcast topic in one
    /// SUBSCRIBE (one SUBACK says whether both hold). Returns when to try again if the request
    /// could not even be queued, or when no SUBACK arrives by then.
    /// `sent` counts the SUBSCRIBEs queued on this connection.
    fn subscribe(&mut self, sent: &mut u32) -> Option<tokio::time::Instant> {
        let filters = [
            topics::down_topic(&self.prefix, &self.id),
            topics::broadcast_topic(&self.prefix, &self.id.account),
        ]
        .map(|topic| SubscribeFilter::new(topic, QoS::AtLeastOnce));
        match self.client.try_subscribe_many(filters) {
            // Asked again if no SUBACK came by then: a broker busy electing leaders (NATS's
            // MQTT gateway after a node's loss) may hold the request unanswered, and the device
            // would stay connected and deaf. A SUBACK of an earlier attempt changes nothing.
            Ok(()) => {
                *sent += 1;
                Some(
                    tokio::time::Instant::now()
                        + self.subscribe_backoff.next_wait().max(SUBACK_WAIT),
                )
            }
            Err(e) => {
                let wait = self.subscribe_backoff.next_wait();
                tracing::error!(device = %self.id, "cannot subscribe: {e}; trying again in {wait:?}");
                Some(tokio::time::Instant::now() + wait)
            }
        }
    }

    /// Gives the connection up after `subscribes` SUBSCRIBEs that were refused or left
    /// unanswered: the link drops it and connects to the next broker address (the same one
    /// when there is one), where the session starts afresh.
    fn abandon_connection(&mut self, subscribes: u32) {
        let reason = format!(
            "the broker did not grant the subscription to the device's topics ({subscribes} \
             attempts on this connection); giving the connection up"
        );
        self.set_status(|s| s.subscriptions_abandoned += 1);
        // The link task reads it while connected; if the connection dropped meanwhile, the
        // reason is discarded at the next CONNACK. Never waited for: a full channel already
        // holds a verdict, a closed one means the link ended.
        let _ = self.abandon.try_send(reason);
    }

    /// Runs the deaf-connection clock: while the session (`session`: the subscription granted)
    /// waits for an answer, its hello's or its pushes', the clock runs; every answer, seen in
    /// the status this turn left (ready, pushes acknowledged, feed cursor, busy refusals),
    /// starts it again.
    fn watch_answers(&mut self, session: bool) {
        let (ready, progress) = {
            let s = self.status.borrow();
            (s.ready, (s.ready, s.acked, s.cursor, s.throttled))
        };
        if progress != self.progress {
            self.progress = progress;
            self.cloud_answered();
        }
        let awaiting = session && (!ready || self.engine.in_flight() > 0);
        if !awaiting {
            self.deaf_at = None;
        } else if self.deaf_at.is_none() {
            self.deaf_at = Some(tokio::time::Instant::now() + self.deaf_give_up);
        }
    }

    /// The cloud answered on this connection: it is not deaf, and the next deaf one waits the
    /// base time.
    fn cloud_answered(&mut self) {
        self.deaf_at = None;
        self.deaf_give_up = self.subscribe_give_up;
    }

    /// Gives the connection up after the cloud answered nothing for `deaf_give_up` while the
    /// session waited (its hello, or pushes in flight); the next such connection in a row waits
    /// twice as long.
    fn abandon_deaf_connection(&mut self) {
        let waited = self.deaf_give_up;
        let reason = format!(
            "the cloud answered nothing on this connection in {waited:?} while the device \
             waited (its hello, or pushes in flight); giving the connection up"
        );
        self.deaf_give_up = waited
            .saturating_mul(2)
            .min(self.subscribe_give_up.saturating_mul(DEAF_GIVE_UP_CEILING));
        self.set_status(|s| s.deaf_connections += 1);
        // As for a refused subscription: never waited for; the link's warning says why.
        let _ = self.abandon.try_send(reason);
    }

    fn handle_input(&mut self, first: Input) {
        // Drain what is queued too: many local commits become one engine update each, read
        // from the committed outbox (the source of truth), deduplicated by key.
        let mut keys = BTreeSet::new();
        let mut commands = Vec::new();
        let mut recover = BTreeSet::new();
        let mut next = Some(first);
        while let Some(input) = next {
            match input {
                Input::LocalChange(key) => {
                    keys.insert(key);
                }
                Input::Command(name, item) => commands.push((name, item)),
                Input::Recover(name) => {
                    recover.insert(name);
                }
            }
            next = self.inputs.try_recv().ok();
        }
        let now = self.now();
        if !keys.is_empty() {
            self.outbox.local_writes();
        }
        for key in keys {
            match state::outbox_entry(&self.db, &key) {
                Ok(Some(change)) => {
                    self.turn_entries.keep(&change, self.turn_entries_budget);
                    self.engine.handle_local_change(now, change);
                }
                Ok(None) => {} // already acknowledged or superseded
                Err(e) => tracing::error!(device = %self.id, "cannot read the outbox: {e}"),
            }
        }
        for (name, item) in commands {
            self.run_command(&name, item, Trigger::Arrived);
        }
        if !recover.is_empty() {
            self.recover_commands(Some(&recover));
        }
        // A full outbox may have dropped lossy changes in those commits: the status reads the
        // count at the end of the turn if it may have moved (OutboxStatus).
    }

    /// Notifications were lost (the input queue was full): the durable outbox and the command
    /// items are the truth, so hand the engine every outbox entry again (it ignores versions it
    /// already holds) and run the commands still pending.
    fn reload(&mut self) {
        let missed = self.inbox.missed_total();
        self.set_status(|s| s.inputs_missed = missed);
        self.outbox.local_writes();
        match state::load_outbox(&self.db) {
            Ok(outbox) => {
                tracing::info!(device = %self.id, entries = outbox.len(), "reloading the outbox after missed notifications");
                let now = self.now();
                for meta in outbox {
                    self.engine.handle_local_change(now, meta);
                }
            }
            Err(e) => tracing::error!(device = %self.id, "cannot reload the outbox: {e}"),
        }
        self.recover_commands(None);
    }

    /// Runs the pending commands the cloud wrote whose handler is registered (the others wait
    /// for theirs); only those named in `names`, if given.
    fn recover_commands(&mut self, names: Option<&BTreeSet<String>>) {
        let found = match commands::pending_commands(
            &self.db,
            &self.schema,
            &self.command_model,
            self.node,
        ) {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(device = %self.id, "cannot search the pending commands: {e}");
                return;
            }
        };
        for item in found {
            let name = commands::name_of(&item);
            if names.is_some_and(|n| !n.contains(&name)) {
                continue;
            }
            self.run_command(&name, item, Trigger::Found);
        }
    }

    fn handler(&self, name: &str) -> Option<CommandHandler> {
        self.handlers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .commands
            .get(name)
            .cloned()
    }

    /// Runs the application's handler and writes the outcome back (it replicates up), unless
    /// the command is no longer pending (it already ran) or its result is waiting for a retry.
    fn run_command(&mut self, name: &str, item: Item, trigger: Trigger) {
        let Some(model) = self.schema.model(&self.command_model) else {
            return;
        };
        let Ok(key) = model.primary_key(&item) else {
            tracing::warn!(device = %self.id, command = name, "command item without a valid key: not run");
            return;
        };
        if self.results.iter().any(|r| r.key == key) {
            return;
        }
        // The same command can be announced twice (on arrival and by a recovery scan): only
        // the stored item says whether it still waits.
        match self.db.read().and_then(|r| r.get_stored(&key)) {
            Ok(Some((_, current))) if commands::is_pending(&current) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::error!(device = %self.id, command = name, "cannot read the command item: {e}");
                return;
            }
        }
        let handler = self.handler(name);
        if handler.is_none() && (trigger == Trigger::Found || self.hold_unhandled_commands) {
            // It runs when its handler is registered, or an application takes it through the
            // local API.
            return;
        }
        if trigger == Trigger::Found {
            tracing::info!(device = %self.id, command = name, key = ?key, "running a command found pending");
            self.set_status(|s| s.commands_recovered += 1);
        }
        let patch = commands::outcome(&self.schema, handler.as_ref(), name, &item);
        self.write_result(ResultRetry {
            name: name.to_string(),
            key,
            patch,
            attempts: 0,
            due: Instant::now(),
        });
    }

    /// One attempt to record a command's result; a failure that may pass is retried later.
    fn write_result(&mut self, mut r: ResultRetry) {
        let Err(e) = self.db.update(&self.command_model, &r.patch) else {
            if r.attempts > 0 {
                tracing::info!(device = %self.id, command = %r.name, attempts = r.attempts + 1, "command result recorded after retrying");
            }
            return;
        };
        r.attempts += 1;
        let reason = if !commands::retryable(&e) {
            "it cannot succeed"
        } else if r.attempts >= self.result_attempts {
            "no attempts left"
        } else if self.results.len() >= self.max_result_retries {
            "the retry queue is full"
        } else {
            let wait = commands::backoff(self.result_backoff, r.attempts);
            tracing::warn!(device = %self.id, command = %r.name, attempt = r.attempts, "cannot record the command result, retrying in {wait:?}: {e}");
            r.due = Instant::now() + wait;
            self.results.push(r);
            self.set_status(|s| s.command_result_retries += 1);
            return;
        };
        tracing::warn!(device = %self.id, command = %r.name, attempts = r.attempts, "command result given up ({reason}); the command stays pending and runs again after a restart: {e}");
        let message = format!("command {} result not recorded: {e}", r.name);
        self.set_status(|s| {
            s.command_results_abandoned += 1;
            s.last_error = Some(message);
        });
    }

    /// Attempts every result whose retry is due.
    fn retry_results(&mut self) {
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.results)
            .into_iter()
            .partition(|r| r.due <= now);
        self.results = waiting;
        for r in due {
            self.write_result(r);
        }
    }

    /// One slice of the collection of the `versions` table; the next slice follows at once
    /// while the pass lasts, then the next pass after the interval.
    async fn collect_versions(&mut self) {
        let db = self.db.clone();
        let schema = self.schema.clone();
        let start = self.gc.next.take().unwrap_or_default();
        let (slice, retention) = (self.gc.slice, self.gc.retention_ms);
        let result = tokio::task::spawn_blocking(move || {
            let now = devtables_db::system_now_ms().max(0) as u64;
            db.write(Origin::Remote, |txn| {
                state::collect_versions(txn, &schema, &start, slice, now, retention)
            })
        })
        .await;
        let done = match result {
            Ok(Ok(out)) => {
                if out.tombstones + out.unneeded > 0 {
                    tracing::debug!(device = %self.id, tombstones = out.tombstones, unneeded = out.unneeded, "versions collected");
                    self.set_status(|s| {
                        s.tombstones_collected += out.tombstones;
                        s.versions_collected += out.unneeded;
                    });
                }
                self.gc.next = out.next;
                self.gc.next.is_none()
            }
            Ok(Err(e)) => {
                tracing::error!(device = %self.id, "version collection failed: {e}");
                true
            }
            Err(e) => {
                tracing::error!(device = %self.id, "version collection task failed: {e}");
                true
            }
        };
        let now = tokio::time::Instant::now();
        self.gc.due = if done { now + self.gc.interval } else { now };
    }

    async fn drain_outputs(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(action) = self.engine.poll_action() {
                progressed = true;
                self.perform(action).await;
            }
            while let Some(bytes) = self.engine.poll_transmit() {
                progressed = true;
                let topic = topics::up_topic(&self.prefix, &self.id);
                let len = bytes.len() as u64;
                match self
                    .client
                    .try_publish(topic, QoS::AtLeastOnce, false, bytes)
                {
                    Ok(()) => self.set_status(|s| {
                        s.messages_up += 1;
                        s.bytes_up += len;
                    }),
                    // The engine retransmits unacknowledged batches on its own timer.
                    Err(e) => self.publish_failed(e),
                }
            }
            while let Some(event) = self.engine.poll_event() {
                progressed = true;
                self.on_event(event);
            }
            if !progressed {
                break;
            }
        }
        self.turn_entries.clear();
        let (cursor, in_flight, ready) = (
            self.engine.cursor(),
            self.engine.in_flight(),
            self.engine.is_ready(),
        );
        // The durable outbox is the truth: the engine may still hold a lossy entry the
        // outbox dropped, and the outbox holds entries whose notification is still queued.
        // It is read only when it may have changed (OutboxStatus); a failed read is tried
        // again after the next turn.
        let pending = match self.outbox.refresh(&self.db) {
            Ok(_) => self.outbox.pending() as usize,
            Err(e) => {
                tracing::debug!(device = %self.id, "cannot read the outbox size: {e}");
                self.engine.pending()
            }
        };
        let dropped = self.outbox.dropped();
        let (db_reads, db_writes) = (self.db.reads(), self.db.writes());
        self.set_status(|s| {
            s.cursor = cursor;
            s.pending = pending;
            s.dropped = dropped;
            s.in_flight = in_flight;
            s.ready = ready;
            s.db_reads = db_reads;
            s.db_writes = db_writes;
        });
    }

    /// The MQTT client's request queue was full: count it, warn now and then.
    fn publish_failed(&mut self, e: rumqttc::ClientError) {
        self.publish_dropped += 1;
        let dropped = self.publish_dropped;
        self.set_status(|s| s.publish_dropped = dropped);
        let quiet = self
            .last_publish_warning
            .is_some_and(|at| at.elapsed() < PUBLISH_WARNING_INTERVAL);
        if !quiet {
            self.last_publish_warning = Some(Instant::now());
            tracing::warn!(device = %self.id, dropped, mqtt_queue = self.mqtt_queue, "publish not queued, the protocol will resend it (MQTT request queue full): {e}");
        }
    }

    async fn perform(&mut self, action: DeviceAction) {
        if !matches!(action, DeviceAction::LoadBatch { .. }) {
            // A transaction of the event loop's own may change the outbox: what was read this
            // turn is no longer what a read would return.
            self.turn_entries.clear();
        }
        let db = self.db.clone();
        let schema = self.schema.clone();
        let clock = self.clock.clone();
        match action {
            DeviceAction::Apply(page) => {
                let result = tokio::task::spawn_blocking(move || {
                    db.write(Origin::Remote, |txn| {
                        let mut clock = clock.lock().unwrap_or_else(PoisonError::into_inner);
                        let now = devtables_db::system_now_ms().max(0) as u64;
                        let mut t = AgentTxn {
                            txn,
                            schema: &schema,
                        };
                        device_apply(&mut t, &schema, &mut clock, now, &page).map_err(|e| match e {
                            devtables_sync::apply::ApplyError::Store(e) => e,
                        })
                    })
                })
                .await;
                let now = self.now();
                match result {
                    Ok(Ok(outcome)) => {
                        // The page's superseded entries left the outbox in its transaction.
                        self.outbox.removed(outcome.superseded.len() as u64);
                        self.engine.handle_applied(now, outcome)
                    }
                    Ok(Err(e)) => {
                        tracing::error!(device = %self.id, "cannot apply changes from the cloud: {e}");
                        self.set_status(|s| s.last_error = Some(e.to_string()));
                        self.engine.handle_apply_failed(now);
                    }
                    Err(e) => {
                        tracing::error!(device = %self.id, "apply task failed: {e}");
                        self.engine.handle_apply_failed(now);
                    }
                }
            }
            DeviceAction::Restamp {
                model,
                key,
                version,
                cloud_ms,
            } => {
                // The refusal tells the cloud's time: correct the offset (the device clock may
                // have jumped since the welcome), or every re-stamp would be refused again.
                let offset = cloud_ms as i64 - devtables_db::system_now_ms();
                self.cloud_offset_ms.store(offset, Ordering::Relaxed);
                self.set_status(|s| s.clock_offset_ms = offset);
                let stamp = self.stamp_ms();
                let k = key.clone();
                let result = tokio::task::spawn_blocking(move || {
                    db.write(Origin::Remote, |txn| {
                        state::restamp(txn, &clock, stamp, &k, version, cloud_ms)
                    })
                })
                .await;
                let now = self.now();
                match result {
                    Ok(Ok(Some(change))) => self.engine.handle_restamped(now, version, change),
                    Ok(Ok(None)) => {} // a newer local write replaced the entry
                    Ok(Err(e)) => {
                        tracing::error!(device = %self.id, %model, "cannot re-stamp a change: {e}");
                        self.set_status(|s| s.last_error = Some(e.to_string()));
                        self.engine.handle_restamp_failed(now, &model, &key);
                    }
                    Err(e) => {
                        tracing::error!(device = %self.id, "re-stamp task failed: {e}");
                        self.engine.handle_restamp_failed(now, &model, &key);
                    }
                }
            }
            DeviceAction::LoadBatch { batch, keys } => {
                // Entries read this turn are not read again; the others are a few hundred point
                // reads at most: quick enough for the event loop. On failure the engine gets no
                // answer and queues the keys again at the batch's timeout.
                let mut changes = Vec::with_capacity(keys.len());
                let mut unread = Vec::new();
                for (model, key) in keys {
                    match self.turn_entries.take(&key) {
                        Some(change) => changes.push(change),
                        None => unread.push((model, key)),
                    }
                }
                let read = if unread.is_empty() {
                    Ok(Vec::new())
                } else {
                    state::outbox_entries(&self.db, &unread)
                };
                match read {
                    Ok(more) => {
                        changes.extend(more);
                        let now = self.now();
                        self.engine.handle_batch_loaded(now, batch, changes);
                    }
                    Err(e) => {
                        tracing::error!(device = %self.id, "cannot read the outbox for a batch: {e}")
                    }
                }
            }
            DeviceAction::Repush => {
                tracing::warn!(
                    device = %self.id,
                    "the cloud holds less than this device heard from it (it was restored from a                      backup): putting every write this device holds of its up-syncing models back                      into the outbox; pushes wait until that is done"
                );
                self.repush = Some(RepushScan {
                    pos: state::RepushPos::Items {
                        model: 0,
                        next: None,
                    },
                    count: 0,
                    due: tokio::time::Instant::now(),
                });
            }
            DeviceAction::StoreAnswered(answered) => {
                let result = tokio::task::spawn_blocking(move || {
                    db.write(Origin::Remote, |txn| state::store_answered(txn, answered))
                })
                .await;
                // On failure the higher count stays: the next welcome asks for another
                // re-push, which only repeats this one.
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(device = %self.id, "cannot store the cloud's answered count: {e}")
                    }
                    Err(e) => {
                        tracing::error!(device = %self.id, "answered-count task failed: {e}")
                    }
                }
            }
            DeviceAction::OutboxRemove { entries, answered } => {
                let keys: Vec<ItemKey> = entries.iter().map(|(_, k, _)| k.clone()).collect();
                // One transaction for every entry of the answer; it says how many it removed,
                // so the status needs no read.
                let result = tokio::task::spawn_blocking(move || {
                    db.write(Origin::Remote, |txn| {
                        state::outbox_remove(txn, &entries, answered)
                    })
                    .map(|removed| (entries, removed))
                })
                .await;
                match result {
                    Ok(Ok((acked, removed))) => {
                        self.outbox.removed(removed);
                        self.set_status(|s| s.acked += acked.len() as u64);
                        let hooks = self
                            .handlers
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .acked
                            .clone();
                        for hook in hooks {
                            hook(&acked);
                        }
                    }
                    // The durable entries stay, and the engine already forgot them: hand them
                    // back, so they are resent and acknowledged again (idempotent).
                    Ok(Err(e)) => {
                        tracing::error!(device = %self.id, "cannot trim the outbox: {e}");
                        self.requeue_durable(&keys);
                    }
                    Err(e) => {
                        tracing::error!(device = %self.id, "outbox task failed: {e}");
                        self.requeue_durable(&keys);
                    }
                }
            }
        }
    }

    /// One slice of the re-push after a cloud restore; the last one tells the engine it is done.
    async fn repush_slice(&mut self) {
        let Some(scan) = self.repush.take() else {
            return;
        };
        let (db, schema, clock) = (self.db.clone(), self.schema.clone(), self.clock.clone());
        let stamp = self.stamp_ms();
        let pos = scan.pos.clone();
        let result = tokio::task::spawn_blocking(move || {
            state::repush_slice(&db, &schema, &clock, stamp, pos, REPUSH_SLICE)
        })
        .await;
        let slice = match result {
            Ok(Ok(slice)) => slice,
            Ok(Err(e)) => {
                tracing::error!(device = %self.id, "a re-push slice failed, retrying: {e}");
                self.set_status(|s| s.last_error = Some(e.to_string()));
                self.repush = Some(RepushScan {
                    due: tokio::time::Instant::now() + REPUSH_RETRY,
                    ..scan
                });
                return;
            }
            Err(e) => {
                tracing::error!(device = %self.id, "a re-push task failed, retrying: {e}");
                self.repush = Some(RepushScan {
                    due: tokio::time::Instant::now() + REPUSH_RETRY,
                    ..scan
                });
                return;
            }
        };
        if slice.unknown_model > 0 {
            tracing::warn!(
                device = %self.id,
                tombstones = slice.unknown_model,
                "re-push: deletes recorded by an older agent (no model in their version record)                  cannot be sent again; the restored cloud may still hold those items"
            );
        }
        if slice.restamped > 0 {
            tracing::info!(
                device = %self.id,
                items = slice.restamped,
                "re-push: items whose version was collected are sent with a fresh one"
            );
        }
        if !slice.requeued.is_empty() {
            self.outbox.recount();
        }
        let now = self.now();
        let count = scan.count + slice.requeued.len() as u64;
        for change in slice.requeued {
            self.engine.handle_local_change(now, change);
        }
        match slice.next {
            Some(pos) => {
                self.repush = Some(RepushScan {
                    pos,
                    count,
                    due: tokio::time::Instant::now(),
                })
            }
            None => self.engine.handle_repush_done(now, count),
        }
    }

    /// Hands the durable outbox entries of `keys` (those that still exist) back to the engine.
    fn requeue_durable(&mut self, keys: &[ItemKey]) {
        let now = self.now();
        for key in keys {
            match state::outbox_entry(&self.db, key) {
                Ok(Some(change)) => self.engine.handle_local_change(now, change),
                Ok(None) => {}
                Err(e) => tracing::error!(device = %self.id, "cannot read the outbox: {e}"),
            }
        }
    }

    fn on_event(&mut self, event: DeviceEvent) {
        match event {
            DeviceEvent::Connected => tracing::info!(device = %self.id, "connected"),
            DeviceEvent::Ready => {
                tracing::info!(device = %self.id, "sync ready");
                // The cloud answers: whatever failed before is over. The welcome says again
                // whether the cloud's schema differs.
                self.set_status(|s| {
                    s.last_error = None;
                    s.cloud_schema = None;
                });
            }
            DeviceEvent::Deferred { change, reason } => {
                tracing::warn!(device = %self.id, model = %change.model, key = %change.key, "change deferred by the cloud (kept, sent again in the next session): {reason}");
                let message = format!("{} {}: {reason}", change.model, change.key);
                self.set_status(|s| {
                    s.deferred += 1;
                    s.last_error = Some(message);
                });
            }
            DeviceEvent::CloudSchema { cloud, device } => {
                tracing::info!(device = %self.id, cloud_schema = %cloud, device_schema = %device, "the cloud runs another schema version: items are exchanged under the neighbouring-version rules (fields and enum values one side lacks are kept)");
                self.set_status(|s| s.cloud_schema = Some(cloud));
            }
            DeviceEvent::KeptByCloud { model, key, detail } => {
                tracing::info!(device = %self.id, %model, %key, "the cloud kept parts of the item its schema does not define: {detail}");
                self.set_status(|s| s.kept_from_neighbour_schema += 1);
            }
            DeviceEvent::KeptFromCloud { count } => {
                tracing::info!(device = %self.id, count, "items from the cloud hold fields or enum values this device's schema does not define: kept whole");
                self.set_status(|s| s.kept_from_neighbour_schema += count);
            }
            DeviceEvent::Rejected { change, reason } => {
                tracing::warn!(device = %self.id, model = %change.model, key = %change.key, "change rejected by the cloud: {reason}");
                let message = format!("{} {}: {reason}", change.model, change.key);
                self.set_status(|s| {
                    s.rejected += 1;
                    s.last_error = Some(message.clone());
                });
                let callbacks = self
                    .handlers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .rejected
                    .clone();
                for cb in callbacks {
                    cb(&change.model, &change.key, &reason.to_string());
                }
                // The engine already asked for the durable entry's removal (OutboxRemove):
                // a rejected change is never retried.
            }
            DeviceEvent::Throttled {
                retry_after_ms,
                busy,
            } => {
                // The cloud answers this at most once per `retry_after_ms`: no log storm.
                let why = if busy {
                    "the cloud is busy with this device's earlier pushes"
                } else {
                    "this device is over its message rate"
                };
                tracing::warn!(device = %self.id, retry_after_ms, "{why}: pushes wait (nothing is lost)");
                let message = format!("{why}: pushes wait {retry_after_ms} ms");
                self.set_status(|s| {
                    s.throttled += 1;
                    s.last_error = Some(message);
                });
            }
            DeviceEvent::PushTimedOut { changes, waited_ms } => {
                // Normal under load (the cloud's queue grew past the timeout): counted, not
                // warned about; the retransmit timeout learns the wait from the late answer.
                tracing::debug!(device = %self.id, changes, waited_ms, "a push was not answered in time: its changes go out again");
                self.set_status(|s| s.push_timeouts += 1);
            }
            DeviceEvent::CloudError { code, message } => {
                tracing::error!(device = %self.id, ?code, "cloud error: {message}");
                self.set_status(|s| s.last_error = Some(message.clone()));
            }
            DeviceEvent::Malformed(e) => {
                tracing::warn!(device = %self.id, "malformed message from the cloud: {e}")
            }
            DeviceEvent::ApplySkipped(skipped) => {
                tracing::warn!(device = %self.id, model = %skipped.model, "item from the cloud skipped: {}", skipped.reason)
            }
            DeviceEvent::ApplyFailed => {}
            DeviceEvent::Resynced { cursor, swept } => {
                tracing::info!(device = %self.id, cursor, swept, "full resync finished");
                self.set_status(|s| {
                    s.cursor = cursor;
                    s.resyncs += 1;
                });
            }
            DeviceEvent::CloudTime { cloud_ms, .. } => {
                let offset = cloud_ms as i64 - devtables_db::system_now_ms();
                self.cloud_offset_ms.store(offset, Ordering::Relaxed);
                if offset.abs() > 60_000 {
                    tracing::warn!(device = %self.id, offset_ms = offset, "the device clock is off the cloud's; versions are stamped on the cloud's time");
                }
                self.set_status(|s| s.clock_offset_ms = offset);
            }
            DeviceEvent::Superseded { change, winner } => {
                tracing::warn!(device = %self.id, model = %change.model, key = ?change.key, version = %change.version, %winner, "local change superseded by a newer version in the cloud");
                let message = format!(
                    "{} {}: superseded by {winner} in the cloud",
                    change.model, change.key
                );
                self.set_status(|s| {
                    s.superseded += 1;
                    s.last_error = Some(message);
                });
            }
            DeviceEvent::Restamped {
                model,
                key,
                from,
                to,
            } => {
                tracing::info!(device = %self.id, %model, ?key, %from, %to, "change re-stamped on the cloud's time");
                self.set_status(|s| s.restamped += 1);
            }
            DeviceEvent::Swept { model, key } => {
                tracing::warn!(device = %self.id, %model, ?key, "resync deleted a local item the cloud does not hold");
                let message =
                    format!("{model} {key}: deleted by a resync (the cloud does not hold it)");
                self.set_status(|s| {
                    s.swept += 1;
                    s.last_error = Some(message);
                });
            }
            DeviceEvent::OutboxHigh { pending } => {
                tracing::warn!(device = %self.id, pending, "the outbox is filling up")
            }
            DeviceEvent::Repushed { count } => {
                tracing::warn!(
                    device = %self.id, count,
                    "re-push after a cloud restore: the writes this device holds are back in its \
                     outbox and being sent (what the cloud still holds is answered as a duplicate)"
                );
                self.set_status(|s| s.restore_repushed += count);
            }
        }
    }

    fn set_status(&self, f: impl FnOnce(&mut AgentStatus)) {
        self.status.send_modify(f);
    }
}
