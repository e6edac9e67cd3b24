//! Retention in the SQLite store: old tombstones and their feed entries are purged, raising each
//! owner's purge watermark and each device's feed floor, and the conflict log is trimmed.
//!
//! It exists because purging is the one write outside the replication rules, and it must leave
//! the marks ([`max_version`] included) that keep a purged key from coming back. A call purges a
//! bounded batch in one transaction and leaves the marks of exactly what it removed, so the
//! service's retention pass (several calls, other work in between) ends where one large purge
//! would.

use std::collections::BTreeMap;

use devtables_sync::hlc::Hlc;
use rusqlite::{params, Connection};

use super::super::{PurgeStats, Retention, StoreError};
use super::sql::{db, parse_version, write_txn};

/// The highest version the store holds or has purged: the service's clock starts above it.
pub(super) fn max_version(conn: &Connection) -> Result<Option<Hlc>, StoreError> {
    let v: Option<String> = conn
        .query_row(
            "SELECT max(v) FROM (SELECT max(version) AS v FROM items
               UNION ALL SELECT max(purged_below) FROM watermarks)",
            [],
            |r| r.get(0),
        )
        .map_err(db("reading the highest stored version"))?;
    v.as_deref().map(parse_version).transpose()
}

/// Purges what is older than `retention` allows, at most a batch (see [`CloudStore::purge`]).
///
/// [`CloudStore::purge`]: super::super::CloudStore::purge
pub(super) fn purge(
    conn: &mut Connection,
    now_ms: u64,
    retention: &Retention,
) -> Result<PurgeStats, StoreError> {
    let cutoff = now_ms.saturating_sub(retention.tombstone_ms);
    let batch = retention.batch.max(1);
    let tx = write_txn(conn, "starting a purge")?;
    // The oldest tombstones first, a batch of them: the partial index of tombstones by
    // `updated_ms` hands them over in that order, so a batch reads what it removes.
    let keys: Vec<(String, String, String, String, String)> = tx
        .prepare_cached(
            "SELECT account, device, pk, sk, version FROM items
             WHERE deleted = 1 AND updated_ms < ?1 ORDER BY updated_ms LIMIT ?2",
        )
        .and_then(|mut s| {
            s.query_map(params![cutoff, batch], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect()
        })
        .map_err(db("finding old tombstones"))?;
    // Per owner the newest version purged, which becomes its watermark: a later write that knew
    // a purged key meets it as that tombstone (see `cloud_apply_push`). Versions are text that
    // sorts as the versions do.
    let mut watermarks: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    // Per device the highest purged feed sequence, which becomes its floor.
    let mut floors: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (account, device, pk, sk, version) in &keys {
        let mark = watermarks.entry((account, device)).or_insert(version);
        if version.as_str() > *mark {
            *mark = version;
        }
        let removed: Vec<(String, u64)> = if device.is_empty() {
            tx.prepare_cached(
                "DELETE FROM feed WHERE account = ?1 AND device IN (SELECT device FROM devices WHERE account = ?1)
                   AND owner = '' AND pk = ?2 AND sk = ?3 RETURNING device, seq",
            )
            .and_then(|mut s| s.query_map(params![account, pk, sk], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        } else {
            tx.prepare_cached(
                "DELETE FROM feed WHERE account = ?1 AND device = ?2 AND owner = ?2 AND pk = ?3 AND sk = ?4
                 RETURNING device, seq",
            )
            .and_then(|mut s| {
                s.query_map(params![account, device, pk, sk], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
            })
        }
        .map_err(db("purging feed entries"))?;
        if device.is_empty() {
            // A pending fan-out of the key ends; the devices it had not reached resync.
            let key = devtables_schema::ItemKey {
                pk: pk.clone(),
                sk: sk.clone(),
            };
            super::fanout::end_purged(&tx, account, &key)?;
        }
        for (d, seq) in removed {
            let floor = floors.entry((account.clone(), d)).or_insert(0);
            *floor = (*floor).max(seq);
        }
        tx.prepare_cached(
            "DELETE FROM items WHERE account = ?1 AND device = ?2 AND pk = ?3 AND sk = ?4",
        )
        .and_then(|mut s| s.execute(params![account, device, pk, sk]))
        .map_err(db("purging a tombstone"))?;
    }
    for ((account, device), version) in watermarks {
        tx.prepare_cached(
            "INSERT INTO watermarks (account, device, purged_below) VALUES (?1, ?2, ?3)
             ON CONFLICT (account, device) DO UPDATE SET
               purged_below = max(purged_below, excluded.purged_below)",
        )
        .and_then(|mut s| s.execute(params![account, device, version]))
        .map_err(db("raising a purge watermark"))?;
    }
    for ((account, device), floor) in floors {
        tx.prepare_cached("UPDATE devices SET feed_floor = max(feed_floor, ?3) WHERE account = ?1 AND device = ?2")
            .and_then(|mut s| s.execute(params![account, device, floor]))
            .map_err(db("raising a feed floor"))?;
    }
    // Each account's oldest conflict records beyond its limit, at most a batch of them.
    let conflicts = tx
        .prepare_cached(
            "DELETE FROM conflicts WHERE id IN (
                SELECT id FROM (
                    SELECT id, row_number() OVER (PARTITION BY account ORDER BY id DESC) AS n FROM conflicts
                ) WHERE n > ?1 ORDER BY id LIMIT ?2)",
        )
        .and_then(|mut s| s.execute(params![retention.max_conflicts, batch]))
        .map_err(db("trimming the conflict log"))? as u64;
    tx.commit().map_err(db("committing a purge"))?;
    let tombstones = keys.len() as u64;
    Ok(PurgeStats {
        tombstones,
        conflicts,
        more: tombstones == batch || conflicts == batch,
    })
}
