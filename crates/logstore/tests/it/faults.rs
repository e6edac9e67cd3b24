//! A commit that fails half way (the file may not grow: `RLIMIT_FSIZE`, in a child process
//! since the limit is the whole process's) leaves the store and the file as before it, and the
//! store keeps working; and readers running beside commits and compactions always see whole
//! transactions.

use std::ops::Bound;
use std::path::Path;
use std::process::Command;

use devtables_logstore::{LogError, LogOptions, LogStore};

const CHILD_ENV: &str = "DEVTABLES_LOGSTORE_FSIZE_CHILD";

fn committed(store: &LogStore, table: &str) -> Vec<Vec<u8>> {
    let read = store.read().unwrap();
    read.table(table).map_or_else(Vec::new, |t| {
        t.keys((Bound::Unbounded, Bound::Unbounded))
            .map(<[u8]>::to_vec)
            .collect()
    })
}

/// Runs in the child: commits until the file-size limit refuses one, then checks the undo.
#[test]
fn fsize_child_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let path = Path::new(&path);
    let store = LogStore::open(path, LogOptions::default()).unwrap();
    let mut txn = store.write().unwrap();
    txn.insert("t", b"before", &[1; 500]).unwrap();
    txn.commit(true).unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    // SAFETY: plain libc calls with valid arguments; the process is this test's own child.
    unsafe {
        // A write past the limit then fails with EFBIG instead of killing the process.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: len + 2_000,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let mut txn = store.write().unwrap();
    txn.insert("t", b"too big", &[2; 5_000]).unwrap();
    txn.insert("u", b"same txn", b"x").unwrap();
    let error = txn.commit(true).unwrap_err();
    assert!(matches!(error, LogError::Io(_)), "{error}");
    assert_eq!(
        std::fs::metadata(path).unwrap().len(),
        len,
        "the partial record was cut off"
    );
    assert_eq!(committed(&store, "t"), vec![b"before".to_vec()]);
    assert!(committed(&store, "u").is_empty());
    // The store goes on: a commit that fits lands where the failed one was.
    let mut txn = store.write().unwrap();
    txn.insert("t", b"after", &[3; 100]).unwrap();
    txn.commit(true).unwrap();
    drop(store);
    let store = LogStore::open(path, LogOptions::default()).unwrap();
    assert_eq!(
        committed(&store, "t"),
        vec![b"after".to_vec(), b"before".to_vec()]
    );
    assert!(committed(&store, "u").is_empty());
    println!("fsize child done");
}

#[test]
fn a_commit_the_file_system_refuses_is_undone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "faults::fsize_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("fsize child done"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn readers_beside_commits_and_compactions_see_whole_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let options = LogOptions {
        compact_min_file_bytes: 0,
        compact_ratio: 1.0,
        ..LogOptions::default()
    };
    let store = LogStore::open(&path, options).unwrap();
    let commits = 300u32;
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for n in 1..=commits {
                let mut txn = store.write().unwrap();
                // Both tables always hold the same number, in values long enough to live in
                // the file, so a reader sees a torn transaction or a stale location at once.
                txn.insert("a", b"n", &[n as u8; 100]).unwrap();
                txn.insert("b", b"n", &[n as u8; 100]).unwrap();
                txn.insert("count", b"n", &n.to_le_bytes()).unwrap();
                txn.commit(false).unwrap();
                if n % 25 == 0 {
                    store.compact().unwrap();
                }
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || loop {
                let read = store.read().unwrap();
                let Some(count) = read.table("count") else {
                    continue;
                };
                let n =
                    u32::from_le_bytes(count.get(b"n").unwrap().unwrap()[..].try_into().unwrap());
                let a = read
                    .table("a")
                    .unwrap()
                    .get(b"n")
                    .unwrap()
                    .unwrap()
                    .into_owned();
                let b = read
                    .table("b")
                    .unwrap()
                    .get(b"n")
                    .unwrap()
                    .unwrap()
                    .into_owned();
                assert_eq!(a, vec![n as u8; 100]);
                assert_eq!(b, a);
                if n == commits {
                    break;
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for reader in readers {
        reader.join().unwrap();
    }
    assert_eq!(store.stats().compactions, u64::from(commits / 25));
}

#[test]
fn a_store_is_shared_across_threads() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<LogStore>();
}
