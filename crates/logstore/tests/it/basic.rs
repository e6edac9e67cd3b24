//! The contract's everyday promises on a file store and an in-memory one: reads, transaction
//! isolation, reopen, read-only, close, locks.

use std::ops::Bound::{self, Excluded, Included, Unbounded};

use devtables_logstore::{LogError, LogOpenError, LogOptions, LogStore};

fn all() -> (Bound<&'static [u8]>, Bound<&'static [u8]>) {
    (Unbounded, Unbounded)
}

fn fill(store: &LogStore) {
    let mut txn = store.write().unwrap();
    txn.insert("items", b"a", b"short").unwrap();
    txn.insert("items", b"b", &[7u8; 300]).unwrap();
    txn.insert("items", b"c", b"").unwrap();
    txn.insert("other", b"x", b"1").unwrap();
    txn.commit(true).unwrap();
}

fn check_filled(store: &LogStore) {
    let read = store.read().unwrap();
    assert_eq!(read.table_names(), vec!["items", "other"]);
    let items = read.table("items").unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items.get(b"a").unwrap().as_deref(), Some(&b"short"[..]));
    assert_eq!(items.get(b"b").unwrap().as_deref(), Some(&[7u8; 300][..]));
    assert_eq!(items.get(b"c").unwrap().as_deref(), Some(&b""[..]));
    assert_eq!(items.get(b"d").unwrap(), None);
    let keys: Vec<_> = items.keys(all()).rev().collect();
    assert_eq!(keys, vec![&b"c"[..], b"b", b"a"]);
    let range: Vec<_> = items
        .range((Excluded(&b"a"[..]), Included(&b"c"[..])))
        .map(|entry| entry.unwrap().0.to_vec())
        .collect();
    assert_eq!(range, vec![b"b".to_vec(), b"c".to_vec()]);
    // A range BTreeMap would panic on holds nothing.
    assert_eq!(
        items
            .keys((Included(&b"c"[..]), Included(&b"a"[..])))
            .count(),
        0
    );
}

#[test]
fn committed_data_is_read_back_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    fill(&store);
    check_filled(&store);
    drop(store);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    check_filled(&store);
    assert_eq!(store.stats().entries, 4);
}

#[test]
fn in_memory_store_reads_back() {
    let store = LogStore::in_memory(LogOptions::default());
    fill(&store);
    check_filled(&store);
    assert_eq!(store.stats().file_bytes, 0);
}

#[test]
fn a_transaction_sees_its_changes_and_others_do_not_until_commit() {
    let store = LogStore::in_memory(LogOptions::default());
    fill(&store);
    let mut txn = store.write().unwrap();
    assert!(txn.is_empty());
    txn.insert("items", b"aa", b"new").unwrap();
    assert!(txn.remove("items", b"b").unwrap());
    assert!(!txn.remove("items", b"b").unwrap());
    assert!(txn.delete_table("other").unwrap());
    assert!(!txn.is_empty());
    assert_eq!(txn.len("items").unwrap(), 3);
    assert_eq!(txn.get("items", b"aa").unwrap(), Some(b"new".to_vec()));
    assert_eq!(txn.table_names().unwrap(), vec!["items"]);
    let keys = txn.keys("items", (Unbounded, Unbounded), 10).unwrap();
    assert_eq!(keys, vec![b"a".to_vec(), b"aa".to_vec(), b"c".to_vec()]);
    let last_two = txn.range("items", (Unbounded, Unbounded), true, 2).unwrap();
    assert_eq!(last_two[0].0, b"c");
    assert_eq!(last_two[1], (b"aa".to_vec(), b"new".to_vec()));
    // The committed state is unchanged for everyone else meanwhile.
    let other = store.clone();
    let seen = std::thread::spawn(move || {
        let read = other.read().unwrap();
        (read.table("items").unwrap().len(), read.table_names())
    })
    .join()
    .unwrap();
    assert_eq!(seen, (3, vec!["items".to_owned(), "other".to_owned()]));
    txn.commit(false).unwrap();
    let read = store.read().unwrap();
    assert_eq!(read.table_names(), vec!["items"]);
    assert!(read.table("items").unwrap().contains(b"aa"));
    assert!(!read.table("items").unwrap().contains(b"b"));
}

#[test]
fn read_only_refuses_writes_and_close_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    fill(&store);
    assert!(matches!(
        LogStore::open(&path, LogOptions::default()),
        Err(LogOpenError::InUse { .. })
    ));
    assert!(matches!(
        LogStore::open_read_only(&path, LogOptions::default()),
        Err(LogOpenError::InUse { .. })
    ));
    store.close().unwrap();
    store.close().unwrap();
    assert!(matches!(store.read(), Err(LogError::Closed)));
    assert!(matches!(store.write(), Err(LogError::Closed)));
    let reader = LogStore::open_read_only(&path, LogOptions::default()).unwrap();
    assert!(reader.is_read_only());
    check_filled(&reader);
    assert!(matches!(reader.write(), Err(LogError::ReadOnly)));
    let second_reader = LogStore::open_read_only(&path, LogOptions::default()).unwrap();
    check_filled(&second_reader);
}

#[test]
fn compaction_keeps_content_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    for round in 0..20u8 {
        let mut txn = store.write().unwrap();
        for i in 0..50u8 {
            txn.insert("t", &[i], &[round; 100]).unwrap();
        }
        txn.commit(false).unwrap();
    }
    let before = store.stats();
    store.compact().unwrap();
    let after = store.stats();
    assert!(
        after.file_bytes * 10 < before.file_bytes,
        "{before:?} {after:?}"
    );
    assert_eq!(after.file_bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(after.compactions, 1);
    let check = |store: &LogStore| {
        let read = store.read().unwrap();
        let t = read.table("t").unwrap();
        assert_eq!(t.len(), 50);
        for entry in t.range(all()) {
            assert_eq!(&*entry.unwrap().1, &[19u8; 100][..]);
        }
    };
    check(&store);
    drop(store);
    check(&LogStore::open(&path, LogOptions::default()).unwrap());
}

#[test]
fn insert_absent_counts_like_insert_and_refuses_the_transactions_own_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    let mut txn = store.write().unwrap();
    txn.insert("items", b"a", b"1").unwrap();
    txn.commit(true).unwrap();

    let mut txn = store.write().unwrap();
    txn.insert_absent("items", b"b".to_vec(), b"2".to_vec())
        .unwrap();
    let refused = txn.insert_absent("items", b"b".to_vec(), b"3".to_vec());
    assert!(
        matches!(refused, Err(LogError::KeyPresent { .. })),
        "{refused:?}"
    );
    assert_eq!(txn.get("items", b"b").unwrap().as_deref(), Some(&b"2"[..]));
    // A committed key this transaction removed is absent again.
    assert!(txn.remove("items", b"a").unwrap());
    txn.insert_absent("items", b"a".to_vec(), b"4".to_vec())
        .unwrap();
    assert_eq!(txn.len("items").unwrap(), 2);
    txn.commit(true).unwrap();
    let live_bytes = store.stats().live_bytes;
    assert_eq!(store.stats().entries, 2);
    drop(store);

    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    assert_eq!(store.stats().live_bytes, live_bytes);
    let read = store.read().unwrap();
    let table = read.table("items").unwrap();
    assert_eq!(table.len(), 2);
    assert_eq!(table.get(b"a").unwrap().as_deref(), Some(&b"4"[..]));
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "insert_absent of a key the committed table")]
fn insert_absent_of_a_committed_key_is_caught_in_debug_builds() {
    let store = LogStore::in_memory(LogOptions::default());
    let mut txn = store.write().unwrap();
    txn.insert("items", b"a", b"1").unwrap();
    txn.commit(false).unwrap();
    let mut txn = store.write().unwrap();
    let _ = txn.insert_absent("items", b"a".to_vec(), b"2".to_vec());
}
