//! The storage of an in-memory database ([`crate::Db::open_in_memory`]): redb's pages in RAM,
//! held sparsely.
//!
//! It exists because redb's own `InMemoryBackend` is one `Vec<u8>` that zero-fills every byte of
//! the storage's length, and redb sizes a new database at about 1 MiB before anything is
//! written: ten thousand small databases in one process (the fleet simulator's devices) would
//! hold 10 GiB of zeros. Here the storage is cut into fixed chunks, and only chunks that were
//! written hold memory; every other byte reads as zero, as redb requires of extended storage.
//! A chunk written with one repeated byte is kept as that byte: a new redb database writes its
//! region tracker (about 260 KiB of `0xff`, sized for 1000 regions) that way, so an empty
//! database holds a few tens of KiB instead of 320.

use std::collections::HashMap;
use std::io;
use std::sync::{PoisonError, RwLock};

/// Bytes per chunk: redb's page size, so a page write touches one chunk.
const CHUNK: u64 = 4096;

/// Storage for redb whose unwritten bytes cost nothing.
#[derive(Debug, Default)]
pub(crate) struct SparseMemoryBackend {
    state: RwLock<Sparse>,
}

#[derive(Debug, Default)]
struct Sparse {
    /// The storage's length as redb set it.
    len: u64,
    /// Chunk index -> its bytes; a missing chunk is all zeros.
    chunks: HashMap<u64, Chunk>,
}

/// One chunk of the storage.
#[derive(Debug)]
enum Chunk {
    /// Every byte is this one.
    Fill(u8),
    Bytes(Box<[u8]>),
}

impl Chunk {
    fn copy_to(&self, within: usize, out: &mut [u8]) {
        match self {
            Chunk::Fill(b) => out.fill(*b),
            Chunk::Bytes(bytes) => out.copy_from_slice(&bytes[within..within + out.len()]),
        }
    }

    /// Writes `part` at `within`, keeping the chunk as one repeated byte where it can.
    fn write(&mut self, within: usize, part: &[u8]) {
        let uniform = part
            .first()
            .filter(|b| part.iter().all(|x| x == *b))
            .copied();
        match (&mut *self, uniform) {
            (_, Some(b)) if part.len() == CHUNK as usize => *self = Chunk::Fill(b),
            (Chunk::Fill(f), Some(b)) if *f == b => {}
            (Chunk::Fill(f), _) => {
                let mut bytes = vec![*f; CHUNK as usize].into_boxed_slice();
                bytes[within..within + part.len()].copy_from_slice(part);
                *self = Chunk::Bytes(bytes);
            }
            (Chunk::Bytes(bytes), _) => bytes[within..within + part.len()].copy_from_slice(part),
        }
    }

    fn resident(&self) -> u64 {
        match self {
            Chunk::Fill(_) => 0,
            Chunk::Bytes(_) => CHUNK,
        }
    }
}

fn out_of_range(offset: u64, len: usize, storage: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{len} bytes at {offset} are past the end of the in-memory storage ({storage} bytes)"
        ),
    )
}

impl SparseMemoryBackend {
    /// Bytes held by written chunks (what the database costs in RAM, besides redb's cache).
    pub(crate) fn resident_bytes(&self) -> u64 {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        s.chunks.values().map(Chunk::resident).sum()
    }
}

impl redb::StorageBackend for SparseMemoryBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let end = offset
            .checked_add(len as u64)
            .filter(|end| *end <= s.len)
            .ok_or_else(|| out_of_range(offset, len, s.len))?;
        let mut out = vec![0u8; len];
        let mut at = offset;
        while at < end {
            let index = at / CHUNK;
            let within = (at % CHUNK) as usize;
            let n = ((CHUNK - at % CHUNK).min(end - at)) as usize;
            if let Some(chunk) = s.chunks.get(&index) {
                let dst = (at - offset) as usize;
                chunk.copy_to(within, &mut out[dst..dst + n]);
            }
            at += n as u64;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if len < s.len {
            // Whole chunks past the end go; the tail of the last one is zeroed, so a later
            // extension reads zeros there.
            let keep = len.div_ceil(CHUNK);
            s.chunks.retain(|index, _| *index < keep);
            let from = (len % CHUNK) as usize;
            if from > 0 {
                if let Some(last) = s.chunks.get_mut(&(len / CHUNK)) {
                    last.write(from, &vec![0; CHUNK as usize - from]);
                }
            }
        }
        s.len = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> Result<(), io::Error> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let storage = s.len;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|end| *end <= storage)
            .ok_or_else(|| out_of_range(offset, data.len(), storage))?;
        let mut at = offset;
        while at < end {
            let index = at / CHUNK;
            let within = (at % CHUNK) as usize;
            let n = ((CHUNK - at % CHUNK).min(end - at)) as usize;
            let src = (at - offset) as usize;
            let part = &data[src..src + n];
            s.chunks
                .entry(index)
                .or_insert(Chunk::Fill(0))
                .write(within, part);
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;

    #[test]
    fn unwritten_bytes_read_as_zero_and_cost_nothing() {
        let b = SparseMemoryBackend::default();
        b.set_len(10 * CHUNK).unwrap();
        assert_eq!(b.resident_bytes(), 0);
        assert_eq!(b.read(CHUNK - 3, 6).unwrap(), vec![0; 6]);
        // A write across a chunk boundary lands in two chunks and reads back whole.
        b.write(CHUNK - 2, &[1, 2, 3, 4]).unwrap();
        assert_eq!(b.resident_bytes(), 2 * CHUNK);
        assert_eq!(b.read(CHUNK - 3, 6).unwrap(), vec![0, 1, 2, 3, 4, 0]);
        b.write(5 * CHUNK, &[0; 100]).unwrap();
        b.write(6 * CHUNK, &[0xff; CHUNK as usize]).unwrap();
        assert_eq!(
            b.resident_bytes(),
            2 * CHUNK,
            "a repeated byte needs no chunk"
        );
        assert_eq!(b.read(6 * CHUNK + 5, 3).unwrap(), vec![0xff; 3]);
        b.write(6 * CHUNK + 1, &[1]).unwrap();
        assert_eq!(b.read(6 * CHUNK, 3).unwrap(), vec![0xff, 1, 0xff]);
        assert_eq!(b.resident_bytes(), 3 * CHUNK);
        assert!(b.read(10 * CHUNK - 1, 2).is_err());
        assert!(b.write(10 * CHUNK, &[1]).is_err());
    }

    #[test]
    fn shrinking_forgets_the_bytes_past_the_end() {
        let b = SparseMemoryBackend::default();
        b.set_len(3 * CHUNK).unwrap();
        b.write(CHUNK + 10, &[7; 20]).unwrap();
        b.write(2 * CHUNK, &[9; 4]).unwrap();
        b.set_len(CHUNK + 15).unwrap();
        assert_eq!(b.resident_bytes(), CHUNK);
        b.set_len(3 * CHUNK).unwrap();
        let back = b.read(CHUNK + 10, 20).unwrap();
        assert_eq!(&back[..5], &[7; 5]);
        assert_eq!(&back[5..], &[0; 15], "bytes cut off come back as zeros");
        assert_eq!(b.read(2 * CHUNK, 4).unwrap(), vec![0; 4]);
    }
}
