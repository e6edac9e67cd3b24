//! The PostgreSQL cloud store: the production implementation of [`CloudStore`], for a fleet that
//! outgrows one SQLite file, and for several cloud processes sharing one database.
//!
//! The tables are SQLite's (`super::sqlite`'s module documentation describes each column) in one
//! PostgreSQL schema ([`PostgresOptions::schema`], created at connect when missing, and the
//! connection's `search_path`), with items as `jsonb` and the text the engine compares
//! byte-wise (keys, versions) `COLLATE "C"`; `layout` holds the DDL and the versioned
//! migrations. docs/postgres.md is the user's guide: URL, layout, grants, analysts' SQL.
//!
//! # Several writers
//!
//! SQLite's store relies on one writer; this one may run in several processes at once, each
//! with its own [`PostgresStore`]. Every write transaction is READ COMMITTED with explicit locks,
//! always taken in this order, so two operations never wait on each other in a circle (only
//! operations sharing a group can, see below):
//! 1. a transaction-level advisory lock per owner (device, or account for broadcast items): the
//!    read-modify-write of an item (the replication rules read the stored version, then write)
//!    never interleaves with another writer of the same owner, even for a key no row holds yet;
//! 2. the device rows (`FOR NO KEY UPDATE`): a push is ordered with a revocation, and the feed
//!    head is raised under the row's lock (`UPDATE ... RETURNING`), so each device's feed
//!    sequence is dense, never reused (a rolled-back append releases its number with its lock)
//!    and made visible in order; a broadcast (and each step of its fan-out, `fanout`) locks a
//!    batch of the account's device rows, in device order;
//! 3. the account's row in `change_floors` (`FOR UPDATE`), held from the first change-log entry
//!    of the transaction to its commit, with sequence numbers from one global `SEQUENCE`: two
//!    transactions of one account append one after the other, so within an account commit
//!    order is sequence order and a reader that passed sequence N never later finds an entry
//!    below N (PostgreSQL makes a commit visible before it releases the locks).
//!
//! Reads that must see one state (a feed page and its head, a snapshot page, a change-log page
//! with its floor and head) run in a REPEATABLE READ READ ONLY transaction; inside a group
//! (below) they read the head first and bound the entries by it.
//!
//! A deadlock (40P01) or a serialization failure (40001) rolls the operation back and runs it
//! again, at most [`MAX_ATTEMPTS`] times, then fails with [`StoreError::Database`]. A lost
//! connection fails the operation that met it; the next one connects again.
//!
//! # Groups
//!
//! [`CloudStore::begin_group`] opens one transaction; each operation of the group runs in a
//! savepoint of it, so a failing one rolls back alone, and the group's work becomes visible
//! (and durable) at [`CloudStore::commit_group`]. A group holds its locks until then, so groups
//! of two processes can wait on each other: PostgreSQL breaks such a deadlock by failing one
//! statement; the group's earlier work is then committed at once (sooner than asked, never
//! later), which releases the locks in the cycle, and the failed operation runs again in a new
//! group transaction. A connection lost during a
//! group loses the group (PostgreSQL rolls it back): the operations after the loss commit one by
//! one on a new connection, and `commit_group` fails, as SQLite's store does when the database
//! dropped the group on its own.
//!
//! # Runs
//!
//! Each [`PostgresStore`] is a run with a random id: its first append to a feed starts a
//! generation of that feed, as a new opening of the SQLite store does.
//!
//! # Files
//!
//! This file holds the store, its operation runner and its [`CloudStore`] implementation, whose
//! methods call into one file per concern, as in the SQLite store: `layout`, `txn`, `feed`,
//! `fanout`, `devices`, `api_keys`, `changes`, `webhooks`, `queries`, `purge`, `quota`, and `sql` (the
//! connection and row helpers).

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
pub mod tls;
mod txn;
mod webhooks;

use std::time::Duration;

use devtables_schema::{ItemKey, Schema};
use devtables_sync::apply::{CloudOp, CloudTxn, CloudWriteError, PushCounts, PushRules};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{Change, ChangeResult};
use rand::Rng;

use super::{
    Advanced, ApiKeyRecord, ChangePurgeStats, ChangeQuery, ChangeRead, ChangeRetention, CloudStore,
    ConflictRecord, DeviceQuotas, DeviceRecord, ItemPage, ItemQuery, KeyScope, NewWebhook,
    PurgeStats, Retention, StatusUpdate, StoreError, StoredItem, WebhookAttempt, WebhookRecord,
};
use sql::{Conn, Failure};
pub use tls::PostgresTls;

pub use layout::LAYOUT_VERSION;

/// How many times an operation runs when it keeps meeting deadlocks or serialization failures.
pub const MAX_ATTEMPTS: u32 = 8;

/// How the store connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The schema holding the store's tables, created when missing. Default `devtables`.
    pub schema: String,
    /// What each device may store and push (see [`DeviceQuotas`]).
    pub quotas: DeviceQuotas,
    /// How long connecting (also each reconnect) may take. Default 10 s.
    pub connect_timeout: Duration,
    /// TLS to the server (required when set). Default none: clear text, warned about at
    /// connect when the server is not on the loopback.
    pub tls: Option<PostgresTls>,
    /// Most devices one transaction appends a broadcast's feed entry to. Default
    /// [`DEFAULT_FANOUT_BATCH`](super::DEFAULT_FANOUT_BATCH).
    pub fanout_batch: usize,
}

impl Default for PostgresOptions {
    fn default() -> PostgresOptions {
        PostgresOptions {
            schema: "devtables".to_string(),
            quotas: DeviceQuotas::default(),
            connect_timeout: Duration::from_secs(10),
            tls: None,
            fanout_batch: super::DEFAULT_FANOUT_BATCH,
        }
    }
}

/// What an operation's transaction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// A write transaction (READ COMMITTED, explicit locks).
    Write,
    /// Several reads that must see one state (REPEATABLE READ READ ONLY).
    Snapshot,
    /// One statement, which is its own transaction.
    Single,
}

/// The group the store thread has open, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Group {
    None,
    Open,
    /// PostgreSQL ended the group on its own (the connection was lost): `commit_group` fails
    /// with this reason.
    Lost(String),
}

/// What the operations share besides the connection.
struct State {
    quotas: DeviceQuotas,
    /// This store instance's run (random, never 0).
    run: u64,
    /// The change log's head as far as this store knows ([`CloudStore::change_head_hint`]).
    change_head: u64,
    /// The prefix of this store's advisory lock names: the schema, so stores of two schemas
    /// never contend.
    lock_prefix: String,
    conflict_warn: crate::warn_limit::WarnLimiter,
    /// Most devices a broadcast reaches per transaction ([`PostgresOptions::fanout_batch`]).
    fanout_batch: usize,
    /// A broadcast fan-out may be pending ([`CloudStore::fanout_pending_hint`]): found at
    /// connect, set by a write that queued one, cleared by a step that found none.
    fanout_pending: bool,
}

/// The PostgreSQL cloud store. See the module documentation.
pub struct PostgresStore {
    config: postgres::Config,
    /// The server as errors name it (host and database, never the password).
    server: String,
    schema: String,
    tls: Option<PostgresTls>,
    conn: Option<Conn>,
    group: Group,
    state: State,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user[:password]@host[:port]/database`,
    /// or the `key=value` form; see docs/postgres.md), creates the schema when missing, brings
    /// its layout up to [`LAYOUT_VERSION`] (refusing a newer one, untouched) and uses it.
    ///
    /// The client is `postgres`' synchronous one, which runs a small tokio runtime of its own
    /// inside every call: it panics when called from a thread that is running a tokio runtime.
    /// Run the store on a thread of its own (the service's store thread); `connect` refuses to
    /// start on a runtime thread rather than panic. With [`PostgresOptions::tls`] every
    /// connection is TLS (rustls, required); without it, clear text.
    pub fn connect(url: &str, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(StoreError::Database(
                "the PostgreSQL store cannot run on a tokio runtime thread (its client would \
                 panic): open it on a thread of its own"
                    .into(),
            ));
        }
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Database(format!("the PostgreSQL URL is not valid: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("devtables-cloud");
        }
        let server = describe(&config);
        layout::schema_ident(&options.schema)?;
        if tls::clear_text_over_network(&config, options.tls.as_ref()) {
            tracing::warn!(
                "the PostgreSQL connection to {server} is clear text (no database_tls): the \
                 database's credentials and every item cross the network readable"
            );
        }
        let mut store = PostgresStore {
            config,
            server,
            schema: options.schema.clone(),
            tls: options.tls.clone(),
            conn: None,
            group: Group::None,
            state: State {
                quotas: options.quotas,
                run: new_run_id(),
                change_head: 0,
                lock_prefix: options.schema,
                conflict_warn: crate::warn_limit::WarnLimiter::new(
                    crate::warn_limit::WarnLimiter::INTERVAL,
                ),
                fanout_batch: options.fanout_batch.max(1),
                fanout_pending: false,
            },
        };
        let mut conn = store.open_client()?;
        layout::init(&mut conn, &store.schema)?;
        store.state.change_head = changes::sequence_head(&mut conn)?;
        store.state.fanout_pending = fanout::any_pending(&mut conn)?;
        store.conn = Some(conn);
        Ok(store)
    }

    /// Replaces the per-device quotas (they apply from the next push).
    pub fn set_quotas(&mut self, quotas: DeviceQuotas) {
        self.state.quotas = quotas;
    }

    /// Most devices one transaction appends a broadcast's feed entry to
    /// ([`PostgresOptions::fanout_batch`]).
    pub fn fanout_batch(&self) -> usize {
        self.state.fanout_batch
    }

    /// Replaces [`PostgresOptions::fanout_batch`] (at least 1), from the next write.
    pub fn set_fanout_batch(&mut self, batch: usize) {
        self.state.fanout_batch = batch.max(1);
    }

    /// The schema the store's tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    fn open_client(&self) -> Result<Conn, StoreError> {
        let client = tls::connect(&self.config, self.tls.as_ref()).map_err(|e| {
            StoreError::Database(format!("connecting to PostgreSQL at {}: {e}", self.server))
        })?;
        Ok(Conn::new(client))
    }

    /// Makes sure there is a connection, connecting again when there is none or it was lost (a
    /// lost connection also loses an open group).
    fn ensure_connection(&mut self) -> Result<(), StoreError> {
        if self.conn.as_ref().is_some_and(Conn::is_closed) {
            self.connection_failed();
        }
        if self.conn.is_none() {
            let mut conn = self.open_client()?;
            let ident = layout::schema_ident(&self.schema)?;
            conn.batch(
                "selecting the store's schema",
                &format!("SET search_path TO {ident}"),
            )?;
            self.conn = Some(conn);
        }
        Ok(())
    }

    /// The connection and the shared state, connecting first when needed.
    fn parts(&mut self) -> Result<(&mut Conn, &mut State), StoreError> {
        self.ensure_connection()?;
        match self.conn.as_mut() {
            Some(conn) => Ok((conn, &mut self.state)),
            None => Err(StoreError::Database("no PostgreSQL connection".into())),
        }
    }

    /// Notes a failure of the connection itself: it is dropped, and an open group is lost.
    fn connection_failed(&mut self) {
        self.conn = None;
        if self.group == Group::Open {
            self.group = Group::Lost(
                "the connection to PostgreSQL was lost during the group, which PostgreSQL rolled \
                 back"
                    .into(),
            );
        }
    }

    /// Runs one operation `f` in its transaction (see [`Mode`]), or in a savepoint of the open
    /// group; commits when `f` succeeds and rolls back when it fails. A deadlock or a
    /// serialization failure runs it again (at most [`MAX_ATTEMPTS`] times in all); `wrap`
    /// turns the runner's own errors into `f`'s error type.
    fn run<R, E>(
        &mut self,
        mode: Mode,
        what: &str,
        wrap: impl Fn(StoreError) -> E,
        mut f: impl FnMut(&mut Conn, &mut State) -> Result<R, E>,
    ) -> Result<R, E> {
        let mut attempt = 1;
        loop {
            let grouped = self.group == Group::Open;
            let (begin, commit, undo) = match (grouped, mode) {
                (true, _) => (
                    Some("SAVEPOINT op"),
                    "RELEASE SAVEPOINT op",
                    "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op",
                ),
                (false, Mode::Write) => (
                    Some("BEGIN ISOLATION LEVEL READ COMMITTED"),
                    "COMMIT",
                    "ROLLBACK",
                ),
                (false, Mode::Snapshot) => (
                    Some("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
                    "COMMIT",
                    "ROLLBACK",
                ),
                (false, Mode::Single) => (None, "", ""),
            };
            let (conn, state) = match self.parts() {
                Ok(parts) => parts,
                Err(e) => return Err(wrap(e)),
            };
            conn.failure = None;
            if let Some(begin) = begin {
                if let Err(e) = conn.batch(what, begin) {
                    if conn.failure == Some(Failure::Closed) {
                        self.connection_failed();
                    }
                    return Err(wrap(e));
                }
            }
            let result = f(conn, state);
            let failure = conn.failure.take();
            match result {
                Ok(value) => {
                    if begin.is_some() {
                        if let Err(e) = conn.batch(what, commit) {
                            if conn.failure == Some(Failure::Closed) {
                                self.connection_failed();
                            } else {
                                let _ = conn.batch("ending a failed commit", undo);
                            }
                            return Err(wrap(e));
                        }
                    }
                    return Ok(value);
                }
                Err(e) => {
                    if failure == Some(Failure::Closed) {
                        self.connection_failed();
                        return Err(e);
                    }
                    if begin.is_some() && conn.batch("rolling back an operation", undo).is_err() {
                        // The transaction's state is unknown: end it, and the group with it.
                        let _ = conn.batch("ending a broken transaction", "ROLLBACK");
                        if grouped {
                            self.group = Group::Lost(format!(
                                "an operation of the group could not be rolled back alone \
                                 ({what}), so the group was rolled back"
                            ));
                        }
                        return Err(e);
                    }
                    if failure != Some(Failure::Retry) {
                        return Err(e);
                    }
                    if attempt >= MAX_ATTEMPTS {
                        return Err(wrap(StoreError::Database(format!(
                            "{what}: still meeting deadlocks or serialization failures with \
                             concurrent writers after {MAX_ATTEMPTS} attempts"
                        ))));
                    }
                    if grouped {
                        // The cycle may run through locks the group's earlier operations hold,
                        // which a retry in the same transaction would meet again: their work
                        // is committed now (early, which only makes it durable sooner) and a
                        // new group transaction goes on without those locks.
                        let (conn, _) = match self.parts() {
                            Ok(parts) => parts,
                            Err(e2) => return Err(wrap(e2)),
                        };
                        if let Err(e2) = conn.batch(
                            "committing a group early to retry an operation",
                            "COMMIT; BEGIN ISOLATION LEVEL READ COMMITTED",
                        ) {
                            let closed = conn.failure.take() == Some(Failure::Closed);
                            if closed {
                                self.connection_failed();
                            } else {
                                let _ = conn.batch("ending a failed group", "ROLLBACK");
                                self.group = Group::Lost(format!(
                                    "the group could not be committed early to retry an \
                                     operation: {e2}"
                                ));
                            }
                            return Err(e);
                        }
                    }
                    // A short random pause, growing with the attempts, so two operations that
                    // deadlocked do not meet again at once.
                    let pause = rand::thread_rng().gen_range(1..=5u64) * u64::from(attempt);
                    std::thread::sleep(Duration::from_millis(pause));
                    attempt += 1;
                }
            }
        }
    }

    /// Runs `f` over the store's [`CloudTxn`] in one write transaction at wall time `now_ms`,
    /// committing when `commit` is true and `f` succeeds, rolling back otherwise. For the
    /// store-conformance suite (`devtables-conformance`); the service goes through
    /// [`CloudStore::apply_push`] and [`CloudStore::write`].
    #[doc(hidden)]
    pub fn conformance_txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let grouped = self.group == Group::Open;
        let (begin, end_ok, undo) = if grouped {
            (
                "SAVEPOINT op",
                "RELEASE SAVEPOINT op",
                "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op",
            )
        } else {
            ("BEGIN ISOLATION LEVEL READ COMMITTED", "COMMIT", "ROLLBACK")
        };
        let (conn, state) = self.parts()?;
        conn.batch("starting a conformance transaction", begin)?;
        let r = f(&mut txn::PgTxn::new(conn, now_ms, state));
        match r {
            Ok(v) => {
                let end = if commit { end_ok } else { undo };
                conn.batch("ending a conformance transaction", end)?;
                Ok(v)
            }
            Err(e) => {
                let _ = conn.batch("rolling back a conformance transaction", undo);
                Err(e)
            }
        }
    }

    /// Starts a new run, as a new store instance does. For the store-conformance suite.
    #[doc(hidden)]
    pub fn conformance_new_run(&mut self) {
        self.state.run = new_run_id();
    }

    /// The device's push counters, duplicates included (the device record leaves them out).
    /// For the store-conformance suite.
    #[doc(hidden)]
    pub fn conformance_push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
        self.run(
            Mode::Single,
            "reading push counters",
            |e| e,
            |c, _| devices::push_counts(c, id),
        )
    }
}

/// A random run id, never 0 (the generation of a feed no run appended to).
fn new_run_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// The server a configuration names, for error messages: hosts, ports and database.
fn describe(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "{} port {} database {}",
        if hosts.is_empty() {
            "localhost".to_string()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_string()
        } else {
            ports.join(",")
        },
        config.get_dbname().unwrap_or("(the user's)")
    )
}

impl CloudStore for PostgresStore {
    fn begin_group(&mut self) -> Result<(), StoreError> {
        if self.group != Group::None {
            return Err(StoreError::Database(
                "starting a group of store operations: a group is already open".into(),
            ));
        }
        let (conn, _) = self.parts()?;
        if let Err(e) = conn.batch(
            "starting a group of store operations",
            "BEGIN ISOLATION LEVEL READ COMMITTED",
        ) {
            if conn.failure.take() == Some(Failure::Closed) {
                self.connection_failed();
            }
            return Err(e);
        }
        self.group = Group::Open;
        Ok(())
    }

    fn commit_group(&mut self) -> Result<(), StoreError> {
        match std::mem::replace(&mut self.group, Group::None) {
            Group::None => Ok(()),
            Group::Lost(why) => Err(StoreError::Database(format!(
                "committing a group of store operations: {why}"
            ))),
            Group::Open => {
                // A connection lost meanwhile loses the group: `parts` would connect anew.
                if self.conn.as_ref().is_none_or(Conn::is_closed) {
                    self.connection_failed();
                    return Err(StoreError::Database(
                        "committing a group of store operations: the connection to PostgreSQL \
                         was lost, and the group with it"
                            .into(),
                    ));
                }
                let (conn, _) = self.parts()?;
                if let Err(e) = conn.batch("committing a group of store operations", "COMMIT") {
                    if conn.failure.take() == Some(Failure::Closed) {
                        self.connection_failed();
                    } else {
                        let _ = conn.batch("ending a failed group", "ROLLBACK");
                    }
                    return Err(e);
                }
                Ok(())
            }
        }
    }

    fn register_device(
        &mut self,
        id: &DeviceId,
        secret_hash: &str,
        broker_hash: Option<&str>,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.run(
            Mode::Single,
            "registering a device",
            |e| e,
            |c, _| devices::register_device(c, id, secret_hash, broker_hash, now_ms),
        )
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.run(
            Mode::Single,
            "reading a device",
            |e| e,
            |c, _| devices::device(c, id),
        )
    }

    fn revoke_device(&mut self, id: &DeviceId, delete_items: bool) -> Result<bool, StoreError> {
        self.run(
            Mode::Write,
            "revoking a device",
            |e| e,
            |c, s| devices::revoke_device(c, s, id, delete_items),
        )
    }

    fn revoked_devices(
        &mut self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>, StoreError> {
        self.run(
            Mode::Single,
            "listing revoked devices",
            |e| e,
            |c, _| devices::revoked_devices(c, after, limit),
        )
    }

    fn set_device_secret(
        &mut self,
        id: &DeviceId,
        secret_hash: &str,
        broker_hash: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.run(
            Mode::Single,
            "replacing a device's secret",
            |e| e,
            |c, _| devices::set_device_secret(c, id, secret_hash, broker_hash),
        )
    }

    fn devices(
        &mut self,
        account: Option<&str>,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        self.run(
            Mode::Single,
            "listing devices",
            |e| e,
            |c, _| devices::devices(c, account, after, limit),
        )
    }

    fn update_status(&mut self, id: &DeviceId, update: &StatusUpdate) -> Result<(), StoreError> {
        self.run(
            Mode::Single,
            "updating a device's status",
            |e| e,
            |c, _| devices::update_status(c, id, update),
        )
    }

    fn reset_online(&mut self) -> Result<(), StoreError> {
        self.run(
            Mode::Single,
            "marking every device offline",
            |e| e,
            |c, _| devices::reset_online(c),
        )
    }

    fn mark_offline_unseen(&mut self, ids: &[DeviceId], since_ms: u64) -> Result<u64, StoreError> {
        self.run(
            Mode::Write,
            "marking unseen devices offline",
            |e| e,
            |c, _| devices::mark_offline_unseen(c, ids, since_ms),
        )
    }

    fn create_api_key(
        &mut self,
        account: &str,
        scope: KeyScope,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<String, StoreError> {
        self.run(
            Mode::Write,
            "storing an API key",
            |e| e,
            |c, _| api_keys::create_api_key(c, account, scope, secret_hash, now_ms),
        )
    }

    fn api_keys(&mut self, account: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.run(
            Mode::Single,
            "listing API keys",
            |e| e,
            |c, _| api_keys::api_keys(c, account),
        )
    }

    fn revoke_api_key(&mut self, account: &str, id: &str, now_ms: u64) -> Result<bool, StoreError> {
        self.run(
            Mode::Single,
            "revoking an API key",
            |e| e,
            |c, _| api_keys::revoke_api_key(c, account, id, now_ms),
        )
    }

    fn api_key(&mut self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.run(
            Mode::Single,
            "looking up an API key",
            |e| e,
            |c, _| api_keys::api_key(c, id),
        )
    }

    fn live_api_keys(&mut self) -> Result<u64, StoreError> {
        self.run(
            Mode::Single,
            "counting API keys",
            |e| e,
            |c, _| api_keys::live_api_keys(c),
        )
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
        let (results, advanced, dropped) = self.run(
            Mode::Write,
            "applying a push",
            |e| e,
            |c, s| txn::apply_push(c, s, schema, clock, now_ms, rules, from, changes),
        )?;
        if dropped > 0 {
            if let Some(quiet) = self.state.conflict_warn.hit(std::time::Instant::now()) {
                tracing::warn!(
                    device = %from, dropped, quiet, max = self.state.quotas.max_conflicts,
                    "dropped the oldest conflict records of a device over its cap (counted in \
                     its conflicts_dropped; {quiet} more drops since the last warning)"
                );
            }
        }
        Ok((results, advanced))
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
        self.run(
            Mode::Write,
            "an API write",
            CloudWriteError::Store,
            |c, s| {
                txn::write(
                    c,
                    s,
                    schema,
                    clock,
                    now_ms,
                    max_message_bytes,
                    owner,
                    model,
                    op.clone(),
                )
            },
        )
    }

    fn read_feed(
        &mut self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StoreError> {
        self.run(
            Mode::Snapshot,
            "reading a feed",
            |e| e,
            |c, _| feed::read_feed(c, device, after, limit),
        )
    }

    fn read_snapshot(
        &mut self,
        schema: &Schema,
        device: &DeviceId,
        resync: u64,
        from: Option<&SnapshotCursor>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError> {
        self.run(
            Mode::Snapshot,
            "reading a snapshot",
            |e| e,
            |c, _| feed::read_snapshot(c, schema, device, resync, from, limit),
        )
    }

    fn ack_cursor(&mut self, device: &DeviceId, cursor: u64) -> Result<(), StoreError> {
        self.run(
            Mode::Single,
            "recording an acknowledged cursor",
            |e| e,
            |c, _| devices::ack_cursor(c, device, cursor),
        )
    }

    fn count_throttled(
        &mut self,
        device: &DeviceId,
        rate_limited: u64,
        busy: u64,
    ) -> Result<(), StoreError> {
        self.run(
            Mode::Single,
            "counting refused messages",
            |e| e,
            |c, _| devices::count_throttled(c, device, rate_limited, busy),
        )
    }

    fn get_item(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredItem>, StoreError> {
        self.run(
            Mode::Single,
            "reading an item",
            |e| e,
            |c, _| queries::get_item(c, owner, model, key),
        )
    }

    fn query_items(&mut self, query: &ItemQuery) -> Result<ItemPage, StoreError> {
        self.run(
            Mode::Single,
            "querying items",
            |e| e,
            |c, _| queries::query_items(c, query),
        )
    }

    fn conflicts(
        &mut self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        self.run(
            Mode::Single,
            "listing conflicts",
            |e| e,
            |c, _| queries::conflicts(c, account, before, limit),
        )
    }

    fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
        self.run(
            Mode::Single,
            "reading the highest stored version",
            |e| e,
            |c, _| purge::max_version(c),
        )
    }

    fn purge(&mut self, now_ms: u64, retention: &Retention) -> Result<PurgeStats, StoreError> {
        self.run(
            Mode::Write,
            "purging",
            |e| e,
            |c, state| purge::purge(c, state, now_ms, retention),
        )
    }

    fn read_changes(&mut self, query: &ChangeQuery) -> Result<ChangeRead, StoreError> {
        self.run(
            Mode::Snapshot,
            "reading the change log",
            |e| e,
            |c, _| changes::read_changes(c, query),
        )
    }

    fn purge_changes(
        &mut self,
        now_ms: u64,
        retention: &ChangeRetention,
    ) -> Result<ChangePurgeStats, StoreError> {
        self.run(
            Mode::Write,
            "purging the change log",
            |e| e,
            |c, _| changes::purge_changes(c, now_ms, retention),
        )
    }

    fn change_head_hint(&self) -> u64 {
        self.state.change_head
    }

    fn fanout_step(&mut self) -> Result<Option<Advanced>, StoreError> {
        let step = self.run(
            Mode::Write,
            "a broadcast fan-out step",
            |e| e,
            |c, state| fanout::step(c, state),
        )?;
        if step.is_none() {
            self.state.fanout_pending = false;
        }
        Ok(step)
    }

    fn fanout_pending_hint(&self) -> bool {
        self.state.fanout_pending
    }

    fn create_webhook(
        &mut self,
        new: &NewWebhook,
        now_ms: u64,
    ) -> Result<WebhookRecord, StoreError> {
        self.run(
            Mode::Write,
            "storing a webhook",
            |e| e,
            |c, _| webhooks::create_webhook(c, new, now_ms),
        )
    }

    fn webhooks(&mut self, account: Option<&str>) -> Result<Vec<WebhookRecord>, StoreError> {
        self.run(
            Mode::Single,
            "listing webhooks",
            |e| e,
            |c, _| webhooks::webhooks(c, account),
        )
    }

    fn webhook(&mut self, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
        self.run(
            Mode::Single,
            "reading a webhook",
            |e| e,
            |c, _| webhooks::webhook(c, id),
        )
    }

    fn delete_webhook(&mut self, account: &str, id: &str) -> Result<bool, StoreError> {
        self.run(
            Mode::Single,
            "deleting a webhook",
            |e| e,
            |c, _| webhooks::delete_webhook(c, account, id),
        )
    }

    fn record_webhook_attempt(
        &mut self,
        id: &str,
        attempt: &WebhookAttempt,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        self.run(
            Mode::Single,
            "recording a webhook delivery",
            |e| e,
            |c, _| webhooks::record_attempt(c, id, attempt, now_ms),
        )
    }

    fn webhook_pending_since(
        &mut self,
        hook: &WebhookRecord,
        scan: usize,
    ) -> Result<Option<u64>, StoreError> {
        self.run(
            Mode::Single,
            "finding a webhook's oldest pending change",
            |e| e,
            |c, _| webhooks::pending_since(c, hook, scan),
        )
    }
}
