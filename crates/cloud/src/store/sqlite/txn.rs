//! The write transactions of the SQLite store: [`SqlTxn`], the [`CloudTxn`] the replication
//! rules of `devtables_sync::apply` run in, and the two writes that use it (a device's push and
//! an API write).
//!
//! It exists because these rules decide every write: the store only reads and writes the rows
//! they name, and this file is all of that, so a write never takes another path. That is also
//! why every row write appends its entry to the change log here (`changes`, see
//! [`crate::store::changes`]), in the same transaction: no write can reach `items` without it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::store::apply_within_quotas;
use devtables_schema::{ItemKey, Schema};
use devtables_sync::apply::{
    cloud_write, CloudOp, CloudTxn, CloudWriteError, Conflict, Loser, PushCounts, PushRules,
    RowWrite, StoredRow,
};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{hlc_to_string, Change, ChangeResult};
use rusqlite::{params, Connection, OptionalExtension};

use super::super::{Advanced, DeviceQuotas, StoreError};
use super::devices::{device_exists, device_revoked};
use super::fanout;
use super::quota;
use super::sql::{db, item_json, map_err, owner_cols, parse_version, write_txn};
use crate::warn_limit::WarnLimiter;

/// One write transaction as the replication rules see it.
pub(super) struct SqlTxn<'c> {
    conn: &'c Connection,
    now_ms: u64,
    advanced: BTreeMap<DeviceId, u64>,
    /// Most conflict records kept per device.
    max_conflicts: u64,
    /// Push counts gathered for one write at the end (a push applied change by change),
    /// rather than written at every `count_push`.
    deferred: Option<PushCounts>,
    /// Conflict records dropped for the per-device cap in this transaction.
    conflicts_dropped: u64,
    /// The store's run: an append to a feed of another generation starts this one.
    run: u64,
    /// Most devices a broadcast's feed entry reaches in its own transaction.
    fanout_batch: usize,
    /// The store's hints, raised by this transaction (committed or not).
    hints: Arc<StoreHints>,
}

/// What the store's transactions tell it beyond their results: cheap hints read after a job,
/// raised by every transaction whether it commits or not (a rolled-back one only makes the
/// reader look for nothing).
#[derive(Debug, Default)]
pub(super) struct StoreHints {
    /// The change log's head: raised by every append, read by the store thread to wake the
    /// log's readers ([`CloudStore::change_head_hint`](super::super::CloudStore::change_head_hint)).
    pub change_head: AtomicU64,
    /// A broadcast fan-out may be pending: found at open, set by a write that queued one,
    /// cleared by a step that found none.
    pub fanout_pending: AtomicBool,
}

/// What a write transaction takes from the store it runs in.
#[derive(Clone, Debug)]
pub(super) struct TxnEnv {
    pub quotas: DeviceQuotas,
    /// The store's run (see [`SqlTxn::run`]).
    pub run: u64,
    /// Most devices a broadcast's feed entry reaches in the write's transaction.
    pub fanout_batch: usize,
    pub hints: Arc<StoreHints>,
}

impl<'c> SqlTxn<'c> {
    pub(super) fn new(conn: &'c Connection, now_ms: u64, env: &TxnEnv) -> SqlTxn<'c> {
        SqlTxn {
            conn,
            now_ms,
            advanced: BTreeMap::new(),
            max_conflicts: env.quotas.max_conflicts,
            deferred: None,
            conflicts_dropped: 0,
            run: env.run,
            fanout_batch: env.fanout_batch,
            hints: env.hints.clone(),
        }
    }

    /// The devices whose feeds advanced, with their new heads.
    pub(super) fn into_advanced(self) -> Advanced {
        self.advanced.into_iter().collect()
    }

    /// Writes the push counts gathered since [`Self::defer_counts`], with `over_quota` changes
    /// refused for a quota (counted as rejected too).
    fn write_counts(&mut self, device: &DeviceId, over_quota: u64) -> Result<(), StoreError> {
        let mut counts = self.deferred.take().unwrap_or_default();
        counts.rejected += over_quota;
        if counts != PushCounts::default() {
            self.count_push(device, &counts)?;
        }
        if over_quota > 0 {
            self.conn
                .prepare_cached(
                    "UPDATE devices SET changes_over_quota = changes_over_quota + ?3
                     WHERE account = ?1 AND device = ?2",
                )
                .and_then(|mut s| s.execute(params![device.account, device.device, over_quota]))
                .map_err(db("counting changes over quota"))?;
        }
        Ok(())
    }

    fn defer_counts(&mut self) {
        self.deferred = Some(PushCounts::default());
    }
}

impl CloudTxn for SqlTxn<'_> {
    type Error = StoreError;

    fn stored_row(
        &mut self,
        owner: &Owner,
        key: &ItemKey,
    ) -> Result<Option<StoredRow>, StoreError> {
        // The row is identified by (owner, pk, sk), the single-table design: its model is an
        // attribute the replication rules check.
        let (account, device) = owner_cols(owner);
        type Raw = (String, String, bool, Option<String>);
        let row: Option<Raw> = self
            .conn
            .prepare_cached(
                "SELECT model, version, deleted, base FROM items WHERE account = ?1 AND device = ?2 AND pk = ?3 AND sk = ?4",
            )
            .and_then(|mut s| {
                s.query_row(params![account, device, key.pk, key.sk], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(db("reading an item's version"))?;
        row.map(|(model, v, deleted, base)| {
            Ok(StoredRow {
                model,
                version: parse_version(&v)?,
                deleted,
                base: base.as_deref().map(parse_version).transpose()?,
            })
        })
        .transpose()
    }

    fn purge_watermark(&mut self, owner: &Owner) -> Result<Option<Hlc>, StoreError> {
        let (account, device) = owner_cols(owner);
        let v: Option<String> = self
            .conn
            .prepare_cached(
                "SELECT purged_below FROM watermarks WHERE account = ?1 AND device = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![account, device], |r| r.get(0))
                    .optional()
            })
            .map_err(db("reading a purge watermark"))?;
        v.as_deref().map(parse_version).transpose()
    }

    fn write_row(&mut self, w: &RowWrite<'_>) -> Result<(), StoreError> {
        let (account, device) = owner_cols(w.owner);
        let json = w.item.map(item_json).transpose()?;
        if matches!(w.owner, Owner::Device(_)) {
            self.count_usage(account, device, w.key, json.as_deref())?;
        }
        self.conn
            .prepare_cached(
                "INSERT INTO items (account, device, model, pk, sk, item, version, deleted, updated_ms, base)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (account, device, pk, sk) DO UPDATE SET
                    model = excluded.model, item = excluded.item, version = excluded.version,
                    deleted = excluded.deleted, updated_ms = excluded.updated_ms, base = excluded.base",
            )
            .and_then(|mut s| {
                s.execute(params![
                    account,
                    device,
                    w.model,
                    w.key.pk,
                    w.key.sk,
                    json,
                    hlc_to_string(w.version),
                    w.item.is_none(),
                    self.now_ms,
                    w.base.map(hlc_to_string)
                ])
            })
            .map_err(db("writing an item"))?;
        // The change log's entry, in this transaction: a rolled-back write leaves none.
        self.conn
            .prepare_cached(
                "INSERT INTO changes (account, device, model, pk, sk, version, deleted, item, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    account,
                    device,
                    w.model,
                    w.key.pk,
                    w.key.sk,
                    hlc_to_string(w.version),
                    w.item.is_none(),
                    json,
                    self.now_ms
                ])
            })
            .map_err(db("appending to the change log"))?;
        let seq = u64::try_from(self.conn.last_insert_rowid()).unwrap_or(0);
        self.hints.change_head.fetch_max(seq, Ordering::Relaxed);
        Ok(())
    }

    fn count_push(&mut self, device: &DeviceId, counts: &PushCounts) -> Result<(), StoreError> {
        if let Some(d) = &mut self.deferred {
            d.applied += counts.applied;
            d.duplicates += counts.duplicates;
            d.superseded += counts.superseded;
            d.rejected += counts.rejected;
            return Ok(());
        }
        self.conn
            .prepare_cached(
                "UPDATE devices SET changes_applied = changes_applied + ?3,
                    changes_superseded = changes_superseded + ?4, changes_rejected = changes_rejected + ?5,
                    changes_duplicate = changes_duplicate + ?6, changes_answered = changes_answered + ?7
                 WHERE account = ?1 AND device = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    device.account,
                    device.device,
                    counts.applied,
                    counts.superseded,
                    counts.rejected,
                    counts.duplicates,
                    counts.answered()
                ])
            })
            .map_err(db("counting a push"))?;
        Ok(())
    }

    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey) -> Result<(), StoreError> {
        let reached = match owner {
            Owner::Device(d) => {
                // The head moves by one; the run's first append to a feed also starts its
                // generation, at the head before this append (every expression reads the row
                // as it was).
                let row: Option<(u64, String)> = self
                    .conn
                    .prepare_cached(
                        "UPDATE devices SET feed_head = feed_head + 1, feed_gen = ?3,
                            feed_generations = CASE WHEN feed_gen = ?3 THEN feed_generations
                                ELSE feed_generations || ',' || ?3 || ':' || feed_head END
                         WHERE account = ?1 AND device = ?2 RETURNING feed_head, feed_generations",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![d.account, d.device, self.run.to_string()], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()
                    })
                    .map_err(db("advancing a device feed"))?;
                let Some((head, gens)) = row else {
                    return Err(StoreError::UnknownDevice(d.to_string()));
                };
                fanout::append_entry(
                    self.conn, &d.account, &d.device, head, &gens, &d.device, model, key,
                )?;
                vec![(d.device.clone(), head)]
            }
            // A broadcast reaches the first devices now and queues the rest (`fanout`).
            Owner::Account(a) => {
                let batch = self.fanout_batch.max(1);
                let reached =
                    fanout::advance_account(self.conn, self.run, a, "", batch, model, key)?;
                let more = reached.len() >= batch;
                let after = reached.last().filter(|_| more).map(|(d, _)| d.as_str());
                fanout::record(self.conn, a, model, key, after, self.now_ms)?;
                if more {
                    self.hints.fanout_pending.store(true, Ordering::Relaxed);
                }
                reached
            }
        };
        let account = owner.account();
        for (device, head) in reached {
            self.advanced.insert(
                DeviceId {
                    account: account.to_string(),
                    device,
                },
                head,
            );
        }
        Ok(())
    }

    fn log_conflict(&mut self, conflict: &Conflict) -> Result<(), StoreError> {
        let (account, owner_device) = owner_cols(&conflict.owner);
        let (lost, loser_item) = match conflict.lost {
            // Called before the overwrite: the row still holds the losing item.
            Loser::Stored => {
                let item: Option<Option<String>> = self
                    .conn
                    .prepare_cached("SELECT item FROM items WHERE account = ?1 AND device = ?2 AND pk = ?3 AND sk = ?4")
                    .and_then(|mut s| {
                        s.query_row(params![account, owner_device, conflict.key.pk, conflict.key.sk], |r| r.get(0))
                            .optional()
                    })
                    .map_err(db("reading the losing item of a conflict"))?;
                ("stored", item.flatten())
            }
            Loser::Incoming => (
                "incoming",
                conflict.incoming.as_ref().map(item_json).transpose()?,
            ),
        };
        self.conn
            .prepare_cached(
                "INSERT INTO conflicts (at_ms, account, device, owner, model, pk, sk, winner, loser, lost, loser_item)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    self.now_ms,
                    account,
                    conflict.device.as_ref().map(|d| d.device.as_str()),
                    owner_device,
                    conflict.model,
                    conflict.key.pk,
                    conflict.key.sk,
                    hlc_to_string(conflict.winner),
                    hlc_to_string(conflict.loser),
                    lost,
                    loser_item
                ])
            })
            .map_err(db("logging a conflict"))?;
        if let Some(d) = &conflict.device {
            self.conflicts_dropped += quota::trim_conflicts(self.conn, d, self.max_conflicts)?;
        }
        Ok(())
    }
}

impl SqlTxn<'_> {
    /// Keeps a device's usage (live rows, bytes of their JSON) in step as its row at `key`
    /// becomes `json` (`None`: a tombstone), in this transaction.
    fn count_usage(
        &mut self,
        account: &str,
        device: &str,
        key: &ItemKey,
        json: Option<&str>,
    ) -> Result<(), StoreError> {
        let held: Option<(bool, i64)> = self
            .conn
            .prepare_cached(
                "SELECT deleted, coalesce(length(CAST(item AS BLOB)), 0) FROM items
                 WHERE account = ?1 AND device = ?2 AND pk = ?3 AND sk = ?4",
            )
            .and_then(|mut s| {
                s.query_row(params![account, device, key.pk, key.sk], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(db("reading the row a write replaces"))?;
        let (old_rows, old_bytes) = match held {
            Some((false, bytes)) => (1i64, bytes),
            _ => (0, 0),
        };
        let (new_rows, new_bytes) = json.map_or((0i64, 0i64), |j| (1, j.len() as i64));
        if (new_rows, new_bytes) != (old_rows, old_bytes) {
            self.conn
                .prepare_cached(
                    "UPDATE devices SET rows_stored = max(0, rows_stored + ?3),
                        bytes_stored = max(0, bytes_stored + ?4)
                     WHERE account = ?1 AND device = ?2",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        account,
                        device,
                        new_rows - old_rows,
                        new_bytes - old_bytes
                    ])
                })
                .map_err(db("counting a device's stored rows and bytes"))?;
        }
        Ok(())
    }
}

/// Applies a device's push in one transaction (see [`cloud_apply_push`]), change by change: a
/// put the device's quotas refuse ([`quota::refusal`]) is answered rejected and not applied,
/// against the usage the changes before it left.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_push(
    conn: &mut Connection,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    rules: &PushRules,
    env: &TxnEnv,
    warn: &mut WarnLimiter,
    from: &DeviceId,
    changes: &[Change],
) -> Result<(Vec<ChangeResult>, Advanced), StoreError> {
    let tx = write_txn(conn, "starting a push transaction")?;
    // Checked inside the push's own write transaction: a push that reaches the store after the
    // device was revoked (it was in flight in the broker or the sync loop) is not applied.
    if device_revoked(&tx, from)? {
        return Err(StoreError::DeviceRevoked(from.to_string()));
    }
    let (results, advanced, dropped) = {
        let quotas = &env.quotas;
        let mut t = SqlTxn::new(&tx, now_ms, env);
        t.defer_counts();
        let (results, over_quota) = apply_within_quotas(
            &mut t,
            |t, change| quota::refusal(t.conn, quotas, from, change),
            schema,
            clock,
            now_ms,
            rules,
            from,
            changes,
        )?;
        t.write_counts(from, over_quota)?;
        let dropped = t.conflicts_dropped;
        (results, t.into_advanced(), dropped)
    };
    tx.commit().map_err(db("committing a push"))?;
    if dropped > 0 {
        if let Some(quiet) = warn.hit(Instant::now()) {
            tracing::warn!(
                device = %from, dropped, quiet, max = env.quotas.max_conflicts,
                "dropped the oldest conflict records of a device over its cap (counted in its \
                 conflicts_dropped; {quiet} more drops since the last warning)"
            );
        }
    }
    Ok((results, advanced))
}

/// An API write in one transaction (see [`cloud_write`]); a device owner must be registered.
// The arguments are those of `CloudStore::write`, which carries the same allowance.
#[allow(clippy::too_many_arguments)]
pub(super) fn write(
    conn: &mut Connection,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    max_message_bytes: usize,
    env: &TxnEnv,
    owner: &Owner,
    model: &str,
    op: CloudOp,
) -> Result<(Change, Advanced), CloudWriteError<StoreError>> {
    let tx = write_txn(conn, "starting a write transaction").map_err(CloudWriteError::Store)?;
    if let Owner::Device(d) = owner {
        if !device_exists(&tx, d).map_err(CloudWriteError::Store)? {
            return Err(CloudWriteError::Store(StoreError::UnknownDevice(
                d.to_string(),
            )));
        }
    }
    let (change, advanced) = {
        let mut t = SqlTxn::new(&tx, now_ms, env);
        let change = cloud_write(
            &mut t,
            schema,
            clock,
            now_ms,
            max_message_bytes,
            owner,
            model,
            op,
        )?;
        (change, t.into_advanced())
    };
    tx.commit()
        .map_err(|e| CloudWriteError::Store(map_err("committing a write", e)))?;
    Ok((change, advanced))
}
