//! The cloud engine: the cloud side of the protocol, for all devices, as one state machine.
//!
//! This module exists so that the cloud's decisions (whom to welcome, what page to read next,
//! when to resend, when to resync) are deterministic and simulated. It holds only bounded state
//! per device (a few cursors, never item data): pages are read from the store on demand and
//! re-read on loss, so a device that stops reading costs a fixed, small amount of memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use devtables_schema::ItemKey;

use crate::identity::DeviceId;
use crate::rng::SplitMix;
use crate::wire::{
    self, Change, ChangeResult, DownMsg, ErrorCode, Fit, MessageBudget, UpMsg, WireConfig,
    WireError,
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
    /// Most pushes of one device being applied at once; more are dropped (the device resends).
    /// Default 4.
    pub max_pushes_in_progress: usize,
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
            prompt_interval_ms: 30_000,
            max_drift_ms: crate::apply::DEFAULT_MAX_DRIFT_MS,
            seed: 0,
        }
    }
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
}

#[derive(Clone, Debug)]
enum Mode {
    Feed(FeedTx),
    Snapshot(SnapTx),
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
    /// Pushes handed to the driver and not yet answered.
    pushes: usize,
    /// Feed or resync streaming.
    mode: Mode,
    /// When the oldest unacknowledged page (or outstanding read) times out.
    deadline: Option<u64>,
    /// Consecutive timeouts, for backoff.
    retries: u32,
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
    /// Session-less devices being prompted to say hello: (next prompt, prompts sent). Bounded
    /// by `max_sessions`.
    prompted: BTreeMap<DeviceId, (u64, u32)>,
    /// Prompt deadlines, earliest first.
    prompt_timers: BTreeSet<(u64, DeviceId)>,
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
            actions: VecDeque::new(),
        }
    }

    /// Sessions tracked.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
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

    /// A message arrived on `from`'s up topic (the device is taken from the topic only).
    ///
    /// `wall_ms` is the cloud's wall time (ms since the Unix epoch), told to the device in a
    /// welcome; `now_ms` is the engine's (monotonic) time like every other input's.
    pub fn handle_message(&mut self, now_ms: u64, wall_ms: u64, from: &DeviceId, bytes: &[u8]) {
        let decoded = match wire::decode_up(bytes, &self.cfg.wire) {
            Ok(d) => d,
            Err(e) => {
                let code = match &e {
                    WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion {
                        supported: wire::PROTOCOL_VERSION,
                    },
                    WireError::TooLarge { .. } | WireError::TooManyChanges { .. } => {
                        ErrorCode::TooLarge
                    }
                    WireError::Malformed { .. } => ErrorCode::Malformed,
                };
                self.transmit(
                    from,
                    &DownMsg::Error {
                        code,
                        message: e.to_string(),
                    },
                );
                return;
            }
        };
        match decoded.msg {
            UpMsg::Bye => self.handle_disconnected(now_ms, from),
            UpMsg::Hello {
                session,
                cursor,
                pending,
            } => self.on_hello(
                now_ms,
                wall_ms,
                from,
                session,
                cursor,
                pending,
                decoded.schema,
            ),
            UpMsg::Push { batch, changes } => {
                let max = self.cfg.max_pushes_in_progress;
                let Some(s) = self.sessions.get_mut(from) else {
                    self.prompt(now_ms, from, true);
                    return;
                };
                s.last_seen_ms = now_ms;
                if s.pushes >= max {
                    return;
                }
                s.pushes += 1;
                self.actions.push_back(CloudAction::ApplyPush {
                    device: from.clone(),
                    batch,
                    changes,
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
                        if pos > t.acked {
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
        if let Some(s) = self.sessions.remove(device) {
            if let Some(d) = s.deadline {
                self.timers.remove(&(d, device.clone()));
            }
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
        if let Some(s) = self.sessions.get_mut(device) {
            s.pushes = s.pushes.saturating_sub(1);
        }
        // Split the results over as many acks as the size limit needs.
        let overhead = wire::down_overhead(
            &self.cfg.schema_version,
            &DownMsg::PushAck {
                batch,
                results: vec![],
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
        // A cursor beyond the head: the cloud lost feed entries the device already applied
        // (restored from a backup); only a full resync brings the two back together.
        if page.resync_required || page.after > page.head {
            let resync = self.rng.next() >> 11;
            s.mode = Mode::Snapshot(SnapTx {
                resync,
                cursor: None,
                acked: None,
                sent_to: None,
                finished: false,
                pages: VecDeque::new(),
                reading: None,
            });
            self.pump(now_ms, device);
            return;
        }
        // The store read `limit` entries when it returned that many, readable or not; only a
        // short read reached the head.
        let full = page.changes.len() + page.unreadable.len() >= limit;
        let overhead = wire::down_overhead(
            &self.cfg.schema_version,
            &DownMsg::Feed {
                from: page.after,
                to: u64::MAX,
                changes: vec![],
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
    }

    /// Next work for the driver.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<CloudAction> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next, in ms.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        let a = self.timers.first().map(|(d, _)| *d);
        let b = self.prompt_timers.first().map(|(d, _)| *d);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
    /// `max_page_retries` times. `replying` answers a message of the device and is always sent.
    fn prompt(&mut self, now_ms: u64, device: &DeviceId, replying: bool) {
        let interval = self.cfg.prompt_interval_ms.max(1);
        let tracked = self.prompted.get(device).copied();
        if tracked.is_some() && !replying {
            return;
        }
        let msg = DownMsg::Error {
            code: ErrorCode::NoSession,
            message: "no session: send hello".to_string(),
        };
        self.transmit(device, &msg);
        match tracked {
            Some(_) => {}
            None if self.prompted.len() < self.cfg.max_sessions => {
                let next = now_ms.saturating_add(interval);
                self.prompted.insert(device.clone(), (next, 1));
                self.prompt_timers.insert((next, device.clone()));
            }
            None => {}
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
            let Some((_, tries)) = self.prompted.remove(&device) else {
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
            self.prompted.insert(device.clone(), (next, tries + 1));
            self.prompt_timers.insert((next, device));
        }
    }

    fn forget_prompt(&mut self, device: &DeviceId) {
        if let Some((at, _)) = self.prompted.remove(device) {
            self.prompt_timers.remove(&(at, device.clone()));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_hello(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        from: &DeviceId,
        session: u64,
        cursor: u64,
        pending: u64,
        schema: String,
    ) {
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
                s.last_seen_ms = now_ms;
                let welcome = self.welcome(session, wall_ms);
                self.transmit(from, &welcome);
                return;
            }
        }
        let pushes = self.sessions.get(from).map_or(0, |s| s.pushes);
        self.set_deadline(from, None);
        self.sessions.insert(
            from.clone(),
            Session {
                session,
                schema: schema.clone(),
                last_seen_ms: now_ms,
                pushes,
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
            },
        );
        let welcome = self.welcome(session, wall_ms);
        self.transmit(from, &welcome);
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

    fn welcome(&self, session: u64, wall_ms: u64) -> DownMsg {
        DownMsg::Welcome {
            session,
            now_ms: wall_ms,
            max_drift_ms: self.cfg.max_drift_ms,
        }
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

    #[test]
    fn welcome_tells_the_cloud_time_and_the_drift_bound() {
        let mut c = CloudEngine::new(CloudEngineConfig {
            max_drift_ms: 1234,
            ..CloudEngineConfig::default()
        });
        let (m, _) = hello(&mut c, 0);
        assert_eq!(
            m,
            vec![DownMsg::Welcome {
                session: 9,
                now_ms: 1_700_000_000_000,
                max_drift_ms: 1234
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
            },
        );
        let (_, a) = outputs(&mut c);
        assert!(
            a.iter()
                .any(|a| matches!(a, CloudAction::ReadSnapshot { from: None, .. })),
            "{a:?}"
        );
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
        let DownMsg::Feed { from, to, changes } = &m[0] else {
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
