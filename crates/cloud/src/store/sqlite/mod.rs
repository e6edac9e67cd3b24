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
//! -- Store metadata: schema_version = 1.
//! meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)
//!
//! -- Registered devices and their sync status.
//! devices(account, device,            -- PRIMARY KEY
//!         secret_hash,                -- hash of the device secret, never the secret
//!         registered_ms,
//!         online,                     -- 0/1: the device has a session
//!         last_seen_ms, schema_version,
//!         cursor_acked,               -- highest feed cursor the device acknowledged
//!         feed_head,                  -- highest sequence number of the device's feed
//!         feed_floor,                 -- feed entries up to here were purged
//!         pending,                    -- outbox size the device announced
//!         last_error)
//!
//! -- Every item of every device, one row per (owner, key); tombstones are kept for a while.
//! items(account,
//!       device,                       -- owning device; '' for account-wide (broadcast) items
//!       model, pk, sk,
//!       item,                         -- the item as JSON text; NULL for a tombstone
//!       version,                      -- the write's version as sortable text (see below)
//!       deleted,                      -- 1 for a tombstone
//!       updated_ms,                   -- when the cloud stored the write
//!       PRIMARY KEY (account, device, pk, sk))
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
//! ```
//!
//! Versions are stored with [`hlc_to_string`], whose text order is the version order, so
//! `ORDER BY version` works. Example: the settings of one device, newest first:
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

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{
    cloud_apply_push, cloud_write, CloudOp, CloudTxn, CloudWriteError, Conflict, Loser,
    PushCounts, RowWrite, StoredRow,
};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage, UnreadableRow};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{hlc_from_str, hlc_to_string, Change, ChangeResult, Op};
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, TransactionBehavior};

use super::{
    Advanced, CloudStore, ConflictRecord, DeviceRecord, ItemPage, ItemQuery, PurgeStats, Retention,
    StatusUpdate, StoreError, StoredItem,
};

/// The version of the table layout this build writes; a newer database is refused.
pub const SCHEMA_VERSION: u32 = 2;

/// Most items one [`CloudStore::query_items`] page returns.
pub const MAX_QUERY_LIMIT: usize = 1000;

/// How the database file is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// `PRAGMA synchronous = FULL` (default): an acknowledged write survives a power loss. With
    /// `false`, `NORMAL`: still consistent after a crash, but the last commits may be lost.
    pub synchronous_full: bool,
    /// How long a statement waits for a lock held by another connection, in ms. Default 5000.
    pub busy_timeout_ms: u64,
}

impl Default for SqliteOptions {
    fn default() -> SqliteOptions {
        SqliteOptions {
            synchronous_full: true,
            busy_timeout_ms: 5000,
        }
    }
}

/// The SQLite cloud store. See the module documentation for its tables.
pub struct SqliteStore {
    conn: Connection,
}

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
";

const DEVICE_COLS: &str =
    "account, device, secret_hash, registered_ms, online, last_seen_ms, schema_version, \
                           cursor_acked, feed_head, pending, last_error, changes_applied, \
                           changes_superseded, changes_rejected";

/// What moves a layout-1 database to layout 2 (the row's base version, the per-owner purge
/// watermarks, the per-device push counters).
const MIGRATE_1_TO_2: &str = "
ALTER TABLE items ADD COLUMN base TEXT;
ALTER TABLE devices ADD COLUMN changes_applied INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN changes_superseded INTEGER NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN changes_rejected INTEGER NOT NULL DEFAULT 0;
";
const ITEM_COLS: &str = "account, device, model, pk, sk, item, version, updated_ms";

/// Maps a rusqlite error, saying which operation failed. Decoding failures mean bad stored data.
fn map_err(what: &str, e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            StoreError::Corrupt(format!("{what}: {e}"))
        }
        _ => StoreError::Database(format!("{what}: {e}")),
    }
}

fn db(what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| map_err(what, e)
}

/// The (account, device) columns of an owner's rows.
fn owner_cols(owner: &Owner) -> (&str, &str) {
    match owner {
        Owner::Device(d) => (&d.account, &d.device),
        Owner::Account(a) => (a, ""),
    }
}

fn sql_int(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn parse_version(s: &str) -> Result<Hlc, StoreError> {
    hlc_from_str(s).map_err(|e| StoreError::Corrupt(format!("stored version: {e}")))
}

fn parse_item(s: &str) -> Result<Item, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("stored item JSON: {e}")))
}

fn item_json(item: &Item) -> Result<String, StoreError> {
    serde_json::to_string(item)
        .map_err(|e| StoreError::Database(format!("encoding an item as JSON: {e}")))
}

fn device_row(r: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        account: r.get(0)?,
        device: r.get(1)?,
        secret_hash: r.get(2)?,
        registered_ms: r.get(3)?,
        online: r.get::<_, i64>(4)? != 0,
        last_seen_ms: r.get(5)?,
        schema_version: r.get(6)?,
        cursor_acked: r.get(7)?,
        feed_head: r.get(8)?,
        pending: r.get(9)?,
        last_error: r.get(10)?,
        changes_applied: r.get(11)?,
        changes_superseded: r.get(12)?,
        changes_rejected: r.get(13)?,
    })
}

/// An `items` row as read, before its JSON and version are decoded.
struct RawItem {
    account: String,
    device: String,
    model: String,
    pk: String,
    sk: String,
    item: Option<String>,
    version: String,
    updated_ms: u64,
}

impl RawItem {
    /// Reads the [`ITEM_COLS`] columns.
    fn read(r: &Row<'_>) -> rusqlite::Result<RawItem> {
        Ok(RawItem {
            account: r.get(0)?,
            device: r.get(1)?,
            model: r.get(2)?,
            pk: r.get(3)?,
            sk: r.get(4)?,
            item: r.get(5)?,
            version: r.get(6)?,
            updated_ms: r.get(7)?,
        })
    }

    fn decode(self) -> Result<StoredItem, StoreError> {
        Ok(StoredItem {
            account: self.account,
            device: (!self.device.is_empty()).then_some(self.device),
            model: self.model,
            pk: self.pk,
            sk: self.sk,
            item: self.item.as_deref().map(parse_item).transpose()?,
            version: parse_version(&self.version)?,
            updated_ms: self.updated_ms,
        })
    }
}

/// The change a feed or snapshot delivers for a row in its current state.
fn row_change(
    model: String,
    pk: String,
    sk: String,
    item: Option<String>,
    version: &str,
    deleted: bool,
) -> Result<Change, StoreError> {
    let version = parse_version(version)?;
    let (op, item) = if deleted {
        (Op::Delete, None)
    } else {
        let Some(text) = item else {
            return Err(StoreError::Corrupt(format!(
                "live item {model} ({pk}, {sk}) has no JSON"
            )));
        };
        (Op::Put, Some(parse_item(&text)?))
    };
    Ok(Change {
        model,
        key: ItemKey { pk, sk },
        op,
        item,
        version,
        base: None,
    })
}

/// The smallest string greater than every string that starts with `prefix` (`None`: no bound).
///
/// Text compares by UTF-8 bytes, which is code point order, so the successor is the prefix with
/// its trailing U+10FFFF characters dropped and its last other character incremented.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 {
            0xD7FF => Some('\u{E000}'),
            c => char::from_u32(c + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Whether a query filter names a plain top-level field.
fn valid_field(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn encode_token(device: &str, pk: &str, sk: &str) -> Result<String, StoreError> {
    serde_json::to_vec(&(device, pk, sk))
        .map(hex::encode)
        .map_err(|e| StoreError::Database(format!("encoding a page token: {e}")))
}

fn decode_token(token: &str) -> Result<(String, String, String), StoreError> {
    let bad = || StoreError::BadQuery("the next token is not one this service issued".to_string());
    let bytes = hex::decode(token).map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// One write transaction as the replication rules see it.
struct SqlTxn<'c> {
    conn: &'c Connection,
    now_ms: u64,
    advanced: BTreeMap<DeviceId, u64>,
}

impl<'c> SqlTxn<'c> {
    fn new(conn: &'c Connection, now_ms: u64) -> SqlTxn<'c> {
        SqlTxn {
            conn,
            now_ms,
            advanced: BTreeMap::new(),
        }
    }

    fn into_advanced(self) -> Advanced {
        self.advanced.into_iter().collect()
    }

}

impl CloudTxn for SqlTxn<'_> {
    type Error = StoreError;

    fn stored_row(&mut self, owner: &Owner, key: &ItemKey) -> Result<Option<StoredRow>, StoreError> {
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
            .prepare_cached("SELECT purged_below FROM watermarks WHERE account = ?1 AND device = ?2")
            .and_then(|mut s| s.query_row(params![account, device], |r| r.get(0)).optional())
            .map_err(db("reading a purge watermark"))?;
        v.as_deref().map(parse_version).transpose()
    }

    fn write_row(&mut self, w: &RowWrite<'_>) -> Result<(), StoreError> {
        let (account, device) = owner_cols(w.owner);
        let json = w.item.map(item_json).transpose()?;
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
        Ok(())
    }

    fn count_push(&mut self, device: &DeviceId, counts: &PushCounts) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE devices SET changes_applied = changes_applied + ?3,
                    changes_superseded = changes_superseded + ?4, changes_rejected = changes_rejected + ?5
                 WHERE account = ?1 AND device = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    device.account,
                    device.device,
                    counts.applied,
                    counts.superseded,
                    counts.rejected
                ])
            })
            .map_err(db("counting a push"))?;
        Ok(())
    }

    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey) -> Result<(), StoreError> {
        let (account, owner_device) = owner_cols(owner);
        let targets: Vec<(String, u64)> = match owner {
            Owner::Device(d) => {
                let head: Option<u64> = self
                    .conn
                    .prepare_cached(
                        "UPDATE devices SET feed_head = feed_head + 1 WHERE account = ?1 AND device = ?2 RETURNING feed_head",
                    )
                    .and_then(|mut s| s.query_row(params![d.account, d.device], |r| r.get(0)).optional())
                    .map_err(db("advancing a device feed"))?;
                match head {
                    Some(head) => vec![(d.device.clone(), head)],
                    None => return Err(StoreError::UnknownDevice(d.to_string())),
                }
            }
            Owner::Account(a) => self
                .conn
                .prepare_cached(
                    "UPDATE devices SET feed_head = feed_head + 1 WHERE account = ?1 RETURNING device, feed_head",
                )
                .and_then(|mut s| {
                    s.query_map(params![a], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(db("advancing the feeds of an account"))?,
        };
        for (device, head) in targets {
            self.conn
                .prepare_cached(
                    "DELETE FROM feed WHERE account = ?1 AND device = ?2 AND owner = ?3 AND pk = ?4 AND sk = ?5",
                )
                .and_then(|mut s| s.execute(params![account, device, owner_device, key.pk, key.sk]))
                .map_err(db("dropping an older feed entry"))?;
            self.conn
                .prepare_cached(
                    "INSERT INTO feed (account, device, seq, owner, model, pk, sk) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .and_then(|mut s| s.execute(params![account, device, head, owner_device, model, key.pk, key.sk]))
                .map_err(db("appending a feed entry"))?;
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
        Ok(())
    }
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

    fn init(
        mut conn: Connection,
        options: &SqliteOptions,
        wal: bool,
    ) -> Result<SqliteStore, StoreError> {
        conn.busy_timeout(Duration::from_millis(options.busy_timeout_ms))
            .map_err(db("setting the busy timeout"))?;
        if wal {
            let mode: String = conn
                .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                .map_err(db("switching the cloud database to WAL mode"))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(%mode, "the cloud database could not switch to WAL mode");
            }
        }
        let sync = if options.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(db("setting PRAGMA synchronous"))?;
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
        tx.execute_batch(DDL)
            .map_err(db("creating the cloud tables"))?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![SCHEMA_VERSION.to_string()],
        )
        .map_err(db("recording the store schema version"))?;
        tx.commit().map_err(db("committing the cloud schema"))?;
        Ok(SqliteStore { conn })
    }

    fn write_txn(&mut self, what: &'static str) -> Result<rusqlite::Transaction<'_>, StoreError> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(what))
    }
}

fn device_exists(conn: &Connection, id: &DeviceId) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM devices WHERE account = ?1 AND device = ?2")
        .and_then(|mut s| s.exists(params![id.account, id.device]))
        .map_err(db("looking up a device"))
}

impl CloudStore for SqliteStore {
    fn register_device(
        &mut self,
        id: &DeviceId,
        secret_hash: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        // feed_head = feed_floor = 1: a first read from cursor 0 requires a full resync.
        let n = self
            .conn
            .prepare_cached(
                "INSERT INTO devices (account, device, secret_hash, registered_ms, feed_head, feed_floor)
                 VALUES (?1, ?2, ?3, ?4, 1, 1) ON CONFLICT (account, device) DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![id.account, id.device, secret_hash, now_ms]))
            .map_err(db("registering a device"))?;
        if n == 0 {
            return Err(StoreError::DeviceExists(id.to_string()));
        }
        Ok(())
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE account = ?1 AND device = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(params![id.account, id.device], device_row)
                    .optional()
            })
            .map_err(db("reading a device"))
    }

    fn devices(
        &mut self,
        account: Option<&str>,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut sql = format!("SELECT {DEVICE_COLS} FROM devices WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(a) = account {
            sql.push_str(" AND account = ?");
            args.push(Value::Text(a.to_string()));
        }
        if let Some(after) = after {
            sql.push_str(" AND (account, device) > (?, ?)");
            args.push(Value::Text(after.account.clone()));
            args.push(Value::Text(after.device.clone()));
        }
        sql.push_str(" ORDER BY account, device LIMIT ?");
        args.push(Value::Integer(sql_int(limit)));
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(params_from_iter(args.iter()), device_row)?
                    .collect()
            })
            .map_err(db("listing devices"))
    }

    fn update_status(&mut self, id: &DeviceId, update: &StatusUpdate) -> Result<(), StoreError> {
        let (set_error, error) = match &update.last_error {
            Some(e) => (true, e.as_deref()),
            None => (false, None),
        };
        let n = self
            .conn
            .prepare_cached(
                "UPDATE devices SET
                    online = coalesce(?3, online),
                    last_seen_ms = coalesce(?4, last_seen_ms),
                    schema_version = coalesce(?5, schema_version),
                    cursor_acked = coalesce(?6, cursor_acked),
                    pending = coalesce(?7, pending),
                    last_error = CASE WHEN ?8 THEN ?9 ELSE last_error END
                 WHERE account = ?1 AND device = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id.account,
                    id.device,
                    update.online,
                    update.last_seen_ms,
                    update.schema_version,
                    update.cursor_acked,
                    update.pending,
                    set_error,
                    error
                ])
            })
            .map_err(db("updating a device's status"))?;
        if n == 0 {
            return Err(StoreError::UnknownDevice(id.to_string()));
        }
        Ok(())
    }

    fn reset_online(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE devices SET online = 0 WHERE online <> 0", [])
            .map_err(db("marking every device offline"))?;
        Ok(())
    }

    fn apply_push(
        &mut self,
        schema: &Schema,
        clock: &mut HlcClock,
        now_ms: u64,
        max_drift_ms: u64,
        from: &DeviceId,
        changes: &[Change],
    ) -> Result<(Vec<ChangeResult>, Advanced), StoreError> {
        let tx = self.write_txn("starting a push transaction")?;
        let (results, advanced) = {
            let mut t = SqlTxn::new(&tx, now_ms);
            let results =
                cloud_apply_push(&mut t, schema, clock, now_ms, max_drift_ms, from, changes)?;
            (results, t.into_advanced())
        };
        tx.commit().map_err(db("committing a push"))?;
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
        let tx = self
            .write_txn("starting a write transaction")
            .map_err(CloudWriteError::Store)?;
        if let Owner::Device(d) = owner {
            if !device_exists(&tx, d).map_err(CloudWriteError::Store)? {
                return Err(CloudWriteError::Store(StoreError::UnknownDevice(
                    d.to_string(),
                )));
            }
        }
        let (change, advanced) = {
            let mut t = SqlTxn::new(&tx, now_ms);
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

    fn read_feed(
        &mut self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StoreError> {
        // One read transaction: the head and the entries come from the same snapshot, so every
        // entry up to the head is either returned or after the page.
        let tx = self
            .conn
            .transaction()
            .map_err(db("starting a feed read"))?;
        let state: Option<(u64, u64)> = tx
            .prepare_cached(
                "SELECT feed_head, feed_floor FROM devices WHERE account = ?1 AND device = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![device.account, device.device], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(db("reading a device's feed head"))?;
        let Some((head, floor)) = state else {
            return Err(StoreError::UnknownDevice(device.to_string()));
        };
        // Below the purged floor, or beyond the head (the device holds entries this database
        // never had: it was restored from a backup, or the cursor is hostile): only a full
        // resync brings the device back in step.
        if after < floor || after > head {
            return Ok(FeedPage {
                after,
                changes: Vec::new(),
                head,
                resync_required: true,
                unreadable: Vec::new(),
            });
        }
        type FeedRow = (
            u64,
            Option<String>,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<bool>,
        );
        let mut changes = Vec::new();
        let mut unreadable = Vec::new();
        let mut from = after;
        // A short page tells the engine the feed is exhausted, so entries whose item row
        // vanished (only possible through manual SQL) are skipped without shortening the page.
        while changes.len() + unreadable.len() < limit {
            let want = limit - changes.len() - unreadable.len();
            let rows: Vec<FeedRow> = tx
                .prepare_cached(
                    "SELECT f.seq, i.model, f.pk, f.sk, i.item, i.version, i.deleted
                     FROM feed f LEFT JOIN items i
                       ON i.account = f.account AND i.device = f.owner AND i.pk = f.pk AND i.sk = f.sk
                     WHERE f.account = ?1 AND f.device = ?2 AND f.seq > ?3
                     ORDER BY f.seq LIMIT ?4",
                )
                .and_then(|mut s| {
                    s.query_map(params![device.account, device.device, from, sql_int(want)], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
                    })?
                    .collect()
                })
                .map_err(db("reading a device feed"))?;
            let fetched = rows.len();
            for (seq, model, pk, sk, item, version, deleted) in rows {
                from = seq;
                let (Some(model), Some(version), Some(deleted)) = (model, version, deleted) else {
                    tracing::warn!(%device, seq, %pk, %sk, "feed entry without an item row: skipped");
                    continue;
                };
                // A row that cannot be decoded is reported and skipped: it must never stall
                // the device's feed.
                match row_change(model.clone(), pk.clone(), sk.clone(), item, &version, deleted) {
                    Ok(change) => changes.push((seq, change)),
                    Err(e) => {
                        tracing::warn!(%device, seq, %model, %pk, %sk, "unreadable feed row skipped: {e}");
                        unreadable.push(UnreadableRow {
                            cursor: seq,
                            model,
                            key: ItemKey { pk, sk },
                            reason: e.to_string(),
                        });
                    }
                }
            }
            if fetched < want {
                break;
            }
        }
        Ok(FeedPage {
            after,
            changes,
            head,
            resync_required: false,
            unreadable,
        })
    }

    fn read_snapshot(
        &mut self,
        schema: &Schema,
        device: &DeviceId,
        resync: u64,
        from: Option<&SnapshotCursor>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError> {
        let limit = limit.max(1);
        let tx = self
            .conn
            .transaction()
            .map_err(db("starting a snapshot read"))?;
        let head: Option<u64> = tx
            .prepare_cached("SELECT feed_head FROM devices WHERE account = ?1 AND device = ?2")
            .and_then(|mut s| {
                s.query_row(params![device.account, device.device], |r| r.get(0))
                    .optional()
            })
            .map_err(db("reading a device's feed head"))?;
        let Some(head) = head else {
            return Err(StoreError::UnknownDevice(device.to_string()));
        };
        // Models in name order (byte order, as SQLite compares text); each is owned either by the
        // device or, when broadcast, by the account.
        let mut models: Vec<(&str, bool)> = schema
            .models()
            .filter(|m| m.process().syncs_down())
            .map(|m| (m.name(), m.process().broadcast))
            .collect();
        models.sort_unstable();
        // One item more than the page, to know whether another page follows.
        let mut items: Vec<Change> = Vec::new();
        let mut unreadable = Vec::new();
        for (model, broadcast) in models {
            let owner = if broadcast {
                ""
            } else {
                device.device.as_str()
            };
            let after_key = match from {
                Some(f) if model < f.model.as_str() => continue,
                Some(f) if model == f.model => Some(&f.key),
                _ => None,
            };
            let want = sql_int(limit + 1 - items.len());
            type SnapRow = (String, String, Option<String>, String);
            let map = |r: &Row<'_>| -> rusqlite::Result<SnapRow> {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            };
            let rows: Vec<SnapRow> = match after_key {
                Some(k) => tx
                    .prepare_cached(
                        "SELECT pk, sk, item, version FROM items INDEXED BY items_by_model
                         WHERE account = ?1 AND model = ?2 AND device = ?3 AND deleted = 0 AND (pk, sk) > (?4, ?5)
                         ORDER BY pk, sk LIMIT ?6",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![device.account, model, owner, k.pk, k.sk, want], map)?.collect()
                    }),
                None => tx
                    .prepare_cached(
                        "SELECT pk, sk, item, version FROM items INDEXED BY items_by_model
                         WHERE account = ?1 AND model = ?2 AND device = ?3 AND deleted = 0
                         ORDER BY pk, sk LIMIT ?4",
                    )
                    .and_then(|mut s| s.query_map(params![device.account, model, owner, want], map)?.collect()),
            }
            .map_err(db("reading a snapshot page"))?;
            for (pk, sk, item, version) in rows {
                match row_change(model.to_string(), pk.clone(), sk.clone(), item, &version, false) {
                    Ok(change) => items.push(change),
                    Err(e) => {
                        tracing::warn!(%device, %model, %pk, %sk, "unreadable row skipped in a resync: {e}");
                        unreadable.push(UnreadableRow {
                            cursor: 0,
                            model: model.to_string(),
                            key: ItemKey { pk, sk },
                            reason: e.to_string(),
                        });
                    }
                }
            }
            if items.len() > limit {
                break;
            }
        }
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|c| SnapshotCursor {
                model: c.model.clone(),
                key: c.key.clone(),
            })
        } else {
            None
        };
        Ok(SnapshotPage {
            resync,
            items,
            next,
            cursor: head,
            unreadable,
        })
    }

    fn ack_cursor(&mut self, device: &DeviceId, cursor: u64) -> Result<(), StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE devices SET cursor_acked = max(cursor_acked, min(?3, feed_head))
                 WHERE account = ?1 AND device = ?2",
            )
            // A cursor beyond the head is not one this feed issued: it counts as the head.
            .and_then(|mut s| {
                s.execute(params![device.account, device.device, i64::try_from(cursor).unwrap_or(i64::MAX)])
            })
            .map_err(db("recording an acknowledged cursor"))?;
        if n == 0 {
            return Err(StoreError::UnknownDevice(device.to_string()));
        }
        Ok(())
    }

    fn get_item(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredItem>, StoreError> {
        let (account, device) = owner_cols(owner);
        let raw = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ITEM_COLS} FROM items WHERE account = ?1 AND device = ?2 AND pk = ?3 AND sk = ?4 AND model = ?5"
            ))
            .and_then(|mut s| s.query_row(params![account, device, key.pk, key.sk, model], RawItem::read).optional())
            .map_err(db("reading an item"))?;
        raw.map(RawItem::decode).transpose()
    }

    fn query_items(&mut self, query: &ItemQuery) -> Result<ItemPage, StoreError> {
        let limit = query.limit.clamp(1, MAX_QUERY_LIMIT);
        let mut sql = format!(
            "SELECT {ITEM_COLS} FROM items INDEXED BY items_by_model WHERE account = ? AND model = ? AND deleted = 0"
        );
        let mut args: Vec<Value> = vec![
            Value::Text(query.account.clone()),
            Value::Text(query.model.clone()),
        ];
        if let Some(device) = &query.device {
            sql.push_str(" AND device = ?");
            args.push(Value::Text(device.clone()));
        }
        if let Some(pk) = &query.pk {
            sql.push_str(" AND pk = ?");
            args.push(Value::Text(pk.clone()));
        }
        if let Some(prefix) = query.sk_prefix.as_deref().filter(|p| !p.is_empty()) {
            // A range, not LIKE: exact for any prefix, and it uses the index.
            sql.push_str(" AND sk >= ?");
            args.push(Value::Text(prefix.to_string()));
            if let Some(end) = prefix_end(prefix) {
                sql.push_str(" AND sk < ?");
                args.push(Value::Text(end));
            }
        }
        for (field, value) in &query.filters {
            if !valid_field(field) {
                return Err(StoreError::BadQuery(format!(
                    "filter field {field:?} must be a top-level field name of letters, digits and '_'"
                )));
            }
            let path = Value::Text(format!("$.\"{field}\""));
            match value {
                serde_json::Value::String(s) => {
                    sql.push_str(" AND json_type(item, ?) = 'text' AND json_extract(item, ?) = ?");
                    args.extend([path.clone(), path, Value::Text(s.clone())]);
                }
                serde_json::Value::Number(n) => {
                    let number = match (n.as_i64(), n.as_f64()) {
                        (Some(i), _) => Value::Integer(i),
                        (None, Some(f)) => Value::Real(f),
                        (None, None) => {
                            return Err(StoreError::BadQuery(format!(
                                "filter {field}: bad number {n}"
                            )))
                        }
                    };
                    sql.push_str(" AND json_type(item, ?) IN ('integer', 'real') AND json_extract(item, ?) = ?");
                    args.extend([path.clone(), path, number]);
                }
                serde_json::Value::Bool(b) => {
                    sql.push_str(" AND json_type(item, ?) = ?");
                    args.extend([
                        path,
                        Value::Text(if *b { "true" } else { "false" }.to_string()),
                    ]);
                }
                // Null matches an explicit null or an absent field.
                serde_json::Value::Null => {
                    sql.push_str(" AND coalesce(json_type(item, ?), 'null') = 'null'");
                    args.push(path);
                }
                serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                    return Err(StoreError::BadQuery(format!(
                        "filter {field}: only strings, numbers, booleans and null can be compared"
                    )));
                }
            }
        }
        if let Some(token) = &query.next {
            let (device, pk, sk) = decode_token(token)?;
            sql.push_str(" AND (device, pk, sk) > (?, ?, ?)");
            args.extend([Value::Text(device), Value::Text(pk), Value::Text(sk)]);
        }
        sql.push_str(" ORDER BY device, pk, sk LIMIT ?");
        args.push(Value::Integer(sql_int(limit + 1)));
        let raws: Vec<RawItem> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(params_from_iter(args.iter()), RawItem::read)?
                    .collect()
            })
            .map_err(db("querying items"))?;
        let more = raws.len() > limit;
        let items = raws
            .into_iter()
            .take(limit)
            .map(RawItem::decode)
            .collect::<Result<Vec<_>, _>>()?;
        let next = match items.last() {
            Some(last) if more => Some(encode_token(
                last.device.as_deref().unwrap_or(""),
                &last.pk,
                &last.sk,
            )?),
            _ => None,
        };
        Ok(ItemPage { items, next })
    }

    fn conflicts(
        &mut self,
        account: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
        type ConflictRow = (
            u64,
            u64,
            String,
            Option<String>,
            String,
            String,
            String,
            String,
            String,
            String,
            Option<String>,
        );
        let rows: Vec<ConflictRow> = self
            .conn
            .prepare_cached(
                "SELECT id, at_ms, account, device, model, pk, sk, winner, loser, lost, loser_item FROM conflicts
                 WHERE account = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![account, before, sql_int(limit)], |r| {
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
                        r.get(10)?,
                    ))
                })?
                .collect()
            })
            .map_err(db("listing conflicts"))?;
        rows.into_iter()
            .map(
                |(id, at_ms, account, device, model, pk, sk, winner, loser, lost, loser_item)| {
                    Ok(ConflictRecord {
                        id,
                        at_ms,
                        account,
                        device,
                        model,
                        pk,
                        sk,
                        winner,
                        loser,
                        lost,
                        loser_item: loser_item.as_deref().map(parse_item).transpose()?,
                    })
                },
            )
            .collect()
    }

    fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT max(v) FROM (SELECT max(version) AS v FROM items
                   UNION ALL SELECT max(purged_below) FROM watermarks)",
                [],
                |r| r.get(0),
            )
            .map_err(db("reading the highest stored version"))?;
        v.as_deref().map(parse_version).transpose()
    }

    fn purge(&mut self, now_ms: u64, retention: &Retention) -> Result<PurgeStats, StoreError> {
        let cutoff = now_ms.saturating_sub(retention.tombstone_ms);
        let tx = self.write_txn("starting a purge")?;
        let keys: Vec<(String, String, String, String)> = tx
            .prepare_cached(
                "SELECT account, device, pk, sk FROM items WHERE deleted = 1 AND updated_ms < ?1",
            )
            .and_then(|mut s| {
                s.query_map(params![cutoff], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect()
            })
            .map_err(db("finding old tombstones"))?;
        // The highest purged feed sequence per device becomes its floor.
        let mut floors: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (account, device, pk, sk) in &keys {
            let removed: Vec<(String, u64)> = if device.is_empty() {
                tx.prepare_cached(
                    "DELETE FROM feed WHERE account = ?1 AND device IN (SELECT device FROM devices WHERE account = ?1)
                       AND owner = '' AND pk = ?2 AND sk = ?3 RETURNING device, seq",
                )
                .and_then(|mut s| s.query_map(params![account, pk, sk], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            } else {
                tx.prepare_cached(
                    "DELETE FROM feed WHERE account = ?1 AND device = ?2 AND owner = ?2 AND pk = ?3 AND sk = ?4
                     RETURNING device, seq",
                )
                .and_then(|mut s| {
                    s.query_map(params![account, device, pk, sk], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
                })
            }
            .map_err(db("purging feed entries"))?;
            for (d, seq) in removed {
                let floor = floors.entry((account.clone(), d)).or_insert(0);
                *floor = (*floor).max(seq);
            }
        }
        // Each owner's watermark rises to the newest version it purges: a later write that knew
        // a purged key meets it as that tombstone (see `cloud_apply_push`).
        tx.prepare_cached(
            "INSERT INTO watermarks (account, device, purged_below)
               SELECT account, device, max(version) FROM items
               WHERE deleted = 1 AND updated_ms < ?1 GROUP BY account, device
             ON CONFLICT (account, device) DO UPDATE SET
               purged_below = max(purged_below, excluded.purged_below)",
        )
        .and_then(|mut s| s.execute(params![cutoff]))
        .map_err(db("raising purge watermarks"))?;
        let tombstones = tx
            .prepare_cached("DELETE FROM items WHERE deleted = 1 AND updated_ms < ?1")
            .and_then(|mut s| s.execute(params![cutoff]))
            .map_err(db("purging tombstones"))?;
        for ((account, device), floor) in floors {
            tx.prepare_cached("UPDATE devices SET feed_floor = max(feed_floor, ?3) WHERE account = ?1 AND device = ?2")
                .and_then(|mut s| s.execute(params![account, device, floor]))
                .map_err(db("raising a feed floor"))?;
        }
        let conflicts = tx
            .prepare_cached(
                "DELETE FROM conflicts WHERE id IN (
                    SELECT id FROM (
                        SELECT id, row_number() OVER (PARTITION BY account ORDER BY id DESC) AS n FROM conflicts
                    ) WHERE n > ?1)",
            )
            .and_then(|mut s| s.execute(params![retention.max_conflicts]))
            .map_err(db("trimming the conflict log"))?;
        tx.commit().map_err(db("committing a purge"))?;
        Ok(PurgeStats {
            tombstones: tombstones as u64,
            conflicts: conflicts as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devtables_sync::hlc::node_id_for;
    use devtables_sync::wire::{ChangeStatus, RejectReason};
    use serde_json::json;

    const NOW: u64 = 1_795_629_600_000;
    const MAX_MSG: usize = 128 * 1024;
    const DRIFT: u64 = 60_000;

    const SCHEMA: &str = r#"{
        format: 'onetable:1.1.0',
        version: '1',
        indexes: {primary: {hash: 'pk', sort: 'sk'}},
        process: {
            Up: {sync: 'up'},
            Both: {sync: 'both'},
            Down: {sync: 'down'},
            Bcast: {sync: 'down', broadcast: true},
            Shared: {sync: 'both'},
        },
        models: {
            Up: {
                pk: {type: 'string', value: 'd#${deviceId}'},
                sk: {type: 'string', value: 'x#${name}'},
                deviceId: {type: 'string', required: true},
                name: {type: 'string', required: true},
                v: {type: 'number'},
            },
            Both: {
                pk: {type: 'string', value: 'd#${deviceId}'},
                sk: {type: 'string', value: 'x#${name}'},
                deviceId: {type: 'string', required: true},
                name: {type: 'string', required: true},
                v: {type: 'number'},
            },
            Down: {
                pk: {type: 'string', value: 'd#${deviceId}'},
                sk: {type: 'string', value: 'x#${name}'},
                deviceId: {type: 'string', required: true},
                name: {type: 'string', required: true},
                v: {type: 'number'},
            },
            Bcast: {
                pk: {type: 'string', value: 'b#'},
                sk: {type: 'string', value: 'x#${name}'},
                name: {type: 'string', required: true},
                v: {type: 'number'},
            },
            // No owner field: two devices can hold the same key.
            Shared: {
                pk: {type: 'string', value: 'n#'},
                sk: {type: 'string', value: 'x#${name}'},
                name: {type: 'string', required: true},
                v: {type: 'number'},
            },
        },
    }"#;

    fn schema() -> Schema {
        Schema::from_json5(SCHEMA).unwrap()
    }

    fn dev(account: &str, device: &str) -> DeviceId {
        DeviceId::new(account, device).unwrap()
    }

    fn clock() -> HlcClock {
        HlcClock::new(node_id_for("cloud"))
    }

    fn item(schema: &Schema, model: &str, input: serde_json::Value) -> Item {
        let input = input.as_object().cloned().unwrap();
        schema
            .model(model)
            .unwrap()
            .prepare_create(&input, NOW as i64)
            .unwrap()
    }

    fn ver(wall_ms: u64, node: u64) -> Hlc {
        Hlc {
            wall_ms,
            counter: 0,
            node,
        }
    }

    fn put(schema: &Schema, model: &str, input: serde_json::Value, version: Hlc) -> Change {
        let item = item(schema, model, input);
        let key = schema.model(model).unwrap().primary_key(&item).unwrap();
        Change {
            model: model.into(),
            key,
            op: Op::Put,
            item: Some(item),
            version,
            base: None,
        }
    }

    fn store(devices: &[&DeviceId]) -> SqliteStore {
        let mut s = SqliteStore::open_in_memory().unwrap();
        for d in devices {
            s.register_device(d, "hash", NOW).unwrap();
        }
        s
    }

    fn api_put(
        s: &mut SqliteStore,
        schema: &Schema,
        clock: &mut HlcClock,
        now: u64,
        owner: &Owner,
        model: &str,
        input: serde_json::Value,
    ) -> (Change, Advanced) {
        let it = item(schema, model, input);
        s.write(schema, clock, now, MAX_MSG, owner, model, CloudOp::Put(it))
            .unwrap()
    }

    fn key(pk: &str, sk: &str) -> ItemKey {
        ItemKey {
            pk: pk.into(),
            sk: sk.into(),
        }
    }

    #[test]
    fn a_version_beyond_the_drift_bound_is_refused_and_moves_no_clock() {
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = store(&[&d1]);
        let mut c = clock();
        let ten_hours = 10 * 3_600_000;
        let ahead = put(
            &schema,
            "Both",
            json!({"deviceId": "d1", "name": "n", "v": 1}),
            ver(NOW + ten_hours, 7),
        );
        let (r, adv) = s
            .apply_push(&schema, &mut c, NOW, DRIFT, &d1, std::slice::from_ref(&ahead))
            .unwrap();
        assert_eq!(
            r[0].status,
            ChangeStatus::Rejected {
                reason: RejectReason::VersionAhead {
                    cloud_ms: NOW,
                    max_drift_ms: DRIFT
                }
            }
        );
        assert!(adv.is_empty());
        assert!(c.last().wall_ms <= NOW, "the refused version moved the cloud clock");
        assert_eq!(s.max_version().unwrap(), None, "nothing stored");
        // An API write right after is stamped on the cloud's own time.
        let (w, _) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &Owner::Device(d1.clone()),
            "Both",
            json!({"deviceId": "d1", "name": "m"}),
        );
        assert_eq!(w.version.wall_ms, NOW);
        // Exactly at the bound is accepted, and counted.
        let edge = put(
            &schema,
            "Both",
            json!({"deviceId": "d1", "name": "n", "v": 2}),
            ver(NOW + DRIFT, 7),
        );
        let (r, _) = s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[edge]).unwrap();
        assert_eq!(r[0].status, ChangeStatus::Applied);
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!((rec.changes_applied, rec.changes_rejected), (1, 1));
    }

    #[test]
    fn a_change_may_only_touch_rows_of_its_own_model() {
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = store(&[&d1]);
        let mut c = clock();
        let up = put(&schema, "Up", json!({"deviceId": "d1", "name": "n"}), ver(NOW, 7));
        s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, std::slice::from_ref(&up))
            .unwrap();
        // Both's template produces the same key as Up's: the live Up row is not Both's.
        let both = put(&schema, "Both", json!({"deviceId": "d1", "name": "n"}), ver(NOW + 1, 7));
        let mut del_both = both.clone();
        del_both.op = Op::Delete;
        del_both.item = None;
        // A delete under Up of a key only Shared's template produces.
        let shared_key = Change {
            model: "Up".into(),
            key: key("n#", "x#n"),
            op: Op::Delete,
            item: None,
            version: ver(NOW + 1, 7),
            base: None,
        };
        let (r, _) = s
            .apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[both, del_both, shared_key])
            .unwrap();
        let statuses: Vec<_> = r.into_iter().map(|r| r.status).collect();
        let wrong = ChangeStatus::Rejected {
            reason: RejectReason::WrongModel { stored: "Up".into() },
        };
        assert_eq!(
            statuses,
            vec![
                wrong.clone(),
                wrong,
                ChangeStatus::Rejected {
                    reason: RejectReason::KeyNotOfModel
                }
            ]
        );
        let row = s.get_item(&Owner::Device(d1.clone()), "Up", &up.key).unwrap().unwrap();
        assert_eq!(row.version, up.version, "the Up row is untouched");
        // The API cannot create a Both item over the Up row either.
        let it = item(&schema, "Both", json!({"deviceId": "d1", "name": "n"}));
        let e = s
            .write(&schema, &mut c, NOW, MAX_MSG, &Owner::Device(d1.clone()), "Both", CloudOp::Put(it))
            .unwrap_err();
        assert!(
            matches!(&e, CloudWriteError::WrongModel { stored, .. } if stored == "Up"),
            "{e}"
        );
        let e = s
            .write(
                &schema,
                &mut c,
                NOW,
                MAX_MSG,
                &Owner::Device(d1.clone()),
                "Both",
                CloudOp::Delete(key("n#", "x#n")),
            )
            .unwrap_err();
        assert!(matches!(e, CloudWriteError::KeyNotOfModel { .. }), "{e}");
        assert_eq!(s.device(&d1).unwrap().unwrap().changes_rejected, 3);
    }

    #[test]
    fn a_write_that_knew_a_purged_key_meets_the_watermark() {
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = store(&[&d1]);
        let mut c = clock();
        let owner = Owner::Device(d1.clone());
        // The device created the item, the cloud deleted it later, retention purged the delete.
        let v1 = put(&schema, "Both", json!({"deviceId": "d1", "name": "n", "v": 1}), ver(NOW, 7));
        s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, std::slice::from_ref(&v1))
            .unwrap();
        let (del, _) = s
            .write(&schema, &mut c, NOW + 100, MAX_MSG, &owner, "Both", CloudOp::Delete(v1.key.clone()))
            .unwrap();
        let later = NOW + 1000;
        let stats = s
            .purge(
                later,
                &Retention {
                    tombstone_ms: 10,
                    max_conflicts: 100,
                },
            )
            .unwrap();
        assert_eq!(stats.tombstones, 1);
        assert_eq!(s.get_item(&owner, "Both", &v1.key).unwrap(), None, "purged");
        // The offline device's pending edit, older than the delete, must not resurrect it.
        let mut v2 = put(&schema, "Both", json!({"deviceId": "d1", "name": "n", "v": 2}), ver(NOW + 50, 7));
        v2.base = Some(v1.version);
        let (r, _) = s
            .apply_push(&schema, &mut c, later, DRIFT, &d1, std::slice::from_ref(&v2))
            .unwrap();
        assert_eq!(r[0].status, ChangeStatus::Stale { winner: del.version });
        // The delete that won is back in the feed, so the device converges.
        let head = s.device(&d1).unwrap().unwrap().feed_head;
        let page = s.read_feed(&d1, head - 1, 10).unwrap();
        assert_eq!(page.changes.len(), 1);
        assert_eq!((page.changes[0].1.op, page.changes[0].1.version), (Op::Delete, del.version));
        assert_eq!(s.conflicts("a", None, 10).unwrap().len(), 1, "the lost edit is logged");
        // A create (no base) of a new key is not affected by the watermark.
        let fresh = put(&schema, "Both", json!({"deviceId": "d1", "name": "new"}), ver(NOW + 60, 7));
        let (r, _) = s.apply_push(&schema, &mut c, later, DRIFT, &d1, &[fresh]).unwrap();
        assert_eq!(r[0].status, ChangeStatus::Applied);
        // An edit newer than the delete wins, as it would against the tombstone.
        let mut v3 = put(&schema, "Both", json!({"deviceId": "d1", "name": "n", "v": 3}), ver(NOW + 200, 7));
        v3.base = Some(v1.version);
        let (r, _) = s.apply_push(&schema, &mut c, later, DRIFT, &d1, &[v3]).unwrap();
        assert_eq!(r[0].status, ChangeStatus::Applied);
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!((rec.changes_applied, rec.changes_superseded), (3, 1));
    }

    #[test]
    fn a_restored_devices_losing_write_is_logged_but_a_late_duplicate_is_not() {
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = store(&[&d1]);
        let mut c = clock();
        let v1 = put(&schema, "Both", json!({"deviceId": "d1", "name": "n", "v": 1}), ver(NOW + 1, 7));
        let mut v2 = put(&schema, "Both", json!({"deviceId": "d1", "name": "n", "v": 2}), ver(NOW + 2, 7));
        v2.base = Some(v1.version);
        s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[v1.clone(), v2.clone()])
            .unwrap();
        // The network delivers the first write again: it lost to its own successor, no conflict.
        let (r, _) = s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, std::slice::from_ref(&v1)).unwrap();
        assert_eq!(r[0].status, ChangeStatus::Stale { winner: v2.version });
        assert!(s.conflicts("a", None, 10).unwrap().is_empty());
        // The device is restored from a backup taken before it ever synced the key, and writes
        // it again with a clock behind its lost writes: it loses, and the regression is logged.
        let v2b = put(&schema, "Both", json!({"deviceId": "d1", "name": "n", "v": 9}), Hlc {
            wall_ms: NOW + 1,
            counter: 5,
            node: 7,
        });
        let (r, _) = s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[v2b]).unwrap();
        assert_eq!(r[0].status, ChangeStatus::Stale { winner: v2.version });
        let log = s.conflicts("a", None, 10).unwrap();
        assert_eq!(log.len(), 1, "{log:?}");
        assert_eq!(log[0].lost, "incoming");
    }

    #[test]
    fn push_is_idempotent_and_stale_writes_lose_with_a_conflict() {
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = store(&[&d1]);
        let mut c = clock();
        let v2 = put(
            &schema,
            "Both",
            json!({"deviceId": "d1", "name": "n", "v": 2}),
            ver(NOW + 2, 7),
        );
        let (r, adv) = s
            .apply_push(&schema, &mut c, NOW, DRIFT, &d1, std::slice::from_ref(&v2))
            .unwrap();
        assert_eq!(r[0].status, ChangeStatus::Applied);
        assert_eq!(adv, vec![(d1.clone(), 2)]);
        let (r, adv) = s
            .apply_push(&schema, &mut c, NOW, DRIFT, &d1, std::slice::from_ref(&v2))
            .unwrap();
        assert_eq!(r[0].status, ChangeStatus::Applied);
        assert!(adv.is_empty(), "a replay writes nothing");
        assert!(s.conflicts("a", None, 10).unwrap().is_empty());

        let v1 = put(
            &schema,
            "Both",
            json!({"deviceId": "d1", "name": "n", "v": 1}),
            ver(NOW + 1, 8),
        );
        let (r, _) = s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[v1]).unwrap();
        assert_eq!(r[0].status, ChangeStatus::Stale { winner: v2.version });
        let stored = s
            .get_item(&Owner::Device(d1.clone()), "Both", &v2.key)
            .unwrap()
            .unwrap();
        assert_eq!(
            (stored.item.as_ref().unwrap()["v"].clone(), stored.version),
            (json!(2), v2.version)
        );
        let log = s.conflicts("a", None, 10).unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(
            (
                log[0].lost.as_str(),
                log[0].winner.clone(),
                log[0].loser.clone(),
                log[0].device.as_deref()
            ),
            (
                "incoming",
                hlc_to_string(ver(NOW + 2, 7)),
                hlc_to_string(ver(NOW + 1, 8)),
                Some("d1")
            )
        );
        assert_eq!(log[0].loser_item.as_ref().unwrap()["v"], json!(1));

        // A newer write from another node that did not see v2: the stored item loses, logged.
        let v3 = put(
            &schema,
            "Both",
            json!({"deviceId": "d1", "name": "n", "v": 3}),
            ver(NOW + 3, 9),
        );
        let (r, _) = s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[v3]).unwrap();
        assert_eq!(r[0].status, ChangeStatus::Applied);
        let log = s.conflicts("a", None, 10).unwrap();
        assert_eq!(log.len(), 2);
        assert!(log[0].id > log[1].id, "newest first");
        assert_eq!(log[0].lost, "stored");
        assert_eq!(log[0].loser_item.as_ref().unwrap()["v"], json!(2));
        assert_eq!(
            s.conflicts("a", Some(log[0].id), 10).unwrap(),
            vec![log[1].clone()]
        );
        assert!(s.conflicts("b", None, 10).unwrap().is_empty());
    }

    #[test]
    fn push_naming_another_device_is_rejected_and_not_stored() {
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = store(&[&d1, &dev("a", "d2")]);
        let ch = put(
            &schema,
            "Up",
            json!({"deviceId": "d2", "name": "n"}),
            ver(NOW, 7),
        );
        let (r, adv) = s
            .apply_push(&schema, &mut clock(), NOW, DRIFT, &d1, std::slice::from_ref(&ch))
            .unwrap();
        assert_eq!(
            r[0].status,
            ChangeStatus::Rejected {
                reason: RejectReason::Ownership
            }
        );
        assert!(adv.is_empty());
        for owner in [Owner::Device(d1.clone()), Owner::Device(dev("a", "d2"))] {
            assert_eq!(s.get_item(&owner, "Up", &ch.key).unwrap(), None);
        }
        let q = ItemQuery {
            account: "a".into(),
            model: "Up".into(),
            limit: 10,
            ..Default::default()
        };
        assert!(s.query_items(&q).unwrap().items.is_empty());
    }

    #[test]
    fn push_from_an_unregistered_device_fails_whole() {
        let schema = schema();
        let mut s = store(&[]);
        let ch = put(
            &schema,
            "Both",
            json!({"deviceId": "d1", "name": "n"}),
            ver(NOW, 7),
        );
        let err = s
            .apply_push(
                &schema,
                &mut clock(),
                NOW,
                DRIFT,
                &dev("a", "d1"),
                std::slice::from_ref(&ch),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::UnknownDevice(_)), "{err}");
        assert_eq!(
            s.get_item(&Owner::Device(dev("a", "d1")), "Both", &ch.key)
                .unwrap(),
            None,
            "rolled back"
        );
    }

    #[test]
    fn two_devices_writing_one_key_get_separate_rows() {
        let schema = schema();
        let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
        let mut s = store(&[&d1, &d2]);
        let mut c = clock();
        let c1 = put(
            &schema,
            "Shared",
            json!({"name": "k", "v": 1}),
            ver(NOW + 5, 1),
        );
        let c2 = put(
            &schema,
            "Shared",
            json!({"name": "k", "v": 2}),
            ver(NOW + 1, 2),
        );
        assert_eq!(c1.key, c2.key);
        let (r1, a1) = s
            .apply_push(&schema, &mut c, NOW, DRIFT, &d1, std::slice::from_ref(&c1))
            .unwrap();
        let (r2, a2) = s
            .apply_push(&schema, &mut c, NOW, DRIFT, &d2, std::slice::from_ref(&c2))
            .unwrap();
        assert_eq!(
            (r1[0].status.clone(), r2[0].status.clone()),
            (ChangeStatus::Applied, ChangeStatus::Applied)
        );
        assert_eq!((a1, a2), (vec![(d1.clone(), 2)], vec![(d2.clone(), 2)]));
        let q = ItemQuery {
            account: "a".into(),
            model: "Shared".into(),
            limit: 10,
            ..Default::default()
        };
        let page = s.query_items(&q).unwrap();
        let got: Vec<(Option<&str>, serde_json::Value)> = page
            .items
            .iter()
            .map(|i| (i.device.as_deref(), i.item.as_ref().unwrap()["v"].clone()))
            .collect();
        assert_eq!(got, vec![(Some("d1"), json!(1)), (Some("d2"), json!(2))]);
        assert!(s.conflicts("a", None, 10).unwrap().is_empty());
        // Each device's feed holds only its own row.
        let f2 = s.read_feed(&d2, 1, 10).unwrap();
        assert_eq!(f2.changes.len(), 1);
        assert_eq!(f2.changes[0].1.item.as_ref().unwrap()["v"], json!(2));
    }

    #[test]
    fn api_write_advances_the_feed_and_coalesces() {
        let schema = schema();
        let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
        let mut s = store(&[&d1, &d2]);
        let mut c = clock();
        let owner = Owner::Device(d1.clone());
        let (ch, adv) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &owner,
            "Down",
            json!({"deviceId": "d1", "name": "x", "v": 1}),
        );
        assert_eq!(adv, vec![(d1.clone(), 2)]);
        let page = s.read_feed(&d1, 1, 10).unwrap();
        assert_eq!((page.head, page.resync_required), (2, false));
        assert_eq!(
            page.changes,
            vec![(
                2,
                Change {
                    base: None,
                    ..ch.clone()
                }
            )]
        );
        assert_eq!(s.read_feed(&d2, 1, 10).unwrap().changes, vec![]);
        assert_eq!(s.device(&d1).unwrap().unwrap().feed_head, 2);
        assert_eq!(s.device(&d2).unwrap().unwrap().feed_head, 1);

        // A second write of the key replaces its entry: one entry, at the new sequence.
        let (ch2, adv) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &owner,
            "Down",
            json!({"deviceId": "d1", "name": "x", "v": 2}),
        );
        assert_eq!(adv, vec![(d1.clone(), 3)]);
        assert_eq!(ch2.base, Some(ch.version));
        assert!(ch2.version > ch.version);
        let page = s.read_feed(&d1, 1, 10).unwrap();
        assert_eq!(page.head, 3);
        assert_eq!(page.changes.len(), 1);
        assert_eq!(page.changes[0].0, 3);
        assert_eq!(page.changes[0].1.item.as_ref().unwrap()["v"], json!(2));
        assert_eq!(page.changes[0].1.version, ch2.version);
        assert_eq!(page.changes[0].1.base, None);
        assert!(s.read_feed(&d1, 3, 10).unwrap().changes.is_empty());
        // An API overwrite of its own prior write is no conflict.
        assert!(s.conflicts("a", None, 10).unwrap().is_empty());
    }

    #[test]
    fn feed_pages_respect_the_limit() {
        let schema = schema();
        let d1 = dev("a", "d1");
        let mut s = store(&[&d1]);
        let mut c = clock();
        let owner = Owner::Device(d1.clone());
        for i in 0..5 {
            api_put(
                &mut s,
                &schema,
                &mut c,
                NOW + i,
                &owner,
                "Down",
                json!({"deviceId": "d1", "name": format!("n{i}")}),
            );
        }
        let p = s.read_feed(&d1, 1, 2).unwrap();
        assert_eq!(
            p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let p = s.read_feed(&d1, 3, 2).unwrap();
        assert_eq!(
            p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            vec![4, 5]
        );
        let p = s.read_feed(&d1, 5, 2).unwrap();
        assert_eq!(
            (
                p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
                p.head
            ),
            (vec![6], 6)
        );

        // An entry whose row vanished (manual SQL) is skipped without shortening the page.
        s.conn
            .execute("DELETE FROM items WHERE sk = 'x#n1'", [])
            .unwrap();
        let p = s.read_feed(&d1, 1, 2).unwrap();
        assert_eq!(
            p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            vec![2, 4]
        );
        assert!(matches!(
            s.read_feed(&dev("a", "nope"), 0, 2),
            Err(StoreError::UnknownDevice(_))
        ));
    }

    #[test]
    fn new_device_starts_with_a_resync() {
        let d1 = dev("a", "d1");
        let mut s = store(&[&d1]);
        let p = s.read_feed(&d1, 0, 10).unwrap();
        assert!(p.resync_required);
        let p = s.read_feed(&d1, 1, 10).unwrap();
        assert!(!p.resync_required && p.changes.is_empty() && p.head == 1);
    }

    #[test]
    fn broadcast_write_fans_out_to_the_account_only() {
        let schema = schema();
        let (d1, d2, d3) = (dev("a", "d1"), dev("a", "d2"), dev("b", "d3"));
        let mut s = store(&[&d1, &d2, &d3]);
        let mut c = clock();
        let (ch, adv) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &Owner::Account("a".into()),
            "Bcast",
            json!({"name": "fw", "v": 1}),
        );
        assert_eq!(adv, vec![(d1.clone(), 2), (d2.clone(), 2)]);
        for d in [&d1, &d2] {
            let p = s.read_feed(d, 1, 10).unwrap();
            assert_eq!(p.changes.len(), 1);
            assert_eq!(p.changes[0].1.key, ch.key);
        }
        assert!(s.read_feed(&d3, 1, 10).unwrap().changes.is_empty());
        let q = ItemQuery {
            account: "a".into(),
            model: "Bcast".into(),
            limit: 10,
            ..Default::default()
        };
        let page = s.query_items(&q).unwrap();
        assert_eq!(page.items.len(), 1, "one row for the whole account");
        assert_eq!(page.items[0].device, None);
        // A broadcast model needs an account owner, and the device model a device owner.
        let err = s
            .write(
                &schema,
                &mut c,
                NOW,
                MAX_MSG,
                &Owner::Device(d1.clone()),
                "Bcast",
                CloudOp::Put(item(&schema, "Bcast", json!({"name": "x"}))),
            )
            .unwrap_err();
        assert!(matches!(err, CloudWriteError::WrongOwner { .. }), "{err}");
        // A push of a broadcast model is refused.
        let ch = put(&schema, "Bcast", json!({"name": "x"}), ver(NOW, 7));
        let (r, _) = s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[ch]).unwrap();
        assert_eq!(
            r[0].status,
            ChangeStatus::Rejected {
                reason: RejectReason::NotSyncedUp
            }
        );
    }

    #[test]
    fn delete_then_purge_raises_the_floor() {
        let schema = schema();
        let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
        let mut s = store(&[&d1, &d2]);
        let mut c = clock();
        let owner = Owner::Device(d1.clone());
        let (ch, _) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &owner,
            "Down",
            json!({"deviceId": "d1", "name": "x"}),
        );
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &owner,
            "Down",
            json!({"deviceId": "d1", "name": "keep"}),
        );
        let (bc, _) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &Owner::Account("a".into()),
            "Bcast",
            json!({"name": "fw"}),
        );
        let (del, adv) = s
            .write(
                &schema,
                &mut c,
                NOW + 10,
                MAX_MSG,
                &owner,
                "Down",
                CloudOp::Delete(ch.key.clone()),
            )
            .unwrap();
        assert_eq!(adv, vec![(d1.clone(), 5)]);
        assert_eq!((del.op, del.item.clone()), (Op::Delete, None));
        let p = s.read_feed(&d1, 1, 10).unwrap();
        assert_eq!(
            p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(
            p.changes[2].1,
            Change {
                model: "Down".into(),
                key: ch.key.clone(),
                op: Op::Delete,
                item: None,
                version: del.version,
                base: None
            }
        );
        let stored = s.get_item(&owner, "Down", &ch.key).unwrap().unwrap();
        assert_eq!((stored.item, stored.version), (None, del.version));
        let (bdel, _) = s
            .write(
                &schema,
                &mut c,
                NOW + 20,
                MAX_MSG,
                &Owner::Account("a".into()),
                "Bcast",
                CloudOp::Delete(bc.key.clone()),
            )
            .unwrap();
        assert_eq!(bdel.op, Op::Delete);

        let retention = Retention {
            tombstone_ms: 1000,
            max_conflicts: 100,
        };
        // Too young: nothing purged.
        assert_eq!(
            s.purge(NOW + 500, &retention).unwrap(),
            PurgeStats::default()
        );
        let stats = s.purge(NOW + 100_000, &retention).unwrap();
        assert_eq!(
            stats,
            PurgeStats {
                tombstones: 2,
                conflicts: 0
            }
        );
        assert_eq!(s.get_item(&owner, "Down", &ch.key).unwrap(), None);
        // d1: feed 3 = keep, 5 = delete x, 6 = delete fw; d2: 2 = fw put -> 3 = fw delete.
        assert!(s.read_feed(&d1, 5, 10).unwrap().resync_required);
        assert!(s.read_feed(&d1, 1, 10).unwrap().resync_required);
        let p = s.read_feed(&d1, 6, 10).unwrap();
        assert!(!p.resync_required && p.changes.is_empty() && p.head == 6);
        assert!(s.read_feed(&d2, 2, 10).unwrap().resync_required);
        assert!(!s.read_feed(&d2, 3, 10).unwrap().resync_required);
        let n: i64 = s
            .conn
            .query_row("SELECT count(*) FROM feed WHERE account = 'a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1, "only the live item's entry is left");
    }

    #[test]
    fn purge_trims_the_conflict_log_per_account() {
        let schema = schema();
        let (d1, e1) = (dev("a", "d1"), dev("b", "e1"));
        let mut s = store(&[&d1, &e1]);
        let mut c = clock();
        for (d, n) in [(&d1, 4u64), (&e1, 2)] {
            for i in 0..=n {
                let ch = put(
                    &schema,
                    "Both",
                    json!({"deviceId": d.device, "name": "k", "v": i}),
                    ver(NOW + i, 100 + i),
                );
                s.apply_push(&schema, &mut c, NOW, DRIFT, d, &[ch]).unwrap();
            }
        }
        assert_eq!(s.conflicts("a", None, 100).unwrap().len(), 4);
        assert_eq!(s.conflicts("b", None, 100).unwrap().len(), 2);
        let stats = s
            .purge(
                NOW,
                &Retention {
                    tombstone_ms: 1000,
                    max_conflicts: 3,
                },
            )
            .unwrap();
        assert_eq!(
            stats,
            PurgeStats {
                tombstones: 0,
                conflicts: 1
            }
        );
        let a = s.conflicts("a", None, 100).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(
            a[0].winner,
            hlc_to_string(ver(NOW + 4, 104)),
            "the newest are kept"
        );
        assert_eq!(s.conflicts("b", None, 100).unwrap().len(), 2);
    }

    #[test]
    fn snapshot_pages_return_every_down_item_once() {
        let schema = schema();
        let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
        let mut s = store(&[&d1, &d2]);
        let mut c = clock();
        let o1 = Owner::Device(d1.clone());
        let o2 = Owner::Device(d2.clone());
        let mut expected = Vec::new();
        for i in 0..3 {
            expected.push(
                api_put(
                    &mut s,
                    &schema,
                    &mut c,
                    NOW,
                    &o1,
                    "Down",
                    json!({"deviceId": "d1", "name": format!("d{i}")}),
                )
                .0,
            );
            expected.push(
                api_put(
                    &mut s,
                    &schema,
                    &mut c,
                    NOW,
                    &o1,
                    "Both",
                    json!({"deviceId": "d1", "name": format!("b{i}")}),
                )
                .0,
            );
            expected.push(
                api_put(
                    &mut s,
                    &schema,
                    &mut c,
                    NOW,
                    &Owner::Account("a".into()),
                    "Bcast",
                    json!({"name": format!("f{i}")}),
                )
                .0,
            );
            // Another device's items and up-only items are not part of d1's snapshot.
            api_put(
                &mut s,
                &schema,
                &mut c,
                NOW,
                &o2,
                "Down",
                json!({"deviceId": "d2", "name": format!("o{i}")}),
            );
            let up = put(
                &schema,
                "Up",
                json!({"deviceId": "d1", "name": format!("u{i}")}),
                ver(NOW, 7),
            );
            s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[up]).unwrap();
        }
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &Owner::Account("b".into()),
            "Bcast",
            json!({"name": "other"}),
        );
        // A deleted item is not in a snapshot.
        let (gone, _) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &o1,
            "Down",
            json!({"deviceId": "d1", "name": "gone"}),
        );
        s.write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &o1,
            "Down",
            CloudOp::Delete(gone.key),
        )
        .unwrap();
        let head = s.device(&d1).unwrap().unwrap().feed_head;

        for limit in [1, 2, 4, 9, 100] {
            let mut got: Vec<Change> = Vec::new();
            let mut from: Option<SnapshotCursor> = None;
            let mut pages = 0;
            loop {
                let page = s
                    .read_snapshot(&schema, &d1, 42, from.as_ref(), limit)
                    .unwrap();
                assert_eq!((page.resync, page.cursor), (42, head));
                assert!(page.items.len() <= limit);
                pages += 1;
                got.extend(page.items);
                match page.next {
                    Some(n) => from = Some(n),
                    None => break,
                }
            }
            assert_eq!(pages, expected.len().div_ceil(limit), "limit {limit}");
            let mut want: Vec<Change> = expected
                .iter()
                .map(|c| Change {
                    base: None,
                    ..c.clone()
                })
                .collect();
            want.sort_by(|a, b| (&a.model, &a.key).cmp(&(&b.model, &b.key)));
            assert_eq!(got, want, "limit {limit}");
        }
    }

    fn query(model: &str) -> ItemQuery {
        ItemQuery {
            account: "a".into(),
            model: model.into(),
            limit: 100,
            ..Default::default()
        }
    }

    fn sks(page: &ItemPage) -> Vec<String> {
        page.items.iter().map(|i| i.sk.clone()).collect()
    }

    #[test]
    fn query_items_filters_and_pages() {
        let schema = schema();
        let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
        let mut s = store(&[&d1, &d2]);
        let mut c = clock();
        let o1 = Owner::Device(d1.clone());
        for (name, v) in [
            ("a%b", 1.0),
            ("a%bc", 2.0),
            ("a_b", 3.0),
            ("axb", 3.5),
            ("ab", 4.0),
            ("b", 3.0),
        ] {
            api_put(
                &mut s,
                &schema,
                &mut c,
                NOW,
                &o1,
                "Down",
                json!({"deviceId": "d1", "name": name, "v": v}),
            );
        }
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &Owner::Device(d2.clone()),
            "Down",
            json!({"deviceId": "d2", "name": "a%b", "v": 3}),
        );
        let up = put(
            &schema,
            "Up",
            json!({"deviceId": "d1", "name": "a%b", "v": 3}),
            ver(NOW, 7),
        );
        s.apply_push(&schema, &mut c, NOW, DRIFT, &d1, &[up]).unwrap();

        let all = s.query_items(&query("Down")).unwrap();
        assert_eq!(all.items.len(), 7);
        assert_eq!(all.next, None);
        let devices: Vec<Option<&str>> = all.items.iter().map(|i| i.device.as_deref()).collect();
        assert_eq!(devices.iter().filter(|d| **d == Some("d2")).count(), 1);
        assert_eq!(devices.last(), Some(&Some("d2")), "ordered by device");

        let q = ItemQuery {
            device: Some("d1".into()),
            ..query("Down")
        };
        assert_eq!(s.query_items(&q).unwrap().items.len(), 6);
        let q = ItemQuery {
            pk: Some("d#d2".into()),
            ..query("Down")
        };
        assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a%b"]);
        let q = ItemQuery {
            device: Some("d1".into()),
            sk_prefix: Some("x#a%".into()),
            ..query("Down")
        };
        assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a%b", "x#a%bc"]);
        let q = ItemQuery {
            device: Some("d1".into()),
            sk_prefix: Some("x#a_".into()),
            ..query("Down")
        };
        assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a_b"]);
        let q = ItemQuery {
            device: Some("d1".into()),
            sk_prefix: Some("x#a".into()),
            ..query("Down")
        };
        assert_eq!(sks(&s.query_items(&q).unwrap()).len(), 5);

        // Field equality: numbers compare numerically, strings as strings.
        let q = ItemQuery {
            device: Some("d1".into()),
            filters: vec![("v".into(), json!(3))],
            ..query("Down")
        };
        assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a_b", "x#b"]);
        let q = ItemQuery {
            filters: vec![("v".into(), json!(3.5))],
            ..query("Down")
        };
        assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#axb"]);
        let q = ItemQuery {
            filters: vec![("name".into(), json!("a_b"))],
            ..query("Down")
        };
        assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a_b"]);
        let q = ItemQuery {
            filters: vec![("v".into(), json!("3"))],
            ..query("Down")
        };
        assert!(
            s.query_items(&q).unwrap().items.is_empty(),
            "the string \"3\" is not the number 3"
        );
        let q = ItemQuery {
            filters: vec![("name".into(), json!("a%b")), ("v".into(), json!(3))],
            ..query("Down")
        };
        assert_eq!(s.query_items(&q).unwrap().items.len(), 1);
        let q = ItemQuery {
            filters: vec![("missing".into(), serde_json::Value::Null)],
            ..query("Down")
        };
        assert_eq!(s.query_items(&q).unwrap().items.len(), 7);
        for bad in ["na me", "a.b", "x\"", ""] {
            let q = ItemQuery {
                filters: vec![(bad.into(), json!(1))],
                ..query("Down")
            };
            assert!(
                matches!(s.query_items(&q), Err(StoreError::BadQuery(_))),
                "{bad:?}"
            );
        }
        let q = ItemQuery {
            filters: vec![("v".into(), json!([1]))],
            ..query("Down")
        };
        assert!(matches!(s.query_items(&q), Err(StoreError::BadQuery(_))));

        // Pagination: every item once, in order.
        let mut q = ItemQuery {
            limit: 3,
            ..query("Down")
        };
        let mut seen = Vec::new();
        loop {
            let page = s.query_items(&q).unwrap();
            assert!(page.items.len() <= 3);
            seen.extend(page.items.into_iter().map(|i| (i.device, i.pk, i.sk)));
            match page.next {
                Some(n) => q.next = Some(n),
                None => break,
            }
        }
        let want: Vec<_> = all
            .items
            .iter()
            .map(|i| (i.device.clone(), i.pk.clone(), i.sk.clone()))
            .collect();
        assert_eq!(seen, want);
        for bad in ["zz", "00", &hex::encode("[1,2]")] {
            let q = ItemQuery {
                next: Some(bad.to_string()),
                ..query("Down")
            };
            assert!(
                matches!(s.query_items(&q), Err(StoreError::BadQuery(_))),
                "{bad}"
            );
        }
        // Broadcast rows are found with device None and paged with the '' device.
        let ab = Owner::Account("a".into());
        for n in ["p", "q"] {
            api_put(
                &mut s,
                &schema,
                &mut c,
                NOW,
                &ab,
                "Bcast",
                json!({"name": n}),
            );
        }
        let page = s
            .query_items(&ItemQuery {
                limit: 1,
                ..query("Bcast")
            })
            .unwrap();
        let page2 = s
            .query_items(&ItemQuery {
                limit: 1,
                next: page.next.clone(),
                ..query("Bcast")
            })
            .unwrap();
        assert_eq!(
            (sks(&page), sks(&page2), page2.next),
            (vec!["x#p".to_string()], vec!["x#q".to_string()], None)
        );
    }

    #[test]
    fn prefix_end_bounds_every_prefix() {
        assert_eq!(prefix_end("ab"), Some("ac".into()));
        assert_eq!(prefix_end("a\u{10FFFF}"), Some("b".into()));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{D7FF}"), Some("a\u{E000}".into()));
        for (p, s) in [("a", "a\u{10FFFF}z"), ("x#", "x#\u{10FFFF}\u{10FFFF}")] {
            let end = prefix_end(p).unwrap();
            assert!(s.starts_with(p) && s >= p && s < end.as_str());
        }
    }

    #[test]
    fn api_write_errors() {
        let schema = schema();
        let d1 = dev("a", "d1");
        let mut s = store(&[&d1]);
        let mut c = clock();
        let o1 = Owner::Device(d1.clone());
        let err = s
            .write(
                &schema,
                &mut c,
                NOW,
                MAX_MSG,
                &o1,
                "Up",
                CloudOp::Put(item(&schema, "Up", json!({"deviceId": "d1", "name": "n"}))),
            )
            .unwrap_err();
        assert!(matches!(err, CloudWriteError::UpOnly(_)), "{err}");
        let err = s
            .write(
                &schema,
                &mut c,
                NOW,
                MAX_MSG,
                &o1,
                "Down",
                CloudOp::Put(item(
                    &schema,
                    "Down",
                    json!({"deviceId": "d9", "name": "n"}),
                )),
            )
            .unwrap_err();
        assert!(matches!(err, CloudWriteError::Ownership(_)), "{err}");
        let ghost = Owner::Device(dev("a", "ghost"));
        let err = s
            .write(
                &schema,
                &mut c,
                NOW,
                MAX_MSG,
                &ghost,
                "Down",
                CloudOp::Put(item(
                    &schema,
                    "Down",
                    json!({"deviceId": "ghost", "name": "n"}),
                )),
            )
            .unwrap_err();
        assert!(
            matches!(err, CloudWriteError::Store(StoreError::UnknownDevice(_))),
            "{err}"
        );
        let err = s
            .write(
                &schema,
                &mut c,
                NOW,
                100,
                &o1,
                "Down",
                CloudOp::Put(item(
                    &schema,
                    "Down",
                    json!({"deviceId": "d1", "name": "n"}),
                )),
            )
            .unwrap_err();
        assert!(matches!(err, CloudWriteError::TooLarge { .. }), "{err}");
        let n: i64 = s
            .conn
            .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        assert_eq!(s.device(&d1).unwrap().unwrap().feed_head, 1);
    }

    #[test]
    fn devices_register_status_and_ack() {
        let (d1, d2, e1) = (dev("a", "d1"), dev("a", "d2"), dev("b", "e1"));
        let mut s = store(&[&d2, &e1, &d1]);
        assert!(matches!(
            s.register_device(&d1, "x", NOW),
            Err(StoreError::DeviceExists(_))
        ));
        let r = s.device(&d1).unwrap().unwrap();
        assert_eq!(
            (
                r.secret_hash.as_str(),
                r.registered_ms,
                r.online,
                r.cursor_acked
            ),
            ("hash", NOW, false, 0)
        );
        assert_eq!(s.device(&dev("a", "zz")).unwrap(), None);

        let names = |v: Vec<DeviceRecord>| {
            v.into_iter()
                .map(|r| format!("{}/{}", r.account, r.device))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(s.devices(None, None, 10).unwrap()),
            ["a/d1", "a/d2", "b/e1"]
        );
        assert_eq!(
            names(s.devices(Some("a"), None, 10).unwrap()),
            ["a/d1", "a/d2"]
        );
        assert_eq!(names(s.devices(None, Some(&d1), 1).unwrap()), ["a/d2"]);
        assert_eq!(
            names(s.devices(Some("a"), Some(&d2), 10).unwrap()),
            Vec::<String>::new()
        );

        let up = StatusUpdate {
            online: Some(true),
            last_seen_ms: Some(NOW + 1),
            schema_version: Some("1".into()),
            pending: Some(4),
            last_error: Some(Some("boom".into())),
            ..Default::default()
        };
        s.update_status(&d1, &up).unwrap();
        s.update_status(
            &d1,
            &StatusUpdate {
                last_seen_ms: Some(NOW + 2),
                ..Default::default()
            },
        )
        .unwrap();
        let r = s.device(&d1).unwrap().unwrap();
        assert_eq!(
            (
                r.online,
                r.last_seen_ms,
                r.schema_version.as_deref(),
                r.pending,
                r.last_error.as_deref()
            ),
            (true, Some(NOW + 2), Some("1"), 4, Some("boom"))
        );
        s.update_status(
            &d1,
            &StatusUpdate {
                last_error: Some(None),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(s.device(&d1).unwrap().unwrap().last_error, None);
        assert!(matches!(
            s.update_status(&dev("a", "zz"), &up),
            Err(StoreError::UnknownDevice(_))
        ));
        s.reset_online().unwrap();
        assert!(!s.device(&d1).unwrap().unwrap().online);

        s.conn
            .execute("UPDATE devices SET feed_head = 8", [])
            .unwrap();
        s.ack_cursor(&d1, 5).unwrap();
        s.ack_cursor(&d1, 3).unwrap();
        assert_eq!(s.device(&d1).unwrap().unwrap().cursor_acked, 5);
        s.ack_cursor(&d1, 7).unwrap();
        assert_eq!(s.device(&d1).unwrap().unwrap().cursor_acked, 7);
        // A cursor the feed never issued (hostile, or a cloud restored from a backup) counts
        // as the head.
        s.ack_cursor(&d1, u64::MAX).unwrap();
        assert_eq!(s.device(&d1).unwrap().unwrap().cursor_acked, 8);
        assert!(matches!(
            s.ack_cursor(&dev("a", "zz"), 1),
            Err(StoreError::UnknownDevice(_))
        ));
    }

    #[test]
    fn file_store_reopens_intact_and_refuses_newer_layouts() {
        let schema = schema();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let d1 = dev("a", "d1");
        let ch = {
            let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
            let mode: String = s
                .conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            s.register_device(&d1, "h", NOW).unwrap();
            api_put(
                &mut s,
                &schema,
                &mut clock(),
                NOW,
                &Owner::Device(d1.clone()),
                "Down",
                json!({"deviceId": "d1", "name": "n", "v": 1}),
            )
            .0
        };
        let mut s = SqliteStore::open(
            &path,
            SqliteOptions {
                synchronous_full: false,
                busy_timeout_ms: 100,
            },
        )
        .unwrap();
        assert_eq!(s.device(&d1).unwrap().unwrap().feed_head, 2);
        let got = s
            .get_item(&Owner::Device(d1.clone()), "Down", &ch.key)
            .unwrap()
            .unwrap();
        assert_eq!((got.item, got.version), (ch.item.clone(), ch.version));
        assert_eq!(s.read_feed(&d1, 1, 10).unwrap().changes.len(), 1);
        assert_eq!(
            s.get_item(&Owner::Device(d1.clone()), "Both", &key("d#d1", "x#n"))
                .unwrap(),
            None,
            "other model"
        );
        drop(s);

        let raw = Connection::open(&path).unwrap();
        raw.execute(
            "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
        drop(raw);
        let err = SqliteStore::open(&path, SqliteOptions::default())
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::Database(m) if m.contains("version 3")),
            "{err}"
        );
    }

    #[test]
    fn a_layout_1_file_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO meta VALUES ('schema_version', '1');
             CREATE TABLE devices (account TEXT NOT NULL, device TEXT NOT NULL, secret_hash TEXT NOT NULL,
                registered_ms INTEGER NOT NULL, online INTEGER NOT NULL DEFAULT 0, last_seen_ms INTEGER,
                schema_version TEXT, cursor_acked INTEGER NOT NULL DEFAULT 0, feed_head INTEGER NOT NULL DEFAULT 0,
                feed_floor INTEGER NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 0, last_error TEXT,
                PRIMARY KEY (account, device)) WITHOUT ROWID;
             INSERT INTO devices (account, device, secret_hash, registered_ms, feed_head, feed_floor)
                VALUES ('a', 'd1', 'h', 1, 1, 1);
             CREATE TABLE items (account TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL,
                pk TEXT NOT NULL, sk TEXT NOT NULL, item TEXT, version TEXT NOT NULL, deleted INTEGER NOT NULL,
                updated_ms INTEGER NOT NULL, PRIMARY KEY (account, device, pk, sk)) WITHOUT ROWID;",
        )
        .unwrap();
        drop(raw);
        let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let d1 = dev("a", "d1");
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!(rec.changes_applied, 0);
        let schema = schema();
        let ch = put(&schema, "Up", json!({"deviceId": "d1", "name": "n"}), ver(NOW, 1));
        let (r, _) = s
            .apply_push(&schema, &mut clock(), NOW, DRIFT, &d1, &[ch])
            .unwrap();
        assert_eq!(r[0].status, ChangeStatus::Applied);
        assert_eq!(s.device(&d1).unwrap().unwrap().changes_applied, 1);
        let layout: String = s
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(layout, SCHEMA_VERSION.to_string());
    }

    #[test]
    fn corrupt_rows_are_reported() {
        let schema = schema();
        let d1 = dev("a", "d1");
        let mut s = store(&[&d1]);
        let (ch, _) = api_put(
            &mut s,
            &schema,
            &mut clock(),
            NOW,
            &Owner::Device(d1.clone()),
            "Down",
            json!({"deviceId": "d1", "name": "n"}),
        );
        s.conn
            .execute("UPDATE items SET item = '{not json'", [])
            .unwrap();
        // An unreadable row never stalls the feed: it is reported and skipped.
        let page = s.read_feed(&d1, 1, 10).unwrap();
        assert!(page.changes.is_empty());
        assert_eq!(page.unreadable.len(), 1);
        assert_eq!(page.unreadable[0].key, ch.key);
        assert!(page.unreadable[0].reason.contains("JSON"), "{:?}", page.unreadable);
        s.conn
            .execute("UPDATE items SET item = '{}', version = 'bad'", [])
            .unwrap();
        assert!(matches!(
            s.get_item(&Owner::Device(d1.clone()), "Down", &ch.key),
            Err(StoreError::Corrupt(_))
        ));
        s.conn
            .execute("UPDATE devices SET feed_head = -1", [])
            .unwrap();
        assert!(matches!(s.device(&d1), Err(StoreError::Corrupt(_))));
    }
}
