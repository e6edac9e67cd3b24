//! Retention in the PostgreSQL store: old tombstones and their feed entries are purged, raising
//! each owner's purge watermark and each device's feed floor, and the conflict log is trimmed.
//!
//! It exists because purging is the one write outside the replication rules, and it must leave
//! the marks ([`max_version`] included) that keep a purged key from coming back. A call purges a
//! bounded batch in one READ COMMITTED transaction that holds the advisory locks of the batch's
//! owners, as every writer of their rows does (`super::txn`): no push or API write of those
//! owners interleaves with it, and each mark it leaves is of exactly what it removed, so the
//! service's retention pass (several calls, other work in between, other nodes writing) ends
//! where one large purge would.

use std::collections::BTreeSet;

use devtables_sync::hlc::Hlc;

use super::super::encoding::parse_version;
use super::super::{PurgeStats, Retention, StoreError};
use super::sql::{col, int, Conn};
use super::txn::lock_owner_cols;
use super::State;

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

/// Most owners one purge transaction locks. PostgreSQL's lock table is shared by every session
/// (`max_locks_per_transaction` times the connections: 6400 slots by default), so a batch whose
/// tombstones belong to more owners stops early and leaves the rest to the next call.
const MAX_OWNERS_PER_BATCH: usize = 256;

/// Purges what is older than `retention` allows, at most a batch (see `CloudStore::purge`).
pub(super) fn purge(
    conn: &mut Conn,
    state: &State,
    now_ms: u64,
    retention: &Retention,
) -> Result<PurgeStats, StoreError> {
    let cutoff = int(now_ms.saturating_sub(retention.tombstone_ms));
    let batch = retention.batch.max(1);
    // The oldest tombstones first, a batch of them (the partial index of tombstones by
    // `updated_ms` hands them over in that order, so a batch reads what it removes).
    let rows = conn.query(
        "finding old tombstones",
        "SELECT account, device, pk, sk FROM items
         WHERE deleted AND updated_ms < $1 ORDER BY updated_ms LIMIT $2",
        &[&cutoff, &int(batch)],
    )?;
    let mut owners: BTreeSet<(String, String)> = BTreeSet::new();
    let (mut accounts, mut devices, mut pks, mut sks) = (vec![], vec![], vec![], vec![]);
    let mut cut_short = false;
    for r in &rows {
        let (account, device): (String, String) = (col(r, 0)?, col(r, 1)?);
        let owner = (account.clone(), device.clone());
        if !owners.contains(&owner) {
            if owners.len() == MAX_OWNERS_PER_BATCH {
                cut_short = true;
                break;
            }
            owners.insert(owner);
        }
        accounts.push(account);
        devices.push(device);
        pks.push(col::<String>(r, 2)?);
        sks.push(col::<String>(r, 3)?);
    }
    // The owners' locks, in order, as every writer of their rows takes them first: no write of
    // these keys runs between the check below and the commit, so what is deleted is still the
    // tombstone found, and its owner's watermark covers it.
    for (account, device) in &owners {
        lock_owner_cols(conn, &state.lock_prefix, account, device)?;
    }
    // The tombstones (still tombstones, still old: a write before the lock may have replaced
    // one), each owner's watermark raised to the newest version it purges (a later write that
    // knew a purged key meets it as that tombstone, see `cloud_apply_push`), their feed entries
    // (a device's own, or every device's for a broadcast item), and per device the highest
    // purged feed sequence, which becomes its floor; a pending fan-out of a purged broadcast key
    // ends: one statement, so every mark is of exactly what it removed.
    let row = conn.query_one(
        "purging tombstones",
        "WITH batch AS (
            SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
              AS b(account, device, pk, sk)),
         gone AS (
            DELETE FROM items i USING batch b
            WHERE i.account = b.account AND i.device = b.device AND i.pk = b.pk AND i.sk = b.sk
              AND i.deleted AND i.updated_ms < $1
            RETURNING i.account, i.device, i.pk, i.sk, i.version),
         marks AS (
            INSERT INTO watermarks (account, device, purged_below)
            SELECT account, device, max(version) FROM gone GROUP BY account, device
            ON CONFLICT (account, device) DO UPDATE
            SET purged_below = greatest(watermarks.purged_below, excluded.purged_below)
            RETURNING 1),
         entries AS (
            DELETE FROM feed f USING gone g
            WHERE f.account = g.account AND f.owner = g.device AND f.pk = g.pk AND f.sk = g.sk
              AND (g.device = '' OR f.device = g.device)
            RETURNING f.account, f.device, f.seq),
         floors AS (
            UPDATE devices d SET feed_floor = greatest(d.feed_floor, e.top)
            FROM (SELECT account, device, max(seq) AS top FROM entries GROUP BY account, device) e
            WHERE d.account = e.account AND d.device = e.device
            RETURNING 1),
         fanouts AS (
            DELETE FROM fanout j USING gone g
            WHERE g.device = '' AND j.account = g.account AND j.pk = g.pk AND j.sk = g.sk
            RETURNING j.account, j.after_device)
         SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM marks),
                (SELECT count(*) FROM floors),
                (SELECT coalesce(array_agg(account), '{}') FROM fanouts),
                (SELECT coalesce(array_agg(after_device), '{}') FROM fanouts)",
        &[&cutoff, &accounts, &devices, &pks, &sks],
    )?;
    let tombstones: i64 = col(&row, 0)?;
    // The devices the ended fan-outs had not reached hold at most an older entry of the key,
    // already read, and never get the tombstone: each feed moves by one and its floor to the
    // new head, as if the tombstone's entry was appended and purged, so the next read is a
    // resync. (Apart from the statement above: one statement may not update a row twice.)
    let ended: (Vec<String>, Vec<String>) = (col(&row, 3)?, col(&row, 4)?);
    if !ended.0.is_empty() {
        conn.execute(
            "sending the devices of a purged fan-out to a resync",
            "UPDATE devices d SET feed_head = d.feed_head + 1, feed_floor = d.feed_head + 1
             FROM unnest($1::text[], $2::text[]) AS j(account, after_device)
             WHERE d.account = j.account AND d.device > j.after_device",
            &[&ended.0, &ended.1],
        )?;
    }
    // Each account's oldest conflict records beyond its limit, at most a batch of them.
    let conflicts = conn.execute(
        "trimming the conflict log",
        "DELETE FROM conflicts WHERE id IN (
            SELECT id FROM (
                SELECT id, row_number() OVER (PARTITION BY account ORDER BY id DESC) AS n
                FROM conflicts
            ) AS ranked WHERE n > $1 ORDER BY id LIMIT $2)",
        &[&int(retention.max_conflicts), &int(batch)],
    )?;
    Ok(PurgeStats {
        tombstones: u64::try_from(tombstones).unwrap_or(0),
        conflicts,
        more: cut_short || rows.len() as u64 == batch || conflicts == batch,
    })
}
