//! Retention in the SQLite store: old tombstones and their feed entries are purged, raising each
//! owner's purge watermark and each device's feed floor, and the conflict log is trimmed.
//!
//! It exists because purging is the one write outside the replication rules, and it must leave
//! the marks ([`max_version`] included) that keep a purged key from coming back.

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

/// Purges what is older than `retention` allows (see [`CloudStore::purge`]).
///
/// [`CloudStore::purge`]: super::super::CloudStore::purge
pub(super) fn purge(
    conn: &mut Connection,
    now_ms: u64,
    retention: &Retention,
) -> Result<PurgeStats, StoreError> {
    let cutoff = now_ms.saturating_sub(retention.tombstone_ms);
    let tx = write_txn(conn, "starting a purge")?;
    let keys: Vec<(String, String, String, String)> = tx
        .prepare_cached(
            "SELECT account, device, pk, sk FROM items WHERE deleted = 1 AND updated_ms < ?1",
        )
        .and_then(|mut s| {
            s.query_map(params![cutoff], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect()
        })
        .map_err(db("finding old tombstones"))?;
    // The highest purged feed sequence per device becomes its floor.
    let mut floors: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (account, device, pk, sk) in &keys {
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
        for (d, seq) in removed {
            let floor = floors.entry((account.clone(), d)).or_insert(0);
            *floor = (*floor).max(seq);
        }
    }
    // Each owner's watermark rises to the newest version it purges: a later write that knew
    // a purged key meets it as that tombstone (see `cloud_apply_push`).
    tx.prepare_cached(
        "INSERT INTO watermarks (account, device, purged_below)
           SELECT account, device, max(version) FROM items
           WHERE deleted = 1 AND updated_ms < ?1 GROUP BY account, device
         ON CONFLICT (account, device) DO UPDATE SET
           purged_below = max(purged_below, excluded.purged_below)",
    )
    .and_then(|mut s| s.execute(params![cutoff]))
    .map_err(db("raising purge watermarks"))?;
    let tombstones = tx
        .prepare_cached("DELETE FROM items WHERE deleted = 1 AND updated_ms < ?1")
        .and_then(|mut s| s.execute(params![cutoff]))
        .map_err(db("purging tombstones"))?;
    for ((account, device), floor) in floors {
        tx.prepare_cached("UPDATE devices SET feed_floor = max(feed_floor, ?3) WHERE account = ?1 AND device = ?2")
            .and_then(|mut s| s.execute(params![account, device, floor]))
            .map_err(db("raising a feed floor"))?;
    }
    let conflicts = tx
        .prepare_cached(
            "DELETE FROM conflicts WHERE id IN (
                SELECT id FROM (
                    SELECT id, row_number() OVER (PARTITION BY account ORDER BY id DESC) AS n FROM conflicts
                ) WHERE n > ?1)",
        )
        .and_then(|mut s| s.execute(params![retention.max_conflicts]))
        .map_err(db("trimming the conflict log"))?;
    tx.commit().map_err(db("committing a purge"))?;
    Ok(PurgeStats {
        tombstones: tombstones as u64,
        conflicts: conflicts as u64,
    })
}
