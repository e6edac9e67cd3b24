//! The SQLite cloud store: the embedded default implementation of [`CloudStore`].
//!
//! One database file holds the items of every device. Plain SQL over it is a product feature:
//! users may query the tables directly (read-only, from another connection: the database runs in
//! WAL mode so readers never block the service), so the columns are named plainly and every item
//! is kept whole as JSON in `items.item`.
//!
//! # Tables
//!
//! ```sql
//! -- Store metadata: schema_version = 7 (the table layout, see `SCHEMA_VERSION`).
//! meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)
//!
//! -- Registered devices and their sync status.
//! devices(account, device,            -- PRIMARY KEY
//!         secret_hash,                -- hash of the device secret, never the secret
//!         broker_hash,                -- the secret in an external broker's password-file form
//!         registered_ms,
//!         online,                     -- 0/1: the device has a session
//!         last_seen_ms, schema_version,
//!         cursor_acked,               -- highest feed cursor the device acknowledged
//!         feed_head,                  -- highest sequence number of the device's feed
//!         feed_floor,                 -- feed entries up to here were purged
//!         pending,                    -- outbox size the device announced
//!         last_error,
//!         changes_applied,            -- pushed changes the cloud wrote (replays not counted)
//!         changes_superseded,         -- pushed changes a higher stored version beat
//!         changes_rejected,           -- pushed changes refused
//!         rows_stored, bytes_stored,  -- live items of the device and their JSON bytes (quotas)
//!         changes_over_quota,         -- pushed changes refused for a quota or their size
//!         messages_rate_limited,      -- messages not processed: over the device's message rate
//!         pushes_busy,                -- pushes not taken: too many being applied
//!         conflicts_dropped,          -- conflict records dropped for the per-device cap
//!         changes_duplicate,          -- pushed changes already stored at their version
//!         changes_answered,           -- pushed changes answered, whatever the verdict
//!         feed_gen,                   -- the run of the store that last appended to the feed
//!         feed_generations)           -- 'gen:base,...': the feed's generations, oldest first
//!
//! -- Every item of every device, one row per (owner, key); tombstones are kept for a while.
//! items(account,
//!       device,                       -- owning device; '' for account-wide (broadcast) items
//!       model, pk, sk,
//!       item,                         -- the item as JSON text; NULL for a tombstone
//!       version,                      -- the write's version as sortable text (see below)
//!       deleted,                      -- 1 for a tombstone
//!       updated_ms,                   -- when the cloud stored the write
//!       base,                         -- the version the write replaced on its writer, if it said one
//!       PRIMARY KEY (account, device, pk, sk))
//!
//! -- Per owner: the newest version purged, so a write that knew a purged key still meets it.
//! watermarks(account, device,         -- PRIMARY KEY; device '' for account-wide items
//!            purged_below)
//!
//! -- Per-device change feeds: one entry per key (a later write of the key replaces its entry).
//! feed(account, device, seq,          -- PRIMARY KEY; seq counts up per device
//!      owner,                         -- the item row's device column ('' for broadcast items)
//!      model, pk, sk)
//!
//! -- Concurrent writes: the higher version won, the loser is kept here.
//! conflicts(id, at_ms, account,
//!           device,                   -- the device whose push met the conflict; NULL for the API
//!           owner, model, pk, sk,
//!           winner, loser,            -- versions
//!           lost,                     -- 'stored' or 'incoming'
//!           loser_item)               -- the losing item as JSON (NULL for a delete)
//!
//! -- The account-wide change log: one entry per row write (pushes and API writes), appended in
//! -- the write's transaction; seq only grows (AUTOINCREMENT), across accounts.
//! changes(seq,                        -- PRIMARY KEY
//!         account, device,            -- the row's owner; device '' for account-wide items
//!         model, pk, sk, version,
//!         deleted,                    -- 1 for a delete
//!         item,                       -- the item as JSON; NULL for a delete
//!         at_ms)                      -- when the cloud stored the write
//!
//! -- Per account: the highest seq retention removed (a read from below it is told so).
//! change_floors(account, floor)
//!
//! -- Webhooks: a URL the account's changes after `cursor` are posted to, signed with `secret`.
//! webhooks(id,                        -- PRIMARY KEY; 16 random hex characters
//!          account, url,
//!          model,                     -- only this model's changes; NULL for all
//!          secret,                    -- the shared HMAC-SHA256 signing secret, as it is
//!          created_ms,
//!          cursor,                    -- the last seq the receiver acknowledged (2xx)
//!          last_status, last_error, last_attempt_ms, last_success_ms,
//!          failures,                  -- failed attempts since the last success
//!          failures_total, deliveries, changes_delivered,
//!          gaps)                      -- times retention removed changes before delivery
//!
//! -- API keys of the HTTP API; a client sends `dt_<id>_<secret>`.
//! api_keys(id,                        -- PRIMARY KEY; 16 random hex characters
//!          account,
//!          scope,                     -- 'read', 'write' or 'admin'
//!          secret_hash,               -- hash of the key's secret, never the secret
//!          created_ms,
//!          revoked_ms)                -- NULL while the key is valid
//! ```
//!
//! Versions are stored with [`hlc_to_string`](devtables_sync::wire::hlc_to_string), whose text
//! order is the version order, so `ORDER BY version` works. Example: the settings of one device,
//! newest first:
//!
//! ```sql
//! SELECT pk, sk, json_extract(item, '$.name') AS name, version FROM items
//! WHERE account = 'acme' AND device = 'dev-1' AND model = 'Setting' AND deleted = 0
//! ORDER BY version DESC;
//! ```
//!
//! # Feeds
//!
//! A write to a key that syncs down appends an entry to the feed of its owner device (or of every
//! device of the account, for a broadcast item), dropping the key's previous entry, and bumps
//! `devices.feed_head`, all in the write's transaction. A feed read returns each key in its
//! current state. [`CloudStore::purge`] removes old tombstones with their feed entries and raises
//! `feed_floor`; a device reading from below the floor gets a full resync.
//!
//! A device is registered with `feed_head = feed_floor = 1`: its first read, from cursor 0, is
//! below the floor, so a new (or wiped) device always starts with a full resync and receives the
//! items written before it connected (broadcast items especially), which its feed never held.
//!
//! Each opening of the store is a run with a random id. A run's first append to a feed starts a
//! generation of it (`feed_gen`, and `gen:base` added to `feed_generations`, at most
//! `MAX_FEED_GENERATIONS`), in the append's transaction: a device whose hello names a
//! generation this history lacks, or a head beyond where that generation ended, holds data a
//! restore from a backup lost (see `devtables_sync::cloud::FeedPage::generations`).
//!
//! # Files
//!
//! This file holds the store itself and its [`CloudStore`] implementation, whose methods only
//! call into one file per concern:
//! - `layout`: the DDL, [`SCHEMA_VERSION`] and the migrations of older layouts;
//! - `txn`: the write transaction the replication rules run in (pushes and API writes);
//! - `feed`: feed and snapshot reads;
//! - `fanout`: a broadcast's feed entries in bounded batches (the `fanout` jobs);
//! - `devices`: the device registry and sync status;
//! - `api_keys`: the keys of the HTTP API;
//! - `changes`: reads and retention of the change log (`txn` appends to it);
//! - `webhooks`: the webhooks and their delivery cursors;
//! - `queries`: the item and conflict reads of the HTTP API;
//! - `purge`: retention and the highest stored version;
//! - `quota`: the per-device quotas checked in a push, and the per-device conflict cap;
//! - `sql`: the small helpers all of them share (it depends on none of them).

mod api_keys;
mod changes;
mod devices;
mod fanout;
mod feed;
mod layout;
mod purge;
mod queries;
mod quota;
mod sql;
mod txn;
mod webhooks;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use devtables_schema::{ItemKey, Schema};
use devtables_sync::apply::{CloudOp, CloudTxn, CloudWriteError, PushCounts, PushRules};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{Change, ChangeResult};
use rusqlite::Connection;

use super::{
    Advanced, ApiKeyRecord, ChangePurgeStats, ChangeQuery, ChangeRead, ChangeRetention, CloudStore,
    ConflictRecord, DeviceQuotas, DeviceRecord, ItemPage, ItemQuery, KeyScope, NewWebhook,
    PurgeStats, Retention, StatusUpdate, StoreError, StoredItem, WebhookAttempt, WebhookRecord,
};
use sql::db;

pub use layout::SCHEMA_VERSION;
pub use queries::MAX_QUERY_LIMIT;

/// How the database file is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `PRAGMA synchronous = FULL` (default): an acknowledged write survives a power loss. With
    /// `false`, `NORMAL`: still consistent after a crash, but the last commits may be lost.
    pub synchronous_full: bool,
    /// How long a statement waits for a lock held by another connection, in ms. Default 5000.
    pub busy_timeout_ms: u64,
    /// What each device may store and push (see [`DeviceQuotas`]). Default
    /// [`DeviceQuotas::default`].
    pub quotas: DeviceQuotas,
    /// Most devices one transaction appends a broadcast's feed entry to (the write's own, then
    /// each [`CloudStore::fanout_step`]). Default [`DEFAULT_FANOUT_BATCH`](super::DEFAULT_FANOUT_BATCH).
    pub fanout_batch: usize,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            synchronous_full: true,
            busy_timeout_ms: 5000,
            quotas: DeviceQuotas::default(),
            fanout_batch: super::DEFAULT_FANOUT_BATCH,
        }
    }
}

/// The SQLite cloud store. See the module documentation for its tables.
pub struct SqliteStore {
    conn: Connection,
    quotas: DeviceQuotas,
    /// This opening of the store (random, never 0): the generation its first append to a feed
    /// starts.
    run: u64,
    /// Rate-limits the warnings about conflict records dropped for the per-device cap.
    conflict_warn: crate::warn_limit::WarnLimiter,
    /// A group is open ([`CloudStore::begin_group`]): operations run in savepoints of its
    /// transaction.
    grouped: bool,
    /// Most devices a broadcast reaches per transaction ([`SqliteOptions::fanout_batch`]).
    fanout_batch: usize,
    /// The change log's head and whether a fan-out may be pending, as far as this store knows
    /// ([`CloudStore::change_head_hint`], [`CloudStore::fanout_pending_hint`]): read at open,
    /// raised by the transactions.
    hints: Arc<txn::StoreHints>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`, in WAL mode.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(|e| {
            StoreError::Database(format!(
                "opening the cloud database {}: {e}",
                path.display()
            ))
        })?;
        SqliteStore::init(conn, &options, true)
    }

    /// A private in-memory database (tests, tools).
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let conn =
            Connection::open_in_memory().map_err(db("opening an in-memory cloud database"))?;
        SqliteStore::init(conn, &SqliteOptions::default(), false)
    }

    /// Runs `f` over the store's [`CloudTxn`] in one write transaction at wall time `now_ms`,
    /// committing when `commit` is true and `f` succeeds, rolling back otherwise. For the
    /// store-conformance suite (`devtables-conformance`), which checks the transaction contract
    /// directly; the service goes through [`CloudStore::apply_push`] and [`CloudStore::write`].
    #[doc(hidden)]
    pub fn conformance_txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let env = self.env();
        let tx = sql::write_txn(&mut self.conn, "starting a conformance transaction")?;
        let r = f(&mut txn::SqlTxn::new(&tx, now_ms, &env))?;
        if commit {
            tx.commit()
                .map_err(db("committing a conformance transaction"))?;
        }
        Ok(r)
    }

    /// Starts a new run, as reopening the store does. For the store-conformance suite.
    #[doc(hidden)]
    pub fn conformance_new_run(&mut self) {
        self.run = new_run_id();
    }

    /// The device's push counters, duplicates included (the device record leaves them out).
    /// For the store-conformance suite.
    #[doc(hidden)]
    pub fn conformance_push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
        devices::push_counts(&self.conn, id)
    }

    fn init(
        mut conn: Connection,
        options: &SqliteOptions,
        wal: bool,
    ) -> Result<SqliteStore, StoreError> {
        layout::init(
            &mut conn,
            options.busy_timeout_ms,
            options.synchronous_full,
            wal,
        )?;
        let hints = Arc::new(txn::StoreHints {
            change_head: AtomicU64::new(changes::sequence_head(&conn)?),
            fanout_pending: AtomicBool::new(fanout::any_pending(&conn)?),
        });
        Ok(SqliteStore {
            conn,
            quotas: options.quotas,
            run: new_run_id(),
            conflict_warn: crate::warn_limit::WarnLimiter::new(
                crate::warn_limit::WarnLimiter::INTERVAL,
            ),
            grouped: false,
            fanout_batch: options.fanout_batch.max(1),
            hints,
        })
    }

    /// What a write transaction takes from the store.
    fn env(&self) -> txn::TxnEnv {
        txn::TxnEnv {
            quotas: self.quotas,
            run: self.run,
            fanout_batch: self.fanout_batch,
            hints: self.hints.clone(),
        }
    }

    /// Replaces the per-device quotas (they apply from the next push).
    pub fn set_quotas(&mut self, quotas: DeviceQuotas) {
        self.quotas = quotas;
    }

    /// Most devices one transaction appends a broadcast's feed entry to
    /// ([`SqliteOptions::fanout_batch`]).
    pub fn fanout_batch(&self) -> usize {
        self.fanout_batch
    }

    /// Replaces [`SqliteOptions::fanout_batch`] (at least 1), from the next write.
    pub fn set_fanout_batch(&mut self, batch: usize) {
        self.fanout_batch = batch.max(1);
    }
}

/// A random run id, never 0 (the generation of a feed no run appended to).
fn new_run_id() -> u64 {
    rand::random::<u64>().max(1)
}

impl CloudStore for SqliteStore {
    fn begin_group(&mut self) -> Result<(), StoreError> {
        if self.grouped || !self.conn.is_autocommit() {
            return Err(StoreError::Database(
                "starting a group of store operations: a transaction is already open".into(),
            ));
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(db("starting a group of store operations"))?;
        self.grouped = true;
        Ok(())
    }

    fn commit_group(&mut self) -> Result<(), StoreError> {
        if !std::mem::take(&mut self.grouped) {
            return Ok(());
        }
        if self.conn.is_autocommit() {
            // SQLite ends a transaction itself on some errors (a full disk, an I/O error).
            return Err(StoreError::Database(
                "committing a group of store operations: SQLite rolled the group back after an \
                 error"
                    .into(),
            ));
        }
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            // A failed COMMIT may leave the transaction open (SQLITE_BUSY): end it, so the
            // next operation does not run inside a group nobody will commit.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(sql::map_err("committing a group of store operations", e));
        }
        Ok(())
    }

    fn register_device(
        &mut self,
        id: &DeviceId,
        secret_hash: &str,
        broker_hash: Option<&str>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        devices::register_device(&self.conn, id, secret_hash, broker_hash, now_ms)
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        devices::device(&self.conn, id)
    }

    fn revoke_device(&mut self, id: &DeviceId, delete_items: bool) -> Result<bool, StoreError> {
        devices::revoke_device(&mut self.conn, id, delete_items)
    }

    fn revoked_devices(
        &mut self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>, StoreError> {
        devices::revoked_devices(&self.conn, after, limit)
    }

    fn set_device_secret(
        &mut self,
        id: &DeviceId,
        secret_hash: &str,
        broker_hash: Option<&str>,
    ) -> Result<bool, StoreError> {
        devices::set_device_secret(&self.conn, id, secret_hash, broker_hash)
    }

    fn devices(
        &mut self,
        account: Option<&str>,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        devices::devices(&self.conn, account, after, limit)
    }

    fn update_status(&mut self, id: &DeviceId, update: &StatusUpdate) -> Result<(), StoreError> {
        devices::update_status(&self.conn, id, update)
    }

    fn reset_online(&mut self) -> Result<(), StoreError> {
        devices::reset_online(&self.conn)
    }

    fn mark_offline_unseen(&mut self, ids: &[DeviceId], since_ms: u64) -> Result<u64, StoreError> {
        devices::mark_offline_unseen(&mut self.conn, ids, since_ms)
    }

    fn create_api_key(
        &mut self,
        account: &str,
        scope: KeyScope,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<String, StoreError> {
        api_keys::create_api_key(&self.conn, account, scope, secret_hash, now_ms)
    }

    fn api_keys(&mut self, account: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        api_keys::api_keys(&self.conn, account)
    }

    fn revoke_api_key(&mut self, account: &str, id: &str, now_ms: u64) -> Result<bool, StoreError> {
        api_keys::revoke_api_key(&self.conn, account, id, now_ms)
    }

    fn api_key(&mut self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        api_keys::api_key(&self.conn, id)
    }

    fn live_api_keys(&mut self) -> Result<u64, StoreError> {
        api_keys::live_api_keys(&self.conn)
    }

    fn apply_push(
        &mut self,
        schema: &Schema,
        clock: &mut HlcClock,
        now_ms: u64,
        rules: &PushRules,
        from: &DeviceId,
        changes: &[Change],
    ) -> Result<(Vec<ChangeResult>, Advanced), StoreError> {
        let env = self.env();
        txn::apply_push(
            &mut self.conn,
            schema,
            clock,
            now_ms,
            rules,
            &env,
            &mut self.conflict_warn,
            from,
            changes,
        )
    }

    fn write(
        &mut self,
        schema: &Schema,
        clock: &mut HlcClock,
        now_ms: u64,
        max_message_bytes: usize,
        owner: &Owner,
        model: &str,
        op: CloudOp,
    ) -> Result<(Change, Advanced), CloudWriteError<StoreError>> {
        let env = self.env();
        txn::write(
            &mut self.conn,
            schema,
            clock,
            now_ms,
            max_message_bytes,
            &env,
            owner,
            model,
            op,
        )
    }

    fn read_feed(
        &mut self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StoreError> {
        feed::read_feed(&mut self.conn, device, after, limit)
    }

    fn read_snapshot(
        &mut self,
        schema: &Schema,
        device: &DeviceId,
        resync: u64,
        from: Option<&SnapshotCursor>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError> {
        feed::read_snapshot(&mut self.conn, schema, device, resync, from, limit)
    }

    fn ack_cursor(&mut self, device: &DeviceId, cursor: u64) -> Result<(), StoreError> {
        devices::ack_cursor(&self.conn, device, cursor)
    }

    fn count_throttled(
        &mut self,
        device: &DeviceId,
        rate_limited: u64,
        busy: u64,
    ) -> Result<(), StoreError> {
        devices::count_throttled(&self.conn, device, rate_limited, busy)
    }

    fn get_item(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredItem>, StoreError> {
        queries::get_item(&self.conn, owner, model, key)
    }

    fn query_items(&mut self, query: &ItemQuery) -> Result<ItemPage, StoreError> {
        queries::query_items(&self.conn, query)
    }

    fn conflicts(
        &mut self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        queries::conflicts(&self.conn, account, before, limit)
    }

    fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
        purge::max_version(&self.conn)
    }

    fn purge(&mut self, now_ms: u64, retention: &Retention) -> Result<PurgeStats, StoreError> {
        purge::purge(&mut self.conn, now_ms, retention)
    }

    fn read_changes(&mut self, query: &ChangeQuery) -> Result<ChangeRead, StoreError> {
        changes::read_changes(&mut self.conn, query)
    }

    fn purge_changes(
        &mut self,
        now_ms: u64,
        retention: &ChangeRetention,
    ) -> Result<ChangePurgeStats, StoreError> {
        changes::purge_changes(&mut self.conn, now_ms, retention)
    }

    fn change_head_hint(&self) -> u64 {
        self.hints.change_head.load(Ordering::Relaxed)
    }

    fn fanout_step(&mut self) -> Result<Option<Advanced>, StoreError> {
        let tx = sql::write_txn(&mut self.conn, "starting a broadcast fan-out step")?;
        let step = fanout::step(&tx, self.run, self.fanout_batch)?;
        tx.commit()
            .map_err(db("committing a broadcast fan-out step"))?;
        if step.is_none() {
            self.hints.fanout_pending.store(false, Ordering::Relaxed);
        }
        Ok(step)
    }

    fn fanout_pending_hint(&self) -> bool {
        self.hints.fanout_pending.load(Ordering::Relaxed)
    }

    fn create_webhook(
        &mut self,
        new: &NewWebhook,
        now_ms: u64,
    ) -> Result<WebhookRecord, StoreError> {
        webhooks::create_webhook(&mut self.conn, new, now_ms)
    }

    fn webhooks(&mut self, account: Option<&str>) -> Result<Vec<WebhookRecord>, StoreError> {
        webhooks::webhooks(&self.conn, account)
    }

    fn webhook(&mut self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        webhooks::webhook(&self.conn, id)
    }

    fn delete_webhook(&mut self, account: &str, id: &str) -> Result<bool, StoreError> {
        webhooks::delete_webhook(&self.conn, account, id)
    }

    fn record_webhook_attempt(
        &mut self,
        id: &str,
        attempt: &WebhookAttempt,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        webhooks::record_attempt(&self.conn, id, attempt, now_ms)
    }

    fn webhook_pending_since(
        &mut self,
        hook: &WebhookRecord,
        scan: usize,
    ) -> Result<Option<u64>, StoreError> {
        webhooks::pending_since(&self.conn, hook, scan)
    }
}

#[cfg(test)]
mod change_tests;
#[cfg(test)]
mod tests;
