//! The device database's storage engine: named, ordered tables of byte keys and byte values,
//! indexed in RAM, over one append-only, checksummed log file.
//!
//! Why not a B-tree file (redb, which `devtables-db` used up to its format 3): a device writes
//! one small item at a time, and a copy-on-write B-tree rewrites whole pages for each (5-9 KB
//! written per update or remove, measured in docs/benchmarks.md), which wears flash and bounds
//! updates and removes. Here a commit appends one record (the transaction's changes, a few
//! hundred bytes) and the index that finds things lives in RAM; the file is replayed at open and
//! compacted when garbage outweighs live data.
//!
//! # Contract (what `devtables-db` relies on)
//! - A table is a name (UTF-8, at most [`MAX_TABLE_NAME`] bytes) holding keys in byte order,
//!   each with a value (possibly empty). A table exists once a key was inserted into it and
//!   until [`LogWrite::delete_table`]; an empty table may or may not be listed.
//! - One writer at a time ([`LogStore::write`] blocks until the slot is free). A write
//!   transaction sees its own changes; nobody else does until [`LogWrite::commit`]. Dropping it
//!   without commit changes nothing (no byte is written before commit).
//! - [`LogWrite::insert_absent`] is the insert of a key the caller has just found absent in
//!   the same transaction: it skips the committed-state lookup an insert makes to keep the
//!   table's length and live bytes right, so the caller's word must be true (a key the
//!   transaction's own changes hold is refused, a committed one is a debug assertion).
//! - A commit is atomic: after a crash (kill -9, power loss) at any point, an open finds either
//!   all of its changes or none, whatever the commit's `durable` flag was. With `durable` the
//!   commit is on stable storage when `commit` returns (`fdatasync`); without, it is in the
//!   operating system's cache (it survives the process's death, not a power loss) until the
//!   next durable commit or [`LogStore::sync`], which persist every earlier commit too.
//! - Reads ([`LogStore::read`], [`LogWrite::get`]...) see the last committed state. A
//!   [`LogRead`] holds a shared lock for its lifetime and commits wait for it, so hold one
//!   only for the duration of one operation, and never open a write transaction or a second
//!   [`LogRead`] on the same thread while holding one.
//! - Hostile files: an open of a file that is not a log fails with [`LogOpenError::NotALog`]
//!   (the caller may know other formats); a log whose bytes are wrong fails with
//!   [`LogOpenError::Damaged`] naming the offset; never a panic. The only damage repaired on
//!   its own is a torn tail: a bad record after which no valid record was written when the
//!   file was already durable past it (each record says how far the file was durable when it
//!   was written): a commit a crash cut short, or pages a power loss left unwritten while
//!   later, equally non-durable ones reached the disk. A read-write open truncates it there,
//!   with whatever follows (logged at warn: only commits that were never durable go); a
//!   read-only open ignores it. Limit: a durable commit's own durability is only recorded by the
//!   records after it, so bad bytes before the last durable commit, in a stretch written
//!   without a sync, cut that commit too; a power loss cannot cause that (the commit's sync
//!   covered them), only a medium that changes bytes it had written.
//! - A read-only open ([`LogStore::open_read_only`]) never writes the file and takes a shared
//!   lock; a read-write open takes an exclusive one (`flock`), so two processes never write one
//!   file.
//!
//! # Layout
//! - `format`: the bytes of the file (header, record framing, operations), encode and decode.
//! - `state`: the committed tables in RAM and the counters behind [`LogStats`].
//! - `index`: one table's keys and value locations in RAM, front-coded in sorted pages with a
//!   small map of recent changes on top (the bulk of the store's RAM).
//! - `replay`: open: lock, header, replay, torn tail or damage.
//! - `write`: a write transaction's overlay and its commit.
//! - `compact`: rewriting the file as its live entries.
//! - `file`: locks and directory syncs.
//!
//! # File format (version 1)
//! - Header, 16 bytes: [`MAGIC`] (8 bytes), format version (u32 LE), 4 reserved zero bytes.
//! - Then records, each: payload length (u32 LE), CRC-32 of the next two fields (u32 LE),
//!   `synced` (u64 LE: every byte of the file before this offset was durable when the record
//!   was written; 0 claims nothing), payload.
//!   A payload is a sequence of operations, each one tag byte then its fields (integers LE,
//!   lengths as u32 LE):
//!   `1` define table (table id u32, name length, name), `2` insert (table id, key length,
//!   key, value length, value), `3` remove (table id, key length, key), `4` delete table
//!   (table id). A table id is defined (in the same or an earlier record) before it is used;
//!   a compaction rewrites the file as definitions and inserts only.
//! - Bounds: a record's payload is at most [`LogOptions::max_record_bytes`]; a key at most
//!   [`MAX_KEY_BYTES`]; anything beyond is refused at commit ([`LogError::TooLarge`]) and
//!   reported as damage when read from a file.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use index::IndexRange;
use state::{range_is_valid, KeyArena, SlotRef, State, Table};
use write::{Overlay, Writer};

/// The first 8 bytes of every log file.
pub const MAGIC: [u8; 8] = *b"DTLOG\0\r\n";
/// The file format this version writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Longest table name, in bytes.
pub const MAX_TABLE_NAME: usize = 255;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 64 * 1024;

/// How a store is opened. Every limit is here.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Largest record (one transaction's payload) written or read, in bytes.
    pub max_record_bytes: u32,
    /// Values up to this many bytes are kept in RAM beside their key; longer ones are read
    /// from the file when asked for (an in-memory store keeps every value in RAM).
    pub inline_value_bytes: usize,
    /// [`LogStore::compact_if_worth`] compacts only a file at least this large...
    pub compact_min_file_bytes: u64,
    /// ...and only when the file is at least this many times its live bytes.
    pub compact_ratio: f64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            max_record_bytes: 64 * 1024 * 1024,
            inline_value_bytes: 32,
            compact_min_file_bytes: 1024 * 1024,
            compact_ratio: 2.0,
        }
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogOpenError {
    #[error("{path}: in use by another handle or process (the log is locked)")]
    InUse { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not empty and does not start with [`MAGIC`]: some other format.
    #[error("{path}: not a devtables log file")]
    NotALog { path: PathBuf },
    #[error("{path}: log format {found} is newer than this build reads ({FORMAT_VERSION})")]
    NewerFormat { path: PathBuf, found: u32 },
    #[error("{path}: damaged at byte {offset}: {detail}")]
    Damaged {
        path: PathBuf,
        offset: u64,
        detail: String,
    },
}

/// Why an operation on an open store failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O: {0}")]
    Io(#[from] io::Error),
    /// Stored bytes read after the open are wrong (a value's location outside the file...).
    #[error("log damaged at byte {offset}: {detail}")]
    Damaged { offset: u64, detail: String },
    #[error("the log store is closed")]
    Closed,
    #[error("the log store is open read-only")]
    ReadOnly,
    /// [`LogWrite::insert_absent`] of a key the transaction holds.
    #[error("insert of a key said to be absent, but table {table:?} holds it")]
    KeyPresent { table: String },
    #[error("{what} is {bytes} bytes, more than the limit of {max}")]
    TooLarge {
        what: &'static str,
        bytes: u64,
        max: u64,
    },
}

/// Sizes, for status and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LogStats {
    /// Bytes of the file (0 in memory).
    pub file_bytes: u64,
    /// Bytes a compaction right now would write (headers, definitions, live entries).
    pub live_bytes: u64,
    /// Approximate bytes of RAM held by the index and the values kept in RAM.
    pub memory_bytes: u64,
    /// Keys across all tables.
    pub entries: u64,
    /// Compactions since open.
    pub compactions: u64,
}

mod compact;
mod file;
mod format;
mod index;
mod replay;
mod state;
mod write;

/// Makes a file created or renamed in `path`'s directory survive a power loss (the
/// directory's own `fsync`): for callers that rename files beside a log, as the device
/// database does when it converts an older file.
pub use file::sync_parent_dir;

/// What every clone of a store shares.
struct Inner {
    /// The log file's path; `None` for an in-memory store.
    path: Option<PathBuf>,
    options: LogOptions,
    read_only: bool,
    /// The committed state readers see (and the file handle its slots point into).
    state: RwLock<State>,
    /// The writer slot: one write transaction, compaction or close at a time.
    writer: Mutex<Writer>,
    /// Whether a commit went to the file since the last `fdatasync` (so `sync`, `close` and the
    /// last drop know whether there is anything to flush).
    unsynced: AtomicBool,
    /// Every byte of the file before this offset is known durable: each record carries it
    /// (`format::RecordHead::synced`), so replay tells a commit a power loss left unwritten
    /// (after it) from damage to durable bytes (before it).
    synced_end: AtomicU64,
}

impl Inner {
    /// The state for reading. A panic while the lock was held cannot leave the state half
    /// changed (every change is applied in full under the lock, with no fallible step), so a
    /// poisoned lock is used as it is.
    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the writer slot of a store that may write and is open.
    fn writer_for_change(&self) -> Result<MutexGuard<'_, Writer>, LogError> {
        if self.read_only {
            return Err(LogError::ReadOnly);
        }
        let writer = self.writer();
        if self.read_state().closed {
            return Err(LogError::Closed);
        }
        writer.check_usable()?;
        Ok(writer)
    }

    /// `fdatasync`s the file when a commit is not yet durable. `end`: the end of the last
    /// record applied when the caller took `file` (every byte before it was written), which
    /// is durable once this returns Ok.
    fn sync_file(&self, file: &File, end: u64) -> io::Result<()> {
        if self.unsynced.swap(false, Ordering::SeqCst) {
            if let Err(e) = file.sync_data() {
                self.unsynced.store(true, Ordering::SeqCst);
                return Err(e);
            }
            self.synced_end.fetch_max(end, Ordering::SeqCst);
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return;
        }
        if let Some(file) = state.file.clone() {
            let end = state.file_bytes;
            if let Err(e) = self.sync_file(&file, end) {
                tracing::error!(path = ?self.path, error = %e, "syncing the log as its last handle closed it failed");
            }
        }
    }
}

/// An open store. Cheap to clone; clones share one file. The file is closed when the last
/// clone is dropped or by [`LogStore::close`].
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.inner.path)
            .field("read_only", &self.inner.read_only)
            .finish_non_exhaustive()
    }
}

impl LogStore {
    fn from_parts(
        path: Option<PathBuf>,
        options: LogOptions,
        read_only: bool,
        state: State,
        writer: Writer,
    ) -> LogStore {
        // An open made the replayed file durable (`replay::open`); an in-memory store has none.
        let synced_end = writer.end;
        LogStore {
            inner: Arc::new(Inner {
                path,
                options,
                read_only,
                state: RwLock::new(state),
                writer: Mutex::new(writer),
                unsynced: AtomicBool::new(false),
                synced_end: AtomicU64::new(synced_end),
            }),
        }
    }

    fn open_with(
        path: &Path,
        options: LogOptions,
        read_only: bool,
    ) -> Result<LogStore, LogOpenError> {
        let opened = replay::open(path, &options, read_only)?;
        let writer = Writer {
            end: opened.end,
            next_table_id: opened.next_table_id,
            failed: None,
        };
        Ok(LogStore::from_parts(
            Some(path.to_path_buf()),
            options,
            read_only,
            opened.state,
            writer,
        ))
    }

    /// Opens the log at `path` for reading and writing, creating it when missing (an empty
    /// file becomes an empty store). Replays every record; truncates a torn tail.
    pub fn open(path: &Path, options: LogOptions) -> Result<LogStore, LogOpenError> {
        LogStore::open_with(path, options, false)
    }

    /// Opens the log at `path` without ever writing it (shared lock); a missing file is an
    /// I/O error (`NotFound`). Writes are refused with [`LogError::ReadOnly`].
    pub fn open_read_only(path: &Path, options: LogOptions) -> Result<LogStore, LogOpenError> {
        LogStore::open_with(path, options, true)
    }

    /// A store with no file: everything in RAM, gone with the last clone.
    pub fn in_memory(options: LogOptions) -> LogStore {
        let writer = Writer {
            end: 0,
            next_table_id: 1,
            failed: None,
        };
        LogStore::from_parts(None, options, false, State::default(), writer)
    }

    /// Whether the store was opened with [`LogStore::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    /// The file's path (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// A view of the last committed state, for one operation (see the crate docs).
    pub fn read(&self) -> Result<LogRead<'_>, LogError> {
        let state = self.inner.read_state();
        if state.closed {
            return Err(LogError::Closed);
        }
        Ok(LogRead {
            state,
            keys: KeyArena::default(),
        })
    }

    /// The write transaction, once the writer slot is free (blocks until then).
    pub fn write(&self) -> Result<LogWrite<'_>, LogError> {
        let writer = self.inner.writer_for_change()?;
        Ok(LogWrite {
            inner: &self.inner,
            writer,
            overlay: Overlay::default(),
        })
    }

    /// Makes every committed transaction durable (`fdatasync`); nothing to do when all are.
    pub fn sync(&self) -> Result<(), LogError> {
        let (file, end) = {
            let state = self.inner.read_state();
            if state.closed {
                return Err(LogError::Closed);
            }
            (state.file.clone(), state.file_bytes)
        };
        match file {
            Some(file) if !self.inner.read_only => Ok(self.inner.sync_file(&file, end)?),
            _ => Ok(()),
        }
    }

    /// Compacts when the file is at least `compact_min_file_bytes` and `compact_ratio` times
    /// its live bytes; returns whether it did. Takes the writer slot for its duration.
    pub fn compact_if_worth(&self) -> Result<bool, LogError> {
        let mut writer = self.inner.writer_for_change()?;
        let Some(path) = &self.inner.path else {
            return Ok(false);
        };
        let (file_bytes, live_bytes) = {
            let state = self.inner.read_state();
            (state.file_bytes, state.live_bytes())
        };
        let options = &self.inner.options;
        let worth = file_bytes >= options.compact_min_file_bytes
            && file_bytes as f64 >= options.compact_ratio * live_bytes as f64;
        if worth {
            compact::compact(&self.inner, path, &mut writer)?;
        }
        Ok(worth)
    }

    /// Rewrites the file as its live entries only: written beside it, made durable, renamed
    /// over it (a crash leaves the old file or the new one, whole). Takes the writer slot.
    pub fn compact(&self) -> Result<(), LogError> {
        let mut writer = self.inner.writer_for_change()?;
        match &self.inner.path {
            Some(path) => compact::compact(&self.inner, path, &mut writer),
            None => Ok(()),
        }
    }

    pub fn stats(&self) -> LogStats {
        let state = self.inner.read_state();
        LogStats {
            file_bytes: state.file_bytes,
            live_bytes: state.live_bytes(),
            memory_bytes: state.memory_bytes(),
            entries: state.entries(),
            compactions: state.compactions,
        }
    }

    /// Syncs what is committed (read-write stores), then releases the file and its lock: every
    /// later call fails with [`LogError::Closed`]. Idempotent.
    pub fn close(&self) -> Result<(), LogError> {
        // The writer slot: no commit is half way while the file goes.
        let _writer = self.inner.writer();
        let (file, end) = {
            let state = self.inner.read_state();
            if state.closed {
                return Ok(());
            }
            (state.file.clone(), state.file_bytes)
        };
        let synced = match &file {
            Some(file) if !self.inner.read_only => self.inner.sync_file(file, end),
            _ => Ok(()),
        };
        {
            let mut state = self.inner.write_state();
            state.closed = true;
            state.file = None;
            state.clear();
        }
        // The last handle of the file: closing it releases the lock.
        drop(file);
        Ok(synced?)
    }
}

/// A shared view of the last committed state (see the crate docs for how long to hold one).
pub struct LogRead<'s> {
    state: RwLockReadGuard<'s, State>,
    /// The keys its iterators decoded and lend out, kept until the view is dropped (the index
    /// stores keys front-coded, not whole).
    keys: KeyArena,
}

impl LogRead<'_> {
    /// The table called `name`, if it exists.
    pub fn table(&self, name: &str) -> Option<LogTable<'_>> {
        let table = self.state.tables.get(name)?;
        Some(LogTable {
            table,
            file: self.state.file.as_deref(),
            keys: &self.keys,
        })
    }

    /// The names of the tables that exist, in byte order.
    pub fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.state.tables.keys().cloned().collect();
        names.sort_unstable();
        names
    }
}

/// One table of a [`LogRead`].
pub struct LogTable<'r> {
    table: &'r Table,
    /// Where values not kept in RAM are read from.
    file: Option<&'r File>,
    /// Where iterators keep the keys they lend.
    keys: &'r KeyArena,
}

impl<'r> LogTable<'r> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Cow<'r, [u8]>>, LogError> {
        let table: &'r Table = self.table;
        table
            .index
            .get(key)
            .map(|slot| slot.read(self.file))
            .transpose()
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.table.index.contains(key)
    }

    pub fn len(&self) -> u64 {
        self.table.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries with keys in `range`, in key order (`.rev()` for descending); values are
    /// read from the file only as the iterator reaches them.
    pub fn range(&self, range: (Bound<&[u8]>, Bound<&[u8]>)) -> LogRange<'r> {
        LogRange {
            entries: self.entries(range),
            file: self.file,
        }
    }

    /// The keys in `range` alone (no value is read).
    pub fn keys(&self, range: (Bound<&[u8]>, Bound<&[u8]>)) -> LogKeys<'r> {
        LogKeys {
            entries: self.entries(range),
        }
    }

    fn entries(&self, range: (Bound<&[u8]>, Bound<&[u8]>)) -> Option<IndexRange<'r>> {
        let table: &'r Table = self.table;
        range_is_valid(range).then(|| table.index.range(range, self.keys))
    }
}

/// Entries of a table in a key range, either direction.
pub struct LogRange<'r> {
    /// `None` for a range that holds no key by its bounds alone.
    entries: Option<IndexRange<'r>>,
    file: Option<&'r File>,
}

impl<'r> LogRange<'r> {
    fn item(&self, (key, slot): (&'r [u8], SlotRef<'r>)) -> <Self as Iterator>::Item {
        Ok((key, slot.read(self.file)?))
    }
}

impl<'r> Iterator for LogRange<'r> {
    type Item = Result<(&'r [u8], Cow<'r, [u8]>), LogError>;
    fn next(&mut self) -> Option<Self::Item> {
        let entry = self.entries.as_mut()?.next()?;
        Some(self.item(entry))
    }
}

impl DoubleEndedIterator for LogRange<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let entry = self.entries.as_mut()?.next_back()?;
        Some(self.item(entry))
    }
}

/// Keys of a table in a key range, either direction.
pub struct LogKeys<'r> {
    entries: Option<IndexRange<'r>>,
}

impl<'r> Iterator for LogKeys<'r> {
    type Item = &'r [u8];
    fn next(&mut self) -> Option<Self::Item> {
        self.entries.as_mut()?.next().map(|(key, _)| key)
    }
}

impl DoubleEndedIterator for LogKeys<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.entries.as_mut()?.next_back().map(|(key, _)| key)
    }
}

/// The one write transaction: changes kept in RAM until [`LogWrite::commit`] appends them as
/// one record. Its reads see the committed state with its own changes on top.
pub struct LogWrite<'s> {
    inner: &'s Inner,
    /// The writer slot, held until commit or drop.
    writer: MutexGuard<'s, Writer>,
    overlay: Overlay,
}

fn check_size(what: &'static str, bytes: usize, max: usize) -> Result<(), LogError> {
    if bytes > max {
        return Err(LogError::TooLarge {
            what,
            bytes: bytes as u64,
            max: max as u64,
        });
    }
    Ok(())
}

impl<'s> LogWrite<'s> {
    pub fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        self.overlay.get(self.inner, table, key)
    }

    pub fn contains(&self, table: &str, key: &[u8]) -> Result<bool, LogError> {
        Ok(self.overlay.contains(self.inner, table, key))
    }

    pub fn len(&self, table: &str) -> Result<u64, LogError> {
        Ok(self.overlay.len(self.inner, table))
    }

    /// Entries of `table` in `range`, in key order or reversed, this transaction's changes
    /// merged in. Collects at most `limit` entries.
    // The signature spells the type out: it is the contract the database is written against.
    #[allow(clippy::type_complexity)]
    pub fn range(
        &self,
        table: &str,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, LogError> {
        self.overlay
            .range(self.inner, table, range, reverse, limit, true)
    }

    /// Keys of `table` in `range`, ascending, this transaction's changes merged in; at most
    /// `limit`.
    pub fn keys(
        &self,
        table: &str,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, LogError> {
        let entries = self
            .overlay
            .range(self.inner, table, range, false, limit, false)?;
        Ok(entries.into_iter().map(|(key, _)| key).collect())
    }

    /// Refuses a table name, key or value over its limit ([`LogError::TooLarge`]).
    fn check_record(&self, table: &str, key: &[u8], value: &[u8]) -> Result<(), LogError> {
        check_size("a table name", table.len(), MAX_TABLE_NAME)?;
        check_size("a key", key.len(), MAX_KEY_BYTES)?;
        check_size(
            "a value",
            value.len(),
            self.inner.options.max_record_bytes as usize,
        )
    }

    /// Inserts or replaces; refuses a table name or key over its limit ([`LogError::TooLarge`]).
    pub fn insert(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), LogError> {
        self.check_record(table, key, value)?;
        self.overlay.insert(self.inner, table, key, value);
        Ok(())
    }

    /// [`LogWrite::insert`] of a key the caller has just found absent in this transaction
    /// (a create's existence check): the committed state is not searched again, which is
    /// half the cost of an insert. Refuses a key this transaction's own changes hold
    /// ([`LogError::KeyPresent`], nothing changed); a key only the committed state holds is
    /// a bug of the caller's, caught by a debug assertion and otherwise not searched for
    /// (the table's length and live bytes would then count it twice). Key and value are
    /// taken by value: the caller's buffers become the transaction's, without a copy.
    pub fn insert_absent(
        &mut self,
        table: &str,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> Result<(), LogError> {
        self.check_record(table, &key, &value)?;
        if self.overlay.insert_absent(self.inner, table, key, value) {
            Ok(())
        } else {
            Err(LogError::KeyPresent {
                table: table.to_owned(),
            })
        }
    }

    /// Removes a key; returns whether it was there.
    pub fn remove(&mut self, table: &str, key: &[u8]) -> Result<bool, LogError> {
        Ok(self.overlay.remove(self.inner, table, key))
    }

    /// Deletes a table and every key in it; returns whether it existed.
    pub fn delete_table(&mut self, table: &str) -> Result<bool, LogError> {
        Ok(self.overlay.delete_table(self.inner, table))
    }

    /// Names of the tables that exist, this transaction's changes included, in byte order.
    pub fn table_names(&self) -> Result<Vec<String>, LogError> {
        Ok(self.overlay.table_names(self.inner))
    }

    /// Whether the transaction changed anything.
    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty()
    }

    /// Appends the transaction as one record (nothing when it changed nothing), `fdatasync`s
    /// when `durable`, then makes it visible. An error leaves the store as before the
    /// transaction (a record written but not made visible is cut off again, or the store
    /// refuses further writes until reopened when it cannot be).
    pub fn commit(self, durable: bool) -> Result<(), LogError> {
        let LogWrite {
            inner,
            mut writer,
            overlay,
        } = self;
        overlay.commit(inner, &mut writer, durable)
    }
}
