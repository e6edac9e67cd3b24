//! The simulation's in-memory stores, behind the same seams and contract as the real ones.
//!
//! They live apart from the simulation so the store-conformance suite (`devtables-conformance`)
//! runs against exactly the stores the simulation uses: what the simulation proves about the
//! protocol then holds for every store that passes the same suite (the SQLite cloud store, the
//! agent's device state). They mirror the real stores where the contract says so: the device
//! keeps one row per item key (the model is an attribute), like the device database; the cloud
//! keys rows by (owner, key); tombstones are purged by age with a per-owner watermark and a feed
//! floor; a new device's feed starts with its floor at 1; clocks are restored the way the
//! drivers restore them (the agent from its last issued version, the cloud from the highest
//! stored version).
//!
//! Transactions are copy-on-begin and swap on commit, so a crash keeps exactly the committed
//! state. A transaction can be told to fail at its n-th operation (an injected store error),
//! which the caller then rolls back.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{
    CloudTxn, Conflict, DeviceTxn, FeedMark, PushCounts, RowWrite, StoredRow, StoredVersion,
};
use devtables_sync::cloud::{
    FeedGeneration, FeedPage, SnapshotCursor, SnapshotPage, MAX_FEED_GENERATIONS,
};
use devtables_sync::device::{OutboxMeta, Restored};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{Change, Op};

/// Why a simulated store operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The fault injector failed this operation.
    Injected,
    /// The feed of an unregistered device was appended to.
    UnknownDevice(String),
    /// A local write was refused (an invalid item: a bug of the simulation).
    Invalid(String),
}

/// Counts a transaction's operations and fails the chosen one.
#[derive(Clone, Copy, Debug, Default)]
struct Injector {
    fail_at: Option<u32>,
    ops: u32,
}

impl Injector {
    fn op(&mut self) -> Result<(), StoreError> {
        self.ops += 1;
        if self.fail_at.is_some_and(|n| self.ops >= n) {
            return Err(StoreError::Injected);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Device store

/// A device row: the model holding the key, the item (`None`: tombstone) and its version.
#[derive(Clone, Debug, PartialEq)]
pub struct DevRec {
    /// The model of the last write.
    pub model: String,
    /// The item, `None` for a tombstone.
    pub item: Option<Item>,
    /// The version of the last write.
    pub version: Hlc,
}

/// A device database with its replication state; one row per item key, like the real one.
#[derive(Clone, Debug, Default)]
pub struct DevStore {
    /// Items and tombstones by key.
    pub items: BTreeMap<ItemKey, DevRec>,
    /// The durable outbox: key -> (sequence, newest change).
    pub outbox: BTreeMap<ItemKey, (u64, Change)>,
    /// The last outbox sequence issued.
    pub next_seq: u64,
    /// The feed cursor.
    pub cursor: u64,
    /// Keys seen in the current resync.
    pub marks: BTreeSet<ItemKey>,
    /// The last version the device issued (the agent's `hlc` meta), which its clock resumes
    /// after a restart.
    pub hlc: Option<Hlc>,
    /// Versions of local changes whose outbox entries a newer remote write took
    /// ([`DeviceTxn::take_superseded`]), recorded in the same transaction: the simulation's
    /// durable account of them, which a crash before the engine's event cannot lose.
    pub superseded: BTreeSet<Hlc>,
    /// The feed mark stored with the last page that stored one.
    pub mark: FeedMark,
    /// The answered count stored with outbox trims (or by a re-push's end).
    pub answered: u64,
}

impl DevStore {
    /// What a restart hands the engine.
    pub fn restored(&self) -> Restored {
        let mut o: Vec<&(u64, Change)> = self.outbox.values().collect();
        o.sort_by_key(|(s, _)| *s);
        Restored {
            cursor: self.cursor,
            outbox: o.into_iter().map(|(_, c)| OutboxMeta::of(c)).collect(),
            mark: self.mark,
            answered: self.answered,
        }
    }

    /// The durable outbox, oldest first (what the agent's restore reads).
    pub fn outbox_changes(&self) -> Vec<Change> {
        let mut o: Vec<&(u64, Change)> = self.outbox.values().collect();
        o.sort_by_key(|(s, _)| *s);
        o.into_iter().map(|(_, c)| c.clone()).collect()
    }

    /// The clock a restarted agent builds: from its stored last issued version.
    pub fn clock(&self, node: u64) -> HlcClock {
        match self.hlc {
            Some(last) => HlcClock::restore(node, last),
            None => HlcClock::new(node),
        }
    }

    /// A local write, as the agent's outbox recorder does it in the db's write transaction:
    /// the item, its version and (for a model that syncs up) its coalesced outbox entry. A
    /// delete of a key holding no live item does nothing. Returns the outbox entry's change.
    pub fn local_write(
        &mut self,
        schema: &Schema,
        clock: &mut HlcClock,
        stamp_ms: u64,
        model_name: &str,
        fields: &Item,
        delete: bool,
    ) -> Result<Option<Change>, StoreError> {
        let model = schema
            .model(model_name)
            .ok_or_else(|| StoreError::Invalid(format!("no model {model_name}")))?;
        let created = model
            .prepare_create(fields, stamp_ms.min(i64::MAX as u64) as i64)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let key = model
            .primary_key(&created)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let held = self.items.get(&key);
        if held.is_some_and(|r| r.item.is_some() && r.model != model_name) {
            return Err(StoreError::Invalid(format!(
                "{key:?} is held by another model"
            )));
        }
        if delete && held.is_none_or(|r| r.item.is_none()) {
            return Ok(None);
        }
        let stored = held.map(|r| r.version);
        if !model.process().syncs_up() {
            // The agent records versions and outbox entries only for models that sync up.
            let version = stored.unwrap_or(Hlc::ZERO);
            let rec = DevRec {
                model: model_name.to_string(),
                item: (!delete).then_some(created),
                version,
            };
            self.items.insert(key, rec);
            return Ok(None);
        }
        // The base is the version the cloud knows: a coalesced change keeps the pending one's.
        let base = match self.outbox.get(&key) {
            Some((_, pending)) => pending.base,
            None => stored,
        };
        if let Some(s) = stored {
            clock.observe(s, stamp_ms);
        }
        let version = clock
            .tick(stamp_ms)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let change = Change {
            model: model_name.to_string(),
            key: key.clone(),
            op: if delete { Op::Delete } else { Op::Put },
            item: (!delete).then(|| created.clone()),
            version,
            base,
        };
        self.items.insert(
            key.clone(),
            DevRec {
                model: model_name.to_string(),
                item: (!delete).then_some(created),
                version,
            },
        );
        self.hlc = Some(version);
        // Like the agent: a coalesced entry takes a new sequence number.
        self.next_seq += 1;
        self.outbox.insert(key, (self.next_seq, change.clone()));
        Ok(Some(change))
    }

    /// The durable outbox entry of a key, if any.
    pub fn outbox_change(&self, key: &ItemKey) -> Option<Change> {
        self.outbox.get(key).map(|(_, c)| c.clone())
    }

    /// Removes acknowledged entries whose version still matches, and raises the answered count
    /// (one transaction, as the agent's `OutboxRemove`).
    pub fn outbox_remove(&mut self, acked: &[(String, ItemKey, Hlc)], answered: Option<u64>) {
        for (_, key, version) in acked {
            if self
                .outbox
                .get(key)
                .is_some_and(|(_, c)| c.version == *version)
            {
                self.outbox.remove(key);
            }
        }
        if let Some(a) = answered {
            self.answered = self.answered.max(a);
        }
    }

    /// One slice of the re-push after a cloud restore, as the agent runs it: the rows after
    /// `after` (key order), at most `limit`; each write of a model that syncs up without an
    /// outbox entry gets one at its version, without a base. Returns the new entries and where
    /// the next slice starts (`None`: done).
    pub fn repush_slice(
        &mut self,
        schema: &Schema,
        after: Option<&ItemKey>,
        limit: usize,
    ) -> (Vec<Change>, Option<ItemKey>) {
        let limit = limit.max(1);
        let rows: Vec<(ItemKey, DevRec)> = match after {
            Some(a) => self
                .items
                .range((
                    std::ops::Bound::Excluded(a.clone()),
                    std::ops::Bound::Unbounded,
                ))
                .take(limit)
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
            None => self
                .items
                .iter()
                .take(limit)
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
        };
        let next = (rows.len() == limit).then(|| rows[rows.len() - 1].0.clone());
        let mut added = Vec::new();
        for (key, rec) in rows {
            let ups = schema
                .model(&rec.model)
                .is_some_and(|m| m.process().syncs_up() && m.process().on_device());
            if !ups || self.outbox.contains_key(&key) {
                continue;
            }
            let change = Change {
                model: rec.model.clone(),
                key: key.clone(),
                op: if rec.item.is_some() {
                    Op::Put
                } else {
                    Op::Delete
                },
                item: rec.item.clone(),
                version: rec.version,
                base: None,
            };
            self.next_seq += 1;
            self.outbox.insert(key, (self.next_seq, change.clone()));
            added.push(change);
        }
        (added, next)
    }

    /// Re-stamps an outbox entry the cloud refused as too far in the future, as the agent does:
    /// rewind the clock to the cloud's time, tick, store the new version as the key's and the
    /// entry's. `None` if the entry no longer holds `version`.
    pub fn restamp(
        &mut self,
        clock: &mut HlcClock,
        stamp_ms: u64,
        key: &ItemKey,
        version: Hlc,
        cloud_ms: u64,
    ) -> Result<Option<Change>, StoreError> {
        let Some((seq, old)) = self.outbox.get(key).cloned() else {
            return Ok(None);
        };
        if old.version != version {
            return Ok(None);
        }
        clock.rewind_to(cloud_ms);
        let new = clock
            .tick(stamp_ms)
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let change = Change {
            version: new,
            ..old
        };
        self.outbox.insert(key.clone(), (seq, change.clone()));
        if let Some(rec) = self.items.get_mut(key) {
            rec.version = new;
        }
        self.hlc = Some(new);
        Ok(Some(change))
    }
}

/// A device write transaction (a copy of the store, swapped in on commit).
pub struct DevTxn<'a> {
    /// The store as this transaction sees it.
    pub s: DevStore,
    schema: &'a Schema,
    inject: Injector,
}

impl<'a> DevTxn<'a> {
    /// Begin a transaction; `fail_at`: fail the n-th operation (1-based).
    pub fn begin(store: &DevStore, schema: &'a Schema, fail_at: Option<u32>) -> DevTxn<'a> {
        DevTxn {
            s: store.clone(),
            schema,
            inject: Injector { fail_at, ops: 0 },
        }
    }
}

impl DeviceTxn for DevTxn<'_> {
    type Error = StoreError;
    fn stored_version(
        &mut self,
        _model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredVersion>, StoreError> {
        self.inject.op()?;
        Ok(self.s.items.get(key).map(|r| StoredVersion {
            version: r.version,
            deleted: r.item.is_none(),
        }))
    }
    fn put_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        item: Item,
        version: Hlc,
    ) -> Result<(), StoreError> {
        self.inject.op()?;
        self.s.items.insert(
            key.clone(),
            DevRec {
                model: model.to_string(),
                item: Some(item),
                version,
            },
        );
        Ok(())
    }
    fn delete_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        version: Hlc,
    ) -> Result<(), StoreError> {
        self.inject.op()?;
        self.s.items.insert(
            key.clone(),
            DevRec {
                model: model.to_string(),
                item: None,
                version,
            },
        );
        Ok(())
    }
    fn has_pending(&mut self, _model: &str, key: &ItemKey) -> Result<bool, StoreError> {
        self.inject.op()?;
        Ok(self.s.outbox.contains_key(key))
    }
    fn take_superseded(
        &mut self,
        _model: &str,
        key: &ItemKey,
        winner: Hlc,
    ) -> Result<Option<Change>, StoreError> {
        self.inject.op()?;
        if self
            .s
            .outbox
            .get(key)
            .is_none_or(|(_, c)| c.version >= winner)
        {
            return Ok(None);
        }
        let taken = self.s.outbox.remove(key).map(|(_, c)| c);
        if let Some(c) = &taken {
            self.s.superseded.insert(c.version);
        }
        Ok(taken)
    }
    fn live_model(&mut self, key: &ItemKey) -> Result<Option<String>, StoreError> {
        self.inject.op()?;
        Ok(self
            .s
            .items
            .get(key)
            .filter(|r| r.item.is_some())
            .map(|r| r.model.clone()))
    }
    fn set_cursor(&mut self, cursor: u64) -> Result<(), StoreError> {
        self.inject.op()?;
        self.s.cursor = cursor;
        Ok(())
    }
    fn set_feed_mark(&mut self, mark: FeedMark) -> Result<(), StoreError> {
        self.inject.op()?;
        self.s.mark = mark;
        Ok(())
    }
    fn resync_mark_seen(&mut self, _model: &str, key: &ItemKey) -> Result<(), StoreError> {
        self.inject.op()?;
        self.s.marks.insert(key.clone());
        Ok(())
    }
    fn resync_clear(&mut self) -> Result<(), StoreError> {
        self.inject.op()?;
        self.s.marks.clear();
        Ok(())
    }
    fn resync_sweep(&mut self) -> Result<Vec<(String, ItemKey)>, StoreError> {
        self.inject.op()?;
        let mut swept = Vec::new();
        for (k, rec) in self.s.items.iter_mut() {
            let Some(m) = self.schema.model(&rec.model) else {
                continue;
            };
            let p = m.process();
            if rec.item.is_some()
                && p.syncs_down()
                && p.on_device()
                && !self.s.marks.contains(k)
                && !self.s.outbox.contains_key(k)
            {
                rec.item = None;
                swept.push((rec.model.clone(), k.clone()));
            }
        }
        self.s.marks.clear();
        Ok(swept)
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud store

/// A cloud row is identified by (owner, key), like the real stores'.
pub type CKey = (Owner, ItemKey);

/// A cloud row: its model, the item (`None`: tombstone), version, base and write time.
#[derive(Clone, Debug, PartialEq)]
pub struct CRec {
    /// The model of the last write.
    pub model: String,
    /// The item, `None` for a tombstone.
    pub item: Option<Item>,
    /// The version of the last write.
    pub version: Hlc,
    /// The base of the last write.
    pub base: Option<Hlc>,
    /// When the row was written (cloud wall time), which tombstone retention measures.
    pub updated_ms: u64,
}

/// One device's feed.
#[derive(Clone, Debug, Default)]
pub struct Feed {
    /// cursor -> key.
    pub entries: BTreeMap<u64, CKey>,
    /// key -> cursor (one entry per key).
    pub by_key: BTreeMap<CKey, u64>,
    /// The highest cursor issued.
    pub head: u64,
    /// Entries with cursor <= floor were purged; reads after an older cursor need a resync.
    pub floor: u64,
    /// The generations of the feed, oldest first (see [`FeedPage::generations`]).
    pub generations: Vec<FeedGeneration>,
}

/// The cloud database.
#[derive(Clone, Debug, Default)]
pub struct CloudStore {
    /// Rows by (owner, key).
    pub items: BTreeMap<CKey, CRec>,
    /// Per-owner purge watermarks.
    pub watermarks: BTreeMap<Owner, Hlc>,
    /// Per-device push counters.
    pub counts: BTreeMap<DeviceId, PushCounts>,
    /// Per-device feeds (registered devices only).
    pub feeds: BTreeMap<DeviceId, Feed>,
    /// The conflict log (bounded).
    pub conflicts: VecDeque<Conflict>,
    /// The cursor each device acknowledged last.
    pub acked: BTreeMap<DeviceId, u64>,
    /// Per-device count of pushed changes answered (kept by `count_push`).
    pub answered: BTreeMap<DeviceId, u64>,
    /// The run of the process using the store (see [`CloudStore::new_run`]); its first append
    /// to a feed starts a new generation of it. A process attribute that a copy (a backup)
    /// carries along harmlessly: the process that restores one starts a run of its own.
    pub run: u64,
    /// Most devices one transaction appends a broadcast's entry to, as the real stores'
    /// `fanout_batch`; 0 (a bare store's default): every device at once.
    pub fanout_batch: usize,
    /// Pending broadcast fan-outs by (account, key): the model, the last device reached, and
    /// the order they were queued in (the oldest is stepped first).
    pub fanouts: BTreeMap<(String, ItemKey), PendingFanout>,
    /// The order of the next fan-out queued.
    pub fanout_seq: u64,
}

/// A broadcast fan-out not finished: the devices of the account after `after` (device order)
/// still lack the key's entry.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingFanout {
    pub model: String,
    pub after: String,
    pub queued: u64,
}

/// Most conflicts kept.
const MAX_CONFLICTS: usize = 64;

impl CloudStore {
    /// Register a device: its feed starts with its head and floor at 1, so a first hello
    /// (cursor 0) gets a full resync.
    pub fn register_device(&mut self, id: &DeviceId) {
        self.feeds.entry(id.clone()).or_insert(Feed {
            head: 1,
            floor: 1,
            generations: vec![FeedGeneration::default()],
            ..Feed::default()
        });
    }

    /// A new process opens the store: its appends start new feed generations.
    pub fn new_run(&mut self, run: u64) {
        self.run = run;
    }

    /// The highest version stored: items, tombstones and watermarks.
    pub fn max_version(&self) -> Option<Hlc> {
        self.items
            .values()
            .map(|r| r.version)
            .chain(self.watermarks.values().copied())
            .max()
    }

    /// The clock a restarted cloud builds: after the highest stored version.
    pub fn clock(&self, node: u64) -> HlcClock {
        match self.max_version() {
            Some(last) => HlcClock::restore(node, last),
            None => HlcClock::new(node),
        }
    }

    /// A feed page of a device (see [`FeedPage`]).
    pub fn read_feed(
        &self,
        d: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StoreError> {
        let f = self
            .feeds
            .get(d)
            .ok_or_else(|| StoreError::UnknownDevice(d.to_string()))?;
        let answered = self.answered.get(d).copied().unwrap_or(0);
        if after < f.floor {
            return Ok(FeedPage {
                after,
                changes: vec![],
                head: f.head,
                resync_required: true,
                unreadable: vec![],
                generations: f.generations.clone(),
                answered,
            });
        }
        let changes = f
            .entries
            .range(after.saturating_add(1)..)
            .take(limit)
            .filter_map(|(c, ck)| self.items.get(ck).map(|rec| (*c, row_change(&ck.1, rec))))
            .collect();
        Ok(FeedPage {
            after,
            changes,
            head: f.head,
            resync_required: false,
            unreadable: vec![],
            generations: f.generations.clone(),
            answered,
        })
    }

    /// A snapshot page of a device (see [`SnapshotPage`]).
    pub fn read_snapshot(
        &self,
        schema: &Schema,
        d: &DeviceId,
        resync: u64,
        from: Option<&SnapshotCursor>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError> {
        let (head, gen) = self
            .feeds
            .get(d)
            .map(|f| (f.head, f.generations.last().map_or(0, |g| g.gen)))
            .ok_or_else(|| StoreError::UnknownDevice(d.to_string()))?;
        let limit = limit.max(1);
        let mut all: Vec<(SnapshotCursor, Change)> = self
            .items
            .iter()
            .filter(|((owner, _), rec)| {
                let Some(m) = schema.model(&rec.model) else {
                    return false;
                };
                rec.item.is_some()
                    && m.process().syncs_down()
                    && match owner {
                        Owner::Device(o) => o == d && !m.process().broadcast,
                        Owner::Account(a) => a == &d.account && m.process().broadcast,
                    }
            })
            .map(|((_, key), rec)| {
                (
                    SnapshotCursor {
                        model: rec.model.clone(),
                        key: key.clone(),
                    },
                    row_change(key, rec),
                )
            })
            .filter(|(c, _)| from.is_none_or(|f| c > f))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let more = all.len() > limit;
        all.truncate(limit);
        let next = if more {
            all.last().map(|(c, _)| c.clone())
        } else {
            None
        };
        Ok(SnapshotPage {
            resync,
            items: all.into_iter().map(|(_, c)| c).collect(),
            next,
            cursor: head,
            unreadable: vec![],
            gen,
        })
    }

    /// Appends the entry of `ck` to the feeds of the account's devices after `after` (device
    /// order), at most `limit` of them (0: all); returns the devices reached.
    fn advance_account(
        &mut self,
        account: &str,
        after: &str,
        limit: usize,
        ck: &CKey,
    ) -> Vec<DeviceId> {
        let run = self.run;
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut reached = Vec::new();
        for (d, f) in self.feeds.iter_mut() {
            if d.account != account || d.device.as_str() <= after {
                continue;
            }
            if reached.len() >= limit {
                break;
            }
            append_entry(f, run, ck);
            reached.push(d.clone());
        }
        reached
    }

    /// One step of the oldest pending fan-out (see the real stores' `fanout_step`): the devices
    /// it reached, or `None` when none is pending.
    pub fn fanout_step(&mut self) -> Option<Vec<DeviceId>> {
        let (id, job) = self
            .fanouts
            .iter()
            .min_by_key(|(_, j)| j.queued)
            .map(|(k, j)| (k.clone(), j.clone()))?;
        let ck = (Owner::Account(id.0.clone()), id.1.clone());
        let reached = self.advance_account(&id.0, &job.after, self.fanout_batch, &ck);
        match reached
            .last()
            .filter(|_| reached.len() >= self.fanout_batch.max(1))
        {
            Some(last) => {
                if let Some(j) = self.fanouts.get_mut(&id) {
                    j.after = last.device.clone();
                }
            }
            None => {
                self.fanouts.remove(&id);
            }
        }
        Some(reached)
    }

    /// Retention: remove tombstones written before `now_ms - retention_ms` and their feed
    /// entries, raising each feed's floor to the highest cursor removed and each owner's
    /// watermark to the highest version removed; a pending fan-out of a purged key ends, and the
    /// devices it had not reached move their head by one and their floor to it (a resync).
    /// Returns the tombstones removed.
    pub fn purge(&mut self, now_ms: u64, retention_ms: u64) -> u64 {
        let cutoff = now_ms.saturating_sub(retention_ms);
        let old: Vec<(CKey, Hlc)> = self
            .items
            .iter()
            .filter(|(_, r)| r.item.is_none() && r.updated_ms < cutoff)
            .map(|(k, r)| (k.clone(), r.version))
            .collect();
        for (ck, version) in &old {
            self.items.remove(ck);
            let w = self.watermarks.entry(ck.0.clone()).or_insert(*version);
            *w = (*w).max(*version);
            for (d, f) in self.feeds.iter_mut() {
                if !owner_feeds(&ck.0, d) {
                    continue;
                }
                if let Some(c) = f.by_key.remove(ck) {
                    f.entries.remove(&c);
                    f.floor = f.floor.max(c);
                }
            }
            if let Owner::Account(a) = &ck.0 {
                if let Some(job) = self.fanouts.remove(&(a.clone(), ck.1.clone())) {
                    for (d, f) in self.feeds.iter_mut() {
                        if &d.account == a && d.device > job.after {
                            f.head += 1;
                            f.floor = f.head;
                        }
                    }
                }
            }
        }
        old.len() as u64
    }
}

/// The entry of `ck` at a new head of feed `f`, replacing the key's older entry; the run's first
/// append starts its generation.
fn append_entry(f: &mut Feed, run: u64, ck: &CKey) {
    if f.generations.last().is_none_or(|g| g.gen != run) {
        f.generations.push(FeedGeneration {
            gen: run,
            base: f.head,
        });
        if f.generations.len() > MAX_FEED_GENERATIONS {
            f.generations.remove(0);
        }
    }
    if let Some(old) = f.by_key.remove(ck) {
        f.entries.remove(&old);
    }
    f.head += 1;
    f.entries.insert(f.head, ck.clone());
    f.by_key.insert(ck.clone(), f.head);
}

/// Whether rows of `owner` go to `device`'s feed.
fn owner_feeds(owner: &Owner, device: &DeviceId) -> bool {
    match owner {
        Owner::Device(d) => d == device,
        Owner::Account(a) => a == &device.account,
    }
}

/// The change a feed or snapshot page carries for a row.
pub fn row_change(key: &ItemKey, rec: &CRec) -> Change {
    Change {
        model: rec.model.clone(),
        key: key.clone(),
        op: if rec.item.is_some() {
            Op::Put
        } else {
            Op::Delete
        },
        item: rec.item.clone(),
        version: rec.version,
        base: None,
    }
}

/// A cloud write transaction (a copy of the store, swapped in on commit).
pub struct CTxn {
    /// The store as this transaction sees it.
    pub s: CloudStore,
    /// The transaction's wall time, stamped on rows.
    pub now_ms: u64,
    /// Devices whose feed advanced, to tell the engine after the commit.
    pub advanced: BTreeSet<DeviceId>,
    inject: Injector,
}

impl CTxn {
    /// Begin a transaction at wall time `now_ms`; `fail_at`: fail the n-th operation.
    pub fn begin(store: &CloudStore, now_ms: u64, fail_at: Option<u32>) -> CTxn {
        CTxn {
            s: store.clone(),
            now_ms,
            advanced: BTreeSet::new(),
            inject: Injector { fail_at, ops: 0 },
        }
    }
}

impl CloudTxn for CTxn {
    type Error = StoreError;
    fn stored_row(
        &mut self,
        owner: &Owner,
        key: &ItemKey,
    ) -> Result<Option<StoredRow>, StoreError> {
        self.inject.op()?;
        Ok(self
            .s
            .items
            .get(&(owner.clone(), key.clone()))
            .map(|r| StoredRow {
                model: r.model.clone(),
                version: r.version,
                deleted: r.item.is_none(),
                base: r.base,
            }))
    }
    fn purge_watermark(&mut self, owner: &Owner) -> Result<Option<Hlc>, StoreError> {
        self.inject.op()?;
        Ok(self.s.watermarks.get(owner).copied())
    }
    fn write_row(&mut self, w: &RowWrite<'_>) -> Result<(), StoreError> {
        self.inject.op()?;
        self.s.items.insert(
            (w.owner.clone(), w.key.clone()),
            CRec {
                model: w.model.to_string(),
                item: w.item.cloned(),
                version: w.version,
                base: w.base,
                updated_ms: self.now_ms,
            },
        );
        Ok(())
    }
    fn count_push(&mut self, device: &DeviceId, counts: &PushCounts) -> Result<(), StoreError> {
        self.inject.op()?;
        let c = self.s.counts.entry(device.clone()).or_default();
        c.applied += counts.applied;
        c.duplicates += counts.duplicates;
        c.superseded += counts.superseded;
        c.rejected += counts.rejected;
        *self.s.answered.entry(device.clone()).or_default() += counts.answered();
        Ok(())
    }
    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey) -> Result<(), StoreError> {
        self.inject.op()?;
        if let Owner::Device(d) = owner {
            if !self.s.feeds.contains_key(d) {
                return Err(StoreError::UnknownDevice(d.to_string()));
            }
        }
        let ck = (owner.clone(), key.clone());
        let run = self.s.run;
        match owner {
            Owner::Device(d) => {
                if let Some(f) = self.s.feeds.get_mut(d) {
                    append_entry(f, run, &ck);
                    self.advanced.insert(d.clone());
                }
            }
            // The first batch now, the rest queued (this write starts the key's fan-out over).
            Owner::Account(a) => {
                let batch = self.s.fanout_batch;
                let reached = self.s.advance_account(a, "", batch, &ck);
                let id = (a.clone(), key.clone());
                match reached
                    .last()
                    .filter(|_| batch > 0 && reached.len() >= batch)
                {
                    Some(last) => {
                        self.s.fanout_seq += 1;
                        self.s.fanouts.insert(
                            id,
                            PendingFanout {
                                model: model.to_string(),
                                after: last.device.clone(),
                                queued: self.s.fanout_seq,
                            },
                        );
                    }
                    None => {
                        self.s.fanouts.remove(&id);
                    }
                }
                self.advanced.extend(reached);
            }
        }
        Ok(())
    }
    fn log_conflict(&mut self, conflict: &Conflict) -> Result<(), StoreError> {
        self.inject.op()?;
        if self.s.conflicts.len() >= MAX_CONFLICTS {
            self.s.conflicts.pop_front();
        }
        self.s.conflicts.push_back(conflict.clone());
        Ok(())
    }
}
