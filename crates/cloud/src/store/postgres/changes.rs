//! The change log of the PostgreSQL store: reading an account's entries after a cursor, and
//! the log's retention (see `crate::store::changes` for what the log is).
//!
//! It exists so the `changes` and `change_floors` tables are read and trimmed in one place; the
//! entries themselves are appended by `txn` (every row write), in the write's transaction.
//!
//! Entries are visible in sequence order per account although several processes append: an
//! appender holds its account's `change_floors` row locked from its first entry to its commit,
//! and takes each number from the global `change_seq` under that lock, so the account's next
//! appender takes a higher number and commits after it (the module documentation of `super`).

use postgres::Row;

use super::super::changes::{
    ChangeEvent, ChangeKey, ChangeOp, ChangePage, ChangePurgeStats, ChangeQuery, ChangeRead,
    ChangeRetention,
};
use super::super::encoding::parse_version;
use super::super::StoreError;
use super::sql::{col, col_u64, int, json_item, limit, Conn, Params};

const CHANGE_COLS: &str = "seq, account, device, model, pk, sk, version, deleted, item, at_ms";

fn decode(r: &Row) -> Result<ChangeEvent, StoreError> {
    let seq = col_u64(r, 0)?;
    let device: String = col(r, 2)?;
    let model: String = col(r, 3)?;
    let pk: String = col(r, 4)?;
    let sk: String = col(r, 5)?;
    let deleted: bool = col(r, 7)?;
    let item: Option<serde_json::Value> = col(r, 8)?;
    let (op, item) = if deleted {
        (ChangeOp::Delete, None)
    } else {
        let Some(value) = item else {
            return Err(StoreError::Corrupt(format!(
                "change {seq} ({model} {pk} {sk}) is a put without an item"
            )));
        };
        (ChangeOp::Put, Some(json_item(value)?))
    };
    Ok(ChangeEvent {
        seq,
        account: col(r, 1)?,
        device: (!device.is_empty()).then_some(device),
        model,
        key: ChangeKey { pk, sk },
        version: parse_version(&col::<String>(r, 6)?)?,
        op,
        item,
        at_ms: col_u64(r, 9)?,
    })
}

/// The highest sequence number ever given (0 for a log never written): where the store's hint
/// of the head starts. The sequence keeps it even when retention emptied the log.
pub(super) fn sequence_head(conn: &mut Conn) -> Result<u64, StoreError> {
    let row = conn.query_one(
        "reading the change log's sequence",
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM change_seq",
        &[],
    )?;
    col_u64(&row, 0)
}

/// The account's retention floor: the highest sequence number retention removed (0: none).
fn account_floor(conn: &mut Conn, account: &str) -> Result<u64, StoreError> {
    match conn.query_opt(
        "reading a change log floor",
        "SELECT floor FROM change_floors WHERE account = $1",
        &[&account],
    )? {
        Some(r) => col_u64(&r, 0),
        None => Ok(0),
    }
}

/// The account's head: its highest sequence number, or its floor when retention removed all.
pub(super) fn account_head(conn: &mut Conn, account: &str) -> Result<u64, StoreError> {
    let row = conn.query_one(
        "reading an account's change log head",
        "SELECT coalesce(max(seq), 0) FROM changes WHERE account = $1",
        &[&account],
    )?;
    Ok(col_u64(&row, 0)?.max(account_floor(conn, account)?))
}

/// A page of an account's change log (see `CloudStore::read_changes`).
pub(super) fn read_changes(conn: &mut Conn, q: &ChangeQuery) -> Result<ChangeRead, StoreError> {
    // The operation's snapshot holds the floor, the head and the entries; in a group (a
    // snapshot per statement) the entries are bounded by the head read first.
    let floor = account_floor(conn, &q.account)?;
    let head = account_head(conn, &q.account)?;
    if q.after < floor {
        return Ok(ChangeRead::Expired { floor, head });
    }
    let (max, scan) = (q.limit.max(1), q.scan.max(1));
    // The last entry this read may examine: the scan-th after the cursor, or the head.
    let bound = conn.query_opt(
        "bounding a change log read",
        "SELECT seq FROM changes WHERE account = $1 AND seq > $2 AND seq <= $3
         ORDER BY seq LIMIT 1 OFFSET $4",
        &[&q.account, &int(q.after), &int(head), &limit(scan - 1)],
    )?;
    let upper = match bound {
        Some(r) => col_u64(&r, 0)?,
        None => head,
    };
    let rows = conn.query(
        "reading the change log",
        &format!(
            "SELECT {CHANGE_COLS} FROM changes
             WHERE account = $1 AND seq > $2 AND seq <= $3
               AND ($4::text IS NULL OR model = $4) AND ($5::text IS NULL OR device = $5)
             ORDER BY seq LIMIT $6"
        ),
        &[
            &q.account,
            &int(q.after),
            &int(upper),
            &q.model,
            &q.device,
            &limit(max),
        ],
    )?;
    let changes = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    // A full page ends at its last change; otherwise everything up to the bound was examined.
    let next = match changes.last() {
        Some(last) if changes.len() == max => last.seq,
        _ => upper.max(q.after),
    };
    Ok(ChangeRead::Page(ChangePage {
        changes,
        next,
        head,
    }))
}

/// Applies the change log's retention, at most a batch (see `CloudStore::purge_changes`).
///
/// Each removal is one statement that deletes the entries and raises their accounts' floors
/// from exactly what it deleted, so an entry committed by another process between two
/// statements is either removed with its floor raised or left alone.
pub(super) fn purge_changes(
    conn: &mut Conn,
    now_ms: u64,
    retention: &ChangeRetention,
) -> Result<ChangePurgeStats, StoreError> {
    let cutoff = int(now_ms.saturating_sub(retention.max_age_ms));
    let batch = retention.batch.max(1);
    // By age: everything below the first entry young enough, a prefix of the log (an entry
    // stamped earlier than one before it, the wall clock having stepped back, goes with the
    // prefix or stays with the rest, never leaving a hole), at most a batch of it: the walk
    // reads at most a batch of the oldest entries.
    let oldest = conn.query(
        "finding the oldest change to keep",
        "SELECT seq, at_ms FROM changes ORDER BY seq LIMIT $1",
        &[&int(batch)],
    )?;
    let mut first_young = None;
    for r in &oldest {
        if col::<i64>(r, 1)? >= cutoff {
            first_young = Some(col::<i64>(r, 0)?);
            break;
        }
    }
    let cut = match (first_young, oldest.last()) {
        (Some(seq), _) => seq,
        (None, Some(last)) => col::<i64>(last, 0)? + 1,
        (None, None) => 0,
    };
    let mut removed = remove_changes(
        conn,
        "removing old changes",
        "DELETE FROM changes WHERE seq < $1 RETURNING account, seq",
        &[&cut],
    )?;
    if first_young.is_none() && oldest.len() as u64 == batch {
        // The batch was all old: the rest waits for the next call, the count for its end.
        return Ok(ChangePurgeStats {
            removed,
            kept: None,
            more: true,
        });
    }
    // By count per account: the oldest beyond the limit, within what is left of the batch.
    let counts = conn.query(
        "counting each account's changes",
        "SELECT account, count(*) FROM changes GROUP BY account",
        &[],
    )?;
    let mut kept = 0u64;
    let mut over = Vec::new();
    for r in &counts {
        let (account, n): (String, u64) = (col(r, 0)?, col_u64(r, 1)?);
        kept += n;
        if n > retention.max_per_account {
            over.push((account, n - retention.max_per_account));
        }
    }
    let mut more = false;
    for (account, excess) in over {
        let take = excess.min(batch.saturating_sub(removed));
        if take < excess {
            more = true;
        }
        if take == 0 {
            break;
        }
        // The newest entry to remove: the account's `take`-th oldest.
        let row = conn.query_one(
            "finding an account's oldest change to keep",
            "SELECT seq FROM changes WHERE account = $1 ORDER BY seq LIMIT 1 OFFSET $2",
            &[&account, &int(take - 1)],
        )?;
        let last_removed: i64 = col(&row, 0)?;
        let n = remove_changes(
            conn,
            "removing an account's oldest changes",
            "DELETE FROM changes WHERE account = $1 AND seq <= $2 RETURNING account, seq",
            &[&account, &last_removed],
        )?;
        removed += n;
        kept = kept.saturating_sub(n);
    }
    Ok(ChangePurgeStats {
        removed,
        kept: Some(kept),
        more,
    })
}

/// Runs `delete` (a `DELETE FROM changes ... RETURNING account, seq`) and, in the same
/// statement, raises each account's floor to the highest sequence number it removed; returns
/// how many entries went.
fn remove_changes(
    conn: &mut Conn,
    what: &str,
    delete: &str,
    params: Params<'_>,
) -> Result<u64, StoreError> {
    let row = conn.query_one(
        what,
        &format!(
            "WITH gone AS ({delete}),
             floors AS (
                INSERT INTO change_floors (account, floor)
                SELECT account, max(seq) FROM gone GROUP BY account
                ON CONFLICT (account) DO UPDATE
                SET floor = greatest(change_floors.floor, excluded.floor)
                RETURNING 1)
             SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM floors)"
        ),
        params,
    )?;
    col_u64(&row, 0)
}
