//! The replication state kept in the device database's side tables, written in the same
//! transactions as the items it describes.
//!
//! - `outbox`: item key → the newest unacknowledged local change of that key (JSON `Entry`).
//!   Written by [`OutboxRecorder`] inside the transaction of the local write, so a crash can never
//!   separate a change from its outbox entry (the original agent's pending-change log was written
//!   after the commit and could lose it).
//! - `outbox_seq`: sequence → item key: the outbox in first-write order (restore, oldest first).
//! - `outbox_lossy`: sequence → item key, for models marked `lossy` (what a full outbox drops).
//! - `versions`: item key → the HLC version (and deleted flag, model, wall time of the write) of
//!   the last write of the key, local or remote: the base of the next local write and the
//!   conflict rule's input. Bounded by [`collect_versions`], which forgets old tombstones and
//!   versions nobody needs any more.
//! - `sync_meta`: the feed cursor, the last HLC issued, counters, and what the device holds of
//!   the cloud's history (its feed mark and the cloud's answered count of its pushes, told in
//!   every hello so a cloud restored from an older backup sees what it lost).
//! - `resync_seen`: keys received during a full resync (swept at its end).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devtables_db::{
    ChangeOp, DbError, FindOptions, ItemChange, Origin, SideTables, WriteInterceptor, WriteTxn,
};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{DeviceTxn, FeedMark, StoredVersion};
use devtables_sync::device::OutboxMeta;
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::wire::{self, Op};
use serde::{Deserialize, Serialize};

use crate::counted::DbAccess;

pub(crate) const OUTBOX: &str = "outbox";
pub(crate) const OUTBOX_SEQ: &str = "outbox_seq";
pub(crate) const OUTBOX_LOSSY: &str = "outbox_lossy";
pub(crate) const VERSIONS: &str = "versions";
pub(crate) const META: &str = "sync_meta";
pub(crate) const RESYNC_SEEN: &str = "resync_seen";

const META_CURSOR: &[u8] = b"cursor";
const META_HLC: &[u8] = b"hlc";
const META_NEXT_SEQ: &[u8] = b"outbox_next_seq";
const META_DROPPED: &[u8] = b"dropped";
const META_FEED_GEN: &[u8] = b"feed_gen";
const META_FEED_SEEN: &[u8] = b"feed_seen";
const META_ANSWERED: &[u8] = b"answered";
/// The schema version tag (`Schema::tag`) the device last synced under.
const META_SCHEMA_TAG: &[u8] = b"schema_tag";

/// The local write was refused because the outbox is full and holds nothing lossy to drop.
#[derive(Debug, thiserror::Error)]
#[error("the sync outbox is full ({limit} unacknowledged changes): the device has been offline too long; \
writes of synced models are refused until the cloud acknowledges changes (raise agent outbox_limit, or mark \
high-volume models `lossy` in the schema's process block)")]
pub struct OutboxFull {
    pub limit: u64,
}

/// One `versions` record. `m` and `t` were added later: records written before them have
/// neither, which the collection treats as "model unknown" and "written now" (it stamps them).
#[derive(Serialize, Deserialize)]
struct Version {
    v: String,
    #[serde(default)]
    d: bool,
    /// The model of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    m: Option<String>,
    /// Wall time of the write (ms since the epoch): the age of a tombstone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    change: wire::Change,
}

pub(crate) fn raw_key(key: &ItemKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.pk.len() + key.sk.len() + 1);
    out.extend_from_slice(key.pk.as_bytes());
    out.push(0);
    out.extend_from_slice(key.sk.as_bytes());
    out
}

/// The item key of a side-table key made by [`raw_key`] (keys hold no NUL: the db refuses them).
pub(crate) fn key_from_raw(raw: &[u8]) -> Option<ItemKey> {
    let at = raw.iter().position(|b| *b == 0)?;
    Some(ItemKey {
        pk: String::from_utf8(raw[..at].to_vec()).ok()?,
        sk: String::from_utf8(raw[at + 1..].to_vec()).ok()?,
    })
}

fn wall_now() -> u64 {
    devtables_db::system_now_ms().max(0) as u64
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> DbError {
    DbError::Corrupt(format!("replication state ({what}): {e}"))
}

fn get_version(side: &SideTables<'_>, key: &ItemKey) -> Result<Option<StoredVersion>, DbError> {
    let Some(raw) = side.get(VERSIONS, &raw_key(key))? else {
        return Ok(None);
    };
    let v: Version = serde_json::from_slice(&raw).map_err(|e| corrupt("version", e))?;
    let version = wire::hlc_from_str(&v.v).map_err(|e| corrupt("version", e))?;
    Ok(Some(StoredVersion {
        version,
        deleted: v.d,
    }))
}

fn put_version(
    side: &mut SideTables<'_>,
    model: &str,
    key: &ItemKey,
    version: Hlc,
    deleted: bool,
) -> Result<(), DbError> {
    let v = Version {
        v: wire::hlc_to_string(version),
        d: deleted,
        m: Some(model.to_string()),
        t: Some(wall_now()),
    };
    let bytes = serde_json::to_vec(&v)?;
    side.put(VERSIONS, &raw_key(key), &bytes)
}

fn get_u64(side: &SideTables<'_>, key: &[u8]) -> Result<u64, DbError> {
    Ok(match side.get(META, key)? {
        Some(raw) => {
            let bytes: [u8; 8] = raw
                .as_slice()
                .try_into()
                .map_err(|_| corrupt("counter", "not 8 bytes"))?;
            u64::from_be_bytes(bytes)
        }
        None => 0,
    })
}

fn put_u64(side: &mut SideTables<'_>, key: &[u8], value: u64) -> Result<(), DbError> {
    side.put(META, key, &value.to_be_bytes())
}

/// Records the outbox entry and version of every local change of a model that syncs up, inside
/// the write transaction (installed as the database's [`WriteInterceptor`]).
pub(crate) struct OutboxRecorder {
    pub(crate) schema: Arc<Schema>,
    pub(crate) clock: Arc<Mutex<HlcClock>>,
    /// Cloud time minus this device's clock, in ms, learnt from the last welcome: versions are
    /// stamped on the cloud's time, so a wrong device clock does not make them refused.
    pub(crate) cloud_offset_ms: Arc<AtomicI64>,
    /// Most entries in the outbox.
    pub(crate) limit: u64,
    /// Largest encoded change one push message can carry.
    pub(crate) max_change_bytes: usize,
}

/// The local write was refused because its change could never be sent to the cloud.
#[derive(Debug, thiserror::Error)]
#[error(
    "the {model} change is {size} bytes encoded, more than the {max} bytes one sync message \
carries: it could never reach the cloud; store less in one item (or raise the sync max_batch_bytes \
and the wire max_message_bytes on both sides)"
)]
pub struct ChangeTooLarge {
    pub model: String,
    pub size: usize,
    pub max: usize,
}

impl WriteInterceptor for OutboxRecorder {
    fn on_change(&self, side: &mut SideTables<'_>, change: &ItemChange) -> Result<(), DbError> {
        if change.origin != Origin::Local {
            return Ok(());
        }
        let Some(model) = self.schema.model(&change.model) else {
            return Ok(());
        };
        let process = model.process();
        if !process.syncs_up() {
            return Ok(());
        }
        let stored = get_version(side, &change.key)?.map(|v| v.version);
        let key = raw_key(&change.key);
        let pending: Option<Entry> = match side.get(OUTBOX, &key)? {
            Some(raw) => Some(serde_json::from_slice(&raw).map_err(|e| corrupt("outbox", e))?),
            None => None,
        };
        // The base is the version the cloud knows: a change coalesced with a pending one keeps
        // that one's base (the cloud never saw the version in between).
        let base = match &pending {
            Some(p) => p.change.base,
            None => stored,
        };
        let version = {
            let mut clock = self.clock.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(stored) = stored {
                clock.observe(stored, 0);
            }
            let now = devtables_db::system_now_ms()
                .max(0)
                .saturating_add(self.cloud_offset_ms.load(Ordering::Relaxed));
            clock
                .tick(now.max(0) as u64)
                .map_err(|e| DbError::Refused(Box::new(e)))?
        };
        let deleted = change.op == ChangeOp::Remove;
        let entry_change = wire::Change {
            model: change.model.clone(),
            key: change.key.clone(),
            op: if deleted { Op::Delete } else { Op::Put },
            item: if deleted { None } else { change.new.clone() },
            version,
            base,
        };
        // A change no message can carry would never reach the cloud: refuse the write itself,
        // so the application hears it now rather than the change vanishing from the outbox.
        let size = wire::change_len(&entry_change);
        if size > self.max_change_bytes {
            return Err(DbError::Refused(Box::new(ChangeTooLarge {
                model: change.model.clone(),
                size,
                max: self.max_change_bytes,
            })));
        }
        put_version(side, &change.model, &change.key, version, deleted)?;
        side.put(META, META_HLC, wire::hlc_to_string(version).as_bytes())?;

        match pending {
            Some(old) => {
                // Coalesce: the newest change of a key replaces the queued one.
                side.remove(OUTBOX_SEQ, &old.seq.to_be_bytes())?;
                side.remove(OUTBOX_LOSSY, &old.seq.to_be_bytes())?;
            }
            None => {
                if side.len(OUTBOX)? >= self.limit {
                    make_room(side, self.limit)?;
                }
            }
        }
        let seq = get_u64(side, META_NEXT_SEQ)? + 1;
        put_u64(side, META_NEXT_SEQ, seq)?;
        let entry = Entry {
            seq,
            change: entry_change,
        };
        side.put(OUTBOX, &key, &serde_json::to_vec(&entry)?)?;
        side.put(OUTBOX_SEQ, &seq.to_be_bytes(), &key)?;
        if process.lossy {
            side.put(OUTBOX_LOSSY, &seq.to_be_bytes(), &key)?;
        }
        Ok(())
    }
}

/// A full outbox drops its oldest lossy entry (counted), or refuses the write.
fn make_room(side: &mut SideTables<'_>, limit: u64) -> Result<(), DbError> {
    let oldest = side.scan(OUTBOX_LOSSY, b"", 1)?;
    let Some((seq, key)) = oldest.into_iter().next() else {
        return Err(DbError::Refused(Box::new(OutboxFull { limit })));
    };
    side.remove(OUTBOX_LOSSY, &seq)?;
    side.remove(OUTBOX_SEQ, &seq)?;
    side.remove(OUTBOX, &key)?;
    let dropped = get_u64(side, META_DROPPED)? + 1;
    put_u64(side, META_DROPPED, dropped)?;
    tracing::warn!(
        dropped,
        "outbox full: dropped the oldest change of a lossy model"
    );
    Ok(())
}

/// What the agent restores from the database when it starts.
pub(crate) struct RestoredState {
    pub(crate) cursor: u64,
    /// The outbox as the engine keeps it: metadata only, oldest first.
    pub(crate) outbox: Vec<OutboxMeta>,
    pub(crate) last_hlc: Option<Hlc>,
    /// The feed mark stored with the last page that stored one.
    pub(crate) mark: FeedMark,
    /// The cloud's answered count stored with the last outbox trim.
    pub(crate) answered: u64,
}

pub(crate) fn restore(db: &impl DbAccess) -> Result<RestoredState, DbError> {
    let cursor = match db.side_get(META, META_CURSOR)? {
        Some(v) => u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| corrupt("cursor", "not 8 bytes"))?,
        ),
        None => 0,
    };
    let last_hlc = match db.side_get(META, META_HLC)? {
        Some(v) => {
            let s = String::from_utf8_lossy(&v);
            Some(wire::hlc_from_str(&s).map_err(|e| corrupt("hlc", e))?)
        }
        None => None,
    };
    let outbox = load_outbox(db)?;
    let meta = |key: &[u8]| -> Result<u64, DbError> {
        match db.side_get(META, key)? {
            Some(v) => {
                Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(
                    |_| corrupt("sync_meta", "a counter is not 8 bytes"),
                )?))
            }
            None => Ok(0),
        }
    };
    Ok(RestoredState {
        cursor,
        outbox,
        last_hlc,
        mark: FeedMark {
            gen: meta(META_FEED_GEN)?,
            seen: meta(META_FEED_SEEN)?,
        },
        answered: meta(META_ANSWERED)?,
    })
}

/// Entries read per read transaction when the whole outbox is loaded.
const OUTBOX_PAGE: usize = 1000;

/// The metadata of the whole durable outbox, oldest first: what the engine resumes from, and
/// what the event loop reloads after a missed notification. The entries are read a page at a
/// time and only their metadata is kept, so this never holds the outbox's items in memory.
pub(crate) fn load_outbox(db: &impl DbAccess) -> Result<Vec<OutboxMeta>, DbError> {
    let mut entries = Vec::new();
    let mut start = Vec::new();
    loop {
        let page = db.side_scan(OUTBOX, &start, OUTBOX_PAGE)?;
        let full = page.len() == OUTBOX_PAGE;
        for (key, raw) in &page {
            let entry: Entry = serde_json::from_slice(raw).map_err(|e| corrupt("outbox", e))?;
            entries.push((entry.seq, OutboxMeta::of(&entry.change)));
            start.clone_from(key);
        }
        if !full {
            break;
        }
        start.push(0);
    }
    entries.sort_by_key(|(seq, _)| *seq);
    Ok(entries.into_iter().map(|(_, m)| m).collect())
}

/// The current outbox entries of these keys (a batch being built); keys without one are left
/// out.
pub(crate) fn outbox_entries(
    db: &impl DbAccess,
    keys: &[(String, ItemKey)],
) -> Result<Vec<wire::Change>, DbError> {
    let mut out = Vec::with_capacity(keys.len());
    for (_, key) in keys {
        if let Some(change) = outbox_entry(db, key)? {
            out.push(change);
        }
    }
    Ok(out)
}

/// Entries in the durable outbox: the local changes not yet acknowledged.
pub(crate) fn outbox_len(db: &impl DbAccess) -> Result<u64, DbError> {
    db.side_len(OUTBOX)
}

/// The stored version of a key, outside a write transaction.
pub(crate) fn stored_version(db: &impl DbAccess, key: &ItemKey) -> Result<Option<Hlc>, DbError> {
    let Some(raw) = db.side_get(VERSIONS, &raw_key(key))? else {
        return Ok(None);
    };
    let v: Version = serde_json::from_slice(&raw).map_err(|e| corrupt("version", e))?;
    Ok(Some(
        wire::hlc_from_str(&v.v).map_err(|e| corrupt("version", e))?,
    ))
}

/// What one slice of [`collect_versions`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct GcSlice {
    /// Tombstone versions older than the retention, removed.
    pub(crate) tombstones: u64,
    /// Versions of live items without an outbox entry whose model does not sync down, removed.
    pub(crate) unneeded: u64,
    /// Records without a timestamp (written by an older agent), stamped with the current time.
    pub(crate) stamped: u64,
    /// Where the next slice starts; `None` when the pass reached the end of the table.
    pub(crate) next: Option<Vec<u8>>,
}

/// Examines up to `limit` version records from `start` (in key order) and forgets those nobody
/// needs:
/// - a tombstone (a deleted key, or a key whose item is gone) written longer than `retention_ms`
///   ago: the cloud forgets its own tombstone after the same time, so nothing older can still
///   arrive that the tombstone must defeat;
/// - the version of a live item of a model that does not sync down: nothing arrives from the
///   cloud to compare it with, and the next local write simply has no base (correct for a model
///   the device alone writes). A re-push after a cloud restore sends such an item with a fresh
///   version ([`repush_slice`]). Its tombstone, though, is the only trace of an acknowledged
///   delete a restored cloud may have lost: it is kept for `retention_ms` like any other, so
///   the re-push can give the delete back.
///
/// A key with an outbox entry keeps its version whatever its age (the entry's write is not
/// acknowledged yet). Runs in the caller's transaction, so the outbox check and the removal
/// agree.
pub(crate) fn collect_versions(
    txn: &mut WriteTxn<'_>,
    schema: &Schema,
    start: &[u8],
    limit: usize,
    now_ms: u64,
    retention_ms: u64,
) -> Result<GcSlice, DbError> {
    let limit = limit.max(1);
    let rows = txn.side().scan(VERSIONS, start, limit)?;
    let mut out = GcSlice::default();
    if rows.len() == limit {
        out.next = rows.last().map(|(k, _)| {
            let mut next = k.clone();
            next.push(0);
            next
        });
    }
    for (raw, bytes) in rows {
        if txn.side().get(OUTBOX, &raw)?.is_some() {
            continue;
        }
        let mut v: Version = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                // Left alone: the write path reports it as corruption when the key is used.
                tracing::warn!("version collection: unreadable version record skipped: {e}");
                continue;
            }
        };
        let live = match key_from_raw(&raw) {
            Some(key) => txn.get_stored(&key)?.map(|(m, _)| m.name().to_string()),
            None => None,
        };
        let model = v.m.clone().or(live.clone());
        let syncs_down = match &model {
            Some(m) => schema.model(m).is_some_and(|m| m.process().syncs_down()),
            // An old record of a deleted key: only its age can retire it.
            None => true,
        };
        let mut side = txn.side();
        let tombstone = v.d || live.is_none();
        if !syncs_down && !tombstone {
            side.remove(VERSIONS, &raw)?;
            out.unneeded += 1;
            continue;
        }
        match v.t {
            None => {
                v.t = Some(now_ms);
                if v.m.is_none() {
                    v.m = model;
                }
                side.put(VERSIONS, &raw, &serde_json::to_vec(&v)?)?;
                out.stamped += 1;
            }
            Some(t) if tombstone && now_ms.saturating_sub(t) > retention_ms => {
                side.remove(VERSIONS, &raw)?;
                out.tombstones += 1;
            }
            Some(_) => {}
        }
    }
    Ok(out)
}

/// The current outbox entry of a key (after a commit: what to hand the engine).
pub(crate) fn outbox_entry(
    db: &impl DbAccess,
    key: &ItemKey,
) -> Result<Option<wire::Change>, DbError> {
    match db.side_get(OUTBOX, &raw_key(key))? {
        Some(v) => {
            let entry: Entry = serde_json::from_slice(&v).map_err(|e| corrupt("outbox", e))?;
            Ok(Some(entry.change))
        }
        None => Ok(None),
    }
}

/// Removes acknowledged outbox entries whose version still matches, and raises the stored
/// answered count to `answered` if it is higher, in the same transaction: an answered change
/// leaves the outbox only with the count that lets a restored cloud see it lost it.
pub(crate) fn outbox_remove(
    txn: &mut WriteTxn<'_>,
    acked: &[(String, ItemKey, Hlc)],
    answered: Option<u64>,
) -> Result<u64, DbError> {
    let mut side = txn.side();
    if let Some(a) = answered {
        if a > get_u64(&side, META_ANSWERED)? {
            put_u64(&mut side, META_ANSWERED, a)?;
        }
    }
    let mut removed = 0;
    for (_, key, version) in acked {
        let raw = raw_key(key);
        let Some(bytes) = side.get(OUTBOX, &raw)? else {
            continue;
        };
        let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| corrupt("outbox", e))?;
        if entry.change.version != *version {
            continue;
        }
        side.remove(OUTBOX, &raw)?;
        side.remove(OUTBOX_SEQ, &entry.seq.to_be_bytes())?;
        side.remove(OUTBOX_LOSSY, &entry.seq.to_be_bytes())?;
        removed += 1;
    }
    Ok(removed)
}

/// Gives an outbox entry a new version on the cloud's time, after the cloud refused its version
/// as too far in the future; `None` if the entry no longer holds `version` (a newer local write
/// replaced it). The clock is rewound to `cloud_ms` first: every version beyond it was refused,
/// so none exists anywhere else.
pub(crate) fn restamp(
    txn: &mut WriteTxn<'_>,
    clock: &Mutex<HlcClock>,
    stamp_ms: u64,
    key: &ItemKey,
    version: Hlc,
    cloud_ms: u64,
) -> Result<Option<wire::Change>, DbError> {
    let mut side = txn.side();
    let raw = raw_key(key);
    let Some(bytes) = side.get(OUTBOX, &raw)? else {
        return Ok(None);
    };
    let mut entry: Entry = serde_json::from_slice(&bytes).map_err(|e| corrupt("outbox", e))?;
    if entry.change.version != version {
        return Ok(None);
    }
    let new = {
        let mut clock = clock.lock().unwrap_or_else(PoisonError::into_inner);
        clock.rewind_to(cloud_ms);
        clock
            .tick(stamp_ms)
            .map_err(|e| DbError::Refused(Box::new(e)))?
    };
    entry.change.version = new;
    put_version(
        &mut side,
        &entry.change.model,
        key,
        new,
        entry.change.op == Op::Delete,
    )?;
    side.put(META, META_HLC, wire::hlc_to_string(new).as_bytes())?;
    side.put(OUTBOX, &raw, &serde_json::to_vec(&entry)?)?;
    Ok(Some(entry.change))
}

/// Replaces the stored answered count (at the end of a re-push after a cloud restore).
/// Records the schema the device now syncs under. When it differs from the recorded one (the
/// device was upgraded), the feed cursor goes back to 0 in the same transaction: what the cloud
/// sent under the old schema and this device skipped (a model or a value it lacked) comes
/// again, and what it holds already is answered stale. Returns the old tag when it changed; a
/// database that never recorded one just records it.
pub(crate) fn note_schema(txn: &mut WriteTxn<'_>, tag: &str) -> Result<Option<String>, DbError> {
    let mut side = txn.side();
    let old = side
        .get(META, META_SCHEMA_TAG)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    if old.as_deref() == Some(tag) {
        return Ok(None);
    }
    side.put(META, META_SCHEMA_TAG, tag.as_bytes())?;
    if old.is_some() {
        put_u64(&mut side, META_CURSOR, 0)?;
    }
    Ok(old)
}

pub(crate) fn store_answered(txn: &mut WriteTxn<'_>, answered: u64) -> Result<(), DbError> {
    put_u64(&mut txn.side(), META_ANSWERED, answered)
}

/// Where a re-push after a cloud restore stands ([`repush_slice`]): the live items of each
/// model that syncs up, a page at a time, then the tombstones of the `versions` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RepushPos {
    /// The live items of the `model`-th up-syncing model (in name order), from the find page
    /// token `next`.
    Items { model: usize, next: Option<String> },
    /// The `versions` records from this raw key on: the tombstones.
    Tombstones { from: Vec<u8> },
}

/// What one slice of a re-push did.
#[derive(Debug, Default)]
pub(crate) struct RepushSlice {
    /// The outbox entries added (to hand to the engine).
    pub(crate) requeued: Vec<wire::Change>,
    /// Where the next slice starts; `None` when the scan is done.
    pub(crate) next: Option<RepushPos>,
    /// Tombstones left out because their record does not name a model (written by an agent
    /// that predates the model field and not stamped since).
    pub(crate) unknown_model: u64,
    /// Live items that got a fresh version because theirs was collected (up-only models).
    pub(crate) restamped: u64,
}

/// The models whose writes a re-push puts back: those that live on the device and sync up.
fn up_syncing_models(schema: &Schema) -> Vec<String> {
    let mut models: Vec<String> = schema
        .models()
        .filter(|m| m.process().syncs_up() && m.process().on_device())
        .map(|m| m.name().to_string())
        .collect();
    models.sort();
    models
}

/// One slice of the re-push after a cloud restore ([`devtables_sync::device::DeviceAction::Repush`]):
/// at most `limit` held writes examined from `pos`, in one write transaction. Every live item
/// and every tombstone of a model that syncs up and has no outbox entry gets one carrying it,
/// at the version the device holds, without a base; a live item whose version the collection
/// forgot (an up-only model's, once acknowledged) gets a fresh version ticked on `stamp_ms`, so
/// it is sent as it is now. The outbox limit does not apply: the entries are bounded by what
/// the device holds.
pub(crate) fn repush_slice(
    db: &impl DbAccess,
    schema: &Schema,
    clock: &Mutex<HlcClock>,
    stamp_ms: u64,
    pos: RepushPos,
    limit: usize,
) -> Result<RepushSlice, DbError> {
    let limit = limit.max(1);
    let models = up_syncing_models(schema);
    match pos {
        RepushPos::Items { model, next } => {
            let Some(name) = models.get(model) else {
                return repush_slice(
                    db,
                    schema,
                    clock,
                    stamp_ms,
                    RepushPos::Tombstones { from: Vec::new() },
                    limit,
                );
            };
            let Some(m) = schema.model(name) else {
                return Ok(RepushSlice {
                    next: Some(RepushPos::Items {
                        model: model + 1,
                        next: None,
                    }),
                    ..RepushSlice::default()
                });
            };
            let options = FindOptions {
                limit: Some(limit),
                next,
                hidden: true,
                ..FindOptions::default()
            };
            let page = db.find(name, &Item::new(), &options)?;
            let keys: Vec<ItemKey> = page
                .items
                .iter()
                .filter_map(|item| m.primary_key(item).ok())
                .collect();
            let mut out = db.write(Origin::Remote, |txn| {
                let mut out = RepushSlice::default();
                for key in &keys {
                    if let Some((change, fresh)) =
                        requeue_live(txn, schema, clock, stamp_ms, name, key)?
                    {
                        out.restamped += u64::from(fresh);
                        out.requeued.push(change);
                    }
                }
                Ok(out)
            })?;
            out.next = Some(match page.next {
                Some(token) => RepushPos::Items {
                    model,
                    next: Some(token),
                },
                None => RepushPos::Items {
                    model: model + 1,
                    next: None,
                },
            });
            Ok(out)
        }
        RepushPos::Tombstones { from } => db.write(Origin::Remote, |txn| {
            let rows = txn.side().scan(VERSIONS, &from, limit)?;
            let mut out = RepushSlice::default();
            if rows.len() == limit {
                out.next = rows.last().map(|(k, _)| {
                    let mut next = k.clone();
                    next.push(0);
                    RepushPos::Tombstones { from: next }
                });
            }
            for (raw, bytes) in rows {
                let Ok(v) = serde_json::from_slice::<Version>(&bytes) else {
                    // Left alone: the write path reports it as corruption when the key is used.
                    continue;
                };
                if !v.d {
                    continue;
                }
                let Some(model) = v.m.as_deref() else {
                    out.unknown_model += 1;
                    continue;
                };
                if !models.iter().any(|m| m == model) {
                    continue;
                }
                let Some(key) = key_from_raw(&raw) else {
                    continue;
                };
                if txn.side().get(OUTBOX, &raw)?.is_some() || txn.get_stored(&key)?.is_some() {
                    continue;
                }
                let version = wire::hlc_from_str(&v.v).map_err(|e| corrupt("version", e))?;
                let change = wire::Change {
                    model: model.to_string(),
                    key,
                    op: Op::Delete,
                    item: None,
                    version,
                    base: None,
                };
                let lossy = schema.model(model).is_some_and(|m| m.process().lossy);
                add_entry(&mut txn.side(), &change, lossy)?;
                out.requeued.push(change);
            }
            Ok(out)
        }),
    }
}

/// Puts a live item back into the outbox at the version it holds (a fresh one if the collection
/// forgot it); `None` if it has an entry already, or is gone. The flag says the version is new.
fn requeue_live(
    txn: &mut WriteTxn<'_>,
    schema: &Schema,
    clock: &Mutex<HlcClock>,
    stamp_ms: u64,
    model: &str,
    key: &ItemKey,
) -> Result<Option<(wire::Change, bool)>, DbError> {
    let raw = raw_key(key);
    if txn.side().get(OUTBOX, &raw)?.is_some() {
        return Ok(None);
    }
    let Some((held, item)) = txn.get_stored(key)? else {
        return Ok(None);
    };
    if held.name() != model {
        return Ok(None);
    }
    let mut side = txn.side();
    let (version, fresh) = match get_version(&side, key)? {
        Some(v) if !v.deleted => (v.version, false),
        _ => {
            let v = {
                let mut clock = clock.lock().unwrap_or_else(PoisonError::into_inner);
                clock
                    .tick(stamp_ms)
                    .map_err(|e| DbError::Refused(Box::new(e)))?
            };
            put_version(&mut side, model, key, v, false)?;
            side.put(META, META_HLC, wire::hlc_to_string(v).as_bytes())?;
            (v, true)
        }
    };
    let change = wire::Change {
        model: model.to_string(),
        key: key.clone(),
        op: Op::Put,
        item: Some(item),
        version,
        base: None,
    };
    let lossy = schema.model(model).is_some_and(|m| m.process().lossy);
    add_entry(&mut side, &change, lossy)?;
    Ok(Some((change, fresh)))
}

/// Adds an outbox entry for a key that has none, last in the queue.
fn add_entry(side: &mut SideTables<'_>, change: &wire::Change, lossy: bool) -> Result<(), DbError> {
    let key = raw_key(&change.key);
    let seq = get_u64(side, META_NEXT_SEQ)? + 1;
    put_u64(side, META_NEXT_SEQ, seq)?;
    let entry = Entry {
        seq,
        change: change.clone(),
    };
    side.put(OUTBOX, &key, &serde_json::to_vec(&entry)?)?;
    side.put(OUTBOX_SEQ, &seq.to_be_bytes(), &key)?;
    if lossy {
        side.put(OUTBOX_LOSSY, &seq.to_be_bytes(), &key)?;
    }
    Ok(())
}

/// Counters for the agent's status.
pub(crate) fn dropped(db: &impl DbAccess) -> Result<u64, DbError> {
    Ok(match db.side_get(META, META_DROPPED)? {
        Some(v) => u64::from_be_bytes(v.as_slice().try_into().unwrap_or([0; 8])),
        None => 0,
    })
}

/// The replication rules' view of one device-db write transaction.
pub(crate) struct AgentTxn<'a, 't> {
    pub(crate) txn: &'a mut WriteTxn<'t>,
    pub(crate) schema: &'a Schema,
}

impl DeviceTxn for AgentTxn<'_, '_> {
    type Error = DbError;

    fn stored_version(
        &mut self,
        _model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredVersion>, DbError> {
        get_version(&self.txn.side(), key)
    }

    fn put_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        item: Item,
        version: Hlc,
    ) -> Result<(), DbError> {
        let stored = self.txn.put_stored(model, item)?;
        if &stored != key {
            return Err(DbError::Corrupt(format!(
                "remote {model} item's key {stored:?} differs from the change's key {key:?}"
            )));
        }
        put_version(&mut self.txn.side(), model, key, version, false)
    }

    fn delete_remote(&mut self, model: &str, key: &ItemKey, version: Hlc) -> Result<(), DbError> {
        self.txn.remove_stored(key)?;
        put_version(&mut self.txn.side(), model, key, version, true)
    }

    fn has_pending(&mut self, _model: &str, key: &ItemKey) -> Result<bool, DbError> {
        Ok(self.txn.side().get(OUTBOX, &raw_key(key))?.is_some())
    }

    fn take_superseded(
        &mut self,
        _model: &str,
        key: &ItemKey,
        winner: Hlc,
    ) -> Result<Option<wire::Change>, DbError> {
        let raw = raw_key(key);
        let mut side = self.txn.side();
        let Some(bytes) = side.get(OUTBOX, &raw)? else {
            return Ok(None);
        };
        let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| corrupt("outbox", e))?;
        if entry.change.version >= winner {
            return Ok(None);
        }
        side.remove(OUTBOX_SEQ, &entry.seq.to_be_bytes())?;
        side.remove(OUTBOX_LOSSY, &entry.seq.to_be_bytes())?;
        side.remove(OUTBOX, &raw)?;
        Ok(Some(entry.change))
    }

    fn live_model(&mut self, key: &ItemKey) -> Result<Option<String>, DbError> {
        Ok(self
            .txn
            .get_stored(key)?
            .map(|(model, _)| model.name().to_string()))
    }

    fn set_cursor(&mut self, cursor: u64) -> Result<(), DbError> {
        put_u64(&mut self.txn.side(), META_CURSOR, cursor)
    }

    fn set_feed_mark(&mut self, mark: FeedMark) -> Result<(), DbError> {
        let mut side = self.txn.side();
        put_u64(&mut side, META_FEED_GEN, mark.gen)?;
        put_u64(&mut side, META_FEED_SEEN, mark.seen)
    }

    fn resync_mark_seen(&mut self, _model: &str, key: &ItemKey) -> Result<(), DbError> {
        self.txn.side().put(RESYNC_SEEN, &raw_key(key), b"")
    }

    fn resync_clear(&mut self) -> Result<(), DbError> {
        self.txn.side().clear(RESYNC_SEEN)
    }

    fn resync_sweep(&mut self) -> Result<Vec<(String, ItemKey)>, DbError> {
        let mut swept = Vec::new();
        let models: Vec<String> = self
            .schema
            .models()
            .filter(|m| m.process().syncs_down() && m.process().on_device())
            .map(|m| m.name().to_string())
            .collect();
        for model in models {
            for key in self.txn.model_keys(&model)? {
                let key_of_model = key.clone();
                let raw = raw_key(&key);
                let side = self.txn.side();
                if side.get(RESYNC_SEEN, &raw)?.is_some() || side.get(OUTBOX, &raw)?.is_some() {
                    continue;
                }
                let version = get_version(&side, &key)?;
                self.txn.remove_stored(&key)?;
                if let Some(v) = version {
                    put_version(&mut self.txn.side(), &model, &key, v.version, true)?;
                }
                swept.push((model.clone(), key_of_model));
            }
        }
        self.txn.side().clear(RESYNC_SEEN)?;
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use devtables_db::{Db, DbOptions};
    use devtables_sync::apply::{device_apply, ApplyError, ApplyPage};
    use serde_json::json;

    use super::*;

    const HOUR: u64 = 3600 * 1000;

    struct Fixture {
        _dir: tempfile::TempDir,
        db: Db,
        schema: Arc<Schema>,
        clock: Arc<Mutex<HlcClock>>,
        cursor: u64,
    }

    fn fixture() -> Fixture {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/schema.json5");
        let schema = Arc::new(Schema::load(Path::new(path)).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(
            dir.path().join("d.db"),
            schema.clone(),
            DbOptions::default(),
        )
        .unwrap();
        let clock = Arc::new(Mutex::new(HlcClock::new(1)));
        db.set_interceptor(Some(Arc::new(OutboxRecorder {
            schema: schema.clone(),
            clock: clock.clone(),
            cloud_offset_ms: Arc::new(AtomicI64::new(0)),
            limit: 1000,
            max_change_bytes: 64 * 1024,
        })));
        Fixture {
            _dir: dir,
            db,
            schema,
            clock,
            cursor: 0,
        }
    }

    fn item(v: serde_json::Value) -> Item {
        v.as_object().cloned().unwrap()
    }

    impl Fixture {
        /// Applies one change from the cloud through the real replication rule.
        fn remote(&mut self, model: &str, input: serde_json::Value, delete: bool) -> ItemKey {
            let m = self.schema.model(model).unwrap();
            let full = m.prepare_create(&item(input), 0).unwrap();
            let key = m.primary_key(&full).unwrap();
            // The counter keeps versions of one millisecond increasing.
            let version = Hlc {
                wall_ms: wall_now(),
                counter: self.cursor as u32,
                node: 99,
            };
            let change = wire::Change {
                model: model.into(),
                key: key.clone(),
                op: if delete { Op::Delete } else { Op::Put },
                item: (!delete).then_some(full),
                version,
                base: None,
            };
            let page = ApplyPage::Feed {
                from: self.cursor,
                to: self.cursor + 1,
                changes: vec![change],
                mark: None,
            };
            self.cursor += 1;
            let (schema, clock) = (self.schema.clone(), self.clock.clone());
            self.db
                .write(Origin::Remote, |txn| {
                    let mut t = AgentTxn {
                        txn,
                        schema: &schema,
                    };
                    let mut clock = clock.lock().unwrap();
                    device_apply(&mut t, &schema, &mut clock, 0, &page).map_err(|e| match e {
                        ApplyError::Store(e) => e,
                    })
                })
                .unwrap();
            key
        }

        /// One full pass of the collection at `now_ms`, in slices of `slice`.
        fn collect(&self, now_ms: u64, retention_ms: u64, slice: usize) -> GcSlice {
            let mut total = GcSlice::default();
            let mut start = Vec::new();
            loop {
                let out = self
                    .db
                    .write(Origin::Remote, |txn| {
                        collect_versions(txn, &self.schema, &start, slice, now_ms, retention_ms)
                    })
                    .unwrap();
                total.tombstones += out.tombstones;
                total.unneeded += out.unneeded;
                total.stamped += out.stamped;
                match out.next {
                    Some(next) => start = next,
                    None => return total,
                }
            }
        }

        fn has_version(&self, key: &ItemKey) -> bool {
            stored_version(&self.db, key).unwrap().is_some()
        }

        fn ack_all(&self) {
            let acked: Vec<_> = load_outbox(&self.db)
                .unwrap()
                .into_iter()
                .map(|c| (c.model, c.key, c.version))
                .collect();
            self.db
                .write(Origin::Remote, |txn| outbox_remove(txn, &acked, None))
                .unwrap();
        }
    }

    fn fault_key(id: &str) -> ItemKey {
        ItemKey {
            pk: "device#d1".into(),
            sk: format!("fault#{id}"),
        }
    }

    #[test]
    fn up_only_versions_go_once_acknowledged_and_pending_ones_stay() {
        let f = fixture();
        for id in ["f1", "f2", "f3"] {
            f.db.create(
                "Fault",
                &item(json!({"deviceId": "d1", "id": id, "severity": "info"})),
            )
            .unwrap();
        }
        let now = wall_now();
        // Pending in the outbox: every version stays, however old.
        let out = f.collect(now + 1000 * HOUR, HOUR, 1000);
        assert_eq!((out.unneeded, out.tombstones), (0, 0));
        for id in ["f1", "f2", "f3"] {
            assert!(f.has_version(&fault_key(id)));
        }
        f.ack_all();
        // A newer write of f3 waits again: its version is the base of the next write.
        f.db.update(
            "Fault",
            &item(json!({"deviceId": "d1", "id": "f3", "severity": "warn"})),
        )
        .unwrap();
        let out = f.collect(now, HOUR, 1000);
        assert_eq!(out.unneeded, 2, "{out:?}");
        assert!(!f.has_version(&fault_key("f1")));
        assert!(!f.has_version(&fault_key("f2")));
        assert!(f.has_version(&fault_key("f3")));
        // The items themselves stay: only replication metadata is forgotten.
        assert!(f
            .db
            .get("Fault", &item(json!({"deviceId": "d1", "id": "f1"})))
            .unwrap()
            .is_some());
        // A deleted up-only item keeps its tombstone until the retention: the only trace of
        // the delete a restored cloud may have lost.
        f.db.remove("Fault", &item(json!({"deviceId": "d1", "id": "f2"})))
            .unwrap();
        f.ack_all();
        let out = f.collect(now, HOUR, 1000);
        assert_eq!((out.unneeded, out.tombstones), (1, 0), "{out:?}");
        assert!(f.has_version(&fault_key("f2")), "the tombstone stays");
        let out = f.collect(now + 2 * HOUR, HOUR, 1000);
        assert_eq!(out.tombstones, 1, "and goes after the retention: {out:?}");
        assert!(!f.has_version(&fault_key("f2")));
        // A later write of a collected key simply has no base.
        f.db.update(
            "Fault",
            &item(json!({"deviceId": "d1", "id": "f1", "severity": "critical"})),
        )
        .unwrap();
        let entry = outbox_entry(&f.db, &fault_key("f1")).unwrap().unwrap();
        assert_eq!(entry.base, None);
    }

    #[test]
    fn tombstones_go_after_the_retention_and_live_down_synced_versions_stay() {
        let mut f = fixture();
        let live = f.remote("Setting", json!({"deviceId": "d1", "name": "live"}), false);
        let fw = f.remote("Firmware", json!({"version": "1", "url": "u"}), false);
        let gone = f.remote("Setting", json!({"deviceId": "d1", "name": "gone"}), false);
        f.remote("Setting", json!({"deviceId": "d1", "name": "gone"}), true);
        // A local delete not yet acknowledged keeps its tombstone whatever its age.
        let mine = f.remote("Setting", json!({"deviceId": "d1", "name": "mine"}), false);
        f.db.remove("Setting", &item(json!({"deviceId": "d1", "name": "mine"})))
            .unwrap();
        let now = wall_now();

        let out = f.collect(now + HOUR / 2, HOUR, 1000);
        assert_eq!(
            (out.tombstones, out.unneeded),
            (0, 0),
            "young tombstone kept"
        );
        assert!(f.has_version(&gone));

        let out = f.collect(now + 2 * HOUR, HOUR, 1000);
        assert_eq!((out.tombstones, out.unneeded), (1, 0), "{out:?}");
        assert!(!f.has_version(&gone));
        assert!(
            f.has_version(&live),
            "a live down-synced item keeps its version"
        );
        assert!(
            f.has_version(&fw),
            "a live down-only item keeps its version"
        );
        assert!(f.has_version(&mine), "a pending delete keeps its tombstone");

        // Once acknowledged, the local tombstone ages out like any other.
        f.ack_all();
        let out = f.collect(now + 2 * HOUR, HOUR, 1000);
        assert_eq!(out.tombstones, 1);
        assert!(!f.has_version(&mine));
        assert!(f.has_version(&live));
    }

    #[test]
    fn records_of_older_agents_count_as_written_at_first_sight() {
        let f = fixture();
        let key = ItemKey {
            pk: "device#d1".into(),
            sk: "setting#old".into(),
        };
        let v = Hlc {
            wall_ms: 5,
            counter: 0,
            node: 99,
        };
        // The record as an agent without model and timestamp fields wrote it.
        let old = format!(r#"{{"v":"{}","d":true}}"#, wire::hlc_to_string(v));
        f.db.write(Origin::Remote, |txn| {
            txn.side().put(VERSIONS, &raw_key(&key), old.as_bytes())
        })
        .unwrap();
        let now = wall_now();
        let out = f.collect(now, HOUR, 1000);
        assert_eq!((out.stamped, out.tombstones), (1, 0));
        assert!(f.has_version(&key));
        let out = f.collect(now + HOUR / 2, HOUR, 1000);
        assert_eq!((out.stamped, out.tombstones), (0, 0));
        let out = f.collect(now + 2 * HOUR, HOUR, 1000);
        assert_eq!(out.tombstones, 1);
        assert!(!f.has_version(&key));
    }

    #[test]
    fn a_repush_sends_items_whose_version_was_collected_with_a_fresh_one() {
        let f = fixture();
        for id in ["f1", "f2"] {
            f.db.create(
                "Fault",
                &item(json!({"deviceId": "d1", "id": id, "severity": "info"})),
            )
            .unwrap();
        }
        let sent: Vec<Hlc> = load_outbox(&f.db)
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect();
        f.ack_all();
        // Acknowledged up-only versions are collected: the items stay, their versions go.
        let out = f.collect(wall_now(), HOUR, 1000);
        assert_eq!(out.unneeded, 2);
        let mut pos = RepushPos::Items {
            model: 0,
            next: None,
        };
        let (mut requeued, mut restamped) = (Vec::new(), 0);
        loop {
            let slice = repush_slice(&f.db, &f.schema, &f.clock, wall_now(), pos, 1).unwrap();
            requeued.extend(slice.requeued);
            restamped += slice.restamped;
            match slice.next {
                Some(next) => pos = next,
                None => break,
            }
        }
        assert_eq!((requeued.len(), restamped), (2, 2), "{requeued:?}");
        for c in &requeued {
            assert!(
                sent.iter().all(|v| c.version > *v),
                "a fresh version, above what was sent: {c:?}"
            );
            assert_eq!(c.base, None);
            assert_eq!(stored_version(&f.db, &c.key).unwrap(), Some(c.version));
            assert_eq!(outbox_entry(&f.db, &c.key).unwrap().as_ref(), Some(c));
        }
        // The clock resumes after the fresh versions.
        let last = restore(&f.db).unwrap().last_hlc.unwrap();
        assert!(requeued.iter().all(|c| c.version <= last));
    }

    #[test]
    fn a_pass_runs_in_bounded_slices() {
        let f = fixture();
        for i in 0..25 {
            f.db.create(
                "Fault",
                &item(json!({"deviceId": "d1", "id": format!("f{i:02}"), "severity": "info"})),
            )
            .unwrap();
        }
        f.ack_all();
        let first =
            f.db.write(Origin::Remote, |txn| {
                collect_versions(txn, &f.schema, b"", 10, wall_now(), HOUR)
            })
            .unwrap();
        assert_eq!(first.unneeded, 10);
        assert!(first.next.is_some());
        let rest = f.collect(wall_now(), HOUR, 10);
        assert_eq!(rest.unneeded, 15);
        assert_eq!(f.db.side_len(VERSIONS).unwrap(), 0);
    }
}
