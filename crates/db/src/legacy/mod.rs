//! The redb files of earlier versions (formats 1 to 3), converted to the log at open. This is
//! the only place redb is used.
//!
//! A file that is not a log ([`LogOpenError::NotALog`](devtables_logstore::LogOpenError)) and
//! starts with redb's header ([`REDB_MAGIC`]) is opened through a read-only storage (`storage`:
//! redb's own writes stay in memory, the file is untouched), brought to format 3 there
//! (`convert`: formats 1 and 2), and every table of format 3 is copied into a new log:
//! - writable open: the log is written beside the file, at `<path>.converting` (created fresh;
//!   one left by an earlier attempt is removed first), made durable and closed, then renamed
//!   over `<path>` and the directory synced. A crash at any point leaves either the whole redb
//!   file (converted again at the next open) or the whole log.
//! - read-only open: the log is an in-memory store; the file is never written.
//!
//! redb 2.x panics on some damaged files, so the conversion runs under `catch_unwind`
//! (`damage`): a panic, or redb's own "corrupted" answer, is [`OpenError::Damaged`].

mod convert;
mod damage;
mod storage;

use std::fs::File;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devtables_logstore::{LogError, LogOpenError, LogOptions, LogStore};
use devtables_schema::Schema;
use redb::{ReadableTable, TableDefinition, TableHandle};

use crate::error::cut;
use crate::{tables, DbError, OpenError};
use storage::{FileStorage, LockError};

/// The first bytes of every redb 2.x file (redb's `MAGICNUMBER`, `page_store/header.rs`).
pub const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Bytes of table entries copied per log record before the next (the last is durable): a
/// large file never makes one record past the log's limit.
const COPY_BATCH_BYTES: usize = 8 * 1024 * 1024;

type Bytes = &'static [u8];
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// What the conversion found, for the open to act on.
#[derive(Default)]
pub(crate) struct Converted {
    /// Some converted item's key is one its model's key templates cannot produce (or its model
    /// is not in the schema): lookups by key alone must ask every model's table.
    pub(crate) stray_keys: bool,
}

/// Why a conversion step failed, before it is told as an [`OpenError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum LegacyError {
    #[error("redb: {0}")]
    Redb(Box<redb::Error>),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("writing the log: {0}")]
    Log(#[from] LogError),
    #[error("creating the log: {0}")]
    LogOpen(#[from] LogOpenError),
    #[error("{0}")]
    Open(Box<OpenError>),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for LegacyError {
            fn from(e: $t) -> Self {
                LegacyError::Redb(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl LegacyError {
    fn into_open_error(self, path: &Path) -> OpenError {
        let damaged = |detail: String| OpenError::Damaged {
            path: path.to_path_buf(),
            detail,
        };
        match self {
            LegacyError::Open(e) => *e,
            LegacyError::Redb(e) => match damage::redb_damage(&e) {
                Some(detail) => damaged(detail),
                None => OpenError::Convert {
                    path: path.to_path_buf(),
                    detail: cut(&e.to_string()),
                },
            },
            LegacyError::Db(DbError::Corrupt(msg)) => {
                damaged(format!("stored data: {}", cut(&msg)))
            }
            LegacyError::LogOpen(e) => OpenError::Storage {
                path: path.to_path_buf(),
                error: Box::new(e),
            },
            LegacyError::Log(LogError::Damaged { offset, detail }) => {
                damaged(format!("the new log at byte {offset}: {}", cut(&detail)))
            }
            other => OpenError::Convert {
                path: path.to_path_buf(),
                detail: cut(&other.to_string()),
            },
        }
    }
}

/// Whether the file at `path` starts with redb's header.
pub(crate) fn is_redb_file(path: &Path) -> std::io::Result<bool> {
    let mut head = [0u8; REDB_MAGIC.len()];
    let mut file = File::open(path)?;
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(head == REDB_MAGIC)
}

/// Where a writable conversion writes the log before it replaces the redb file.
fn converting_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".converting");
    PathBuf::from(name)
}

/// Converts the redb file at `path` into a log (see the module doc); returns the store to run
/// on: the log that replaced the file, or for `read_only` an in-memory one.
pub(crate) fn convert(
    path: &Path,
    read_only: bool,
    schema: &Schema,
) -> Result<(LogStore, Converted), OpenError> {
    let access = if read_only { "read" } else { "read and write" };
    let file = File::open(path).map_err(|e| crate::file_error(path, e, access, true))?;
    let storage = FileStorage::read_only(file, !read_only).map_err(|e| match e {
        LockError::InUse => OpenError::Storage {
            path: path.to_path_buf(),
            error: Box::new(LogOpenError::InUse {
                path: path.to_path_buf(),
            }),
        },
        LockError::Io(e) => crate::file_error(path, e, access, true),
    })?;
    let storage = Arc::new(storage);
    let outcome = damage::catch(|| convert_in(path, &storage, read_only, schema));
    match outcome {
        Ok(result) => result,
        Err(detail) => {
            // redb's handle was leaked (see `damage`): its file is let go of here.
            storage.close();
            Err(OpenError::Damaged {
                path: path.to_path_buf(),
                detail,
            })
        }
    }
}

fn convert_in(
    path: &Path,
    storage: &Arc<FileStorage>,
    read_only: bool,
    schema: &Schema,
) -> Result<(LogStore, Converted), OpenError> {
    let repair_path = path.to_path_buf();
    let db = redb::Builder::new()
        .set_repair_callback(move |session| {
            tracing::warn!(
                path = %repair_path.display(),
                progress = session.progress(),
                "repairing the redb file's allocator state (it was not closed cleanly), in memory only"
            );
        })
        .create_with_backend(SharedBackend(storage.clone()))
        .map_err(|e| damage::open_error(path, e))?;
    // Leaked if a panic comes out of redb (see `damage`); dropped otherwise, error or not,
    // which releases the file.
    let db = ManuallyDrop::new(db);
    let result = convert_with(&db, path, read_only, schema);
    drop(ManuallyDrop::into_inner(db));
    let (store, from, converted) = result?;
    tracing::info!(
        path = %path.display(),
        "converted the redb file of format {from} to the log (format {}){}",
        crate::format::FORMAT,
        if read_only {
            " in memory only (read-only open): open it writable once to convert the file itself"
        } else {
            ""
        }
    );
    Ok((store, converted))
}

/// The conversion proper, on the open redb file; returns the store, the redb format found and
/// what the conversion found.
fn convert_with(
    db: &redb::Database,
    path: &Path,
    read_only: bool,
    schema: &Schema,
) -> Result<(LogStore, u32, Converted), OpenError> {
    let (from, converted) =
        convert::to_format_3(db, path, schema).map_err(|e| e.into_open_error(path))?;
    if read_only {
        let store = LogStore::in_memory(LogOptions::default());
        copy_tables(db, &store).map_err(|e| e.into_open_error(path))?;
        return Ok((store, from, converted));
    }
    let target = converting_path(path);
    match std::fs::remove_file(&target) {
        Ok(()) => {
            tracing::warn!(path = %target.display(), "removed the log an earlier conversion left unfinished")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(crate::file_error(&target, e, "remove", false)),
    }
    if let Err(e) = write_log(db, &target) {
        let _ = std::fs::remove_file(&target);
        return Err(e.into_open_error(path));
    }
    // The log is whole and durable: from here a crash leaves it in place of the redb file.
    std::fs::rename(&target, path).map_err(|e| crate::file_error(path, e, "replace", false))?;
    devtables_logstore::sync_parent_dir(path)
        .map_err(|e| crate::file_error(path, e, "sync the directory of", false))?;
    let store = LogStore::open(path, LogOptions::default()).map_err(|e| OpenError::Storage {
        path: path.to_path_buf(),
        error: Box::new(e),
    })?;
    Ok((store, from, converted))
}

/// Writes the log of `db`'s tables at `target`, durably, and closes it.
fn write_log(db: &redb::Database, target: &Path) -> Result<(), LegacyError> {
    let store = LogStore::open(target, LogOptions::default())?;
    copy_tables(db, &store)?;
    store.close()?;
    Ok(())
}

/// How a table of format 3 is typed in redb, by its name.
enum Kind {
    /// `meta`: text to text.
    Text,
    /// `ttl`, `idx:*`: keys alone.
    KeysOnly,
    /// Every other table: bytes to bytes.
    Bytes,
}

fn kind_of(name: &str) -> Kind {
    if name == tables::META {
        Kind::Text
    } else if name == tables::TTL || name.starts_with("idx:") {
        Kind::KeysOnly
    } else {
        Kind::Bytes
    }
}

/// Writes entries into a store in records of about [`COPY_BATCH_BYTES`].
struct Copier<'s> {
    store: &'s LogStore,
    tx: Option<devtables_logstore::LogWrite<'s>>,
    pending: usize,
}

impl<'s> Copier<'s> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), LegacyError> {
        if self.tx.is_none() {
            self.tx = Some(self.store.write()?);
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.insert(table, key, value)?;
        }
        self.pending += key.len() + value.len();
        if self.pending >= COPY_BATCH_BYTES {
            if let Some(full) = self.tx.take() {
                full.commit(false)?;
            }
            self.pending = 0;
        }
        Ok(())
    }

    /// Sets the log's format and commits durably, which persists the earlier records too.
    fn finish(mut self) -> Result<(), LegacyError> {
        let mut tx = match self.tx.take() {
            Some(tx) => tx,
            None => self.store.write()?,
        };
        tables::meta_put(
            &mut tx,
            tables::FORMAT_KEY,
            &crate::format::FORMAT.to_string(),
        )?;
        tx.commit(true)?;
        Ok(())
    }
}

/// Copies every table of the format-3 redb `db` into `store`, with the format set to the
/// log's; the last commit is durable, and persists the earlier ones.
fn copy_tables(db: &redb::Database, store: &LogStore) -> Result<(), LegacyError> {
    let read = db.begin_read()?;
    let mut copier = Copier {
        store,
        tx: None,
        pending: 0,
    };
    for handle in read.list_tables()? {
        let name = handle.name().to_string();
        match kind_of(&name) {
            Kind::Text => {
                for entry in read.open_table(META)?.iter()? {
                    let (k, v) = entry?;
                    copier.put(&name, k.value().as_bytes(), v.value().as_bytes())?;
                }
            }
            Kind::KeysOnly => {
                let def: TableDefinition<Bytes, ()> = TableDefinition::new(&name);
                for entry in read.open_table(def)?.iter()? {
                    let (k, _) = entry?;
                    copier.put(&name, k.value(), &[])?;
                }
            }
            Kind::Bytes => {
                let def: TableDefinition<Bytes, Bytes> = TableDefinition::new(&name);
                for entry in read.open_table(def)?.iter()? {
                    let (k, v) = entry?;
                    copier.put(&name, k.value(), v.value())?;
                }
            }
        }
    }
    copier.finish()
}

/// A copy of `store` in RAM: what a read-only open changes without writing the file.
pub(crate) fn copy_to_memory(store: &LogStore) -> Result<LogStore, DbError> {
    let copy = LogStore::in_memory(LogOptions::default());
    let read = store.read()?;
    let mut tx = copy.write()?;
    for name in read.table_names() {
        let Some(table) = read.table(&name) else {
            continue;
        };
        for entry in table.range(tables::ALL) {
            let (k, v) = entry?;
            tx.insert(&name, k, &v)?;
        }
    }
    tx.commit(false)?;
    Ok(copy)
}

/// A storage handed to redb, which takes its backend by value: the conversion keeps a second
/// handle, to close the file when redb panicked on it.
#[derive(Debug)]
struct SharedBackend(Arc<FileStorage>);

impl redb::StorageBackend for SharedBackend {
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

/// Test support, not an API: writes the tables of the log at `log` into a new redb file at
/// `redb_file`, as format 3 laid them out (`meta` `format` = 3), so tests can make the files
/// earlier versions wrote from a database this version wrote.
#[doc(hidden)]
pub fn write_fixture(log: &Path, redb_file: &Path) -> Result<(), String> {
    let store = LogStore::open_read_only(log, LogOptions::default()).map_err(|e| e.to_string())?;
    let db = redb::Database::create(redb_file).map_err(|e| e.to_string())?;
    let read = store.read().map_err(|e| e.to_string())?;
    let tx = db.begin_write().map_err(|e| e.to_string())?;
    for name in read.table_names() {
        let Some(table) = read.table(&name) else {
            continue;
        };
        let entries: Vec<(Vec<u8>, Vec<u8>)> = table
            .range(tables::ALL)
            .map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|e| e.to_string());
        match kind_of(&name) {
            Kind::Text => {
                let mut t = tx.open_table(META).map_err(|e| e.to_string())?;
                for (k, v) in &entries {
                    let v = if k.as_slice() == tables::FORMAT_KEY.as_bytes() {
                        convert::FORMAT.to_string()
                    } else {
                        text(v)?
                    };
                    t.insert(text(k)?.as_str(), v.as_str())
                        .map_err(|e| e.to_string())?;
                }
            }
            Kind::KeysOnly => {
                let def: TableDefinition<Bytes, ()> = TableDefinition::new(&name);
                let mut t = tx.open_table(def).map_err(|e| e.to_string())?;
                for (k, _) in &entries {
                    t.insert(k.as_slice(), ()).map_err(|e| e.to_string())?;
                }
            }
            Kind::Bytes => {
                let def: TableDefinition<Bytes, Bytes> = TableDefinition::new(&name);
                let mut t = tx.open_table(def).map_err(|e| e.to_string())?;
                for (k, v) in &entries {
                    t.insert(k.as_slice(), v.as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    tx.commit().map_err(|e| e.to_string())?;
    Ok(())
}
