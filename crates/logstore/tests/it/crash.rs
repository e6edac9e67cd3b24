//! Crash safety with a real SIGKILL: a child process (this test binary, re-executed) commits
//! numbered transactions that each change several tables, compacting now and then, and
//! reports each commit once `commit` returned; the parent kills it at a random moment, reopens
//! the file and checks that every reported commit is there and that no transaction is there
//! in part (all of its tables agree on the last commit).

use std::io::{BufRead, BufReader};
use std::ops::Bound;
use std::path::Path;
use std::process::{Command, Stdio};

use devtables_logstore::{LogOptions, LogStore};

const CHILD_ENV: &str = "DEVTABLES_LOGSTORE_CRASH_CHILD";
/// Tables every transaction writes.
const TABLES: [&str; 4] = ["t0", "t1", "t2", "t3"];
/// How many of the latest commits' keys the tables keep (older ones are removed).
const WINDOW: u64 = 20;

fn child_options() -> LogOptions {
    LogOptions {
        compact_min_file_bytes: 64 * 1024,
        compact_ratio: 1.5,
        ..LogOptions::default()
    }
}

fn value(table: usize, commit: u64) -> Vec<u8> {
    let len = 50 + (commit as usize * 37 + table * 11) % 400;
    (0..len)
        .map(|i| (commit as usize + table + i) as u8)
        .collect()
}

fn last_commit(store: &LogStore) -> u64 {
    let read = store.read().unwrap();
    read.table("last")
        .and_then(|t| t.get(b"n").unwrap())
        .map_or(0, |v| u64::from_be_bytes(v[..].try_into().unwrap()))
}

/// Entry point of the child process (does nothing unless the parent set the variable).
#[test]
fn child_process_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = LogStore::open(Path::new(&path), child_options()).unwrap();
    let start = last_commit(&store) + 1;
    for commit in start.. {
        let mut txn = store.write().unwrap();
        for (t, table) in TABLES.iter().enumerate() {
            txn.insert(table, &commit.to_be_bytes(), &value(t, commit))
                .unwrap();
            if commit > WINDOW {
                txn.remove(table, &(commit - WINDOW).to_be_bytes()).unwrap();
            }
        }
        txn.insert("last", b"n", &commit.to_be_bytes()).unwrap();
        txn.commit(commit % 2 == 0).unwrap();
        println!("ack {commit}");
        if commit % 10 == 0 && store.compact_if_worth().unwrap() {
            println!("compacted");
        }
    }
}

/// A tiny deterministic generator for kill points (the seed is in the test).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Every table holds exactly the window of keys ending at the last commit, with its values.
fn check_consistent(store: &LogStore, last: u64) {
    let read = store.read().unwrap();
    let first = last.saturating_sub(WINDOW - 1).max(1);
    for (t, name) in TABLES.iter().enumerate() {
        let table = read.table(name).unwrap();
        let keys: Vec<u64> = table
            .keys((Bound::Unbounded, Bound::Unbounded))
            .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
            .collect();
        let expected: Vec<u64> = (first..=last).collect();
        assert_eq!(keys, expected, "table {name} after commit {last}");
        for commit in first..=last {
            let got = table.get(&commit.to_be_bytes()).unwrap().unwrap();
            assert_eq!(&*got, &value(t, commit)[..], "{name} commit {commit}");
        }
    }
}

#[test]
fn acknowledged_commits_survive_sigkill_and_none_is_partial() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.log");
    let exe = std::env::current_exe().unwrap();
    let mut seed: u64 = 0x5EED_10C5_70BE_0001;
    let mut acked = 0u64;
    let mut compactions = 0;
    for round in 0..12 {
        let kill_after = 5 + next(&mut seed) % 300;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut note = |line: &str, acked: &mut u64| {
            if let Some(n) = line.strip_prefix("ack ") {
                *acked = (*acked).max(n.parse().unwrap());
                true
            } else {
                if line == "compacted" {
                    compactions += 1;
                }
                false
            }
        };
        let mut seen = 0;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if note(&line, &mut acked) {
                seen += 1;
                if seen >= kill_after {
                    break;
                }
            }
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the child ended on its own"
        );
        // What the child printed before it died was acknowledged too.
        for line in lines {
            let Ok(line) = line else { break };
            note(&line, &mut acked);
        }
        let store = LogStore::open(&path, LogOptions::default()).unwrap();
        let last = last_commit(&store);
        assert!(
            last >= acked,
            "round {round}: commit {acked} was acknowledged, the file ends at {last}"
        );
        assert!(
            last <= acked + 1,
            "round {round}: {last} commits found, only {acked} acknowledged (one may be in flight)"
        );
        check_consistent(&store, last);
        acked = last;
    }
    assert!(acked > 100, "only {acked} commits over all rounds");
    assert!(compactions > 0, "no compaction ran in the children");
}
