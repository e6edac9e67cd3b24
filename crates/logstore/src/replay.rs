//! Opening a log file: lock it, check the header, replay every record into a [`State`], and
//! tell a torn tail (a commit cut short by a crash, cut off) from damage (refused). The rule
//! that separates them: a bad record is a torn tail only when no whole valid record starts
//! anywhere after it, since a crash can only cut the last write short; anything else means
//! bytes in the middle changed, and cutting there would silently drop committed data.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::file::{compact_path, lock, sync_parent_dir, LockError};
use crate::format::{
    check_header, check_payload, checksum, header, parse_record_header, HeaderCheck, Op, Ops,
    RecordHead, HEADER_BYTES, RECORD_HEADER_BYTES,
};
use crate::state::{Committed, Slot, State};
use crate::{LogOpenError, LogOptions};

/// A replayed log, ready to serve.
pub(crate) struct Opened {
    pub state: State,
    /// Where the next record goes.
    pub end: u64,
    /// The lowest table id no record defined (ids are never reused within a file).
    pub next_table_id: u64,
}

/// Bytes read at a time while replaying and while scanning past a bad record.
const READ_WINDOW_BYTES: usize = 1 << 20;

struct Opener<'a> {
    path: &'a Path,
    options: &'a LogOptions,
}

impl Opener<'_> {
    fn io(&self, source: io::Error) -> LogOpenError {
        LogOpenError::Io {
            path: self.path.to_path_buf(),
            source,
        }
    }

    fn damaged(&self, offset: u64, detail: String) -> LogOpenError {
        LogOpenError::Damaged {
            path: self.path.to_path_buf(),
            offset,
            detail,
        }
    }
}

/// Opens, locks and replays the log at `path`.
pub(crate) fn open(
    path: &Path,
    options: &LogOptions,
    read_only: bool,
) -> Result<Opened, LogOpenError> {
    let opener = Opener { path, options };
    if !read_only {
        // A compaction that did not reach its rename left this; the log itself is whole.
        match std::fs::remove_file(compact_path(path)) {
            Ok(()) => tracing::info!(path = %path.display(), "removed an unfinished compaction"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(opener.io(e)),
        }
    }
    let file = if read_only {
        File::open(path)
    } else {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }
    .map_err(|e| opener.io(e))?;
    match lock(&file, !read_only) {
        Ok(()) => {}
        Err(LockError::InUse) => {
            return Err(LogOpenError::InUse {
                path: path.to_path_buf(),
            })
        }
        Err(LockError::Io(e)) => return Err(opener.io(e)),
    }
    let len = file.metadata().map_err(|e| opener.io(e))?.len();
    let mut first = vec![0u8; len.min(HEADER_BYTES) as usize];
    file.read_exact_at(&mut first, 0)
        .map_err(|e| opener.io(e))?;
    match check_header(&first) {
        HeaderCheck::Valid => {}
        HeaderCheck::Fresh => {
            let mut state = State::default();
            let end = if read_only {
                len
            } else {
                file.write_all_at(&header(), 0)
                    .and_then(|()| file.set_len(HEADER_BYTES))
                    .and_then(|()| file.sync_data())
                    .and_then(|()| sync_parent_dir(path))
                    .map_err(|e| opener.io(e))?;
                HEADER_BYTES
            };
            state.file_bytes = end;
            state.file = Some(Arc::new(file));
            return Ok(Opened {
                state,
                end,
                next_table_id: 1,
            });
        }
        HeaderCheck::NotALog => {
            return Err(LogOpenError::NotALog {
                path: path.to_path_buf(),
            })
        }
        HeaderCheck::Newer(found) => {
            return Err(LogOpenError::NewerFormat {
                path: path.to_path_buf(),
                found,
            })
        }
        HeaderCheck::BadVersion => {
            return Err(opener.damaged(8, "the header's format version is not valid".into()))
        }
    }
    let mut replay = Replay {
        state: State::default(),
        names: HashMap::new(),
        next_table_id: 1,
        inline_value_bytes: options.inline_value_bytes,
    };
    let end = replay_records(&opener, &file, len, &mut replay)?;
    if end < len {
        let cut = len - end;
        if read_only {
            tracing::warn!(path = %path.display(), offset = end, bytes = cut,
                "ignoring a torn tail (an unfinished commit); a read-write open will cut it off");
        } else {
            tracing::warn!(path = %path.display(), offset = end, bytes = cut,
                "cutting off a torn tail (a commit a crash left unfinished)");
            file.set_len(end)
                .and_then(|()| file.sync_data())
                .map_err(|e| opener.io(e))?;
        }
    } else if !read_only {
        // A process that crashed may have left its last commits in the page cache only: from
        // here on the records claim the whole file durable (`RecordHead::synced`), so make it so.
        file.sync_data().map_err(|e| opener.io(e))?;
    }
    let mut state = replay.state;
    state.settle();
    state.file_bytes = end;
    state.file = Some(Arc::new(file));
    Ok(Opened {
        state,
        end,
        next_table_id: replay.next_table_id,
    })
}

/// What replay tracks beside the state.
struct Replay {
    state: State,
    /// Table names by the ids the file defined.
    names: HashMap<u32, String>,
    next_table_id: u64,
    inline_value_bytes: usize,
}

impl Replay {
    /// Applies one checksummed payload found at `record_at`.
    fn apply(&mut self, record_at: u64, payload: &[u8]) -> Result<(), (usize, String)> {
        if payload.is_empty() {
            return Err((0, "empty record".into()));
        }
        let mut ops = Ops::new(payload);
        loop {
            let op_at = ops.position();
            let Some(op) = ops.next() else {
                return Ok(());
            };
            let op = op.map_err(|e| (e.at, e.detail))?;
            self.apply_op(op, record_at)
                .map_err(|detail| (op_at, detail))?;
        }
    }

    fn apply_op(&mut self, op: Op<'_>, record_at: u64) -> Result<(), String> {
        match op {
            Op::Define { table, name } => {
                if let Some(existing) = self.names.get(&table) {
                    return Err(format!(
                        "table id {table} defined again (as {name:?}; it is {existing:?})"
                    ));
                }
                if self.state.tables.contains_key(name) {
                    return Err(format!("table {name:?} defined again while it exists"));
                }
                self.names.insert(table, name.to_owned());
                self.state.define_table(name, table);
                self.next_table_id = self.next_table_id.max(u64::from(table) + 1);
            }
            Op::Insert {
                table,
                key,
                value,
                value_at,
            } => {
                let slot = if value.len() <= self.inline_value_bytes {
                    Slot::Inline(value.into())
                } else {
                    Slot::File {
                        at: record_at + RECORD_HEADER_BYTES + value_at as u64,
                        // The record's length is a u32, so a value inside it is too.
                        len: value.len() as u32,
                    }
                };
                let name = table_name(&self.names, table)?;
                self.state.put(name, key, slot, Committed::Unknown);
            }
            Op::Remove { table, key } => {
                let name = table_name(&self.names, table)?;
                self.state.remove(name, key, Committed::Unknown);
            }
            Op::DeleteTable { table } => {
                let name = table_name(&self.names, table)?;
                self.state.delete_table(name);
                self.names.remove(&table);
            }
        }
        Ok(())
    }
}

fn table_name(names: &HashMap<u32, String>, table: u32) -> Result<&str, String> {
    names
        .get(&table)
        .map(String::as_str)
        .ok_or_else(|| format!("table id {table} is used but not defined"))
}

/// Replays the records after the header; returns where the valid records end (the file's
/// length, or the start of a torn tail).
fn replay_records(
    opener: &Opener<'_>,
    file: &File,
    len: u64,
    replay: &mut Replay,
) -> Result<u64, LogOpenError> {
    let max = u64::from(opener.options.max_record_bytes);
    let mut reader = BufReader::with_capacity(READ_WINDOW_BYTES, file);
    reader
        .seek(SeekFrom::Start(HEADER_BYTES))
        .map_err(|e| opener.io(e))?;
    let mut payload = Vec::new();
    let mut at = HEADER_BYTES;
    while at < len {
        let bad = if len - at < RECORD_HEADER_BYTES {
            Some("the record header is cut short".to_owned())
        } else {
            let mut head = [0u8; RECORD_HEADER_BYTES as usize];
            reader.read_exact(&mut head).map_err(|e| opener.io(e))?;
            let RecordHead {
                payload_len,
                crc,
                synced,
            } = parse_record_header(head);
            let payload_len = u64::from(payload_len);
            if payload_len == 0 {
                Some("a record of length 0".to_owned())
            } else if payload_len > max {
                // A whole, checksummed record over the limit was written with a larger limit:
                // cutting it off as a torn tail would drop committed data.
                let payload_at = at + RECORD_HEADER_BYTES;
                if payload_at + payload_len <= len
                    && streamed_checksum(file, synced, payload_at, payload_len)
                        .map_err(|e| opener.io(e))?
                        == crc
                {
                    return Err(opener.damaged(
                        at,
                        format!(
                            "a whole record of {payload_len} bytes, over the limit of {max} \
                             (open with a larger max_record_bytes)"
                        ),
                    ));
                }
                Some(format!(
                    "a record of {payload_len} bytes, over the limit of {max}"
                ))
            } else if at + RECORD_HEADER_BYTES + payload_len > len {
                Some(format!(
                    "a record of {payload_len} bytes runs past the end of the file ({len} bytes)"
                ))
            } else {
                payload.resize(payload_len as usize, 0);
                reader.read_exact(&mut payload).map_err(|e| opener.io(e))?;
                if checksum(synced, &payload) != crc {
                    Some("the record's checksum does not match".to_owned())
                } else {
                    None
                }
            }
        };
        if let Some(reason) = bad {
            return match durable_evidence(file, at, len, max).map_err(|e| opener.io(e))? {
                Some((valid, synced)) => Err(opener.damaged(
                    at,
                    format!(
                        "{reason}, and a valid record follows at byte {valid}, written when the \
                         file was durable up to byte {synced} (not a torn tail)"
                    ),
                )),
                None => Ok(at),
            };
        }
        replay.apply(at, &payload).map_err(|(in_payload, detail)| {
            opener.damaged(
                at,
                format!("record at byte {at}, payload byte {in_payload}: {detail}"),
            )
        })?;
        at += RECORD_HEADER_BYTES + payload.len() as u64;
    }
    Ok(at)
}

/// The CRC of `len` bytes of `file` at `at`, read a window at a time (the record may be
/// larger than any buffer this open should allocate).
fn streamed_checksum(file: &File, synced: u64, at: u64, len: u64) -> io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&synced.to_le_bytes());
    let mut buffer = vec![0u8; (len.min(READ_WINDOW_BYTES as u64)) as usize];
    let mut done = 0;
    while done < len {
        let chunk = (len - done).min(buffer.len() as u64) as usize;
        let Some(window) = buffer.get_mut(..chunk) else {
            break;
        };
        file.read_exact_at(window, at + done)?;
        hasher.update(window);
        done += chunk as u64;
    }
    Ok(hasher.finalize())
}

/// Whether the bad record at `bad` is damage rather than a torn tail: a valid record after it
/// that was written when the file was already durable past `bad` (its `synced` claim). Returns
/// that record's offset and claim.
///
/// Without such a record the bad bytes lie where the file was not yet durable when anything
/// after them was written: a commit cut short, or bytes a power loss left unwritten while later
/// ones reached the disk (file systems that do not write a file's pages in order). Cutting
/// there loses only commits that were never durable, which the durability contract allows.
fn durable_evidence(file: &File, bad: u64, len: u64, max: u64) -> io::Result<Option<(u64, u64)>> {
    let mut from = bad + 1;
    while let Some((valid, head)) = find_valid_record(file, from, len, max)? {
        if head.synced > bad {
            return Ok(Some((valid, head.synced)));
        }
        from = valid + RECORD_HEADER_BYTES + u64::from(head.payload_len);
    }
    Ok(None)
}

/// The first offset in `from..len` where a whole valid record starts (length in bounds,
/// checksum right, payload parses), if any, with its header.
fn find_valid_record(
    file: &File,
    from: u64,
    len: u64,
    max: u64,
) -> io::Result<Option<(u64, RecordHead)>> {
    let mut window = Vec::new();
    let mut window_at = from;
    let mut payload = Vec::new();
    let mut at = from;
    while at + RECORD_HEADER_BYTES <= len {
        if at + RECORD_HEADER_BYTES > window_at + window.len() as u64 {
            window_at = at;
            window.resize((len - at).min(READ_WINDOW_BYTES as u64) as usize, 0);
            file.read_exact_at(&mut window, at)?;
        }
        let offset = (at - window_at) as usize;
        let head: Option<[u8; RECORD_HEADER_BYTES as usize]> = window
            .get(offset..offset + RECORD_HEADER_BYTES as usize)
            .and_then(|h| h.try_into().ok());
        let Some(head) = head else {
            return Ok(None);
        };
        let record = parse_record_header(head);
        let payload_len = u64::from(record.payload_len);
        let payload_at = at + RECORD_HEADER_BYTES;
        if payload_len > 0 && payload_len <= max && payload_at + payload_len <= len {
            let from_window = window.get(
                (payload_at - window_at) as usize..(payload_at - window_at + payload_len) as usize,
            );
            let bytes = match from_window {
                Some(bytes) => bytes,
                None => {
                    payload.resize(payload_len as usize, 0);
                    file.read_exact_at(&mut payload, payload_at)?;
                    &payload[..]
                }
            };
            if checksum(record.synced, bytes) == record.crc && check_payload(bytes).is_ok() {
                return Ok(Some((at, record)));
            }
        }
        at += 1;
    }
    Ok(None)
}
