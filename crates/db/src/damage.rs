//! Damaged files: a typed error, never a panic.
//!
//! redb 2.x checks much of a file as it reads it and answers with `Corrupted` or an I/O error,
//! but some damage reaches its internal assertions (the page manager, the buddy allocator)
//! and it panics. Every call into redb therefore runs under [`Inner::engine`], which
//! - turns a caught panic into [`DbError::Damaged`] and *latches* it: after a panic redb's state
//!   cannot be trusted (a write transaction dropped while panicking keeps redb's one writer slot
//!   taken, so the next write would block forever; its own locks may be poisoned), so the handle
//!   answers every later call with the same error without touching redb again, closes the file
//!   (`storage`), and never drops redb's handle (its memory, up to the page cache, stays
//!   allocated until the process ends);
//! - turns the engine's own "corrupted" and "unexpected end of file" errors, and stored bytes the
//!   codec cannot read, into [`DbError::Damaged`] naming the file (those do not latch: the next
//!   call may read an undamaged part).
//!
//! The panic still goes through the process's panic hook first (a message on stderr): silencing
//! it would mean swapping the process-wide hook around every engine call, which races with
//! other threads' panics, so it is left alone.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use crate::error::cut;
use crate::{DbError, Inner, OpenError};

/// The message a panic carried.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Runs `op`, which calls into redb, turning a panic into the detail of a damaged-file error.
pub(crate) fn catch<T>(op: impl FnOnce() -> T) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(op)).map_err(|payload| {
        format!(
            "the storage engine panicked on it: {}",
            cut(panic_message(payload.as_ref()))
        )
    })
}

/// Whether an I/O error of the engine says the file's bytes are wrong: it ends before its
/// contents do (a short read), or redb found bytes it cannot read (a bad header).
fn io_damage(io: &std::io::Error) -> Option<String> {
    match io.kind() {
        std::io::ErrorKind::UnexpectedEof => Some(format!(
            "it is shorter than its contents say (truncated?): {}",
            cut(&io.to_string())
        )),
        std::io::ErrorKind::InvalidData => Some(format!(
            "it is not a readable database file: {}",
            cut(&io.to_string())
        )),
        _ => None,
    }
}

/// Whether a redb error says the file is damaged (rather than, say, the disk being full).
fn storage_damage(e: &redb::StorageError) -> Option<String> {
    match e {
        redb::StorageError::Corrupted(msg) => Some(cut(msg)),
        redb::StorageError::Io(io) => io_damage(io),
        _ => None,
    }
}

fn redb_damage(e: &redb::Error) -> Option<String> {
    match e {
        redb::Error::Corrupted(msg) => Some(cut(msg)),
        redb::Error::Io(io) => io_damage(io),
        _ => None,
    }
}

/// Why opening failed, as a damaged-file error when the engine says the file is damaged.
pub(crate) fn open_error(path: &Path, e: redb::DatabaseError) -> OpenError {
    let detail = match &e {
        redb::DatabaseError::Storage(s) => storage_damage(s),
        _ => None,
    };
    match detail {
        Some(detail) => OpenError::Damaged {
            path: path.to_path_buf(),
            detail,
        },
        None => OpenError::Storage {
            path: path.to_path_buf(),
            source: Box::new(e),
        },
    }
}

/// An error of an open database's operation, as a damaged-file error naming the file when the
/// engine or the codec says the stored bytes are damaged.
pub(crate) fn classify(path: &Path, e: DbError) -> DbError {
    let detail = match &e {
        DbError::Storage(s) => redb_damage(s),
        DbError::Corrupt(msg) => Some(format!("stored data: {}", cut(msg))),
        _ => None,
    };
    match detail {
        Some(detail) => DbError::Damaged {
            path: path.to_path_buf(),
            detail,
        },
        None => e,
    }
}

impl Inner {
    /// Runs `op` (which calls into redb) unless the handle already failed on a panic; see the
    /// module doc.
    pub(crate) fn engine<T>(&self, op: impl FnOnce() -> Result<T, DbError>) -> Result<T, DbError> {
        if let Some(detail) = self.damaged.get() {
            return Err(self.damaged_error(detail));
        }
        match catch(op) {
            Ok(result) => result.map_err(|e| classify(&self.path, e)),
            Err(detail) => {
                let detail = self.damaged.get_or_init(|| {
                    format!("{detail}; this handle refuses every later call (reopen the file once it is restored)")
                });
                if let Some(storage) = &self.storage {
                    storage.close();
                }
                tracing::error!(path = %self.path.display(), "database file is damaged: {detail}");
                Err(self.damaged_error(detail))
            }
        }
    }

    fn damaged_error(&self, detail: &str) -> DbError {
        DbError::Damaged {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }

    /// Whether a panic latched this handle.
    pub(crate) fn is_damaged(&self) -> bool {
        self.damaged.get().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        let caught = catch(|| -> u32 { panic!("assertion failed: page {} is free", 7) });
        let detail = caught.unwrap_err();
        assert!(
            detail.contains("panicked on it: assertion failed: page 7 is free"),
            "{detail}"
        );
        assert_eq!(catch(|| 5), Ok(5));
    }

    #[test]
    fn engine_damage_names_the_file_and_other_errors_pass_through() {
        let path = Path::new("/data/device.redb");
        let corrupt = classify(
            path,
            DbError::Storage(Box::new(redb::Error::Corrupted("bad checksum".into()))),
        );
        match corrupt {
            DbError::Damaged { path: p, detail } => {
                assert_eq!(p, path);
                assert_eq!(detail, "bad checksum");
            }
            other => panic!("expected Damaged, got {other:?}"),
        }
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read");
        assert!(matches!(
            classify(path, DbError::Storage(Box::new(redb::Error::Io(eof)))),
            DbError::Damaged { .. }
        ));
        let full = std::io::Error::other("disk full");
        assert!(matches!(
            classify(path, DbError::Storage(Box::new(redb::Error::Io(full)))),
            DbError::Storage(_)
        ));
        assert!(matches!(
            classify(path, DbError::UnknownModel("X".into())),
            DbError::UnknownModel(_)
        ));
    }
}
