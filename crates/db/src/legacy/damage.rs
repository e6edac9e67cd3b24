//! Damaged redb files: a typed error, never a panic.
//!
//! redb 2.x checks much of a file as it reads it and answers with `Corrupted` or an I/O error,
//! but some damage reaches its internal assertions (the page manager, the buddy allocator)
//! and it panics. The conversion of a redb file (`legacy`) therefore runs under [`catch`], and
//! a caught panic, or the engine's own "corrupted" and "unexpected end of file" errors, become
//! [`OpenError::Damaged`] naming the file. After a panic redb's handle is never used or dropped
//! again (a write transaction dropped while panicking keeps its writer slot; its locks may be
//! poisoned): it is leaked and its file closed from outside (`storage`).
//!
//! The panic still goes through the process's panic hook first (a message on stderr): silencing
//! it would mean swapping the process-wide hook, which races with other threads' panics.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use crate::error::cut;
use crate::OpenError;

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
pub(super) fn catch<T>(op: impl FnOnce() -> T) -> Result<T, String> {
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

pub(super) fn redb_damage(e: &redb::Error) -> Option<String> {
    match e {
        redb::Error::Corrupted(msg) => Some(cut(msg)),
        redb::Error::Io(io) => io_damage(io),
        _ => None,
    }
}

/// Why opening failed, as a damaged-file error when the engine says the file is damaged.
pub(super) fn open_error(path: &Path, e: redb::DatabaseError) -> OpenError {
    let detail = match &e {
        redb::DatabaseError::Storage(s) => storage_damage(s),
        _ => None,
    };
    match detail {
        Some(detail) => OpenError::Damaged {
            path: path.to_path_buf(),
            detail,
        },
        None => OpenError::Convert {
            path: path.to_path_buf(),
            detail: cut(&e.to_string()),
        },
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
    fn engine_damage_is_told_from_other_errors() {
        assert_eq!(
            redb_damage(&redb::Error::Corrupted("bad checksum".into())).as_deref(),
            Some("bad checksum")
        );
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read");
        assert!(redb_damage(&redb::Error::Io(eof)).is_some());
        let full = std::io::Error::other("disk full");
        assert_eq!(redb_damage(&redb::Error::Io(full)), None);
    }
}
