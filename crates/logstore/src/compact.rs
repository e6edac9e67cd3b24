//! Compaction: the log grows with every change, so from time to time it is rewritten as its
//! live entries only. The new file is written beside the log, made durable and renamed over
//! it, so a crash at any point leaves the old file or the new one, each whole (a leftover
//! `.compact` file is removed by the next open). It runs under the writer slot, so the state
//! cannot change while it is copied; readers go on reading the old file until the swap.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::file::{compact_path, lock, sync_parent_dir, LockError};
use crate::format::{define_op_bytes, header, insert_op_bytes, RecordWriter, HEADER_BYTES};
use crate::state::State;
use crate::write::Writer;
use crate::{Inner, LogError};

/// Payload bytes a compaction puts in one record (fewer when `max_record_bytes` is lower): the
/// rewrite never holds more than this much of it in RAM.
pub(crate) const RECORD_TARGET_BYTES: usize = 1 << 20;

/// Rewrites the log at `path` as the live entries of `inner`'s state.
pub(crate) fn compact(inner: &Inner, path: &Path, writer: &mut Writer) -> Result<(), LogError> {
    let new_path = compact_path(path);
    let new_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&new_path)?;
    let written = lock(&new_file, true)
        .map_err(|e| match e {
            LockError::InUse => LogError::Io(io::Error::other(format!(
                "{} is locked by someone else",
                new_path.display()
            ))),
            LockError::Io(e) => LogError::Io(e),
        })
        .and_then(|()| {
            let target = RECORD_TARGET_BYTES.min(inner.options.max_record_bytes as usize) as u64;
            write_live_entries(&inner.read_state(), &new_file, target)
        })
        .and_then(|written| {
            std::fs::rename(&new_path, path)?;
            Ok(written)
        });
    let (end, locations) = match written {
        Ok(written) => written,
        Err(e) => {
            drop(new_file);
            if let Err(remove) = std::fs::remove_file(&new_path) {
                tracing::warn!(path = %new_path.display(), %remove, "could not remove an unfinished compaction");
            }
            return Err(e);
        }
    };
    // The rename happened: `path` is the new file now, whatever the directory sync says.
    let dir_synced = sync_parent_dir(path);
    let mut state = inner.write_state();
    let mut names: Vec<String> = state.tables.keys().cloned().collect();
    names.sort_unstable();
    let mut locations = locations.into_iter();
    for name in &names {
        let Some(table) = state.tables.get_mut(name) else {
            continue;
        };
        table.index.relocate(&mut locations);
    }
    state.file = Some(Arc::new(new_file));
    state.file_bytes = end;
    state.compactions += 1;
    drop(state);
    writer.end = end;
    inner.unsynced.store(false, Ordering::SeqCst);
    inner.synced_end.store(end, Ordering::SeqCst);
    dir_synced?;
    Ok(())
}

/// Writes header, definitions and live entries to `new_file` in records of about `target`
/// payload bytes, and syncs it. Returns the file's length and the new location of every value
/// kept in the file, in the order of tables by name and keys in order.
fn write_live_entries(
    state: &State,
    new_file: &File,
    target: u64,
) -> Result<(u64, Vec<u64>), LogError> {
    let old_file = state.file.as_deref();
    new_file.write_all_at(&header(), 0)?;
    let mut at = HEADER_BYTES;
    let mut record = RecordWriter::new();
    let mut locations = Vec::new();
    let flush = |record: &mut RecordWriter, at: &mut u64| -> io::Result<()> {
        // Claims nothing: the new file is synced whole before it replaces the log.
        let bytes = record.finish(0);
        new_file.write_all_at(&bytes, *at)?;
        *at += bytes.len() as u64;
        Ok(())
    };
    let mut names: Vec<&String> = state.tables.keys().collect();
    names.sort_unstable();
    for name in names {
        let Some(table) = state.tables.get(name) else {
            continue;
        };
        if !record.is_empty() && record.payload_len() + define_op_bytes(name.len()) > target {
            flush(&mut record, &mut at)?;
        }
        record.define(table.id, name);
        table.index.try_for_each(|key, slot| {
            let value = slot.read(old_file)?;
            if !record.is_empty()
                && record.payload_len() + insert_op_bytes(key.len(), value.len()) > target
            {
                flush(&mut record, &mut at)?;
            }
            // An entry alone fits a record: it was committed in one, with at most as much
            // around it.
            let value_at = record.insert(table.id, key, &value);
            if slot.is_file() {
                locations.push(at + value_at);
            }
            Ok::<(), LogError>(())
        })?;
    }
    if !record.is_empty() {
        flush(&mut record, &mut at)?;
    }
    new_file.sync_data()?;
    Ok((at, locations))
}
