//! The embedded device database of devtables.
//!
//! Items are JSON documents of the models of a OneTable schema ([`devtables_schema`]): the schema
//! casts and validates them and computes their keys; this crate stores them in the log store of
//! `devtables-logstore` (named byte tables indexed in RAM over one append-only, checksummed log
//! file: a commit appends one record of a few hundred bytes, where a B-tree rewrote pages),
//! maintains the secondary indexes, hides and purges expired items, runs change hooks after
//! commit, and gives the replication layer side tables written in the same transactions as the
//! items.
//!
//! # Layout
//! - [`tables`]: the log's tables and what each holds.
//! - `keys`: byte encodings of table keys (order-preserving, prefix-friendly).
//! - `format`: the file's format number (4: the log); unknown ones refused.
//! - `legacy`: the redb files of earlier versions (formats 1 to 3), converted to a log at open;
//!   the only user of redb.
//! - `txn`: write transactions ([`WriteTxn`]), side tables and the [`WriteInterceptor`] seam.
//! - `read`: point gets and `find` queries ([`ReadTxn`], [`FindOptions`], [`Page`]).
//! - `view`: [`ItemView`], a get that builds no map: the stored record, its fields decoded as
//!   they are read ([`FieldRef`], strings lent).
//! - `commit`: durability modes and group commit.
//! - `background`: where the periodic flush, the log's compaction and the TTL purge run
//!   ([`Background`]).
//! - `hooks`: change subscribers ([`ItemChange`], [`Origin`]).
//! - `jsonl`: import and export as JSON lines.
//! - `schema_record`: the schema a file was written with, recorded in it and compared with the
//!   schema of every open ([`OpenError::SchemaChanged`], [`DbOptions::allow_schema_change`]).
//! - `unique`: `unique` fields, kept unique by a table of their values ([`DbError::NotUnique`]).
//!
//! # Opening a file
//! - [`Db::open`] opens or creates (a missing or empty file becomes a new database). The log
//!   is replayed into RAM; the tail of a commit cut short by a crash is cut off (logged).
//! - [`Db::open_existing`] never creates: a missing file is [`OpenError::Missing`], an empty one
//!   [`OpenError::Damaged`].
//! - [`Db::open_read_only`] never writes the file (a torn tail is ignored, not cut), so it reads
//!   files the process may not write, and damaged files as they are.
//!
//! Every open compares the schema it is given with the one the file records (`schema_record`):
//! compatible changes are accepted and recorded ([`Db::schema_changes_at_open`]), incompatible
//! ones refused unless [`DbOptions::allow_schema_change`] accepts them.
//!
//! # Reads
//! [`Db::read`] gives a [`ReadTxn`], which is not a snapshot: each of its calls sees the last
//! committed state, locking the store for that call only (a find walks its index and reads its
//! items in one view). Inside [`Db::write`], reads go through the write transaction and see its
//! own changes.
//!
//! A get comes in three forms, all seeing the same item:
//! - [`Db::get`]: the JSON form, a `serde_json::Map` (a `String` per field name and string).
//! - [`Db::get_as`]: the caller's own type, deserialized from the stored bytes (no map).
//! - [`Db::get_view`]: an [`ItemView`], the stored record copied once with its key (the get's
//!   one allocation: the key is rendered on the stack), fields decoded only as they are read,
//!   strings lent as `&str`, dates as their stored instant ([`StoredDate`]), nested values
//!   walked on demand ([`FieldRef`]); [`ItemView::to_item`] is the JSON form. With
//!   [`Db::get_view_by`] the key properties are `(name, text)` pairs, so naming the item
//!   builds no map either. The fastest get, and the one to use in a loop.
//!
//! # Damaged files
//! A truncated or corrupted file never panics the process: opening it, and every operation on
//! it, answers [`OpenError::Damaged`] or [`DbError::Damaged`] naming the file and what is wrong
//! (the log's byte offset); the remedy is a backup. The one repair made on its own is the cut
//! of a torn tail: bytes after the last whole record that no valid record follows, which only
//! a crash during a commit leaves. redb, which panics on some damaged files, runs only in the
//! conversion of old files, under `catch_unwind` (`legacy`).
//!
//! This crate knows nothing about MQTT or the cloud: replication sits above it, in `agent`.

mod background;
mod codec;
mod codec_de;
mod commit;
mod error;
mod format;
mod hooks;
mod jsonl;
mod keys;
#[doc(hidden)]
pub mod legacy;
mod read;
mod schema_record;
pub mod tables;
mod txn;
mod unique;
mod view;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use devtables_logstore::{LogError, LogOpenError, LogOptions, LogStore};
use devtables_schema::{Item, ItemKey, Model, Schema, SchemaChanges};

pub use background::Background;
pub use error::{DbError, OpenError, UniqueCollision};
pub use hooks::{ChangeOp, Hook, HookId, ItemChange, Origin};
pub use read::{FindOptions, Page, ReadTxn, TypedPage};
pub use txn::{SideTables, WriteInterceptor, WriteTxn};
pub use view::{ArrayRef, Elements, Entries, FieldRef, Fields, ItemView, ObjectRef, StoredDate};

/// The stored-item decoder for the fuzz targets (`fuzz/`), which cannot reach the crate-private
/// codec otherwise: corrupt bytes in a file must give [`DbError::Corrupt`], never a panic. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::{codec, DbError, Item};
    use devtables_schema::ItemKey;

    /// Decodes an item stored as `raw` under the encoded key `raw_key` (`pk \0 sk`).
    pub fn decode_item(raw: &[u8], raw_key: &[u8]) -> Result<Item, DbError> {
        codec::decode(raw, raw_key)
    }

    /// Decodes only the fields `keep` accepts, as filtered reads do.
    pub fn decode_item_with(
        raw: &[u8],
        raw_key: &[u8],
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Item, DbError> {
        codec::decode_with(raw, raw_key, keep)
    }

    /// Whether the top-level field `name` is the string `expected`, as type tests do.
    pub fn field_is_str(
        raw: &[u8],
        raw_key: &[u8],
        name: &str,
        expected: &str,
    ) -> Result<bool, DbError> {
        codec::field_is_str(raw, raw_key, name, expected)
    }

    /// Encodes an item as the database stores it (primary key attributes `pk`/`sk`).
    pub fn encode_item(item: &Item, key: &ItemKey) -> Vec<u8> {
        codec::encode(item, "pk", Some("sk"), key)
    }
}

use background::Worker;
use commit::Committer;
use hooks::Hooks;

/// When a commit reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every write returns only once it is on disk. Concurrent writers share one flush (group
    /// commit).
    Immediate,
    /// Writes return once committed; the background thread makes them durable every `interval`.
    /// A crash loses at most that window, never part of a transaction.
    Periodic { interval: Duration },
}

/// Entries of a side table, (key, value) in key order.
pub type SideEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// A source of the current time in milliseconds since the Unix epoch (tests inject their own).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// How a database is opened. Every limit is here.
#[derive(Clone)]
pub struct DbOptions {
    pub durability: Durability,
    /// How often expired items are purged in the background (they are invisible at once).
    pub ttl_purge_interval: Duration,
    /// Largest stored item, as JSON bytes.
    pub max_item_bytes: usize,
    /// Most operations in one [`Db::transaction`].
    pub max_transaction_ops: usize,
    /// Where the periodic flush and the TTL purge run: a thread of the database's own (the
    /// default), or one thread shared by the process's databases (for processes holding many).
    pub background: Background,
    pub clock: Clock,
    /// Accept a schema that changed incompatibly since the file was last opened (a removed
    /// field, a changed type...: see docs/schema.md) instead of refusing the open with
    /// [`OpenError::SchemaChanged`]: the new schema is recorded (logged at warn), and stored
    /// items that no longer validate stay as they are, to be fixed or removed by the
    /// application. Off by default: a schema change is a decision, not an accident.
    pub allow_schema_change: bool,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            durability: Durability::Immediate,
            ttl_purge_interval: Duration::from_secs(10),
            max_item_bytes: 256 * 1024,
            max_transaction_ops: 10_000,
            background: Background::OwnThread,
            clock: Arc::new(system_now_ms),
            allow_schema_change: false,
        }
    }
}

impl std::fmt::Debug for DbOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbOptions")
            .field("durability", &self.durability)
            .field("ttl_purge_interval", &self.ttl_purge_interval)
            .field("max_item_bytes", &self.max_item_bytes)
            .field("max_transaction_ops", &self.max_transaction_ops)
            .field("background", &self.background)
            .field("allow_schema_change", &self.allow_schema_change)
            .finish_non_exhaustive()
    }
}

/// The system clock, in milliseconds since the epoch.
pub fn system_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One operation of a [`Db::transaction`].
#[derive(Clone, Debug)]
pub enum TxnOp {
    Create {
        model: String,
        item: Item,
    },
    Update {
        model: String,
        item: Item,
        upsert: bool,
    },
    Remove {
        model: String,
        key: Item,
    },
}

pub(crate) struct Inner {
    /// The tables (see `tables`): a log file, or RAM for an in-memory database.
    pub(crate) store: LogStore,
    pub(crate) schema: Arc<Schema>,
    pub(crate) options: DbOptions,
    committer: Committer,
    hooks: Hooks,
    interceptor: RwLock<Option<Arc<dyn WriteInterceptor>>>,
    /// Serializes writers so commit sequence numbers (and hook order) follow commit order.
    write_lock: Mutex<()>,
    /// Writers waiting for `write_lock`: when none wait, a commit is made durable on its own.
    waiting: AtomicUsize,
    /// Table names of the secondary indexes, in `Schema::secondary_indexes` order.
    index_tables: Vec<String>,
    /// The schema's model names, sorted (`Schema::models` order): a model's position here is
    /// its slot in the per-model tables a transaction opens.
    model_names: Vec<String>,
    /// Names of the items tables (`items:<model>`), by model slot.
    item_tables: Vec<String>,
    /// Stored keys may not fit their model's key templates (`tables::STRAY_KEYS_KEY`): a lookup
    /// by key alone asks every model's table.
    stray_keys: AtomicBool,
    /// Whether the schema has `unique` fields: only then do writes open the `unique` table.
    pub(crate) has_unique: bool,
    /// What the open found about the schema the file was written with (set once, at open).
    schema_state: OnceLock<schema_record::SchemaState>,
    /// The periodic flush and TTL purge; stopped by [`Db::close`], so the file is released when
    /// `close` returns (dropping the last `Db` ends it too).
    worker: Mutex<Option<Worker>>,
    /// The file, or `:memory:` for an in-memory database (named in logs and errors).
    path: PathBuf,
    /// Opened by [`Db::open_in_memory`]: no file, nothing recorded about the schema, and
    /// [`Db::memory_bytes`] tells the store's size.
    in_memory: bool,
    /// Opened by [`Db::open_read_only`]: writes are refused. The store is the file opened
    /// read-only, or an in-memory copy when the open had to change something (a redb file
    /// converted, a secondary index rebuilt) without writing the file.
    read_only: bool,
}

impl Inner {
    pub(crate) fn interceptor(&self) -> Option<Arc<dyn WriteInterceptor>> {
        self.interceptor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes every commit durable: one `fdatasync` of the log covers all earlier commits.
    fn flush(&self) -> Result<(), DbError> {
        self.engine(|| Ok(self.store.sync()?))
    }

    /// Runs `op`, naming the file in what its error says about the file: damaged stored bytes
    /// (the log's or the codec's) become [`DbError::Damaged`], a write the read-only store
    /// refused [`DbError::ReadOnly`].
    pub(crate) fn engine<T>(&self, op: impl FnOnce() -> Result<T, DbError>) -> Result<T, DbError> {
        op().map_err(|e| self.classify(e))
    }

    fn classify(&self, e: DbError) -> DbError {
        let detail = match e {
            DbError::Storage(LogError::Damaged { offset, detail }) => {
                format!("at byte {offset}: {}", error::cut(&detail))
            }
            DbError::Storage(LogError::ReadOnly) => {
                return DbError::ReadOnly {
                    path: self.path.clone(),
                }
            }
            DbError::Corrupt(msg) => format!("stored data: {}", error::cut(&msg)),
            other => return other,
        };
        DbError::Damaged {
            path: self.path.clone(),
            detail,
        }
    }

    /// The slot of the model named `name` (see `model_names`).
    pub(crate) fn slot(&self, name: &str) -> Result<usize, DbError> {
        self.model_names
            .binary_search_by(|m| m.as_str().cmp(name))
            .map_err(|_| DbError::UnknownModel(name.to_string()))
    }

    /// The models (with their slots) whose table may hold the item at `key`: those whose key
    /// templates could produce it, or every model once the file may hold stray keys. A key
    /// holds one item across all models, so a lookup by key alone asks these tables in turn,
    /// and a write asks them before it takes a key.
    pub(crate) fn holders<'a, 'k>(
        &'a self,
        key: &'k ItemKey,
    ) -> impl Iterator<Item = (usize, &'a Model)> + 'k
    where
        'a: 'k,
    {
        self.holders_besides(key, None)
    }

    /// [`Inner::holders`] but the model named `skip` (already asked: not matched against the
    /// key's templates again).
    pub(crate) fn holders_besides<'a, 'k>(
        &'a self,
        key: &'k ItemKey,
        skip: Option<&'k str>,
    ) -> impl Iterator<Item = (usize, &'a Model)> + 'k
    where
        'a: 'k,
    {
        let every = self.stray_keys.load(Ordering::Relaxed);
        self.schema
            .models()
            .enumerate()
            .filter(move |(_, m)| Some(m.name()) != skip && (every || m.key_fits(key)))
    }

    fn visible(&self) -> u64 {
        match self.options.durability {
            Durability::Immediate => self.committer.durable(),
            Durability::Periodic { .. } => u64::MAX,
        }
    }
}

impl Inner {
    /// Ends the background work (periodic flush, TTL purge), if it still runs; when this
    /// returns, none of it runs.
    fn stop_background(&self) {
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(worker) = worker {
            worker.stop();
        }
    }
}

impl Drop for Inner {
    /// Makes every commit durable and releases the file (and its lock) before the drop
    /// returns, so the file can be opened again at once.
    fn drop(&mut self) {
        if let Err(e) = self.store.close() {
            tracing::error!(path = %self.path.display(), "closing the database file: {e}");
        }
    }
}

/// An open device database. Cheap to clone; all clones share one file.
#[derive(Clone)]
pub struct Db {
    /// Shared by the application's clones (not by the handles the background work makes for
    /// itself): dropped with the last of them, it stops the background work first. Declared
    /// before `inner`, so it is dropped first.
    _handles: Option<Arc<LastHandle>>,
    inner: Arc<Inner>,
}

/// Stops a database's background work when the application drops its last handle.
///
/// Without it, a periodic flush or TTL purge running at that moment holds the database and
/// becomes its last owner: the file would be closed a moment later, on the background thread,
/// and an open of the same file right after the drop would fail with "already open".
struct LastHandle(std::sync::Weak<Inner>);

impl Drop for LastHandle {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.stop_background();
        }
    }
}

impl Db {
    /// Opens (or creates) the database at `path` for `schema`. Secondary indexes the schema adds
    /// (or changes) are built from the stored items before this returns.
    ///
    /// A missing or empty file becomes a new database. The log is replayed into RAM; the tail
    /// of a commit cut short by a crash is cut off (logged at warn). A file of the redb formats
    /// of earlier versions (1 to 3) is converted to the log first (`legacy`). A damaged file
    /// gives [`OpenError::Damaged`].
    pub fn open(
        path: impl AsRef<Path>,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let path = path.as_ref().to_path_buf();
        let (store, converted) = open_store(&path, false, &schema, false)?;
        Db::start(store, path, false, false, converted, schema, options)
    }

    /// Opens the database at `path` like [`Db::open`], but never creates one: a missing file
    /// gives [`OpenError::Missing`] and an empty one [`OpenError::Damaged`].
    pub fn open_existing(
        path: impl AsRef<Path>,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| file_error(&path, e, "read and write", true))?;
        refuse_empty(&path, &file)?;
        drop(file);
        let (store, converted) = open_store(&path, false, &schema, true)?;
        Db::start(store, path, false, false, converted, schema, options)
    }

    /// Opens the existing database at `path` for reading only; the file is never written, so a
    /// file the process may not write can be read, and a damaged one is read as it is.
    ///
    /// A torn tail (a commit cut short by a crash) is ignored, not cut off. Writes are refused
    /// with [`DbError::ReadOnly`]; there is no background thread (no flush, no TTL purge:
    /// expired items are still hidden). A shared lock keeps writers out while it is open, and
    /// it cannot open a file a writer holds. A redb file of an earlier version is converted
    /// into RAM (`legacy`), and so is the file when a secondary index must be rebuilt: it reads
    /// as usual, at the cost of about its size in RAM; the file keeps its form until a writable
    /// open converts it.
    pub fn open_read_only(
        path: impl AsRef<Path>,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| file_error(&path, e, "read", true))?;
        refuse_empty(&path, &file)?;
        drop(file);
        let (store, converted) = open_store(&path, true, &schema, true)?;
        Db::start(store, path, false, true, converted, schema, options)
    }

    /// Opens a new, empty database held in memory only: nothing survives the last handle. An
    /// empty one costs a few KiB, so a process can hold thousands (the fleet simulator's
    /// devices); every other behaviour, hooks and durability modes included, is that of a file.
    pub fn open_in_memory(schema: Arc<Schema>, options: DbOptions) -> Result<Db, OpenError> {
        let path = PathBuf::from(":memory:");
        let store = LogStore::in_memory(LogOptions::default());
        let converted = legacy::Converted::default();
        Db::start(store, path, true, false, converted, schema, options)
    }

    fn start(
        store: LogStore,
        path: PathBuf,
        in_memory: bool,
        read_only: bool,
        converted: legacy::Converted,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let index_tables: Vec<String> = schema
            .secondary_indexes()
            .iter()
            .map(|i| tables::index_table_name(&i.name))
            .collect();
        // A read-only store cannot take the index rebuild: it happens on a copy in RAM.
        let store = if store.is_read_only()
            && stale_indexes(&store, &schema, &index_tables).map_err(|e| tables_error(&path, e))?
                > 0
        {
            tracing::info!(path = %path.display(), "a secondary index changed: this read-only open rebuilds it in a copy of the file in memory");
            legacy::copy_to_memory(&store).map_err(|e| tables_error(&path, e))?
        } else {
            store
        };
        let has_unique = unique::schema_has_unique(&schema);
        let model_names: Vec<String> = schema.models().map(|m| m.name().to_string()).collect();
        let item_tables = model_names
            .iter()
            .map(|m| tables::items_table_name(m))
            .collect();
        let inner = Arc::new(Inner {
            store,
            schema,
            options,
            committer: Committer::new(),
            hooks: Hooks::default(),
            interceptor: RwLock::new(None),
            write_lock: Mutex::new(()),
            waiting: AtomicUsize::new(0),
            index_tables,
            model_names,
            item_tables,
            stray_keys: AtomicBool::new(false),
            has_unique,
            schema_state: OnceLock::new(),
            worker: Mutex::new(None),
            path: path.clone(),
            in_memory,
            read_only,
        });
        format::check_format(&inner)?;
        let (schema_state, record) = schema_record::check(&inner)?;
        // Keys made by templates the schema no longer has may not fit the new ones.
        let stray = converted.stray_keys || schema_state.forced;
        prepare_tables(&inner, record.as_ref(), stray)?;
        schema_record::log(&path, &schema_state, read_only);
        // Set once, here, before the handle exists: it cannot be set already.
        let _ = inner.schema_state.set(schema_state);
        if !read_only {
            let worker = Worker::start(&inner).map_err(OpenError::Thread)?;
            *inner.worker.lock().unwrap_or_else(PoisonError::into_inner) = Some(worker);
        }
        Ok(Db {
            _handles: Some(Arc::new(LastHandle(Arc::downgrade(&inner)))),
            inner,
        })
    }

    /// For an in-memory database, the bytes of RAM its store holds (index and values); `None`
    /// for a file.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.inner
            .in_memory
            .then(|| self.inner.store.stats().memory_bytes)
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.inner.schema
    }

    pub fn options(&self) -> &DbOptions {
        &self.inner.options
    }

    /// How the schema this database was opened with differs from the one the file recorded
    /// (the schema of its previous open): empty when they store data alike, and when nothing
    /// was recorded (a new file, a file from before the record, an in-memory database). Non-empty
    /// after a compatible change, or an incompatible one [`DbOptions::allow_schema_change`]
    /// accepted: the replication agent asks the cloud for a resync then.
    pub fn schema_changes_at_open(&self) -> &SchemaChanges {
        static NONE: SchemaChanges = SchemaChanges {
            changes: Vec::new(),
        };
        self.inner
            .schema_state
            .get()
            .map_or(&NONE, |state| &state.changes)
    }

    /// The schema fingerprint ([`devtables_schema::SchemaShape::fingerprint`]) the file records
    /// now: the current schema's after a writable open; for a read-only open, whatever the file
    /// held (`None` for a file from before the record). `None` for an in-memory database, which
    /// records nothing.
    pub fn recorded_fingerprint(&self) -> Option<&str> {
        self.inner
            .schema_state
            .get()
            .and_then(|state| state.fingerprint.as_deref())
    }

    /// The fingerprint the file recorded before this open, if any: differs from
    /// [`Db::recorded_fingerprint`] when the schema changed.
    pub fn previous_fingerprint(&self) -> Option<&str> {
        self.inner
            .schema_state
            .get()
            .and_then(|state| state.previous.as_deref())
    }

    /// Runs `f` in one write transaction with the given origin; commits when it returns Ok (then
    /// waits for durability in `immediate` mode), rolls back when it returns Err. The commit is
    /// one record appended to the log: after a crash it is there whole or not at all.
    pub fn write<T>(
        &self,
        origin: Origin,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let inner = &*self.inner;
        if inner.read_only {
            return Err(DbError::ReadOnly {
                path: inner.path.clone(),
            });
        }
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = inner
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        inner.waiting.fetch_sub(1, Ordering::SeqCst);
        let (value, seq, lone, changes) = inner.engine(|| {
            let mut wtx = WriteTxn {
                inner,
                tx: inner.store.write()?,
                origin,
                now_ms: (inner.options.clock)(),
                changes: Vec::new(),
            };
            let value = f(&mut wtx)?;
            let changes = wtx.take_changes();
            // A lone writer in `immediate` mode commits durably at once (one fsync); when others
            // wait behind it, it commits non-durably and they share one flush (group commit).
            let lone = inner.options.durability == Durability::Immediate
                && inner.waiting.load(Ordering::SeqCst) == 0;
            wtx.tx.commit(lone)?;
            let seq = inner.committer.committed();
            Ok((value, seq, lone, changes))
        })?;
        if lone {
            inner.committer.mark_durable(seq);
        }
        inner.hooks.enqueue(seq, changes);
        drop(guard);
        if inner.options.durability == Durability::Immediate {
            inner.committer.wait_durable(seq, || inner.flush())?;
        }
        inner.hooks.deliver(|| inner.visible());
        Ok(value)
    }

    /// A handle for several reads. It is not a snapshot: each of its calls sees the state the
    /// last commit left (a find reads its index entries and their items in one view of it),
    /// and a write committed between two calls is seen by the second. The store is locked for
    /// the length of one call only, so holding a `ReadTxn` never blocks a writer.
    pub fn read(&self) -> Result<ReadTxn, DbError> {
        Ok(ReadTxn {
            inner: self.inner.clone(),
            now_ms: (self.inner.options.clock)(),
        })
    }

    /// Creates an item of `model`; returns it (without hidden fields).
    pub fn create(&self, model: &str, item: &Item) -> Result<Item, DbError> {
        self.write(Origin::Local, |t| t.create(model, item))
    }

    /// Creates an item of `model` from an input the caller gives away; returns its key (see
    /// [`WriteTxn::create_owned`]: no copy of the input, no item returned; the fastest create).
    pub fn create_owned(&self, model: &str, item: Item) -> Result<ItemKey, DbError> {
        self.write(Origin::Local, |t| t.create_owned(model, item))
    }

    /// Reads the item its key properties identify.
    pub fn get(&self, model: &str, key: &Item) -> Result<Option<Item>, DbError> {
        self.read()?.get(model, key, false)
    }

    /// [`Db::get`] into the caller's type: deserialized straight from the stored bytes, without
    /// building a `serde_json::Map` (see [`ReadTxn::get_as`]).
    pub fn get_as<T: serde::de::DeserializeOwned>(
        &self,
        model: &str,
        key: &Item,
    ) -> Result<Option<T>, DbError> {
        self.read()?.get_as(model, key, false)
    }

    /// [`Db::get`] as a borrowed, lazily decoded [`ItemView`]: one allocation (the stored
    /// record and its key), no map, fields decoded as they are read (see
    /// [`ReadTxn::get_view`]).
    pub fn get_view(&self, model: &str, key: &Item) -> Result<Option<ItemView<'_>>, DbError> {
        let now = (self.inner.options.clock)();
        read::view_at(&self.inner, now, model, read::KeyProps::Item(key), false)
    }

    /// [`Db::get_view`] with the key properties as `(name, text)` pairs: no item to build (see
    /// [`ReadTxn::get_view_by`]).
    pub fn get_view_by(
        &self,
        model: &str,
        key: &[(&str, &str)],
    ) -> Result<Option<ItemView<'_>>, DbError> {
        let now = (self.inner.options.clock)();
        read::view_at(&self.inner, now, model, read::KeyProps::Strs(key), false)
    }

    /// [`Db::find`] into the caller's type (see [`ReadTxn::get_as`]).
    pub fn find_as<T: serde::de::DeserializeOwned>(
        &self,
        model: &str,
        props: &Item,
        options: &FindOptions,
    ) -> Result<TypedPage<T>, DbError> {
        self.read()?.find_as(model, props, options)
    }

    /// Finds items: by full or partial key (a partly resolved sort-key template is a begins-with),
    /// sort-key conditions, a secondary index, filters on other fields; paginated by `limit` and
    /// `next`, in either direction. Without a key and without `index`, a secondary index whose
    /// hash the properties resolve is used instead of a model scan.
    pub fn find(&self, model: &str, props: &Item, options: &FindOptions) -> Result<Page, DbError> {
        self.read()?.find(model, props, options)
    }

    /// Changes the given fields of an item (partial update); fails when absent.
    pub fn update(&self, model: &str, item: &Item) -> Result<Item, DbError> {
        self.write(Origin::Local, |t| t.update(model, item, false))
    }

    /// Updates the item, or creates it when absent.
    pub fn upsert(&self, model: &str, item: &Item) -> Result<Item, DbError> {
        self.write(Origin::Local, |t| t.update(model, item, true))
    }

    /// Removes the item its key properties identify; returns it, or None when absent.
    pub fn remove(&self, model: &str, key: &Item) -> Result<Option<Item>, DbError> {
        self.write(Origin::Local, |t| t.remove(model, key))
    }

    /// Runs several operations atomically: all commit or none. Returns one result per operation
    /// (the item written, or the item removed).
    pub fn transaction(&self, ops: &[TxnOp]) -> Result<Vec<Option<Item>>, DbError> {
        let max = self.inner.options.max_transaction_ops;
        if ops.len() > max {
            return Err(DbError::TooManyOperations {
                count: ops.len(),
                max,
            });
        }
        self.write(Origin::Local, |t| {
            ops.iter()
                .map(|op| match op {
                    TxnOp::Create { model, item } => t.create(model, item).map(Some),
                    TxnOp::Update {
                        model,
                        item,
                        upsert,
                    } => t.update(model, item, *upsert).map(Some),
                    TxnOp::Remove { model, key } => t.remove(model, key),
                })
                .collect()
        })
    }

    /// Calls `hook` after every committed change (in `immediate` mode, once it is durable).
    pub fn subscribe(&self, hook: Hook) -> HookId {
        self.inner.hooks.subscribe(hook)
    }

    pub fn unsubscribe(&self, id: HookId) {
        self.inner.hooks.unsubscribe(id)
    }

    /// Installs the interceptor called inside every write transaction (one at a time).
    pub fn set_interceptor(&self, interceptor: Option<Arc<dyn WriteInterceptor>>) {
        *self
            .inner
            .interceptor
            .write()
            .unwrap_or_else(PoisonError::into_inner) = interceptor;
    }

    /// Up to `limit` entries of a side table (replication state) with keys `>= start`, in key
    /// order, as the last commit left them.
    pub fn side_scan(
        &self,
        table: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<SideEntries, DbError> {
        self.inner.engine(|| {
            let read = self.inner.store.read()?;
            let Some(t) = read.table(&tables::side_table_name(table)) else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in t.range(tables::from(start)).take(limit) {
                let (k, v) = entry?;
                out.push((k.to_vec(), v.into_owned()));
            }
            Ok(out)
        })
    }

    /// One entry of a side table.
    pub fn side_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.inner.engine(|| {
            let read = self.inner.store.read()?;
            let Some(t) = read.table(&tables::side_table_name(table)) else {
                return Ok(None);
            };
            let value = t.get(key)?.map(std::borrow::Cow::into_owned);
            Ok(value)
        })
    }

    /// Number of entries in a side table.
    pub fn side_len(&self, table: &str) -> Result<u64, DbError> {
        self.inner.engine(|| {
            let read = self.inner.store.read()?;
            Ok(read
                .table(&tables::side_table_name(table))
                .map_or(0, |t| t.len()))
        })
    }

    /// Removes items whose TTL has passed (the background thread calls this every
    /// `ttl_purge_interval`). Returns how many were removed.
    pub fn purge_expired(&self) -> Result<u64, DbError> {
        purge_expired(&self.inner)
    }

    /// Makes every committed write durable now (useful in `periodic` mode before a planned stop).
    pub fn flush(&self) -> Result<(), DbError> {
        let inner = &*self.inner;
        inner.committer.flush_all(|| inner.flush())?;
        inner.hooks.deliver(|| inner.visible());
        Ok(())
    }

    /// Stops the background thread, makes every commit durable and closes this handle. The file
    /// is released once every clone of this `Db` is closed or dropped.
    pub fn close(self) -> Result<(), DbError> {
        self.inner.stop_background();
        self.flush()
    }

    /// Writes every item (complete, one JSON object per line); returns the count. Each model
    /// is read in one view of the store: a write committed while the export runs may show in
    /// the models read after it only.
    pub fn export(&self, out: &mut impl std::io::Write) -> Result<u64, DbError> {
        jsonl::export(self, out)
    }

    /// Loads items written by [`Db::export`] (replacing items with the same key) in transactions
    /// of up to `max_transaction_ops` lines; a bad line stops the import with its line number, and
    /// the lines of its transaction are not written.
    pub fn import(&self, input: &mut impl std::io::BufRead) -> Result<u64, DbError> {
        jsonl::import(self, input)
    }
}

/// Why the tables of a freshly opened file could not be read or prepared.
pub(crate) fn tables_error(path: &Path, e: DbError) -> OpenError {
    match e {
        DbError::Storage(LogError::Damaged { offset, detail }) => OpenError::Damaged {
            path: path.to_path_buf(),
            detail: format!("at byte {offset}: {}", error::cut(&detail)),
        },
        DbError::Corrupt(msg) => OpenError::Damaged {
            path: path.to_path_buf(),
            detail: format!("stored data: {}", error::cut(&msg)),
        },
        DbError::Storage(error) => OpenError::Tables {
            path: path.to_path_buf(),
            error: Box::new(error),
        },
        other => OpenError::Tables {
            path: path.to_path_buf(),
            error: Box::new(LogError::Io(std::io::Error::other(other.to_string()))),
        },
    }
}

/// Opens the log at `path` (read-only or not), or converts a redb file of an earlier version
/// there (`legacy`); `must_exist` for the opens that never create a file.
fn open_store(
    path: &Path,
    read_only: bool,
    schema: &Schema,
    must_exist: bool,
) -> Result<(LogStore, legacy::Converted), OpenError> {
    let opened = if read_only {
        LogStore::open_read_only(path, LogOptions::default())
    } else {
        LogStore::open(path, LogOptions::default())
    };
    let access = if read_only { "read" } else { "read and write" };
    match opened {
        Ok(store) => Ok((store, legacy::Converted::default())),
        Err(LogOpenError::NotALog { .. }) => {
            let is_redb =
                legacy::is_redb_file(path).map_err(|e| file_error(path, e, access, true))?;
            if is_redb {
                legacy::convert(path, read_only, schema)
            } else {
                Err(OpenError::Damaged {
                    path: path.to_path_buf(),
                    detail: "it starts with neither the devtables log's header nor a redb header of an earlier version: not a devtables database (or its first bytes are damaged)".into(),
                })
            }
        }
        Err(LogOpenError::Io { source, .. }) => Err(file_error(path, source, access, must_exist)),
        Err(LogOpenError::NewerFormat { found, .. }) => Err(OpenError::UnsupportedFormat {
            path: path.to_path_buf(),
            found: format!("log {found}"),
            supported: format::FORMAT,
        }),
        Err(LogOpenError::Damaged { offset, detail, .. }) => Err(OpenError::Damaged {
            path: path.to_path_buf(),
            detail: format!("at byte {offset}: {}", error::cut(&detail)),
        }),
        Err(e @ LogOpenError::InUse { .. }) => Err(OpenError::Storage {
            path: path.to_path_buf(),
            error: Box::new(e),
        }),
    }
}

/// Why the file at `path` could not be opened for `access`; `must_exist` for the opens that
/// never create one.
fn file_error(path: &Path, e: std::io::Error, access: &'static str, must_exist: bool) -> OpenError {
    match e.kind() {
        std::io::ErrorKind::NotFound if must_exist => OpenError::Missing {
            path: path.to_path_buf(),
        },
        std::io::ErrorKind::PermissionDenied => OpenError::Permission {
            path: path.to_path_buf(),
            access,
            source: e,
        },
        _ => OpenError::Storage {
            path: path.to_path_buf(),
            error: Box::new(LogOpenError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        },
    }
}

/// An existing database file is never empty: an empty one was truncated (or is not a
/// database), and only [`Db::open`] makes a new database in it.
fn refuse_empty(path: &Path, file: &File) -> Result<(), OpenError> {
    let len = file
        .metadata()
        .map_err(|e| file_error(path, e, "read", true))?
        .len();
    if len == 0 {
        return Err(OpenError::Damaged {
            path: path.to_path_buf(),
            detail: "the file is empty (0 bytes): it holds no database (truncated?)".into(),
        });
    }
    Ok(())
}

/// How many secondary indexes of the schema were built for another definition than the one
/// they have now (or never built), as `meta` records them: those a writable open rebuilds.
fn stale_indexes(
    store: &LogStore,
    schema: &Schema,
    index_tables: &[String],
) -> Result<usize, DbError> {
    let read = store.read()?;
    let mut stale = 0;
    for index in schema.secondary_indexes().iter().take(index_tables.len()) {
        let def = index_definition(index);
        if tables::meta_get(&read, &index_meta_key(index))?.as_deref() != Some(def.as_str()) {
            stale += 1;
        }
    }
    Ok(stale)
}

/// What `meta` records about a secondary index: the attributes its entries were built from.
fn index_definition(index: &devtables_schema::Index) -> String {
    format!("{}|{}", index.hash, index.sort.as_deref().unwrap_or(""))
}

fn index_meta_key(index: &devtables_schema::Index) -> String {
    format!("index:{}", index.name)
}

/// Prepares the tables in one transaction at open: rebuilds the secondary indexes whose
/// definition changed, records the schema (`record`) and brings the `unique` table in line
/// with the schema's unique fields (not for read-only opens, which record nothing; their store
/// is a copy in RAM when an index must be rebuilt, see `Db::start`).
fn prepare_tables(
    inner: &Inner,
    record: Option<&schema_record::Record>,
    stray: bool,
) -> Result<(), OpenError> {
    let fail = |e: unique::PrepareError| match e {
        unique::PrepareError::Db(e) => tables_error(&inner.path, e),
        unique::PrepareError::Open(e) => *e,
    };
    warn_unread_models(inner).map_err(|e| tables_error(&inner.path, e))?;
    if inner.store.is_read_only() {
        // Nothing to write (`Db::start` made sure no index is stale): the flag alone.
        let read = inner
            .store
            .read()
            .map_err(|e| tables_error(&inner.path, e.into()))?;
        let recorded = tables::meta_get(&read, tables::STRAY_KEYS_KEY)
            .map_err(|e| tables_error(&inner.path, e))?
            .is_some();
        inner.stray_keys.store(stray || recorded, Ordering::Relaxed);
        return Ok(());
    }
    prepare_tables_in(inner, record, stray).map_err(fail)
}

fn prepare_tables_in(
    inner: &Inner,
    record: Option<&schema_record::Record>,
    stray: bool,
) -> Result<(), unique::PrepareError> {
    let mut tx = inner.store.write().map_err(DbError::from)?;
    if let Some(record) = record {
        record.write(&mut tx)?;
    }
    if stray {
        tables::meta_put(&mut tx, tables::STRAY_KEYS_KEY, "1")?;
    }
    let recorded_stray = tables::meta_get_in(&tx, tables::STRAY_KEYS_KEY)?.is_some();
    inner
        .stray_keys
        .store(stray || recorded_stray, Ordering::Relaxed);
    let mut stale = Vec::new();
    for (index, name) in inner
        .schema
        .secondary_indexes()
        .iter()
        .zip(&inner.index_tables)
    {
        let def = index_definition(index);
        let key = index_meta_key(index);
        if tables::meta_get_in(&tx, &key)?.as_deref() != Some(def.as_str()) {
            tables::meta_put(&mut tx, &key, &def)?;
            stale.push((index.clone(), name.clone()));
        }
    }
    for (index, name) in stale {
        tx.delete_table(&name).map_err(DbError::from)?;
        for (model, items_name) in inner.schema.models().zip(&inner.item_tables) {
            let entries = tx
                .range(items_name, tables::ALL, false, usize::MAX)
                .map_err(DbError::from)?;
            for (k, v) in entries {
                let item = read::decode_item(&v, &k)?;
                let Some(key) = keys::decode_item_key(&k) else {
                    continue;
                };
                if let Some((hash, sort)) = model.index_key(&item, &index) {
                    tx.insert(&name, &keys::index_key(&hash, &sort, &key), &[])
                        .map_err(DbError::from)?;
                }
            }
        }
        tracing::info!(index = %index.name, "built secondary index");
    }
    if !inner.read_only {
        unique::prepare(&mut tx, &inner.schema, (inner.options.clock)(), &inner.path)?;
    }
    if !tx.is_empty() {
        tx.commit(true).map_err(DbError::from)?;
    }
    Ok(())
}

/// Items tables of models the schema no longer has (removed by a change accepted with
/// [`DbOptions::allow_schema_change`]) stay in the file, unread: no read, export or key check
/// sees them. Said at every open, with their count, so they are not lost silently.
fn warn_unread_models(inner: &Inner) -> Result<(), DbError> {
    let read = inner.store.read()?;
    for name in read.table_names() {
        let orphan = name
            .strip_prefix(tables::ITEMS_PREFIX)
            .is_some_and(|model| inner.slot(model).is_err());
        if !orphan {
            continue;
        }
        let items = read.table(&name).map_or(0, |t| t.len());
        if items > 0 {
            tracing::warn!(
                path = %inner.path.display(),
                table = %name,
                items,
                "items of a model the schema no longer has stay in the file, unread (export them with the former schema to keep them)"
            );
        }
    }
    Ok(())
}

pub(crate) fn purge_expired(inner: &Arc<Inner>) -> Result<u64, DbError> {
    const BATCH: usize = 1_000;
    // The background work's own handle: its drop must not stop that work.
    let db = Db {
        _handles: None,
        inner: inner.clone(),
    };
    let mut total = 0;
    loop {
        let removed = db.write(Origin::Expired, |t| {
            let keys = t.expired_keys(t.now_ms(), BATCH)?;
            for key in &keys {
                t.remove_stored(key)?;
            }
            Ok(keys.len())
        })?;
        total += removed as u64;
        if removed < BATCH {
            return Ok(total);
        }
    }
}

/// Test access to the shared background thread. Not an API.
#[doc(hidden)]
pub mod testing {
    /// Databases registered with the shared background thread now.
    pub fn shared_background_entries() -> usize {
        crate::background::shared_entries()
    }
}
