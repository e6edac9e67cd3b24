//! The device engine: the device side of the protocol as a deterministic state machine.
//!
//! This module exists so that every decision the device makes (when to send, what to resend,
//! which acknowledgement removes which outbox entry, which page to apply) is taken here, without
//! I/O, and is exercised by the simulator exactly as the agent runs it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use devtables_schema::ItemKey;

use crate::apply::{ApplyOutcome, ApplyPage, FeedMark, Skipped};
use crate::hlc::Hlc;
use crate::rng::SplitMix;
use crate::wire::{
    self, Change, ChangeStatus, DeviceMark, DownMsg, ErrorCode, Fit, MessageBudget, Op,
    RejectReason, SnapshotCursor, UpMsg, WireConfig, WireError,
};

/// Limits and timings of a [`DeviceEngine`].
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Message limits; must match the cloud's.
    pub wire: WireConfig,
    /// Largest push message, in bytes (capped by `wire.max_message_bytes`). Default 64 KiB, half
    /// the broker's limit, so a catch-up flows as many moderate messages.
    pub max_batch_bytes: usize,
    /// Most changes in one push. Default 500.
    pub max_batch_changes: usize,
    /// How long a queued change waits for company while an earlier batch is in flight, in ms.
    /// Default 50 (at most 100 is sensible). With nothing in flight a change is sent at once
    /// (Nagle-style): a lone write goes out immediately, a burst as a few full batches.
    pub batch_delay_ms: u64,
    /// Most unacknowledged batches. Default 4; bounds memory and broker load.
    pub max_in_flight: usize,
    /// First retransmit timeout, in ms. Default 1000.
    pub retransmit_base_ms: u64,
    /// Longest retransmit timeout, in ms (exponential backoff stops here). Default 30 000.
    pub retransmit_max_ms: u64,
    /// Most received pages waiting to be applied. Default 4; more are dropped (the cloud resends).
    pub max_buffered_pages: usize,
    /// Most undelivered outputs of each kind (transmits, events); the oldest is dropped beyond
    /// it, which the protocol treats as message loss. Default 1024.
    pub max_queued_outputs: usize,
    /// Outbox size above which [`DeviceEvent::OutboxHigh`] is raised. Default 100 000.
    pub outbox_high_water: usize,
    /// Seed for session ids, batch ids and retransmit jitter. Give each device and each boot a
    /// different seed (for example from the hardware RNG), and a fixed one in tests.
    pub seed: u64,
}

impl Default for DeviceConfig {
    fn default() -> DeviceConfig {
        DeviceConfig {
            wire: WireConfig::default(),
            max_batch_bytes: 64 * 1024,
            max_batch_changes: 500,
            batch_delay_ms: 50,
            max_in_flight: 4,
            retransmit_base_ms: 1000,
            retransmit_max_ms: 30_000,
            max_buffered_pages: 4,
            max_queued_outputs: 1024,
            outbox_high_water: 100_000,
            seed: 0,
        }
    }
}

/// What the engine keeps of one durable outbox entry: not the change itself, which stays in
/// the driver's durable outbox until a batch is built ([`DeviceAction::LoadBatch`]), so the
/// engine's memory does not grow with the size of the items waiting during an outage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMeta {
    /// The item's model.
    pub model: String,
    /// The item's key.
    pub key: ItemKey,
    /// The version of the newest local change of the key.
    pub version: Hlc,
    /// Encoded size of the change ([`wire::change_len`]): what batches are budgeted with.
    pub len: usize,
    /// Whether the change is a delete.
    pub delete: bool,
}

impl OutboxMeta {
    /// The metadata of a change (computes its encoded size).
    pub fn of(change: &Change) -> OutboxMeta {
        OutboxMeta {
            model: change.model.clone(),
            key: change.key.clone(),
            version: change.version,
            len: wire::change_len(change),
            delete: change.op == Op::Delete,
        }
    }
}

impl From<&Change> for OutboxMeta {
    fn from(change: &Change) -> OutboxMeta {
        OutboxMeta::of(change)
    }
}

impl From<Change> for OutboxMeta {
    fn from(change: Change) -> OutboxMeta {
        OutboxMeta::of(&change)
    }
}

/// What the driver restores from durable storage when it builds an engine.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// The feed cursor stored by the last applied page.
    pub cursor: u64,
    /// The durable outbox's metadata, oldest first, at most one entry per key.
    pub outbox: Vec<OutboxMeta>,
    /// The feed mark stored by the last page that stored one
    /// ([`crate::apply::DeviceTxn::set_feed_mark`]).
    pub mark: FeedMark,
    /// The answered count stored with the last outbox trim ([`DeviceAction::OutboxRemove`])
    /// or by [`DeviceAction::StoreAnswered`].
    pub answered: u64,
}

/// Work for the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceAction {
    /// Run [`crate::apply::device_apply`] on this page in one transaction, then call
    /// [`DeviceEngine::handle_applied`] (or [`DeviceEngine::handle_apply_failed`]).
    Apply(ApplyPage),
    /// Delete these durable outbox entries, each only if its stored version still equals the
    /// given one (a newer local write keeps its entry). In the same transaction, raise the
    /// device's stored answered count to `answered` if it is higher: the cloud's count once it
    /// answered these changes, which the next hello tells it (a cloud restored from an older
    /// backup then sees it lost them).
    OutboxRemove {
        /// (model, key, version) of each entry answered.
        entries: Vec<(String, ItemKey, Hlc)>,
        /// The acknowledgement's answered count, if it carried one.
        answered: Option<u64>,
    },
    /// The cloud was restored from a backup and lost writes it had acknowledged, or feed data
    /// this device holds: put every write the device holds of a model that syncs up (each live
    /// item and each tombstone that has no outbox entry) into the durable outbox, at the version
    /// it holds (a live item whose version was collected gets a fresh one), without a base, in
    /// bounded slices of one transaction each; hand each new entry to
    /// [`DeviceEngine::handle_local_change`] and, when every slice is done, call
    /// [`DeviceEngine::handle_repush_done`]. No push is sent meanwhile. The cloud's version rule
    /// makes the re-push idempotent: what it still holds is answered as a duplicate.
    Repush,
    /// Replace the device's stored answered count with this one (the cloud's, after a
    /// [`DeviceAction::Repush`] is complete): the device no longer claims acknowledgements the
    /// restored cloud lost, since it gave their writes back.
    StoreAnswered(u64),
    /// The cloud refused this outbox entry's version as too far in the future. In one
    /// transaction, if the entry still holds `version`: rewind the clock to `cloud_ms`
    /// ([`crate::hlc::HlcClock::rewind_to`]), tick a new version on the device's corrected
    /// time, store it as the key's version and the entry's; then call
    /// [`DeviceEngine::handle_restamped`] with the new change.
    Restamp {
        /// The entry's model.
        model: String,
        /// The entry's key.
        key: ItemKey,
        /// The refused version.
        version: Hlc,
        /// The cloud's time when it refused it.
        cloud_ms: u64,
    },
    /// Read the current durable outbox entries of these keys and pass those that exist to
    /// [`DeviceEngine::handle_batch_loaded`] with the same `batch` (a key without an entry is
    /// simply left out). Until then the batch counts as in flight; if the answer does not come
    /// before its retransmit timeout, the keys are queued again.
    LoadBatch {
        /// The batch id to answer with.
        batch: u64,
        /// The keys (model, key), oldest first.
        keys: Vec<(String, ItemKey)>,
    },
}

/// Things the application may want to know.
#[derive(Clone, Debug, PartialEq)]
pub enum DeviceEvent {
    /// Connected; a hello was sent.
    Connected,
    /// The cloud welcomed the session: changes flow.
    Ready,
    /// The cloud told its time (in its welcome). The driver stamps versions on
    /// `cloud_ms + (its clock now - its clock at receipt)`, so a wrong device clock never
    /// produces versions the cloud refuses.
    CloudTime {
        /// The cloud's wall time, ms since the Unix epoch.
        cloud_ms: u64,
        /// How far past its time the cloud accepts a version, in ms.
        max_drift_ms: u64,
    },
    /// A local change lost to a higher version the cloud holds; it left the outbox. For models
    /// that sync down the winner arrives through the feed.
    Superseded {
        /// The change that lost.
        change: Change,
        /// The version that won.
        winner: Hlc,
    },
    /// A local change was re-stamped with a version on the cloud's time (its first version was
    /// too far in the future) and is sent again.
    Restamped {
        /// The model.
        model: String,
        /// The key.
        key: ItemKey,
        /// The refused version.
        from: Hlc,
        /// The new version.
        to: Hlc,
    },
    /// The end of a resync deleted a local item the cloud does not hold (the cloud refused it,
    /// or never received it and the device no longer had it pending).
    Swept {
        /// The model.
        model: String,
        /// The key.
        key: ItemKey,
    },
    /// The cloud cannot take a change yet ([`RejectReason::NewerSchema`]: this device runs a
    /// newer schema than the cloud's); it stays in the outbox and is sent again in the next
    /// session.
    Deferred {
        /// The deferred change.
        change: Change,
        /// Why.
        reason: RejectReason,
    },
    /// The cloud's welcome announced another schema version than this device's: items are
    /// exchanged under the neighbouring-version rules (see `Model::normalize_from_neighbour`).
    CloudSchema {
        /// The cloud's schema version tag.
        cloud: String,
        /// This device's.
        device: String,
    },
    /// The cloud applied a change but kept parts its own (older) schema does not define.
    KeptByCloud {
        /// The change's model.
        model: String,
        /// The change's key.
        key: ItemKey,
        /// What the cloud's strict check refused and kept.
        detail: String,
    },
    /// Items of an applied page held fields or enum values this device's schema does not
    /// define (the cloud runs a newer, compatible schema): they were stored whole.
    KeptFromCloud {
        /// How many items.
        count: u64,
    },
    /// The cloud (or the size check) refused a change; it left the outbox and is not retried.
    Rejected {
        /// The refused change.
        change: Change,
        /// Why.
        reason: RejectReason,
    },
    /// The cloud refused a message for the device's message rate ([`ErrorCode::RateLimited`])
    /// or because too many of its pushes were being applied ([`ErrorCode::Busy`]). No push is
    /// sent before `retry_after_ms` has passed; nothing is lost (refused pushes are resent from
    /// the outbox, acknowledgements and pages recover on their timers).
    Throttled {
        /// How long pushes wait, in ms (the cloud's hint, at most `retransmit_max_ms`).
        retry_after_ms: u64,
        /// Whether the cloud was busy with earlier pushes (rather than the rate exceeded).
        busy: bool,
    },
    /// A push was not answered within its retransmit timeout: its changes go out again in a
    /// new batch (a slow or unreachable cloud; nothing is lost, and a cloud that still holds
    /// the original answers once).
    PushTimedOut {
        /// Changes it carried.
        changes: usize,
        /// How long it waited, in ms.
        waited_ms: u64,
    },
    /// The cloud reported an error.
    CloudError {
        /// The error code.
        code: ErrorCode,
        /// The cloud's message.
        message: String,
    },
    /// A message from the cloud could not be decoded; it was dropped.
    Malformed(WireError),
    /// An item of a page was not valid for the device schema and was skipped.
    ApplySkipped(Skipped),
    /// The driver could not apply a page; it will be received again.
    ApplyFailed,
    /// A full resync finished; the feed continues from `cursor`.
    Resynced {
        /// The cursor stored.
        cursor: u64,
        /// Local items the final sweep deleted.
        swept: u64,
    },
    /// The outbox holds more entries than `outbox_high_water`.
    OutboxHigh {
        /// Entries pending.
        pending: usize,
    },
    /// A re-push after a cloud restore ([`DeviceAction::Repush`]) put `count` held writes back
    /// into the outbox; they are being sent.
    Repushed {
        /// Writes put back into the outbox.
        count: u64,
    },
}

/// The fields of a received [`DownMsg::Snapshot`].
struct SnapshotRx {
    resync: u64,
    session: Option<u64>,
    after: Option<SnapshotCursor>,
    last: Option<SnapshotCursor>,
    items: Vec<Change>,
    done: bool,
    cursor: u64,
    gen: Option<u64>,
    seen: Option<u64>,
    restore: bool,
}

/// One queued or in-flight outbox entry (the newest change of one key), as metadata: the change
/// itself is loaded from the driver's durable outbox when a batch is built.
#[derive(Clone, Debug)]
struct Entry {
    /// Version of the newest local change of the key.
    version: Hlc,
    /// Encoded size of that change, for batch building.
    len: usize,
    /// Whether that change is a delete.
    delete: bool,
    /// Queue position: first-write order, so a hot key is not starved.
    seq: u64,
    /// When the entry last became queued; starts the batch delay.
    queued_at: u64,
    /// Whether the newest change waits to be sent.
    queued: bool,
    /// Whether the driver is re-stamping the change (the cloud refused its version as too far
    /// in the future); it is not sent until [`DeviceEngine::handle_restamped`].
    restamping: bool,
    /// The batch and version in flight, if any (may be older than `change`).
    in_flight: Option<(u64, Hlc)>,
}

/// A sent, unacknowledged push (or one whose changes the driver is loading).
#[derive(Clone, Debug)]
struct Batch {
    /// The keys and versions sent (while loading: the versions known when it was built).
    keys: Vec<(String, ItemKey, Hlc)>,
    /// When it is resent (while loading: when the keys are queued again if no answer came).
    deadline: u64,
    /// The backoff level its timeout was computed at: its expiry raises the device's backoff to
    /// one past it. Counting expiries instead would let a window of batches lost together (one
    /// outage, or a full local MQTT queue) raise the backoff once per batch, up to the longest
    /// timeout at once.
    level: u32,
    /// Waiting for [`DeviceEngine::handle_batch_loaded`].
    loading: bool,
    /// When it was sent (engine time): its answer measures the cloud's answer time.
    sent_ms: u64,
    /// The changes sent, for the event of a rejected one. Bounded by the window:
    /// `max_in_flight` batches of at most `max_batch_bytes`.
    sent: Vec<Change>,
}

/// A resync being received.
#[derive(Clone, Debug)]
struct ResyncRx {
    /// The resync id.
    id: u64,
    /// The position after the last accepted page; the next page must follow it.
    pos: Option<SnapshotCursor>,
    /// The highest feed head its accepted pages reflect: a restore resync stores it, as the
    /// device's new feed mark, with its final page.
    seen: u64,
}

/// A re-push after a cloud restore, under way ([`DeviceAction::Repush`]).
#[derive(Clone, Copy, Debug)]
struct RepushRun {
    /// The answered count to store when it ends: the cloud's in the welcome, raised by
    /// acknowledgements received meanwhile.
    answered: u64,
    /// Another welcome asked for a re-push with a lower count than this one holds (the cloud
    /// was restored again): scan again when this one ends.
    again: bool,
}

/// The device side of the protocol.
///
/// Four kinds of methods, as in quinn-proto:
/// - getters: [`cursor`](Self::cursor), [`pending`](Self::pending), [`in_flight`](Self::in_flight),
///   [`is_ready`](Self::is_ready);
/// - inputs (`handle_*`): connection changes, messages, committed local changes, finished applies
///   and timeouts, each with the current time in ms;
/// - outputs (`poll_*`), which the driver drains after every input, in this order:
///   [`poll_action`](Self::poll_action) (storage work), [`poll_transmit`](Self::poll_transmit)
///   (publish QoS 1 on the up topic), [`poll_event`](Self::poll_event), and last
///   [`poll_timeout`](Self::poll_timeout) (when to call [`handle_timeout`](Self::handle_timeout)).
///
/// Invariant: an outbox entry leaves only when the cloud answered for exactly its current
/// version, so a newer local write is never lost to an older acknowledgement.
#[derive(Debug)]
pub struct DeviceEngine {
    /// Limits and timings.
    cfg: DeviceConfig,
    /// The device schema version, sent in every envelope.
    schema_version: String,
    /// Ids and jitter.
    rng: SplitMix,
    /// The durable feed cursor (as of the last finished apply).
    cursor: u64,
    /// Whether the transport is up.
    connected: bool,
    /// The current hello's session id.
    session: Option<u64>,
    /// Whether the cloud welcomed `session`.
    ready: bool,
    /// When the hello is resent, while unanswered.
    hello_deadline: Option<u64>,
    /// Hellos sent in this connection, for backoff.
    hello_attempts: u32,
    /// When the current session's first hello was sent: its welcome, if that hello was not
    /// resent, is the engine's first measure of the cloud's answer time.
    hello_sent_ms: Option<u64>,
    /// Outbox entries by (model, key).
    entries: BTreeMap<(String, ItemKey), Entry>,
    /// Queued entries by queue position.
    order: BTreeMap<u64, (String, ItemKey)>,
    /// Next queue position.
    next_seq: u64,
    /// Unacknowledged batches by id.
    batches: BTreeMap<u64, Batch>,
    /// Next batch id.
    next_batch: u64,
    /// Consecutive retransmit timeouts, for exponential backoff; reset by any push ack.
    backoff: u32,
    /// How long the cloud takes to answer a push: the first retransmit timeout follows it.
    rtt: crate::rtt::RttEstimate,
    /// Pushes whose retransmit timer fired in this session, with when each was sent, newest
    /// last (at most `2 × max_in_flight`). Each batch id is sent once (a timeout dissolves the
    /// batch and its changes go out under a new id), so a late answer to one of them is no
    /// ambiguous sample (Karn's problem does not arise): it is exactly the wait the timer
    /// under-estimated, and the estimate learns it. Without it a cloud whose queue grew past
    /// the estimate would never be measured, and every push would time out and be sent twice.
    timed_out: VecDeque<(u64, u64)>,
    /// The page handed to the driver, if any (one at a time).
    applying: Option<ApplyPage>,
    /// Accepted pages waiting to be applied.
    inbox: VecDeque<ApplyPage>,
    /// The cursor after every accepted page: the `from` the next feed page must have.
    tail: u64,
    /// A resync being received.
    resync: Option<ResyncRx>,
    /// The last snapshot acknowledgement (resync, position, done), to repeat it for duplicates.
    last_snapshot_ack: Option<(u64, Option<SnapshotCursor>, bool)>,
    /// Bytes to publish.
    transmits: VecDeque<Vec<u8>>,
    /// Storage work.
    actions: VecDeque<DeviceAction>,
    /// Notifications.
    events: VecDeque<DeviceEvent>,
    /// Whether `OutboxHigh` was raised and not yet cleared.
    high_raised: bool,
    /// No push is sent before this time: the cloud asked the device to slow down.
    paused_until: Option<u64>,
    /// Most changes per push the cloud takes, when it said so ([`ErrorCode::TooManyChanges`]).
    cloud_max_changes: Option<usize>,
    /// The feed mark as stored (as of the last applied page that stored one): told in hellos.
    mark: FeedMark,
    /// The feed mark after every accepted page (what the next page's mark builds on).
    mark_tail: FeedMark,
    /// The answered count as stored: told in hellos.
    answered: u64,
    /// A re-push after a cloud restore under way: no push is sent until it ends.
    repush: Option<RepushRun>,
    /// Keys whose change the cloud deferred ([`RejectReason::NewerSchema`]): not sent again in
    /// this session, queued again when the next one starts.
    parked: BTreeSet<(String, ItemKey)>,
}

impl DeviceEngine {
    /// An engine resuming from durable state.
    pub fn new(config: DeviceConfig, schema_version: String, restored: Restored) -> DeviceEngine {
        let mut rng = SplitMix::new(config.seed);
        let next_batch = rng.next() >> 16;
        let mut engine = DeviceEngine {
            cfg: config,
            schema_version,
            rng,
            cursor: restored.cursor,
            connected: false,
            session: None,
            ready: false,
            hello_deadline: None,
            hello_attempts: 0,
            hello_sent_ms: None,
            entries: BTreeMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            batches: BTreeMap::new(),
            next_batch,
            backoff: 0,
            rtt: crate::rtt::RttEstimate::default(),
            timed_out: VecDeque::new(),
            applying: None,
            inbox: VecDeque::new(),
            tail: restored.cursor,
            resync: None,
            last_snapshot_ack: None,
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            high_raised: false,
            paused_until: None,
            cloud_max_changes: None,
            mark: restored.mark,
            mark_tail: restored.mark,
            answered: restored.answered,
            repush: None,
            parked: BTreeSet::new(),
        };
        for meta in restored.outbox {
            engine.enqueue(0, meta);
        }
        engine
    }

    /// The durable feed cursor, as of the last finished apply.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Outbox entries not yet acknowledged (one per key).
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Changes in unacknowledged batches.
    pub fn in_flight(&self) -> usize {
        self.batches.values().map(|b| b.keys.len()).sum()
    }

    /// Whether the cloud welcomed this connection.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Whether a re-push after a cloud restore is under way (pushes wait for it).
    pub fn is_repushing(&self) -> bool {
        self.repush.is_some()
    }

    /// The transport connected.
    pub fn handle_connected(&mut self, now_ms: u64) {
        self.connected = true;
        self.new_session(now_ms);
        self.event(DeviceEvent::Connected);
    }

    /// The transport dropped: everything in flight is queued again.
    pub fn handle_disconnected(&mut self, now_ms: u64) {
        let _ = now_ms;
        self.connected = false;
        self.ready = false;
        self.session = None;
        self.hello_deadline = None;
        self.transmits.clear();
        self.dissolve_all();
    }

    /// A local change was committed together with its durable outbox entry. Only its metadata
    /// is kept (pass the change, or its [`OutboxMeta`]).
    pub fn handle_local_change(&mut self, now_ms: u64, change: impl Into<OutboxMeta>) {
        self.enqueue(now_ms, change.into());
        if self.entries.len() > self.cfg.outbox_high_water && !self.high_raised {
            self.high_raised = true;
            self.event(DeviceEvent::OutboxHigh {
                pending: self.entries.len(),
            });
        }
        self.flush(now_ms);
    }

    /// A message arrived on the down topic (or the broadcast topic).
    pub fn handle_message(&mut self, now_ms: u64, bytes: &[u8]) {
        let decoded = match wire::decode_down(bytes, &self.cfg.wire) {
            Ok(d) => d,
            Err(e) => {
                self.event(DeviceEvent::Malformed(e));
                return;
            }
        };
        match decoded.msg {
            DownMsg::Welcome {
                session,
                now_ms: cloud_ms,
                max_drift_ms,
                answered,
                repush,
            } => {
                if self.connected && !self.ready && self.session == Some(session) {
                    self.ready = true;
                    self.hello_deadline = None;
                    // The welcome waits for a store read behind the same queue as pushes: its
                    // time is the first measure of how long a push will take to be answered
                    // (as TCP takes its first from the handshake), so the first pushes after a
                    // connection to a loaded cloud, a reconnect storm above all, are not
                    // resent after the one-second floor while the cloud still holds them.
                    // Only an answer to a hello sent once measures anything (Karn).
                    if let (0, Some(sent)) = (self.hello_attempts, self.hello_sent_ms.take()) {
                        self.rtt.observe(now_ms.saturating_sub(sent));
                    }
                    self.backoff = 0;
                    self.event(DeviceEvent::CloudTime {
                        cloud_ms,
                        max_drift_ms,
                    });
                    self.event(DeviceEvent::Ready);
                    if decoded.schema != self.schema_version {
                        self.event(DeviceEvent::CloudSchema {
                            cloud: decoded.schema.clone(),
                            device: self.schema_version.clone(),
                        });
                    }
                    self.unpark(now_ms);
                    if repush {
                        self.start_repush(answered.unwrap_or(0));
                    }
                }
            }
            DownMsg::PushAck {
                batch,
                results,
                answered,
                session,
            } => {
                // An answer of another session (delayed past a reconnect) is not acted on: its
                // changes were requeued and are answered again in this one.
                if session.is_none_or(|s| self.session == Some(s)) {
                    self.on_push_ack(now_ms, batch, results, answered);
                }
            }
            DownMsg::Feed {
                from,
                to,
                changes,
                session,
                gen,
                seen,
            } => {
                // A page of another session (delayed past a reconnect) is not this stream's.
                if session.is_none_or(|s| self.session == Some(s)) {
                    self.on_feed(from, to, changes, gen, seen.unwrap_or(to));
                }
            }
            DownMsg::Snapshot {
                resync,
                session,
                after,
                last,
                items,
                done,
                cursor,
                gen,
                seen,
                restore,
            } => self.on_snapshot(SnapshotRx {
                resync,
                session,
                after,
                last,
                items,
                done,
                cursor,
                gen,
                seen,
                restore,
            }),
            DownMsg::Error { code, message } => match code {
                ErrorCode::NoSession => {
                    // Only restart a welcomed session: while a hello is outstanding it will be
                    // answered, and restarting again would only churn session ids.
                    if self.connected && self.ready {
                        self.new_session(now_ms);
                    }
                }
                ErrorCode::RateLimited { retry_after_ms }
                | ErrorCode::Busy { retry_after_ms, .. } => {
                    // A cloud cannot stall the device longer than a retransmit would wait.
                    let wait = retry_after_ms.clamp(1, self.cfg.retransmit_max_ms.max(1));
                    let until = now_ms.saturating_add(wait);
                    self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
                    // The refused message may be one of the pushes in flight, which the cloud
                    // then never saw: it is resent once the pause ends, instead of waiting out
                    // a retransmit timeout that backoff may have made long. A busy answer names
                    // its push: the others were taken, and resending them would only queue
                    // copies behind them (answered again, never applied twice, but each a
                    // store job of a cloud that is already behind). Otherwise every push in
                    // flight is resent.
                    let refused = match code {
                        ErrorCode::Busy {
                            batch: Some(batch), ..
                        } => Some(batch),
                        _ => None,
                    };
                    for (id, b) in &mut self.batches {
                        if refused.is_none_or(|r| r == *id) {
                            b.deadline = b.deadline.min(until);
                        }
                    }
                    self.event(DeviceEvent::Throttled {
                        retry_after_ms: wait,
                        busy: matches!(code, ErrorCode::Busy { .. }),
                    });
                }
                ErrorCode::TooManyChanges { max } => {
                    // Later batches are cut to what the cloud takes; the refused batch is
                    // rebuilt when its retransmit timer dissolves it.
                    let max = usize::try_from(max).unwrap_or(usize::MAX).max(1);
                    self.cloud_max_changes =
                        Some(self.cloud_max_changes.map_or(max, |m| m.min(max)));
                    self.event(DeviceEvent::CloudError { code, message });
                }
                _ => self.event(DeviceEvent::CloudError { code, message }),
            },
        }
        self.next_apply();
        self.flush(now_ms);
    }

    /// The driver finished applying the page of the last [`DeviceAction::Apply`].
    pub fn handle_applied(&mut self, now_ms: u64, outcome: ApplyOutcome) {
        let Some(page) = self.applying.take() else {
            return;
        };
        if outcome.kept_from_neighbour > 0 {
            self.event(DeviceEvent::KeptFromCloud {
                count: outcome.kept_from_neighbour,
            });
        }
        for skipped in outcome.invalid {
            self.event(DeviceEvent::ApplySkipped(skipped));
        }
        for (model, key) in outcome.swept_keys {
            self.event(DeviceEvent::Swept { model, key });
        }
        // Local changes a newer remote write beat: their durable entries are gone, so they are
        // forgotten here too (unless the engine already knows a newer local change of the key,
        // announced after the page was applied).
        for (change, winner) in outcome.superseded {
            let k = (change.model.clone(), change.key.clone());
            if self
                .entries
                .get(&k)
                .is_some_and(|e| e.version <= change.version)
            {
                self.remove_entry(&k);
            }
            self.event(DeviceEvent::Superseded { change, winner });
        }
        if let ApplyPage::Feed {
            mark: Some(mark), ..
        }
        | ApplyPage::Snapshot {
            mark: Some(mark), ..
        } = &page
        {
            self.mark = *mark;
        }
        match page {
            ApplyPage::Feed { to, .. } => {
                self.cursor = to;
                self.send(&UpMsg::FeedAck { cursor: to });
            }
            ApplyPage::Snapshot {
                resync,
                last,
                done,
                cursor,
                ..
            } => {
                if done {
                    self.cursor = cursor;
                    self.event(DeviceEvent::Resynced {
                        cursor,
                        swept: outcome.swept,
                    });
                }
                self.last_snapshot_ack = Some((resync, last.clone(), done));
                self.send(&UpMsg::SnapshotAck {
                    resync,
                    pos: last,
                    done,
                });
            }
        }
        self.next_apply();
        self.flush(now_ms);
    }

    /// The driver could not apply the page (its transaction rolled back). Pages accepted after it
    /// are dropped; the cloud sends them again from the acknowledged cursor.
    pub fn handle_apply_failed(&mut self, now_ms: u64) {
        let _ = now_ms;
        let failed = self.applying.take();
        self.inbox.clear();
        // A resync continues from the last page applied (the position the cloud rewinds to);
        // forgetting it would refuse every resent page and only repeat the last acknowledgement.
        self.resync = match (failed, &self.last_snapshot_ack) {
            (Some(ApplyPage::Snapshot { resync, .. }), Some((id, pos, false))) if *id == resync => {
                Some(ResyncRx {
                    id: resync,
                    pos: pos.clone(),
                    // What the pages applied so far reflect is not stored before the end of
                    // a restore resync; the resent pages tell it again.
                    seen: 0,
                })
            }
            _ => None,
        };
        self.tail = self.cursor;
        self.mark_tail = self.mark;
        self.event(DeviceEvent::ApplyFailed);
    }

    /// The driver re-stamped an outbox entry after a [`DeviceAction::Restamp`]: `change` is the
    /// entry with its new version, which replaces `old` (even though it is lower: the old
    /// version was refused and exists nowhere else). If the entry no longer holds `old`, a newer
    /// local write replaced it and was queued already, so nothing changes.
    pub fn handle_restamped(&mut self, now_ms: u64, old: Hlc, change: Change) {
        let k = (change.model.clone(), change.key.clone());
        let to = change.version;
        let len = wire::change_len(&change);
        let Some(e) = self.entries.get_mut(&k) else {
            return;
        };
        if e.version != old {
            return;
        }
        e.version = to;
        e.len = len;
        e.delete = change.op == crate::wire::Op::Delete;
        e.restamping = false;
        if !e.queued {
            e.queued = true;
            e.queued_at = now_ms;
            self.order.insert(e.seq, k.clone());
        }
        self.event(DeviceEvent::Restamped {
            model: k.0,
            key: k.1,
            from: old,
            to,
        });
        self.flush(now_ms);
    }

    /// The driver finished a [`DeviceAction::Repush`]: `count` held writes were put back into
    /// the durable outbox (and handed to [`Self::handle_local_change`]). Pushes resume, and the
    /// driver is asked to store the cloud's answered count ([`DeviceAction::StoreAnswered`]).
    pub fn handle_repush_done(&mut self, now_ms: u64, count: u64) {
        let Some(run) = self.repush.take() else {
            return;
        };
        self.event(DeviceEvent::Repushed { count });
        if run.again {
            self.repush = Some(RepushRun {
                again: false,
                ..run
            });
            self.actions.push_back(DeviceAction::Repush);
            return;
        }
        self.answered = run.answered;
        self.actions
            .push_back(DeviceAction::StoreAnswered(run.answered));
        self.flush(now_ms);
    }

    /// The driver could not re-stamp the entry (its transaction failed): send the old version
    /// again, which the cloud refuses again, and so the re-stamp is retried.
    pub fn handle_restamp_failed(&mut self, now_ms: u64, model: &str, key: &ItemKey) {
        let k = (model.to_string(), key.clone());
        if let Some(e) = self.entries.get_mut(&k) {
            if e.restamping {
                e.restamping = false;
                if !e.queued {
                    e.queued = true;
                    e.queued_at = now_ms;
                    self.order.insert(e.seq, k);
                }
            }
        }
    }

    /// Time passed; call when [`poll_timeout`](Self::poll_timeout) is reached.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if self.paused_until.is_some_and(|p| p <= now_ms) {
            self.paused_until = None;
        }
        if let Some(deadline) = self.hello_deadline {
            if deadline <= now_ms && self.connected && !self.ready {
                match self.paused_until {
                    // Asked to slow down: the hello waits for the pause too.
                    Some(p) => self.hello_deadline = Some(p),
                    None => {
                        self.hello_attempts = self.hello_attempts.saturating_add(1);
                        self.send_hello(now_ms);
                    }
                }
            }
        }
        let expired: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.deadline <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let Some(b) = self.batches.get(&id) else {
                continue;
            };
            self.backoff = self.backoff.max(b.level.saturating_add(1));
            if !b.loading {
                let (sent, changes) = (b.sent_ms, b.keys.len());
                if self.timed_out.len() >= 2 * self.cfg.max_in_flight.max(1) {
                    self.timed_out.pop_front();
                }
                self.timed_out.push_back((id, sent));
                self.event(DeviceEvent::PushTimedOut {
                    changes,
                    waited_ms: now_ms.saturating_sub(sent),
                });
            }
            self.dissolve(id);
        }
        self.flush(now_ms);
    }

    /// Next bytes to publish (QoS 1) on the up topic.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// Next storage work.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<DeviceAction> {
        self.actions.pop_front()
    }

    /// Next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<DeviceEvent> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, in ms.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.hello_deadline;
        let mut consider = |d: u64| t = Some(t.map_or(d, |t| t.min(d)));
        for b in self.batches.values() {
            consider(b.deadline);
        }
        if self.ready && self.repush.is_none() && self.batches.len() < self.cfg.max_in_flight {
            if let Some((_, key)) = self.order.iter().next() {
                if let Some(e) = self.entries.get(key) {
                    let delay = if self.batches.is_empty() {
                        0
                    } else {
                        self.cfg.batch_delay_ms
                    };
                    let due = e.queued_at.saturating_add(delay);
                    consider(self.paused_until.map_or(due, |p| p.max(due)));
                }
            }
        }
        t
    }

    fn event(&mut self, e: DeviceEvent) {
        if self.events.len() >= self.cfg.max_queued_outputs {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn send(&mut self, msg: &UpMsg) {
        if !self.connected {
            return;
        }
        // Messages other than pushes are tiny and cannot exceed the limits.
        if let Ok(bytes) = wire::encode_up(&self.schema_version, msg, &self.cfg.wire) {
            if self.transmits.len() >= self.cfg.max_queued_outputs {
                self.transmits.pop_front();
            }
            self.transmits.push_back(bytes);
        }
    }

    fn rto(&mut self, attempts: u32) -> u64 {
        let max = self.cfg.retransmit_max_ms.max(1);
        let base = self
            .rtt
            .timeout_ms(self.cfg.retransmit_base_ms.max(1))
            .min(max);
        let exp = base.saturating_mul(1u64 << attempts.min(20));
        let capped = exp.min(self.cfg.retransmit_max_ms.max(base));
        let jitter = self.rng.next() % (capped / 4 + 1);
        (capped + jitter).min(self.cfg.retransmit_max_ms.max(base))
    }

    fn new_session(&mut self, now_ms: u64) {
        self.ready = false;
        self.dissolve_all();
        self.transmits.clear();
        self.session = Some(self.rng.next());
        self.hello_attempts = 0;
        // Abandon pages not yet applied and any resync in progress: the cloud streams again
        // from the cursor announced in the hello.
        self.inbox.clear();
        self.resync = None;
        self.tail = match &self.applying {
            Some(ApplyPage::Feed { to, .. }) => *to,
            Some(ApplyPage::Snapshot {
                done: true, cursor, ..
            }) => *cursor,
            _ => self.cursor,
        };
        self.mark_tail = match &self.applying {
            Some(ApplyPage::Feed { mark: Some(m), .. })
            | Some(ApplyPage::Snapshot { mark: Some(m), .. }) => *m,
            _ => self.mark,
        };
        self.send_hello(now_ms);
    }

    /// The welcome says the cloud holds less than this device heard from it: re-push (or, if a
    /// re-push is under way, scan again once it ends when the cloud's count is lower than the
    /// one it would store).
    fn start_repush(&mut self, answered: u64) {
        match &mut self.repush {
            Some(run) => {
                if answered < run.answered {
                    run.again = true;
                    run.answered = answered;
                }
            }
            None => {
                self.repush = Some(RepushRun {
                    answered,
                    again: false,
                });
                self.actions.push_back(DeviceAction::Repush);
            }
        }
    }

    fn send_hello(&mut self, now_ms: u64) {
        let Some(session) = self.session else {
            return;
        };
        let msg = UpMsg::Hello {
            session,
            cursor: self.cursor,
            pending: self.entries.len() as u64,
            mark: Some(DeviceMark {
                gen: self.mark.gen,
                seen: self.mark.seen,
                answered: self.answered,
            }),
        };
        self.send(&msg);
        if self.hello_attempts == 0 {
            self.hello_sent_ms = Some(now_ms);
        }
        let rto = self.rto(self.hello_attempts);
        self.hello_deadline = Some(now_ms.saturating_add(rto));
    }

    fn enqueue(&mut self, now_ms: u64, meta: OutboxMeta) {
        let k = (meta.model, meta.key);
        if let Some(e) = self.entries.get_mut(&k) {
            if meta.version <= e.version {
                return;
            }
            e.version = meta.version;
            e.len = meta.len;
            e.delete = meta.delete;
            e.restamping = false;
            if !e.queued {
                e.queued = true;
                e.queued_at = now_ms;
                self.order.insert(e.seq, k);
            }
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(
            k.clone(),
            Entry {
                version: meta.version,
                len: meta.len,
                delete: meta.delete,
                seq,
                queued_at: now_ms,
                queued: true,
                restamping: false,
                in_flight: None,
            },
        );
        self.order.insert(seq, k);
    }

    /// A new session: the changes the cloud deferred in the last one go again.
    fn unpark(&mut self, now_ms: u64) {
        for k in std::mem::take(&mut self.parked) {
            let Some(e) = self.entries.get_mut(&k) else {
                continue;
            };
            if !e.queued && e.in_flight.is_none() && !e.restamping {
                e.queued = true;
                e.queued_at = now_ms;
                self.order.insert(e.seq, k);
            }
        }
    }

    fn requeue(&mut self, k: &(String, ItemKey), batch: u64) {
        if let Some(e) = self.entries.get_mut(k) {
            if e.restamping {
                return;
            }
            if e.in_flight.is_some_and(|(b, _)| b == batch) {
                e.in_flight = None;
                if !e.queued {
                    e.queued = true;
                    self.order.insert(e.seq, k.clone());
                }
            }
        }
    }

    /// Takes an answered key out of the batch `id` that carries a copy of it, and frees the
    /// batch's slot if nothing is left to answer in it (a batch still loading is left to
    /// [`Self::handle_batch_loaded`], which skips keys without an entry).
    fn forget_in_batch(&mut self, id: u64, k: &(String, ItemKey), version: Hlc) {
        let Some(b) = self.batches.get_mut(&id) else {
            return;
        };
        if b.loading {
            return;
        }
        b.keys
            .retain(|(m, key, v)| !(m == &k.0 && key == &k.1 && *v == version));
        if b.keys.is_empty() {
            self.batches.remove(&id);
        }
    }

    fn dissolve(&mut self, id: u64) {
        if let Some(batch) = self.batches.remove(&id) {
            for (model, key, _) in batch.keys {
                self.requeue(&(model, key), id);
            }
        }
    }

    fn dissolve_all(&mut self) {
        // Answers across a reconnect would time the outage, not the cloud.
        self.timed_out.clear();
        let ids: Vec<u64> = self.batches.keys().copied().collect();
        for id in ids {
            self.dissolve(id);
        }
    }

    fn remove_entry(&mut self, k: &(String, ItemKey)) -> Option<Entry> {
        let e = self.entries.remove(k)?;
        if e.queued {
            self.order.remove(&e.seq);
        }
        if self.entries.len() <= self.cfg.outbox_high_water {
            self.high_raised = false;
        }
        Some(e)
    }

    fn on_push_ack(
        &mut self,
        now_ms: u64,
        batch: u64,
        results: Vec<wire::ChangeResult>,
        answered: Option<u64>,
    ) {
        self.backoff = 0;
        // Each batch is sent once (a timeout dissolves it; its keys go out in a new batch), so
        // the answer of one in the window, or of one whose timer fired, times exactly one send.
        if let Some(b) = self.batches.get(&batch).filter(|b| !b.loading) {
            self.rtt.observe(now_ms.saturating_sub(b.sent_ms));
        } else if let Some(i) = self.timed_out.iter().position(|(id, _)| *id == batch) {
            let (_, sent) = self.timed_out.remove(i).unwrap_or_default();
            self.rtt.observe(now_ms.saturating_sub(sent));
        }
        let mut removed = Vec::new();
        for r in results {
            let k = (r.model, r.key);
            if let Some(b) = self.batches.get_mut(&batch) {
                b.keys
                    .retain(|(m, key, v)| !(m == &k.0 && key == &k.1 && *v == r.version));
            }
            let Some(e) = self.entries.get_mut(&k) else {
                continue;
            };
            if e.version == r.version {
                if let ChangeStatus::Rejected {
                    reason: reason @ RejectReason::NewerSchema { .. },
                } = &r.status
                {
                    // Not final: parked until the next session (an upgraded cloud restarts).
                    e.in_flight = None;
                    let held = e.clone();
                    let change = self.sent_change(&k, &held);
                    self.event(DeviceEvent::Deferred {
                        change,
                        reason: reason.clone(),
                    });
                    self.parked.insert(k);
                    continue;
                }
                if let ChangeStatus::Rejected {
                    reason: RejectReason::VersionAhead { cloud_ms, .. },
                } = r.status
                {
                    // Not final: the entry stays, re-stamped on the cloud's time.
                    e.in_flight = None;
                    if !e.restamping {
                        e.restamping = true;
                        self.actions.push_back(DeviceAction::Restamp {
                            model: k.0,
                            key: k.1,
                            version: r.version,
                            cloud_ms,
                        });
                    }
                    continue;
                }
                let Some(e) = self.remove_entry(&k) else {
                    continue;
                };
                // The answer may come from an earlier send of this version, whose timer fired:
                // the copy in flight needs no answer of its own (a cloud that still held the
                // original sends none), so it stops holding a slot of the window.
                if let Some((copy, _)) = e.in_flight.filter(|(b, _)| *b != batch) {
                    self.forget_in_batch(copy, &k, r.version);
                }
                match r.status {
                    ChangeStatus::Rejected { reason } => {
                        let change = self.sent_change(&k, &e);
                        self.event(DeviceEvent::Rejected { change, reason });
                    }
                    ChangeStatus::Stale { winner } => {
                        let change = self.sent_change(&k, &e);
                        self.event(DeviceEvent::Superseded { change, winner });
                    }
                    ChangeStatus::Applied => {
                        if let Some(detail) = r.kept {
                            self.event(DeviceEvent::KeptByCloud {
                                model: k.0.clone(),
                                key: k.1.clone(),
                                detail,
                            });
                        }
                    }
                }
                removed.push((k.0, k.1, r.version));
            } else if e.in_flight.is_some_and(|(_, v)| v == r.version) {
                // An older version was answered; the newer one stays queued.
                e.in_flight = None;
            }
        }
        if self.batches.get(&batch).is_some_and(|b| b.keys.is_empty()) {
            self.batches.remove(&batch);
        }
        if !removed.is_empty() {
            // The count goes with the trim: an answered change leaves the outbox only with the
            // count that lets a restored cloud see it lost it.
            if let Some(a) = answered {
                self.answered = self.answered.max(a);
                if let Some(run) = &mut self.repush {
                    run.answered = run.answered.max(a);
                }
            }
            self.actions.push_back(DeviceAction::OutboxRemove {
                entries: removed,
                answered,
            });
        }
    }

    fn on_feed(&mut self, from: u64, to: u64, changes: Vec<Change>, gen: Option<u64>, seen: u64) {
        if to < from || self.resync.is_some() {
            return;
        }
        if from == self.tail {
            if self.inbox.len() < self.cfg.max_buffered_pages {
                self.tail = to;
                let mark = gen.map(|gen| FeedMark {
                    gen,
                    seen: self.mark_tail.seen.max(seen),
                });
                if let Some(m) = mark {
                    self.mark_tail = m;
                }
                self.inbox.push_back(ApplyPage::Feed {
                    from,
                    to,
                    changes,
                    mark,
                });
            }
        } else if from < self.tail && self.applying.is_none() && self.inbox.is_empty() {
            // A duplicate: our acknowledgement was probably lost. Say again where we are.
            self.send(&UpMsg::FeedAck {
                cursor: self.cursor,
            });
        }
        // A gap (from > tail) is ignored: the cloud resends from the acknowledged cursor.
    }

    fn on_snapshot(&mut self, page: SnapshotRx) {
        let SnapshotRx {
            resync,
            session,
            after,
            last,
            items,
            done,
            cursor,
            gen,
            seen,
            restore,
        } = page;
        let expected = match &self.resync {
            Some(r) if r.id == resync => Some(r.pos.clone()),
            _ => None,
        };
        let accept = match &expected {
            Some(pos) => &after == pos,
            // A new resync starts at the beginning, in this session: a stale stream from an
            // earlier session would sweep newer items and move the cursor back. Its cursor may
            // be behind ours (the cloud was restored from a backup): the pages carry the truth.
            // (A cloud that does not name the session: never behind what we already hold.)
            None => {
                let current = match session {
                    Some(s) => self.session == Some(s),
                    None => cursor >= self.tail,
                };
                after.is_none()
                    && current
                    && self
                        .last_snapshot_ack
                        .as_ref()
                        .is_none_or(|(id, _, _)| *id != resync)
            }
        };
        if !accept {
            // A duplicate, a gap, or a finished resync: say where we are, if nothing is pending.
            let known = expected.is_some()
                || self
                    .last_snapshot_ack
                    .as_ref()
                    .is_some_and(|(id, _, _)| *id == resync);
            if known && self.applying.is_none() && self.inbox.is_empty() {
                if let Some((id, pos, done)) = self.last_snapshot_ack.clone() {
                    if id == resync {
                        self.send(&UpMsg::SnapshotAck { resync, pos, done });
                    }
                }
            }
            return;
        }
        if self.inbox.len() >= self.cfg.max_buffered_pages {
            return;
        }
        let page_seen = seen.unwrap_or(cursor);
        let resync_seen = match &self.resync {
            Some(r) if r.id == resync => r.seen.max(page_seen),
            _ => page_seen,
        };
        // A restore resync replaces the mark that shows the loss only with its final page: a
        // device that stops half-way still shows it at its next hello, and is repaired again.
        let mark = match gen {
            None => None,
            Some(gen) if restore => done.then_some(FeedMark {
                gen,
                seen: resync_seen,
            }),
            Some(gen) => Some(FeedMark {
                gen,
                seen: self.mark_tail.seen.max(page_seen),
            }),
        };
        if let Some(m) = mark {
            self.mark_tail = m;
        }
        self.resync = if done {
            None
        } else {
            Some(ResyncRx {
                id: resync,
                pos: last.clone(),
                seen: resync_seen,
            })
        };
        if done {
            self.tail = cursor;
        }
        self.inbox.push_back(ApplyPage::Snapshot {
            resync,
            after,
            last,
            items,
            done,
            cursor,
            mark,
            restore,
        });
    }

    fn next_apply(&mut self) {
        if self.applying.is_none() {
            if let Some(page) = self.inbox.pop_front() {
                self.applying = Some(page.clone());
                self.actions.push_back(DeviceAction::Apply(page));
            }
        }
    }

    /// Send batches while the window allows and a batch is due.
    fn flush(&mut self, now_ms: u64) {
        // During a re-push after a cloud restore nothing is sent: a push applied now would
        // raise the cloud's count before the device gave back what the restore lost, and a
        // crash half-way would then hide the loss from the next welcome.
        if !self.ready || self.repush.is_some() || self.paused_until.is_some_and(|p| now_ms < p) {
            return;
        }
        while self.batches.len() < self.cfg.max_in_flight && !self.order.is_empty() {
            if !self.send_batch(now_ms) {
                break;
            }
        }
    }

    /// The room of one push: the largest message, the most changes, the bytes of an empty push.
    fn push_budget(&self) -> MessageBudget {
        let max_bytes = self
            .cfg
            .max_batch_bytes
            .min(self.cfg.wire.max_message_bytes);
        let max_count = self
            .cfg
            .max_batch_changes
            .min(self.cfg.wire.max_changes)
            .min(self.cloud_max_changes.unwrap_or(usize::MAX));
        let overhead = wire::up_overhead(
            &self.schema_version,
            &UpMsg::Push {
                batch: u64::MAX,
                changes: vec![],
                session: Some(u64::MAX),
            },
        );
        MessageBudget::new(overhead, max_bytes, max_count)
    }

    /// Build one batch if one is due and ask the driver for its changes
    /// ([`DeviceAction::LoadBatch`]); returns whether one was built.
    fn send_batch(&mut self, now_ms: u64) -> bool {
        let id = self.next_batch;
        let mut budget = self.push_budget();
        let mut picked: Vec<(String, ItemKey)> = Vec::new();
        let mut too_large: Vec<(String, ItemKey)> = Vec::new();
        let mut full = false;
        let mut oldest: Option<u64> = None;
        for k in self.order.values() {
            let Some(e) = self.entries.get(k) else {
                continue;
            };
            match budget.add(e.len) {
                Fit::Never => {
                    // Loaded with the batch, then refused (the event carries the change).
                    too_large.push(k.clone());
                    continue;
                }
                Fit::Full => {
                    full = true;
                    break;
                }
                Fit::Added => {}
            }
            oldest = Some(oldest.map_or(e.queued_at, |o: u64| o.min(e.queued_at)));
            picked.push(k.clone());
        }
        match oldest {
            None if too_large.is_empty() => return false,
            // Nagle-style: with nothing in flight a change goes at once (low latency when
            // quiet); while a batch is in flight, changes wait up to the delay for company (or
            // for the window to free), so a burst goes out as a few full batches.
            Some(oldest)
                if too_large.is_empty()
                    && !full
                    && !self.batches.is_empty()
                    && now_ms < oldest.saturating_add(self.cfg.batch_delay_ms) =>
            {
                return false
            }
            _ => {}
        }
        let mut keys = Vec::with_capacity(picked.len() + too_large.len());
        for k in picked.into_iter().chain(too_large) {
            if let Some(e) = self.entries.get_mut(&k) {
                e.queued = false;
                e.in_flight = Some((id, e.version));
                self.order.remove(&e.seq);
                keys.push((k.0, k.1, e.version));
            }
        }
        self.next_batch = self.next_batch.wrapping_add(1);
        let rto = self.rto(self.backoff);
        let load = keys
            .iter()
            .map(|(m, k, _)| (m.clone(), k.clone()))
            .collect();
        self.batches.insert(
            id,
            Batch {
                keys,
                deadline: now_ms.saturating_add(rto),
                level: self.backoff,
                loading: true,
                sent_ms: now_ms,
                sent: Vec::new(),
            },
        );
        self.actions.push_back(DeviceAction::LoadBatch {
            batch: id,
            keys: load,
        });
        true
    }

    /// The driver loaded the changes of a [`DeviceAction::LoadBatch`]: the current durable
    /// outbox entries of its keys (keys without one are left out). The batch is sent with
    /// exactly these changes: a key whose change is newer than the engine knew is sent in its
    /// newer version, a key that is gone from the outbox (acknowledged or dropped meanwhile) is
    /// forgotten, a key the engine knows a newer change of waits for the next batch. A change
    /// too large for any message is refused ([`RejectReason::TooLarge`]); one that no longer fits
    /// this batch waits for the next. An answer for an unknown batch (dissolved meanwhile) is
    /// ignored.
    pub fn handle_batch_loaded(&mut self, now_ms: u64, batch: u64, changes: Vec<Change>) {
        let requested = match self.batches.get_mut(&batch) {
            Some(b) if b.loading => std::mem::take(&mut b.keys),
            _ => return,
        };
        let mut loaded: BTreeMap<(String, ItemKey), Change> = changes
            .into_iter()
            .map(|c| ((c.model.clone(), c.key.clone()), c))
            .collect();
        let mut budget = self.push_budget();
        let mut keys = Vec::new();
        let mut send = Vec::new();
        for (model, key, _) in requested {
            let k = (model, key);
            let ours = self
                .entries
                .get(&k)
                .is_some_and(|e| e.in_flight.is_some_and(|(b, _)| b == batch));
            if !ours {
                // Answered or superseded while loading.
                continue;
            }
            let Some(change) = loaded.remove(&k) else {
                // No durable entry any more: nothing to send, nothing to remove.
                self.remove_entry(&k);
                continue;
            };
            let len = wire::change_len(&change);
            let Some(e) = self.entries.get_mut(&k) else {
                continue;
            };
            if change.version < e.version {
                // A newer change was announced meanwhile; its entry is loaded with a later batch.
                self.requeue(&k, batch);
                continue;
            }
            e.version = change.version;
            e.len = len;
            e.delete = change.op == Op::Delete;
            let fit = budget.add(len);
            if fit == Fit::Never {
                if self.remove_entry(&k).is_some() {
                    self.actions.push_back(DeviceAction::OutboxRemove {
                        entries: vec![(k.0, k.1, change.version)],
                        answered: None,
                    });
                    self.event(DeviceEvent::Rejected {
                        change,
                        reason: RejectReason::TooLarge,
                    });
                }
                continue;
            }
            if fit == Fit::Full {
                // It grew since the batch was built.
                self.requeue(&k, batch);
                continue;
            }
            e.in_flight = Some((batch, change.version));
            if e.queued {
                // Announced again while loading, and this load already carries it.
                e.queued = false;
                self.order.remove(&e.seq);
            }
            keys.push((k.0, k.1, change.version));
            send.push(change);
        }
        if send.is_empty() {
            self.batches.remove(&batch);
            self.flush(now_ms);
            return;
        }
        let rto = self.rto(self.backoff);
        let msg = UpMsg::Push {
            batch,
            changes: send,
            session: self.session,
        };
        self.send(&msg);
        let UpMsg::Push { changes: sent, .. } = msg else {
            return;
        };
        if let Some(b) = self.batches.get_mut(&batch) {
            b.keys = keys;
            b.loading = false;
            b.sent_ms = now_ms;
            b.deadline = now_ms.saturating_add(rto);
            b.level = self.backoff;
            b.sent = sent;
        }
        self.flush(now_ms);
    }

    /// The change an acknowledgement answered, as sent; when its batch is no longer in the
    /// window (dissolved by a timeout before the answer came), the change without its item.
    fn sent_change(&self, k: &(String, ItemKey), e: &Entry) -> Change {
        self.batches
            .values()
            .flat_map(|b| b.sent.iter())
            .find(|c| c.model == k.0 && c.key == k.1 && c.version == e.version)
            .cloned()
            .unwrap_or_else(|| Change {
                model: k.0.clone(),
                key: k.1.clone(),
                op: if e.delete { Op::Delete } else { Op::Put },
                item: None,
                version: e.version,
                base: None,
            })
    }
}

#[cfg(test)]
mod tests {
    //! Batches loaded from the driver's outbox: what is sent is what the outbox holds when the
    //! batch is loaded.

    use super::*;
    use crate::wire::ChangeResult;

    fn hlc(w: u64) -> Hlc {
        Hlc {
            wall_ms: w,
            counter: 0,
            node: 7,
        }
    }

    fn change(name: &str, version: u64, pad: usize) -> Change {
        let mut item = devtables_schema::Item::new();
        item.insert("name".into(), name.into());
        item.insert("pad".into(), "x".repeat(pad).into());
        Change {
            model: "M".into(),
            key: ItemKey {
                pk: "p".into(),
                sk: name.into(),
            },
            op: Op::Put,
            item: Some(item),
            version: hlc(version),
            base: None,
        }
    }

    fn ready(outbox: &[Change]) -> DeviceEngine {
        let mut e = DeviceEngine::new(
            DeviceConfig {
                seed: 1,
                ..DeviceConfig::default()
            },
            "1".into(),
            Restored {
                cursor: 0,
                outbox: outbox.iter().map(OutboxMeta::of).collect(),
                mark: Default::default(),
                answered: 0,
            },
        );
        e.handle_connected(0);
        let hello = pushes_and_hello(&mut e);
        let Some(UpMsg::Hello { session, .. }) = hello.first() else {
            panic!("{hello:?}")
        };
        let welcome = DownMsg::Welcome {
            session: *session,
            now_ms: 1,
            max_drift_ms: 60_000,
            answered: None,
            repush: false,
        };
        let bytes = wire::encode_down("1", &welcome, &WireConfig::default()).unwrap();
        e.handle_message(1, &bytes);
        assert!(e.is_ready());
        e
    }

    fn pushes_and_hello(e: &mut DeviceEngine) -> Vec<UpMsg> {
        std::iter::from_fn(|| e.poll_transmit())
            .map(|b| wire::decode_up(&b, &WireConfig::default()).unwrap().msg)
            .collect()
    }

    /// The next action, which must be a `LoadBatch`: (batch, keys' sort keys).
    fn load_request(e: &mut DeviceEngine) -> (u64, Vec<String>) {
        match e.poll_action() {
            Some(DeviceAction::LoadBatch { batch, keys }) => {
                (batch, keys.into_iter().map(|(_, k)| k.sk).collect())
            }
            other => panic!("expected LoadBatch, got {other:?}"),
        }
    }

    fn sent(e: &mut DeviceEngine) -> Vec<(u64, Vec<(String, u64)>)> {
        pushes_and_hello(e)
            .into_iter()
            .filter_map(|m| match m {
                UpMsg::Push { batch, changes, .. } => Some((
                    batch,
                    changes
                        .into_iter()
                        .map(|c| (c.key.sk, c.version.wall_ms))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    fn ack(e: &mut DeviceEngine, now: u64, batch: u64, acked: &[(&str, u64)]) {
        let results = acked
            .iter()
            .map(|(name, v)| ChangeResult {
                model: "M".into(),
                key: ItemKey {
                    pk: "p".into(),
                    sk: (*name).into(),
                },
                version: hlc(*v),
                kept: None,
                status: ChangeStatus::Applied,
            })
            .collect();
        let msg = DownMsg::PushAck {
            batch,
            results,
            answered: None,
            session: None,
        };
        let bytes = wire::encode_down("1", &msg, &WireConfig::default()).unwrap();
        e.handle_message(now, &bytes);
    }

    #[test]
    fn a_batch_sends_what_the_outbox_holds_when_it_is_loaded() {
        let mut e = ready(&[change("a", 1, 0), change("b", 1, 0), change("c", 1, 0)]);
        let (batch, keys) = load_request(&mut e);
        assert_eq!(keys, ["a", "b", "c"]);
        assert!(sent(&mut e).is_empty(), "nothing is sent before the load");
        assert_eq!(e.in_flight(), 3);
        // a was rewritten (newer, larger) and b acknowledged or dropped meanwhile.
        e.handle_batch_loaded(2, batch, vec![change("a", 5, 300), change("c", 1, 0)]);
        assert_eq!(
            sent(&mut e),
            [(batch, vec![("a".into(), 5), ("c".into(), 1)])]
        );
        assert_eq!(e.pending(), 2, "b is forgotten");
        assert_eq!(e.poll_action(), None, "b needs no removal: it is gone");
        ack(&mut e, 3, batch, &[("a", 5), ("c", 1)]);
        assert_eq!(
            e.poll_action(),
            Some(DeviceAction::OutboxRemove {
                entries: vec![
                    ("M".into(), change("a", 5, 0).key, hlc(5)),
                    ("M".into(), change("c", 1, 0).key, hlc(1)),
                ],
                answered: None
            })
        );
        assert_eq!(e.pending(), 0);
    }

    #[test]
    fn an_unanswered_load_is_queued_again_and_a_late_answer_is_ignored() {
        let mut e = ready(&[change("a", 1, 0)]);
        let (first, _) = load_request(&mut e);
        let deadline = e.poll_timeout().expect("the load has a deadline");
        e.handle_timeout(deadline);
        let (second, keys) = load_request(&mut e);
        assert_ne!(first, second);
        assert_eq!(keys, ["a"]);
        e.handle_batch_loaded(deadline, first, vec![change("a", 1, 0)]);
        assert!(sent(&mut e).is_empty(), "the dissolved batch is not sent");
        e.handle_batch_loaded(deadline, second, vec![change("a", 1, 0)]);
        assert_eq!(sent(&mut e), [(second, vec![("a".into(), 1)])]);
        assert_eq!(e.in_flight(), 1);
    }

    #[test]
    fn slow_answers_lengthen_the_retransmit_timeout_so_a_loaded_cloud_gets_no_resends() {
        const ANSWER_MS: u64 = 8_000;
        let mut e = ready(&[]);
        // A cloud that answers every push 8 s after it was sent: (when, batch, key, version).
        let mut answers: Vec<(u64, u64, String, u64)> = Vec::new();
        let mut sends: std::collections::BTreeMap<String, usize> = Default::default();
        let mut now = 10;
        let mut next_write = now;
        let mut written = 0u64;
        while written < 12 || e.pending() > 0 {
            assert!(now < 1_000_000, "every write is acknowledged");
            if written < 12 && now >= next_write {
                written += 1;
                e.handle_local_change(now, change(&format!("k{written:02}"), written, 0));
                next_write = now + 10_000;
            }
            while let Some(action) = e.poll_action() {
                if let DeviceAction::LoadBatch { batch, keys } = action {
                    let changes = keys
                        .iter()
                        .map(|(_, k)| change(&k.sk, k.sk[1..].parse().unwrap(), 0))
                        .collect();
                    e.handle_batch_loaded(now, batch, changes);
                }
            }
            for (batch, changes) in sent(&mut e) {
                for (name, v) in changes {
                    *sends.entry(name.clone()).or_default() += 1;
                    answers.push((now + ANSWER_MS, batch, name, v));
                }
            }
            // The next thing to happen: an answer, the engine's timer, or the next write.
            let next_answer = answers.iter().map(|a| a.0).min();
            let timer = e.poll_timeout();
            let write = (written < 12).then_some(next_write);
            now = [next_answer, timer, write]
                .into_iter()
                .flatten()
                .min()
                .unwrap()
                .max(now);
            let (due, later): (Vec<_>, Vec<_>) = answers.drain(..).partition(|a| a.0 <= now);
            answers = later;
            for (_, batch, name, v) in due {
                ack(&mut e, now, batch, &[(&name, v)]);
            }
            if timer.is_some_and(|t| t <= now) {
                e.handle_timeout(now);
            }
        }
        // The first write meets a cloud the device has not timed yet: it is resent as the
        // backoff grows, until a send outlasts the answer time and is answered in time.
        assert!(sends["k01"] > 1, "{sends:?}");
        // Once answers have been timed, every later write is sent once.
        let late: Vec<_> = sends.iter().filter(|(k, _)| k.as_str() >= "k04").collect();
        assert!(late.iter().all(|(_, n)| **n == 1), "{sends:?}");
    }

    #[test]
    fn a_late_answer_to_a_push_whose_timer_fired_times_the_cloud_and_frees_the_copys_slot() {
        let mut e = ready(&[]);
        let load = |e: &mut DeviceEngine, now: u64| {
            let (batch, keys) = load_request(e);
            let changes = keys
                .iter()
                .map(|k| change(k, k[1..].parse().unwrap(), 0))
                .collect();
            e.handle_batch_loaded(now, batch, changes);
        };
        e.handle_local_change(10, change("a1", 1, 0));
        load(&mut e, 10);
        let [(first, _)] = sent(&mut e)[..] else {
            panic!()
        };
        // The cloud holds the push longer than the device's first timeout: a copy goes out.
        let fired = e.poll_timeout().unwrap();
        assert!(
            fired < 2_000,
            "no answer timed yet: the first timeout, {fired}"
        );
        e.handle_timeout(fired);
        let timed_out: Vec<_> = std::iter::from_fn(|| e.poll_event())
            .filter(|ev| matches!(ev, DeviceEvent::PushTimedOut { .. }))
            .collect();
        assert_eq!(
            timed_out,
            [DeviceEvent::PushTimedOut {
                changes: 1,
                waited_ms: fired - 10
            }]
        );
        load(&mut e, fired);
        let [(copy, ref changes)] = sent(&mut e)[..] else {
            panic!()
        };
        assert_ne!(copy, first);
        assert_eq!(changes, &[("a1".to_string(), 1)]);
        // The original's answer, 8 s after it was sent, answers the copy's change too: the
        // copy no longer holds a slot (a cloud that still held the original never answers it).
        ack(&mut e, 8_010, first, &[("a1", 1)]);
        assert!(matches!(
            e.poll_action(),
            Some(DeviceAction::OutboxRemove { .. })
        ));
        assert_eq!(e.pending(), 0);
        assert_eq!(e.in_flight(), 0, "the copy's slot is free");
        assert_eq!(e.poll_timeout(), None, "no timer left for the copy");
        // And the 8 s it took are the estimate now: the next push is not resent after 1 s.
        e.handle_local_change(8_020, change("b2", 2, 0));
        load(&mut e, 8_020);
        assert_eq!(sent(&mut e).len(), 1);
        let timeout = e.poll_timeout().unwrap() - 8_020;
        assert!(
            timeout > 8_000,
            "the retransmit timeout follows the late answer: {timeout}"
        );
    }

    #[test]
    fn a_change_announced_while_loading_is_sent_once() {
        let mut e = ready(&[change("a", 1, 0)]);
        let (batch, _) = load_request(&mut e);
        // The newer write commits and is announced before the load is answered; the load
        // already reads it.
        e.handle_local_change(2, change("a", 2, 0));
        e.handle_batch_loaded(3, batch, vec![change("a", 2, 0)]);
        assert_eq!(sent(&mut e), [(batch, vec![("a".into(), 2)])]);
        e.handle_timeout(200);
        assert_eq!(e.poll_action(), None, "a is not loaded again");
        ack(&mut e, 300, batch, &[("a", 2)]);
        assert_eq!(e.pending(), 0);
    }

    #[test]
    fn an_older_load_than_the_engine_knows_waits_for_the_next_batch() {
        let mut e = ready(&[change("a", 1, 0)]);
        let (batch, _) = load_request(&mut e);
        e.handle_local_change(2, change("a", 3, 0));
        e.handle_batch_loaded(3, batch, vec![change("a", 1, 0)]);
        assert!(sent(&mut e).is_empty());
        let (next, keys) = load_request(&mut e);
        assert_eq!(keys, ["a"]);
        e.handle_batch_loaded(4, next, vec![change("a", 3, 0)]);
        assert_eq!(sent(&mut e), [(next, vec![("a".into(), 3)])]);
    }

    #[test]
    fn a_change_too_large_for_any_message_is_refused_with_its_item() {
        let mut e = ready(&[change("big", 1, 200_000), change("a", 1, 0)]);
        let (batch, keys) = load_request(&mut e);
        assert_eq!(keys, ["a", "big"]);
        e.handle_batch_loaded(2, batch, vec![change("big", 1, 200_000), change("a", 1, 0)]);
        assert_eq!(sent(&mut e), [(batch, vec![("a".into(), 1)])]);
        assert!(matches!(
            e.poll_action(),
            Some(DeviceAction::OutboxRemove { entries, answered: None }) if entries[0].1.sk == "big"
        ));
        let refused = std::iter::from_fn(|| e.poll_event()).find_map(|ev| match ev {
            DeviceEvent::Rejected { change, reason } => Some((change, reason)),
            _ => None,
        });
        let (change, reason) = refused.expect("a Rejected event");
        assert_eq!(reason, RejectReason::TooLarge);
        assert!(change.item.is_some());
        assert_eq!(e.pending(), 1);
    }
}

#[cfg(test)]
mod verdict_tests {
    //! Verdicts of the cloud on pushed changes: re-stamps, superseded changes, cloud time.
    use super::*;
    use crate::wire::{ChangeResult, Op};

    fn change(sk: &str, wall_ms: u64) -> Change {
        Change {
            model: "M".into(),
            key: ItemKey {
                pk: "p".into(),
                sk: sk.into(),
            },
            op: Op::Delete,
            item: None,
            version: Hlc {
                wall_ms,
                counter: 0,
                node: 1,
            },
            base: None,
        }
    }

    fn sent(e: &mut DeviceEngine) -> Vec<UpMsg> {
        let mut out = Vec::new();
        while let Some(b) = e.poll_transmit() {
            out.push(wire::decode_up(&b, &WireConfig::default()).unwrap().msg);
        }
        out
    }

    fn ready() -> DeviceEngine {
        let mut e = DeviceEngine::new(DeviceConfig::default(), "1".into(), Restored::default());
        e.handle_connected(0);
        let Some(UpMsg::Hello { session, .. }) = sent(&mut e).pop() else {
            panic!("no hello")
        };
        welcome(&mut e, 1, session);
        e
    }

    /// The cloud's welcome of `session`, received at `now`.
    fn welcome(e: &mut DeviceEngine, now: u64, session: u64) {
        let welcome = DownMsg::Welcome {
            session,
            now_ms: 1_000_000,
            max_drift_ms: 60_000,
            answered: None,
            repush: false,
        };
        e.handle_message(
            now,
            &wire::encode_down("1", &welcome, &WireConfig::default()).unwrap(),
        );
    }

    /// Answers the engine's `LoadBatch` with `changes` (the durable outbox), as a driver does.
    fn load(e: &mut DeviceEngine, now: u64, changes: &[Change]) {
        match e.poll_action() {
            Some(DeviceAction::LoadBatch { batch, .. }) => {
                e.handle_batch_loaded(now, batch, changes.to_vec())
            }
            other => panic!("expected LoadBatch, got {other:?}"),
        }
    }

    fn ack(e: &mut DeviceEngine, now: u64, results: Vec<ChangeResult>) {
        let Some(UpMsg::Push { batch, .. }) = sent(e).pop() else {
            panic!("no push")
        };
        let msg = DownMsg::PushAck {
            batch,
            results,
            answered: None,
            session: None,
        };
        e.handle_message(
            now,
            &wire::encode_down("1", &msg, &WireConfig::default()).unwrap(),
        );
    }

    fn events(e: &mut DeviceEngine) -> Vec<DeviceEvent> {
        std::iter::from_fn(|| e.poll_event()).collect()
    }

    #[test]
    fn welcome_raises_the_cloud_time_before_ready() {
        let mut e = ready();
        assert_eq!(
            events(&mut e)[1..],
            [
                DeviceEvent::CloudTime {
                    cloud_ms: 1_000_000,
                    max_drift_ms: 60_000
                },
                DeviceEvent::Ready
            ]
        );
    }

    #[test]
    fn a_version_ahead_is_restamped_not_dropped() {
        let mut e = ready();
        let far = change("a", 99_000_000);
        e.handle_local_change(2, far.clone());
        load(&mut e, 2, std::slice::from_ref(&far));
        let reason = RejectReason::VersionAhead {
            cloud_ms: 1_000_100,
            max_drift_ms: 60_000,
        };
        ack(
            &mut e,
            3,
            vec![ChangeResult {
                model: "M".into(),
                key: far.key.clone(),
                version: far.version,
                kept: None,
                status: ChangeStatus::Rejected { reason },
            }],
        );
        assert_eq!(
            e.poll_action(),
            Some(DeviceAction::Restamp {
                model: "M".into(),
                key: far.key.clone(),
                version: far.version,
                cloud_ms: 1_000_100,
            })
        );
        assert_eq!(e.pending(), 1, "the entry stays");
        assert!(!events(&mut e)
            .iter()
            .any(|ev| matches!(ev, DeviceEvent::Rejected { .. })));
        assert!(
            sent(&mut e).is_empty(),
            "not resent before it is re-stamped"
        );
        // The driver re-stamps: a LOWER version replaces the refused one and is sent.
        let fixed = change("a", 1_000_200);
        e.handle_restamped(4, far.version, fixed.clone());
        load(&mut e, 4, std::slice::from_ref(&fixed));
        assert!(events(&mut e).contains(&DeviceEvent::Restamped {
            model: "M".into(),
            key: far.key.clone(),
            from: far.version,
            to: fixed.version
        }));
        let Some(UpMsg::Push { changes, .. }) = sent(&mut e).pop() else {
            panic!("the re-stamped change is sent")
        };
        assert_eq!(changes, vec![fixed]);
    }

    #[test]
    fn a_change_the_cloud_defers_stays_queued_and_goes_again_in_the_next_session() {
        let mut e = ready();
        let alert = change("a", 1_000_050);
        e.handle_local_change(2, alert.clone());
        load(&mut e, 2, std::slice::from_ref(&alert));
        let reason = RejectReason::NewerSchema {
            cloud_schema: "1+00".into(),
        };
        ack(
            &mut e,
            3,
            vec![ChangeResult {
                model: "M".into(),
                key: alert.key.clone(),
                version: alert.version,
                kept: None,
                status: ChangeStatus::Rejected {
                    reason: reason.clone(),
                },
            }],
        );
        let evs = events(&mut e);
        assert!(evs.contains(&DeviceEvent::Deferred {
            change: alert.clone(),
            reason
        }));
        assert!(!evs
            .iter()
            .any(|ev| matches!(ev, DeviceEvent::Rejected { .. })));
        assert_eq!(e.pending(), 1, "the entry stays");
        assert!(
            !std::iter::from_fn(|| e.poll_action())
                .any(|a| matches!(a, DeviceAction::OutboxRemove { .. })),
            "nothing leaves the durable outbox"
        );
        // Not resent in this session, whatever the time.
        e.handle_timeout(600_000);
        assert!(sent(&mut e).is_empty());
        assert_eq!(e.poll_action(), None);
        // The next session sends it again.
        e.handle_disconnected(600_001);
        e.handle_connected(600_002);
        let Some(UpMsg::Hello { session, .. }) = sent(&mut e).pop() else {
            panic!("no hello")
        };
        let welcome = DownMsg::Welcome {
            session,
            now_ms: 1_600_000,
            max_drift_ms: 60_000,
            answered: None,
            repush: false,
        };
        e.handle_message(
            600_003,
            &wire::encode_down("2+ff", &welcome, &WireConfig::default()).unwrap(),
        );
        assert!(events(&mut e).contains(&DeviceEvent::CloudSchema {
            cloud: "2+ff".into(),
            device: "1".into()
        }));
        e.handle_timeout(600_100);
        load(&mut e, 600_100, std::slice::from_ref(&alert));
        let Some(UpMsg::Push { changes, .. }) = sent(&mut e).pop() else {
            panic!("the deferred change is sent again")
        };
        assert_eq!(changes, vec![alert]);
    }

    fn error(e: &mut DeviceEngine, now: u64, code: ErrorCode) {
        let msg = DownMsg::Error {
            code,
            message: "slow down".into(),
        };
        e.handle_message(
            now,
            &wire::encode_down("1", &msg, &WireConfig::default()).unwrap(),
        );
    }

    #[test]
    fn a_throttled_device_sends_no_push_before_the_retry_time_and_loses_nothing() {
        let mut e = ready();
        events(&mut e);
        error(
            &mut e,
            10,
            ErrorCode::RateLimited {
                retry_after_ms: 500,
            },
        );
        assert_eq!(
            events(&mut e),
            [DeviceEvent::Throttled {
                retry_after_ms: 500,
                busy: false
            }]
        );
        e.handle_local_change(20, change("a", 1_000_000));
        assert_eq!(e.poll_action(), None, "no batch is built during the pause");
        assert_eq!(
            e.poll_timeout(),
            Some(510),
            "the change waits for the pause"
        );
        e.handle_timeout(300);
        assert_eq!(e.poll_action(), None);
        e.handle_timeout(510);
        load(&mut e, 510, &[change("a", 1_000_000)]);
        assert!(matches!(sent(&mut e).as_slice(), [UpMsg::Push { .. }]));
        assert_eq!(e.pending(), 1, "kept until the cloud answers");
        // A hostile hint cannot stall the device past a retransmit timeout; busy is told apart.
        error(
            &mut e,
            600,
            ErrorCode::Busy {
                retry_after_ms: u64::MAX,
                batch: None,
            },
        );
        assert_eq!(
            events(&mut e),
            [DeviceEvent::Throttled {
                retry_after_ms: 30_000,
                busy: true
            }]
        );
    }

    #[test]
    fn a_window_of_batches_lost_together_raises_the_backoff_once() {
        let mut e = ready();
        let base = DeviceConfig::default().batch_delay_ms;
        // Four batches in flight, sent a little apart (as changes trickle in).
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let at = 10 + i as u64 * (base + 1);
            e.handle_local_change(at, change(k, 1_000_000 + i as u64));
            e.handle_timeout(at + base);
            load(&mut e, at + base, &[change(k, 1_000_000 + i as u64)]);
            assert!(
                matches!(sent(&mut e).as_slice(), [UpMsg::Push { .. }]),
                "{k}"
            );
        }
        assert_eq!(e.in_flight(), 4);
        // None is answered: each times out on its own deadline, in its own call.
        let mut expiries = 0;
        for t in (0..2_500).step_by(5) {
            if e.batches.values().any(|b| b.deadline <= t) {
                expiries += 1;
            }
            e.handle_timeout(t);
            while e.poll_action().is_some() {}
            sent(&mut e);
        }
        assert!(expiries >= 2, "the batches expired in separate calls");
        assert_eq!(
            e.backoff, 1,
            "one window lost together is one loss: the next timeouts double once, not four times"
        );
    }

    #[test]
    fn a_push_in_flight_is_resent_when_a_busy_pause_ends() {
        let mut e = ready();
        e.handle_local_change(10, change("a", 1_000_000));
        load(&mut e, 10, &[change("a", 1_000_000)]);
        assert!(matches!(sent(&mut e).as_slice(), [UpMsg::Push { .. }]));
        // The cloud was busy with earlier pushes: this one may never have been taken.
        error(
            &mut e,
            20,
            ErrorCode::Busy {
                retry_after_ms: 200,
                batch: None,
            },
        );
        assert_eq!(
            e.poll_timeout(),
            Some(220),
            "resent when the pause ends, not after a retransmit timeout"
        );
        e.handle_timeout(220);
        load(&mut e, 220, &[change("a", 1_000_000)]);
        assert!(matches!(sent(&mut e).as_slice(), [UpMsg::Push { .. }]));
        assert_eq!(e.pending(), 1, "kept until the cloud answers");
    }

    #[test]
    fn the_welcomes_time_sets_the_first_pushes_retransmit_timeout() {
        let welcomed = |hello_resent: bool| {
            let mut e = DeviceEngine::new(DeviceConfig::default(), "1".into(), Restored::default());
            e.handle_connected(0);
            sent(&mut e);
            if hello_resent {
                let at = e.poll_timeout().expect("the hello's timer");
                e.handle_timeout(at);
                sent(&mut e);
            }
            let Some(session) = e.session else {
                panic!("no session")
            };
            // A loaded cloud: the welcome waited 4 s in its store's queue.
            welcome(&mut e, 4_000, session);
            assert!(e.is_ready());
            e.handle_local_change(4_000, change("a", 1_000_000));
            load(&mut e, 4_000, &[change("a", 1_000_000)]);
            assert!(matches!(sent(&mut e).as_slice(), [UpMsg::Push { .. }]));
            e.poll_timeout().expect("the push's timer") - 4_000
        };
        let timeout = welcomed(false);
        // srtt 4 s plus four deviations of 2 s (RFC 6298's first sample), with up to 1/4 jitter.
        assert!((12_000..=15_000).contains(&timeout), "{timeout}");
        // A resent hello's welcome may answer either copy: it measures nothing (Karn), and the
        // first push waits the one-second floor, doubled by the hello's backoff at most.
        let timeout = welcomed(true);
        assert!(timeout <= 2_500, "{timeout}");
    }

    #[test]
    fn a_busy_answer_naming_its_push_resends_only_that_one() {
        let mut e = ready();
        let base = DeviceConfig::default().batch_delay_ms;
        let mut ids = Vec::new();
        for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
            let at = 10 + i as u64 * (base + 1);
            e.handle_local_change(at, change(k, 1_000_000 + i as u64));
            e.handle_timeout(at + base);
            load(&mut e, at + base, &[change(k, 1_000_000 + i as u64)]);
            match sent(&mut e).as_slice() {
                [UpMsg::Push { batch, .. }] => ids.push(*batch),
                other => panic!("{other:?}"),
            }
        }
        let deadlines = |e: &DeviceEngine| -> Vec<u64> {
            ids.iter().map(|id| e.batches[id].deadline).collect()
        };
        let before = deadlines(&e);
        assert!(before.iter().all(|d| *d > 400), "{before:?}");
        error(
            &mut e,
            200,
            ErrorCode::Busy {
                retry_after_ms: 100,
                batch: Some(ids[1]),
            },
        );
        let after = deadlines(&e);
        assert_eq!(
            after[1], 300,
            "the refused push goes again when the pause ends"
        );
        assert_eq!(
            (after[0], after[2]),
            (before[0], before[2]),
            "the pushes the cloud took keep their timers"
        );
        e.handle_timeout(300);
        let loads: Vec<Vec<(String, ItemKey)>> = std::iter::from_fn(|| e.poll_action())
            .filter_map(|a| match a {
                DeviceAction::LoadBatch { keys, .. } => Some(keys),
                _ => None,
            })
            .collect();
        assert_eq!(loads.len(), 1, "one batch rebuilt: {loads:?}");
        assert_eq!(loads[0][0].1.sk, "b");
        assert_eq!(e.in_flight(), 3);
    }

    #[test]
    fn too_many_changes_cuts_later_batches_to_the_clouds_limit() {
        let mut e = ready();
        error(&mut e, 5, ErrorCode::TooManyChanges { max: 2 });
        assert!(events(&mut e)
            .iter()
            .any(|ev| matches!(ev, DeviceEvent::CloudError { .. })));
        // The first change goes alone at once; the next three wait for company, then go as
        // batches of at most two.
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            e.handle_local_change(10, change(k, 1_000_000 + i as u64));
        }
        e.handle_timeout(10 + DeviceConfig::default().batch_delay_ms);
        let keys: Vec<usize> = std::iter::from_fn(|| e.poll_action())
            .filter_map(|a| match a {
                DeviceAction::LoadBatch { keys, .. } => Some(keys.len()),
                _ => None,
            })
            .collect();
        assert_eq!(keys, vec![1, 2, 1]);
    }

    #[test]
    fn a_superseded_change_leaves_with_an_event_naming_the_winner() {
        let mut e = ready();
        let mine = change("a", 1_000_000);
        e.handle_local_change(2, mine.clone());
        load(&mut e, 2, std::slice::from_ref(&mine));
        let winner = Hlc {
            wall_ms: 1_000_500,
            counter: 0,
            node: 2,
        };
        ack(
            &mut e,
            3,
            vec![ChangeResult {
                model: "M".into(),
                key: mine.key.clone(),
                version: mine.version,
                kept: None,
                status: ChangeStatus::Stale { winner },
            }],
        );
        assert_eq!(e.pending(), 0);
        assert_eq!(
            e.poll_action(),
            Some(DeviceAction::OutboxRemove {
                entries: vec![("M".into(), mine.key.clone(), mine.version)],
                answered: None
            })
        );
        assert!(events(&mut e).contains(&DeviceEvent::Superseded {
            change: mine,
            winner
        }));
    }
}

#[cfg(test)]
mod restore_tests {
    //! A cloud restored from a backup: the mark a hello carries, the re-push a welcome asks for,
    //! and what of other sessions is not acted on.
    use super::*;
    use crate::wire::{ChangeResult, Op};

    fn change(sk: &str, wall_ms: u64) -> Change {
        Change {
            model: "M".into(),
            key: ItemKey {
                pk: "p".into(),
                sk: sk.into(),
            },
            op: Op::Delete,
            item: None,
            version: Hlc {
                wall_ms,
                counter: 0,
                node: 1,
            },
            base: None,
        }
    }

    fn sent(e: &mut DeviceEngine) -> Vec<UpMsg> {
        std::iter::from_fn(|| e.poll_transmit())
            .map(|b| wire::decode_up(&b, &WireConfig::default()).unwrap().msg)
            .collect()
    }

    fn down(e: &mut DeviceEngine, now: u64, msg: &DownMsg) {
        e.handle_message(
            now,
            &wire::encode_down("1", msg, &WireConfig::default()).unwrap(),
        );
    }

    fn actions(e: &mut DeviceEngine) -> Vec<DeviceAction> {
        std::iter::from_fn(|| e.poll_action()).collect()
    }

    /// A connected engine whose hello was sent; returns it and the hello's session and mark.
    fn connected(
        outbox: &[Change],
        mark: FeedMark,
        answered: u64,
    ) -> (DeviceEngine, u64, DeviceMark) {
        let mut e = DeviceEngine::new(
            DeviceConfig::default(),
            "1".into(),
            Restored {
                cursor: 4,
                outbox: outbox.iter().map(OutboxMeta::of).collect(),
                mark,
                answered,
            },
        );
        e.handle_connected(0);
        let Some(UpMsg::Hello {
            session,
            mark: Some(mark),
            ..
        }) = sent(&mut e).pop()
        else {
            panic!("no hello with a mark")
        };
        (e, session, mark)
    }

    fn welcome(session: u64, answered: u64, repush: bool) -> DownMsg {
        DownMsg::Welcome {
            session,
            now_ms: 1_000_000,
            max_drift_ms: 60_000,
            answered: Some(answered),
            repush,
        }
    }

    #[test]
    fn a_hello_says_what_the_device_holds_of_the_clouds_history() {
        let (_, _, mark) = connected(&[], FeedMark { gen: 8, seen: 12 }, 30);
        assert_eq!(
            mark,
            DeviceMark {
                gen: 8,
                seen: 12,
                answered: 30
            }
        );
    }

    #[test]
    fn a_welcome_asking_for_a_repush_holds_every_push_until_it_is_done() {
        let a = change("a", 10);
        let (mut e, session, _) = connected(std::slice::from_ref(&a), FeedMark::default(), 9);
        down(&mut e, 1, &welcome(session, 3, true));
        assert!(e.is_ready() && e.is_repushing());
        assert_eq!(
            actions(&mut e),
            [DeviceAction::Repush],
            "no batch is loaded"
        );
        assert_eq!(
            e.poll_timeout(),
            None,
            "nothing is due while the re-push runs"
        );
        // The driver hands the entries it put back; they wait too.
        let b = change("b", 5);
        e.handle_local_change(2, b.clone());
        e.handle_timeout(100);
        assert!(actions(&mut e).is_empty());
        assert!(sent(&mut e).is_empty());
        e.handle_repush_done(200, 1);
        assert!(!e.is_repushing());
        let done = actions(&mut e);
        assert_eq!(done[0], DeviceAction::StoreAnswered(3), "{done:?}");
        assert!(
            matches!(&done[1], DeviceAction::LoadBatch { keys, .. } if keys.len() == 2),
            "pushes resume: {done:?}"
        );
        let events: Vec<DeviceEvent> = std::iter::from_fn(|| e.poll_event()).collect();
        assert!(
            events.contains(&DeviceEvent::Repushed { count: 1 }),
            "{events:?}"
        );
        // The next hello says the cloud's count, not the one the restored cloud lost.
        e.handle_disconnected(300);
        e.handle_connected(300);
        let Some(UpMsg::Hello { mark: Some(m), .. }) = sent(&mut e).pop() else {
            panic!("no hello")
        };
        assert_eq!(m.answered, 3);
    }

    #[test]
    fn a_lower_count_in_another_welcome_scans_again() {
        let (mut e, session, _) = connected(&[], FeedMark::default(), 9);
        down(&mut e, 1, &welcome(session, 5, true));
        assert_eq!(actions(&mut e), [DeviceAction::Repush]);
        e.handle_disconnected(2);
        e.handle_connected(2);
        let Some(UpMsg::Hello { session: s2, .. }) = sent(&mut e).pop() else {
            panic!("no hello")
        };
        // Restored again, further back: the scan under way may miss what was answered since.
        down(&mut e, 3, &welcome(s2, 2, true));
        assert!(actions(&mut e).is_empty(), "one scan at a time");
        e.handle_repush_done(4, 0);
        assert_eq!(actions(&mut e), [DeviceAction::Repush], "once more");
        e.handle_repush_done(5, 0);
        assert_eq!(actions(&mut e), [DeviceAction::StoreAnswered(2)]);
    }

    #[test]
    fn answers_and_pages_of_another_session_are_not_acted_on() {
        let a = change("a", 10);
        let (mut e, session, _) = connected(std::slice::from_ref(&a), FeedMark::default(), 0);
        down(&mut e, 1, &welcome(session, 0, false));
        let Some(DeviceAction::LoadBatch { batch, .. }) = e.poll_action() else {
            panic!("no batch")
        };
        e.handle_batch_loaded(2, batch, vec![a.clone()]);
        let pushed = sent(&mut e);
        assert!(
            matches!(&pushed[..], [UpMsg::Push { session: Some(s), .. }] if *s == session),
            "a push names its session: {pushed:?}"
        );
        let results = vec![ChangeResult {
            model: "M".into(),
            key: a.key.clone(),
            version: a.version,
            kept: None,
            status: ChangeStatus::Applied,
        }];
        let ack = |s: u64, answered: u64| DownMsg::PushAck {
            batch,
            results: results.clone(),
            answered: Some(answered),
            session: Some(s),
        };
        down(&mut e, 3, &ack(session ^ 1, 9));
        assert_eq!(
            (e.pending(), e.poll_action()),
            (1, None),
            "another session's ack"
        );
        down(&mut e, 4, &ack(session, 4));
        assert_eq!(
            e.poll_action(),
            Some(DeviceAction::OutboxRemove {
                entries: vec![("M".into(), a.key.clone(), a.version)],
                answered: Some(4)
            }),
            "the trim stores the count"
        );
        let page = |s: u64| DownMsg::Feed {
            from: 4,
            to: 5,
            changes: vec![],
            session: Some(s),
            gen: Some(7),
            seen: None,
        };
        down(&mut e, 5, &page(session ^ 1));
        assert_eq!(e.poll_action(), None, "another session's page");
        down(&mut e, 6, &page(session));
        assert!(matches!(
            e.poll_action(),
            Some(DeviceAction::Apply(ApplyPage::Feed {
                mark: Some(FeedMark { gen: 7, seen: 5 }),
                ..
            }))
        ));
    }

    #[test]
    fn a_restore_resync_stores_its_mark_only_with_its_final_page() {
        let (mut e, session, _) = connected(&[], FeedMark { gen: 3, seen: 40 }, 0);
        down(&mut e, 1, &welcome(session, 0, true));
        let page = |after: Option<SnapshotCursor>, last: Option<SnapshotCursor>, done, seen| {
            DownMsg::Snapshot {
                resync: 11,
                session: Some(session),
                after,
                last,
                items: vec![],
                done,
                cursor: 6,
                gen: Some(9),
                seen: Some(seen),
                restore: true,
            }
        };
        let pos = SnapshotCursor {
            model: "M".into(),
            key: change("a", 1).key,
        };
        down(&mut e, 2, &page(None, Some(pos.clone()), false, 8));
        let first = actions(&mut e);
        assert!(
            first.iter().any(|a| matches!(
                a,
                DeviceAction::Apply(ApplyPage::Snapshot {
                    mark: None,
                    restore: true,
                    ..
                })
            )),
            "{first:?}"
        );
        e.handle_applied(3, ApplyOutcome::default());
        down(&mut e, 4, &page(Some(pos), None, true, 7));
        let last = actions(&mut e);
        assert!(
            last.iter().any(|a| matches!(
                a,
                DeviceAction::Apply(ApplyPage::Snapshot {
                    mark: Some(FeedMark { gen: 9, seen: 8 }),
                    done: true,
                    ..
                })
            )),
            "the highest head of the resync's pages, replacing the old mark: {last:?}"
        );
    }
}
