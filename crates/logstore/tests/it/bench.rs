//! Rates of the everyday operations at 100k keys, for the record (no timing is asserted):
//! `cargo test --release -p devtables-logstore --test it -- --ignored bench_ --nocapture`.

use std::ops::Bound;
use std::time::Instant;

use devtables_logstore::{LogOptions, LogStore};

const N: u64 = 100_000;

/// A key of about 40 bytes, as the device database builds them (model, then id).
fn key(i: u64) -> Vec<u8> {
    format!("Reading#0123456789abcdef#{:015}", (i * 7_919) % N).into_bytes()
}

fn value(i: u64) -> Vec<u8> {
    (0..250).map(|b| (b as u64 + i) as u8).collect()
}

/// Resident memory of this process, from `/proc/self/statm` (0 where there is none).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn rate(what: &str, count: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{what:<38} {:>12.0}/s  ({count} in {:.3} s)",
        count as f64 / secs,
        secs
    );
}

#[test]
#[ignore = "a measurement, run by hand in release mode"]
fn bench_rates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.log");
    let keys: Vec<Vec<u8>> = (0..N).map(key).collect();
    let values: Vec<Vec<u8>> = (0..N).map(value).collect();
    let rss_before = rss_bytes();
    let store = LogStore::open(&path, LogOptions::default()).unwrap();

    let started = Instant::now();
    for (k, v) in keys.iter().zip(&values) {
        let mut txn = store.write().unwrap();
        txn.insert("items", k, v).unwrap();
        txn.commit(false).unwrap();
    }
    rate("insert (one-key commits, not durable)", N, started);
    let stats = store.stats();
    let rss_after = rss_bytes();
    println!(
        "file {} B ({:.0} B per insert), memory_bytes {} ({:.1} B/entry), RSS added {:.1} B/entry",
        stats.file_bytes,
        stats.file_bytes as f64 / N as f64,
        stats.memory_bytes,
        stats.memory_bytes as f64 / N as f64,
        rss_after.saturating_sub(rss_before) as f64 / N as f64,
    );

    let started = Instant::now();
    let read = store.read().unwrap();
    let items = read.table("items").unwrap();
    let mut bytes = 0;
    for i in 0..N {
        bytes += items
            .get(&keys[((i * 104_729) % N) as usize])
            .unwrap()
            .unwrap()
            .len();
    }
    assert_eq!(bytes, 250 * N as usize);
    rate("get (one read view, random order)", N, started);
    drop(read);

    let started = Instant::now();
    for i in 0..N {
        let read = store.read().unwrap();
        let got = read
            .table("items")
            .unwrap()
            .get(&keys[((i * 104_729) % N) as usize]);
        assert!(got.unwrap().is_some());
    }
    rate("get (a read view per get)", N, started);

    let started = Instant::now();
    let read = store.read().unwrap();
    let items = read.table("items").unwrap();
    let value_bytes: usize = items
        .range((Bound::Unbounded, Bound::Unbounded))
        .map(|e| e.unwrap().1.len())
        .sum();
    assert_eq!(value_bytes, 250 * N as usize);
    rate("range (whole table, values read)", N, started);
    let started = Instant::now();
    let backwards = items
        .keys((Bound::Unbounded, Bound::Unbounded))
        .rev()
        .count();
    assert_eq!(backwards as u64, N);
    rate("keys (whole table, reversed)", N, started);
    drop(read);

    let started = Instant::now();
    drop(store);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    rate("reopen (replay, entries)", N, started);

    let started = Instant::now();
    for k in &keys {
        let mut txn = store.write().unwrap();
        assert!(txn.remove("items", k).unwrap());
        txn.commit(false).unwrap();
    }
    rate("remove (one-key commits, not durable)", N, started);
    let stats = store.stats();
    println!(
        "after removes: file {} B, live {} B, entries {}",
        stats.file_bytes, stats.live_bytes, stats.entries
    );
    let started = Instant::now();
    assert!(store.compact_if_worth().unwrap());
    println!(
        "compaction of the emptied file: {:.3} s, file now {} B",
        started.elapsed().as_secs_f64(),
        store.stats().file_bytes
    );
}
