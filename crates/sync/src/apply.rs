//! The replication rules, as pure functions over storage seams.
//!
//! This module exists so that every rule about which write wins, who may write what, and how a
//! resync deletes is written once and shared by the simulator and the real drivers. The drivers
//! implement [`DeviceTxn`] (the device db) and [`CloudTxn`] (SQLite or PostgreSQL) over ONE
//! storage transaction and call [`device_apply`], [`cloud_apply_push`] or [`cloud_write`] inside
//! it, then commit; a crash at any point leaves either all of a page or push applied or none.
//!
//! Rules, in one place:
//! - A replica keeps the highest [`Hlc`] per key (items and tombstones alike); an incoming write
//!   applies only if its version is strictly higher, so replays and reorders are harmless.
//! - The cloud stores a device's pushes under [`Owner::Device`] of the sender (taken from the
//!   topic), so a device can never touch another device's rows.
//! - A write whose `base` is not the version it overwrites, from another node, is a conflict: the
//!   higher version wins everywhere and the loser is logged.
//! - A missing cloud row meets every write as a tombstone at its owner's purge watermark, so no
//!   write resurrects a key whose tombstone retention purged.
//! - A restore resync (the cloud lost data the device holds) is the truth for the models the
//!   device does not write up; for the others the device re-pushes what it holds.

use devtables_schema::{Item, ItemKey, Model, Schema};

use crate::hlc::{Hlc, HlcClock};
use crate::identity::{DeviceId, Owner};
use crate::wire::{self, Change, ChangeResult, ChangeStatus, Op, RejectReason, SnapshotCursor};

/// The item field naming the device that owns an item; a device may not push an item naming
/// another device.
pub const OWNER_FIELD: &str = "deviceId";

/// The version a store holds for a key: a live item or a tombstone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredVersion {
    /// The version of the last write applied.
    pub version: Hlc,
    /// Whether that write was a delete (the store keeps a tombstone).
    pub deleted: bool,
}

/// One device-db write transaction, as seen by the replication rules.
pub trait DeviceTxn {
    /// The store's error.
    type Error;
    /// The version held for a key (item or tombstone), if any.
    fn stored_version(
        &mut self,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredVersion>, Self::Error>;
    /// Store a remote item at `version`, without creating an outbox entry.
    fn put_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        item: Item,
        version: Hlc,
    ) -> Result<(), Self::Error>;
    /// Delete a key as a remote write, keeping a tombstone at `version`; no outbox entry.
    fn delete_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        version: Hlc,
    ) -> Result<(), Self::Error>;
    /// Whether an outbox entry exists for the key (a local write not yet acknowledged).
    fn has_pending(&mut self, model: &str, key: &ItemKey) -> Result<bool, Self::Error>;
    /// A remote write at `winner` was just applied at the key. If the key's outbox entry holds
    /// a change older than `winner`, that local change lost: remove the entry (in this
    /// transaction) and return its change. Left in the outbox, it would be sent again, and
    /// once the cloud has purged the winner's tombstone nothing would stop the cloud from
    /// taking it as new: the device (holding the winner) and the cloud would then differ.
    fn take_superseded(
        &mut self,
        model: &str,
        key: &ItemKey,
        winner: Hlc,
    ) -> Result<Option<Change>, Self::Error>;
    /// The model of the live local item at the key, if there is one. The device database keys
    /// items by (pk, sk) alone, so a change under one model must not replace another's item.
    fn live_model(&mut self, key: &ItemKey) -> Result<Option<String>, Self::Error>;
    /// Store the feed cursor (in this same transaction).
    fn set_cursor(&mut self, cursor: u64) -> Result<(), Self::Error>;
    /// Store what the device holds of its feed's history (in this same transaction), replacing
    /// the mark stored before: the device tells it in its hello ([`crate::wire::DeviceMark`]),
    /// so a cloud restored from an older backup sees that the device holds data it lost.
    fn set_feed_mark(&mut self, mark: FeedMark) -> Result<(), Self::Error>;
    /// Mark a key as present in the current resync.
    fn resync_mark_seen(&mut self, model: &str, key: &ItemKey) -> Result<(), Self::Error>;
    /// Forget all resync marks (a resync starts over).
    fn resync_clear(&mut self) -> Result<(), Self::Error>;
    /// Delete, as remote writes, every live local item of a model that syncs down, that is not
    /// marked seen and has no outbox entry; each tombstone keeps the item's own version, so
    /// versions never go backwards and any later cloud write (always higher) still applies.
    /// Then clear the marks. Returns the (model, key) of every item deleted.
    fn resync_sweep(&mut self) -> Result<Vec<(String, ItemKey)>, Self::Error>;
}

/// What a device holds of its feed's history: the generation of the feed its last applied page
/// came from and the highest feed head its pages reflect (see [`crate::wire::DeviceMark`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeedMark {
    /// The feed's generation (0: none known).
    pub gen: u64,
    /// The highest feed head the applied pages reflect.
    pub seen: u64,
}

/// A page for [`device_apply`]: what the device engine hands the driver in
/// [`crate::device::DeviceAction::Apply`].
#[derive(Clone, Debug, PartialEq)]
pub enum ApplyPage {
    /// A feed page: apply the changes, then store `to` as the cursor.
    Feed {
        /// The cursor the page follows (equals the device's cursor).
        from: u64,
        /// The cursor to store.
        to: u64,
        /// The changes.
        changes: Vec<Change>,
        /// The feed mark to store with the page (`None`: the cloud did not say).
        mark: Option<FeedMark>,
    },
    /// A resync page.
    Snapshot {
        /// The resync id.
        resync: u64,
        /// The position the page follows; `None` (the first page) clears earlier marks.
        after: Option<SnapshotCursor>,
        /// The position after the page.
        last: Option<SnapshotCursor>,
        /// The items.
        items: Vec<Change>,
        /// Whether this is the final page: sweep, then store `cursor`.
        done: bool,
        /// The feed head when the resync began.
        cursor: u64,
        /// The feed mark to store with the page (`None`: none to store, e.g. before the end of a
        /// restore resync: until its final page the device keeps the mark that shows the loss).
        mark: Option<FeedMark>,
        /// A restore resync (the cloud lost data the device holds): for models the device does
        /// not write up, the page's items are the truth even where the device holds a higher
        /// version, and the final sweep forgets the versions of what it deletes.
        restore: bool,
    },
}

/// An item of a page that the device could not accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The item's model.
    pub model: String,
    /// The item's key.
    pub key: ItemKey,
    /// Why it was skipped.
    pub reason: String,
}

/// What [`device_apply`] did; the driver passes it to
/// [`crate::device::DeviceEngine::handle_applied`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyOutcome {
    /// Changes written.
    pub applied: u64,
    /// Changes not newer than the stored version (replays, or already superseded).
    pub stale: u64,
    /// Changes of models the device does not have or that do not sync down: a cloud bug.
    pub ignored: u64,
    /// Items that failed validation against the device schema (skipped, never fatal). Bounded by
    /// the page size.
    pub invalid: Vec<Skipped>,
    /// Items applied with fields or enum values the device's schema does not define, kept as
    /// they are: the cloud runs a newer, compatible schema version.
    pub kept_from_neighbour: u64,
    /// Items deleted by the final page of a resync.
    pub swept: u64,
    /// The first [`MAX_SWEPT_REPORTED`] of them, for events: a local item the cloud never had
    /// (refused, or never sent) is deleted by a sweep only with an event naming it.
    pub swept_keys: Vec<(String, ItemKey)>,
    /// The cursor stored, if the page stored one.
    pub cursor: Option<u64>,
    /// Pending local changes that lost to a change of the page, with the version that won;
    /// their outbox entries were removed in the page's transaction. Bounded by the page size.
    pub superseded: Vec<(Change, Hlc)>,
    /// Items of models the device does not write up that a restore resync set back to the
    /// cloud's lower version (the device held a version the restored cloud lost).
    pub adopted: u64,
}

/// Most swept keys one [`ApplyOutcome`] names; the rest are counted.
pub const MAX_SWEPT_REPORTED: usize = 256;

/// [`device_apply`] failed; the caller must roll the transaction back.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError<E> {
    /// The store failed.
    #[error("device store failed while applying a page: {0}")]
    Store(#[source] E),
}

/// Apply one feed or snapshot page inside the caller's transaction.
///
/// Per change: models the device does not hold, or that do not sync down, are counted and
/// skipped; a change applies only if its version is higher than the stored one (none counts as
/// lower), or if it is the put of the very version a resync sweep turned into a tombstone; a
/// delete of an unknown key still records a tombstone; an invalid item is skipped and
/// reported. The clock observes every applied version so later local writes order after them.
pub fn device_apply<T: DeviceTxn>(
    txn: &mut T,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    page: &ApplyPage,
) -> Result<ApplyOutcome, ApplyError<T::Error>> {
    let mut out = ApplyOutcome::default();
    let (changes, snapshot, restore) = match page {
        ApplyPage::Feed { changes, .. } => (changes, false, false),
        ApplyPage::Snapshot {
            after,
            items,
            restore,
            ..
        } => {
            if after.is_none() {
                txn.resync_clear().map_err(ApplyError::Store)?;
            }
            (items, true, *restore)
        }
    };
    for change in changes {
        let Some(model) = schema.model(&change.model) else {
            out.ignored += 1;
            continue;
        };
        let process = model.process();
        if !process.on_device() || !process.syncs_down() {
            out.ignored += 1;
            continue;
        }
        if snapshot {
            txn.resync_mark_seen(&change.model, &change.key)
                .map_err(ApplyError::Store)?;
        }
        let skip = |reason: String| Skipped {
            model: change.model.clone(),
            key: change.key.clone(),
            reason,
        };
        if let Some(held) = txn.live_model(&change.key).map_err(ApplyError::Store)? {
            if held != change.model {
                out.invalid.push(skip(format!(
                    "the key is held by a local item of model {held}"
                )));
                continue;
            }
        }
        let item = match change.op {
            Op::Delete if !model.key_fits(&change.key) => {
                out.invalid.push(skip(
                    "the key is not one the model's key templates produce".into(),
                ));
                continue;
            }
            Op::Delete => None,
            // The cloud checked the item against its own schema, which may be a neighbouring
            // version of this one (upgraded first): keep what this schema does not define.
            Op::Put => match checked_item(model, change, true) {
                Ok((item, kept)) => {
                    if kept.is_some() {
                        out.kept_from_neighbour += 1;
                    }
                    Some(item)
                }
                Err(reason) => {
                    out.invalid.push(Skipped {
                        model: change.model.clone(),
                        key: change.key.clone(),
                        reason,
                    });
                    continue;
                }
            },
        };
        clock.observe(change.version, now_ms);
        let stored = txn
            .stored_version(&change.model, &change.key)
            .map_err(ApplyError::Store)?;
        // An equal version can only meet a tombstone left by a resync sweep (a real delete has
        // its own version): the put of that same version is then the truth and applies.
        let revives =
            |s: &StoredVersion| s.version == change.version && s.deleted && change.op == Op::Put;
        // A restore resync is the truth for what only the cloud writes: the device's higher
        // version is one the restored cloud lost, and keeping it would keep the two apart.
        let adopts = restore && !process.syncs_up();
        let older = stored.is_some_and(|s| s.version > change.version);
        if adopts && older {
            out.adopted += 1;
        } else if stored.is_some_and(|s| {
            s.version > change.version || (s.version == change.version && !revives(&s))
        }) {
            out.stale += 1;
            continue;
        }
        match item {
            Some(item) => txn.put_remote(&change.model, &change.key, item, change.version),
            None => txn.delete_remote(&change.model, &change.key, change.version),
        }
        .map_err(ApplyError::Store)?;
        out.applied += 1;
        if let Some(lost) = txn
            .take_superseded(&change.model, &change.key, change.version)
            .map_err(ApplyError::Store)?
        {
            out.superseded.push((lost, change.version));
        }
    }
    let cursor = match page {
        ApplyPage::Feed { to, .. } => Some(*to),
        ApplyPage::Snapshot {
            done: true, cursor, ..
        } => {
            let mut swept = txn.resync_sweep().map_err(ApplyError::Store)?;
            if restore {
                // What a restore resync sweeps of a model only the cloud writes, the restored
                // cloud never held: forget its version, so the cloud's next write of the key
                // applies even if it is lower than the one the device held.
                for (model, key) in &swept {
                    let cloud_only = schema.model(model).is_some_and(|m| !m.process().syncs_up());
                    if cloud_only {
                        txn.delete_remote(model, key, Hlc::ZERO)
                            .map_err(ApplyError::Store)?;
                    }
                }
            }
            out.swept = swept.len() as u64;
            swept.truncate(MAX_SWEPT_REPORTED);
            out.swept_keys = swept;
            Some(*cursor)
        }
        ApplyPage::Snapshot { .. } => None,
    };
    if let Some(c) = cursor {
        txn.set_cursor(c).map_err(ApplyError::Store)?;
    }
    let mark = match page {
        ApplyPage::Feed { mark, .. } | ApplyPage::Snapshot { mark, .. } => *mark,
    };
    if let Some(m) = mark {
        txn.set_feed_mark(m).map_err(ApplyError::Store)?;
    }
    out.cursor = cursor;
    Ok(out)
}

/// Validate a put's item and check it is stored under its own key.
/// With `neighbour`, the item may come from a neighbouring schema version (see
/// [`Model::normalize_from_neighbour`]); the second value then names what the strict check
/// refused and was kept.
fn checked_item(
    model: &Model,
    change: &Change,
    neighbour: bool,
) -> Result<(Item, Option<String>), String> {
    let Some(item) = change.item.clone() else {
        return Err("a put must carry its item".to_string());
    };
    let (item, kept) = if neighbour {
        let (item, forgiven) = model
            .normalize_from_neighbour(item)
            .map_err(|e| e.to_string())?;
        (item, forgiven.map(|e| e.to_string()))
    } else {
        (
            model.normalize_stored(item).map_err(|e| e.to_string())?,
            None,
        )
    };
    let key = model.primary_key(&item).map_err(|e| e.to_string())?;
    if key != change.key {
        return Err(format!(
            "the item's key ({}, {}) differs from the change's key ({}, {})",
            key.pk, key.sk, change.key.pk, change.key.sk
        ));
    }
    Ok((item, kept))
}

/// Which side of a conflict lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loser {
    /// The stored version lost (it is being overwritten).
    Stored,
    /// The incoming write lost (it is not applied).
    Incoming,
}

/// Two writes to one key where one did not build on the other; the higher version won. Logged
/// so nothing is lost silently. Both writes may come from one node: a device restored from an
/// old backup (or wiped) whose new writes meet what it wrote before the restore.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// The rows' owner.
    pub owner: Owner,
    /// The model.
    pub model: String,
    /// The key.
    pub key: ItemKey,
    /// The device whose push met the conflict; `None` for a cloud API write.
    pub device: Option<DeviceId>,
    /// The winning version.
    pub winner: Hlc,
    /// The losing version.
    pub loser: Hlc,
    /// Which side lost. When it is [`Loser::Stored`], `log_conflict` runs before the overwrite,
    /// so the store can copy the losing row itself.
    pub lost: Loser,
    /// The incoming item (`None` for a delete).
    pub incoming: Option<Item>,
}

/// The row a cloud store holds for a key of an owner: a live item or a tombstone.
///
/// A row is identified by (owner, pk, sk), the single-table design the device database shares
/// (it keys items by pk and sk alone): the model is an attribute of the row, and the rules
/// refuse a change under one model that meets a live row of another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRow {
    /// The model of the last write applied.
    pub model: String,
    /// The version of the last write applied.
    pub version: Hlc,
    /// Whether that write was a delete.
    pub deleted: bool,
    /// The version that write replaced on its writer (its `base`), if it said one.
    pub base: Option<Hlc>,
}

/// One write a [`CloudTxn`] is asked to store.
#[derive(Clone, Copy, Debug)]
pub struct RowWrite<'a> {
    /// The owner of the row.
    pub owner: &'a Owner,
    /// The model.
    pub model: &'a str,
    /// The key.
    pub key: &'a ItemKey,
    /// The item, or `None` for a tombstone.
    pub item: Option<&'a Item>,
    /// The version of the write.
    pub version: Hlc,
    /// The version the write replaced on its writer.
    pub base: Option<Hlc>,
}

/// One cloud-store write transaction, as seen by the replication rules.
///
/// The contract every store meets (SQLite, PostgreSQL, the simulation's) is checked by one
/// conformance suite, the `devtables-conformance` crate (`crates/conformance`); the rules below are the whole of it.
pub trait CloudTxn {
    /// The store's error.
    type Error;
    /// The row held for a key of an owner (item or tombstone, whatever its model), if any.
    fn stored_row(
        &mut self,
        owner: &Owner,
        key: &ItemKey,
    ) -> Result<Option<StoredRow>, Self::Error>;
    /// The owner's purge watermark: the highest version of a tombstone of this owner that
    /// retention removed (`None` if none was). A missing row counts as a tombstone at this
    /// version for every write (see [`cloud_apply_push`]).
    fn purge_watermark(&mut self, owner: &Owner) -> Result<Option<Hlc>, Self::Error>;
    /// Store an item or a tombstone, replacing the row of its key (whatever its model).
    fn write_row(&mut self, write: &RowWrite<'_>) -> Result<(), Self::Error>;
    /// Append the key (coalesced: an older entry of the key is dropped) to the feed of the device,
    /// or of every device of the account for [`Owner::Account`]; in this same transaction.
    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey)
        -> Result<(), Self::Error>;
    /// Record a conflict. The store bounds its conflict log (by age or count).
    fn log_conflict(&mut self, conflict: &Conflict) -> Result<(), Self::Error>;
    /// Add a push's outcome to the device's counters: changes written (a duplicate of the
    /// stored version is not a write), duplicates, changes superseded by a higher stored
    /// version and changes refused; and add [`PushCounts::answered`] to the device's answered
    /// count, in this same transaction, so a backup of the store holds the count that goes with
    /// its rows (the feed read returns it: [`crate::cloud::FeedPage::answered`]).
    fn count_push(&mut self, device: &DeviceId, counts: &PushCounts) -> Result<(), Self::Error>;
}

/// What one push did, per device, for the store's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushCounts {
    /// Changes written.
    pub applied: u64,
    /// Changes the store already held at exactly their version (answered `applied`, not
    /// written again).
    pub duplicates: u64,
    /// Changes that lost to a higher stored version (answered `stale`).
    pub superseded: u64,
    /// Changes refused (answered `rejected`).
    pub rejected: u64,
}

impl PushCounts {
    /// Every change answered: what the store adds to the device's answered count, which the
    /// welcome and every push acknowledgement carry (see [`crate::wire::DeviceMark`]).
    pub fn answered(&self) -> u64 {
        self.applied
            .saturating_add(self.duplicates)
            .saturating_add(self.superseded)
            .saturating_add(self.rejected)
    }
}

fn reject(change: &Change, reason: RejectReason) -> ChangeResult {
    ChangeResult {
        model: change.model.clone(),
        key: change.key.clone(),
        version: change.version,
        kept: None,
        status: ChangeStatus::Rejected { reason },
    }
}

/// Longest validation message sent back to a device, in bytes; keeps acks within size limits.
const MAX_REASON_BYTES: usize = 256;

fn short(mut s: String) -> String {
    if s.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// How far past the cloud's own time a pushed version may be, in ms, by default: one minute.
/// See [`cloud_apply_push`].
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

/// Apply a device's pushed changes inside the caller's transaction; one result per change.
///
/// `from` comes from the MQTT topic, never from the payload. `now_ms` is the cloud's wall time:
/// a version more than `max_drift_ms` past it is refused ([`RejectReason::VersionAhead`], which
/// the device answers by re-stamping the change), so no device clock can move the cloud clock,
/// and through it every other device's versions, further than that bound. The clock observes
/// every accepted version so later cloud writes order after what devices wrote.
///
/// A missing row meets every write as a tombstone at the owner's purge watermark: a device
/// offline longer than tombstone retention cannot resurrect a deleted item with a write older
/// than the delete, whether the write named a base or was a create whose acknowledgement was
/// lost. A write that loses to the watermark is answered `stale` with the watermark as winner.
pub fn cloud_apply_push<T: CloudTxn>(
    txn: &mut T,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    rules: &PushRules,
    from: &DeviceId,
    changes: &[Change],
) -> Result<Vec<ChangeResult>, T::Error> {
    let owner = Owner::Device(from.clone());
    let mut results = Vec::with_capacity(changes.len());
    let mut counts = PushCounts::default();
    for change in changes {
        let result = match push_verdict(schema, now_ms, rules, from, change) {
            Err(reason) => {
                counts.rejected += 1;
                reject(change, reason)
            }
            Ok(Verified { model, item, kept }) => {
                clock.observe(change.version, now_ms);
                let verdict =
                    write_versioned(txn, &owner, model, change, item.as_ref(), Some(from))?;
                match verdict {
                    Verdict::Written => counts.applied += 1,
                    Verdict::Duplicate => counts.duplicates += 1,
                    Verdict::Superseded(_) => counts.superseded += 1,
                    Verdict::WrongModel(_) => counts.rejected += 1,
                }
                let kept = kept.filter(|_| verdict == Verdict::Written);
                ChangeResult {
                    model: change.model.clone(),
                    key: change.key.clone(),
                    version: change.version,
                    kept,
                    status: verdict.status(),
                }
            }
        };
        results.push(result);
    }
    if counts != PushCounts::default() {
        txn.count_push(from, &counts)?;
    }
    Ok(results)
}

/// How the cloud judges one device's push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRules {
    /// How far past the cloud's time a version may be, in ms (see [`cloud_apply_push`]).
    pub max_drift_ms: u64,
    /// The device announced another schema version than the cloud's: its items are checked
    /// with [`Model::normalize_from_neighbour`] (fields and enum values the cloud's schema does
    /// not define are kept), and a model the cloud lacks is refused with
    /// [`RejectReason::NewerSchema`], which the device retries, rather than for good.
    pub from_neighbour: bool,
    /// The cloud's schema version tag, named in [`RejectReason::NewerSchema`].
    pub cloud_schema: String,
}

impl Default for PushRules {
    fn default() -> Self {
        PushRules {
            max_drift_ms: DEFAULT_MAX_DRIFT_MS,
            from_neighbour: false,
            cloud_schema: String::new(),
        }
    }
}

/// A pushed change that passed [`push_verdict`].
struct Verified<'s> {
    model: &'s Model,
    /// The validated item (`None` for a delete).
    item: Option<Item>,
    /// What the neighbour check kept that the strict check refuses.
    kept: Option<String>,
}

/// The checks a pushed change passes before it meets the store: the model, the version bound,
/// the key and the item.
fn push_verdict<'s>(
    schema: &'s Schema,
    now_ms: u64,
    rules: &PushRules,
    from: &DeviceId,
    change: &Change,
) -> Result<Verified<'s>, RejectReason> {
    let max_drift_ms = rules.max_drift_ms;
    let model = schema.model(&change.model).ok_or_else(|| {
        if rules.from_neighbour {
            RejectReason::NewerSchema {
                cloud_schema: rules.cloud_schema.clone(),
            }
        } else {
            RejectReason::UnknownModel
        }
    })?;
    let process = model.process();
    if !process.in_cloud() {
        return Err(RejectReason::NotEnabledInCloud);
    }
    if !process.syncs_up() || process.broadcast {
        return Err(RejectReason::NotSyncedUp);
    }
    let (item, kept) = match change.op {
        Op::Delete => {
            if !model.key_fits(&change.key) {
                return Err(RejectReason::KeyNotOfModel);
            }
            (None, None)
        }
        Op::Put => {
            let (item, kept) = checked_item(model, change, rules.from_neighbour)
                .map_err(|r| RejectReason::Validation(short(r)))?;
            (Some(item), kept.map(short))
        }
    };
    if let Some(owner_value) = item.as_ref().and_then(|i| i.get(OWNER_FIELD)) {
        if owner_value.as_str() != Some(from.device.as_str()) {
            return Err(RejectReason::Ownership);
        }
    }
    // Checked last, so a change that would be refused for good is not re-stamped first.
    if change.version.wall_ms > now_ms.saturating_add(max_drift_ms) {
        return Err(RejectReason::VersionAhead {
            cloud_ms: now_ms,
            max_drift_ms,
        });
    }
    Ok(Verified { model, item, kept })
}

/// What [`write_versioned`] did with one change.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// The change was stored.
    Written,
    /// The store already held exactly this version (a replay).
    Duplicate,
    /// The store holds this higher version; the change lost.
    Superseded(Hlc),
    /// A live item of this other model holds the key.
    WrongModel(String),
}

impl Verdict {
    fn status(&self) -> ChangeStatus {
        match self {
            Verdict::Written | Verdict::Duplicate => ChangeStatus::Applied,
            Verdict::Superseded(winner) => ChangeStatus::Stale { winner: *winner },
            Verdict::WrongModel(stored) => ChangeStatus::Rejected {
                reason: RejectReason::WrongModel {
                    stored: stored.clone(),
                },
            },
        }
    }
}

/// The shared last-writer-wins step: check the row's model, compare, log conflicts, write,
/// append to the feed.
fn write_versioned<T: CloudTxn>(
    txn: &mut T,
    owner: &Owner,
    model: &Model,
    change: &Change,
    item: Option<&Item>,
    device: Option<&DeviceId>,
) -> Result<Verdict, T::Error> {
    let row = txn.stored_row(owner, &change.key)?;
    if let Some(row) = &row {
        if !row.deleted && row.model != change.model {
            return Ok(Verdict::WrongModel(row.model.clone()));
        }
    }
    // A missing row meets every write as a tombstone at the owner's purge watermark: the key
    // may have held a delete that retention purged, and only the watermark still bounds its
    // version. A create that raced a purged delete of its key then loses (visibly: `stale`
    // with the watermark as winner), as does a genuinely new key written with a version below
    // the watermark (made before the purge and held since).
    let purged = match &row {
        None => txn.purge_watermark(owner)?,
        Some(_) => None,
    };
    let stored = row
        .as_ref()
        .map(|r| (r.version, r.base))
        .or(purged.map(|w| (w, None)));
    let conflict = |winner: Hlc, loser: Hlc, lost: Loser| Conflict {
        owner: owner.clone(),
        model: change.model.clone(),
        key: change.key.clone(),
        device: device.cloned(),
        winner,
        loser,
        lost,
        incoming: item.cloned(),
    };
    let syncs_down = model.process().syncs_down();
    if let Some((stored, stored_base)) = stored {
        if stored == change.version {
            return Ok(Verdict::Duplicate);
        }
        if stored > change.version {
            // A late duplicate of a write its node already replaced is no conflict: the stored
            // write built on it, or on the same base (the writer coalesced the two). Anything
            // else lost a race, or is a restored device's write meeting its own newer past.
            let replaced_by_own = stored.node == change.version.node
                && (stored_base.is_some_and(|b| b >= change.version) || stored_base == change.base);
            if !replaced_by_own {
                txn.log_conflict(&conflict(stored, change.version, Loser::Incoming))?;
            }
            if row.is_none() {
                // Bring the purged tombstone back so the feed can deliver the delete that won.
                txn.write_row(&RowWrite {
                    owner,
                    model: &change.model,
                    key: &change.key,
                    item: None,
                    version: stored,
                    base: None,
                })?;
            }
            // The writer holds a losing version; feed it the winner so it converges even when
            // the winning write reached its feed before a resync cursor it never saw.
            if syncs_down {
                txn.append_feed(owner, &change.model, &change.key)?;
            }
            return Ok(Verdict::Superseded(stored));
        }
        // The write did not build on what it overwrites: a concurrent write, or a wiped or
        // restored device overwriting its own newer past. Not a conflict: the same writer's
        // next write on the same base (it coalesced them while the first was in flight), or a
        // write that never knew the key and beats only the purge watermark (no row to lose).
        let continuation = stored.node == change.version.node && stored_base == change.base;
        let beats_only_the_watermark = row.is_none() && change.base.is_none();
        if change.base != Some(stored) && !continuation && !beats_only_the_watermark {
            txn.log_conflict(&conflict(change.version, stored, Loser::Stored))?;
        }
    }
    txn.write_row(&RowWrite {
        owner,
        model: &change.model,
        key: &change.key,
        item,
        version: change.version,
        base: change.base,
    })?;
    if syncs_down {
        txn.append_feed(owner, &change.model, &change.key)?;
    }
    Ok(Verdict::Written)
}

/// An application write through the cloud API.
#[derive(Clone, Debug, PartialEq)]
pub enum CloudOp {
    /// Create or replace an item (its key is computed from it).
    Put(Item),
    /// Delete the item with this key.
    Delete(ItemKey),
}

/// [`cloud_write`] refused the write or the store failed.
#[derive(Debug, thiserror::Error)]
pub enum CloudWriteError<E> {
    /// The schema has no such model.
    #[error("unknown model {0}: add it to the schema")]
    UnknownModel(String),
    /// The model does not live in the cloud.
    #[error("model {0} is not enabled in the cloud")]
    NotInCloud(String),
    /// The model replicates up only: its items are owned by the device.
    #[error("model {0} is owned by the device (sync: up): change it on the device")]
    UpOnly(String),
    /// Broadcast models belong to an account, others to a device: the owner given does not fit.
    #[error("model {model} needs an owner of kind {expected}")]
    WrongOwner {
        /// The model.
        model: String,
        /// `account` or `device`.
        expected: &'static str,
    },
    /// The item names another device in its owner field.
    #[error("the item's {OWNER_FIELD} does not name the owning device {0}")]
    Ownership(String),
    /// The item does not satisfy the model.
    #[error("invalid item: {0}")]
    Validation(String),
    /// A live item of another model holds the key: a write under one model may only touch
    /// rows of that model.
    #[error("the key belongs to an item of model {stored}, not {model}")]
    WrongModel {
        /// The model written.
        model: String,
        /// The model of the item holding the key.
        stored: String,
    },
    /// The key given for a delete is not one the model's key templates can produce.
    #[error("the key ({pk}, {sk}) is not a key of model {model}")]
    KeyNotOfModel {
        /// The model.
        model: String,
        /// The key's pk.
        pk: String,
        /// The key's sk.
        sk: String,
    },
    /// The cloud clock cannot issue a version.
    #[error(transparent)]
    Clock(#[from] crate::hlc::ClockExhausted),
    /// The change would not fit in one message, so it could never be delivered.
    #[error("the item is {size} bytes encoded, over the {max} byte limit")]
    TooLarge {
        /// The encoded change size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The store failed.
    #[error("cloud store failed: {0}")]
    Store(#[source] E),
}

/// Room left in a message for the envelope around one change, in bytes.
pub const ENVELOPE_HEADROOM: usize = 1024;

/// Apply an application write made through the cloud API, inside the caller's transaction.
///
/// The version is a tick of the cloud clock, moved past the stored version if needed, so an API
/// write is never silently older than what it replaces. `max_message_bytes` is the wire limit: a
/// change that could never be delivered is refused here rather than stalling a feed.
#[allow(clippy::too_many_arguments)]
pub fn cloud_write<T: CloudTxn>(
    txn: &mut T,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    max_message_bytes: usize,
    owner: &Owner,
    model_name: &str,
    op: CloudOp,
) -> Result<Change, CloudWriteError<T::Error>> {
    let Some(model) = schema.model(model_name) else {
        return Err(CloudWriteError::UnknownModel(model_name.to_string()));
    };
    let process = model.process();
    if !process.in_cloud() {
        return Err(CloudWriteError::NotInCloud(model_name.to_string()));
    }
    if process.syncs_up() && !process.syncs_down() {
        return Err(CloudWriteError::UpOnly(model_name.to_string()));
    }
    match (process.broadcast, owner) {
        (true, Owner::Account(_)) | (false, Owner::Device(_)) => {}
        (true, Owner::Device(_)) => {
            return Err(CloudWriteError::WrongOwner {
                model: model_name.to_string(),
                expected: "account",
            })
        }
        (false, Owner::Account(_)) => {
            return Err(CloudWriteError::WrongOwner {
                model: model_name.to_string(),
                expected: "device",
            })
        }
    }
    let (key, item) = match op {
        CloudOp::Delete(key) => {
            if !model.key_fits(&key) {
                return Err(CloudWriteError::KeyNotOfModel {
                    model: model_name.to_string(),
                    pk: key.pk,
                    sk: key.sk,
                });
            }
            (key, None)
        }
        CloudOp::Put(item) => {
            let item = model
                .normalize_stored(item)
                .map_err(|e| CloudWriteError::Validation(e.to_string()))?;
            let key = model
                .primary_key(&item)
                .map_err(|e| CloudWriteError::Validation(e.to_string()))?;
            if let (Owner::Device(d), Some(v)) = (owner, item.get(OWNER_FIELD)) {
                if v.as_str() != Some(d.device.as_str()) {
                    return Err(CloudWriteError::Ownership(d.to_string()));
                }
            }
            (key, Some(item))
        }
    };
    let row = txn
        .stored_row(owner, &key)
        .map_err(CloudWriteError::Store)?;
    if let Some(row) = &row {
        if !row.deleted && row.model != model_name {
            return Err(CloudWriteError::WrongModel {
                model: model_name.to_string(),
                stored: row.model.clone(),
            });
        }
        clock.observe(row.version, now_ms);
    }
    let version = clock.tick(now_ms)?;
    let change = Change {
        model: model_name.to_string(),
        key,
        op: if item.is_some() { Op::Put } else { Op::Delete },
        item,
        version,
        base: row.map(|r| r.version),
    };
    let size = wire::change_len(&change);
    if size.saturating_add(ENVELOPE_HEADROOM) > max_message_bytes {
        return Err(CloudWriteError::TooLarge {
            size,
            max: max_message_bytes.saturating_sub(ENVELOPE_HEADROOM),
        });
    }
    match write_versioned(txn, owner, model, &change, change.item.as_ref(), None)
        .map_err(CloudWriteError::Store)?
    {
        Verdict::Written | Verdict::Duplicate | Verdict::Superseded(_) => Ok(change),
        Verdict::WrongModel(stored) => Err(CloudWriteError::WrongModel {
            model: model_name.to_string(),
            stored,
        }),
    }
}
