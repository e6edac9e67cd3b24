//! Hostile and damaged files: each kind of damage gets its typed answer (and the file is left
//! as it was), a torn tail is cut off by a read-write open only, and no bytes at all make an
//! open or a read panic.

use std::fs::OpenOptions;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;

use devtables_logstore::{LogError, LogOpenError, LogOptions, LogStore, FORMAT_VERSION, MAGIC};
use proptest::prelude::*;

/// Writes three commits; returns where each record starts and the file's length.
fn three_commits(path: &Path) -> (Vec<u64>, u64) {
    let store = LogStore::open(path, LogOptions::default()).unwrap();
    let mut starts = Vec::new();
    for i in 0..3u8 {
        starts.push(store.stats().file_bytes);
        let mut txn = store.write().unwrap();
        txn.insert("t", &[i], &[i; 100]).unwrap();
        txn.insert("u", &[i], b"small").unwrap();
        txn.commit(true).unwrap();
    }
    let len = store.stats().file_bytes;
    (starts, len)
}

fn keys_of(store: &LogStore, table: &str) -> Vec<Vec<u8>> {
    let read = store.read().unwrap();
    read.table(table).map_or_else(Vec::new, |t| {
        t.keys((Bound::Unbounded, Bound::Unbounded))
            .map(<[u8]>::to_vec)
            .collect()
    })
}

fn damaged_at(result: Result<LogStore, LogOpenError>) -> (u64, String) {
    match result {
        Err(LogOpenError::Damaged { offset, detail, .. }) => (offset, detail),
        Err(other) => panic!("expected Damaged, got {other}"),
        Ok(_) => panic!("expected Damaged, the open succeeded"),
    }
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

#[test]
fn a_flipped_byte_in_an_early_record_is_damage_at_that_record_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (starts, _) = three_commits(&path);
    let at = starts[1] + 16 + 20;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let (offset, detail) = damaged_at(LogStore::open(&path, LogOptions::default()));
    assert_eq!(offset, starts[1]);
    assert!(detail.contains("checksum"), "{detail}");
    let (offset, _) = damaged_at(LogStore::open_read_only(&path, LogOptions::default()));
    assert_eq!(offset, starts[1]);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_length_past_the_end_followed_by_valid_records_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (starts, len) = three_commits(&path);
    let before = std::fs::read(&path).unwrap();
    patch(&path, starts[0], &((len as u32) * 2).to_le_bytes());
    let (offset, detail) = damaged_at(LogStore::open(&path, LogOptions::default()));
    assert_eq!(offset, starts[0]);
    assert!(detail.contains("past the end"), "{detail}");
    assert!(
        detail.contains(&format!("valid record follows at byte {}", starts[1])),
        "{detail}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), before.len() as u64);
}

/// Commits `A` durably, then `B` and `C` without syncing, then (when `sync_then_more`) syncs
/// and commits `D`; returns where each record starts.
fn durable_then_not(path: &Path, sync_then_more: bool) -> Vec<u64> {
    let store = LogStore::open(path, LogOptions::default()).unwrap();
    let mut starts = Vec::new();
    let names: &[u8] = if sync_then_more { b"ABCD" } else { b"ABC" };
    for (i, &name) in names.iter().enumerate() {
        if name == b'D' {
            store.sync().unwrap();
        }
        starts.push(store.stats().file_bytes);
        let mut txn = store.write().unwrap();
        txn.insert("t", &[name], &[name; 100]).unwrap();
        txn.commit(i == 0).unwrap();
    }
    starts
}

#[test]
fn bad_bytes_where_the_file_was_not_yet_durable_are_a_torn_tail_with_what_follows() {
    // What a power loss can leave on a file system that writes a file's pages out of order:
    // `B` never reached the disk, `C` (written later, never synced either) did. Both were
    // written when the file was durable only up to the end of `A`, so cutting at `B` loses
    // only commits that were never durable.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let starts = durable_then_not(&path, false);
    patch(&path, starts[1] + 16 + 20, &[0xff; 8]);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert_eq!(keys_of(&store, "t"), vec![b"A".to_vec()]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), starts[1]);
    // The cut file takes commits again, and they replay.
    let mut txn = store.write().unwrap();
    txn.insert("t", b"E", b"after").unwrap();
    txn.commit(true).unwrap();
    drop(store);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert_eq!(keys_of(&store, "t"), vec![b"A".to_vec(), b"E".to_vec()]);
}

#[test]
fn bad_bytes_a_later_record_says_were_durable_are_damage() {
    // The same bytes of `B`, but `D` was written after a sync that covered `B`: its claim
    // proves `B` reached the disk, so bad bytes there are damage, and nothing is cut.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let starts = durable_then_not(&path, true);
    patch(&path, starts[1] + 16 + 20, &[0xff; 8]);
    let before = std::fs::read(&path).unwrap();
    let (offset, detail) = damaged_at(LogStore::open(&path, LogOptions::default()));
    assert_eq!(offset, starts[1]);
    assert!(
        detail.contains(&format!("valid record follows at byte {}", starts[3])),
        "{detail}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn a_torn_last_record_is_cut_off_by_a_read_write_open_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (starts, len) = three_commits(&path);
    let cut = starts[2] + (len - starts[2]) / 2;
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let reader = LogStore::open_read_only(&path, LogOptions::default()).unwrap();
    assert_eq!(keys_of(&reader, "t"), vec![vec![0], vec![1]]);
    drop(reader);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), cut);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert_eq!(keys_of(&store, "t"), vec![vec![0], vec![1]]);
    assert_eq!(keys_of(&store, "u"), vec![vec![0], vec![1]]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), starts[2]);
    // The next commit goes where the torn one was, and replays.
    let mut txn = store.write().unwrap();
    txn.insert("t", &[9], b"after").unwrap();
    txn.commit(true).unwrap();
    drop(store);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert_eq!(keys_of(&store, "t"), vec![vec![0], vec![1], vec![9]]);
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (_, len) = three_commits(&path);
    // Zeros (a length of 0 is never written) and then noise.
    let mut garbage = vec![0u8; 40];
    garbage.extend((0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    patch(&path, len, &garbage);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert_eq!(keys_of(&store, "t").len(), 3);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
}

#[test]
fn a_record_with_a_right_checksum_that_does_not_parse_is_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (_, len) = three_commits(&path);
    let cases: [(&[u8], &str); 3] = [
        (&[9, 1, 2, 3], "unknown operation tag 9"),
        (
            &[3, 77, 0, 0, 0, 1, 0, 0, 0, 5],
            "table id 77 is used but not defined",
        ),
        (
            &[2, 1, 0, 0, 0, 200, 0, 0, 0, 1],
            "runs past the end of the record",
        ),
    ];
    for (payload, expected) in cases {
        let record = record_bytes(0, payload);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len).unwrap();
        file.write_all_at(&record, len).unwrap();
        let (offset, detail) = damaged_at(LogStore::open(&path, LogOptions::default()));
        assert_eq!(offset, len);
        assert!(detail.contains(expected), "{detail}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len + record.len() as u64
        );
    }
}

/// A record as the file format says (payload length, CRC-32 of the `synced` claim and the
/// payload, the claim, the payload), built here so the test does not trust the crate's encoder.
fn record_bytes(synced: u64, payload: &[u8]) -> Vec<u8> {
    let mut covered = synced.to_le_bytes().to_vec();
    covered.extend_from_slice(payload);
    let mut record = (payload.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&crc32(&covered).to_le_bytes());
    record.extend_from_slice(&synced.to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// CRC-32 (IEEE), written out here so the test does not trust the crate's own encoder.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn other_formats_and_newer_versions_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    std::fs::write(&path, b"SQLite format 3\0 and more").unwrap();
    assert!(matches!(
        LogStore::open(&path, LogOptions::default()),
        Err(LogOpenError::NotALog { .. })
    ));
    let mut newer = MAGIC.to_vec();
    newer.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    newer.extend_from_slice(&[0; 4]);
    std::fs::write(&path, &newer).unwrap();
    match LogStore::open(&path, LogOptions::default()) {
        Err(LogOpenError::NewerFormat { found, .. }) => assert_eq!(found, FORMAT_VERSION + 1),
        other => panic!("expected NewerFormat, got {:?}", other.err()),
    }
    assert_eq!(std::fs::read(&path).unwrap(), newer);
    // An empty file, or a header cut short at creation, is a new store.
    std::fs::write(&path, &MAGIC[..5]).unwrap();
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert_eq!(store.stats().entries, 0);
    drop(store);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16);
    // A missing file is not created by a read-only open.
    let missing = dir.path().join("missing");
    match LogStore::open_read_only(&missing, LogOptions::default()) {
        Err(LogOpenError::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("expected NotFound, got {:?}", other.err()),
    }
    assert!(!missing.exists());
}

#[test]
fn a_value_cut_off_behind_the_stores_back_is_damage_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (starts, _) = three_commits(&path);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    // Locks are advisory: another writer can still cut the file.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(starts[1])
        .unwrap();
    let read = store.read().unwrap();
    let t = read.table("t").unwrap();
    assert_eq!(t.get(&[0]).unwrap().as_deref(), Some(&[0u8; 100][..]));
    assert!(matches!(t.get(&[2]), Err(LogError::Damaged { .. })));
}

#[test]
fn a_leftover_compaction_file_is_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    three_commits(&path);
    let leftover = dir.path().join("log.compact");
    std::fs::write(&leftover, b"half a compaction").unwrap();
    let reader = LogStore::open_read_only(&path, LogOptions::default()).unwrap();
    drop(reader);
    assert!(leftover.exists(), "a read-only open never writes");
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert!(!leftover.exists());
    assert_eq!(keys_of(&store, "t").len(), 3);
}

/// A small valid log to mutate.
fn sample_log() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    for i in 0..6u8 {
        let mut txn = store.write().unwrap();
        txn.insert("t", &[i], &vec![i; 20 + 10 * usize::from(i)])
            .unwrap();
        if i % 2 == 1 {
            txn.remove("t", &[i - 1]).unwrap();
        }
        if i == 4 {
            txn.delete_table("u").unwrap();
        }
        txn.insert("u", &[i], b"x").unwrap();
        txn.commit(false).unwrap();
    }
    drop(store);
    std::fs::read(&path).unwrap()
}

/// Opens `bytes` both ways and reads everything; only typed errors may come out.
fn open_never_panics(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    for read_only in [true, false] {
        std::fs::write(&path, bytes).unwrap();
        let opened = if read_only {
            LogStore::open_read_only(&path, LogOptions::default())
        } else {
            LogStore::open(&path, LogOptions::default())
        };
        let Ok(store) = opened else {
            continue;
        };
        let read = store.read().unwrap();
        for name in read.table_names() {
            let table = read.table(&name).unwrap();
            for entry in table.range((Bound::Unbounded, Bound::Unbounded)).rev() {
                let _ = entry;
            }
        }
        drop(read);
        if !read_only {
            let mut txn = store.write().unwrap();
            txn.insert("t", b"new", b"value").unwrap();
            txn.commit(false).unwrap();
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_logs_never_panic(mutations in prop::collection::vec(prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Mutation::Flip(at, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..24)).prop_map(|(at, b)| Mutation::Insert(at, b)),
    ], 1..4)) {
        let mut bytes = sample_log();
        for mutation in mutations {
            match mutation {
                Mutation::Flip(at, x) => {
                    let len = bytes.len();
                    bytes[at % len] ^= x;
                }
                Mutation::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
                Mutation::Insert(at, inserted) => {
                    let at = at % (bytes.len() + 1);
                    bytes.splice(at..at, inserted);
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
        open_never_panics(&bytes);
    }

    #[test]
    fn random_bytes_after_a_valid_header_never_panic(body in prop::collection::vec(any::<u8>(), 0..400)) {
        let mut bytes = header();
        bytes.extend_from_slice(&body);
        open_never_panics(&bytes);
    }

    /// Records with right lengths and checksums around operation-shaped noise, so the
    /// payload parser and the replay's table-id checks see every kind of wrong field.
    #[test]
    fn checksummed_noise_never_panics(records in prop::collection::vec(
        prop::collection::vec((1u8..=5, 0u32..3, 0u32..12, prop::collection::vec(any::<u8>(), 0..12)), 1..5),
        1..5,
    )) {
        let mut bytes = header();
        for ops in records {
            let mut payload = Vec::new();
            for (tag, id, len, tail) in ops {
                payload.push(tag);
                payload.extend_from_slice(&id.to_le_bytes());
                payload.extend_from_slice(&len.to_le_bytes());
                payload.extend_from_slice(&tail);
            }
            bytes.extend_from_slice(&record_bytes(0, &payload));
        }
        open_never_panics(&bytes);
    }
}

fn header() -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes
}

#[test]
fn a_whole_record_over_a_smaller_limit_is_not_cut_off_as_torn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    let mut txn = store.write().unwrap();
    txn.insert("t", b"big", &[5; 3000]).unwrap();
    txn.commit(true).unwrap();
    drop(store);
    let len = std::fs::metadata(&path).unwrap().len();
    let small = LogOptions {
        max_record_bytes: 1000,
        ..LogOptions::default()
    };
    let (offset, detail) = damaged_at(LogStore::open(&path, small.clone()));
    assert_eq!(offset, 16);
    assert!(detail.contains("larger max_record_bytes"), "{detail}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    // With the record cut short it is a torn tail again, whatever its length says.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let store = LogStore::open(&path, small).unwrap();
    assert_eq!(store.stats().entries, 0);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16);
}
