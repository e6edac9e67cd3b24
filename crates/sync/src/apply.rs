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
    /// Store the feed cursor (in this same transaction).
    fn set_cursor(&mut self, cursor: u64) -> Result<(), Self::Error>;
    /// Mark a key as present in the current resync.
    fn resync_mark_seen(&mut self, model: &str, key: &ItemKey) -> Result<(), Self::Error>;
    /// Forget all resync marks (a resync starts over).
    fn resync_clear(&mut self) -> Result<(), Self::Error>;
    /// Delete, as remote writes, every live local item of a model that syncs down, that is not
    /// marked seen and has no outbox entry; each tombstone keeps the item's own version, so
    /// versions never go backwards and any later cloud write (always higher) still applies.
    /// Then clear the marks. Returns how many items were deleted.
    fn resync_sweep(&mut self) -> Result<u64, Self::Error>;
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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
    /// Items deleted by the final page of a resync.
    pub swept: u64,
    /// The cursor stored, if the page stored one.
    pub cursor: Option<u64>,
}

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
    let (changes, snapshot) = match page {
        ApplyPage::Feed { changes, .. } => (changes, false),
        ApplyPage::Snapshot { after, items, .. } => {
            if after.is_none() {
                txn.resync_clear().map_err(ApplyError::Store)?;
            }
            (items, true)
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
        let item = match change.op {
            Op::Delete => None,
            Op::Put => match checked_item(model, change) {
                Ok(item) => Some(item),
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
        if stored.is_some_and(|s| {
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
    }
    let cursor = match page {
        ApplyPage::Feed { to, .. } => Some(*to),
        ApplyPage::Snapshot {
            done: true, cursor, ..
        } => {
            out.swept = txn.resync_sweep().map_err(ApplyError::Store)?;
            Some(*cursor)
        }
        ApplyPage::Snapshot { .. } => None,
    };
    if let Some(c) = cursor {
        txn.set_cursor(c).map_err(ApplyError::Store)?;
    }
    out.cursor = cursor;
    Ok(out)
}

/// Validate a put's item and check it is stored under its own key.
fn checked_item(model: &Model, change: &Change) -> Result<Item, String> {
    let Some(item) = change.item.clone() else {
        return Err("a put must carry its item".to_string());
    };
    let item = model.normalize_stored(item).map_err(|e| e.to_string())?;
    let key = model.primary_key(&item).map_err(|e| e.to_string())?;
    if key != change.key {
        return Err(format!(
            "the item's key ({}, {}) differs from the change's key ({}, {})",
            key.pk, key.sk, change.key.pk, change.key.sk
        ));
    }
    Ok(item)
}

/// Which side of a conflict lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loser {
    /// The stored version lost (it is being overwritten).
    Stored,
    /// The incoming write lost (it is not applied).
    Incoming,
}

/// Two concurrent writes to one key; the higher version won. Logged so nothing is lost silently.
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

/// One cloud-store write transaction, as seen by the replication rules.
pub trait CloudTxn {
    /// The store's error.
    type Error;
    /// The version held for a key of an owner (item or tombstone), if any.
    fn stored_version(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredVersion>, Self::Error>;
    /// Store an item at `version`.
    fn put_item(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
        item: &Item,
        version: Hlc,
    ) -> Result<(), Self::Error>;
    /// Delete an item, keeping a tombstone at `version`.
    fn tombstone(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
        version: Hlc,
    ) -> Result<(), Self::Error>;
    /// Append the key (coalesced: an older entry of the key is dropped) to the feed of the device,
    /// or of every device of the account for [`Owner::Account`]; in this same transaction.
    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey)
        -> Result<(), Self::Error>;
    /// Record a conflict. The store bounds its conflict log (by age or count).
    fn log_conflict(&mut self, conflict: &Conflict) -> Result<(), Self::Error>;
}

fn reject(change: &Change, reason: RejectReason) -> ChangeResult {
    ChangeResult {
        model: change.model.clone(),
        key: change.key.clone(),
        version: change.version,
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

/// Apply a device's pushed changes inside the caller's transaction; one result per change.
///
/// `from` comes from the MQTT topic, never from the payload. The clock observes every version so
/// later cloud writes order after what devices wrote.
pub fn cloud_apply_push<T: CloudTxn>(
    txn: &mut T,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    from: &DeviceId,
    changes: &[Change],
) -> Result<Vec<ChangeResult>, T::Error> {
    let owner = Owner::Device(from.clone());
    let mut results = Vec::with_capacity(changes.len());
    for change in changes {
        let Some(model) = schema.model(&change.model) else {
            results.push(reject(change, RejectReason::UnknownModel));
            continue;
        };
        let process = model.process();
        if !process.in_cloud() {
            results.push(reject(change, RejectReason::NotEnabledInCloud));
            continue;
        }
        if !process.syncs_up() || process.broadcast {
            results.push(reject(change, RejectReason::NotSyncedUp));
            continue;
        }
        let item = match change.op {
            Op::Delete => None,
            Op::Put => match checked_item(model, change) {
                Ok(item) => Some(item),
                Err(reason) => {
                    results.push(reject(change, RejectReason::Validation(short(reason))));
                    continue;
                }
            },
        };
        if let Some(item) = &item {
            if let Some(owner_value) = item.get(OWNER_FIELD) {
                if owner_value.as_str() != Some(from.device.as_str()) {
                    results.push(reject(change, RejectReason::Ownership));
                    continue;
                }
            }
        }
        clock.observe(change.version, now_ms);
        let status = write_versioned(txn, &owner, model, change, item.as_ref(), Some(from))?;
        results.push(ChangeResult {
            model: change.model.clone(),
            key: change.key.clone(),
            version: change.version,
            status,
        });
    }
    Ok(results)
}

/// The shared last-writer-wins step: compare, log conflicts, write, append to the feed.
fn write_versioned<T: CloudTxn>(
    txn: &mut T,
    owner: &Owner,
    model: &Model,
    change: &Change,
    item: Option<&Item>,
    device: Option<&DeviceId>,
) -> Result<ChangeStatus, T::Error> {
    let stored = txn.stored_version(owner, &change.model, &change.key)?;
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
    if let Some(s) = stored {
        if s.version == change.version {
            return Ok(ChangeStatus::Applied);
        }
        if s.version > change.version {
            if s.version.node != change.version.node {
                txn.log_conflict(&conflict(s.version, change.version, Loser::Incoming))?;
            }
            // The writer holds a losing version; feed it the winner so it converges even when
            // the winning write reached its feed before a resync cursor it never saw.
            if model.process().syncs_down() {
                txn.append_feed(owner, &change.model, &change.key)?;
            }
            return Ok(ChangeStatus::Stale);
        }
        if change.base != Some(s.version) && s.version.node != change.version.node {
            txn.log_conflict(&conflict(change.version, s.version, Loser::Stored))?;
        }
    }
    match item {
        Some(item) => txn.put_item(owner, &change.model, &change.key, item, change.version)?,
        None => txn.tombstone(owner, &change.model, &change.key, change.version)?,
    }
    if model.process().syncs_down() {
        txn.append_feed(owner, &change.model, &change.key)?;
    }
    Ok(ChangeStatus::Applied)
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
        CloudOp::Delete(key) => (key, None),
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
    let stored = txn
        .stored_version(owner, model_name, &key)
        .map_err(CloudWriteError::Store)?;
    if let Some(s) = stored {
        clock.observe(s.version, now_ms);
    }
    let version = clock.tick(now_ms);
    let change = Change {
        model: model_name.to_string(),
        key,
        op: if item.is_some() { Op::Put } else { Op::Delete },
        item,
        version,
        base: stored.map(|s| s.version),
    };
    let size = wire::change_len(&change);
    if size.saturating_add(ENVELOPE_HEADROOM) > max_message_bytes {
        return Err(CloudWriteError::TooLarge {
            size,
            max: max_message_bytes.saturating_sub(ENVELOPE_HEADROOM),
        });
    }
    write_versioned(txn, owner, model, &change, change.item.as_ref(), None)
        .map_err(CloudWriteError::Store)?;
    Ok(change)
}
