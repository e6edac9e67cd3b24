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

/// CPU time this thread used, in seconds (0 where the clock is missing).
fn thread_cpu_secs() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    let done = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if done != 0 {
        return 0.0;
    }
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// A phase's start: wall clock and this thread's CPU time. The CPU-time rate is the one to
/// compare on a machine shared with other work (a wall-clock rate there also counts the time
/// the thread waited for a core).
struct Started {
    wall: Instant,
    cpu: f64,
}

fn start() -> Started {
    Started {
        wall: Instant::now(),
        cpu: thread_cpu_secs(),
    }
}

fn rate(what: &str, count: u64, started: Started) {
    let secs = started.wall.elapsed().as_secs_f64();
    let cpu = thread_cpu_secs() - started.cpu;
    println!(
        "{what:<46} {:>12.0}/s  cpu {:>12.0}/s  ({count} in {:.3} s, cpu {:.3} s)",
        count as f64 / secs,
        count as f64 / cpu,
        secs,
        cpu
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

    let started = start();
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

    let started = start();
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

    let started = start();
    for i in 0..N {
        let read = store.read().unwrap();
        let got = read
            .table("items")
            .unwrap()
            .get(&keys[((i * 104_729) % N) as usize]);
        assert!(got.unwrap().is_some());
    }
    rate("get (a read view per get)", N, started);

    let started = start();
    let read = store.read().unwrap();
    let items = read.table("items").unwrap();
    let value_bytes: usize = items
        .range((Bound::Unbounded, Bound::Unbounded))
        .map(|e| e.unwrap().1.len())
        .sum();
    assert_eq!(value_bytes, 250 * N as usize);
    rate("range (whole table, values read)", N, started);
    let started = start();
    let backwards = items
        .keys((Bound::Unbounded, Bound::Unbounded))
        .rev()
        .count();
    assert_eq!(backwards as u64, N);
    rate("keys (whole table, reversed)", N, started);
    drop(read);

    let started = start();
    drop(store);
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    rate("reopen (replay, entries)", N, started);

    let started = start();
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
    let started = start();
    assert!(store.compact_if_worth().unwrap());
    println!(
        "compaction of the emptied file: {:.3} s, file now {} B",
        started.wall.elapsed().as_secs_f64(),
        store.stats().file_bytes
    );
}

/// One row of the device database's workload: an item's key in its model's table
/// (`items:<model>`, device then reading, ~26 bytes) and its key in a secondary index (status,
/// then the item's own key parts, ~53 bytes, empty value).
fn db_keys(i: u64) -> (Vec<u8>, Vec<u8>) {
    let device = i % 100;
    let status = if i % 10 == 9 { "warn" } else { "ok" };
    let item = format!("dev#d{device:04}\0reading#{i:08}");
    let index = format!("status#{status}\0reading#{i:08}\0dev#d{device:04}\0reading#{i:08}");
    (item.into_bytes(), index.into_bytes())
}

/// `VmRSS` and `VmHWM` of this process in bytes (0 where `/proc` has none).
fn rss_and_peak() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS (Linux 4.0 and later), so each phase has its own peak.
fn reset_peak() {
    // Not every kernel allows it; the figures then say so by a peak below the RSS delta.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Hands freed heap pages back to the kernel, so RSS after a drop says what is still held.
fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn per_entry(bytes: u64, base: u64, entries: u64) -> f64 {
    bytes.saturating_sub(base) as f64 / entries as f64
}

/// The index's RAM per entry and the everyday rates on the device database's two kinds of
/// table (issue 17): an items table with 250-byte values and an index table with empty ones,
/// 100k entries each, in order of creation (readings numbered up, devices interleaved).
#[test]
#[ignore = "a measurement, run by hand in release mode"]
fn bench_db_tables() {
    const ITEMS: &str = "items:Reading";
    const INDEX: &str = "index:Reading:status";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.log");
    let keys: Vec<(Vec<u8>, Vec<u8>)> = (0..N).map(db_keys).collect();
    let entries = 2 * N;
    trim_heap();
    reset_peak();
    let (base, _) = rss_and_peak();
    let store = LogStore::open(&path, LogOptions::default()).unwrap();

    let mut value = vec![0u8; 250];
    let started = start();
    for (i, (item, index)) in keys.iter().enumerate() {
        value[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut txn = store.write().unwrap();
        txn.insert(ITEMS, item, &value).unwrap();
        txn.commit(false).unwrap();
        let mut txn = store.write().unwrap();
        txn.insert(INDEX, index, b"").unwrap();
        txn.commit(false).unwrap();
    }
    rate("db insert (single-key commits)", entries, started);
    let (rss, peak) = rss_and_peak();
    let stats = store.stats();
    println!(
        "db after inserts: RSS {:.1} B/entry, peak {:.1} B/entry, memory_bytes {:.1} B/entry, file {} B",
        per_entry(rss, base, entries),
        per_entry(peak, base, entries),
        stats.memory_bytes as f64 / entries as f64,
        stats.file_bytes
    );

    let started = start();
    let mut found = 0;
    for i in 0..N {
        let (item, index) = &keys[((i * 104_729) % N) as usize];
        let read = store.read().unwrap();
        found += read
            .table(ITEMS)
            .unwrap()
            .get(item)
            .unwrap()
            .map_or(0, |v| v.len());
        found += usize::from(read.table(INDEX).unwrap().contains(index));
    }
    assert_eq!(found, 251 * N as usize);
    rate("db get (item value + index contains)", entries, started);

    let started = start();
    let mut seen = 0u64;
    for i in 0..10_000 {
        let (_, from) = &keys[((i * 104_729) % N) as usize];
        let read = store.read().unwrap();
        let index = read.table(INDEX).unwrap();
        seen += index
            .keys((Bound::Included(&from[..]), Bound::Unbounded))
            .take(100)
            .count() as u64;
    }
    rate(
        "db range (index, 100 keys from a random key)",
        seen,
        started,
    );
    let started = start();
    let read = store.read().unwrap();
    let value_bytes: usize = read
        .table(ITEMS)
        .unwrap()
        .range((Bound::Unbounded, Bound::Unbounded))
        .rev()
        .map(|e| e.unwrap().1.len())
        .sum();
    assert_eq!(value_bytes, 250 * N as usize);
    drop(read);
    rate("db range (whole items table reversed, values)", N, started);

    drop(store);
    trim_heap();
    reset_peak();
    let (base, _) = rss_and_peak();
    let started = start();
    let store = LogStore::open(&path, LogOptions::default()).unwrap();
    rate("db reopen (replay)", entries, started);
    let (rss, peak) = rss_and_peak();
    println!(
        "db after reopen: RSS {:.1} B/entry, peak {:.1} B/entry, memory_bytes {:.1} B/entry",
        per_entry(rss, base, entries),
        per_entry(peak, base, entries),
        store.stats().memory_bytes as f64 / entries as f64,
    );

    let started = start();
    for i in 0..N {
        let (item, index) = &keys[((i * 7_919) % N) as usize];
        let mut txn = store.write().unwrap();
        assert!(txn.remove(ITEMS, item).unwrap());
        txn.commit(false).unwrap();
        let mut txn = store.write().unwrap();
        assert!(txn.remove(INDEX, index).unwrap());
        txn.commit(false).unwrap();
    }
    rate(
        "db remove (single-key commits, random order)",
        entries,
        started,
    );
    assert_eq!(store.stats().entries, 0);
}
