//! The few file-system steps that need care beyond a read or a write: the advisory lock that
//! keeps two writers off one file, and the directory sync that makes a created or renamed file
//! survive a power loss.

use std::fs::{File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a lock was not taken.
pub(crate) enum LockError {
    /// Another handle holds a conflicting lock.
    InUse,
    Io(io::Error),
}

/// How long a conflicting lock may be waited for: see [`lock`].
const TRANSIENT_HOLD: Duration = Duration::from_millis(250);

/// Takes an exclusive lock (read-write) or a shared one (read-only).
///
/// A conflicting lock is waited for up to [`TRANSIENT_HOLD`], then reported as `InUse`. The
/// wait is for holders that are not users of the file: a `flock` belongs to the open file
/// description, and a child process forked by any thread of this process shares every
/// description until it calls `exec`, so a store dropped here can still be locked, for that
/// moment, by a child that never touches it (seen in this crate's own tests, which fork).
pub(crate) fn lock(file: &File, exclusive: bool) -> Result<(), LockError> {
    let give_up = Instant::now() + TRANSIENT_HOLD;
    let mut pause = Duration::from_millis(1);
    loop {
        let taken = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match taken {
            Ok(()) => return Ok(()),
            Err(TryLockError::WouldBlock) if Instant::now() < give_up => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(TryLockError::WouldBlock) => return Err(LockError::InUse),
            Err(TryLockError::Error(e)) => return Err(LockError::Io(e)),
        }
    }
}

/// Makes the directory entry of `path` durable (after a create or a rename).
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
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
