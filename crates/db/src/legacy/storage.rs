//! The storage under redb for reading a redb file of an earlier version (`legacy`) without
//! writing it.
//!
//! redb 2.x has no read-only open: every open writes the file's header, and after an unclean
//! shutdown it repairs the allocator state in place; the conversion of formats 1 and 2 to 3
//! writes tables too. This storage reads the file (opened read-only) and keeps every byte redb
//! writes in an in-memory overlay of 4 KiB chunks, so the file is never changed: a conversion
//! cut short leaves it whole, and a file the process may not write can be read.
//!
//! It also lets go of the file from outside ([`FileStorage::close`]): when redb panics on a
//! damaged file its handle is never used or dropped again, and the file (with its lock) would
//! otherwise stay open until the process exits.
//!
//! The file is locked for the conversion: exclusively when it is to be replaced by the log, so
//! no earlier version writes it meanwhile; shared for a read-only open.

use std::collections::HashMap;
use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

/// Bytes per overlay chunk: redb's page size, so a page write touches one chunk.
const CHUNK: u64 = 4096;

/// A redb file as redb's storage, read-only with an overlay.
#[derive(Debug)]
pub(crate) struct FileStorage {
    /// `None` once closed: every later call fails with an I/O error instead of touching a file.
    file: RwLock<Option<File>>,
    /// The bytes redb wrote (never the file).
    overlay: Mutex<Overlay>,
}

/// What a read-only storage holds besides the file.
#[derive(Debug)]
struct Overlay {
    /// The storage's length as redb set it.
    len: u64,
    /// The file's bytes before this offset are still the storage's (where no chunk covers them);
    /// a shrink lowers it, so bytes cut off and grown back read as zeros.
    base_len: u64,
    /// Chunk index -> its bytes, for every chunk redb wrote.
    chunks: HashMap<u64, Box<[u8]>>,
}

/// Why a storage could not lock its file.
pub(crate) enum LockError {
    /// Another handle (this process or another) holds a conflicting lock.
    InUse,
    Io(io::Error),
}

impl FileStorage {
    /// The storage of a file opened for reading, locked exclusively or shared: redb's writes
    /// stay in memory.
    pub(crate) fn read_only(file: File, exclusive: bool) -> Result<FileStorage, LockError> {
        let len = file.metadata().map_err(LockError::Io)?.len();
        let locked = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match locked {
            Ok(()) => Ok(FileStorage {
                file: RwLock::new(Some(file)),
                overlay: Mutex::new(Overlay {
                    len,
                    base_len: len,
                    chunks: HashMap::new(),
                }),
            }),
            Err(TryLockError::WouldBlock) => Err(LockError::InUse),
            Err(TryLockError::Error(e)) => Err(LockError::Io(e)),
        }
    }

    /// Closes the file (releasing its lock); every later call fails.
    pub(crate) fn close(&self) {
        self.file
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn file(&self) -> Result<RwLockReadGuard<'_, Option<File>>, io::Error> {
        let guard = self.file.read().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            return Err(io::Error::other(
                "the database file was closed after the storage engine failed on it",
            ));
        }
        Ok(guard)
    }

    fn overlay(&self) -> MutexGuard<'_, Overlay> {
        self.overlay.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads `out.len()` bytes of the file at `offset`, as zeros where the file (or `base_len`)
/// ends.
fn read_base(file: &File, base_len: u64, offset: u64, out: &mut [u8]) -> io::Result<()> {
    let from_file = base_len.saturating_sub(offset).min(out.len() as u64) as usize;
    file.read_exact_at(&mut out[..from_file], offset)?;
    out[from_file..].fill(0);
    Ok(())
}

fn past_end(offset: u64, len: usize, storage: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("{len} bytes at offset {offset} are past the end of the file ({storage} bytes)"),
    )
}

impl redb::StorageBackend for FileStorage {
    fn len(&self) -> Result<u64, io::Error> {
        let _file = self.file()?;
        Ok(self.overlay().len)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        let guard = self.file()?;
        let Some(file) = guard.as_ref() else {
            return Err(io::Error::other("the database file is closed"));
        };
        let mut out = vec![0u8; len];
        let o = self.overlay();
        let end = offset
            .checked_add(len as u64)
            .filter(|end| *end <= o.len)
            .ok_or_else(|| past_end(offset, len, o.len))?;
        let mut at = offset;
        while at < end {
            let index = at / CHUNK;
            let within = (at % CHUNK) as usize;
            let n = ((CHUNK - at % CHUNK).min(end - at)) as usize;
            let dst = &mut out[(at - offset) as usize..][..n];
            match o.chunks.get(&index) {
                Some(chunk) => dst.copy_from_slice(&chunk[within..within + n]),
                None => read_base(file, o.base_len, at, dst)?,
            }
            at += n as u64;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let _file = self.file()?;
        let mut o = self.overlay();
        if len < o.len {
            // Whole chunks past the end go; the tail of the last one is zeroed, so a later
            // extension reads zeros there, as it would from a file.
            let keep = len.div_ceil(CHUNK);
            o.chunks.retain(|index, _| *index < keep);
            let from = (len % CHUNK) as usize;
            if let Some(last) = o.chunks.get_mut(&(len / CHUNK)) {
                last[from..].fill(0);
            }
            o.base_len = o.base_len.min(len);
        }
        o.len = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> Result<(), io::Error> {
        // Nothing reaches the file.
        self.file().map(drop)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let guard = self.file()?;
        let Some(file) = guard.as_ref() else {
            return Err(io::Error::other("the database file is closed"));
        };
        let mut o = self.overlay();
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| past_end(offset, data.len(), o.len))?;
        o.len = o.len.max(end);
        let base_len = o.base_len;
        let mut at = offset;
        while at < end {
            let index = at / CHUNK;
            let within = (at % CHUNK) as usize;
            let n = ((CHUNK - at % CHUNK).min(end - at)) as usize;
            let chunk = match o.chunks.entry(index) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let mut bytes = vec![0u8; CHUNK as usize].into_boxed_slice();
                    read_base(file, base_len, index * CHUNK, &mut bytes)?;
                    e.insert(bytes)
                }
            };
            let src = (at - offset) as usize;
            chunk[within..within + n].copy_from_slice(&data[src..src + n]);
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        (dir, path)
    }

    #[test]
    fn read_only_storage_keeps_writes_in_memory_and_the_file_unchanged() {
        let base: Vec<u8> = (0..3 * CHUNK).map(|i| (i % 251) as u8).collect();
        let (_dir, path) = file_with(&base);
        let storage = FileStorage::read_only(File::open(&path).unwrap(), false)
            .ok()
            .unwrap();
        assert_eq!(storage.len().unwrap(), 3 * CHUNK);
        assert_eq!(
            storage.read(CHUNK - 2, 4).unwrap(),
            base[CHUNK as usize - 2..][..4]
        );
        storage.write(CHUNK - 1, &[9, 9]).unwrap();
        let mut expected = base[CHUNK as usize - 2..][..4].to_vec();
        expected[1] = 9;
        expected[2] = 9;
        assert_eq!(storage.read(CHUNK - 2, 4).unwrap(), expected);
        // A shrink then a growth reads zeros where the file's bytes were cut off.
        storage.set_len(CHUNK + 10).unwrap();
        storage.set_len(4 * CHUNK).unwrap();
        assert_eq!(
            storage.read(CHUNK + 8, 4).unwrap()[..2],
            base[CHUNK as usize + 8..][..2]
        );
        assert_eq!(storage.read(CHUNK + 10, 4).unwrap(), vec![0; 4]);
        assert_eq!(storage.read(3 * CHUNK, 4).unwrap(), vec![0; 4]);
        assert!(storage.read(4 * CHUNK - 1, 2).is_err());
        storage.write(5 * CHUNK, &[1]).unwrap();
        assert_eq!(
            storage.len().unwrap(),
            5 * CHUNK + 1,
            "a write past the end grows it"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            base,
            "the file is never written"
        );
    }

    #[test]
    fn a_closed_storage_fails_every_call_and_releases_the_lock() {
        let (_dir, path) = file_with(&[1; 100]);
        let open = || File::open(&path).unwrap();
        let storage = FileStorage::read_only(open(), true).ok().unwrap();
        assert!(matches!(
            FileStorage::read_only(open(), false),
            Err(LockError::InUse)
        ));
        assert_eq!(storage.read(0, 2).unwrap(), vec![1, 1]);
        storage.close();
        assert!(storage.read(0, 2).is_err());
        assert!(storage.write(0, &[2]).is_err());
        assert!(storage.len().is_err());
        assert!(
            FileStorage::read_only(open(), true).is_ok(),
            "the lock went with the file"
        );
    }
}
