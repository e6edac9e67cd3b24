//! The change log of the SQLite store: reading an account's entries after a cursor, and the
//! log's retention (see [`crate::store::changes`] for what the log is).
//!
//! It exists so the `changes` and `change_floors` tables are read and trimmed in one place; the
//! entries themselves are appended by `txn` (every row write), in the write's transaction.
//!
//! Entries are visible in sequence order because one connection writes them, one transaction
//! at a time: a sequence number is taken at insert and made visible at commit, and nothing else
//! commits in between.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::super::changes::{
    ChangeEvent, ChangeKey, ChangeOp, ChangePage, ChangePurgeStats, ChangeQuery, ChangeRead,
    ChangeRetention,
};
use super::super::StoreError;
use super::sql::{db, parse_item, parse_version, read_txn, sql_int, write_txn};

const CHANGE_COLS: &str = "seq, account, device, model, pk, sk, version, deleted, item, at_ms";

type RawChange = (
    u64,
    String,
    String,
    String,
    String,
    String,
    String,
    bool,
    Option<String>,
    u64,
);

fn change_row(r: &Row<'_>) -> rusqlite::Result<RawChange> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

fn decode(raw: RawChange) -> Result<ChangeEvent, StoreError> {
    let (seq, account, device, model, pk, sk, version, deleted, item, at_ms) = raw;
    let (op, item) = if deleted {
        (ChangeOp::Delete, None)
    } else {
        let Some(text) = item else {
            return Err(StoreError::Corrupt(format!(
                "change {seq} ({model} {pk} {sk}) is a put without an item"
            )));
        };
        (ChangeOp::Put, Some(parse_item(&text)?))
    };
    Ok(ChangeEvent {
        seq,
        account,
        device: (!device.is_empty()).then_some(device),
        model,
        key: ChangeKey { pk, sk },
        version: parse_version(&version)?,
        op,
        item,
        at_ms,
    })
}

/// The highest sequence number ever given (0 for a log never written): where the store's hint
/// of the head starts at open. `sqlite_sequence` keeps it even when retention emptied the log.
pub(super) fn sequence_head(conn: &Connection) -> Result<u64, StoreError> {
    let head: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'changes'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(db("reading the change log's sequence"))?;
    Ok(head.map_or(0, |h| u64::try_from(h).unwrap_or(0)))
}

/// The account's retention floor: the highest sequence number retention removed (0: none).
pub(super) fn account_floor(conn: &Connection, account: &str) -> Result<u64, StoreError> {
    conn.prepare_cached("SELECT floor FROM change_floors WHERE account = ?1")
        .and_then(|mut s| s.query_row(params![account], |r| r.get(0)).optional())
        .map(Option::unwrap_or_default)
        .map_err(db("reading a change log floor"))
}

/// The account's head: its highest sequence number, or its floor when retention removed all.
pub(super) fn account_head(conn: &Connection, account: &str) -> Result<u64, StoreError> {
    let newest: Option<u64> = conn
        .prepare_cached("SELECT max(seq) FROM changes WHERE account = ?1")
        .and_then(|mut s| s.query_row(params![account], |r| r.get(0)))
        .map_err(db("reading an account's change log head"))?;
    Ok(newest.unwrap_or(0).max(account_floor(conn, account)?))
}

/// A page of an account's change log (see [`CloudStore::read_changes`]).
///
/// [`CloudStore::read_changes`]: super::super::CloudStore::read_changes
pub(super) fn read_changes(
    conn: &mut Connection,
    q: &ChangeQuery,
) -> Result<ChangeRead, StoreError> {
    // One snapshot for the floor, the head and the entries.
    let tx = read_txn(conn, "starting a change log read")?;
    let floor = account_floor(&tx, &q.account)?;
    let head = account_head(&tx, &q.account)?;
    if q.after < floor {
        return Ok(ChangeRead::Expired { floor, head });
    }
    let (limit, scan) = (q.limit.max(1), q.scan.max(1));
    // The last entry this read may examine: the scan-th after the cursor, or the head.
    let bound: Option<u64> = tx
        .prepare_cached(
            "SELECT seq FROM changes WHERE account = ?1 AND seq > ?2 ORDER BY seq LIMIT 1 OFFSET ?3",
        )
        .and_then(|mut s| {
            s.query_row(params![q.account, q.after, sql_int(scan - 1)], |r| {
                r.get(0)
            })
            .optional()
        })
        .map_err(db("bounding a change log read"))?;
    let upper = bound.unwrap_or(head);
    let raw: Vec<RawChange> = tx
        .prepare_cached(&format!(
            "SELECT {CHANGE_COLS} FROM changes
             WHERE account = ?1 AND seq > ?2 AND seq <= ?3
               AND (?4 IS NULL OR model = ?4) AND (?5 IS NULL OR device = ?5)
             ORDER BY seq LIMIT ?6"
        ))
        .and_then(|mut s| {
            s.query_map(
                params![q.account, q.after, upper, q.model, q.device, sql_int(limit)],
                change_row,
            )?
            .collect()
        })
        .map_err(db("reading the change log"))?;
    let changes = raw.into_iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    // A full page ends at its last change; otherwise everything up to the bound was examined.
    let next = match changes.last() {
        Some(last) if changes.len() == limit => last.seq,
        _ => upper.max(q.after),
    };
    Ok(ChangeRead::Page(ChangePage {
        changes,
        next,
        head,
    }))
}

/// Applies the change log's retention, at most a batch (see [`CloudStore::purge_changes`]).
///
/// [`CloudStore::purge_changes`]: super::super::CloudStore::purge_changes
pub(super) fn purge_changes(
    conn: &mut Connection,
    now_ms: u64,
    retention: &ChangeRetention,
) -> Result<ChangePurgeStats, StoreError> {
    let cutoff = i64::try_from(now_ms.saturating_sub(retention.max_age_ms)).unwrap_or(i64::MAX);
    let batch = retention.batch.max(1);
    let tx = write_txn(conn, "starting a change log purge")?;
    // By age: everything below the first entry young enough, a prefix of the log (an entry
    // stamped earlier than one before it, the wall clock having stepped back, goes with the
    // prefix or stays with the rest, never leaving a hole), at most a batch of it: the walk
    // reads at most a batch of the oldest entries.
    let oldest: Vec<(i64, i64)> = tx
        .prepare_cached("SELECT seq, at_ms FROM changes ORDER BY seq LIMIT ?1")
        .and_then(|mut s| {
            s.query_map(params![batch], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(db("finding the oldest change to keep"))?;
    let first_young = oldest
        .iter()
        .find(|(_, at)| *at >= cutoff)
        .map(|(seq, _)| *seq);
    let cut = match (first_young, oldest.last()) {
        (Some(seq), _) => seq,
        (None, Some((last, _))) => last + 1,
        (None, None) => 0,
    };
    raise_floors(
        &tx,
        "SELECT account, max(seq) FROM changes WHERE seq < ?1 GROUP BY account",
        params![cut],
    )?;
    let mut removed = tx
        .prepare_cached("DELETE FROM changes WHERE seq < ?1")
        .and_then(|mut s| s.execute(params![cut]))
        .map_err(db("removing old changes"))? as u64;
    if first_young.is_none() && removed == batch {
        // The batch was all old: the rest waits for the next call, the count for its end.
        tx.commit().map_err(db("committing a change log purge"))?;
        return Ok(ChangePurgeStats {
            removed,
            kept: None,
            more: true,
        });
    }
    // By count per account: the oldest beyond the limit, within what is left of the batch.
    let counts: Vec<(String, u64)> = tx
        .prepare_cached("SELECT account, count(*) FROM changes GROUP BY account")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(db("counting each account's changes"))?;
    let mut kept: u64 = counts.iter().map(|(_, n)| n).sum();
    let mut more = false;
    for (account, n) in counts {
        let excess = n.saturating_sub(retention.max_per_account);
        if excess == 0 {
            continue;
        }
        let take = excess.min(batch - removed);
        if take < excess {
            more = true;
        }
        if take == 0 {
            break;
        }
        // The newest entry to remove: the account's `take`-th oldest.
        let last_removed: u64 = tx
            .prepare_cached(
                "SELECT seq FROM changes WHERE account = ?1 ORDER BY seq LIMIT 1 OFFSET ?2",
            )
            .and_then(|mut s| s.query_row(params![account, take - 1], |r| r.get(0)))
            .map_err(db("finding an account's oldest change to keep"))?;
        raise_floors(
            &tx,
            "SELECT ?1, ?2 WHERE true",
            params![account, last_removed],
        )?;
        let n = tx
            .prepare_cached("DELETE FROM changes WHERE account = ?1 AND seq <= ?2")
            .and_then(|mut s| s.execute(params![account, last_removed]))
            .map_err(db("removing an account's oldest changes"))? as u64;
        removed += n;
        kept -= n;
    }
    tx.commit().map_err(db("committing a change log purge"))?;
    Ok(ChangePurgeStats {
        removed,
        kept: Some(kept),
        more,
    })
}

/// Raises the floors of the (account, floor) rows `select` yields (never lowers one).
fn raise_floors(
    conn: &Connection,
    select: &str,
    params: impl rusqlite::Params,
) -> Result<(), StoreError> {
    // `WHERE` in the SELECT lets SQLite tell the upsert's ON from a join's.
    conn.prepare_cached(&format!(
        "INSERT INTO change_floors (account, floor) {select}
         ON CONFLICT (account) DO UPDATE SET floor = max(floor, excluded.floor)"
    ))
    .and_then(|mut s| s.execute(params))
    .map_err(db("raising change log floors"))?;
    Ok(())
}
