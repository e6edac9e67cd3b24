//! Broadcast fan-out in bounded batches: a write of an account-wide (broadcast) item appends
//! its feed entry to the first devices of the account in the write's own transaction, and
//! leaves the rest to a durable job in `fanout` that [`step`] works off, one bounded
//! transaction at a time.
//!
//! Why: appending one feed row per device of a 10,000-device account in the write's
//! transaction holds the single writer for the whole fan-out (every push of the fleet waits
//! behind it) and makes one transaction as large as the fleet. A job row written in the same
//! transaction as the item keeps the fan-out crash-safe: whatever commits the item commits the
//! promise to reach every device, and a restarted store finds the job where it stopped.
//!
//! The job is keyed by the item's key: a later write of the same broadcast key restarts the
//! fan-out from the first device (feeds name keys, and a read returns the key's current state,
//! so each device needs one entry newer than the write it has not seen). Devices are reached in
//! device order; one registered after the fan-out started needs no entry (a new device starts
//! with a full resync, which reads the item itself). Retention ends the job of a key it
//! purges ([`end_purged`]).

use devtables_schema::ItemKey;
use rusqlite::{params, Connection, OptionalExtension};

use super::super::encoding::account_devices;
use super::super::{Advanced, StoreError};
use super::feed;
use super::sql::db;

/// The `fanout` table (layout 8).
pub(super) const FANOUT_DDL: &str = "
CREATE TABLE IF NOT EXISTS fanout (
    account TEXT NOT NULL,
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    model TEXT NOT NULL,
    after_device TEXT NOT NULL,
    queued_ms INTEGER NOT NULL,
    PRIMARY KEY (account, pk, sk)
) WITHOUT ROWID;
";

/// Appends the key's feed entry for the devices of `account` after `after` (device order), at
/// most `limit` of them, in the caller's transaction. Returns the devices reached with their
/// new heads, in device order.
pub(super) fn advance_account(
    conn: &Connection,
    run: u64,
    account: &str,
    after: &str,
    limit: usize,
    model: &str,
    key: &ItemKey,
) -> Result<Vec<(String, u64)>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut moved: Vec<(String, u64, String)> = conn
        .prepare_cached(
            "UPDATE devices SET feed_head = feed_head + 1, feed_gen = ?2,
                feed_generations = CASE WHEN feed_gen = ?2 THEN feed_generations
                    ELSE feed_generations || ',' || ?2 || ':' || feed_head END
             WHERE account = ?1 AND device IN
                (SELECT device FROM devices WHERE account = ?1 AND device > ?3
                 ORDER BY device LIMIT ?4)
             RETURNING device, feed_head, feed_generations",
        )
        .and_then(|mut s| {
            s.query_map(params![account, run.to_string(), after, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(db("advancing the feeds of an account"))?;
    // RETURNING gives no order; the job's position is the last device in device order.
    moved.sort_by(|a, b| a.0.cmp(&b.0));
    let mut reached = Vec::with_capacity(moved.len());
    for (device, head, gens) in moved {
        append_entry(conn, account, &device, head, &gens, "", model, key)?;
        reached.push((device, head));
    }
    Ok(reached)
}

/// The entry of `key` (owned by `owner_device`, `''` for a broadcast) in one device's feed at
/// sequence `head`, replacing the key's older entry; drops the feed's oldest generation when
/// `gens` (its generations after the append) holds too many.
#[allow(clippy::too_many_arguments)]
pub(super) fn append_entry(
    conn: &Connection,
    account: &str,
    device: &str,
    head: u64,
    gens: &str,
    owner_device: &str,
    model: &str,
    key: &ItemKey,
) -> Result<(), StoreError> {
    if let Some(kept) = feed::oldest_generations_dropped(gens)? {
        conn.prepare_cached(
            "UPDATE devices SET feed_generations = ?3 WHERE account = ?1 AND device = ?2",
        )
        .and_then(|mut s| s.execute(params![account, device, kept]))
        .map_err(db("dropping a feed's oldest generation"))?;
    }
    conn.prepare_cached(
        "DELETE FROM feed WHERE account = ?1 AND device = ?2 AND owner = ?3 AND pk = ?4 AND sk = ?5",
    )
    .and_then(|mut s| s.execute(params![account, device, owner_device, key.pk, key.sk]))
    .map_err(db("dropping an older feed entry"))?;
    conn.prepare_cached(
        "INSERT INTO feed (account, device, seq, owner, model, pk, sk) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| s.execute(params![account, device, head, owner_device, model, key.pk, key.sk]))
    .map_err(db("appending a feed entry"))?;
    Ok(())
}

/// Records where the fan-out of `key` stands after a write reached the devices up to
/// `after_device`: a job when devices may remain (`more`), none otherwise. Either way it
/// replaces the job an earlier write of the key left: this write starts over.
pub(super) fn record(
    conn: &Connection,
    account: &str,
    model: &str,
    key: &ItemKey,
    after_device: Option<&str>,
    now_ms: u64,
) -> Result<(), StoreError> {
    match after_device {
        Some(after) => {
            conn.prepare_cached(
                "INSERT INTO fanout (account, pk, sk, model, after_device, queued_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (account, pk, sk) DO UPDATE SET model = excluded.model,
                    after_device = excluded.after_device, queued_ms = excluded.queued_ms",
            )
            .and_then(|mut s| {
                s.execute(params![
                    account,
                    key.pk,
                    key.sk,
                    model,
                    after,
                    now_ms as i64
                ])
            })
            .map_err(db("queueing a broadcast fan-out"))?;
        }
        None => {
            drop_job(conn, account, key)?;
        }
    }
    Ok(())
}

/// One bounded step of the oldest pending fan-out, in the caller's transaction: the next
/// `limit` devices get the key's entry. `None` when no fan-out is pending.
pub(super) fn step(
    conn: &Connection,
    run: u64,
    limit: usize,
) -> Result<Option<Advanced>, StoreError> {
    let job: Option<(String, String, String, String, String)> = conn
        .prepare_cached(
            "SELECT account, pk, sk, model, after_device FROM fanout
             ORDER BY queued_ms, account, pk, sk LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .map_err(db("reading the pending broadcast fan-outs"))?;
    let Some((account, pk, sk, model, after)) = job else {
        return Ok(None);
    };
    let key = ItemKey { pk, sk };
    let reached = advance_account(conn, run, &account, &after, limit, &model, &key)?;
    let last = reached
        .last()
        .filter(|_| reached.len() >= limit)
        .map(|(d, _)| d.clone());
    // `queued_ms` unchanged: the job keeps its place among the others (oldest first).
    match &last {
        Some(after) => conn
            .prepare_cached(
                "UPDATE fanout SET after_device = ?4 WHERE account = ?1 AND pk = ?2 AND sk = ?3",
            )
            .and_then(|mut s| s.execute(params![account, key.pk, key.sk, after]))
            .map_err(db("advancing a broadcast fan-out"))?,
        None => {
            drop_job(conn, &account, &key)?;
            0
        }
    };
    account_devices(&account, reached).map(Some)
}

/// Whether any fan-out is pending (read at open: a job a stopped process left).
pub(super) fn any_pending(conn: &Connection) -> Result<bool, StoreError> {
    conn.query_row("SELECT EXISTS (SELECT 1 FROM fanout)", [], |r| r.get(0))
        .map_err(db("reading the pending broadcast fan-outs"))
}

/// Ends the fan-out of `key`, if one is pending (it reached the last device). Returns where it
/// stood: the last device it had reached.
pub(super) fn drop_job(
    conn: &Connection,
    account: &str,
    key: &ItemKey,
) -> Result<Option<String>, StoreError> {
    conn.prepare_cached(
        "DELETE FROM fanout WHERE account = ?1 AND pk = ?2 AND sk = ?3 RETURNING after_device",
    )
    .and_then(|mut s| {
        s.query_row(params![account, key.pk, key.sk], |r| r.get(0))
            .optional()
    })
    .map_err(db("ending a broadcast fan-out"))
}

/// Retention purged the broadcast `key` while its fan-out was pending: the job ends, and each
/// device it had not reached (after `after` in device order) holds at most an older entry of
/// the key, already read, and never gets the tombstone. Such a device's feed moves by one and
/// its floor to the new head, as if the tombstone's entry was appended and purged: its next read
/// is a resync, which removes the item. (The feed's generation is left as it is: the head
/// moved, no entry was appended.) Returns how many devices.
pub(super) fn end_purged(
    conn: &Connection,
    account: &str,
    key: &ItemKey,
) -> Result<u64, StoreError> {
    let Some(after) = drop_job(conn, account, key)? else {
        return Ok(0);
    };
    conn.prepare_cached(
        "UPDATE devices SET feed_head = feed_head + 1, feed_floor = feed_head + 1
         WHERE account = ?1 AND device > ?2",
    )
    .and_then(|mut s| s.execute(params![account, after]))
    .map(|n| n as u64)
    .map_err(db("sending the devices of a purged fan-out to a resync"))
}
