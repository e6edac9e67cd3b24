//! The replication state kept in the device database's side tables, written in the same
//! transactions as the items it describes.
//!
//! - `outbox`: item key → the newest unacknowledged local change of that key (JSON `Entry`).
//!   Written by [`OutboxRecorder`] inside the transaction of the local write, so a crash can never
//!   separate a change from its outbox entry (the original agent's pending-change log was written
//!   after the commit and could lose it).
//! - `outbox_seq`: sequence → item key: the outbox in first-write order (restore, oldest first).
//! - `outbox_lossy`: sequence → item key, for models marked `lossy` (what a full outbox drops).
//! - `versions`: item key → the HLC version (and deleted flag) of the last write of the key, local
//!   or remote: the base of the next local write and the conflict rule's input.
//! - `sync_meta`: the feed cursor, the last HLC issued, counters.
//! - `resync_seen`: keys received during a full resync (swept at its end).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devtables_db::{Change, ChangeOp, DbError, Origin, SideTables, WriteInterceptor, WriteTxn};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{DeviceTxn, StoredVersion};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::wire::{self, Op};
use serde::{Deserialize, Serialize};

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

/// The local write was refused because the outbox is full and holds nothing lossy to drop.
#[derive(Debug, thiserror::Error)]
#[error("the sync outbox is full ({limit} unacknowledged changes): the device has been offline too long; \
writes of synced models are refused until the cloud acknowledges changes (raise agent outbox_limit, or mark \
high-volume models `lossy` in the schema's process block)")]
pub struct OutboxFull {
    pub limit: u64,
}

#[derive(Serialize, Deserialize)]
struct Version {
    v: String,
    #[serde(default)]
    d: bool,
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
    key: &ItemKey,
    version: Hlc,
    deleted: bool,
) -> Result<(), DbError> {
    let v = Version {
        v: wire::hlc_to_string(version),
        d: deleted,
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
    fn on_change(&self, side: &mut SideTables<'_>, change: &Change) -> Result<(), DbError> {
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
        put_version(side, &change.key, version, deleted)?;
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
pub(crate) struct Restored {
    pub(crate) cursor: u64,
    pub(crate) outbox: Vec<wire::Change>,
    pub(crate) last_hlc: Option<Hlc>,
}

pub(crate) fn restore(db: &devtables_db::Db) -> Result<Restored, DbError> {
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
    let mut outbox = Vec::new();
    for (_, key) in db.side_scan(OUTBOX_SEQ, b"", usize::MAX)? {
        if let Some(raw) = db.side_get(OUTBOX, &key)? {
            let entry: Entry = serde_json::from_slice(&raw).map_err(|e| corrupt("outbox", e))?;
            outbox.push(entry.change);
        }
    }
    Ok(Restored {
        cursor,
        outbox,
        last_hlc,
    })
}

/// The current outbox entry of a key (after a commit: what to hand the engine).
pub(crate) fn outbox_entry(
    db: &devtables_db::Db,
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

/// Removes acknowledged outbox entries whose version still matches.
pub(crate) fn outbox_remove(
    txn: &mut WriteTxn<'_>,
    acked: &[(String, ItemKey, Hlc)],
) -> Result<u64, DbError> {
    let mut side = txn.side();
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
    put_version(&mut side, key, new, entry.change.op == Op::Delete)?;
    side.put(META, META_HLC, wire::hlc_to_string(new).as_bytes())?;
    side.put(OUTBOX, &raw, &serde_json::to_vec(&entry)?)?;
    Ok(Some(entry.change))
}

/// Counters for the agent's status.
pub(crate) fn dropped(db: &devtables_db::Db) -> Result<u64, DbError> {
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
        put_version(&mut self.txn.side(), key, version, false)
    }

    fn delete_remote(&mut self, _model: &str, key: &ItemKey, version: Hlc) -> Result<(), DbError> {
        self.txn.remove_stored(key)?;
        put_version(&mut self.txn.side(), key, version, true)
    }

    fn has_pending(&mut self, _model: &str, key: &ItemKey) -> Result<bool, DbError> {
        Ok(self.txn.side().get(OUTBOX, &raw_key(key))?.is_some())
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
                    put_version(&mut self.txn.side(), &key, v.version, true)?;
                }
                swept.push((model.clone(), key_of_model));
            }
        }
        self.txn.side().clear(RESYNC_SEEN)?;
        Ok(swept)
    }
}
