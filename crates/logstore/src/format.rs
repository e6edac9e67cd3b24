//! The bytes of the log file (see the crate docs, "File format"): the header, the record
//! framing and the operations inside a record. This is the one module that encodes and decodes
//! them, so the writer, the replay and the compaction cannot disagree, and the decoder is the
//! only code that reads fields out of file bytes: every read is bounds-checked and a wrong byte
//! becomes an [`OpError`] naming where it is, never a panic.

use crate::{FORMAT_VERSION, MAGIC, MAX_KEY_BYTES, MAX_TABLE_NAME};

/// Bytes of the file header: magic, version, reserved.
pub(crate) const HEADER_BYTES: u64 = 16;
/// Bytes in front of every record's payload: its length and its CRC.
pub(crate) const RECORD_HEADER_BYTES: u64 = 16;

const TAG_DEFINE: u8 = 1;
const TAG_INSERT: u8 = 2;
const TAG_REMOVE: u8 = 3;
const TAG_DELETE_TABLE: u8 = 4;

/// Bytes of a define-table operation for a name of `name_len` bytes.
pub(crate) fn define_op_bytes(name_len: usize) -> u64 {
    1 + 4 + 4 + name_len as u64
}

/// Bytes of an insert operation for a key and a value of these sizes.
pub(crate) fn insert_op_bytes(key_len: usize, value_len: usize) -> u64 {
    1 + 4 + 4 + key_len as u64 + 4 + value_len as u64
}

/// The header every log file starts with.
pub(crate) fn header() -> [u8; HEADER_BYTES as usize] {
    let mut bytes = [0u8; HEADER_BYTES as usize];
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes
}

/// What the first bytes of a file say about it.
#[derive(Debug, PartialEq)]
pub(crate) enum HeaderCheck {
    /// A whole header of a version this build reads.
    Valid,
    /// Empty, all zero, or a prefix of the header cut short while a new store was being
    /// created: a new store.
    Fresh,
    /// Not a log at all (another magic).
    NotALog,
    /// A log of a newer format.
    Newer(u32),
    /// A log magic with a version that was never written (0) or a header cut short in its
    /// version: damage at byte 8.
    BadVersion,
}

/// Classifies a file by its first bytes (`first` holds the first `min(file length, 16)`
/// bytes).
pub(crate) fn check_header(first: &[u8]) -> HeaderCheck {
    let ours = header();
    if first.len() < ours.len() {
        let is_prefix = ours.get(..first.len()) == Some(first);
        if is_prefix || first.iter().all(|&b| b == 0) {
            return HeaderCheck::Fresh;
        }
        let magic_part = first.len().min(MAGIC.len());
        if first.get(..magic_part) != MAGIC.get(..magic_part) {
            return HeaderCheck::NotALog;
        }
        return HeaderCheck::BadVersion;
    }
    if first.get(..8) != Some(&MAGIC[..]) {
        return HeaderCheck::NotALog;
    }
    let version = read_u32(first, 8).unwrap_or(0);
    if version > FORMAT_VERSION {
        HeaderCheck::Newer(version)
    } else if version == 0 {
        HeaderCheck::BadVersion
    } else {
        HeaderCheck::Valid
    }
}

/// A record header's fields: payload length and CRC.
pub(crate) fn parse_record_header(bytes: [u8; RECORD_HEADER_BYTES as usize]) -> RecordHead {
    let [a, b, c, d, e, f, g, h, rest @ ..] = bytes;
    RecordHead {
        payload_len: u32::from_le_bytes([a, b, c, d]),
        crc: u32::from_le_bytes([e, f, g, h]),
        synced: u64::from_le_bytes(rest),
    }
}

/// A record header's fields.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct RecordHead {
    pub payload_len: u32,
    /// CRC-32 of the `synced` field's bytes and the payload.
    pub crc: u32,
    /// When the record was written, every byte of the file before this offset was durable
    /// (`fdatasync` had returned): replay's evidence that a bad record before it is damage,
    /// not a commit a power loss left unwritten.
    pub synced: u64,
}

/// The CRC a record header carries for its `synced` field and `payload`.
pub(crate) fn checksum(synced: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&synced.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// One operation of a record, borrowing the payload.
#[derive(Debug, PartialEq)]
pub(crate) enum Op<'a> {
    Define {
        table: u32,
        name: &'a str,
    },
    Insert {
        table: u32,
        key: &'a [u8],
        value: &'a [u8],
        /// Where the value starts, counted from the start of the payload.
        value_at: usize,
    },
    Remove {
        table: u32,
        key: &'a [u8],
    },
    DeleteTable {
        table: u32,
    },
}

/// A payload that does not parse: where (offset in the payload) and what.
#[derive(Debug, PartialEq)]
pub(crate) struct OpError {
    pub at: usize,
    pub detail: String,
}

/// The operations of a payload, in order; stops after the first error.
pub(crate) struct Ops<'a> {
    payload: &'a [u8],
    pos: usize,
}

impl<'a> Ops<'a> {
    pub(crate) fn new(payload: &'a [u8]) -> Self {
        Ops { payload, pos: 0 }
    }

    /// Where the next operation starts in the payload.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    fn u32_field(&mut self, what: &str) -> Result<u32, OpError> {
        let value = read_u32(self.payload, self.pos).ok_or_else(|| OpError {
            at: self.pos,
            detail: format!("{what} runs past the end of the record"),
        })?;
        self.pos += 4;
        Ok(value)
    }

    fn bytes_field(&mut self, what: &str, max: usize) -> Result<(&'a [u8], usize), OpError> {
        let len_at = self.pos;
        let len = self.u32_field(what)? as usize;
        if len > max {
            return Err(OpError {
                at: len_at,
                detail: format!("{what} of {len} bytes is over the limit of {max}"),
            });
        }
        let start = self.pos;
        let bytes = start
            .checked_add(len)
            .and_then(|end| self.payload.get(start..end))
            .ok_or_else(|| OpError {
                at: len_at,
                detail: format!("{what} of {len} bytes runs past the end of the record"),
            })?;
        self.pos += len;
        Ok((bytes, start))
    }

    fn parse_one(&mut self) -> Result<Op<'a>, OpError> {
        let tag_at = self.pos;
        let tag = *self.payload.get(tag_at).ok_or_else(|| OpError {
            at: tag_at,
            detail: "operation tag past the end of the record".to_owned(),
        })?;
        self.pos += 1;
        match tag {
            TAG_DEFINE => {
                let table = self.u32_field("table id")?;
                let name_at = self.pos;
                let (name, _) = self.bytes_field("table name", MAX_TABLE_NAME)?;
                let name = std::str::from_utf8(name).map_err(|_| OpError {
                    at: name_at,
                    detail: "table name is not UTF-8".to_owned(),
                })?;
                Ok(Op::Define { table, name })
            }
            TAG_INSERT => {
                let table = self.u32_field("table id")?;
                let (key, _) = self.bytes_field("key", MAX_KEY_BYTES)?;
                let (value, value_at) = self.bytes_field("value", usize::MAX)?;
                Ok(Op::Insert {
                    table,
                    key,
                    value,
                    value_at,
                })
            }
            TAG_REMOVE => {
                let table = self.u32_field("table id")?;
                let (key, _) = self.bytes_field("key", MAX_KEY_BYTES)?;
                Ok(Op::Remove { table, key })
            }
            TAG_DELETE_TABLE => {
                let table = self.u32_field("table id")?;
                Ok(Op::DeleteTable { table })
            }
            other => Err(OpError {
                at: tag_at,
                detail: format!("unknown operation tag {other}"),
            }),
        }
    }
}

impl<'a> Iterator for Ops<'a> {
    type Item = Result<Op<'a>, OpError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.payload.len() {
            return None;
        }
        let op = self.parse_one();
        if op.is_err() {
            // Nothing after a bad field can be trusted: end the iteration.
            self.pos = self.payload.len();
        }
        Some(op)
    }
}

/// Whether `payload` parses as operations (syntax only: table ids are not checked against
/// definitions, which needs the records before it).
pub(crate) fn check_payload(payload: &[u8]) -> Result<(), OpError> {
    if payload.is_empty() {
        return Err(OpError {
            at: 0,
            detail: "empty record".to_owned(),
        });
    }
    Ops::new(payload).try_for_each(|op| op.map(|_| ()))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    let array: [u8; 4] = field.try_into().ok()?;
    Some(u32::from_le_bytes(array))
}

/// Builds one record (header then payload) in memory, so a commit is one write.
pub(crate) struct RecordWriter {
    /// The record's bytes, the first [`RECORD_HEADER_BYTES`] of them a placeholder until
    /// [`RecordWriter::finish`] fills in length and CRC.
    bytes: Vec<u8>,
}

impl RecordWriter {
    pub(crate) fn new() -> Self {
        RecordWriter {
            bytes: vec![0; RECORD_HEADER_BYTES as usize],
        }
    }

    /// Bytes of the payload written so far.
    pub(crate) fn payload_len(&self) -> u64 {
        self.bytes.len() as u64 - RECORD_HEADER_BYTES
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.payload_len() == 0
    }

    // Lengths below are written as u32: callers refuse names, keys and values over their
    // limits (all under 4 GiB) before they get here.
    fn put_len(&mut self, len: usize) {
        self.bytes.extend_from_slice(&(len as u32).to_le_bytes());
    }

    pub(crate) fn define(&mut self, table: u32, name: &str) {
        self.bytes.push(TAG_DEFINE);
        self.bytes.extend_from_slice(&table.to_le_bytes());
        self.put_len(name.len());
        self.bytes.extend_from_slice(name.as_bytes());
    }

    /// Appends an insert; returns where its value starts, counted from the record's start.
    pub(crate) fn insert(&mut self, table: u32, key: &[u8], value: &[u8]) -> u64 {
        self.bytes.push(TAG_INSERT);
        self.bytes.extend_from_slice(&table.to_le_bytes());
        self.put_len(key.len());
        self.bytes.extend_from_slice(key);
        self.put_len(value.len());
        let value_at = self.bytes.len() as u64;
        self.bytes.extend_from_slice(value);
        value_at
    }

    pub(crate) fn remove(&mut self, table: u32, key: &[u8]) {
        self.bytes.push(TAG_REMOVE);
        self.bytes.extend_from_slice(&table.to_le_bytes());
        self.put_len(key.len());
        self.bytes.extend_from_slice(key);
    }

    pub(crate) fn delete_table(&mut self, table: u32) {
        self.bytes.push(TAG_DELETE_TABLE);
        self.bytes.extend_from_slice(&table.to_le_bytes());
    }

    /// The whole record, header filled in, and the writer emptied for the next one. `synced`:
    /// the offset before which the file is known durable as the record is written (see
    /// [`RecordHead::synced`]; 0 claims nothing).
    pub(crate) fn finish(&mut self, synced: u64) -> Vec<u8> {
        let mut bytes = std::mem::replace(&mut self.bytes, vec![0; RECORD_HEADER_BYTES as usize]);
        let payload_len = (bytes.len() as u64 - RECORD_HEADER_BYTES) as u32;
        let crc = checksum(
            synced,
            bytes
                .get(RECORD_HEADER_BYTES as usize..)
                .unwrap_or_default(),
        );
        if let Some(head) = bytes.get_mut(..RECORD_HEADER_BYTES as usize) {
            head[..4].copy_from_slice(&payload_len.to_le_bytes());
            head[4..8].copy_from_slice(&crc.to_le_bytes());
            head[8..].copy_from_slice(&synced.to_le_bytes());
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(record: &[u8]) -> &[u8] {
        &record[RECORD_HEADER_BYTES as usize..]
    }

    #[test]
    fn a_record_decodes_to_the_operations_encoded() {
        let mut writer = RecordWriter::new();
        writer.define(7, "items");
        let value_at = writer.insert(7, b"k1", b"value one");
        writer.remove(7, b"k0");
        writer.delete_table(3);
        let record = writer.finish(4242);
        let head = parse_record_header(record[..16].try_into().unwrap());
        assert_eq!(head.payload_len as usize, record.len() - 16);
        assert_eq!(head.synced, 4242);
        assert_eq!(head.crc, checksum(4242, payload(&record)));
        assert_ne!(
            head.crc,
            checksum(4243, payload(&record)),
            "the claim is checksummed"
        );
        let ops: Vec<_> = Ops::new(payload(&record))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            ops,
            vec![
                Op::Define {
                    table: 7,
                    name: "items"
                },
                Op::Insert {
                    table: 7,
                    key: b"k1",
                    value: b"value one",
                    value_at: value_at as usize - RECORD_HEADER_BYTES as usize,
                },
                Op::Remove {
                    table: 7,
                    key: b"k0"
                },
                Op::DeleteTable { table: 3 },
            ]
        );
        assert_eq!(&record[value_at as usize..][..9], b"value one");
    }

    #[test]
    fn op_sizes_match_the_encoding() {
        let mut writer = RecordWriter::new();
        writer.define(1, "abc");
        assert_eq!(writer.payload_len(), define_op_bytes(3));
        let mut writer = RecordWriter::new();
        writer.insert(1, b"key", b"value");
        assert_eq!(writer.payload_len(), insert_op_bytes(3, 5));
    }

    fn parse_error(payload: &[u8]) -> OpError {
        check_payload(payload).unwrap_err()
    }

    #[test]
    fn bad_payloads_say_where_and_what() {
        assert_eq!(parse_error(&[]).detail, "empty record");
        assert_eq!(
            parse_error(&[9]),
            OpError {
                at: 0,
                detail: "unknown operation tag 9".into()
            }
        );
        assert_eq!(
            parse_error(&[4, 1, 0]).detail,
            "table id runs past the end of the record"
        );
        // An insert whose key length points past the payload.
        let mut bad = vec![2, 1, 0, 0, 0];
        bad.extend_from_slice(&100u32.to_le_bytes());
        bad.extend_from_slice(b"short");
        let err = parse_error(&bad);
        assert_eq!(err.at, 5);
        assert!(err.detail.contains("runs past the end"), "{}", err.detail);
        // A key over the limit.
        let mut long = vec![3, 1, 0, 0, 0];
        long.extend_from_slice(&(MAX_KEY_BYTES as u32 + 1).to_le_bytes());
        assert!(parse_error(&long).detail.contains("over the limit"));
        // A table name that is not UTF-8.
        let mut name = vec![1, 1, 0, 0, 0, 2, 0, 0, 0, 0xff, 0xfe];
        assert_eq!(parse_error(&name).detail, "table name is not UTF-8");
        name[5] = 0;
        assert!(check_payload(&name[..9]).is_ok());
    }

    #[test]
    fn headers_are_classified() {
        let ours = header();
        assert_eq!(check_header(&ours), HeaderCheck::Valid);
        assert_eq!(check_header(&[]), HeaderCheck::Fresh);
        assert_eq!(check_header(&ours[..5]), HeaderCheck::Fresh);
        assert_eq!(check_header(&[0; 7]), HeaderCheck::Fresh);
        assert_eq!(check_header(b"SQLite format 3\0"), HeaderCheck::NotALog);
        assert_eq!(check_header(b"PK"), HeaderCheck::NotALog);
        let mut newer = ours;
        newer[8] = 2;
        assert_eq!(check_header(&newer), HeaderCheck::Newer(2));
        newer[8] = 0;
        assert_eq!(check_header(&newer), HeaderCheck::BadVersion);
        assert_eq!(check_header(&newer[..10]), HeaderCheck::BadVersion);
    }
}
