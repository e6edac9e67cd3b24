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
//!   its own is a torn tail: bytes after the last whole record that no valid record follows (a
//!   commit cut short by a crash), which a read-write open truncates (logged at warn) and a
//!   read-only open ignores.
//! - A read-only open ([`LogStore::open_read_only`]) never writes the file and takes a shared
//!   lock; a read-write open takes an exclusive one (`flock`), so two processes never write one
//!   file.
//!
//! # File format (version 1)
//! - Header, 16 bytes: [`MAGIC`] (8 bytes), format version (u32 LE), 4 reserved zero bytes.
//! - Then records, each: payload length (u32 LE), CRC-32 of the payload (u32 LE), payload.
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
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};

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

/// An open store. Cheap to clone; clones share one file. The file is closed when the last
/// clone is dropped or by [`LogStore::close`].
#[derive(Clone)]
pub struct LogStore {}

impl LogStore {
    /// Opens the log at `path` for reading and writing, creating it when missing (an empty
    /// file becomes an empty store). Replays every record; truncates a torn tail.
    pub fn open(path: &Path, options: LogOptions) -> Result<LogStore, LogOpenError> {
        todo!("{path:?} {options:?}")
    }

    /// Opens the log at `path` without ever writing it (shared lock); a missing file is an
    /// I/O error (`NotFound`). Writes are refused with [`LogError::ReadOnly`].
    pub fn open_read_only(path: &Path, options: LogOptions) -> Result<LogStore, LogOpenError> {
        todo!("{path:?} {options:?}")
    }

    /// A store with no file: everything in RAM, gone with the last clone.
    pub fn in_memory(options: LogOptions) -> LogStore {
        todo!("{options:?}")
    }

    /// Whether the store was opened with [`LogStore::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        todo!()
    }

    /// A view of the last committed state, for one operation (see the crate docs).
    pub fn read(&self) -> Result<LogRead<'_>, LogError> {
        todo!()
    }

    /// The write transaction, once the writer slot is free (blocks until then).
    pub fn write(&self) -> Result<LogWrite<'_>, LogError> {
        todo!()
    }

    /// Makes every committed transaction durable (`fdatasync`); nothing to do when all are.
    pub fn sync(&self) -> Result<(), LogError> {
        todo!()
    }

    /// Compacts when the file is at least `compact_min_file_bytes` and `compact_ratio` times
    /// its live bytes; returns whether it did. Takes the writer slot for its duration.
    pub fn compact_if_worth(&self) -> Result<bool, LogError> {
        todo!()
    }

    /// Rewrites the file as its live entries only: written beside it, made durable, renamed
    /// over it (a crash leaves the old file or the new one, whole). Takes the writer slot.
    pub fn compact(&self) -> Result<(), LogError> {
        todo!()
    }

    pub fn stats(&self) -> LogStats {
        todo!()
    }

    /// Syncs what is committed (read-write stores), then releases the file and its lock: every
    /// later call fails with [`LogError::Closed`]. Idempotent.
    pub fn close(&self) -> Result<(), LogError> {
        todo!()
    }
}

/// A shared view of the last committed state (see the crate docs for how long to hold one).
pub struct LogRead<'s> {
    _store: &'s LogStore,
}

impl LogRead<'_> {
    /// The table called `name`, if it exists.
    pub fn table(&self, name: &str) -> Option<LogTable<'_>> {
        todo!("{name}")
    }

    /// The names of the tables that exist, in byte order.
    pub fn table_names(&self) -> Vec<String> {
        todo!()
    }
}

/// One table of a [`LogRead`].
pub struct LogTable<'r> {
    _read: &'r (),
}

impl<'r> LogTable<'r> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Cow<'r, [u8]>>, LogError> {
        todo!("{key:?}")
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        todo!("{key:?}")
    }

    pub fn len(&self) -> u64 {
        todo!()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries with keys in `range`, in key order (`.rev()` for descending); values are
    /// read from the file only as the iterator reaches them.
    pub fn range(&self, range: (Bound<&[u8]>, Bound<&[u8]>)) -> LogRange<'r> {
        todo!("{range:?}")
    }

    /// The keys in `range` alone (no value is read).
    pub fn keys(&self, range: (Bound<&[u8]>, Bound<&[u8]>)) -> LogKeys<'r> {
        todo!("{range:?}")
    }
}

/// Entries of a table in a key range, either direction.
pub struct LogRange<'r> {
    _read: &'r (),
}

impl<'r> Iterator for LogRange<'r> {
    type Item = Result<(&'r [u8], Cow<'r, [u8]>), LogError>;
    fn next(&mut self) -> Option<Self::Item> {
        todo!()
    }
}

impl DoubleEndedIterator for LogRange<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        todo!()
    }
}

/// Keys of a table in a key range, either direction.
pub struct LogKeys<'r> {
    _read: &'r (),
}

impl<'r> Iterator for LogKeys<'r> {
    type Item = &'r [u8];
    fn next(&mut self) -> Option<Self::Item> {
        todo!()
    }
}

impl DoubleEndedIterator for LogKeys<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        todo!()
    }
}

/// The one write transaction: changes kept in RAM until [`LogWrite::commit`] appends them as
/// one record. Its reads see the committed state with its own changes on top.
pub struct LogWrite<'s> {
    _store: &'s LogStore,
}

impl<'s> LogWrite<'s> {
    pub fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        todo!("{table} {key:?}")
    }

    pub fn contains(&self, table: &str, key: &[u8]) -> Result<bool, LogError> {
        todo!("{table} {key:?}")
    }

    pub fn len(&self, table: &str) -> Result<u64, LogError> {
        todo!("{table}")
    }

    /// Entries of `table` in `range`, in key order or reversed, this transaction's changes
    /// merged in. Collects at most `limit` entries.
    pub fn range(
        &self,
        table: &str,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, LogError> {
        todo!("{table} {range:?} {reverse} {limit}")
    }

    /// Keys of `table` in `range`, ascending, this transaction's changes merged in; at most
    /// `limit`.
    pub fn keys(
        &self,
        table: &str,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, LogError> {
        todo!("{table} {range:?} {limit}")
    }

    /// Inserts or replaces; refuses a table name or key over its limit ([`LogError::TooLarge`]).
    pub fn insert(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), LogError> {
        todo!("{table} {key:?} {value:?}")
    }

    /// Removes a key; returns whether it was there.
    pub fn remove(&mut self, table: &str, key: &[u8]) -> Result<bool, LogError> {
        todo!("{table} {key:?}")
    }

    /// Deletes a table and every key in it; returns whether it existed.
    pub fn delete_table(&mut self, table: &str) -> Result<bool, LogError> {
        todo!("{table}")
    }

    /// Names of the tables that exist, this transaction's changes included, in byte order.
    pub fn table_names(&self) -> Result<Vec<String>, LogError> {
        todo!()
    }

    /// Whether the transaction changed anything.
    pub fn is_empty(&self) -> bool {
        todo!()
    }

    /// Appends the transaction as one record (nothing when it changed nothing), `fdatasync`s
    /// when `durable`, then makes it visible. An error leaves the store as before the
    /// transaction (a record written but not made visible is cut off again, or the store
    /// refuses further writes until reopened when it cannot be).
    pub fn commit(self, durable: bool) -> Result<(), LogError> {
        todo!("{durable}")
    }
}
