//! Broadcast fan-out in bounded batches, as the SQLite store does it (see its `fanout` module
//! for why): a broadcast write reaches the first devices of its account in its own transaction
//! and leaves a durable job in `fanout` for the rest, which [`step`] works off a batch per
//! transaction, from any node sharing the schema.
//!
//! Locks follow the store's order (owner, device rows, change-log row): a step takes the
//! broadcast owner's advisory lock (the one every writer of the account's broadcast items takes
//! first), then re-reads its job under it, then locks the batch's device rows. Two nodes that
//! pick the same job queue on that lock, and the second continues where the first left off.

use devtables_schema::ItemKey;

use super::super::encoding::{account_devices, oldest_generations_dropped};
use super::super::{Advanced, StoreError};
use super::sql::{col, col_u64, int, Conn};
use super::txn::lock_owner_cols;
use super::State;

/// Layout 2: the pending fan-outs, one per broadcast key.
pub(super) const LAYOUT_2: &str = r#"
CREATE TABLE fanout (
    account text COLLATE "C" NOT NULL,
    pk text COLLATE "C" NOT NULL,
    sk text COLLATE "C" NOT NULL,
    model text COLLATE "C" NOT NULL,
    after_device text COLLATE "C" NOT NULL,
    queued_ms bigint NOT NULL,
    PRIMARY KEY (account, pk, sk)
);
"#;

/// One device's head move: the run's first append to a feed also starts its generation at the
/// head before this append (every SET expression reads the row as it was). `$3`: the run.
pub(super) const ADVANCE_SET: &str = "feed_head = feed_head + 1, feed_gen = $3::text,
    feed_generations = CASE WHEN feed_gen = $3::text THEN feed_generations
        ELSE feed_generations || ',' || $3::text || ':' || feed_head END";

/// The key's entry at each moved device's new head (coalesced: one per key). `$4`..`$7`: the
/// owner's device column, the model, pk and sk.
pub(super) const ADVANCE_ENTRY: &str =
    "INSERT INTO feed (account, device, seq, owner, model, pk, sk)
    SELECT account, device, feed_head, $4, $5, $6, $7 FROM moved
    ON CONFLICT (account, device, owner, pk, sk)
    DO UPDATE SET seq = excluded.seq, model = excluded.model";

/// Appends the key's entry of a broadcast to the devices of `account` after `after` (device
/// order), at most `limit` of them, locking their rows. Returns the devices reached with their
/// new heads, in device order.
pub(super) fn advance_account(
    conn: &mut Conn,
    run: u64,
    account: &str,
    after: &str,
    limit: usize,
    model: &str,
    key: &ItemKey,
) -> Result<Vec<(String, u64)>, StoreError> {
    let rows = conn.query(
        "advancing the feeds of an account",
        &format!(
            "WITH targets AS (SELECT account, device FROM devices
                WHERE account = $1 AND device > $2 ORDER BY device LIMIT $8 FOR NO KEY UPDATE),
             moved AS (UPDATE devices d SET {ADVANCE_SET} FROM targets t
                WHERE d.account = t.account AND d.device = t.device
                RETURNING d.account, d.device, d.feed_head, d.feed_generations),
             entry AS ({ADVANCE_ENTRY})
             SELECT device, feed_head, feed_generations FROM moved"
        ),
        &[
            &account,
            &after,
            &run.to_string(),
            &"",
            &model,
            &key.pk,
            &key.sk,
            &int(limit as u64),
        ],
    )?;
    let mut reached = Vec::with_capacity(rows.len());
    for row in rows {
        let device: String = col(&row, 0)?;
        let gens: String = col(&row, 2)?;
        drop_oldest_generation(conn, account, &device, &gens)?;
        reached.push((device, col_u64(&row, 1)?));
    }
    reached.sort();
    Ok(reached)
}

/// Drops a feed's oldest generation when `gens` (its generations after an append) holds too
/// many.
pub(super) fn drop_oldest_generation(
    conn: &mut Conn,
    account: &str,
    device: &str,
    gens: &str,
) -> Result<(), StoreError> {
    if let Some(kept) = oldest_generations_dropped(gens)? {
        conn.execute(
            "dropping a feed's oldest generation",
            "UPDATE devices SET feed_generations = $3 WHERE account = $1 AND device = $2",
            &[&account, &device, &kept],
        )?;
    }
    Ok(())
}

/// Records where the fan-out of `key` stands after a write reached the devices up to
/// `after_device`: a job when devices may remain, none otherwise. Either way it replaces the job
/// an earlier write of the key left: this write starts over.
pub(super) fn record(
    conn: &mut Conn,
    account: &str,
    model: &str,
    key: &ItemKey,
    after_device: Option<&str>,
    now_ms: u64,
) -> Result<(), StoreError> {
    match after_device {
        Some(after) => conn.execute(
            "queueing a broadcast fan-out",
            "INSERT INTO fanout (account, pk, sk, model, after_device, queued_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (account, pk, sk) DO UPDATE SET model = excluded.model,
                after_device = excluded.after_device, queued_ms = excluded.queued_ms",
            &[&account, &key.pk, &key.sk, &model, &after, &int(now_ms)],
        )?,
        None => drop_job(conn, account, key)?,
    };
    Ok(())
}

/// One bounded step of the oldest pending fan-out, in the caller's write transaction. `None`
/// when no fan-out is pending.
pub(super) fn step(conn: &mut Conn, state: &State) -> Result<Option<Advanced>, StoreError> {
    let Some(oldest) = conn.query_opt(
        "reading the pending broadcast fan-outs",
        "SELECT account, pk, sk FROM fanout ORDER BY queued_ms, account, pk, sk LIMIT 1",
        &[],
    )?
    else {
        return Ok(None);
    };
    let account: String = col(&oldest, 0)?;
    let key = ItemKey {
        pk: col(&oldest, 1)?,
        sk: col(&oldest, 2)?,
    };
    lock_owner_cols(conn, &state.lock_prefix, &account, "")?;
    // Under the lock: another node may have advanced or ended the job, or a write restarted it.
    let Some(job) = conn.query_opt(
        "reading a broadcast fan-out",
        "SELECT model, after_device FROM fanout WHERE account = $1 AND pk = $2 AND sk = $3",
        &[&account, &key.pk, &key.sk],
    )?
    else {
        return Ok(Some(Vec::new()));
    };
    let (model, after): (String, String) = (col(&job, 0)?, col(&job, 1)?);
    let limit = state.fanout_batch.max(1);
    let reached = advance_account(conn, state.run, &account, &after, limit, &model, &key)?;
    match reached.last().filter(|_| reached.len() >= limit) {
        // `queued_ms` unchanged: the job keeps its place among the others (oldest first).
        Some((last, _)) => conn.execute(
            "advancing a broadcast fan-out",
            "UPDATE fanout SET after_device = $4 WHERE account = $1 AND pk = $2 AND sk = $3",
            &[&account, &key.pk, &key.sk, last],
        )?,
        None => drop_job(conn, &account, &key)?,
    };
    account_devices(&account, reached).map(Some)
}

/// Ends the fan-out of `key`, if one is pending (it reached the last device).
fn drop_job(conn: &mut Conn, account: &str, key: &ItemKey) -> Result<u64, StoreError> {
    conn.execute(
        "ending a broadcast fan-out",
        "DELETE FROM fanout WHERE account = $1 AND pk = $2 AND sk = $3",
        &[&account, &key.pk, &key.sk],
    )
}

/// Whether any fan-out is pending (read at connect: a job another process left).
pub(super) fn any_pending(conn: &mut Conn) -> Result<bool, StoreError> {
    let row = conn.query_one(
        "reading the pending broadcast fan-outs",
        "SELECT EXISTS (SELECT 1 FROM fanout)",
        &[],
    )?;
    col(&row, 0)
}
