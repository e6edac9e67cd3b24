//! Retention in the PostgreSQL store: old tombstones and their feed entries are purged, raising
//! each owner's purge watermark and each device's feed floor, and the conflict log is trimmed.
//!
//! It exists because purging is the one write outside the replication rules, and it must leave
//! the marks ([`max_version`] included) that keep a purged key from coming back. It runs in one
//! READ COMMITTED transaction: a tombstone a concurrent write replaces is no longer a tombstone
//! when the delete re-checks it, so it stays.

use devtables_sync::hlc::Hlc;

use super::super::encoding::parse_version;
use super::super::{PurgeStats, Retention, StoreError};
use super::sql::{col, int, Conn};

/// The highest version the store holds or has purged: the service's clock starts above it.
pub(super) fn max_version(conn: &mut Conn) -> Result<Option<Hlc>, StoreError> {
    let row = conn.query_one(
        "reading the highest stored version",
        "SELECT max(v) FROM (SELECT max(version) AS v FROM items
           UNION ALL SELECT max(purged_below) FROM watermarks) AS highest",
        &[],
    )?;
    let v: Option<String> = col(&row, 0)?;
    v.as_deref().map(parse_version).transpose()
}

/// Purges what is older than `retention` allows (see `CloudStore::purge`).
pub(super) fn purge(
    conn: &mut Conn,
    now_ms: u64,
    retention: &Retention,
) -> Result<PurgeStats, StoreError> {
    let cutoff = int(now_ms.saturating_sub(retention.tombstone_ms));
    // Each owner's watermark rises to the newest version it purges: a later write that knew a
    // purged key meets it as that tombstone (see `cloud_apply_push`).
    conn.execute(
        "raising purge watermarks",
        "INSERT INTO watermarks (account, device, purged_below)
           SELECT account, device, max(version) FROM items
           WHERE deleted AND updated_ms < $1 GROUP BY account, device
         ON CONFLICT (account, device) DO UPDATE
         SET purged_below = greatest(watermarks.purged_below, excluded.purged_below)",
        &[&cutoff],
    )?;
    // The tombstones, their feed entries (a device's own, or every device's for a broadcast
    // item), and per device the highest purged feed sequence, which becomes its floor: one
    // statement.
    let row = conn.query_one(
        "purging tombstones",
        "WITH gone AS (
            DELETE FROM items WHERE deleted AND updated_ms < $1
            RETURNING account, device, pk, sk),
         entries AS (
            DELETE FROM feed f USING gone g
            WHERE f.account = g.account AND f.owner = g.device AND f.pk = g.pk AND f.sk = g.sk
              AND (g.device = '' OR f.device = g.device)
            RETURNING f.account, f.device, f.seq),
         floors AS (
            UPDATE devices d SET feed_floor = greatest(d.feed_floor, e.top)
            FROM (SELECT account, device, max(seq) AS top FROM entries GROUP BY account, device) e
            WHERE d.account = e.account AND d.device = e.device
            RETURNING 1)
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM floors)",
        &[&cutoff],
    )?;
    let tombstones: i64 = col(&row, 0)?;
    let conflicts = conn.execute(
        "trimming the conflict log",
        "DELETE FROM conflicts WHERE id IN (
            SELECT id FROM (
                SELECT id, row_number() OVER (PARTITION BY account ORDER BY id DESC) AS n
                FROM conflicts
            ) AS ranked WHERE n > $1)",
        &[&int(retention.max_conflicts)],
    )?;
    Ok(PurgeStats {
        tombstones: u64::try_from(tombstones).unwrap_or(0),
        conflicts,
    })
}
