//! The sync loop: the driver around the sans-IO [`CloudEngine`]. MQTT messages in, engine,
//! store jobs, MQTT publishes out. It makes no protocol decision.
//!
//! Why it is shaped this way:
//! - It never waits for the store. Store work (applying a push, reading a page, recording a
//!   status) is queued to the store thread in the order the engine asked for it, and each job
//!   sends its completion back over a bounded channel into this loop's `select!`. The store's
//!   queue is shared with the API's calls: a job that finds it full waits in the loop's own
//!   queue (in order, before any later job) until the `select!` hears of room, so the loop
//!   never blocks on it and no task stands between the loop and the store. The store
//!   thread runs jobs one at a time in arrival order, so completions come back in the order the
//!   engine produced the work, which keeps every device's inputs in order. At most
//!   `sync_store_jobs` jobs are out at once; beyond that the next action waits (in order) until
//!   one completes. Meanwhile MQTT keeps being served: the connection is polled by its own task
//!   ([`crate::mqtt_link`]), whose events arrive here.
//! - It keeps the device topics subscribed ([`Subscription`]), before anything else is
//!   published after a start.
//! - Device messages come from [`Ingress`], publishes go to [`Egress`]: with the embedded
//!   broker both are in-process (the broker's publish hook in, [`EmbeddedPublisher`] out) and
//!   the service opens no MQTT connection at all; with an external broker each direction has
//!   connections of its own ([`crate::mqtt_link::Hop`]), one each by default. Several ingress
//!   connections share one subscription (`$share/...`): each keeps its own [`Subscription`]
//!   state, and the device topics count as subscribed only while every one holds. Several
//!   egress connections split the devices by a hash of their id, so one device's publishes
//!   always take the same connection, in order.
//! - It reads no device message while store work waits for a slot (`sync_store_jobs` jobs
//!   out) or for room in the store's queue (counted in `store_waits`): a store behind would otherwise lose the CPU it needs to
//!   the reading, decoding and refusing of pushes it cannot take yet, and acknowledge less the
//!   more is offered. Device messages wait in the broker (its connections stop reading).
//! - It never drops a publish it could queue. To an external broker every publish takes a slot
//!   of the egress [`RequestGauge`]; a publish that finds no room waits, and while it waits the
//!   loop reads no device message (backpressure, counted in `egress_waits`): the ingress
//!   connection stops being read, so devices slow down instead of the cloud dropping their
//!   answers. The egress connection (the one of the waiting publish's device) is polled by its
//!   own task meanwhile, so the wait always ends. Into the embedded broker a publish is queued to the device's session at once (rmqtt
//!   has no room to wait for); one that finds no session is counted (`publishes_undelivered`)
//!   and warned about, and one its session's full queue drops later is counted by the broker
//!   (`broker_drops`): the engine's timers recover both.
//! - After a start it prompts the devices with changes waiting, paced ([`StartupPrompts`]):
//!   only once the subscription holds, a bounded number per tick, within half the queue's free
//!   room.
//! - What the engine and the store refuse of a device (messages over its rate, pushes beyond
//!   those in progress, changes over its quotas) is counted in [`SyncStatus`], recorded on the
//!   device's row, and warned about (rate-limited).

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devtables_sync::apply::PushRules;
use devtables_sync::cloud::{CloudAction, CloudEngine, FeedPage, SnapshotPage};
use devtables_sync::identity::DeviceId;
use devtables_sync::topics;
use devtables_sync::wire::{ChangeResult, ChangeStatus, RejectReason};
use rumqttc::{AsyncClient, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch};

use crate::broker::DeviceMessage;
use crate::broker_publish::{Delivery, EmbeddedPublisher};
use crate::cluster::presence::PresenceChecks;
use crate::cluster::{Heard, Serving, WakeOthers};
use crate::config::StartupPrompts;
use crate::metrics::StoreJob;
use crate::mqtt_link::{LinkEvent, RequestGauge, TaggedEvent};
use crate::probe::{PathProbe, ProbeStep};

use crate::status::{SyncStatus, WarnLimiter};
use crate::store::{Advanced, StatusUpdate, StoreError};
use crate::store_thread::{wall_ms, JobFn, NotSubmitted, StoreCtx, StoreHandle};
use crate::subscription::{SubAckOutcome, Subscription, SUBSCRIBES_PER_CONNECTION};

/// How often the feed lag is taken from the engine (a pass over its sessions).
const FEED_LAG_EVERY: Duration = Duration::from_secs(1);

/// Inputs of the sync loop from the rest of the service.
pub enum SyncInput {
    /// An API write advanced these feeds.
    FeedAdvanced(Advanced),
}

/// A store job's result, back in the loop.
enum Done {
    Push {
        device: DeviceId,
        batch: u64,
        result: Result<(Vec<ChangeResult>, Advanced), StoreError>,
    },
    Feed {
        device: DeviceId,
        result: Result<FeedPage, StoreError>,
    },
    Snapshot {
        device: DeviceId,
        result: Result<SnapshotPage, StoreError>,
    },
    /// A status record was written (or its failure logged and counted).
    Status,
    /// The registry read for partitions this node just gained (or whose wake-ups it may have
    /// missed), at wall time `since_ms`.
    Behind {
        result: Result<Listing, StoreError>,
        since_ms: u64,
    },
}

/// Devices of some partitions, read from the registry.
struct Listing {
    /// Those behind their feed, with their heads.
    behind: Vec<(DeviceId, u64)>,
    /// Those shown online, when a presence check was asked for.
    online: Vec<DeviceId>,
}

/// Everything the sync loop is built from.
pub(crate) struct SyncParts {
    pub(crate) engine: CloudEngine,
    /// How far past the cloud's time a pushed version may be (the engine's `max_drift_ms`).
    pub(crate) max_drift_ms: u64,
    pub(crate) store: StoreHandle,
    /// Where device messages come from.
    pub(crate) ingress: Ingress,
    /// Where publishes to devices go.
    pub(crate) egress: Egress,
    pub(crate) status: Arc<SyncStatus>,
    pub(crate) prefix: String,
    pub(crate) inputs: mpsc::Receiver<SyncInput>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The subscription state a new ingress connection starts from (its timing).
    pub(crate) subscription: Subscription,
    /// With several ingress connections, the shared-subscription group they join
    /// (`$share/{group}/...`); `None` subscribes plainly.
    pub(crate) share_group: Option<String>,
    /// Devices whose feed head was above their acknowledged cursor at start, with the head.
    pub(crate) behind: Vec<(DeviceId, u64)>,
    pub(crate) pace: StartupPrompts,
    /// How long devices shown online in partitions taken over have to answer their prompt.
    pub(crate) presence_check: Duration,
    /// This node's name (its probes' topic) and how often it probes its path through an
    /// external broker (`Duration::ZERO`: never; see [`crate::probe`]).
    pub(crate) node_name: String,
    pub(crate) probe_interval: Duration,
    pub(crate) max_store_jobs: usize,
    /// Which devices this node serves (a scaled-out cloud's partitions; [`Serving::All`]
    /// otherwise): the others' messages are left to their nodes.
    pub(crate) serving: watch::Receiver<Serving>,
    /// Tells the other nodes of feeds advanced here for devices they serve.
    pub(crate) wake_others: Option<Box<dyn WakeOthers>>,
    /// What the other nodes advanced (their wake-ups).
    pub(crate) heard: Option<mpsc::Receiver<Heard>>,
}

/// Where the sync loop's device messages come from.
pub(crate) enum Ingress {
    /// Clients subscribed to the device topics (an external broker), and their connections'
    /// events, tagged with the client's index (messages, subscription answers, connected,
    /// lost).
    Clients {
        links: Vec<ClientLink>,
        events: mpsc::Receiver<TaggedEvent>,
    },
    /// The embedded broker hands device messages over in-process
    /// ([`crate::broker::BrokerConfig::device_messages`]): nothing to subscribe, nothing to
    /// lose, and a device with its most messages waiting has the broker stop reading its
    /// socket.
    Embedded {
        messages: mpsc::UnboundedReceiver<DeviceMessage>,
    },
}

/// Where the sync loop's publishes to devices go.
pub(crate) enum Egress {
    /// Clients connected to an external broker that only publish, each with its request
    /// queue's gauge (a full queue makes the publish wait: backpressure), and their
    /// connections' events, tagged with the client's index (connected, lost).
    Clients {
        links: Vec<ClientLink>,
        events: mpsc::Receiver<TaggedEvent>,
    },
    /// Straight into the embedded broker's device sessions, in-process: no connection to lose,
    /// no request queue to wait for ([`crate::broker_publish`]).
    Embedded { publisher: EmbeddedPublisher },
}

/// One MQTT client of the service and its request queue's gauge.
pub(crate) struct ClientLink {
    pub(crate) client: AsyncClient,
    pub(crate) gauge: Arc<RequestGauge>,
    /// Tells the connection's task to give the connection up (why): see `mqtt_link::run`.
    pub(crate) abandon: mpsc::Sender<String>,
}

/// The publishing side, once the loop runs (the events of the clients' connections are kept
/// apart, in [`SyncLoop::egress_link`], so the loop can wait on them and on a queue's room at
/// once).
enum Publisher {
    Clients(Vec<ClientLink>),
    Embedded(EmbeddedPublisher),
}

impl Publisher {
    /// The client that carries `device`'s publishes: always the same one for a device (a hash
    /// of its id), so its messages keep their order on the wire.
    fn link_of(&self, device: &DeviceId) -> Option<&ClientLink> {
        match self {
            Publisher::Clients(links) => links.get(egress_index(device, links.len())),
            Publisher::Embedded(_) => None,
        }
    }

    /// How many publishes may be queued now without waiting: the least room of any client
    /// (the next publishes may go to any of them).
    fn room(&self) -> usize {
        match self {
            Publisher::Clients(links) => links
                .iter()
                .map(|l| l.gauge.publish_room())
                .min()
                .unwrap_or(0),
            Publisher::Embedded(_) => usize::MAX,
        }
    }

    /// Requests waiting in the clients' request queues, all together (none in-process).
    fn queued(&self) -> usize {
        match self {
            Publisher::Clients(links) => links.iter().map(|l| l.gauge.queued()).sum(),
            Publisher::Embedded(_) => 0,
        }
    }
}

/// Which of `of` egress clients carries `device`'s publishes. Any fixed function of the id
/// keeps a device on one client for the life of the process, which is all the order needs.
fn egress_index(device: &DeviceId, of: usize) -> usize {
    use std::hash::{Hash, Hasher};
    if of <= 1 {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut h);
    (h.finish() % of as u64) as usize
}

impl Ingress {
    /// The next ingress event, with the index of the client it came from (0 in-process);
    /// `None` once the source is gone (shutdown).
    async fn next(&mut self) -> Option<TaggedEvent> {
        match self {
            Ingress::Clients { events, .. } => events.recv().await,
            Ingress::Embedded { messages } => messages.recv().await.map(|m| {
                let (topic, payload) = m.into_parts();
                (0, LinkEvent::Message { topic, payload })
            }),
        }
    }

    /// The subscribing clients (none in-process).
    fn links(&self) -> &[ClientLink] {
        match self {
            Ingress::Clients { links, .. } => links,
            Ingress::Embedded { .. } => &[],
        }
    }
}

/// The sync loop's state (see the module documentation).
pub(crate) struct SyncLoop {
    engine: CloudEngine,
    /// How far past the cloud's time a pushed version may be.
    max_drift_ms: u64,
    ingress: Ingress,
    /// Where publishes go.
    publisher: Publisher,
    /// The egress connections' events (none in-process: nothing to connect).
    egress_link: Option<mpsc::Receiver<TaggedEvent>>,
    /// Whether each egress connection is up (one, always up, in-process).
    egress_up: Vec<bool>,
    status: Arc<SyncStatus>,
    prefix: String,
    /// The device topic filters this service subscribes to.
    filters: Vec<String>,
    inputs: mpsc::Receiver<SyncInput>,
    inputs_open: bool,
    shutdown: watch::Receiver<bool>,
    /// The subscription state of each ingress connection (one, held for good, in-process).
    subscriptions: Vec<Subscription>,
    store: StoreHandle,
    /// Store jobs the store's queue had no room for, in engine order: they go before any later
    /// job, as soon as there is room.
    jobs_waiting: VecDeque<JobFn>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Store jobs queued or running.
    in_flight: usize,
    max_store_jobs: usize,
    /// The next engine action, waiting for a store job slot or (a publish) for room in the
    /// egress request queue.
    waiting: Option<CloudAction>,
    store_gone: bool,
    /// Devices still to prompt after the start, a restored link or a broadcast (paced).
    startup: VecDeque<(DeviceId, u64)>,
    pace: StartupPrompts,
    next_prompts: tokio::time::Instant,
    /// Whether each ingress connection was up (to warn once when it drops).
    links_up: Vec<bool>,
    /// A connection (either direction) dropped since every connection was last up and every
    /// subscription held: once they are again, every device session restarts (see
    /// `CloudEngine::handle_link_restored`).
    link_lost: bool,
    drop_warn: WarnLimiter,
    undelivered_warn: WarnLimiter,
    oversize_warn: WarnLimiter,
    foreign_warn: WarnLimiter,
    throttle_warn: WarnLimiter,
    quota_warn: WarnLimiter,
    /// Monotonic origin of the engine's clock.
    started: Instant,
    /// When the feed lag is next taken from the engine.
    next_feed_lag: Instant,
    /// The engine changed since the feed lag was last taken.
    feed_lag_stale: bool,
    /// The wall clock at `started`, to record engine times as wall times.
    started_wall_ms: u64,
    /// What this node serves now (see [`SyncParts::serving`]).
    serving: Serving,
    serving_rx: watch::Receiver<Serving>,
    /// Whether the lease thread may still change what is served.
    serving_open: bool,
    /// A listing of the devices behind that waits for a store job slot, and whether it checks
    /// presence.
    behind_waiting: Option<(Serving, bool)>,
    /// Devices shown online in partitions taken over, to hear from ([`PresenceChecks`]).
    presence: PresenceChecks,
    /// The path probe through an external broker, and its topic (none in-process).
    probe: Option<(PathProbe, String)>,
    wake_others: Option<Box<dyn WakeOthers>>,
    heard: Option<mpsc::Receiver<Heard>>,
}

impl SyncLoop {
    pub(crate) fn new(p: SyncParts) -> SyncLoop {
        let max_store_jobs = p.max_store_jobs.max(1);
        // It holds at most `max_store_jobs` completions: every job is counted in `in_flight`
        // until its completion is taken, so it can never be full when used.
        let (done_tx, done_rx) = mpsc::channel::<Done>(max_store_jobs);
        p.status
            .prompts_pending
            .store(p.behind.len() as u64, Ordering::Relaxed);
        let serving_now = p.serving.borrow().clone();
        let subscriptions = match &p.ingress {
            Ingress::Clients { links, .. } => {
                p.status.ingress_links.expect(links.len());
                vec![p.subscription; links.len()]
            }
            Ingress::Embedded { .. } => {
                // In-process: the device messages flow from the start, and cannot be lost.
                let mut held = p.subscription;
                held.held_in_process();
                p.status.ingress_links.in_process();
                p.status.subscribed.store(true, Ordering::SeqCst);
                vec![held]
            }
        };
        let (publisher, egress_link, egress_up) = match p.egress {
            Egress::Clients { links, events } => {
                p.status.egress_links.expect(links.len());
                let up = vec![false; links.len()];
                (Publisher::Clients(links), Some(events), up)
            }
            Egress::Embedded { publisher } => {
                // In-process: nothing to connect, nothing to lose.
                p.status.egress_links.in_process();
                (Publisher::Embedded(publisher), None, vec![true])
            }
        };
        let up_filter = topics::up_filter(&p.prefix);
        let filter = match &p.share_group {
            Some(group) => format!("$share/{group}/{up_filter}"),
            None => up_filter,
        };
        // Only clients of an external broker can go deaf (in-process there is no subscription).
        let probe = (matches!(p.ingress, Ingress::Clients { .. })
            && matches!(publisher, Publisher::Clients(_))
            && !p.probe_interval.is_zero())
        .then(|| {
            (
                PathProbe::new(p.probe_interval),
                topics::probe_topic(&p.prefix, &p.node_name),
            )
        });
        SyncLoop {
            engine: p.engine,
            max_drift_ms: p.max_drift_ms,
            ingress: p.ingress,
            publisher,
            egress_link,
            egress_up,
            status: p.status,
            filters: vec![filter],
            links_up: vec![false; subscriptions.len()],
            prefix: p.prefix,
            inputs: p.inputs,
            inputs_open: true,
            shutdown: p.shutdown,
            subscriptions,
            store: p.store,
            jobs_waiting: VecDeque::new(),
            done_tx,
            done_rx,
            in_flight: 0,
            max_store_jobs,
            waiting: None,
            store_gone: false,
            startup: p.behind.into(),
            pace: p.pace,
            next_prompts: tokio::time::Instant::now(),
            link_lost: false,
            drop_warn: WarnLimiter::new(WarnLimiter::INTERVAL),
            undelivered_warn: WarnLimiter::new(WarnLimiter::INTERVAL),
            oversize_warn: WarnLimiter::new(WarnLimiter::INTERVAL),
            foreign_warn: WarnLimiter::new(WarnLimiter::INTERVAL),
            throttle_warn: WarnLimiter::new(WarnLimiter::INTERVAL),
            quota_warn: WarnLimiter::new(WarnLimiter::INTERVAL),
            started: Instant::now(),
            next_feed_lag: Instant::now(),
            feed_lag_stale: false,
            started_wall_ms: wall_ms(),
            serving: serving_now,
            serving_rx: p.serving,
            behind_waiting: None,
            presence: PresenceChecks::new(p.presence_check),
            probe,
            serving_open: true,
            wake_others: p.wake_others,
            heard: p.heard,
        }
    }

    /// Engine time: milliseconds since the loop started.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) async fn run(mut self) {
        // A cluster node starts with the partitions of its first lease round: their devices
        // with changes waiting are prompted as those of partitions gained later.
        if matches!(self.serving, Serving::Partitions { .. }) {
            self.prompt_behind(self.serving.clone(), true);
        }
        loop {
            let engine_at = self.engine.poll_timeout().map(|at| {
                tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(self.now()))
            });
            let subscribe_at = self
                .subscriptions
                .iter()
                .filter_map(Subscription::deadline)
                .min()
                .map(tokio::time::Instant::from_std);
            // Prompts go out only once the device topics are subscribed (the answers must be
            // heard) and when the engine's previous output was fully handed over.
            let prompts_at =
                (self.all_held() && !self.startup.is_empty() && self.waiting.is_none())
                    .then_some(self.next_prompts);
            let probe_at = self
                .probe
                .as_ref()
                .and_then(|(p, _)| p.deadline())
                .map(tokio::time::Instant::from_std);
            let presence_at = self.presence.next_due().map(tokio::time::Instant::from_std);
            let feed_lag_at = self
                .feed_lag_stale
                .then(|| tokio::time::Instant::from_std(self.next_feed_lag));
            // Backpressure: while a publish waits for room, no device message is read.
            // The queue it waits for is that of its device's client.
            let publish_waits_for = match &self.waiting {
                Some(CloudAction::Transmit { device, .. }) => {
                    self.publisher.link_of(device).map(|l| l.gauge.clone())
                }
                _ => None,
            };
            let publish_waits = publish_waits_for.is_some();
            // Nor while a store job waits for a slot: the store is what answers pushes, and
            // reading on would take its CPU for decoding and refusing pushes it cannot take
            // yet (receive livelock: measured, the store thread got a quarter of the cloud's
            // CPU and acknowledgements fell to a twentieth of capacity). Device messages wait
            // in the broker meanwhile (its connections stop reading their sockets).
            let store_waits = self.store_behind();
            if publish_waits || store_waits {
                // A probe may wait unread in the broker meanwhile: not lost.
                if let Some((probe, _)) = &mut self.probe {
                    probe.hold(Instant::now());
                }
            }
            let mut stop = false;
            tokio::select! {
                event = self.ingress.next(), if !publish_waits && !store_waits => match event {
                    Some((index, event)) => self.on_link(index, event),
                    // The connection task ends only at shutdown.
                    None => stop = true,
                },
                event = recv_link(&mut self.egress_link) => match event {
                    Some((index, event)) => self.on_egress_link(index, event),
                    None => stop = true,
                },
                // Room in the egress queue: `act` below queues the waiting publish.
                _ = freed(publish_waits_for.as_deref()), if publish_waits => {}
                input = self.inputs.recv(), if self.inputs_open => match input {
                    Some(SyncInput::FeedAdvanced(advanced)) => self.feed_advanced(advanced),
                    None => self.inputs_open = false,
                },
                changed = self.serving_rx.changed(), if self.serving_open => match changed {
                    Ok(()) => self.serving_changed(),
                    // No lease thread (a single node), or it stopped at shutdown: what is
                    // served stays as it was last told.
                    Err(_) => self.serving_open = false,
                },
                heard = recv_heard(&mut self.heard) => match heard {
                    Some(Heard::Advanced(advanced)) => self.feed_advanced_elsewhere(advanced),
                    Some(Heard::Listening) => self.prompt_behind(self.serving.clone(), false),
                    None => self.heard = None,
                },
                Some(done) = self.done_rx.recv() => self.on_done(done),
                // Room in the store's queue for the oldest job waiting.
                slot = self.store.room(), if !self.jobs_waiting.is_empty() => match slot {
                    Ok(slot) => {
                        if let Some(job) = self.jobs_waiting.pop_front() {
                            slot.submit(job);
                        }
                    }
                    Err(_) => self.store_gone = true,
                },
                _ = sleep_until(engine_at) => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                }
                _ = sleep_until(subscribe_at) => {
                    let now = Instant::now();
                    for (index, subscription) in self.subscriptions.iter_mut().enumerate() {
                        if subscription.on_timer(now) {
                            tracing::warn!(
                                client = index,
                                "no SUBACK for the device topics in time; subscribing again"
                            );
                        }
                    }
                }
                _ = sleep_until(prompts_at) => self.release_prompts(),
                _ = sleep_until(presence_at) => self.check_presence(),
                _ = sleep_until(probe_at) => self.on_probe_timer(),
                // Nothing to do here: `report` below takes the lag.
                _ = sleep_until(feed_lag_at) => {}
                changed = self.shutdown.changed() => stop = changed.is_err(),
            }
            if stop || *self.shutdown.borrow() || self.store_gone {
                let egress: &[ClientLink] = match &self.publisher {
                    Publisher::Clients(links) => links,
                    Publisher::Embedded(_) => &[],
                };
                for ClientLink { client, gauge, .. } in egress.iter().chain(self.ingress.links()) {
                    if gauge.try_take_control_slot() && client.try_disconnect().is_err() {
                        gauge.release();
                    }
                }
                return;
            }
            self.drive_subscription();
            self.probe_links();
            self.submit_waiting();
            self.act().await;
            self.report();
        }
    }

    /// Events of ingress connection `index`.
    fn on_link(&mut self, index: usize, event: LinkEvent) {
        let Some(subscription) = self.subscriptions.get_mut(index) else {
            return;
        };
        match event {
            LinkEvent::Connected => {
                self.links_up[index] = true;
                subscription.connected(Instant::now());
                tracing::info!(client = index, "cloud sync connected to the broker");
            }
            LinkEvent::Lost(e) => {
                if std::mem::take(&mut self.links_up[index]) {
                    tracing::warn!(client = index, "cloud sync lost the broker: {e}");
                } else {
                    tracing::debug!(client = index, "cloud sync cannot reach the broker: {e}");
                }
                subscription.lost();
                self.link_lost = true;
                self.report_subscriptions();
            }
            LinkEvent::Message { topic, payload } => {
                if topics::parse_probe_topic(&self.prefix, &topic).is_some() {
                    self.probe_heard(&topic, &payload);
                    return;
                }
                match topics::parse_up_topic(&self.prefix, &topic) {
                    Some(device) if !self.serving.serves(&device) => {
                        // Another node serves it (a scaled-out cloud's partitions).
                        self.status
                            .cluster
                            .messages_other_nodes
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Some(device) => {
                        self.status.messages_in.fetch_add(1, Ordering::Relaxed);
                        self.status
                            .bytes_in
                            .fetch_add(payload.len() as u64, Ordering::Relaxed);
                        let now = self.now();
                        self.engine
                            .handle_message(now, wall_ms(), &device, &payload);
                    }
                    None => {
                        self.status.foreign_messages.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = self.foreign_warn.hit(Instant::now()) {
                            tracing::warn!(%topic, suppressed, "ignored a message on a foreign topic");
                        }
                    }
                }
            }
            LinkEvent::SubscribeSent(pkid) => subscription.sent(pkid),
            LinkEvent::SubAck { pkid, granted } => {
                match subscription.suback(Instant::now(), pkid, granted) {
                    SubAckOutcome::Held => {
                        tracing::info!(
                            client = index, filters = ?self.filters,
                            "subscribed to the device topics"
                        );
                        self.report_subscriptions();
                        self.restore_if_whole();
                    }
                    SubAckOutcome::Refused => tracing::warn!(
                        client = index, filters = ?self.filters,
                        "the broker refused the device topic subscription; retrying"
                    ),
                    SubAckOutcome::Ignored => {
                        tracing::debug!(pkid, granted, "a SUBACK for an earlier request")
                    }
                }
            }
        }
    }

    /// Whether every ingress connection holds the device topic subscription.
    fn all_held(&self) -> bool {
        self.subscriptions.iter().all(Subscription::held)
    }

    /// Shows the subscriptions in the status: filters held over all ingress connections, and
    /// whether every connection holds them.
    fn report_subscriptions(&self) {
        let held = self.subscriptions.iter().filter(|s| s.held()).count();
        self.status
            .subscriptions_held
            .store((held * self.filters.len()) as u64, Ordering::Relaxed);
        self.status
            .subscribed
            .store(self.all_held(), Ordering::SeqCst);
    }

    /// Once a connection that dropped is back and every connection is up and subscribed, every
    /// device session restarts: messages in transit on the lost connection are gone (its
    /// session was clean), whichever connection it was.
    /// Tells the path probe whether every connection is up with the subscription held: it
    /// probes only then.
    fn probe_links(&mut self) {
        let whole = self.all_held() && self.egress_up.iter().all(|up| *up);
        if let Some((probe, _)) = &mut self.probe {
            if whole {
                probe.whole(Instant::now());
            } else {
                probe.broken();
            }
        }
    }

    /// A probe's time came: send the next, or give every connection up after the last ones
    /// did not come back.
    fn on_probe_timer(&mut self) {
        let Some((probe, topic)) = &mut self.probe else {
            return;
        };
        let Publisher::Clients(links) = &self.publisher else {
            return;
        };
        match probe.on_timer(Instant::now()) {
            None => {}
            Some(ProbeStep::Send(seq)) => {
                // Each egress connection in turn: the probe tests the one it goes through.
                let link = &links[(seq % links.len() as u64) as usize];
                let sent = link.gauge.try_take_publish_slot()
                    && match link.client.try_publish(
                        topic.as_str(),
                        QoS::AtLeastOnce,
                        false,
                        seq.to_string().into_bytes(),
                    ) {
                        Ok(()) => true,
                        Err(_) => {
                            link.gauge.release();
                            false
                        }
                    };
                if sent {
                    self.status.probes_sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    probe.not_sent(seq);
                }
            }
            Some(ProbeStep::NeverHeard { missed }) => {
                tracing::warn!(
                    "{missed} probes in a row did not come back through the broker and none ever \
                     has: the broker's access control may not let the cloud's publishing user \
                     write {topic} (docs/deployment.md); a deaf subscription cannot be noticed \
                     until one does"
                );
            }
            Some(ProbeStep::Deaf { missed }) => {
                self.status.probe_verdicts.fetch_add(1, Ordering::Relaxed);
                let reason = format!(
                    "{missed} probes in a row did not come back through the broker's subscription \
                     though the connections are up: the device topics are not delivered; \
                     connecting again to subscribe afresh"
                );
                tracing::warn!("{reason}");
                for link in links.iter().chain(self.ingress.links()) {
                    // Full: a verdict is already on its way.
                    let _ = link.abandon.try_send(reason.clone());
                }
            }
        }
    }

    /// A probe came back on `topic` (`payload`: its number); another node's is not this one's.
    fn probe_heard(&mut self, topic: &str, payload: &[u8]) {
        let Some((probe, own)) = &mut self.probe else {
            return;
        };
        if topic != own.as_str() {
            return;
        }
        let seq = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse::<u64>().ok());
        if seq.is_some_and(|seq| probe.heard(seq)) {
            self.status.probes_heard.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn restore_if_whole(&mut self) {
        if self.all_held() && self.egress_up.iter().all(|up| *up) && self.link_lost {
            self.link_lost = false;
            self.restart_sessions();
        }
    }

    /// Events of egress connection `index`: only whether it is up matters here.
    fn on_egress_link(&mut self, index: usize, event: LinkEvent) {
        let Some(up) = self.egress_up.get_mut(index) else {
            return;
        };
        match event {
            LinkEvent::Connected => {
                *up = true;
                tracing::info!(client = index, "cloud sync's publishing connection is up");
                // Publishes in transit when it dropped are gone (clean session): once every
                // connection is back, every device session restarts.
                self.restore_if_whole();
            }
            LinkEvent::Lost(e) => {
                if std::mem::take(up) {
                    tracing::warn!(
                        client = index,
                        "cloud sync lost its publishing connection to the broker: {e}"
                    );
                } else {
                    tracing::debug!(
                        client = index,
                        "cloud sync cannot reach the broker to publish: {e}"
                    );
                }
                self.link_lost = true;
            }
            // It subscribes to nothing.
            LinkEvent::Message { .. } | LinkEvent::SubscribeSent(_) | LinkEvent::SubAck { .. } => {}
        }
    }

    /// Queues a SUBSCRIBE on every ingress connection where one is due.
    fn drive_subscription(&mut self) {
        let now = Instant::now();
        let Ingress::Clients { links, .. } = &self.ingress else {
            return;
        };
        for (index, (link, subscription)) in links.iter().zip(&mut self.subscriptions).enumerate() {
            if subscription.exhausted(now) {
                // Given up: nothing more is asked of this connection; its task drops it and
                // reports it lost, and the next connection (to the next address) starts over.
                subscription.lost();
                self.status
                    .subscriptions_abandoned
                    .fetch_add(1, Ordering::Relaxed);
                let reason = format!(
                    "the broker did not grant the device topic subscription ({SUBSCRIBES_PER_CONNECTION} \
                     attempts on this connection); giving the connection up"
                );
                tracing::warn!(client = index, "{reason}");
                // Full: a verdict is already on its way.
                let _ = link.abandon.try_send(reason);
                continue;
            }
            if !subscription.due(now) {
                continue;
            }
            self.status
                .subscribe_attempts
                .fetch_add(1, Ordering::Relaxed);
            if !link.gauge.try_take_control_slot() {
                subscription.not_queued(now);
                tracing::warn!(
                    client = index,
                    "the MQTT request queue is full; subscribing to the device topics later"
                );
                continue;
            }
            let filters = self
                .filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            match link.client.try_subscribe_many(filters) {
                Ok(()) => subscription.queued(now),
                Err(e) => {
                    link.gauge.release();
                    subscription.not_queued(now);
                    tracing::warn!(
                        client = index,
                        "cannot queue the subscription to the device topics ({e}); retrying"
                    );
                }
            }
        }
    }

    /// After the link came back: messages in transit while it was down are lost in the broker
    /// (the cloud's session is clean), so every device session restarts. The devices are
    /// prompted to say hello, paced like the prompts after a start.
    fn restart_sessions(&mut self) {
        let devices = self.engine.handle_link_restored();
        if devices.is_empty() {
            return;
        }
        self.status
            .sessions_restarted
            .fetch_add(devices.len() as u64, Ordering::Relaxed);
        tracing::info!(
            sessions = devices.len(),
            "the broker link is back: device sessions restart (messages in transit may be lost); prompting the devices to say hello"
        );
        self.startup.extend(devices.into_iter().map(|d| (d, 0)));
    }

    /// A committed write advanced these feeds. A broadcast advances one feed per device of its
    /// account: past `pace.per_tick` of them, the wake-ups (a feed read for each connected
    /// device, a prompt for each other one) join the paced queue of start-up prompts instead of
    /// reaching the store and the broker all at once.
    fn feed_advanced(&mut self, advanced: Vec<(DeviceId, u64)>) {
        let advanced = self.keep_served(advanced);
        self.feed_advanced_here(advanced);
    }

    /// Wake-ups heard from other nodes: only those of devices this node serves count (the
    /// others are another node's, which heard them too).
    fn feed_advanced_elsewhere(&mut self, mut advanced: Vec<(DeviceId, u64)>) {
        advanced.retain(|(d, _)| self.serving.serves(d));
        self.feed_advanced_here(advanced);
    }

    /// Splits advanced feeds: those of devices other nodes serve go to them as wake-ups; the
    /// rest are returned.
    fn keep_served(&mut self, advanced: Vec<(DeviceId, u64)>) -> Vec<(DeviceId, u64)> {
        let Some(wake) = &self.wake_others else {
            return advanced;
        };
        let (here, elsewhere): (Vec<_>, Vec<_>) = advanced
            .into_iter()
            .partition(|(d, _)| self.serving.serves(d));
        if !elsewhere.is_empty() {
            // Counted once sent (`wakeups_sent`).
            wake.wake(elsewhere);
        }
        here
    }

    /// What this node serves changed (a scaled-out cloud's leases): sessions of devices it no
    /// longer serves are dropped (their new node answers them), and the devices of partitions
    /// it gained that have changes waiting are prompted.
    fn serving_changed(&mut self) {
        let now = self.serving_rx.borrow_and_update().clone();
        let gained = now.gained_since(&self.serving);
        self.serving = now;
        let serving = &self.serving;
        let dropped = self.engine.release_devices(|d| serving.serves(d));
        self.startup.retain(|(d, _)| serving.serves(d));
        if dropped > 0 {
            self.status
                .cluster
                .sessions_handed_over
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::info!(
                sessions = dropped,
                "device sessions handed over to other nodes"
            );
        }
        if !gained.is_empty() {
            self.prompt_behind(gained, true);
        }
    }

    /// Reads the devices of `within` whose feed is ahead of their acknowledged cursor (a
    /// store job over the registry) and prompts them, paced like the prompts after a start.
    /// With `presence` (partitions taken over), the devices shown online are prompted too, and
    /// those not heard from are marked offline later ([`PresenceChecks`]).
    fn prompt_behind(&mut self, within: Serving, presence: bool) {
        let (within, presence) = match self.behind_waiting.take() {
            Some((earlier, checked)) => (earlier.union(&within), checked || presence),
            None => (within, presence),
        };
        if within.is_empty() {
            return;
        }
        if self.in_flight >= self.max_store_jobs {
            // Sent once a store job completes (`on_done`).
            self.behind_waiting = Some((within, presence));
            return;
        }
        let done = self.done_tx.clone();
        let job: JobFn = Box::new(move |c: &mut StoreCtx| {
            // Before the read: a device seen after it is present.
            let since_ms = wall_ms();
            let mut behind = Vec::new();
            let mut online = Vec::new();
            let mut after: Option<DeviceId> = None;
            let result = loop {
                match c.store.devices(None, after.as_ref(), 1000) {
                    Ok(page) => {
                        let last = page
                            .last()
                            .and_then(|d| DeviceId::new(&d.account, &d.device).ok());
                        for d in &page {
                            let is_behind = d.feed_head > d.cursor_acked;
                            let check_online = presence && d.online;
                            if !is_behind && !check_online {
                                continue;
                            }
                            let Ok(id) = DeviceId::new(&d.account, &d.device) else {
                                continue;
                            };
                            if !within.serves(&id) {
                                continue;
                            }
                            if check_online {
                                online.push(id.clone());
                            }
                            if is_behind {
                                behind.push((id, d.feed_head));
                            }
                        }
                        match last {
                            Some(last) if page.len() == 1000 => after = Some(last),
                            _ => break Ok(Listing { behind, online }),
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            deliver_after_commit(c, &done, Done::Behind { result, since_ms });
        });
        self.submit(job);
    }

    /// A presence check fell due: the devices it holds that this node still serves and has
    /// heard nothing from (no session) are marked offline, unless a node saw them since the
    /// check began.
    fn check_presence(&mut self) {
        let startup = &self.startup;
        let Some(check) = self.presence.take_due(Instant::now(), |d| {
            startup.iter().any(|(queued, _)| queued == d)
        }) else {
            return;
        };
        let serving = &self.serving;
        let engine = &self.engine;
        let silent: Vec<DeviceId> = check
            .devices
            .into_iter()
            .filter(|d| serving.serves(d) && !engine.has_session(d))
            .collect();
        if silent.is_empty() {
            return;
        }
        let since_ms = check.since_ms;
        let status = self.status.clone();
        let done = self.done_tx.clone();
        let job: JobFn = Box::new(move |c: &mut StoreCtx| {
            match c.store.mark_offline_unseen(&silent, since_ms) {
                Ok(marked) => {
                    status
                        .cluster
                        .presence_marked_offline
                        .fetch_add(marked, Ordering::Relaxed);
                    if marked > 0 {
                        tracing::info!(
                            devices = marked,
                            "marked offline: shown online in partitions taken over, they answered no prompt (they left while their node was down)"
                        );
                    }
                }
                Err(e) => {
                    status.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("cannot mark the silent devices offline: {e}");
                }
            }
            deliver_after_commit(c, &done, Done::Status);
        });
        self.submit(job);
    }

    fn feed_advanced_here(&mut self, advanced: Vec<(DeviceId, u64)>) {
        if advanced.len() <= self.pace.per_tick {
            let now = self.now();
            for (device, head) in advanced {
                self.engine.handle_feed_advanced(now, &device, head);
            }
            return;
        }
        self.status
            .feed_wakeups_paced
            .fetch_add(advanced.len() as u64, Ordering::Relaxed);
        self.startup.extend(advanced);
    }

    /// Whether store work waits: an action for a slot (`max_store_jobs` out), or a job for room
    /// in the store's queue (shared with the API).
    fn store_behind(&self) -> bool {
        let action_waits = self
            .waiting
            .as_ref()
            .is_some_and(|a| !matches!(a, CloudAction::Transmit { .. }));
        action_waits || !self.jobs_waiting.is_empty()
    }

    /// Queues a store job (counted in `in_flight` until its completion is taken), behind those
    /// already waiting for room in the store's queue.
    fn submit(&mut self, job: JobFn) {
        self.in_flight += 1;
        if !self.jobs_waiting.is_empty() {
            self.jobs_waiting.push_back(job);
            return;
        }
        match self.store.try_submit(job) {
            Ok(()) => {}
            Err(NotSubmitted::Full(job)) => {
                self.status.store_waits.fetch_add(1, Ordering::Relaxed);
                self.jobs_waiting.push_back(job);
            }
            Err(NotSubmitted::Gone) => self.store_gone = true,
        }
    }

    /// Queues the jobs waiting for room, in order, as far as the store's queue takes them now.
    fn submit_waiting(&mut self) {
        while let Some(job) = self.jobs_waiting.pop_front() {
            match self.store.try_submit(job) {
                Ok(()) => {}
                Err(NotSubmitted::Full(job)) => {
                    self.jobs_waiting.push_front(job);
                    return;
                }
                Err(NotSubmitted::Gone) => {
                    self.store_gone = true;
                    return;
                }
            }
        }
    }

    /// Hands the next start-up prompts (and those after a link restore) to the engine.
    fn release_prompts(&mut self) {
        let room = self.publisher.room() / 2;
        let n = self.pace.per_tick.min(room).min(self.startup.len());
        let now = self.now();
        for (device, head) in self.startup.drain(..n) {
            self.engine.handle_feed_advanced(now, &device, head);
        }
        self.next_prompts = tokio::time::Instant::now() + self.pace.tick;
    }

    /// Carries out the engine's actions in order, until there are none or a store job must wait
    /// for a slot. It awaits nothing but the embedded broker's routing tables (read locks).
    async fn act(&mut self) {
        while !self.store_gone {
            let Some(action) = self.waiting.take().or_else(|| self.engine.poll_action()) else {
                return;
            };
            match action {
                CloudAction::Transmit { device, bytes } => {
                    if let Err(bytes) = self.publish(&device, bytes).await {
                        // No room: it waits (in order, before any later action), and the loop
                        // reads no device message until the egress connection drains.
                        self.status.egress_waits.fetch_add(1, Ordering::Relaxed);
                        self.waiting = Some(CloudAction::Transmit { device, bytes });
                        return;
                    }
                }
                store_work => {
                    if let CloudAction::Unsendable {
                        device,
                        model,
                        key,
                        reason,
                    } = &store_work
                    {
                        self.status.rows_skipped.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = self.oversize_warn.hit(Instant::now()) {
                            tracing::warn!(
                                %device, %model, pk = %key.pk, sk = %key.sk, suppressed,
                                "a stored row was skipped in a page: {reason}"
                            );
                        }
                    }
                    if let CloudAction::Throttled {
                        device,
                        rate_limited,
                        busy,
                    } = &store_work
                    {
                        if let Some(suppressed) = self.throttle_warn.hit(Instant::now()) {
                            tracing::warn!(
                                %device, rate_limited, busy, suppressed,
                                "refused messages of a device: over its message rate, or pushes \
                                 beyond those being applied (counted in /v1/status and on the \
                                 device; it was told to wait)"
                            );
                        }
                    }
                    if self.in_flight >= self.max_store_jobs {
                        self.status.store_waits.fetch_add(1, Ordering::Relaxed);
                        self.waiting = Some(store_work);
                        return;
                    }
                    let Some(job) = self.job_for(store_work) else {
                        continue;
                    };
                    self.submit(job);
                }
            }
        }
    }

    /// Builds the store job of an engine action, timed: how long it runs on the store thread
    /// goes to the latency histogram of its kind. `None` for the actions that are not store
    /// work (handled in `act`).
    fn job_for(&self, action: CloudAction) -> Option<JobFn> {
        let kind = match &action {
            CloudAction::ApplyPush { .. } => StoreJob::ApplyPush,
            CloudAction::ReadFeed { .. } => StoreJob::ReadFeed,
            CloudAction::ReadSnapshot { .. } => StoreJob::ReadSnapshot,
            CloudAction::DeviceStatus { .. } => StoreJob::DeviceStatus,
            CloudAction::Unsendable { .. } => StoreJob::SkippedRow,
            CloudAction::Throttled { .. } => StoreJob::Throttled,
            CloudAction::Transmit { .. } => return None,
        };
        let job = self.untimed_job_for(action)?;
        let status = self.status.clone();
        Some(Box::new(move |c: &mut StoreCtx| {
            let started = Instant::now();
            job(c);
            status.store_job_latency.observe(kind, started.elapsed());
        }))
    }

    /// Builds the store job of an engine action; the job reports back with a [`Done`]. `None`
    /// for the actions that are not store work.
    fn untimed_job_for(&self, action: CloudAction) -> Option<JobFn> {
        let done = self.done_tx.clone();
        let max_drift_ms = self.max_drift_ms;
        let status = self.status.clone();
        match action {
            CloudAction::ApplyPush {
                device,
                batch,
                changes,
                from_neighbour,
            } => Some(Box::new(move |c: &mut StoreCtx| {
                let rules = PushRules {
                    max_drift_ms,
                    from_neighbour,
                    cloud_schema: c.schema_tag.clone(),
                };
                let result = c.store.apply_push(
                    &c.schema,
                    &mut c.clock,
                    wall_ms(),
                    &rules,
                    &device,
                    &changes,
                );
                if let Ok((results, _)) = &result {
                    // The device's status shows the last change the cloud refused.
                    if let Some(message) = last_refusal(results) {
                        let update = StatusUpdate {
                            last_error: Some(Some(message)),
                            ..StatusUpdate::default()
                        };
                        if let Err(e) = c.store.update_status(&device, &update) {
                            status.store_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%device, "cannot record the last error: {e}");
                        }
                    }
                }
                deliver_after_commit(
                    c,
                    &done,
                    Done::Push {
                        device,
                        batch,
                        result,
                    },
                );
            })),
            CloudAction::ReadFeed {
                device,
                after,
                limit,
            } => Some(Box::new(move |c: &mut StoreCtx| {
                let result = c.store.read_feed(&device, after, limit);
                deliver_after_commit(c, &done, Done::Feed { device, result });
            })),
            CloudAction::ReadSnapshot {
                device,
                resync,
                from,
                limit,
            } => Some(Box::new(move |c: &mut StoreCtx| {
                let result =
                    c.store
                        .read_snapshot(&c.schema, &device, resync, from.as_ref(), limit);
                deliver_after_commit(c, &done, Done::Snapshot { device, result });
            })),
            CloudAction::DeviceStatus {
                device,
                online,
                schema_version,
                cursor_acked,
                pending,
                last_seen_ms,
            } => {
                let update = StatusUpdate {
                    online: Some(online),
                    // The engine's time of the last message, as wall time.
                    last_seen_ms: Some(self.started_wall_ms.saturating_add(last_seen_ms)),
                    schema_version: Some(schema_version),
                    pending,
                    ..StatusUpdate::default()
                };
                Some(Box::new(move |c: &mut StoreCtx| {
                    if let Err(e) = c.store.update_status(&device, &update) {
                        status.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%device, "cannot record device status: {e}");
                    }
                    // The cursor the device holds (a feed acknowledgement, or the cursor of a
                    // finished resync). Recorded on its own, even if the status update failed:
                    // a device whose cursor is stored is not prompted after a restart.
                    if let Some(cursor) = cursor_acked {
                        if let Err(e) = c.store.ack_cursor(&device, cursor) {
                            status.store_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%device, cursor, "cannot record the acknowledged cursor: {e}");
                        }
                    }
                    deliver_after_commit(c, &done, Done::Status);
                }))
            }
            CloudAction::Unsendable {
                device,
                model,
                key,
                reason,
            } => Some(Box::new(move |c: &mut StoreCtx| {
                // The device's status names the row, so the skip is never silent.
                let update = StatusUpdate {
                    last_error: Some(Some(format!(
                        "{model} ({}, {}) skipped in a page: {reason}",
                        key.pk, key.sk
                    ))),
                    ..StatusUpdate::default()
                };
                if let Err(e) = c.store.update_status(&device, &update) {
                    status.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "cannot record the skipped row: {e}");
                }
                deliver_after_commit(c, &done, Done::Status);
            })),
            CloudAction::Throttled {
                device,
                rate_limited,
                busy,
            } => Some(Box::new(move |c: &mut StoreCtx| {
                if let Err(e) = c.store.count_throttled(&device, rate_limited, busy) {
                    status.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "cannot count the device's refused messages: {e}");
                }
                deliver_after_commit(c, &done, Done::Status);
            })),
            CloudAction::Transmit { .. } => None,
        }
    }

    fn on_done(&mut self, done: Done) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some((within, presence)) = self.behind_waiting.take() {
            self.prompt_behind(within, presence);
        }
        let now = self.now();
        match done {
            Done::Push {
                device,
                batch,
                result,
            } => match result {
                Ok((results, advanced)) => {
                    self.count_answers(&results);
                    self.count_over_quota(&device, &results);
                    self.engine
                        .handle_push_applied(now, &device, batch, results);
                    for (d, head) in self.keep_served(advanced) {
                        self.engine.handle_feed_advanced(now, &d, head);
                    }
                }
                Err(StoreError::DeviceRevoked(_)) => {
                    // The device was revoked while this push was in flight: it is not applied.
                    self.status.pushes_revoked.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "push refused: the device is revoked");
                    self.engine
                        .handle_push_applied(now, &device, batch, Vec::new());
                }
                Err(e) => {
                    // Nothing was applied; the device resends the batch.
                    self.status.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%device, "cannot apply a push: {e}");
                    self.engine
                        .handle_push_applied(now, &device, batch, Vec::new());
                }
            },
            Done::Feed { device, result } => match result {
                Ok(page) => self.engine.handle_feed_page(now, &device, page),
                Err(e) => {
                    self.status.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%device, "cannot read the feed: {e}");
                }
            },
            Done::Snapshot { device, result } => match result {
                Ok(page) => self.engine.handle_snapshot_page(now, &device, page),
                Err(e) => {
                    self.status.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%device, "cannot read a snapshot page: {e}");
                }
            },
            Done::Behind {
                result: Ok(Listing { behind, online }),
                since_ms,
            } => {
                if !behind.is_empty() {
                    tracing::info!(
                        devices = behind.len(),
                        "prompting the devices with changes waiting in the partitions taken over"
                    );
                }
                // Served still (the leases may have moved again meanwhile), and without a
                // session here (a device that already said hello is present).
                let serving = &self.serving;
                let engine = &self.engine;
                let online: Vec<DeviceId> = online
                    .into_iter()
                    .filter(|d| serving.serves(d) && !engine.has_session(d))
                    .collect();
                let prompted: BTreeSet<&DeviceId> = behind.iter().map(|(d, _)| d).collect();
                let to_prompt: Vec<(DeviceId, u64)> = online
                    .iter()
                    .filter(|d| !prompted.contains(d))
                    .map(|d| (d.clone(), 0))
                    .collect();
                self.startup
                    .extend(behind.into_iter().filter(|(d, _)| serving.serves(d)));
                self.startup.extend(to_prompt);
                if !online.is_empty() {
                    tracing::info!(
                        devices = online.len(),
                        "prompting the devices shown online in the partitions taken over; those that do not answer will be marked offline"
                    );
                    self.presence.start(Instant::now(), since_ms, online);
                }
            }
            Done::Behind { result: Err(e), .. } => {
                self.status.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("cannot list the devices with changes waiting: {e}");
            }
            Done::Status => {}
        }
    }

    /// Counts the answers to a push's changes, service-wide.
    fn count_answers(&self, results: &[ChangeResult]) {
        let (mut applied, mut superseded, mut rejected) = (0, 0, 0);
        let (mut kept, mut deferred) = (0, 0);
        for r in results {
            match r.status {
                ChangeStatus::Applied => applied += 1,
                ChangeStatus::Stale { .. } => superseded += 1,
                ChangeStatus::Rejected {
                    reason: RejectReason::NewerSchema { .. },
                } => deferred += 1,
                ChangeStatus::Rejected { .. } => rejected += 1,
            }
            if r.kept.is_some() {
                kept += 1;
            }
        }
        let s = &self.status;
        s.push_changes_kept_from_neighbour
            .fetch_add(kept, Ordering::Relaxed);
        s.push_changes_deferred
            .fetch_add(deferred, Ordering::Relaxed);
        s.push_changes_applied.fetch_add(applied, Ordering::Relaxed);
        s.push_changes_superseded
            .fetch_add(superseded, Ordering::Relaxed);
        s.push_changes_rejected
            .fetch_add(rejected, Ordering::Relaxed);
    }

    /// Counts (and warns, rate-limited) the changes of a push refused for a quota or their size.
    fn count_over_quota(&mut self, device: &DeviceId, results: &[ChangeResult]) {
        let over = results
            .iter()
            .filter(|r| {
                matches!(
                    r.status,
                    ChangeStatus::Rejected {
                        reason: RejectReason::QuotaExceeded { .. }
                            | RejectReason::ItemTooLarge { .. }
                    }
                )
            })
            .count() as u64;
        if over == 0 {
            return;
        }
        self.status
            .changes_over_quota
            .fetch_add(over, Ordering::Relaxed);
        if let Some(suppressed) = self.quota_warn.hit(Instant::now()) {
            tracing::warn!(
                %device, over, suppressed,
                "pushed changes refused for the device's quotas or their item size (final; \
                 the device's last_error names the last one)"
            );
        }
    }

    /// Publishes on a device's down topic. `Err` hands the message back when the egress queue
    /// has no room now (the caller waits for room); a client that refuses the request (it is
    /// shutting down) drops it, counted and logged. In-process, a publish that reaches no
    /// device session is counted and logged.
    async fn publish(&mut self, device: &DeviceId, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        let topic = topics::down_topic(&self.prefix, device);
        let len = bytes.len() as u64;
        let ClientLink { client, gauge, .. } = match &self.publisher {
            Publisher::Clients(links) => &links[egress_index(device, links.len())],
            Publisher::Embedded(publisher) => {
                match publisher.publish(topic, bytes).await {
                    Delivery::Queued => {
                        self.status.publishes_queued.fetch_add(1, Ordering::Relaxed);
                        self.status.bytes_out.fetch_add(len, Ordering::Relaxed);
                    }
                    undelivered => {
                        self.status
                            .publishes_undelivered
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = self.undelivered_warn.hit(Instant::now()) {
                            let why = match undelivered {
                                Delivery::Refused(why) => why,
                                _ => "no session subscribed to its topic (offline, or not \
                                      subscribed yet)"
                                    .to_string(),
                            };
                            tracing::warn!(
                                %device, suppressed,
                                "the broker could not deliver a publish to a device: {why} \
                                 (counted in publishes_undelivered; the engine's timers and \
                                 the device's next hello recover)"
                            );
                        }
                    }
                }
                return Ok(());
            }
        };
        if !gauge.try_take_publish_slot() {
            return Err(bytes);
        }
        match client.try_publish(topic, QoS::AtLeastOnce, false, bytes) {
            Ok(()) => {
                self.status.publishes_queued.fetch_add(1, Ordering::Relaxed);
                self.status.bytes_out.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => {
                gauge.release();
                self.status
                    .publishes_dropped
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.drop_warn.hit(Instant::now()) {
                    tracing::warn!(
                        %device, suppressed,
                        "a publish to a device was dropped: {e} (the engine's timers resend)"
                    );
                }
            }
        }
        Ok(())
    }

    /// Updates the gauges the API shows.
    fn report(&mut self) {
        let s = &self.status;
        // The feed lag is a pass over every session: at most once per `FEED_LAG_EVERY`.
        let now = Instant::now();
        // Skipped now, it is taken when the interval ends (the loop wakes for it), so an idle
        // service never shows a stale lag.
        self.feed_lag_stale = now < self.next_feed_lag;
        if !self.feed_lag_stale {
            self.next_feed_lag = now + FEED_LAG_EVERY;
            let lag = self.engine.feed_lag();
            s.feed_lag_entries.store(lag.entries, Ordering::Relaxed);
            s.feed_lag_max.store(lag.max, Ordering::Relaxed);
            s.sessions_behind
                .store(lag.sessions_behind, Ordering::Relaxed);
            s.sessions_resyncing
                .store(lag.sessions_resyncing, Ordering::Relaxed);
        }
        s.sessions
            .store(self.engine.sessions() as u64, Ordering::Relaxed);
        s.prompts_pending
            .store(self.startup.len() as u64, Ordering::Relaxed);
        s.mqtt_requests_queued
            .store(self.publisher.queued() as u64, Ordering::Relaxed);
        s.store_jobs_in_flight
            .store(self.in_flight as u64, Ordering::Relaxed);
        let e = self.engine.stats();
        s.device_messages_rate_limited
            .store(e.rate_limited, Ordering::Relaxed);
        s.device_pushes_busy.store(e.pushes_busy, Ordering::Relaxed);
        s.device_push_changes_covered
            .store(e.push_changes_covered, Ordering::Relaxed);
        s.device_pushes_covered
            .store(e.pushes_covered, Ordering::Relaxed);
        s.device_push_changes_reanswered
            .store(e.push_changes_reanswered, Ordering::Relaxed);
        s.device_messages_refused
            .store(e.messages_refused, Ordering::Relaxed);
        s.device_messages_without_session
            .store(e.messages_without_session, Ordering::Relaxed);
        s.device_pushes_of_ended_sessions
            .store(e.pushes_of_ended_sessions, Ordering::Relaxed);
        s.device_acks_dropped
            .store(e.acks_dropped, Ordering::Relaxed);
        s.restores_detected
            .store(e.restores_detected, Ordering::Relaxed);
        s.resyncs_started
            .store(e.resyncs_started, Ordering::Relaxed);
    }
}

/// Resolves when room may have freed up in this request queue; never without one.
async fn freed(gauge: Option<&RequestGauge>) {
    match gauge {
        Some(gauge) => gauge.freed().await,
        None => std::future::pending().await,
    }
}

/// The next event of a connection's task; never ready without a connection (in-process).
async fn recv_link(link: &mut Option<mpsc::Receiver<TaggedEvent>>) -> Option<TaggedEvent> {
    match link {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The next wake-up heard from other nodes; never ready without a listener.
async fn recv_heard(heard: &mut Option<mpsc::Receiver<Heard>>) -> Option<Heard> {
    match heard {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The last change of a push that the cloud refused, as a sentence.
fn last_refusal(results: &[ChangeResult]) -> Option<String> {
    results.iter().rev().find_map(|r| match &r.status {
        ChangeStatus::Rejected { reason } => {
            Some(format!("{} {} rejected: {reason}", r.model, r.key))
        }
        _ => None,
    })
}

impl Done {
    /// This completion when its job's group was not committed: whatever it read or wrote is
    /// not there (the loop handles it as that store error: a push is not acknowledged and
    /// the device resends it).
    fn not_committed(self, e: &StoreError) -> Done {
        let lost = || StoreError::Database(format!("not committed: {e}"));
        match self {
            Done::Push { device, batch, .. } => Done::Push {
                device,
                batch,
                result: Err(lost()),
            },
            Done::Feed { device, .. } => Done::Feed {
                device,
                result: Err(lost()),
            },
            Done::Snapshot { device, .. } => Done::Snapshot {
                device,
                result: Err(lost()),
            },
            other => other,
        }
    }
}

/// Hands a store job's completion to the loop once the job's work is committed: an
/// acknowledgement never goes out for a push that is not durable.
fn deliver_after_commit(c: &mut StoreCtx, done: &mpsc::Sender<Done>, d: Done) {
    let done = done.clone();
    c.after_commit(Box::new(move |committed| {
        let d = match committed {
            Ok(()) => d,
            Err(e) => d.not_committed(e),
        };
        deliver(&done, d);
    }));
}

/// Hands a completion to the loop (from the store thread).
fn deliver(done: &mpsc::Sender<Done>, d: Done) {
    match done.try_send(d) {
        Ok(()) => {}
        // The loop stopped: nobody waits for the result.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            // Cannot happen: the channel holds as many completions as jobs may be out.
            tracing::error!("a store completion could not be delivered to the sync loop");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_always_publishes_through_the_same_egress_client_and_all_are_used() {
        let devices: Vec<DeviceId> = (0..64)
            .map(|i| DeviceId::new("a", format!("d{i}")).unwrap())
            .collect();
        let first: Vec<usize> = devices.iter().map(|d| egress_index(d, 3)).collect();
        let again: Vec<usize> = devices.iter().map(|d| egress_index(d, 3)).collect();
        assert_eq!(first, again, "a device moved to another client");
        let used: std::collections::BTreeSet<usize> = first.iter().copied().collect();
        assert_eq!(used, [0, 1, 2].into(), "a client carries no device");
        assert!(devices.iter().all(|d| egress_index(d, 1) == 0));
    }

    #[test]
    fn a_completion_whose_group_was_not_committed_reports_a_store_error() {
        let device = DeviceId::new("a", "d").unwrap();
        let lost = StoreError::Database("disk full".into());
        let applied = Done::Push {
            device: device.clone(),
            batch: 7,
            result: Ok((Vec::new(), vec![(device.clone(), 3)])),
        };
        let Done::Push { batch, result, .. } = applied.not_committed(&lost) else {
            panic!("a push stays a push");
        };
        assert_eq!(batch, 7);
        let err = result.expect_err("a push that is not durable is not acknowledged");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(
            matches!(Done::Status.not_committed(&lost), Done::Status),
            "a status write has nobody to answer"
        );
    }
}
