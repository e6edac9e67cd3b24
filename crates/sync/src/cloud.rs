//! The cloud engine: the cloud side of the protocol, for all devices, as one state machine.
//!
//! This module exists so that the cloud's decisions (whom to welcome, what page to read next,
//! when to resend, when to resync) are deterministic and simulated. It holds only bounded state
//! per device (a few cursors, never item data): pages are read from the store on demand and
//! re-read on loss, so a device that stops reading costs a fixed, small amount of memory.
//!
//! It also keeps devices to their share: every session has a message rate (a token bucket,
//! [`CloudEngineConfig::device_rate`]); a message over it is not processed and is answered with
//! [`ErrorCode::RateLimited`] at most once per retry interval, so neither the work nor the
//! refusals grow with a flood. A push beyond [`CloudEngineConfig::max_pushes_in_progress`] is
//! answered [`ErrorCode::Busy`]. Every refusal is counted ([`CloudEngine::stats`], and per device
//! through [`CloudAction::Throttled`]). What the engine holds per session is bounded by
//! [`CloudEngineConfig::session_state_bound`], which `docs/security.md` spells out.
//!
//! It welcomes a session only after the session's first feed read: that read returns what the
//! store holds for the device (its answered count, its feed's generations), which the welcome
//! compares with the mark of the device's hello, before any push of the session is applied. A
//! device that heard more than the store holds (the store was restored from an older backup) is
//! told to re-push what it holds, and gets a restore resync when it holds feed data the store
//! lost (`docs/protocol.md`, "Cloud restored from a backup").

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use devtables_schema::ItemKey;

use crate::identity::{DeviceId, MAX_NAME_LEN};
use crate::rate::{RateLimit, TokenBucket};
use crate::rng::SplitMix;
use crate::wire::{
    self, Change, ChangeResult, DeviceMark, DownMsg, ErrorCode, Fit, MessageBudget, UpMsg,
    WireConfig, WireError,
};

/// Why a change was skipped in a page for its size.
fn too_large_reason(len: usize, max: usize) -> String {
    format!("the stored change is {len} bytes encoded, more than a {max} byte message holds: fix or remove the item")
}

/// Limits and timings of a [`CloudEngine`].
#[derive(Clone, Debug)]
pub struct CloudEngineConfig {
    /// Message limits; must match the devices'.
    pub wire: WireConfig,
    /// The cloud schema version, sent in every envelope.
    pub schema_version: String,
    /// Most device sessions tracked at once. Default 100 000; a hello beyond it is answered
    /// with [`ErrorCode::TooManySessions`].
    pub max_sessions: usize,
    /// Most unacknowledged feed or snapshot pages per device. Default 2.
    pub feed_window: usize,
    /// Most changes read for one feed page. Default 200.
    pub feed_page_changes: usize,
    /// Most items read for one snapshot page. Default 200.
    pub snapshot_page_items: usize,
    /// First page acknowledgement timeout, in ms. Default 5000.
    pub ack_timeout_ms: u64,
    /// Longest page acknowledgement timeout, in ms. Default 60 000.
    pub ack_timeout_max_ms: u64,
    /// Consecutive page timeouts after which a silent device's session is dropped. Default 8.
    pub max_page_retries: u32,
    /// Most pushes of one device being applied at once; a push beyond it is not taken, and is
    /// answered [`ErrorCode::Busy`] naming its batch (at most once per retry interval) and
    /// counted; the device resends that batch after the interval. Default 4.
    pub max_pushes_in_progress: usize,
    /// Most changes of one device's pushes in progress whose copies the engine recognises.
    /// A device whose push waits longer than its retransmit timeout sends the push's changes
    /// again in a new batch; a change of that copy with the key and version of a change still
    /// in progress is not applied again: the original's answer, which names key and version,
    /// answers the device for both ([`CloudEngineStats::push_changes_covered`]). Beyond this
    /// many changes in progress a copy is applied again (a replay, answered as before).
    /// Default 256 (8 bytes each).
    pub max_covered_changes: usize,
    /// How many of a session's changes last answered `applied` the engine remembers (8 bytes
    /// each). A copy that arrives after its original was answered (it queued behind it, before
    /// the engine: in the broker's handover or the socket, while the cloud was behind) is
    /// answered `applied` again at once, without a store job
    /// ([`CloudEngineStats::push_changes_reanswered`]): the store's work goes to new changes.
    /// Default 32; 0 sends every such copy to the store (a replay, answered as before).
    pub remembered_answers: usize,
    /// Least time a device told [`ErrorCode::Busy`] waits before it pushes again, in ms.
    /// Default 1000. The time told is the longer of this and how long the device's oldest push
    /// in progress has waited (capped by `ack_timeout_max_ms`): a cloud with a queue of ten
    /// seconds asks for ten, so the refusals do not grow with the overload (each refusal costs
    /// a decode, a reply and a status record, taken from the work that would drain the queue).
    pub busy_retry_ms: u64,
    /// The message rate of one device session: every message but `bye` takes a token. A message
    /// without one is not processed; the device is told [`ErrorCode::RateLimited`] with the time
    /// to refill half the burst, at most once per such interval. The bucket outlives the
    /// session until it is full again, so reconnecting does not refill it. Default 50 messages a
    /// second, burst 100; `per_sec: 0` turns the limit off.
    pub device_rate: RateLimit,
    /// Most changes the cloud takes in one push (capped by `wire.max_changes`); a larger push is
    /// answered [`ErrorCode::TooManyChanges`]. Default 1000, the wire limit.
    pub max_push_changes: usize,
    /// Least time between two [`ErrorCode::NoSession`] prompts to one device, in ms. Default 30 000.
    pub prompt_interval_ms: u64,
    /// How far past the cloud's wall time a pushed version may be, in ms. Default
    /// [`crate::apply::DEFAULT_MAX_DRIFT_MS`] (one minute). Told to devices in the welcome; the
    /// driver passes it to [`crate::apply::cloud_apply_push`].
    pub max_drift_ms: u64,
    /// Seed for resync ids and jitter.
    pub seed: u64,
}

impl Default for CloudEngineConfig {
    fn default() -> CloudEngineConfig {
        CloudEngineConfig {
            wire: WireConfig::default(),
            schema_version: String::new(),
            max_sessions: 100_000,
            feed_window: 2,
            feed_page_changes: 200,
            snapshot_page_items: 200,
            ack_timeout_ms: 5000,
            ack_timeout_max_ms: 60_000,
            max_page_retries: 8,
            max_pushes_in_progress: 4,
            max_covered_changes: 256,
            remembered_answers: 32,
            busy_retry_ms: 1000,
            device_rate: RateLimit {
                per_sec: 50,
                burst: 100,
            },
            max_push_changes: WireConfig::default().max_changes,
            prompt_interval_ms: 30_000,
            max_drift_ms: crate::apply::DEFAULT_MAX_DRIFT_MS,
            seed: 0,
        }
    }
}

impl CloudEngineConfig {
    /// Most bytes the engine holds for one device session, given the longest snapshot position
    /// (model, pk and sk together, in bytes) the store's pages produce: the session record, its
    /// device id and schema string, its timer, the unacknowledged pages and, during a resync,
    /// `3 + feed_window` positions (acknowledged, next, outstanding read, one per page). A
    /// position a device acknowledges is kept only if it is no longer than the longest one sent
    /// to it, so nothing a device sends raises this bound. See `docs/security.md`.
    pub fn session_state_bound(&self, longest_cursor: usize) -> usize {
        let window = self.feed_window.max(1);
        // A VecDeque grows by doubling from four slots.
        let slots = window.next_power_of_two().max(4);
        let id = std::mem::size_of::<DeviceId>() + 2 * MAX_NAME_LEN;
        let feed = slots * std::mem::size_of::<(u64, u64)>();
        let pushes = self
            .max_pushes_in_progress
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX)
            .max(4)
            .saturating_mul(std::mem::size_of::<PushTaken>());
        // The fingerprints of the changes in progress: a VecDeque doubles, from four slots.
        let covered = self
            .max_covered_changes
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX)
            .max(4)
            .saturating_mul(std::mem::size_of::<u64>());
        let snapshot = std::mem::size_of::<SnapTx>()
            + slots * std::mem::size_of::<SentPage>()
            + (3 + window) * longest_cursor;
        let remembered = self
            .remembered_answers
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX)
            .saturating_mul(std::mem::size_of::<u64>());
        std::mem::size_of::<Session>()
            + wire::MAX_SCHEMA_BYTES
            + remembered
            // The sessions map's key, and the timer entry's.
            + 2 * id
            + std::mem::size_of::<u64>()
            + pushes
            + covered
            + feed.max(snapshot)
    }
}

/// What the engine refused, since it started: the service shows these in its status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloudEngineStats {
    /// Messages not processed because their device was over its message rate.
    pub rate_limited: u64,
    /// Pushes not taken because their device had `max_pushes_in_progress` being applied.
    pub pushes_busy: u64,
    /// Pushed changes not applied because a push of the same session still in progress
    /// carries the same key and version (a copy the device sent when its retransmit timer
    /// fired while the cloud held the original): the original's answer answers them.
    pub push_changes_covered: u64,
    /// Pushes not taken at all because every change of theirs was covered that way, or
    /// answered from memory (below): no store job.
    pub pushes_covered: u64,
    /// Pushed changes answered `applied` again without a store job: a copy of a change the
    /// same session's push was answered `applied` for, among the last `remembered_answers`.
    pub push_changes_reanswered: u64,
    /// Messages answered with an error: undecodable, too large, of another protocol version, a
    /// bad schema string, or a push of more than `max_push_changes` changes.
    pub messages_refused: u64,
    /// Messages other than `hello` and `bye` from a device without a session (answered
    /// [`ErrorCode::NoSession`], not processed; the device resends after its hello).
    pub messages_without_session: u64,
    /// Pushes sent in an earlier session of their device (delayed past its next hello): not
    /// applied, not answered; the device resends their changes from its outbox.
    pub pushes_of_ended_sessions: u64,
    /// Push acknowledgements not sent because the push was taken in an earlier session of its
    /// device (applied, but the count the acknowledgement must carry is not known in the new
    /// one): the device resends the changes, which are answered as duplicates.
    pub acks_dropped: u64,
    /// Welcomes that told the device the cloud holds less than it heard from it (the cloud was
    /// restored from a backup): the device re-pushes what it holds, and gets a restore resync
    /// when it holds feed data the cloud lost.
    pub restores_detected: u64,
    /// Full resyncs started (a cursor below the feed's floor or beyond its head, a new device,
    /// a restore resync).
    pub resyncs_started: u64,
}

/// How far the connected devices are behind their feeds ([`CloudEngine::feed_lag`]): what the
/// service shows as its feed lag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedLag {
    /// Feed entries not yet acknowledged, summed over the sessions streaming their feed (head
    /// as far as the engine knows, minus the acknowledged cursor).
    pub entries: u64,
    /// The largest of those lags.
    pub max: u64,
    /// Sessions with a lag above zero.
    pub sessions_behind: u64,
    /// Sessions in a full resync (their lag is not a feed distance: the device is being sent
    /// the snapshot).
    pub sessions_resyncing: u64,
}

pub use crate::wire::SnapshotCursor;

/// The store's answer to [`CloudAction::ReadFeed`].
#[derive(Clone, Debug, PartialEq)]
pub struct FeedPage {
    /// The `after` of the read.
    pub after: u64,
    /// Up to `limit` entries with cursor greater than `after`, in cursor order, with the current
    /// item or tombstone of each key.
    pub changes: Vec<(u64, Change)>,
    /// The device's feed head (highest cursor) at read time.
    pub head: u64,
    /// `after` is older than the feed's retention: the device needs a full resync. (A device
    /// whose `after` is beyond `head` also gets one: the cloud was restored from a backup.)
    pub resync_required: bool,
    /// Entries in the read range whose row could not be read (corrupt); they are skipped and
    /// reported, never allowed to stall the feed.
    pub unreadable: Vec<UnreadableRow>,
    /// The generations of the feed in the store's history, oldest first, the current one last
    /// (at most [`MAX_FEED_GENERATIONS`]; a new feed has the one generation 0, at 0). A run of
    /// the store is one process's use of it; when a run first appends to the feed, the store
    /// starts a generation named after the run, at the head it took over. A device's mark
    /// names the generation and the head its data came from ([`DeviceMark`]): if the store's
    /// history has no such generation, or the head is beyond where that generation ended, the
    /// device holds feed data the store lost (it was restored from an older backup).
    pub generations: Vec<FeedGeneration>,
    /// The store's count of this device's pushed changes answered (every result of every push
    /// applied: written, duplicate, superseded or refused), kept in the push's transaction.
    pub answered: u64,
}

/// Most generations a store keeps per feed ([`FeedPage::generations`]); the oldest go first. A
/// device whose mark names a generation forgotten since gets a restore resync, which is always
/// correct, only more work.
pub const MAX_FEED_GENERATIONS: usize = 16;

/// One generation of a device's feed: the run of the store that appended to it, and the feed
/// head when it took over (see [`FeedPage::generations`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedGeneration {
    /// The run's id (0: no run appended yet).
    pub gen: u64,
    /// The head when it took over: its cursors are above it, earlier generations' at most it.
    pub base: u64,
}

impl FeedPage {
    /// The current generation of the feed (0 when the store keeps none).
    pub fn gen(&self) -> u64 {
        self.generations.last().map_or(0, |g| g.gen)
    }

    /// Whether the store's history holds everything a device with `mark` heard of its feed:
    /// the mark's generation is in it, and the head the mark names is not beyond where that
    /// generation ended. A store that keeps no generations says nothing (holds).
    pub fn holds(&self, mark: &DeviceMark) -> bool {
        if mark.seen == 0 || self.generations.is_empty() {
            return true;
        }
        match self.generations.iter().position(|g| g.gen == mark.gen) {
            Some(i) => {
                let end = self.generations.get(i + 1).map_or(self.head, |n| n.base);
                mark.seen <= end
            }
            None => false,
        }
    }
}

/// A row a page read skipped because it could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadableRow {
    /// Its feed cursor (0 in a snapshot page).
    pub cursor: u64,
    /// The model.
    pub model: String,
    /// The key.
    pub key: ItemKey,
    /// What was wrong with it.
    pub reason: String,
}

/// The store's answer to [`CloudAction::ReadSnapshot`].
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotPage {
    /// The resync of the read.
    pub resync: u64,
    /// Up to `limit` live items (as puts) after `from`, ordered by (model, key).
    pub items: Vec<Change>,
    /// Where the next page starts, `None` when this was the last.
    pub next: Option<SnapshotCursor>,
    /// The device's feed head at read time (kept from the first page of a resync).
    pub cursor: u64,
    /// Rows in the page's range that could not be read (skipped and reported).
    pub unreadable: Vec<UnreadableRow>,
    /// The feed's generation at read time (see [`FeedPage::gen`]).
    pub gen: u64,
}

/// Work for the cloud driver.
#[derive(Clone, Debug, PartialEq)]
pub enum CloudAction {
    /// Run [`crate::apply::cloud_apply_push`] in one transaction, then call
    /// [`CloudEngine::handle_push_applied`].
    ApplyPush {
        /// The sender (from the topic).
        device: DeviceId,
        /// The batch id.
        batch: u64,
        /// The changes.
        changes: Vec<Change>,
        /// The device announced another schema version than the cloud's (see
        /// [`crate::apply::PushRules::from_neighbour`]).
        from_neighbour: bool,
    },
    /// Read a feed page, then call [`CloudEngine::handle_feed_page`].
    ReadFeed {
        /// Whose feed.
        device: DeviceId,
        /// Entries with cursor greater than this.
        after: u64,
        /// Most entries.
        limit: usize,
    },
    /// Read a snapshot page, then call [`CloudEngine::handle_snapshot_page`].
    ReadSnapshot {
        /// Whose items (its own and its account's broadcast items).
        device: DeviceId,
        /// The resync id, to echo.
        resync: u64,
        /// Items after this cursor; `None` for the first page.
        from: Option<SnapshotCursor>,
        /// Most items.
        limit: usize,
    },
    /// Publish (QoS 1) on the device's down topic.
    Transmit {
        /// The recipient.
        device: DeviceId,
        /// The message.
        bytes: Vec<u8>,
    },
    /// Record the device's status (for dashboards and SQL queries).
    DeviceStatus {
        /// The device.
        device: DeviceId,
        /// Whether it has a session.
        online: bool,
        /// Its schema version, from its last envelope.
        schema_version: String,
        /// The feed cursor it acknowledged last, if known.
        cursor_acked: Option<u64>,
        /// Its outbox size as announced in its last hello (None: unchanged).
        pending: Option<u64>,
        /// When it was last heard from.
        last_seen_ms: u64,
    },
    /// Messages of this device were refused since the last such record (over its message rate,
    /// or pushes beyond the pushes in progress); add them to the device's counters and log it.
    /// Emitted when a refusal is answered, when the device's next message is accepted, and when
    /// its session ends, so the counts are recorded at most once per retry interval.
    Throttled {
        /// The device.
        device: DeviceId,
        /// Messages not processed for its message rate.
        rate_limited: u64,
        /// Pushes not taken because too many were being applied.
        busy: u64,
    },
    /// A stored row could not be sent in a page (larger than a message may be, or unreadable)
    /// and was skipped so the rest flows; record it on the device's status and log it.
    Unsendable {
        /// The device whose page skipped it.
        device: DeviceId,
        /// The model.
        model: String,
        /// The key.
        key: ItemKey,
        /// Why.
        reason: String,
    },
}

/// Feed streaming state of one device.
#[derive(Clone, Debug)]
struct FeedTx {
    /// The cursor the device acknowledged.
    acked: u64,
    /// The cursor after the last page sent.
    sent_to: u64,
    /// Pages sent and not acknowledged, as (from, to).
    pages: VecDeque<(u64, u64)>,
    /// The outstanding read's `after`.
    reading: Option<u64>,
    /// The feed head, as far as known.
    head: u64,
    /// Whether a read has told us the head since the hello.
    head_known: bool,
}

/// One snapshot page sent and not acknowledged.
#[derive(Clone, Debug)]
struct SentPage {
    /// The position after it.
    last: Option<SnapshotCursor>,
    /// Whether it was the final page.
    done: bool,
}

/// Resync streaming state of one device.
#[derive(Clone, Debug)]
struct SnapTx {
    /// The resync id.
    resync: u64,
    /// The feed head captured by the first page read; fixed for the whole resync.
    cursor: Option<u64>,
    /// The position the device acknowledged.
    acked: Option<SnapshotCursor>,
    /// Where the next read starts.
    sent_to: Option<SnapshotCursor>,
    /// Whether the final page was sent.
    finished: bool,
    /// Pages sent and not acknowledged.
    pages: VecDeque<SentPage>,
    /// The outstanding read's start, if a read is outstanding.
    reading: Option<Option<SnapshotCursor>>,
    /// The longest position sent in this resync ([`cursor_bytes`]): a position the device
    /// acknowledges is kept only if it is no longer, so a device cannot make the engine hold
    /// more than the store produced.
    longest_sent: usize,
    /// The device holds feed data the store lost (it was restored from a backup): the pages
    /// say so, and the device takes them as the truth for what it does not write up.
    restore: bool,
}

/// The bytes of a snapshot position's strings.
fn cursor_bytes(c: &SnapshotCursor) -> usize {
    c.model.len() + c.key.pk.len() + c.key.sk.len()
}

/// Refusals of one device not yet handed to the driver ([`CloudAction::Throttled`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Unreported {
    rate_limited: u64,
    busy: u64,
}

/// The message-rate state of one device: it lives in its session, and for a while after it (see
/// [`CloudEngine::spent`]).
#[derive(Clone, Copy, Debug)]
struct Limiter {
    /// Tokens left.
    bucket: TokenBucket,
    /// No [`ErrorCode::RateLimited`] reply before this time.
    next_rate_reply: u64,
    /// No [`ErrorCode::Busy`] reply before this time.
    next_busy_reply: u64,
    /// Refusals not yet reported.
    unreported: Unreported,
}

impl Limiter {
    fn new(limit: &RateLimit, now_ms: u64) -> Limiter {
        Limiter {
            bucket: TokenBucket::full(limit, now_ms),
            next_rate_reply: 0,
            next_busy_reply: 0,
            unreported: Unreported::default(),
        }
    }
}

#[derive(Clone, Debug)]
enum Mode {
    Feed(FeedTx),
    /// Boxed: most sessions stream the feed, and a resync's state is several times larger.
    Snapshot(Box<SnapTx>),
}

/// The fields of a device's [`UpMsg::Hello`].
struct Hello {
    session: u64,
    cursor: u64,
    pending: u64,
    mark: Option<DeviceMark>,
}

/// A push handed to the driver and not yet answered.
#[derive(Clone, Copy, Debug)]
struct PushTaken {
    /// When it was taken (a `busy` answer asks for as long as the oldest has waited).
    taken_ms: u64,
    /// How many fingerprints it put at the back of [`Session::covered`].
    covered: usize,
}

/// A change's identity for recognising a copy: model, key and version, hashed. Two different
/// changes with one fingerprint (a 64-bit collision, or a device crafting one) cost only that
/// device: its change is left unanswered and its retransmit timer sends it again, when the
/// push that covered it is no longer in progress.
fn change_fingerprint(model: &str, key: &ItemKey, version: crate::hlc::Hlc) -> u64 {
    use std::hash::{Hash, Hasher};
    // Keys fixed: the simulation is deterministic, and a collision harms nobody else.
    let mut h = std::hash::DefaultHasher::new();
    model.hash(&mut h);
    key.hash(&mut h);
    version.hash(&mut h);
    h.finish()
}

fn fingerprint_of(c: &Change) -> u64 {
    change_fingerprint(&c.model, &c.key, c.version)
}

/// What the cloud knows about one connected device.
#[derive(Clone, Debug)]
struct Session {
    /// The device's session id (from its hello); a hello with the same id is a resend.
    session: u64,
    /// Its schema version.
    schema: String,
    /// When it was last heard from.
    last_seen_ms: u64,
    /// Pushes handed to the driver and not yet answered, oldest first (the store answers a
    /// device's pushes in order). At most `max_pushes_in_progress`.
    pushes: VecDeque<PushTaken>,
    /// Fingerprints ([`change_fingerprint`]) of the changes of `pushes` this session took, in
    /// the same order: a copy of one is not taken again. At most `max_covered_changes`.
    covered: VecDeque<u64>,
    /// Fingerprints of the changes this session's pushes were last answered `applied` for,
    /// newest last: a copy of one is answered again from here. At most `remembered_answers`.
    answered_applied: VecDeque<u64>,
    /// Its message rate.
    limiter: Limiter,
    /// Feed or resync streaming.
    mode: Mode,
    /// When the oldest unacknowledged page (or outstanding read) times out.
    deadline: Option<u64>,
    /// Consecutive timeouts, for backoff.
    retries: u32,
    /// What the device's hello said it holds of the cloud's history.
    mark: Option<DeviceMark>,
    /// The welcome, once sent: the store's answered count it carried and whether it asked for
    /// a re-push. `None` until the first feed read of the session: the welcome waits for it, so
    /// what it says is read before any push of the session is applied.
    welcome: Option<(u64, bool)>,
    /// The store's count of the device's pushed changes answered, as of the last push result
    /// handed to the engine (`None` before the session's first feed read). Results arrive in
    /// the store's order, so the engine can keep it without another read.
    answered: Option<u64>,
    /// The cloud's wall time and the engine's time at the hello: the welcome, sent later, tells
    /// the wall time of its sending.
    hello_clock: (u64, u64),
}

/// The cloud side of the protocol, for every device.
///
/// Method kinds: inputs (`handle_*`, each with the current time in ms), and outputs that the
/// driver drains after every input: [`poll_action`](Self::poll_action) (storage reads and
/// writes, transmits, status records, in order), then [`poll_timeout`](Self::poll_timeout).
/// Getters: [`sessions`](Self::sessions).
///
/// Invariant: per device, at most `feed_window` pages are unacknowledged and at most one read is
/// outstanding; nothing else about a device is held in memory.
#[derive(Debug)]
pub struct CloudEngine {
    /// Limits and timings.
    cfg: CloudEngineConfig,
    /// Resync ids and jitter.
    rng: SplitMix,
    /// Sessions by device.
    sessions: BTreeMap<DeviceId, Session>,
    /// Session deadlines, earliest first.
    timers: BTreeSet<(u64, DeviceId)>,
    /// Session-less devices being prompted to say hello: (next prompt, prompts sent, no reply
    /// to one of its messages before this time). Bounded
    /// by `max_sessions`.
    prompted: BTreeMap<DeviceId, (u64, u32, u64)>,
    /// Prompt deadlines, earliest first.
    prompt_timers: BTreeSet<(u64, DeviceId)>,
    /// The rate limiters of devices whose session ended with tokens spent, until they are full
    /// again: a device that reconnects gets its old bucket back, so a hello/bye loop cannot
    /// refill it. Bounded by `max_sessions`.
    spent: BTreeMap<DeviceId, (Limiter, u64)>,
    /// When each spent limiter is full again, earliest first.
    spent_timers: BTreeSet<(u64, DeviceId)>,
    /// Refusals since the start.
    stats: CloudEngineStats,
    /// Outputs.
    actions: VecDeque<CloudAction>,
}

impl CloudEngine {
    /// A cloud engine with no sessions (after a start or a crash).
    pub fn new(config: CloudEngineConfig) -> CloudEngine {
        let rng = SplitMix::new(config.seed);
        CloudEngine {
            cfg: config,
            rng,
            sessions: BTreeMap::new(),
            timers: BTreeSet::new(),
            prompted: BTreeMap::new(),
            prompt_timers: BTreeSet::new(),
            spent: BTreeMap::new(),
            spent_timers: BTreeSet::new(),
            stats: CloudEngineStats::default(),
            actions: VecDeque::new(),
        }
    }

    /// Sessions tracked.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Whether `device` has a session here (it said hello and has not left since).
    pub fn has_session(&self, device: &DeviceId) -> bool {
        self.sessions.contains_key(device)
    }

    /// The driver's link to the broker came back with a new (clean) MQTT session. Messages to
    /// and from the cloud in between may have been dropped by the broker, and neither side can
    /// tell which: a device would otherwise wait out its retransmit backoff (up to
    /// `retransmit_max_ms`) before resending a push the cloud never saw, and a page the device
    /// never received would wait for the cloud's own ack timeout. Every session is dropped
    /// (without marking the devices offline: they did not leave) and the devices that held one
    /// are returned, for the driver to prompt, paced as after a start: each says hello again,
    /// which resends its unacknowledged pushes at once and restarts its feed from the cursor it
    /// holds.
    pub fn handle_link_restored(&mut self) -> Vec<DeviceId> {
        self.timers.clear();
        std::mem::take(&mut self.sessions).into_keys().collect()
    }

    /// Another cloud node serves these devices from now on (a scaled-out cloud moved their
    /// partition): every session and pending prompt of a device `serves` says no to is dropped,
    /// without a status record or a prompt (the device did not leave; the node that takes it
    /// over answers its next message, and a push it retransmits meanwhile gets a prompt there).
    /// Returns how many sessions were dropped.
    pub fn release_devices(&mut self, serves: impl Fn(&DeviceId) -> bool) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|d, _| serves(d));
        self.timers.retain(|(_, d)| serves(d));
        self.prompted.retain(|d, _| serves(d));
        self.prompt_timers.retain(|(_, d)| serves(d));
        before - self.sessions.len()
    }

    /// What the engine refused since it started.
    pub fn stats(&self) -> CloudEngineStats {
        self.stats
    }

    /// The feed lag of the sessions. One pass over the sessions (no allocation): a driver with
    /// many sessions calls it at a pace of its own, not after every input.
    pub fn feed_lag(&self) -> FeedLag {
        let mut lag = FeedLag::default();
        for s in self.sessions.values() {
            match &s.mode {
                Mode::Feed(f) => {
                    let behind = f.head.saturating_sub(f.acked);
                    lag.entries = lag.entries.saturating_add(behind);
                    lag.max = lag.max.max(behind);
                    lag.sessions_behind += u64::from(behind > 0);
                }
                Mode::Snapshot(_) => lag.sessions_resyncing += 1,
            }
        }
        lag
    }

    /// The bytes the engine holds for `device`'s session (`None` without one), counted as
    /// [`CloudEngineConfig::session_state_bound`] bounds them.
    pub fn session_state_bytes(&self, device: &DeviceId) -> Option<usize> {
        let s = self.sessions.get(device)?;
        let id = std::mem::size_of::<DeviceId>() + device.account.len() + device.device.len();
        let opt = |c: &Option<SnapshotCursor>| c.as_ref().map_or(0, cursor_bytes);
        let mode = match &s.mode {
            Mode::Feed(f) => f.pages.capacity() * std::mem::size_of::<(u64, u64)>(),
            Mode::Snapshot(t) => {
                std::mem::size_of::<SnapTx>()
                    + t.pages.capacity() * std::mem::size_of::<SentPage>()
                    + t.pages.iter().map(|p| opt(&p.last)).sum::<usize>()
                    + opt(&t.acked)
                    + opt(&t.sent_to)
                    + t.reading.as_ref().map_or(0, opt)
            }
        };
        Some(
            std::mem::size_of::<Session>()
                + s.schema.len()
                + 2 * id
                + std::mem::size_of::<u64>()
                + s.pushes.capacity() * std::mem::size_of::<PushTaken>()
                + s.covered.capacity() * std::mem::size_of::<u64>()
                + s.answered_applied.capacity() * std::mem::size_of::<u64>()
                + mode,
        )
    }

    /// A message arrived on `from`'s up topic (the device is taken from the topic only).
    ///
    /// `wall_ms` is the cloud's wall time (ms since the Unix epoch), told to the device in a
    /// welcome; `now_ms` is the engine's (monotonic) time like every other input's.
    pub fn handle_message(&mut self, now_ms: u64, wall_ms: u64, from: &DeviceId, bytes: &[u8]) {
        let decoded = wire::decode_up(bytes, &self.cfg.wire);
        // A device's last word is always heard (else its session would outlive it); every other
        // message, undecodable ones included, takes a token of its rate first.
        let bye = matches!(&decoded, Ok(d) if d.msg == UpMsg::Bye);
        if !bye && !self.admit(now_ms, from) {
            return;
        }
        let max_push = self
            .cfg
            .max_push_changes
            .clamp(1, self.cfg.wire.max_changes.max(1));
        let refusal = match &decoded {
            Err(e) => Some((
                match e {
                    WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion {
                        supported: wire::PROTOCOL_VERSION,
                    },
                    WireError::TooLarge { .. } => ErrorCode::TooLarge,
                    WireError::TooManyChanges { .. } => ErrorCode::TooManyChanges {
                        max: max_push as u64,
                    },
                    WireError::Malformed { .. } | WireError::BadSchemaVersion { .. } => {
                        ErrorCode::Malformed
                    }
                },
                e.to_string(),
            )),
            Ok(d) => match &d.msg {
                UpMsg::Push { changes, .. } if changes.len() > max_push => Some((
                    ErrorCode::TooManyChanges {
                        max: max_push as u64,
                    },
                    format!(
                        "the push holds {} changes; the cloud takes at most {max_push} in one push",
                        changes.len()
                    ),
                )),
                _ => None,
            },
        };
        if let Some((code, message)) = refusal {
            self.stats.messages_refused += 1;
            self.transmit(from, &DownMsg::Error { code, message });
            return;
        }
        let Ok(decoded) = decoded else {
            return;
        };
        let sessionless = !self.sessions.contains_key(from)
            && !matches!(decoded.msg, UpMsg::Hello { .. } | UpMsg::Bye);
        if sessionless {
            self.stats.messages_without_session += 1;
        }
        match decoded.msg {
            UpMsg::Bye => self.handle_disconnected(now_ms, from),
            UpMsg::Hello {
                session,
                cursor,
                pending,
                mark,
            } => self.on_hello(
                now_ms,
                wall_ms,
                from,
                Hello {
                    session,
                    cursor,
                    pending,
                    mark,
                },
                decoded.schema,
            ),
            UpMsg::Push {
                batch,
                changes,
                session,
            } => {
                let max = self.cfg.max_pushes_in_progress;
                let Some(s) = self.sessions.get_mut(from) else {
                    self.prompt(now_ms, from, true);
                    return;
                };
                s.last_seen_ms = now_ms;
                if session.is_some_and(|p| p != s.session) {
                    // Sent before the device's current hello: applying it now would change what
                    // the welcome of this session said the cloud holds. The device requeued its
                    // changes when it started the session; they come again.
                    self.stats.pushes_of_ended_sessions += 1;
                    return;
                }
                // Copies (the device's timer fired while the cloud held the original) do not
                // reach the store: a change still in progress is dropped, since the original's
                // answer names key and version and so answers the copy too; a change answered
                // `applied` meanwhile (the copy queued behind its original) is answered again
                // from memory.
                let mut changes = changes;
                let mut again = Vec::new();
                if !s.covered.is_empty() || !s.answered_applied.is_empty() {
                    let before = changes.len();
                    changes.retain(|c| {
                        let f = fingerprint_of(c);
                        if s.covered.contains(&f) {
                            return false;
                        }
                        if s.answered_applied.contains(&f) {
                            again.push(ChangeResult {
                                model: c.model.clone(),
                                key: c.key.clone(),
                                version: c.version,
                                kept: None,
                                status: wire::ChangeStatus::Applied,
                            });
                            return false;
                        }
                        true
                    });
                    let skipped = (before - changes.len()) as u64;
                    self.stats.push_changes_reanswered += again.len() as u64;
                    self.stats.push_changes_covered += skipped - again.len() as u64;
                    if !again.is_empty() {
                        let (answered, session) = (s.answered, Some(s.session));
                        self.send_push_ack(from, batch, again, answered, session);
                    }
                    if skipped > 0 && changes.is_empty() {
                        self.stats.pushes_covered += 1;
                        return;
                    }
                }
                let Some(s) = self.sessions.get_mut(from) else {
                    return;
                };
                if s.pushes.len() >= max {
                    self.busy(now_ms, from, batch);
                    return;
                }
                let room = self.cfg.max_covered_changes.saturating_sub(s.covered.len());
                let fingerprints = changes.iter().take(room).map(fingerprint_of);
                let before = s.covered.len();
                // Exact, so the room never passes `max_covered_changes` (the session bound).
                s.covered.reserve_exact(changes.len().min(room));
                s.covered.extend(fingerprints);
                s.pushes.push_back(PushTaken {
                    taken_ms: now_ms,
                    covered: s.covered.len() - before,
                });
                // Agents from before version tags announce a bare `version`: they get the strict
                // check they were built for.
                let from_neighbour = s.schema != self.cfg.schema_version && s.schema.contains('+');
                self.actions.push_back(CloudAction::ApplyPush {
                    device: from.clone(),
                    batch,
                    changes,
                    from_neighbour,
                });
            }
            UpMsg::FeedAck { cursor } => {
                let Some(s) = self.sessions.get_mut(from) else {
                    self.prompt(now_ms, from, true);
                    return;
                };
                s.last_seen_ms = now_ms;
                let Mode::Feed(f) = &mut s.mode else {
                    return;
                };
                // An acknowledgement beyond what was sent names entries the device never
                // received (a hostile or broken device): believing it would stop the stream.
                if cursor > f.acked && cursor <= f.sent_to {
                    f.acked = cursor;
                    f.sent_to = f.sent_to.max(cursor);
                    f.head = f.head.max(cursor);
                    while f.pages.front().is_some_and(|(_, to)| *to <= cursor) {
                        f.pages.pop_front();
                    }
                    s.retries = 0;
                    let acked = f.acked;
                    let schema = s.schema.clone();
                    self.set_deadline(from, None);
                    self.refresh_deadline(now_ms, from);
                    self.actions.push_back(CloudAction::DeviceStatus {
                        device: from.clone(),
                        online: true,
                        schema_version: schema,
                        cursor_acked: Some(acked),
                        pending: None,
                        last_seen_ms: now_ms,
                    });
                }
                self.pump(now_ms, from);
            }
            UpMsg::SnapshotAck { resync, pos, done } => {
                let Some(s) = self.sessions.get_mut(from) else {
                    self.prompt(now_ms, from, true);
                    return;
                };
                s.last_seen_ms = now_ms;
                let Mode::Snapshot(t) = &mut s.mode else {
                    return;
                };
                if t.resync != resync {
                    return;
                }
                s.retries = 0;
                match (done, t.cursor) {
                    (true, Some(cursor)) => {
                        s.mode = Mode::Feed(FeedTx {
                            acked: cursor,
                            sent_to: cursor,
                            pages: VecDeque::new(),
                            reading: None,
                            head: cursor,
                            head_known: false,
                        });
                        // The device stored the resync cursor: record it, or its lag would
                        // show the whole feed until the next feed acknowledgement.
                        let schema = s.schema.clone();
                        self.actions.push_back(CloudAction::DeviceStatus {
                            device: from.clone(),
                            online: true,
                            schema_version: schema,
                            cursor_acked: Some(cursor),
                            pending: None,
                            last_seen_ms: now_ms,
                        });
                    }
                    _ => {
                        // Only a position no longer than those sent can be one of them: a longer
                        // one is not kept (see `longest_sent`).
                        let plausible = pos.as_ref().map_or(0, cursor_bytes) <= t.longest_sent;
                        if pos > t.acked && plausible {
                            t.acked = pos;
                        }
                        while t
                            .pages
                            .front()
                            .is_some_and(|p| !p.done && p.last <= t.acked)
                        {
                            t.pages.pop_front();
                        }
                        if t.sent_to < t.acked {
                            t.sent_to = t.acked.clone();
                        }
                    }
                }
                self.set_deadline(from, None);
                self.refresh_deadline(now_ms, from);
                self.pump(now_ms, from);
            }
        }
    }

    /// The device's connection dropped (broker presence or last will): forget its session.
    ///
    /// If the device had something unacknowledged (feed entries beyond its cursor, or a resync
    /// under way), it is also prompted to say hello: the disconnect may be a late will that
    /// arrived after the device's next hello, or a session dropped for silence while the device
    /// still listens. Prompts to a device that is really gone cost a few bounded publishes.
    pub fn handle_disconnected(&mut self, now_ms: u64, device: &DeviceId) {
        if let Some(mut s) = self.sessions.remove(device) {
            if let Some(d) = s.deadline {
                self.timers.remove(&(d, device.clone()));
            }
            self.report_throttled(device, &mut s.limiter);
            self.keep_spent(now_ms, device, s.limiter);
            let behind = match &s.mode {
                Mode::Feed(f) => !f.pages.is_empty() || f.reading.is_some() || f.head > f.acked,
                Mode::Snapshot(_) => true,
            };
            if behind {
                self.prompt(now_ms, device, false);
            }
            let cursor_acked = match &s.mode {
                Mode::Feed(f) => Some(f.acked),
                Mode::Snapshot(_) => None,
            };
            self.actions.push_back(CloudAction::DeviceStatus {
                device: device.clone(),
                online: false,
                schema_version: s.schema,
                cursor_acked,
                pending: None,
                last_seen_ms: now_ms,
            });
        }
    }

    /// The driver committed a push; send its results.
    pub fn handle_push_applied(
        &mut self,
        now_ms: u64,
        device: &DeviceId,
        batch: u64,
        results: Vec<ChangeResult>,
    ) {
        let _ = now_ms;
        let mut answered = None;
        let mut session = None;
        if let Some(s) = self.sessions.get_mut(device) {
            if let Some(p) = s.pushes.pop_front() {
                s.covered.drain(..p.covered.min(s.covered.len()));
                // An idle session keeps no room for a burst it had: memory per connected
                // device is what a fleet's cloud pays for.
                if s.covered.is_empty() && s.covered.capacity() > 16 {
                    s.covered = VecDeque::new();
                }
            }
            session = Some(s.session);
            if let Some(a) = &mut s.answered {
                *a = a.saturating_add(results.len() as u64);
                answered = Some(*a);
            }
        }
        if let (Some(s), Some(_)) = (self.sessions.get_mut(device), answered) {
            let keep = self.cfg.remembered_answers;
            for r in &results {
                if keep > 0 && r.status == wire::ChangeStatus::Applied {
                    if s.answered_applied.len() >= keep {
                        s.answered_applied.pop_front();
                    }
                    s.answered_applied
                        .push_back(change_fingerprint(&r.model, &r.key, r.version));
                }
            }
        }
        if answered.is_none() && !results.is_empty() {
            // Taken in an ended session: the count this push brought the store to is not known
            // here (the new session reads it), and an acknowledgement without it would let the
            // device drop changes a restore could lose unseen. Its changes are requeued on the
            // device and answered again as duplicates.
            self.stats.acks_dropped += 1;
            return;
        }
        self.send_push_ack(device, batch, results, answered, session);
    }

    /// Sends the results of push `batch`, split over as many acks as the size limit needs.
    fn send_push_ack(
        &mut self,
        device: &DeviceId,
        batch: u64,
        results: Vec<ChangeResult>,
        answered: Option<u64>,
        session: Option<u64>,
    ) {
        let overhead = wire::down_overhead(
            &self.cfg.schema_version,
            &DownMsg::PushAck {
                batch,
                results: vec![],
                answered: Some(u64::MAX),
                session: Some(u64::MAX),
            },
        );
        let mut budget = MessageBudget::new(
            overhead,
            self.cfg.wire.max_message_bytes,
            self.cfg.wire.max_changes,
        );
        let mut part: Vec<ChangeResult> = Vec::new();
        for r in results {
            let len = wire::result_len(&r);
            if budget.add(len) == Fit::Full {
                let msg = DownMsg::PushAck {
                    batch,
                    results: std::mem::take(&mut part),
                    answered,
                    session,
                };
                self.transmit(device, &msg);
                budget.reset();
                // Results are short (reasons are truncated), so one always fits an empty ack.
                let _ = budget.add(len);
            }
            part.push(r);
        }
        self.transmit(
            device,
            &DownMsg::PushAck {
                batch,
                results: part,
                answered,
                session,
            },
        );
    }

    /// The driver read a feed page.
    pub fn handle_feed_page(&mut self, now_ms: u64, device: &DeviceId, page: FeedPage) {
        let limit = self.cfg.feed_page_changes.max(1);
        let Some(s) = self.sessions.get_mut(device) else {
            return;
        };
        let Mode::Feed(f) = &mut s.mode else {
            return;
        };
        if f.reading != Some(page.after) {
            return;
        }
        f.reading = None;
        f.head_known = true;
        f.head = f.head.max(page.head);
        // Results reach the engine in the store's order, so this is the count the engine kept;
        // taking the higher one corrects a driver that lost a result.
        s.answered = Some(s.answered.map_or(page.answered, |a| a.max(page.answered)));
        // A cursor beyond the head: the cloud lost feed entries the device already applied
        // (restored from a backup); only a full resync brings the two back together.
        let mut restore = page.after > page.head;
        if s.welcome.is_none() {
            // The session's first read: what the store holds, read before any push of the
            // session, against what the device's hello says it heard from the cloud.
            let (feed_lost, pushes_lost) = match s.mark {
                Some(m) => (!page.holds(&m), m.answered > page.answered),
                None => (false, false),
            };
            restore |= feed_lost;
            let repush = restore || pushes_lost;
            s.welcome = Some((page.answered, repush));
            let (wall, at) = s.hello_clock;
            let welcome = DownMsg::Welcome {
                session: s.session,
                now_ms: wall.saturating_add(now_ms.saturating_sub(at)),
                max_drift_ms: self.cfg.max_drift_ms,
                answered: Some(page.answered),
                repush,
            };
            if repush {
                self.stats.restores_detected += 1;
            }
            self.transmit(device, &welcome);
        }
        let Some(s) = self.sessions.get_mut(device) else {
            return;
        };
        let session = s.session;
        let gen = page.gen();
        let read_head = page.head;
        if page.resync_required || restore {
            self.stats.resyncs_started += 1;
            let resync = self.rng.next() >> 11;
            s.mode = Mode::Snapshot(Box::new(SnapTx {
                resync,
                cursor: None,
                acked: None,
                sent_to: None,
                finished: false,
                pages: VecDeque::new(),
                reading: None,
                longest_sent: 0,
                restore,
            }));
            self.pump(now_ms, device);
            return;
        }
        let Mode::Feed(f) = &mut s.mode else {
            return;
        };
        // The store read `limit` entries when it returned that many, readable or not; only a
        // short read reached the head.
        let full = page.changes.len() + page.unreadable.len() >= limit;
        let overhead = wire::down_overhead(
            &self.cfg.schema_version,
            &DownMsg::Feed {
                from: page.after,
                to: u64::MAX,
                changes: vec![],
                session: Some(u64::MAX),
                gen: Some(u64::MAX),
                seen: Some(u64::MAX),
            },
        );
        let max = self.cfg.wire.max_message_bytes;
        let mut budget = MessageBudget::new(overhead, max, self.cfg.wire.max_changes);
        let mut to = page.after;
        let mut changes = Vec::new();
        let mut truncated = false;
        let mut unsendable = Vec::new();
        // Unreadable rows are skipped like oversize ones, but only those the page covers: an
        // unreadable row past a truncation is met again by the next read.
        let mut unreadable = page.unreadable;
        unreadable.sort_by_key(|u| u.cursor);
        let mut unreadable = unreadable.into_iter().peekable();
        for (cursor, change) in page.changes {
            while let Some(u) = unreadable.next_if(|u| u.cursor < cursor) {
                to = to.max(u.cursor);
                unsendable.push((u.model, u.key, u.reason));
            }
            let len = wire::change_len(&change);
            match budget.add(len) {
                Fit::Never => {
                    unsendable.push((change.model, change.key, too_large_reason(len, max)));
                    to = to.max(cursor);
                    continue;
                }
                Fit::Full => {
                    truncated = true;
                    break;
                }
                Fit::Added => {}
            }
            to = to.max(cursor);
            changes.push(change);
        }
        if !truncated {
            for u in unreadable {
                to = to.max(u.cursor);
                unsendable.push((u.model, u.key, u.reason));
            }
        }
        if !full && !truncated {
            to = to.max(page.head);
        }
        if to > page.after {
            f.sent_to = to;
            f.pages.push_back((page.after, to));
            let msg = DownMsg::Feed {
                from: page.after,
                to,
                changes,
                session: Some(session),
                gen: Some(gen),
                seen: Some(read_head),
            };
            self.transmit(device, &msg);
        }
        self.finish_page(now_ms, device, unsendable);
    }

    /// The driver read a snapshot page.
    pub fn handle_snapshot_page(&mut self, now_ms: u64, device: &DeviceId, page: SnapshotPage) {
        let Some(s) = self.sessions.get_mut(device) else {
            return;
        };
        let Mode::Snapshot(t) = &mut s.mode else {
            return;
        };
        let Some(after) = t.reading.clone() else {
            return;
        };
        if t.resync != page.resync {
            return;
        }
        t.reading = None;
        let cursor = *t.cursor.get_or_insert(page.cursor);
        // The `last` field names one of the page's keys; reserve room for the longest.
        let cursor_len = |model: &str, key: &ItemKey| {
            wire::cursor_len(&SnapshotCursor {
                model: model.to_string(),
                key: key.clone(),
            })
        };
        let reserve = page
            .items
            .iter()
            .map(|i| cursor_len(&i.model, &i.key))
            .chain(page.next.iter().map(|c| cursor_len(&c.model, &c.key)))
            .max()
            .unwrap_or(0)
            + 16;
        let overhead = wire::down_overhead(
            &self.cfg.schema_version,
            &DownMsg::Snapshot {
                resync: t.resync,
                session: Some(u64::MAX),
                after: after.clone(),
                last: None,
                items: vec![],
                done: false,
                cursor,
                gen: Some(u64::MAX),
                seen: Some(u64::MAX),
                restore: t.restore,
            },
        ) + reserve;
        let max = self.cfg.wire.max_message_bytes;
        let mut budget = MessageBudget::new(overhead, max, self.cfg.wire.max_changes);
        let mut items = Vec::new();
        let mut last: Option<SnapshotCursor> = after.clone();
        let mut truncated = false;
        // Unreadable rows of a snapshot page are reported; the page's range moves past them
        // through `next` (the store read past them).
        let mut unsendable: Vec<(String, ItemKey, String)> = page
            .unreadable
            .into_iter()
            .map(|u| (u.model, u.key, u.reason))
            .collect();
        for item in page.items {
            let len = wire::change_len(&item);
            match budget.add(len) {
                Fit::Never => {
                    last = Some(SnapshotCursor {
                        model: item.model.clone(),
                        key: item.key.clone(),
                    });
                    unsendable.push((item.model, item.key, too_large_reason(len, max)));
                    continue;
                }
                Fit::Full => {
                    truncated = true;
                    break;
                }
                Fit::Added => {}
            }
            last = Some(SnapshotCursor {
                model: item.model.clone(),
                key: item.key.clone(),
            });
            items.push(item);
        }
        let done = page.next.is_none() && !truncated;
        let last = if truncated { last } else { page.next.or(last) };
        t.longest_sent = t.longest_sent.max(last.as_ref().map_or(0, cursor_bytes));
        t.pages.push_back(SentPage {
            last: last.clone(),
            done,
        });
        t.sent_to = last.clone();
        t.finished = done;
        let msg = DownMsg::Snapshot {
            resync: t.resync,
            session: Some(s.session),
            after,
            last,
            items,
            done,
            cursor,
            gen: Some(page.gen),
            seen: Some(page.cursor),
            restore: t.restore,
        };
        self.transmit(device, &msg);
        self.finish_page(now_ms, device, unsendable);
    }

    /// After a page went out: report skipped rows, re-arm the timer, send more.
    fn finish_page(
        &mut self,
        now_ms: u64,
        device: &DeviceId,
        unsendable: Vec<(String, ItemKey, String)>,
    ) {
        for (model, key, reason) in unsendable {
            self.actions.push_back(CloudAction::Unsendable {
                device: device.clone(),
                model,
                key,
                reason,
            });
        }
        self.refresh_deadline(now_ms, device);
        self.pump(now_ms, device);
    }

    /// A committed write appended to the device's feed; `head` is its new head.
    pub fn handle_feed_advanced(&mut self, now_ms: u64, device: &DeviceId, head: u64) {
        match self.sessions.get_mut(device) {
            Some(s) => {
                if let Mode::Feed(f) = &mut s.mode {
                    f.head = f.head.max(head);
                }
                self.pump(now_ms, device);
            }
            None => self.prompt(now_ms, device, false),
        }
    }

    /// Time passed; call when [`poll_timeout`](Self::poll_timeout) is reached.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        while let Some((deadline, device)) = self.timers.first().cloned() {
            if deadline > now_ms {
                break;
            }
            self.timers.remove(&(deadline, device.clone()));
            let max_retries = self.cfg.max_page_retries;
            let Some(s) = self.sessions.get_mut(&device) else {
                continue;
            };
            s.deadline = None;
            s.retries = s.retries.saturating_add(1);
            if s.retries > max_retries {
                // The device stopped answering: drop its session rather than resend forever.
                self.handle_disconnected(now_ms, &device);
                continue;
            }
            // Rewind to what the device acknowledged and stream again from there.
            match &mut s.mode {
                Mode::Feed(f) => {
                    f.pages.clear();
                    f.sent_to = f.acked;
                    f.reading = None;
                }
                Mode::Snapshot(t) => {
                    t.sent_to = t.acked.clone();
                    t.pages.clear();
                    t.finished = false;
                    t.reading = None;
                }
            }
            self.pump(now_ms, &device);
        }
        self.repeat_prompts(now_ms);
        self.expire_spent(now_ms);
    }

    /// Next work for the driver.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<CloudAction> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, in ms.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        [
            self.timers.first(),
            self.prompt_timers.first(),
            self.spent_timers.first(),
        ]
        .into_iter()
        .flatten()
        .map(|(d, _)| *d)
        .min()
    }

    fn transmit(&mut self, device: &DeviceId, msg: &DownMsg) {
        // Pages and acks are cut to fit above, so encoding cannot fail; if it ever did, dropping
        // the message is the same as losing it, and the timers recover.
        if let Ok(bytes) = wire::encode_down(&self.cfg.schema_version, msg, &self.cfg.wire) {
            self.actions.push_back(CloudAction::Transmit {
                device: device.clone(),
                bytes,
            });
        }
    }

    /// Ask a device without a session to say hello. The prompt is repeated every
    /// `prompt_interval_ms` (it may be lost) until the device says hello, at most
    /// `max_page_retries` times. `replying` answers a message of the device: it is sent unless
    /// another reply went to the device less than the rate-limit retry interval ago (one
    /// suffices; a flood of session-less messages gets a bounded number of answers).
    fn prompt(&mut self, now_ms: u64, device: &DeviceId, replying: bool) {
        let interval = self.cfg.prompt_interval_ms.max(1);
        let gap = self.rate_retry_ms();
        let tracked = self.prompted.get(device).copied();
        match tracked {
            Some(_) if !replying => return,
            Some((_, _, quiet_until)) if now_ms < quiet_until => return,
            _ => {}
        }
        let msg = DownMsg::Error {
            code: ErrorCode::NoSession,
            message: "no session: send hello".to_string(),
        };
        self.transmit(device, &msg);
        let quiet_until = if replying {
            now_ms.saturating_add(gap)
        } else {
            0
        };
        match tracked {
            Some((next, tries, _)) => {
                self.prompted
                    .insert(device.clone(), (next, tries, quiet_until));
            }
            None if self.prompted.len() < self.cfg.max_sessions => {
                let next = now_ms.saturating_add(interval);
                self.prompted.insert(device.clone(), (next, 1, quiet_until));
                self.prompt_timers.insert((next, device.clone()));
            }
            None => {}
        }
    }

    /// How long a rate-limited device waits: the time its bucket takes to refill half its burst.
    fn rate_retry_ms(&self) -> u64 {
        let limit = self.cfg.device_rate;
        limit.refill_ms(limit.burst / 2)
    }

    /// Takes a token of `device`'s message rate (its session's bucket, or the bucket its last
    /// session left); `false` when it has none: the message is not processed, counted, and
    /// answered [`ErrorCode::RateLimited`] at most once per retry interval. A device with no
    /// session and no spent bucket is admitted (its first message since a quiet time).
    fn admit(&mut self, now_ms: u64, device: &DeviceId) -> bool {
        let limit = self.cfg.device_rate;
        if !limit.is_limited() {
            // Busy refusals may wait to be reported.
            if let Some(mut l) = self.sessions.get(device).map(|s| s.limiter) {
                if l.unreported != Unreported::default() {
                    self.report_throttled(device, &mut l);
                    if let Some(s) = self.sessions.get_mut(device) {
                        s.limiter = l;
                    }
                }
            }
            return true;
        }
        let retry = self.rate_retry_ms();
        let mut spent = None;
        let limiter = match self.sessions.get_mut(device) {
            Some(s) => &mut s.limiter,
            None => match self.spent.get_mut(device) {
                Some((l, full_at)) => {
                    spent = Some(*full_at);
                    l
                }
                None => return true,
            },
        };
        let mut l = *limiter;
        let admitted = l.bucket.take(&limit, now_ms).is_ok();
        let mut reply = false;
        if !admitted {
            self.stats.rate_limited += 1;
            l.unreported.rate_limited += 1;
            if now_ms >= l.next_rate_reply {
                l.next_rate_reply = now_ms.saturating_add(retry);
                reply = true;
            }
        }
        // Report what was refused when it is answered, or once the device is back within its
        // rate (its next accepted message).
        if reply || admitted {
            self.report_throttled(device, &mut l);
        }
        match spent {
            None => {
                if let Some(s) = self.sessions.get_mut(device) {
                    s.limiter = l;
                }
            }
            Some(old) => {
                // The spent bucket is full again later now.
                let full_at = now_ms.saturating_add(l.bucket.full_in_ms(&limit, now_ms));
                self.spent_timers.remove(&(old, device.clone()));
                self.spent_timers.insert((full_at, device.clone()));
                self.spent.insert(device.clone(), (l, full_at));
            }
        }
        if reply {
            let msg = DownMsg::Error {
                code: ErrorCode::RateLimited {
                    retry_after_ms: retry,
                },
                message: format!(
                    "over the message rate of {} a second (burst {}): send nothing for {retry} ms",
                    limit.per_sec, limit.burst
                ),
            };
            self.transmit(device, &msg);
        }
        admitted
    }

    /// A push beyond `max_pushes_in_progress`: counted, and answered [`ErrorCode::Busy`] (naming
    /// `batch`) at most once per retry interval: the longer of `busy_retry_ms` and the wait of
    /// the device's oldest push in progress, which is about when a slot frees.
    fn busy(&mut self, now_ms: u64, device: &DeviceId, batch: u64) {
        let Some(s) = self.sessions.get_mut(device) else {
            return;
        };
        let waited = s
            .pushes
            .front()
            .map_or(0, |p| now_ms.saturating_sub(p.taken_ms));
        let retry = waited
            .min(self.cfg.ack_timeout_max_ms)
            .max(self.cfg.busy_retry_ms)
            .max(1);
        self.stats.pushes_busy += 1;
        let mut l = s.limiter;
        l.unreported.busy += 1;
        if now_ms < l.next_busy_reply {
            s.limiter = l;
            return;
        }
        l.next_busy_reply = now_ms.saturating_add(retry);
        self.report_throttled(device, &mut l);
        if let Some(s) = self.sessions.get_mut(device) {
            s.limiter = l;
        }
        let msg = DownMsg::Error {
            code: ErrorCode::Busy {
                retry_after_ms: retry,
                batch: Some(batch),
            },
            message: format!(
                "{} pushes of this device are being applied: push batch {batch} again in {retry} ms",
                self.cfg.max_pushes_in_progress
            ),
        };
        self.transmit(device, &msg);
    }

    /// Hands the device's unreported refusals to the driver.
    fn report_throttled(&mut self, device: &DeviceId, l: &mut Limiter) {
        let u = std::mem::take(&mut l.unreported);
        if u != Unreported::default() {
            self.actions.push_back(CloudAction::Throttled {
                device: device.clone(),
                rate_limited: u.rate_limited,
                busy: u.busy,
            });
        }
    }

    /// Keeps the limiter of an ended session until its bucket is full again (if there is room).
    fn keep_spent(&mut self, now_ms: u64, device: &DeviceId, mut l: Limiter) {
        let limit = self.cfg.device_rate;
        let full_in = l.bucket.full_in_ms(&limit, now_ms);
        if !limit.is_limited() || full_in == 0 || self.spent.len() >= self.cfg.max_sessions {
            return;
        }
        l.next_busy_reply = 0;
        let full_at = now_ms.saturating_add(full_in);
        if let Some((_, old)) = self.spent.insert(device.clone(), (l, full_at)) {
            self.spent_timers.remove(&(old, device.clone()));
        }
        self.spent_timers.insert((full_at, device.clone()));
    }

    /// Forgets spent limiters that are full again.
    fn expire_spent(&mut self, now_ms: u64) {
        while let Some((at, device)) = self.spent_timers.first().cloned() {
            if at > now_ms {
                break;
            }
            self.spent_timers.remove(&(at, device.clone()));
            self.spent.remove(&device);
        }
    }

    /// Repeat due prompts.
    fn repeat_prompts(&mut self, now_ms: u64) {
        let interval = self.cfg.prompt_interval_ms.max(1);
        while let Some((at, device)) = self.prompt_timers.first().cloned() {
            if at > now_ms {
                break;
            }
            self.prompt_timers.remove(&(at, device.clone()));
            let Some((_, tries, quiet_until)) = self.prompted.remove(&device) else {
                continue;
            };
            if tries > self.cfg.max_page_retries {
                continue;
            }
            let msg = DownMsg::Error {
                code: ErrorCode::NoSession,
                message: "no session: send hello".to_string(),
            };
            self.transmit(&device, &msg);
            let next = now_ms.saturating_add(interval);
            self.prompted
                .insert(device.clone(), (next, tries + 1, quiet_until));
            self.prompt_timers.insert((next, device));
        }
    }

    fn forget_prompt(&mut self, device: &DeviceId) {
        if let Some((at, _, _)) = self.prompted.remove(device) {
            self.prompt_timers.remove(&(at, device.clone()));
        }
    }

    fn on_hello(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        from: &DeviceId,
        hello: Hello,
        schema: String,
    ) {
        let Hello {
            session,
            cursor,
            pending,
            mark,
        } = hello;
        if !self.sessions.contains_key(from) && self.sessions.len() >= self.cfg.max_sessions {
            let msg = DownMsg::Error {
                code: ErrorCode::TooManySessions,
                message: "the cloud tracks too many sessions: retry later".to_string(),
            };
            self.transmit(from, &msg);
            return;
        }
        self.forget_prompt(from);
        if let Some(s) = self.sessions.get_mut(from) {
            if s.session == session {
                // A resent hello (our welcome was lost, or the network duplicated it): answer
                // again without restarting the stream, which would race with pages in flight.
                // Before the session's first feed read there is no welcome yet: it goes out
                // with the read.
                s.last_seen_ms = now_ms;
                if let Some((answered, repush)) = s.welcome {
                    let welcome = DownMsg::Welcome {
                        session,
                        now_ms: wall_ms,
                        max_drift_ms: self.cfg.max_drift_ms,
                        answered: Some(answered),
                        repush,
                    };
                    self.transmit(from, &welcome);
                }
                return;
            }
        }
        // The old session's pushes are still answered in order, but their answers are not sent
        // (`acks_dropped`): they cover no copy of the new session, whose changes the device
        // requeued when it started it.
        let pushes: VecDeque<PushTaken> = self
            .sessions
            .get_mut(from)
            .map(|s| std::mem::take(&mut s.pushes))
            .unwrap_or_default()
            .into_iter()
            .map(|p| PushTaken { covered: 0, ..p })
            .collect();
        // The rate carries over a new session: the old one's, or the one its last session
        // left (this hello took a token of it already), or a fresh bucket less this hello.
        let limit = self.cfg.device_rate;
        let limiter = match self.sessions.get(from) {
            Some(s) => s.limiter,
            None => match self.spent.remove(from) {
                Some((l, full_at)) => {
                    self.spent_timers.remove(&(full_at, from.clone()));
                    l
                }
                None => {
                    let mut l = Limiter::new(&limit, now_ms);
                    let _ = l.bucket.take(&limit, now_ms);
                    l
                }
            },
        };
        self.set_deadline(from, None);
        self.sessions.insert(
            from.clone(),
            Session {
                session,
                schema: schema.clone(),
                last_seen_ms: now_ms,
                pushes,
                covered: VecDeque::new(),
                answered_applied: VecDeque::new(),
                limiter,
                mode: Mode::Feed(FeedTx {
                    acked: cursor,
                    sent_to: cursor,
                    pages: VecDeque::new(),
                    reading: None,
                    head: cursor,
                    head_known: false,
                }),
                deadline: None,
                retries: 0,
                mark,
                welcome: None,
                answered: None,
                hello_clock: (wall_ms, now_ms),
            },
        );
        // The welcome waits for the feed read `pump` issues now: it tells what the store holds
        // for the device before any push of this session is applied (see `handle_feed_page`).
        self.actions.push_back(CloudAction::DeviceStatus {
            device: from.clone(),
            online: true,
            schema_version: schema,
            cursor_acked: Some(cursor),
            pending: Some(pending),
            last_seen_ms: now_ms,
        });
        self.pump(now_ms, from);
    }

    /// Issue the next read if the window allows one.
    fn pump(&mut self, now_ms: u64, device: &DeviceId) {
        let window = self.cfg.feed_window.max(1);
        let Some(s) = self.sessions.get_mut(device) else {
            return;
        };
        let action = match &mut s.mode {
            Mode::Feed(f) => {
                if f.reading.is_none()
                    && f.pages.len() < window
                    && (!f.head_known || f.head > f.sent_to)
                {
                    f.reading = Some(f.sent_to);
                    Some(CloudAction::ReadFeed {
                        device: device.clone(),
                        after: f.sent_to,
                        limit: self.cfg.feed_page_changes.max(1),
                    })
                } else {
                    None
                }
            }
            Mode::Snapshot(t) => {
                if t.reading.is_none() && t.pages.len() < window && !t.finished {
                    t.reading = Some(t.sent_to.clone());
                    Some(CloudAction::ReadSnapshot {
                        device: device.clone(),
                        resync: t.resync,
                        from: t.sent_to.clone(),
                        limit: self.cfg.snapshot_page_items.max(1),
                    })
                } else {
                    None
                }
            }
        };
        if let Some(a) = action {
            self.actions.push_back(a);
            self.refresh_deadline(now_ms, device);
        }
    }

    /// Arm the session timer if something is outstanding and it is not armed; disarm it if
    /// nothing is.
    fn refresh_deadline(&mut self, now_ms: u64, device: &DeviceId) {
        let Some(s) = self.sessions.get(device) else {
            return;
        };
        let outstanding = match &s.mode {
            Mode::Feed(f) => !f.pages.is_empty() || f.reading.is_some(),
            Mode::Snapshot(t) => !t.pages.is_empty() || t.reading.is_some(),
        };
        if !outstanding {
            self.set_deadline(device, None);
        } else if s.deadline.is_none() {
            let retries = s.retries;
            let t = self.timeout(retries);
            self.set_deadline(device, Some(now_ms.saturating_add(t)));
        }
    }

    fn timeout(&mut self, retries: u32) -> u64 {
        let base = self.cfg.ack_timeout_ms.max(1);
        let max = self.cfg.ack_timeout_max_ms.max(base);
        let t = base.saturating_mul(1u64 << retries.min(20)).min(max);
        (t + self.rng.next() % (t / 4 + 1)).min(max)
    }

    fn set_deadline(&mut self, device: &DeviceId, deadline: Option<u64>) {
        let Some(s) = self.sessions.get_mut(device) else {
            return;
        };
        if let Some(old) = s.deadline.take() {
            self.timers.remove(&(old, device.clone()));
        }
        if let Some(d) = deadline {
            s.deadline = Some(d);
            self.timers.insert((d, device.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::wire::Op;

    fn dev() -> DeviceId {
        DeviceId::new("acme", "d0").unwrap()
    }

    fn outputs(c: &mut CloudEngine) -> (Vec<DownMsg>, Vec<CloudAction>) {
        let (mut msgs, mut actions) = (Vec::new(), Vec::new());
        while let Some(a) = c.poll_action() {
            match a {
                CloudAction::Transmit { bytes, .. } => msgs.push(
                    wire::decode_down(&bytes, &WireConfig::default())
                        .unwrap()
                        .msg,
                ),
                other => actions.push(other),
            }
        }
        (msgs, actions)
    }

    fn hello(c: &mut CloudEngine, cursor: u64) -> (Vec<DownMsg>, Vec<CloudAction>) {
        let bytes = wire::encode_up(
            "1",
            &UpMsg::Hello {
                session: 9,
                cursor,
                pending: 0,
                mark: None,
            },
            &WireConfig::default(),
        )
        .unwrap();
        c.handle_message(5, 1_700_000_000_000, &dev(), &bytes);
        outputs(c)
    }

    fn delete(name: &str, v: u64) -> Change {
        Change {
            model: "M".into(),
            key: ItemKey {
                pk: "p".into(),
                sk: name.into(),
            },
            op: Op::Delete,
            item: None,
            version: Hlc {
                wall_ms: v,
                counter: 0,
                node: 1,
            },
            base: None,
        }
    }

    fn send(c: &mut CloudEngine, now: u64, msg: &UpMsg) -> (Vec<DownMsg>, Vec<CloudAction>) {
        let bytes = wire::encode_up("1", msg, &WireConfig::default()).unwrap();
        c.handle_message(now, 1_700_000_000_000, &dev(), &bytes);
        outputs(c)
    }

    /// A push of `n` changes of its own (keys named after the batch).
    fn push(batch: u64, n: usize) -> UpMsg {
        UpMsg::Push {
            batch,
            changes: (0..n)
                .map(|i| delete(&format!("b{batch}k{i}"), 1))
                .collect(),
            session: None,
        }
    }

    fn push_of(batch: u64, changes: &[(&str, u64)]) -> UpMsg {
        UpMsg::Push {
            batch,
            changes: changes.iter().map(|(k, v)| delete(k, *v)).collect(),
            session: None,
        }
    }

    /// The store's answer to the first feed read of a new device: nothing, with the count of
    /// its pushed changes it answered.
    fn first_page(answered: u64) -> FeedPage {
        FeedPage {
            after: 0,
            changes: vec![],
            head: 0,
            resync_required: false,
            unreadable: vec![],
            generations: vec![],
            answered,
        }
    }

    /// A session past its welcome (its first feed read answered): its pushes are answered.
    fn welcomed(c: &mut CloudEngine) {
        hello(c, 0);
        c.handle_feed_page(6, &dev(), first_page(0));
        outputs(c);
    }

    /// The store's `applied` for change `name` at version `v` (of [`push_of`]).
    fn applied(name: &str, v: u64) -> ChangeResult {
        ChangeResult {
            model: "M".into(),
            key: ItemKey {
                pk: "p".into(),
                sk: name.into(),
            },
            version: Hlc {
                wall_ms: v,
                counter: 0,
                node: 1,
            },
            kept: None,
            status: wire::ChangeStatus::Applied,
        }
    }

    /// The changes of the pushes handed to the driver, by batch.
    fn taken(a: &[CloudAction]) -> Vec<(u64, Vec<String>)> {
        a.iter()
            .filter_map(|a| match a {
                CloudAction::ApplyPush { batch, changes, .. } => Some((
                    *batch,
                    changes
                        .iter()
                        .map(|c| format!("{}@{}", c.key.sk, c.version.wall_ms))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_copy_of_changes_still_being_applied_is_not_applied_again() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            device_rate: RateLimit::UNLIMITED,
            ..CloudEngineConfig::default()
        });
        welcomed(&mut c);
        let (_, a) = send(&mut c, 10, &push_of(1, &[("a", 1), ("b", 1)]));
        assert_eq!(taken(&a), vec![(1, vec!["a@1".into(), "b@1".into()])]);
        // The device's timer fired while the store held batch 1: the same changes in batch 2.
        let (m, a) = send(&mut c, 20, &push_of(2, &[("b", 1), ("a", 1)]));
        assert!(m.is_empty() && a.is_empty(), "{m:?} {a:?}");
        assert_eq!(c.stats().push_changes_covered, 2);
        assert_eq!(c.stats().pushes_covered, 1);
        // A copy merged with new work: only the new work is taken; so is a newer version.
        let (_, a) = send(&mut c, 30, &push_of(3, &[("a", 1), ("c", 1), ("b", 2)]));
        assert_eq!(taken(&a), vec![(3, vec!["c@1".into(), "b@2".into()])]);
        assert_eq!(c.stats().push_changes_covered, 3);
        assert_eq!(c.stats().pushes_covered, 1);
        // Batch 1 answered: its changes are no longer in progress.
        c.handle_push_applied(40, &dev(), 1, vec![applied("a", 1), applied("b", 1)]);
        outputs(&mut c);
        // A copy that queued behind its original (answered meanwhile) is answered again from
        // memory, with no store job; c@1 is still in progress in batch 3.
        let (m, a) = send(&mut c, 50, &push_of(4, &[("a", 1), ("c", 1)]));
        assert!(taken(&a).is_empty(), "{a:?}");
        let [DownMsg::PushAck {
            batch: 4,
            results,
            answered: Some(_),
            ..
        }] = &m[..]
        else {
            panic!("{m:?}")
        };
        assert_eq!(results, &vec![applied("a", 1)]);
        assert_eq!(c.stats().push_changes_reanswered, 1);
        assert_eq!(c.stats().pushes_covered, 2);
        // A new session: the pushes of the old one are answered to nobody, so they cover
        // nothing the device sends again.
        c.handle_push_applied(60, &dev(), 3, vec![applied("c", 1)]);
        let bytes = wire::encode_up(
            "1",
            &UpMsg::Hello {
                session: 10,
                cursor: 0,
                pending: 0,
                mark: None,
            },
            &WireConfig::default(),
        )
        .unwrap();
        c.handle_message(70, 1_700_000_000_000, &dev(), &bytes);
        outputs(&mut c);
        let (_, a) = send(&mut c, 80, &push_of(5, &[("a", 1)]));
        assert_eq!(taken(&a), vec![(5, vec!["a@1".into()])]);
        assert_eq!(c.stats().push_changes_covered, 4);
        assert_eq!(c.stats().push_changes_reanswered, 1);
    }

    #[test]
    fn the_last_answers_are_remembered_up_to_the_configured_number() {
        for remembered in [0, 2] {
            let mut c = CloudEngine::new(CloudEngineConfig {
                device_rate: RateLimit::UNLIMITED,
                remembered_answers: remembered,
                ..CloudEngineConfig::default()
            });
            welcomed(&mut c);
            for (batch, name) in [(1, "a"), (2, "b"), (3, "c")] {
                send(&mut c, 10, &push_of(batch, &[(name, 1)]));
                c.handle_push_applied(11, &dev(), batch, vec![applied(name, 1)]);
                outputs(&mut c);
            }
            // Copies of all three: the last `remembered` are answered from memory.
            let (_, a) = send(&mut c, 20, &push_of(4, &[("a", 1), ("b", 1), ("c", 1)]));
            let expected: Vec<String> = ["a@1", "b@1", "c@1"][..3 - remembered]
                .iter()
                .map(|s| s.to_string())
                .collect();
            assert_eq!(taken(&a), vec![(4, expected)], "remembering {remembered}");
            assert_eq!(c.stats().push_changes_reanswered, remembered as u64);
        }
    }

    #[test]
    fn copies_are_recognised_up_to_the_configured_number_of_changes_in_progress() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            device_rate: RateLimit::UNLIMITED,
            max_covered_changes: 2,
            ..CloudEngineConfig::default()
        });
        hello(&mut c, 0);
        send(&mut c, 10, &push_of(1, &[("a", 1), ("b", 1), ("c", 1)]));
        let (_, a) = send(&mut c, 20, &push_of(2, &[("a", 1), ("b", 1), ("c", 1)]));
        assert_eq!(
            taken(&a),
            vec![(2, vec!["c@1".into()])],
            "beyond the bound a copy is a replay"
        );
        assert_eq!(c.stats().push_changes_covered, 2);
        assert!(c.session_state_bytes(&dev()).unwrap() <= c.cfg.session_state_bound(0));
    }

    fn throttled(a: &[CloudAction]) -> Vec<(u64, u64)> {
        a.iter()
            .filter_map(|a| match a {
                CloudAction::Throttled {
                    rate_limited, busy, ..
                } => Some((*rate_limited, *busy)),
                _ => None,
            })
            .collect()
    }

    fn limited(per_sec: u32, burst: u32) -> CloudEngine {
        CloudEngine::new(CloudEngineConfig {
            device_rate: RateLimit { per_sec, burst },
            ..CloudEngineConfig::default()
        })
    }

    #[test]
    fn released_devices_lose_their_session_and_prompts_without_a_status() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        let kept = DeviceId::new("acme", "kept").unwrap();
        let moved = DeviceId::new("acme", "moved").unwrap();
        let say = |c: &mut CloudEngine, now: u64, d: &DeviceId, msg: &UpMsg| {
            let bytes = wire::encode_up("1", msg, &WireConfig::default()).unwrap();
            c.handle_message(now, 1_700_000_000_000, d, &bytes);
        };
        let hello = UpMsg::Hello {
            session: 1,
            cursor: 0,
            pending: 0,
            mark: None,
        };
        say(&mut c, 0, &kept, &hello);
        say(&mut c, 0, &moved, &hello);
        outputs(&mut c);
        assert_eq!(c.sessions(), 2);
        assert_eq!(c.release_devices(|d| d == &kept), 1);
        assert_eq!(c.sessions(), 1);
        // No status record (the device did not leave) and nothing sent.
        assert!(c.poll_action().is_none());
        // The moved device's next push is answered with a prompt, as after any lost session.
        say(&mut c, 10, &moved, &push(2, 1));
        let (msgs, _) = outputs(&mut c);
        assert!(
            msgs.iter().any(|m| matches!(
                m,
                DownMsg::Error {
                    code: ErrorCode::NoSession,
                    ..
                }
            )),
            "{msgs:?}"
        );
    }

    #[test]
    fn a_flood_is_not_processed_and_refused_once_per_interval_with_counts() {
        // 10 a second, burst 4: the hello takes one token, three acknowledgements pass.
        let mut c = limited(10, 4);
        hello(&mut c, 0);
        let mut replies = Vec::new();
        let mut actions = Vec::new();
        for _ in 0..20 {
            let (m, a) = send(&mut c, 10, &UpMsg::FeedAck { cursor: 0 });
            replies.extend(m);
            actions.extend(a);
        }
        assert_eq!(
            replies,
            vec![DownMsg::Error {
                code: ErrorCode::RateLimited {
                    retry_after_ms: 200
                },
                message: "over the message rate of 10 a second (burst 4): send nothing for 200 ms"
                    .into()
            }],
            "one refusal for the whole flood: the time to refill half the burst"
        );
        assert_eq!(throttled(&actions), vec![(1, 0)], "reported with the reply");
        assert_eq!(c.stats().rate_limited, 17);
        // Over the rate, even a push is not processed (the device resends it).
        let (m, a) = send(&mut c, 100, &push(1, 1));
        assert!(m.is_empty() && a.is_empty(), "{m:?} {a:?}");
        // After the interval the device is back within its rate: the push applies, and the
        // refusals not yet reported are.
        let (m, a) = send(&mut c, 210, &push(2, 1));
        assert!(m.is_empty(), "{m:?}");
        assert_eq!(throttled(&a), vec![(17, 0)]);
        assert!(a
            .iter()
            .any(|a| matches!(a, CloudAction::ApplyPush { batch: 2, .. })));
        assert_eq!(c.stats().rate_limited, 18);
    }

    #[test]
    fn the_bye_is_always_heard_and_a_reconnect_does_not_refill_the_bucket() {
        let mut c = limited(10, 4);
        hello(&mut c, 0);
        for _ in 0..3 {
            send(&mut c, 10, &UpMsg::FeedAck { cursor: 0 });
        }
        // Out of tokens, yet the last will ends the session.
        let (_, a) = send(&mut c, 10, &UpMsg::Bye);
        assert!(a
            .iter()
            .any(|a| matches!(a, CloudAction::DeviceStatus { online: false, .. })));
        assert_eq!(c.sessions(), 0);
        // A new hello at once finds the spent bucket: refused, no session.
        let hello2 = UpMsg::Hello {
            session: 10,
            cursor: 0,
            pending: 0,
            mark: None,
        };
        let (m, _) = send(&mut c, 11, &hello2);
        assert!(
            matches!(
                m.as_slice(),
                [DownMsg::Error {
                    code: ErrorCode::RateLimited { .. },
                    ..
                }]
            ),
            "{m:?}"
        );
        assert_eq!(c.sessions(), 0);
        // Once a token is back the hello is taken (its welcome follows the feed read); the
        // spent bucket is forgotten when full.
        let (m, a) = send(&mut c, 111, &hello2);
        assert!(m.is_empty(), "{m:?}");
        assert!(
            a.iter()
                .any(|a| matches!(a, CloudAction::ReadFeed { after: 0, .. })),
            "{a:?}"
        );
        assert_eq!(c.sessions(), 1);
        send(&mut c, 112, &UpMsg::Bye);
        assert_eq!(c.spent_timers.len(), 1, "the spent bucket has a timer");
        c.handle_timeout(10_000);
        assert!(c.spent.is_empty() && c.spent_timers.is_empty());
    }

    #[test]
    fn pushes_beyond_those_in_progress_are_answered_busy_and_counted() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            max_pushes_in_progress: 1,
            busy_retry_ms: 700,
            device_rate: RateLimit::UNLIMITED,
            ..CloudEngineConfig::default()
        });
        hello(&mut c, 0);
        let (_, a) = send(&mut c, 10, &push(1, 1));
        assert!(a
            .iter()
            .any(|a| matches!(a, CloudAction::ApplyPush { batch: 1, .. })));
        let (m, a) = send(&mut c, 11, &push(2, 1));
        assert!(
            matches!(
                m.as_slice(),
                [DownMsg::Error {
                    code: ErrorCode::Busy {
                        retry_after_ms: 700,
                        batch: Some(2),
                    },
                    ..
                }]
            ),
            "{m:?}"
        );
        assert_eq!(throttled(&a), vec![(0, 1)]);
        let (m, a) = send(&mut c, 12, &push(3, 1));
        assert!(m.is_empty() && a.is_empty(), "one answer per interval");
        assert_eq!(c.stats().pushes_busy, 2);
        c.handle_push_applied(13, &dev(), 1, vec![]);
        outputs(&mut c);
        // The next push taken reports the refusal not yet reported.
        let (_, a) = send(&mut c, 14, &push(3, 1));
        assert_eq!(throttled(&a), vec![(0, 1)]);
        assert!(a
            .iter()
            .any(|a| matches!(a, CloudAction::ApplyPush { batch: 3, .. })));
        // A refusal within the interval is not answered; it is reported when the session ends.
        let (m, a) = send(&mut c, 15, &push(4, 1));
        assert!(m.is_empty() && throttled(&a).is_empty());
        let (_, a) = send(&mut c, 20, &UpMsg::Bye);
        assert_eq!(throttled(&a), vec![(0, 1)]);
        assert_eq!(c.stats().pushes_busy, 3);
    }

    #[test]
    fn a_busy_device_is_told_to_wait_as_long_as_its_oldest_push_has_waited() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            max_pushes_in_progress: 2,
            busy_retry_ms: 700,
            ack_timeout_max_ms: 20_000,
            device_rate: RateLimit::UNLIMITED,
            ..CloudEngineConfig::default()
        });
        hello(&mut c, 0);
        send(&mut c, 1_000, &push(1, 1));
        send(&mut c, 2_000, &push(2, 1));
        let busy_retry = |m: &[DownMsg]| match m {
            [DownMsg::Error {
                code:
                    ErrorCode::Busy {
                        retry_after_ms,
                        batch,
                    },
                ..
            }] => (*retry_after_ms, *batch),
            other => panic!("expected one busy answer: {other:?}"),
        };
        // The queue is 5 s long for this device: a second would only bring the push back into it.
        let (m, _) = send(&mut c, 6_000, &push(3, 1));
        assert_eq!(busy_retry(&m), (5_000, Some(3)));
        // The oldest answered, the next oldest (taken at 2 s) sets the wait.
        c.handle_push_applied(12_000, &dev(), 1, vec![]);
        outputs(&mut c);
        send(&mut c, 12_000, &push(4, 1));
        let (m, _) = send(&mut c, 13_000, &push(5, 1));
        assert_eq!(busy_retry(&m), (11_000, Some(5)));
        // Capped by the longest acknowledgement timeout.
        let (m, _) = send(&mut c, 40_000, &push(6, 1));
        assert_eq!(busy_retry(&m), (20_000, Some(6)));
        assert_eq!(c.stats().pushes_busy, 3);
    }

    #[test]
    fn a_push_of_more_changes_than_the_cloud_takes_is_refused_with_the_limit() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            max_push_changes: 2,
            ..CloudEngineConfig::default()
        });
        hello(&mut c, 0);
        let (m, a) = send(&mut c, 10, &push(1, 3));
        assert!(
            matches!(
                m.as_slice(),
                [DownMsg::Error {
                    code: ErrorCode::TooManyChanges { max: 2 },
                    ..
                }]
            ),
            "{m:?}"
        );
        assert!(a.is_empty());
        assert_eq!(c.stats().messages_refused, 1);
        let (_, a) = send(&mut c, 10, &push(2, 2));
        assert!(a
            .iter()
            .any(|a| matches!(a, CloudAction::ApplyPush { batch: 2, .. })));
    }

    #[test]
    fn a_session_less_flood_gets_a_bounded_number_of_answers() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        let mut replies = 0;
        for i in 0..50 {
            let (m, _) = send(&mut c, 10 + i, &UpMsg::FeedAck { cursor: 0 });
            replies += m.len();
        }
        assert_eq!(replies, 1, "one no-session answer per retry interval");
        assert_eq!(c.stats().messages_without_session, 50);
        let (m, _) = send(&mut c, 10 + 1000, &UpMsg::FeedAck { cursor: 0 });
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn welcome_tells_the_cloud_time_and_the_drift_bound() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            max_drift_ms: 1234,
            ..CloudEngineConfig::default()
        });
        let (m, _) = hello(&mut c, 0);
        assert!(m.is_empty(), "the welcome waits for the feed read: {m:?}");
        c.handle_feed_page(9, &dev(), first_page(3));
        let (m, _) = outputs(&mut c);
        assert_eq!(
            m,
            vec![DownMsg::Welcome {
                session: 9,
                // The hello came at 5 (wall 1_700_000_000_000), the read 4 ms later.
                now_ms: 1_700_000_000_004,
                max_drift_ms: 1234,
                answered: Some(3),
                repush: false,
            }]
        );
    }

    #[test]
    fn a_restored_broker_link_restarts_every_session_and_the_next_push_is_answered_with_a_prompt() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        hello(&mut c, 0);
        assert_eq!(c.sessions(), 1);
        assert_eq!(c.handle_link_restored(), vec![dev()]);
        assert_eq!(c.sessions(), 0);
        // No timer of a dropped session fires, and the devices are not marked offline.
        assert_eq!(c.poll_timeout(), None);
        let (m, a) = outputs(&mut c);
        assert!(m.is_empty() && a.is_empty(), "{m:?} {a:?}");
        // A push of the old session is not applied: the device is told to say hello, and its
        // hello then resends everything unacknowledged.
        let push = wire::encode_up(
            "1",
            &UpMsg::Push {
                batch: 1,
                changes: vec![delete("a", 1)],
                session: None,
            },
            &WireConfig::default(),
        )
        .unwrap();
        c.handle_message(6, 1_700_000_000_000, &dev(), &push);
        let (m, a) = outputs(&mut c);
        assert!(
            matches!(
                &m[..],
                [DownMsg::Error {
                    code: ErrorCode::NoSession,
                    ..
                }]
            ),
            "{m:?}"
        );
        assert!(a.is_empty(), "{a:?}");
        hello(&mut c, 0);
        assert_eq!(c.sessions(), 1);
        // A second restore with no session left returns nobody.
        c.handle_link_restored();
        assert!(c.handle_link_restored().is_empty());
    }

    #[test]
    fn feed_lag_is_the_head_minus_the_acknowledged_cursor_over_the_sessions() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        assert_eq!(c.feed_lag(), FeedLag::default());
        hello(&mut c, 2);
        c.handle_feed_page(
            6,
            &dev(),
            FeedPage {
                after: 2,
                changes: vec![],
                head: 2,
                resync_required: false,
                unreadable: vec![],
                generations: vec![],
                answered: 0,
            },
        );
        outputs(&mut c);
        assert_eq!(c.feed_lag().entries, 0, "{:?}", c.feed_lag());
        // Three writes for the device: it is 3 behind until it acknowledges them.
        c.handle_feed_advanced(7, &dev(), 5);
        let lag = c.feed_lag();
        assert_eq!(
            (
                lag.entries,
                lag.max,
                lag.sessions_behind,
                lag.sessions_resyncing
            ),
            (3, 3, 1, 0)
        );
        let (_, a) = outputs(&mut c);
        assert!(
            a.iter()
                .any(|a| matches!(a, CloudAction::ReadFeed { after: 2, .. })),
            "{a:?}"
        );
        c.handle_feed_page(
            8,
            &dev(),
            FeedPage {
                after: 2,
                changes: (3..=5).map(|i| (i, delete(&format!("k{i}"), i))).collect(),
                head: 5,
                resync_required: false,
                unreadable: vec![],
                generations: vec![],
                answered: 0,
            },
        );
        outputs(&mut c);
        send(&mut c, 9, &UpMsg::FeedAck { cursor: 5 });
        assert_eq!(c.feed_lag(), FeedLag::default());
        // A device in a full resync counts apart (its cursor is beyond the feed's head).
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        hello(&mut c, 50);
        c.handle_feed_page(
            6,
            &dev(),
            FeedPage {
                after: 50,
                changes: vec![],
                head: 10,
                resync_required: false,
                unreadable: vec![],
                generations: vec![],
                answered: 0,
            },
        );
        let lag = c.feed_lag();
        assert_eq!((lag.entries, lag.sessions_resyncing), (0, 1), "{lag:?}");
    }

    #[test]
    fn a_cursor_beyond_the_feed_head_gets_a_full_resync() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        let (_, a) = hello(&mut c, 50);
        assert!(a
            .iter()
            .any(|a| matches!(a, CloudAction::ReadFeed { after: 50, .. })));
        // The cloud was restored from a backup: its feed ends at 10.
        c.handle_feed_page(
            6,
            &dev(),
            FeedPage {
                after: 50,
                changes: vec![],
                head: 10,
                resync_required: false,
                unreadable: vec![],
                generations: vec![],
                answered: 0,
            },
        );
        let (_, a) = outputs(&mut c);
        assert!(
            a.iter()
                .any(|a| matches!(a, CloudAction::ReadSnapshot { from: None, .. })),
            "{a:?}"
        );
        assert_eq!(c.stats().resyncs_started, 1, "counted");
    }

    #[test]
    fn unreadable_rows_are_reported_and_skipped_without_stalling_the_feed() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            feed_page_changes: 4,
            ..CloudEngineConfig::default()
        });
        hello(&mut c, 0);
        let bad = |cursor: u64, sk: &str| UnreadableRow {
            cursor,
            model: "M".into(),
            key: ItemKey {
                pk: "p".into(),
                sk: sk.into(),
            },
            reason: "stored item JSON: bad".into(),
        };
        // A full read of 4 entries, two of them unreadable; more entries follow (head 9).
        c.handle_feed_page(
            6,
            &dev(),
            FeedPage {
                after: 0,
                changes: vec![(2, delete("b", 2)), (4, delete("d", 4))],
                head: 9,
                resync_required: false,
                unreadable: vec![bad(1, "a"), bad(3, "c")],
                generations: vec![],
                answered: 0,
            },
        );
        let (m, a) = outputs(&mut c);
        let reported: Vec<&str> = a
            .iter()
            .filter_map(|a| match a {
                CloudAction::Unsendable { key, .. } => Some(key.sk.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reported, vec!["a", "c"]);
        let DownMsg::Feed {
            from, to, changes, ..
        } = m
            .iter()
            .find(|m| matches!(m, DownMsg::Feed { .. }))
            .expect("a feed page")
        else {
            panic!("{m:?}")
        };
        assert_eq!(
            (*from, *to, changes.len()),
            (0, 4, 2),
            "the page covers the read, not the head"
        );
        // The whole page unreadable still moves the stream on.
        c.handle_feed_page(
            7,
            &dev(),
            FeedPage {
                after: 4,
                changes: vec![],
                head: 9,
                resync_required: false,
                unreadable: vec![bad(5, "e"), bad(6, "f"), bad(7, "g"), bad(8, "h")],
                generations: vec![],
                answered: 0,
            },
        );
        let (m, _) = outputs(&mut c);
        assert!(
            m.iter()
                .any(|m| matches!(m, DownMsg::Feed { from: 4, to: 8, .. })),
            "{m:?}"
        );
    }

    #[test]
    fn the_end_of_a_resync_records_the_devices_cursor() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        hello(&mut c, 0);
        c.handle_feed_page(
            6,
            &dev(),
            FeedPage {
                after: 0,
                changes: vec![],
                head: 30,
                resync_required: true,
                unreadable: vec![],
                generations: vec![],
                answered: 0,
            },
        );
        let (_, a) = outputs(&mut c);
        let Some(CloudAction::ReadSnapshot { resync, .. }) = a
            .iter()
            .find(|a| matches!(a, CloudAction::ReadSnapshot { .. }))
            .cloned()
        else {
            panic!("{a:?}")
        };
        c.handle_snapshot_page(
            7,
            &dev(),
            SnapshotPage {
                resync,
                items: vec![],
                next: None,
                cursor: 30,
                unreadable: vec![],
                gen: 0,
            },
        );
        outputs(&mut c);
        let ack = wire::encode_up(
            "1",
            &UpMsg::SnapshotAck {
                resync,
                pos: None,
                done: true,
            },
            &WireConfig::default(),
        )
        .unwrap();
        c.handle_message(8, 1, &dev(), &ack);
        let (_, a) = outputs(&mut c);
        assert!(
            a.iter().any(|a| matches!(
                a,
                CloudAction::DeviceStatus {
                    cursor_acked: Some(30),
                    ..
                }
            )),
            "{a:?}"
        );
    }
}

#[cfg(test)]
mod restore_tests {
    //! A cloud restored from a backup: the welcome waits for the session's first feed read and
    //! compares the device's mark with what the store holds; nothing of an ended session is
    //! applied or acknowledged after that read.
    use super::*;
    use crate::hlc::Hlc;
    use crate::wire::Op;

    fn dev() -> DeviceId {
        DeviceId::new("acme", "d0").unwrap()
    }

    fn outputs(c: &mut CloudEngine) -> (Vec<DownMsg>, Vec<CloudAction>) {
        let (mut msgs, mut actions) = (Vec::new(), Vec::new());
        while let Some(a) = c.poll_action() {
            match a {
                CloudAction::Transmit { bytes, .. } => msgs.push(
                    wire::decode_down(&bytes, &WireConfig::default())
                        .unwrap()
                        .msg,
                ),
                other => actions.push(other),
            }
        }
        (msgs, actions)
    }

    fn send(c: &mut CloudEngine, now: u64, msg: &UpMsg) -> (Vec<DownMsg>, Vec<CloudAction>) {
        let bytes = wire::encode_up("1", msg, &WireConfig::default()).unwrap();
        c.handle_message(now, 1_700_000_000_000, &dev(), &bytes);
        outputs(c)
    }

    fn hello(session: u64, cursor: u64, mark: DeviceMark) -> UpMsg {
        UpMsg::Hello {
            session,
            cursor,
            pending: 0,
            mark: Some(mark),
        }
    }

    fn page(after: u64, head: u64, generations: &[(u64, u64)], answered: u64) -> FeedPage {
        FeedPage {
            after,
            changes: vec![],
            head,
            resync_required: false,
            unreadable: vec![],
            generations: generations
                .iter()
                .map(|&(gen, base)| FeedGeneration { gen, base })
                .collect(),
            answered,
        }
    }

    fn delete(name: &str) -> Change {
        Change {
            model: "M".into(),
            key: ItemKey {
                pk: "p".into(),
                sk: name.into(),
            },
            op: Op::Delete,
            item: None,
            version: Hlc {
                wall_ms: 1,
                counter: 0,
                node: 1,
            },
            base: None,
        }
    }

    fn welcomes(m: &[DownMsg]) -> Vec<(u64, Option<u64>, bool)> {
        m.iter()
            .filter_map(|m| match m {
                DownMsg::Welcome {
                    session,
                    answered,
                    repush,
                    ..
                } => Some((*session, *answered, *repush)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_welcome_tells_what_the_store_holds_once_it_was_read() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        let mark = DeviceMark {
            gen: 0,
            seen: 1,
            answered: 5,
        };
        let (m, a) = send(&mut c, 1, &hello(9, 1, mark));
        assert!(welcomes(&m).is_empty(), "no welcome before the read: {m:?}");
        assert!(a
            .iter()
            .any(|a| matches!(a, CloudAction::ReadFeed { after: 1, .. })));
        let (m, a) = send(&mut c, 2, &hello(9, 1, mark));
        assert!(
            m.is_empty() && a.is_empty(),
            "a resent hello waits: {m:?} {a:?}"
        );
        // The restored store answered 3 of the device's changes; the device heard 5.
        c.handle_feed_page(3, &dev(), page(1, 1, &[(0, 0)], 3));
        let (m, a) = outputs(&mut c);
        assert_eq!(welcomes(&m), [(9, Some(3), true)], "{m:?}");
        assert!(
            !a.iter()
                .any(|a| matches!(a, CloudAction::ReadSnapshot { .. })),
            "its feed is whole: no resync"
        );
        assert_eq!(c.stats().restores_detected, 1);
        let (m, _) = send(&mut c, 4, &hello(9, 1, mark));
        assert_eq!(welcomes(&m), [(9, Some(3), true)], "the same welcome again");
        // A device that heard no more than the store holds is welcomed plainly.
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        send(
            &mut c,
            1,
            &hello(
                9,
                1,
                DeviceMark {
                    answered: 3,
                    ..mark
                },
            ),
        );
        c.handle_feed_page(3, &dev(), page(1, 1, &[(0, 0)], 3));
        let (m, _) = outputs(&mut c);
        assert_eq!(welcomes(&m), [(9, Some(3), false)]);
        assert_eq!(c.stats().restores_detected, 0);
    }

    #[test]
    fn a_device_holding_feed_data_the_store_lost_gets_a_restore_resync() {
        // The device read up to head 9 in generation 77; the store's history never had 77 (a
        // run after the backup), and it appended again since, past the device's cursor.
        let cases = [
            (77, 9, "a generation the store's history lacks"),
            (4, 9, "beyond where its generation ended (at 6)"),
            (5, 12, "beyond the head of the current generation"),
        ];
        for (gen, seen, what) in cases {
            let mut c = CloudEngine::new(CloudEngineConfig::default());
            let mark = DeviceMark {
                gen,
                seen,
                answered: 0,
            };
            send(&mut c, 1, &hello(9, 9, mark));
            c.handle_feed_page(2, &dev(), page(9, 11, &[(0, 0), (4, 2), (5, 6)], 0));
            let (m, a) = outputs(&mut c);
            assert_eq!(welcomes(&m), [(9, Some(0), true)], "{what}");
            let Some(CloudAction::ReadSnapshot { resync, .. }) = a
                .into_iter()
                .find(|a| matches!(a, CloudAction::ReadSnapshot { .. }))
            else {
                panic!("{what}: no resync")
            };
            c.handle_snapshot_page(
                3,
                &dev(),
                SnapshotPage {
                    resync,
                    items: vec![],
                    next: None,
                    cursor: 11,
                    unreadable: vec![],
                    gen: 5,
                },
            );
            let (m, _) = outputs(&mut c);
            assert!(
                matches!(
                    &m[..],
                    [DownMsg::Snapshot {
                        restore: true,
                        gen: Some(5),
                        seen: Some(11),
                        done: true,
                        ..
                    }]
                ),
                "{what}: {m:?}"
            );
        }
        // Within its generation's range: the feed goes on.
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        let mark = DeviceMark {
            gen: 4,
            seen: 6,
            answered: 0,
        };
        send(&mut c, 1, &hello(9, 6, mark));
        c.handle_feed_page(2, &dev(), page(6, 11, &[(0, 0), (4, 2), (5, 6)], 0));
        let (m, a) = outputs(&mut c);
        assert_eq!(welcomes(&m), [(9, Some(0), false)]);
        assert!(!a
            .iter()
            .any(|a| matches!(a, CloudAction::ReadSnapshot { .. })));
        // The page names its session, the feed's generation and the head it was read at.
        assert!(
            m.iter().any(|m| matches!(
                m,
                DownMsg::Feed {
                    from: 6,
                    to: 11,
                    session: Some(9),
                    gen: Some(5),
                    seen: Some(11),
                    ..
                }
            )),
            "{m:?}"
        );
    }

    #[test]
    fn pushes_and_acks_of_ended_sessions_are_dropped_and_counted() {
        let mut c = CloudEngine::new(CloudEngineConfig::default());
        send(&mut c, 1, &hello(9, 1, DeviceMark::default()));
        c.handle_feed_page(2, &dev(), page(1, 1, &[(0, 0)], 10));
        outputs(&mut c);
        let push = |session| UpMsg::Push {
            batch: 4,
            changes: vec![delete("a"), delete("b")],
            session: Some(session),
        };
        let (m, a) = send(&mut c, 3, &push(8));
        assert!(m.is_empty() && a.is_empty(), "{m:?} {a:?}");
        assert_eq!(c.stats().pushes_of_ended_sessions, 1);
        let (_, a) = send(&mut c, 4, &push(9));
        assert!(matches!(&a[..], [CloudAction::ApplyPush { batch: 4, .. }]));
        let results: Vec<ChangeResult> = ["a", "b"]
            .iter()
            .map(|k| ChangeResult {
                model: "M".into(),
                key: delete(k).key,
                version: delete(k).version,
                kept: None,
                status: wire::ChangeStatus::Applied,
            })
            .collect();
        c.handle_push_applied(5, &dev(), 4, results.clone());
        let (m, _) = outputs(&mut c);
        assert!(
            matches!(
                &m[..],
                [DownMsg::PushAck {
                    answered: Some(12),
                    session: Some(9),
                    ..
                }]
            ),
            "the count after this push, and its session: {m:?}"
        );
        // A push taken in session 9 ends after the device's next hello: not acknowledged.
        send(&mut c, 6, &push(9));
        send(&mut c, 7, &hello(10, 1, DeviceMark::default()));
        c.handle_push_applied(8, &dev(), 4, results);
        let (m, _) = outputs(&mut c);
        assert!(
            !m.iter().any(|m| matches!(m, DownMsg::PushAck { .. })),
            "{m:?}"
        );
        assert_eq!(c.stats().acks_dropped, 1);
    }
}
