//! The embedded device database of devtables.
//!
//! Items are JSON documents of the models of a OneTable schema ([`devtables_schema`]): the schema
//! casts and validates them and computes their keys; this crate stores them in redb (ACID,
//! crash-safe, pure Rust), maintains the secondary indexes, hides and purges expired items, runs
//! change hooks after commit, and gives the replication layer side tables written in the same
//! transactions as the items.
//!
//! # Layout
//! - [`tables`]: the redb tables and what each holds.
//! - `keys`: byte encodings of table keys (order-preserving, prefix-friendly).
//! - `convert`: the file's format number; older files converted at open, newer ones refused.
//! - `txn`: write transactions ([`WriteTxn`]), side tables and the [`WriteInterceptor`] seam.
//! - `read`: point gets and `find` queries ([`ReadTxn`], [`FindOptions`], [`Page`]).
//! - `commit`: durability modes and group commit.
//! - `background`: where the periodic flush and the TTL purge run ([`Background`]).
//! - `memory`: the sparse in-memory storage of [`Db::open_in_memory`].
//! - `storage`: the file storage under redb: closable (a damaged file is let go) and, for
//!   [`Db::open_read_only`], read-only with redb's writes kept in memory.
//! - `damage`: every redb call runs under `catch_unwind`; a panic or the engine's "corrupted"
//!   answer becomes [`DbError::Damaged`] / [`OpenError::Damaged`] naming the file.
//! - `hooks`: change subscribers ([`ItemChange`], [`Origin`]).
//! - `jsonl`: import and export as JSON lines.
//! - `schema_record`: the schema a file was written with, recorded in it and compared with the
//!   schema of every open ([`OpenError::SchemaChanged`], [`DbOptions::allow_schema_change`]).
//! - `unique`: `unique` fields, kept unique by a table of their values ([`DbError::NotUnique`]).
//!
//! # Opening a file
//! - [`Db::open`] opens or creates (an empty file becomes a new database, redb's rule).
//! - [`Db::open_existing`] never creates: a missing file is [`OpenError::Missing`], an empty one
//!   [`OpenError::Damaged`].
//! - [`Db::open_read_only`] never writes the file (redb 2.x cannot open read-only by itself; see
//!   `storage`), so it reads files the process may not write, and damaged files as they are.
//!
//! Every open compares the schema it is given with the one the file records (`schema_record`):
//! compatible changes are accepted and recorded ([`Db::schema_changes_at_open`]), incompatible
//! ones refused unless [`DbOptions::allow_schema_change`] accepts them.
//!
//! # Damaged files
//! A truncated or corrupted file never panics the process: opening it, and every operation on
//! it, answers [`OpenError::Damaged`] or [`DbError::Damaged`] naming the file and what is wrong;
//! the remedy is a backup. A panic of the engine latches the handle: every later call answers
//! the same error, and the file is closed. Nothing here repairs a damaged file on its own; what
//! redb does by itself on every open is kept: after an unclean shutdown it rebuilds its
//! allocator state in place (logged; [`Db::open_read_only`] does it in memory only). The panic
//! message still reaches the process's panic hook (stderr): silencing it would need a
//! process-wide hook swap.
//!
//! This crate knows nothing about MQTT or the cloud: replication sits above it, in `agent`.

mod background;
mod codec;
mod codec_de;
mod commit;
mod convert;
mod damage;
mod error;
mod hooks;
mod jsonl;
mod keys;
mod memory;
mod read;
mod schema_record;
mod storage;
pub mod tables;
mod txn;
mod unique;

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use devtables_schema::{Item, ItemKey, Model, Schema, SchemaChanges};
use redb::{ReadableTable, ReadableTableMetadata};

pub use background::Background;
pub use error::{DbError, OpenError, UniqueCollision};
pub use hooks::{ChangeOp, Hook, HookId, ItemChange, Origin};
pub use read::{FindOptions, Page, ReadTxn, TypedPage};
pub use txn::{SideTables, WriteInterceptor, WriteTxn};

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
use storage::{FileStorage, LockError};

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
    /// redb page cache, in bytes.
    pub cache_bytes: usize,
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
            cache_bytes: 8 * 1024 * 1024,
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
            .field("cache_bytes", &self.cache_bytes)
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
    /// Never dropped once a panic latched `damaged` (see `damage`): redb's state is not to be
    /// trusted then, not even to close.
    db: ManuallyDrop<redb::Database>,
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
    /// The storage of an in-memory database, to tell its size.
    memory: Option<Arc<memory::SparseMemoryBackend>>,
    /// The storage of a file, to close it when the engine panicked on it.
    storage: Option<Arc<FileStorage>>,
    /// Set when the engine panicked (`damage`): the detail every later call answers with.
    damaged: OnceLock<String>,
    /// Opened by [`Db::open_read_only`]: writes are refused, and redb's own writes (header,
    /// repair, table creation) stay in memory.
    read_only: bool,
}

impl Inner {
    pub(crate) fn interceptor(&self) -> Option<Arc<dyn WriteInterceptor>> {
        self.interceptor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn flush(&self) -> Result<(), DbError> {
        self.engine(|| {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(redb::Durability::Immediate);
            tx.commit()?;
            Ok(())
        })
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
        let every = self.stray_keys.load(Ordering::Relaxed);
        self.schema
            .models()
            .enumerate()
            .filter(move |(_, m)| every || m.key_fits(key))
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
    fn drop(&mut self) {
        if self.committer.has_unflushed() {
            if let Err(e) = self.flush() {
                tracing::error!(path = %self.path.display(), "final flush failed: {e}");
            }
        }
        if self.is_damaged() {
            // Leaked on purpose: dropping redb's handle after it panicked could block on its
            // writer slot or panic on its poisoned locks. The file itself is already closed.
            return;
        }
        // SAFETY: `db` is taken once, here, and `self` is not used afterwards.
        let db = unsafe { ManuallyDrop::take(&mut self.db) };
        if let Err(detail) = damage::catch(move || drop(db)) {
            tracing::error!(path = %self.path.display(), "closing the database file: {detail}");
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
    /// An empty file becomes a new database (redb's rule). A damaged file gives
    /// [`OpenError::Damaged`]; after an unclean shutdown redb repairs the file's allocator state
    /// in place, by itself, on every open (logged).
    pub fn open(
        path: impl AsRef<Path>,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| file_error(&path, e, "read and write", false))?;
        Db::open_file(path, file, false, schema, options)
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
        Db::open_file(path, file, false, schema, options)
    }

    /// Opens the existing database at `path` for reading only; the file is never written, so a
    /// file the process may not write can be read, and a damaged one is read as it is.
    ///
    /// redb 2.x has no read-only open (every open writes the header, and repairs after an unclean
    /// shutdown), so what redb writes here stays in memory (`storage`). Writes are refused with
    /// [`DbError::ReadOnly`]; there is no background thread (no flush, no TTL purge: expired
    /// items are still hidden). A shared lock keeps writers out while it is open, and it cannot
    /// open a file a writer holds. A file of an older format is converted in memory (`convert`):
    /// it reads as usual, at the cost of about its items' size in RAM; the file keeps its format
    /// until a writable open converts it.
    pub fn open_read_only(
        path: impl AsRef<Path>,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| file_error(&path, e, "read", true))?;
        refuse_empty(&path, &file)?;
        Db::open_file(path, file, true, schema, options)
    }

    fn open_file(
        path: PathBuf,
        file: File,
        read_only: bool,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let storage = if read_only {
            FileStorage::read_only(file)
        } else {
            FileStorage::read_write(file)
        };
        let storage = Arc::new(storage.map_err(|e| OpenError::Storage {
            path: path.clone(),
            source: Box::new(match e {
                LockError::InUse => redb::DatabaseError::DatabaseAlreadyOpen,
                LockError::Io(e) => e.into(),
            }),
        })?);
        let repair_path = path.clone();
        let opened = damage::catch(|| {
            let db = redb::Builder::new()
                .set_cache_size(options.cache_bytes)
                .set_repair_callback(move |session| {
                    tracing::warn!(
                        path = %repair_path.display(),
                        progress = session.progress(),
                        "repairing the database file's allocator state (it was not closed cleanly){}",
                        if read_only { ", in memory only" } else { "" }
                    );
                })
                .create_with_backend(SharedBackend(storage.clone()))
                .map_err(|e| damage::open_error(&path, e))?;
            Db::start(
                db,
                path.clone(),
                None,
                Some(storage.clone()),
                read_only,
                schema,
                options,
            )
        });
        opened.unwrap_or_else(|detail| Err(OpenError::Damaged { path, detail }))
    }

    /// Opens a new, empty database held in memory only: nothing survives the last handle. Its
    /// storage holds only the pages written (an empty database costs a few KiB besides the
    /// cache), so a process can hold thousands (the fleet simulator's devices); every other
    /// behaviour, hooks and durability modes included, is that of a file.
    pub fn open_in_memory(schema: Arc<Schema>, options: DbOptions) -> Result<Db, OpenError> {
        let path = PathBuf::from(":memory:");
        let backend = Arc::new(memory::SparseMemoryBackend::default());
        let db = redb::Builder::new()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(SharedBackend(backend.clone()))
            .map_err(|source| OpenError::Storage {
                path: path.clone(),
                source: Box::new(source),
            })?;
        Db::start(db, path, Some(backend), None, false, schema, options)
    }

    fn start(
        db: redb::Database,
        path: PathBuf,
        memory: Option<Arc<memory::SparseMemoryBackend>>,
        storage: Option<Arc<FileStorage>>,
        read_only: bool,
        schema: Arc<Schema>,
        options: DbOptions,
    ) -> Result<Db, OpenError> {
        let index_tables = schema
            .secondary_indexes()
            .iter()
            .map(|i| tables::index_table_name(&i.name))
            .collect();
        let has_unique = unique::schema_has_unique(&schema);
        let model_names: Vec<String> = schema.models().map(|m| m.name().to_string()).collect();
        let item_tables = model_names
            .iter()
            .map(|m| tables::items_table_name(m))
            .collect();
        let inner = Arc::new(Inner {
            db: ManuallyDrop::new(db),
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
            memory,
            storage,
            damaged: OnceLock::new(),
            read_only,
        });
        let converted = convert::check_format(&inner)?;
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

    /// For an in-memory database, the bytes its storage holds (redb's cache aside); `None` for
    /// a file.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.inner.memory.as_ref().map(|m| m.resident_bytes())
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
    /// waits for durability in `immediate` mode), rolls back when it returns Err.
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
            let mut tx = inner.db.begin_write()?;
            tx.set_durability(redb::Durability::None);
            let (value, changes) = {
                let mut indexes = Vec::with_capacity(inner.index_tables.len());
                for name in &inner.index_tables {
                    indexes.push(tx.open_table(tables::index_def(name))?);
                }
                let unique = if inner.has_unique {
                    Some(tx.open_table(unique::UNIQUE)?)
                } else {
                    None
                };
                let mut wtx = WriteTxn {
                    inner,
                    tx: &tx,
                    items: RefCell::new(Vec::new()),
                    ttl: tx.open_table(tables::TTL)?,
                    indexes,
                    unique,
                    side: txn::OpenedSide::new(&tx),
                    origin,
                    now_ms: (inner.options.clock)(),
                    changes: Vec::new(),
                };
                let value = f(&mut wtx)?;
                (value, wtx.take_changes())
            };
            // A lone writer in `immediate` mode commits durably at once (one fsync); when others
            // wait behind it, it commits non-durably and they share one flush (group commit).
            let lone = inner.options.durability == Durability::Immediate
                && inner.waiting.load(Ordering::SeqCst) == 0;
            if lone {
                tx.set_durability(redb::Durability::Immediate);
            }
            tx.commit()?;
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

    /// A read snapshot for several reads.
    pub fn read(&self) -> Result<ReadTxn, DbError> {
        let tx = self.inner.engine(|| Ok(self.inner.db.begin_read()?))?;
        Ok(ReadTxn {
            items: Mutex::new(Vec::new()),
            inner: self.inner.clone(),
            tx,
            now_ms: (self.inner.options.clock)(),
        })
    }

    /// Creates an item of `model`; returns it (without hidden fields).
    pub fn create(&self, model: &str, item: &Item) -> Result<Item, DbError> {
        self.write(Origin::Local, |t| t.create(model, item))
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

    /// Reads side tables (replication state) in a snapshot.
    pub fn side_scan(
        &self,
        table: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<SideEntries, DbError> {
        self.inner.engine(|| {
            let tx = self.inner.db.begin_read()?;
            let name = tables::side_table_name(table);
            let t = match tx.open_table(tables::side_def(&name)) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            tables::side_entries(&t, start, limit)
        })
    }

    /// One entry of a side table.
    pub fn side_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.inner.engine(|| {
            let tx = self.inner.db.begin_read()?;
            let name = tables::side_table_name(table);
            let t = match tx.open_table(tables::side_def(&name)) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let value = t.get(key)?.map(|v| v.value().to_vec());
            Ok(value)
        })
    }

    /// Number of entries in a side table.
    pub fn side_len(&self, table: &str) -> Result<u64, DbError> {
        self.inner.engine(|| {
            let tx = self.inner.db.begin_read()?;
            let name = tables::side_table_name(table);
            match tx.open_table(tables::side_def(&name)) {
                Ok(t) => Ok(t.len()?),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
                Err(e) => Err(e.into()),
            }
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
        // A handle latched by a panic says so even when nothing waits for a flush.
        inner.engine(|| Ok(()))?;
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

    /// Writes every item (complete, one JSON object per line); returns the count.
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
    match damage::classify(path, e) {
        DbError::Damaged { path, detail } => OpenError::Damaged { path, detail },
        DbError::Storage(source) => OpenError::Tables {
            path: path.to_path_buf(),
            source,
        },
        other => OpenError::Tables {
            path: path.to_path_buf(),
            source: Box::new(redb::Error::Corrupted(other.to_string())),
        },
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
            source: Box::new(e.into()),
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

/// Prepares the tables in one transaction at open: creates the fixed ones, rebuilds the
/// secondary indexes whose definition changed, records the schema (`record`) and brings the
/// `unique` table in line with the schema's unique fields (not for read-only opens, which
/// write nothing: redb's writes there stay in memory).
fn prepare_tables(
    inner: &Inner,
    record: Option<&schema_record::Record>,
    stray: bool,
) -> Result<(), OpenError> {
    let fail = |e: unique::PrepareError| match e {
        unique::PrepareError::Db(e) => tables_error(&inner.path, e),
        unique::PrepareError::Open(e) => *e,
    };
    prepare_tables_in(inner, record, stray).map_err(fail)
}

fn prepare_tables_in(
    inner: &Inner,
    record: Option<&schema_record::Record>,
    stray: bool,
) -> Result<(), unique::PrepareError> {
    let mut tx = inner.db.begin_write().map_err(DbError::from)?;
    tx.set_durability(redb::Durability::Immediate);
    for name in &inner.item_tables {
        tx.open_table(tables::items_def(name))?;
    }
    warn_unread_models(inner, &tx)?;
    tx.open_table(tables::TTL)?;
    let mut stale = Vec::new();
    {
        let mut meta = tx.open_table(tables::META)?;
        if let Some(record) = record {
            record.write(&mut meta)?;
        }
        if stray {
            meta.insert(tables::STRAY_KEYS_KEY, "1")?;
        }
        let recorded_stray = meta.get(tables::STRAY_KEYS_KEY)?.is_some();
        inner
            .stray_keys
            .store(stray || recorded_stray, Ordering::Relaxed);
        for (index, name) in inner
            .schema
            .secondary_indexes()
            .iter()
            .zip(&inner.index_tables)
        {
            let def = format!("{}|{}", index.hash, index.sort.as_deref().unwrap_or(""));
            let key = format!("index:{}", index.name);
            let current = meta.get(key.as_str())?.map(|v| v.value().to_string());
            if current.as_deref() != Some(def.as_str()) {
                meta.insert(key.as_str(), def.as_str())?;
                stale.push((index.clone(), name.clone()));
            }
        }
    }
    for (index, name) in stale {
        tx.delete_table(tables::index_def(&name))?;
        let mut table = tx.open_table(tables::index_def(&name))?;
        for (model, items_name) in inner.schema.models().zip(&inner.item_tables) {
            let items = tx.open_table(tables::items_def(items_name))?;
            for entry in items.iter()? {
                let (k, v) = entry?;
                let item = read::decode_item(v.value(), k.value())?;
                let Some(key) = keys::decode_item_key(k.value()) else {
                    continue;
                };
                if let Some((hash, sort)) = model.index_key(&item, &index) {
                    table.insert(keys::index_key(&hash, &sort, &key).as_slice(), ())?;
                }
            }
        }
        tracing::info!(index = %index.name, "built secondary index");
    }
    if !inner.read_only {
        unique::prepare(&tx, &inner.schema, (inner.options.clock)(), &inner.path)?;
    }
    tx.commit().map_err(DbError::from)?;
    Ok(())
}

/// Items tables of models the schema no longer has (removed by a change accepted with
/// [`DbOptions::allow_schema_change`]) stay in the file, unread: no read, export or key check
/// sees them. Said at every open, with their count, so they are not lost silently.
fn warn_unread_models(inner: &Inner, tx: &redb::WriteTransaction) -> Result<(), DbError> {
    let orphans: Vec<String> = tx
        .list_tables()?
        .map(|t| redb::TableHandle::name(&t).to_string())
        .filter(|name| {
            name.strip_prefix(tables::ITEMS_PREFIX)
                .is_some_and(|model| inner.slot(model).is_err())
        })
        .collect();
    for name in orphans {
        let items = tx.open_table(tables::items_def(&name))?.len()?;
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

/// A storage handed to redb, which takes its backend by value: the database keeps a second
/// handle (to tell an in-memory storage's size, to close a damaged file).
#[derive(Debug)]
struct SharedBackend<B>(Arc<B>);

impl<B: redb::StorageBackend> redb::StorageBackend for SharedBackend<B> {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.0.len()
    }
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        self.0.read(offset, len)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
        self.0.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.0.write(offset, data)
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
