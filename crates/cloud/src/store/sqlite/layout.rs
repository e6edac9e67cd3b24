//! The table layout of the SQLite store: the DDL, its version, and the migrations that bring an
//! older database file up to it.
//!
//! It exists so that everything that decides what the file looks like on disk is in one place:
//! a change to a table is a change here, with a new [`SCHEMA_VERSION`] and a migration.

use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::super::StoreError;
use super::sql::db;

/// The version of the table layout this build writes; a newer database is refused.
pub const SCHEMA_VERSION: u32 = 8;

const DDL: &str = "
CREATE TABLE IF NOT EXISTS devices (
    account TEXT NOT NULL,
    device TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    registered_ms INTEGER NOT NULL,
    online INTEGER NOT NULL DEFAULT 0,
    last_seen_ms INTEGER,
    schema_version TEXT,
    cursor_acked INTEGER NOT NULL DEFAULT 0,
    feed_head INTEGER NOT NULL DEFAULT 0,
    feed_floor INTEGER NOT NULL DEFAULT 0,
    pending INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    changes_applied INTEGER NOT NULL DEFAULT 0,
    changes_superseded INTEGER NOT NULL DEFAULT 0,
    changes_rejected INTEGER NOT NULL DEFAULT 0,
    broker_hash TEXT,
    rows_stored INTEGER NOT NULL DEFAULT 0,
    bytes_stored INTEGER NOT NULL DEFAULT 0,
    changes_over_quota INTEGER NOT NULL DEFAULT 0,
    messages_rate_limited INTEGER NOT NULL DEFAULT 0,
    pushes_busy INTEGER NOT NULL DEFAULT 0,
    conflicts_dropped INTEGER NOT NULL DEFAULT 0,
    changes_duplicate INTEGER NOT NULL DEFAULT 0,
    changes_answered INTEGER NOT NULL DEFAULT 0,
    feed_gen TEXT NOT NULL DEFAULT '0',
    feed_generations TEXT NOT NULL DEFAULT '0:0',
    PRIMARY KEY (account, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (
    account TEXT NOT NULL,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    item TEXT,
    version TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    base TEXT,
    PRIMARY KEY (account, device, pk, sk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    account TEXT NOT NULL,
    device TEXT NOT NULL,
    purged_below TEXT NOT NULL,
    PRIMARY KEY (account, device)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_model ON items (account, model, device, pk, sk);
CREATE INDEX IF NOT EXISTS items_tombstones ON items (updated_ms) WHERE deleted = 1;
CREATE TABLE IF NOT EXISTS feed (
    account TEXT NOT NULL,
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    PRIMARY KEY (account, device, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS feed_by_key ON feed (account, device, owner, pk, sk);
CREATE TABLE IF NOT EXISTS conflicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    account TEXT NOT NULL,
    device TEXT,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    winner TEXT NOT NULL,
    loser TEXT NOT NULL,
    lost TEXT NOT NULL,
    loser_item TEXT
);
CREATE INDEX IF NOT EXISTS conflicts_by_account ON conflicts (account, id);
CREATE INDEX IF NOT EXISTS conflicts_by_device ON conflicts (account, device, id);
";

/// What moves a layout-1 database to layout 2 (the row's base version, the per-owner purge
/// watermarks, the per-device push counters).
const MIGRATE_1_TO_2: &str = "
ALTER TABLE items ADD COLUMN base TEXT;
ALTER TABLE devices ADD COLUMN changes_applied INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN changes_superseded INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN changes_rejected INTEGER NOT NULL DEFAULT 0;
";

/// The API keys of the HTTP API (layout 3). Kept apart from [`DDL`] because it is also the whole
/// of the migration from layout 2.
const API_KEYS_DDL: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    secret_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_by_account ON api_keys (account, created_ms, id);
";

/// The account-wide change log, its per-account retention floors and the webhooks that deliver it
/// (layout 7). Kept apart from [`DDL`] because it is also the whole of the migration from layout
/// 6. `seq` is AUTOINCREMENT so a sequence number is never reused, even once retention removed
/// the newest entries of an idle log: a reader's cursor stays valid.
const CHANGES_DDL: &str = "
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    account TEXT NOT NULL,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    version TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    item TEXT,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_account ON changes (account, seq);
CREATE TABLE IF NOT EXISTS change_floors (
    account TEXT PRIMARY KEY,
    floor INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    url TEXT NOT NULL,
    model TEXT,
    secret TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    last_attempt_ms INTEGER,
    last_success_ms INTEGER,
    failures INTEGER NOT NULL DEFAULT 0,
    failures_total INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    changes_delivered INTEGER NOT NULL DEFAULT 0,
    gaps INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS webhooks_by_account ON webhooks (account, created_ms, id);
";

/// What moves a layout-6 database to layout 7: the change log and the webhooks. The log starts
/// empty: the writes made before the upgrade are in `items` (their current state), not in it.
const MIGRATE_6_TO_7: &str = CHANGES_DDL;

/// What moves a layout-2 database to layout 3: the `api_keys` table.
const MIGRATE_2_TO_3: &str = API_KEYS_DDL;

/// What moves a layout-3 database to layout 4: each device's Mosquitto password-file hash of
/// its secret (`crate::broker_hash`). Devices registered before have none (NULL) until their
/// secret is rotated, since the secret itself was never stored.
const MIGRATE_3_TO_4: &str = "
ALTER TABLE devices ADD COLUMN broker_hash TEXT;
";

/// What moves a layout-4 database to layout 5: the per-device usage and refusal counters of the
/// quotas, the usage counted from the rows already stored (live items and their JSON bytes).
/// The per-device conflict index is in [`DDL`].
const MIGRATE_4_TO_5: &str = "
ALTER TABLE devices ADD COLUMN rows_stored INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN bytes_stored INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN changes_over_quota INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN messages_rate_limited INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN pushes_busy INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN conflicts_dropped INTEGER NOT NULL DEFAULT 0;
UPDATE devices SET
    rows_stored = (SELECT count(*) FROM items
        WHERE items.account = devices.account AND items.device = devices.device AND deleted = 0),
    bytes_stored = (SELECT coalesce(sum(length(CAST(item AS BLOB))), 0) FROM items
        WHERE items.account = devices.account AND items.device = devices.device AND deleted = 0);
";

/// What moves a layout-5 database to layout 6: what a device's hello is compared with to see
/// that the store was restored from an older backup (`devtables_sync::cloud::FeedPage`): the
/// count of the device's pushed changes answered (and the duplicates among them), and the
/// generations of its feed. Kept in the rows a push or an append writes, in its transaction,
/// so a backup holds the figures that go with its data. A migrated store starts at zero, below
/// every figure a device heard from a layout-6 store: a layout-5 backup restored under a newer
/// cloud is seen as older than what the devices hold, which it is.
const MIGRATE_5_TO_6: &str = "
ALTER TABLE devices ADD COLUMN changes_duplicate INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN changes_answered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN feed_gen TEXT NOT NULL DEFAULT '0';
ALTER TABLE devices ADD COLUMN feed_generations TEXT NOT NULL DEFAULT '0:0';
";

/// The page cache of the store's connection, in KiB (64 MiB): memory the cloud node spends once
/// so that the working set of a large fleet stays in SQLite's cache.
const CACHE_KIB: i64 = 64 * 1024;

/// Prepared statements the store's connection keeps (see `init`).
const STATEMENT_CACHE: usize = 128;

/// Prepares a freshly opened connection: busy timeout, WAL mode (`wal`, for a file), the
/// `synchronous` level, then creates or upgrades the tables in one transaction.
pub(super) fn init(
    conn: &mut Connection,
    busy_timeout_ms: u64,
    synchronous_full: bool,
    wal: bool,
) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_millis(busy_timeout_ms))
        .map_err(db("setting the busy timeout"))?;
    if wal {
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(db("switching the cloud database to WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "the cloud database could not switch to WAL mode");
        }
    }
    let sync = if synchronous_full { "FULL" } else { "NORMAL" };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(db("setting PRAGMA synchronous"))?;
    // SQLite's default page cache is 2 MiB: a fleet's registry, feeds and items outgrow it at
    // once, and every push then reads its pages back from the operating system (the store
    // thread's largest cost in a profile of 10,000 devices). Negative: a size in KiB.
    conn.pragma_update(None, "cache_size", -CACHE_KIB)
        .map_err(db("setting PRAGMA cache_size"))?;
    // rusqlite keeps 16 prepared statements by default; a push alone runs about ten, and the
    // status, feed and registry jobs between pushes as many again: past 16 the cache evicts
    // and SQLite parses statements again on the store thread. Every statement the store has
    // fits in this one.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db("starting the schema transaction"))?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    )
    .map_err(db("creating the meta table"))?;
    let stored: Option<String> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(db("reading the store schema version"))?;
    if let Some(stored) = &stored {
        let version: u32 = stored.parse().map_err(|_| {
            StoreError::Corrupt(format!("meta.schema_version is {stored:?}, not a number"))
        })?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Database(format!(
                "the cloud database has table layout version {version}, newer than the {SCHEMA_VERSION} \
                 this build supports: upgrade devtables (or open a backup made by this version)"
            )));
        }
    }
    if stored.as_deref() == Some("1") {
        tx.execute_batch(MIGRATE_1_TO_2)
            .map_err(db("upgrading the cloud tables from layout 1 to 2"))?;
    }
    if matches!(stored.as_deref(), Some("1" | "2")) {
        tx.execute_batch(MIGRATE_2_TO_3)
            .map_err(db("upgrading the cloud tables from layout 2 to 3"))?;
    }
    if matches!(stored.as_deref(), Some("1" | "2" | "3")) {
        tx.execute_batch(MIGRATE_3_TO_4)
            .map_err(db("upgrading the cloud tables from layout 3 to 4"))?;
    }
    if matches!(stored.as_deref(), Some("1" | "2" | "3" | "4")) {
        tx.execute_batch(MIGRATE_4_TO_5)
            .map_err(db("upgrading the cloud tables from layout 4 to 5"))?;
    }
    if matches!(stored.as_deref(), Some("1" | "2" | "3" | "4" | "5")) {
        tx.execute_batch(MIGRATE_5_TO_6)
            .map_err(db("upgrading the cloud tables from layout 5 to 6"))?;
    }
    if matches!(stored.as_deref(), Some("1" | "2" | "3" | "4" | "5" | "6")) {
        tx.execute_batch(MIGRATE_6_TO_7)
            .map_err(db("upgrading the cloud tables from layout 6 to 7"))?;
    }
    tx.execute_batch(DDL)
        .map_err(db("creating the cloud tables"))?;
    tx.execute_batch(CHANGES_DDL)
        .map_err(db("creating the change log and webhook tables"))?;
    tx.execute_batch(API_KEYS_DDL)
        .map_err(db("creating the API key table"))?;
    // Layout 8 only adds this table (a layout-7 file gets it here, empty): the version moved so
    // that an older build, which would never work off a pending fan-out, refuses the file.
    tx.execute_batch(super::fanout::FANOUT_DDL)
        .map_err(db("creating the broadcast fan-out table"))?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![SCHEMA_VERSION.to_string()],
    )
    .map_err(db("recording the store schema version"))?;
    tx.commit().map_err(db("committing the cloud schema"))?;
    Ok(())
}
