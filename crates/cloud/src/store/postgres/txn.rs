//! The write transactions of the PostgreSQL store: [`PgTxn`], the [`CloudTxn`] the replication
//! rules of `devtables_sync::apply` run in, and the two writes that use it (a device's push and
//! an API write).
//!
//! It exists because these rules decide every write: the store only reads and writes the rows
//! they name, and this file is all of that, so a write never takes another path, and every row
//! write appends its change-log entry here, in the same transaction. It is also where the
//! locks that make several writing processes safe are taken, in the order the module
//! documentation of `super` gives: owner, device rows, account's change-log row.

use std::collections::{BTreeMap, BTreeSet};

use crate::store::apply_within_quotas;
use devtables_schema::{ItemKey, Schema};
use devtables_sync::apply::{
    cloud_write, CloudOp, CloudTxn, CloudWriteError, Conflict, Loser, PushCounts, PushRules,
    RowWrite, StoredRow,
};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{hlc_to_string, Change, ChangeResult};
use postgres::types::Json;

use super::super::encoding::{item_json, owner_cols, parse_version};
use super::super::{Advanced, StoreError, REVOKED_SECRET_HASH};
use super::fanout::{self, ADVANCE_ENTRY, ADVANCE_SET};
use super::sql::{col, col_u64, int, Conn};
use super::{quota, State};

/// One write transaction as the replication rules see it.
pub(super) struct PgTxn<'c> {
    conn: &'c mut Conn,
    state: &'c mut State,
    now_ms: u64,
    advanced: BTreeMap<DeviceId, u64>,
    /// Push counts gathered for one write at the end (a push applied change by change).
    deferred: Option<PushCounts>,
    /// Conflict records dropped for the per-device cap in this transaction.
    conflicts_dropped: u64,
    /// Owners whose advisory lock this transaction holds.
    owners_locked: BTreeSet<(String, String)>,
    /// Accounts whose change-log row this transaction holds locked.
    accounts_locked: BTreeSet<String>,
}

impl<'c> PgTxn<'c> {
    pub(super) fn new(conn: &'c mut Conn, now_ms: u64, state: &'c mut State) -> PgTxn<'c> {
        PgTxn {
            conn,
            state,
            now_ms,
            advanced: BTreeMap::new(),
            deferred: None,
            conflicts_dropped: 0,
            owners_locked: BTreeSet::new(),
            accounts_locked: BTreeSet::new(),
        }
    }

    /// Takes the owner's advisory lock (held to the end of the transaction), once.
    fn lock_owner(&mut self, owner: &Owner) -> Result<(), StoreError> {
        let (account, device) = owner_cols(owner);
        if self
            .owners_locked
            .contains(&(account.to_string(), device.to_string()))
        {
            return Ok(());
        }
        lock_owner(self.conn, &self.state.lock_prefix, owner)?;
        self.owners_locked
            .insert((account.to_string(), device.to_string()));
        Ok(())
    }

    /// Locks the account's change-log row (created when missing), once: from here to the
    /// commit no other transaction appends to the account's log.
    fn lock_account_log(&mut self, account: &str) -> Result<(), StoreError> {
        if self.accounts_locked.contains(account) {
            return Ok(());
        }
        const LOCK: &str = "SELECT floor FROM change_floors WHERE account = $1 FOR UPDATE";
        if self
            .conn
            .query_opt("locking an account's change log", LOCK, &[&account])?
            .is_none()
        {
            self.conn.execute(
                "creating an account's change log",
                "INSERT INTO change_floors (account, floor) VALUES ($1, 0)
                 ON CONFLICT (account) DO NOTHING",
                &[&account],
            )?;
            self.conn
                .query_one("locking an account's change log", LOCK, &[&account])?;
        }
        self.accounts_locked.insert(account.to_string());
        Ok(())
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
            self.conn.execute(
                "counting changes over quota",
                "UPDATE devices SET changes_over_quota = changes_over_quota + $3
                 WHERE account = $1 AND device = $2",
                &[&device.account, &device.device, &int(over_quota)],
            )?;
        }
        Ok(())
    }

    fn defer_counts(&mut self) {
        self.deferred = Some(PushCounts::default());
    }

    fn into_advanced(self) -> Advanced {
        self.advanced.into_iter().collect()
    }

    /// Keeps a device's usage (live rows, bytes of their JSON) in step as its row at `key`
    /// becomes `bytes` long (`None`: a tombstone), in this transaction.
    fn count_usage(
        &mut self,
        account: &str,
        device: &str,
        key: &ItemKey,
        bytes: Option<u64>,
    ) -> Result<(), StoreError> {
        let held = self.conn.query_opt(
            "reading the row a write replaces",
            "SELECT deleted, item_bytes FROM items
             WHERE account = $1 AND device = $2 AND pk = $3 AND sk = $4",
            &[&account, &device, &key.pk, &key.sk],
        )?;
        let (old_rows, old_bytes) = match held {
            Some(row) if !col::<bool>(&row, 0)? => (1i64, col::<i64>(&row, 1)?),
            _ => (0, 0),
        };
        let (new_rows, new_bytes) = bytes.map_or((0i64, 0i64), |b| (1, int(b)));
        if (new_rows, new_bytes) != (old_rows, old_bytes) {
            self.conn.execute(
                "counting a device's stored rows and bytes",
                "UPDATE devices SET rows_stored = greatest(0, rows_stored + $3),
                    bytes_stored = greatest(0, bytes_stored + $4)
                 WHERE account = $1 AND device = $2",
                &[
                    &account,
                    &device,
                    &(new_rows - old_rows),
                    &(new_bytes - old_bytes),
                ],
            )?;
        }
        Ok(())
    }
}

/// Takes `owner`'s transaction-level advisory lock: every writer of the owner's rows holds it
/// from before it reads a stored version to its commit.
pub(super) fn lock_owner(conn: &mut Conn, prefix: &str, owner: &Owner) -> Result<(), StoreError> {
    let (account, device) = owner_cols(owner);
    lock_owner_cols(conn, prefix, account, device)
}

/// [`lock_owner`] by the owner's columns (device `''` for an account's broadcast items), for
/// writers that find their owners in rows (retention).
pub(super) fn lock_owner_cols(
    conn: &mut Conn,
    prefix: &str,
    account: &str,
    device: &str,
) -> Result<(), StoreError> {
    // A collision of two names' hashes only makes their writers wait for each other.
    let name = format!("devtables {prefix} owner {account} {device}");
    conn.execute(
        "waiting for an owner's lock",
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&name],
    )?;
    Ok(())
}

impl CloudTxn for PgTxn<'_> {
    type Error = StoreError;

    fn stored_row(
        &mut self,
        owner: &Owner,
        key: &ItemKey,
    ) -> Result<Option<StoredRow>, StoreError> {
        self.lock_owner(owner)?;
        let (account, device) = owner_cols(owner);
        let row = self.conn.query_opt(
            "reading an item's version",
            "SELECT model, version, deleted, base FROM items
             WHERE account = $1 AND device = $2 AND pk = $3 AND sk = $4",
            &[&account, &device, &key.pk, &key.sk],
        )?;
        let Some(row) = row else { return Ok(None) };
        let base: Option<String> = col(&row, 3)?;
        Ok(Some(StoredRow {
            model: col(&row, 0)?,
            version: parse_version(&col::<String>(&row, 1)?)?,
            deleted: col(&row, 2)?,
            base: base.as_deref().map(parse_version).transpose()?,
        }))
    }

    fn purge_watermark(&mut self, owner: &Owner) -> Result<Option<Hlc>, StoreError> {
        self.lock_owner(owner)?;
        let (account, device) = owner_cols(owner);
        let row = self.conn.query_opt(
            "reading a purge watermark",
            "SELECT purged_below FROM watermarks WHERE account = $1 AND device = $2",
            &[&account, &device],
        )?;
        row.map(|r| parse_version(&col::<String>(&r, 0)?))
            .transpose()
    }

    fn write_row(&mut self, w: &RowWrite<'_>) -> Result<(), StoreError> {
        self.lock_owner(w.owner)?;
        let (account, device) = owner_cols(w.owner);
        let bytes = w
            .item
            .map(|i| item_json(i).map(|j| j.len() as u64))
            .transpose()?;
        if matches!(w.owner, Owner::Device(_)) {
            self.count_usage(account, device, w.key, bytes)?;
        }
        let item = w.item.map(Json);
        let version = hlc_to_string(w.version);
        let base = w.base.map(hlc_to_string);
        self.conn.execute(
            "writing an item",
            "INSERT INTO items (account, device, model, pk, sk, item, item_bytes, version, deleted,
                                updated_ms, base)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (account, device, pk, sk) DO UPDATE SET
                model = excluded.model, item = excluded.item, item_bytes = excluded.item_bytes,
                version = excluded.version, deleted = excluded.deleted,
                updated_ms = excluded.updated_ms, base = excluded.base",
            &[
                &account,
                &device,
                &w.model,
                &w.key.pk,
                &w.key.sk,
                &item,
                &int(bytes.unwrap_or(0)),
                &version,
                &w.item.is_none(),
                &int(self.now_ms),
                &base,
            ],
        )?;
        // The change log's entry, in this transaction, under the account's log lock: a
        // rolled-back write leaves none, and the account's entries commit in sequence order.
        self.lock_account_log(account)?;
        let row = self.conn.query_one(
            "appending to the change log",
            "INSERT INTO changes (seq, account, device, model, pk, sk, version, deleted, item, at_ms)
             VALUES (nextval('change_seq'), $1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING seq",
            &[
                &account,
                &device,
                &w.model,
                &w.key.pk,
                &w.key.sk,
                &version,
                &w.item.is_none(),
                &item,
                &int(self.now_ms),
            ],
        )?;
        let seq = col_u64(&row, 0)?;
        self.state.change_head = self.state.change_head.max(seq);
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
        self.conn.execute(
            "counting a push",
            "UPDATE devices SET changes_applied = changes_applied + $3,
                changes_superseded = changes_superseded + $4,
                changes_rejected = changes_rejected + $5,
                changes_duplicate = changes_duplicate + $6,
                changes_answered = changes_answered + $7
             WHERE account = $1 AND device = $2",
            &[
                &device.account,
                &device.device,
                &int(counts.applied),
                &int(counts.superseded),
                &int(counts.rejected),
                &int(counts.duplicates),
                &int(counts.answered()),
            ],
        )?;
        Ok(())
    }

    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey) -> Result<(), StoreError> {
        let run = self.state.run;
        let reached = match owner {
            Owner::Device(d) => {
                // The device's head moves by one under its row's lock, and the key's entry
                // takes the new sequence number, in one statement.
                let row = self.conn.query_opt(
                    "advancing a device feed",
                    &format!(
                        "WITH moved AS (UPDATE devices SET {ADVANCE_SET}
                            WHERE account = $1 AND device = $2
                            RETURNING account, device, feed_head, feed_generations),
                         entry AS ({ADVANCE_ENTRY})
                         SELECT feed_head, feed_generations FROM moved"
                    ),
                    &[
                        &d.account,
                        &d.device,
                        &run.to_string(),
                        &d.device,
                        &model,
                        &key.pk,
                        &key.sk,
                    ],
                )?;
                let Some(row) = row else {
                    return Err(StoreError::UnknownDevice(d.to_string()));
                };
                let gens: String = col(&row, 1)?;
                fanout::drop_oldest_generation(self.conn, &d.account, &d.device, &gens)?;
                vec![(d.device.clone(), col_u64(&row, 0)?)]
            }
            // A broadcast reaches the first devices now and queues the rest (`fanout`).
            Owner::Account(a) => {
                let batch = self.state.fanout_batch.max(1);
                let reached = fanout::advance_account(self.conn, run, a, "", batch, model, key)?;
                let more = reached.len() >= batch;
                let after = reached.last().filter(|_| more).map(|(d, _)| d.as_str());
                fanout::record(self.conn, a, model, key, after, self.now_ms)?;
                self.state.fanout_pending |= more;
                reached
            }
        };
        let account = owner.account();
        for (device, head) in reached {
            let id = DeviceId::new(account, device.as_str())
                .map_err(|e| StoreError::Corrupt(format!("device {account}/{device}: {e}")))?;
            self.advanced.insert(id, head);
        }
        Ok(())
    }

    fn log_conflict(&mut self, conflict: &Conflict) -> Result<(), StoreError> {
        let (account, owner_device) = owner_cols(&conflict.owner);
        let (lost, loser_item): (&str, Option<serde_json::Value>) = match conflict.lost {
            // Called before the overwrite: the row still holds the losing item.
            Loser::Stored => {
                let row = self.conn.query_opt(
                    "reading the losing item of a conflict",
                    "SELECT item FROM items WHERE account = $1 AND device = $2 AND pk = $3 AND sk = $4",
                    &[&account, &owner_device, &conflict.key.pk, &conflict.key.sk],
                )?;
                let item = match row {
                    Some(r) => col::<Option<serde_json::Value>>(&r, 0)?,
                    None => None,
                };
                ("stored", item)
            }
            Loser::Incoming => (
                "incoming",
                conflict
                    .incoming
                    .as_ref()
                    .map(|i| serde_json::Value::Object(i.clone())),
            ),
        };
        self.conn.execute(
            "logging a conflict",
            "INSERT INTO conflicts (at_ms, account, device, owner, model, pk, sk, winner, loser,
                                    lost, loser_item)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &int(self.now_ms),
                &account,
                &conflict.device.as_ref().map(|d| d.device.as_str()),
                &owner_device,
                &conflict.model,
                &conflict.key.pk,
                &conflict.key.sk,
                &hlc_to_string(conflict.winner),
                &hlc_to_string(conflict.loser),
                &lost,
                &loser_item,
            ],
        )?;
        if let Some(d) = &conflict.device {
            self.conflicts_dropped +=
                quota::trim_conflicts(self.conn, d, self.state.quotas.max_conflicts)?;
        }
        Ok(())
    }
}

/// Locks a device's row for the rest of the transaction; `None` when it is not registered,
/// else whether it is revoked.
fn lock_device(conn: &mut Conn, id: &DeviceId) -> Result<Option<bool>, StoreError> {
    let row = conn.query_opt(
        "locking a device",
        "SELECT secret_hash = $3 FROM devices WHERE account = $1 AND device = $2
         FOR NO KEY UPDATE",
        &[&id.account, &id.device, &REVOKED_SECRET_HASH],
    )?;
    row.map(|r| col::<bool>(&r, 0)).transpose()
}

/// Applies a device's push in one transaction (see [`cloud_apply_push`]), change by change: a
/// put the device's quotas refuse ([`quota::refusal`]) is answered rejected and not applied,
/// against the usage the changes before it left. Returns the results, the feeds advanced and
/// the conflict records dropped for the device's cap.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_push(
    conn: &mut Conn,
    state: &mut State,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    rules: &PushRules,
    from: &DeviceId,
    changes: &[Change],
) -> Result<(Vec<ChangeResult>, Advanced, u64), StoreError> {
    let owner = Owner::Device(from.clone());
    lock_owner(conn, &state.lock_prefix, &owner)?;
    // Checked under the device row's lock: a push that reaches the store after the device was
    // revoked (it was in flight in the broker or the sync loop) is not applied, and a
    // revocation waits for a push that got here first.
    match lock_device(conn, from)? {
        Some(false) => {}
        Some(true) => return Err(StoreError::DeviceRevoked(from.to_string())),
        None => return Err(StoreError::UnknownDevice(from.to_string())),
    }
    let quotas = state.quotas;
    let mut t = PgTxn::new(conn, now_ms, state);
    t.owners_locked
        .insert((from.account.clone(), from.device.clone()));
    t.defer_counts();
    let (results, over_quota) = apply_within_quotas(
        &mut t,
        |t, change| quota::refusal(t.conn, &quotas, from, change),
        schema,
        clock,
        now_ms,
        rules,
        from,
        changes,
    )?;
    t.write_counts(from, over_quota)?;
    let dropped = t.conflicts_dropped;
    Ok((results, t.into_advanced(), dropped))
}

/// An API write in one transaction (see [`cloud_write`]); a device owner must be registered.
// The arguments are those of `CloudStore::write`, which carries the same allowance.
#[allow(clippy::too_many_arguments)]
pub(super) fn write(
    conn: &mut Conn,
    state: &mut State,
    schema: &Schema,
    clock: &mut HlcClock,
    now_ms: u64,
    max_message_bytes: usize,
    owner: &Owner,
    model: &str,
    op: CloudOp,
) -> Result<(Change, Advanced), CloudWriteError<StoreError>> {
    lock_owner(conn, &state.lock_prefix, owner).map_err(CloudWriteError::Store)?;
    match owner {
        Owner::Device(d) => {
            if lock_device(conn, d)
                .map_err(CloudWriteError::Store)?
                .is_none()
            {
                return Err(CloudWriteError::Store(StoreError::UnknownDevice(
                    d.to_string(),
                )));
            }
        }
        // A broadcast advances the feeds of the account's first devices (a batch; the rest
        // are a fan-out job): their rows are locked now, in device order, before the change
        // log's row (the lock order).
        Owner::Account(a) => {
            conn.query(
                "locking an account's devices",
                "SELECT 1 FROM devices WHERE account = $1 ORDER BY device LIMIT $2
                 FOR NO KEY UPDATE",
                &[a, &int(state.fanout_batch.max(1) as u64)],
            )
            .map_err(CloudWriteError::Store)?;
        }
    }
    let (account, device) = owner_cols(owner);
    let key = (account.to_string(), device.to_string());
    let mut t = PgTxn::new(conn, now_ms, state);
    t.owners_locked.insert(key);
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
    Ok((change, t.into_advanced()))
}
