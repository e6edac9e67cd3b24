//! The few file-system steps that need care beyond a read or a write: the advisory lock that
//! keeps two writers off one file, and the directory sync that makes a created or renamed file
//! survive a power loss.

use std::fs::{File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

/// Why a lock was not taken.
pub(crate) enum LockError {
    /// Another handle holds a conflicting lock.
    InUse,
    Io(io::Error),
}

/// Takes an exclusive lock (read-write) or a shared one (read-only) without waiting.
pub(crate) fn lock(file: &File, exclusive: bool) -> Result<(), LockError> {
    let taken = if exclusive {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match taken {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(LockError::InUse),
        Err(TryLockError::Error(e)) => Err(LockError::Io(e)),
    }
}

/// Makes the directory entry of `path` durable (after a create or a rename).
pub(crate) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Where a compaction writes the new file before renaming it over the log.
pub(crate) fn compact_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".compact");
    PathBuf::from(name)
}
