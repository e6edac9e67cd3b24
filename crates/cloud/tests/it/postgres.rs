//! What only the PostgreSQL store has to show (service tests: `DEVTABLES_SERVICES=1` and a
//! PostgreSQL at `DEVTABLES_POSTGRES`): several store instances on one schema writing at once,
//! as several cloud processes do, with a reader polling the feeds and the change log meanwhile;
//! processes migrating one fresh schema at once; a newer layout refused untouched; a
//! connection the server ends, which fails one operation (or the open group) and is replaced by
//! the next; and retention next to writers: a purge waits for the owners' writers it meets and
//! leaves a tombstone one of them replaced, and a batch locks at most 256 owners.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use devtables_cloud::store::postgres::{
    PostgresOptions, PostgresStore, PostgresTls, LAYOUT_VERSION,
};
use devtables_cloud::store::{ChangeQuery, ChangeRead, CloudStore, Retention, StoreError};
use devtables_sync::apply::CloudOp;
use devtables_sync::hlc::{node_id_for, Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::ChangeStatus;
use serde_json::json;

use super::pg::{client, url, TestSchema};
use super::store_contract::{dev, item, put, schema, ver, MAX_MSG, NOW, RULES};

const ACCOUNT: &str = "acct";

/// How long a condition may take before a test fails.
const WAIT: Duration = Duration::from_secs(20);

/// What one writer did: per device the pushes answered applied, per (owner device, key name)
/// the highest version it pushed, per broadcast key name the highest version it wrote, and the
/// broadcast writes made.
#[derive(Default)]
struct Written {
    applied: BTreeMap<String, u64>,
    pushed: BTreeMap<(String, String), Hlc>,
    broadcast: BTreeMap<String, Hlc>,
    broadcasts: u64,
}

/// One writer: its own store instance (a cloud process of its own) and clock, pushing to every
/// device in turn the keys the other writer pushes too, some pushes in groups, and a broadcast
/// item through `write` now and then.
fn writer(schema_name: &TestSchema, w: u64, rounds: u64, devices: &[DeviceId]) -> Written {
    let sch = schema();
    let mut store = schema_name.store();
    let mut clock = HlcClock::new(node_id_for(&format!("cloud-{w}")));
    let mut out = Written::default();
    let now = NOW + 10_000;
    let mut i = 0;
    while i < rounds {
        // Every 20th round (writer 1), two pushes share a group, as the sync loop's jobs do.
        let grouped = w == 1 && i % 20 == 0 && i + 1 < rounds;
        if grouped {
            store.begin_group().unwrap();
        }
        for j in 0..if grouped { 2 } else { 1 } {
            let round = i + j;
            let d = &devices[(round as usize) % devices.len()];
            let name = format!("k{}", round % 5);
            let version = ver(NOW + round * 2 + w, 100 + w);
            let change = put(
                &sch,
                "Both",
                json!({"deviceId": d.device, "name": name, "v": round}),
                version,
            );
            let (results, _) = store
                .apply_push(&sch, &mut clock, now, RULES, d, &[change])
                .unwrap_or_else(|e| panic!("writer {w} round {round}: {e}"));
            match &results[0].status {
                ChangeStatus::Applied => *out.applied.entry(d.device.clone()).or_default() += 1,
                ChangeStatus::Stale { .. } => {}
                other => panic!("writer {w} round {round}: {other:?}"),
            }
            let top = out
                .pushed
                .entry((d.device.clone(), name))
                .or_insert(version);
            *top = (*top).max(version);
        }
        if grouped {
            store.commit_group().unwrap();
        }
        i += if grouped { 2 } else { 1 };
        if i % 10 == 0 {
            let name = format!("b{}", i % 3);
            let it = item(&sch, "Bcast", json!({"name": name, "v": i}));
            let (change, _) = store
                .write(
                    &sch,
                    &mut clock,
                    now,
                    MAX_MSG,
                    &Owner::Account(ACCOUNT.into()),
                    "Bcast",
                    CloudOp::Put(it),
                )
                .unwrap_or_else(|e| panic!("writer {w} broadcast: {e}"));
            let top = out.broadcast.entry(name).or_insert(change.version);
            *top = (*top).max(change.version);
            out.broadcasts += 1;
        }
    }
    out
}

/// What the poller saw: per device, per key sk, the version of the last entry it read; and
/// every change-log sequence number it read.
struct Polled {
    feeds: BTreeMap<String, BTreeMap<String, Hlc>>,
    seqs: BTreeSet<u64>,
}

/// Polls every device's feed and the account's change log with a store of its own until
/// `done`, then drains both. Asserts as it goes that neither ever goes backwards.
fn poller(schema_name: &TestSchema, devices: &[DeviceId], done: &AtomicBool) -> Polled {
    let mut store = schema_name.store();
    let mut cursors: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut polled = Polled {
        feeds: BTreeMap::new(),
        seqs: BTreeSet::new(),
    };
    let mut change_cursor = 0;
    loop {
        let finished = done.load(Ordering::SeqCst);
        let mut moved = false;
        for d in devices {
            // Registered with floor 1: reading from 1 needs no resync.
            let (cursor, last_head) = cursors.entry(d.device.clone()).or_insert((1, 0));
            let page = store.read_feed(d, *cursor, 16).unwrap();
            assert!(!page.resync_required, "{d}: resync from {cursor}");
            assert!(page.head >= *last_head, "{d}: head went back");
            *last_head = page.head;
            for (seq, change) in page.changes {
                assert!(seq > *cursor, "{d}: entry {seq} after cursor {cursor}");
                assert!(
                    seq <= page.head,
                    "{d}: entry {seq} beyond head {}",
                    page.head
                );
                *cursor = seq;
                moved = true;
                polled
                    .feeds
                    .entry(d.device.clone())
                    .or_default()
                    .insert(change.key.sk, change.version);
            }
        }
        let query = ChangeQuery {
            account: ACCOUNT.into(),
            after: change_cursor,
            model: None,
            device: None,
            limit: 64,
            scan: 1024,
        };
        match store.read_changes(&query).unwrap() {
            ChangeRead::Page(page) => {
                for c in &page.changes {
                    assert!(
                        c.seq > change_cursor,
                        "change {} after {change_cursor}",
                        c.seq
                    );
                    polled.seqs.insert(c.seq);
                }
                moved |= page.next > change_cursor;
                change_cursor = page.next;
            }
            ChangeRead::Expired { floor, .. } => panic!("the change log expired at {floor}"),
        }
        if finished && !moved {
            return polled;
        }
    }
}

#[test]
fn two_stores_writing_at_once_keep_every_feed_the_change_log_and_the_counts_exact() {
    let Some(test_schema) = TestSchema::fresh() else {
        return;
    };
    let devices: Vec<DeviceId> = (0..4).map(|i| dev(ACCOUNT, &format!("d{i}"))).collect();
    let mut setup = test_schema.store();
    for d in &devices {
        setup.register_device(d, "hash", None, NOW).unwrap();
    }
    let rounds = 200;
    let done = AtomicBool::new(false);
    let (written, polled) = std::thread::scope(|s| {
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (t, d) = (&test_schema, &devices);
                s.spawn(move || writer(t, w, rounds, d))
            })
            .collect();
        let poll = s.spawn(|| poller(&test_schema, &devices, &done));
        let written: Vec<Written> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, Ordering::SeqCst);
        (written, poll.join().unwrap())
    });

    // Every device's feed, as the poller read it, ends at the highest version of every key
    // pushed for it and of every broadcast key: no entry was lost or hidden from the poller.
    let sch = schema();
    let both = sch.model("Both").unwrap();
    for d in &devices {
        let seen = polled.feeds.get(&d.device).cloned().unwrap_or_default();
        let mut expected: BTreeMap<String, Hlc> = BTreeMap::new();
        for w in &written {
            for ((device, name), v) in &w.pushed {
                if device == &d.device {
                    let it = item(&sch, "Both", json!({"deviceId": device, "name": name}));
                    let sk = both.primary_key(&it).unwrap().sk;
                    let e = expected.entry(sk).or_insert(*v);
                    *e = (*e).max(*v);
                }
            }
            for (name, v) in &w.broadcast {
                let it = item(&sch, "Bcast", json!({"name": name}));
                let sk = sch.model("Bcast").unwrap().primary_key(&it).unwrap().sk;
                let e = expected.entry(sk).or_insert(*v);
                *e = (*e).max(*v);
            }
        }
        assert_eq!(seen, expected, "the feed of {d} as polled");
        // The device's counter is exactly the pushes answered applied (none lost, none twice).
        let applied: u64 = written
            .iter()
            .map(|w| w.applied.get(&d.device).copied().unwrap_or(0))
            .sum();
        let rec = setup.device(d).unwrap().unwrap();
        assert_eq!(rec.changes_applied, applied, "changes_applied of {d}");
    }

    // The change log read at once from 0 holds exactly what the poller found: no entry became
    // visible below a sequence number the poller had already passed. One entry per write.
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let query = ChangeQuery {
            account: ACCOUNT.into(),
            after,
            model: None,
            device: None,
            limit: 1000,
            scan: 100_000,
        };
        let ChangeRead::Page(page) = setup.read_changes(&query).unwrap() else {
            panic!("expired");
        };
        all.extend(page.changes);
        if page.next >= page.head {
            break;
        }
        after = page.next;
    }
    let seqs: BTreeSet<u64> = all.iter().map(|c| c.seq).collect();
    assert_eq!(polled.seqs, seqs, "the poller saw every entry of the log");
    let device_writes = all.iter().filter(|c| c.device.is_some()).count() as u64;
    let applied: u64 = written.iter().flat_map(|w| w.applied.values()).sum();
    assert_eq!(device_writes, applied, "one entry per applied push");
    let broadcasts = all.iter().filter(|c| c.device.is_none()).count() as u64;
    assert_eq!(
        broadcasts,
        written.iter().map(|w| w.broadcasts).sum::<u64>()
    );
}

#[test]
fn stores_connecting_at_once_to_a_fresh_schema_all_start_on_one_layout() {
    let Some(test_schema) = TestSchema::fresh() else {
        return;
    };
    let n = 4;
    let barrier = Barrier::new(n);
    let stores: Vec<Result<PostgresStore, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    PostgresStore::connect(&url(), test_schema.options())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut stores: Vec<PostgresStore> = stores
        .into_iter()
        .map(|r| r.expect("every store connects"))
        .collect();
    let mut c = client();
    let meta = c
        .query(
            &format!("SELECT key, value FROM \"{}\".meta", test_schema.name),
            &[],
        )
        .unwrap();
    assert_eq!(meta.len(), 1, "one layout record");
    assert_eq!(meta[0].get::<_, String>(1), LAYOUT_VERSION.to_string());
    // They all use it: what one writes, another reads.
    let d = dev(ACCOUNT, "d0");
    stores[0].register_device(&d, "hash", None, NOW).unwrap();
    assert!(stores[n - 1].device(&d).unwrap().is_some());
}

#[test]
fn a_newer_layout_is_refused_and_left_as_it_was() {
    let Some(test_schema) = TestSchema::fresh() else {
        return;
    };
    let d = dev(ACCOUNT, "d0");
    test_schema
        .store()
        .register_device(&d, "hash", None, NOW)
        .unwrap();
    let mut c = client();
    let newer = (LAYOUT_VERSION + 1).to_string();
    c.execute(
        &format!(
            "UPDATE \"{}\".meta SET value = $1 WHERE key = 'layout_version'",
            test_schema.name
        ),
        &[&newer],
    )
    .unwrap();
    let err = PostgresStore::connect(&url(), test_schema.options())
        .err()
        .expect("a newer layout is refused");
    assert!(
        matches!(&err, StoreError::Database(m) if m.contains("newer")),
        "{err}"
    );
    let still: String = c
        .query_one(
            &format!("SELECT value FROM \"{}\".meta", test_schema.name),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(still, newer);
    let devices: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".devices", test_schema.name),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(devices, 1, "the data is untouched");
}

/// The server process of the test's store (named by `application_name`), once it is there.
fn backend_of(c: &mut postgres::Client, app: &str) -> i32 {
    let started = Instant::now();
    loop {
        let rows = c
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .unwrap();
        if let [row] = rows.as_slice() {
            return row.get(0);
        }
        assert!(
            started.elapsed() < WAIT,
            "{} backends named {app}",
            rows.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends the backend and waits until the server no longer lists it.
fn terminate(c: &mut postgres::Client, pid: i32) {
    let ended: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(ended, "backend {pid} terminated");
    let started = Instant::now();
    while c
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .unwrap()
        .is_some()
    {
        assert!(started.elapsed() < WAIT, "backend {pid} still listed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_terminated_connection_fails_one_operation_and_the_next_reconnects() {
    let Some(test_schema) = TestSchema::fresh() else {
        return;
    };
    // The store's connections carry the schema's name, so this test finds its own.
    let sep = if url().contains('?') { '&' } else { '?' };
    let app_url = format!("{}{sep}application_name={}", url(), test_schema.name);
    let mut store = PostgresStore::connect(&app_url, test_schema.options()).unwrap();
    let sch = schema();
    let mut clock = HlcClock::new(node_id_for("cloud"));
    let d = dev(ACCOUNT, "d0");
    store.register_device(&d, "hash", None, NOW).unwrap();
    let mut c = client();

    let pid = backend_of(&mut c, &test_schema.name);
    terminate(&mut c, pid);
    let err = store.device(&d).expect_err("the connection is gone");
    assert!(
        matches!(&err, StoreError::Database(m) if m.contains("lost")),
        "{err}"
    );
    assert!(
        store.device(&d).unwrap().is_some(),
        "the next one reconnects"
    );
    assert_ne!(backend_of(&mut c, &test_schema.name), pid);

    // A group whose connection ends is lost whole: its commit fails, nothing of it stays, and
    // the store goes on.
    let push = |store: &mut PostgresStore, clock: &mut HlcClock, name: &str, wall: u64| {
        let change = put(
            &sch,
            "Both",
            json!({"deviceId": "d0", "name": name}),
            ver(wall, 7),
        );
        store.apply_push(&sch, clock, NOW + 10_000, RULES, &d, &[change])
    };
    store.begin_group().unwrap();
    push(&mut store, &mut clock, "lost", NOW).unwrap();
    let pid = backend_of(&mut c, &test_schema.name);
    terminate(&mut c, pid);
    assert!(store.commit_group().is_err(), "the group was lost");
    assert_eq!(store.device(&d).unwrap().unwrap().changes_applied, 0);
    push(&mut store, &mut clock, "kept", NOW + 1).unwrap();
    assert_eq!(store.device(&d).unwrap().unwrap().changes_applied, 1);
}

/// The server's certificate as the test trusts it: Debian's PostgreSQL serves the snakeoil
/// certificate (`ssl = on`, `CN = localhost`), which is its own CA.
const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn tls_to(ca: &std::path::Path) -> Result<PostgresTls, String> {
    let tls = devtables_tls::ClientTls {
        server_name: Some("localhost".into()),
        ..devtables_tls::ClientTls::new(ca)
    };
    devtables_tls::client_config(&tls)
        .map(|c| PostgresTls(std::sync::Arc::new(c)))
        .map_err(|e| e.to_string())
}

#[test]
fn with_database_tls_every_connection_is_encrypted_and_a_wrong_ca_is_refused() {
    let Some(test_schema) = TestSchema::fresh() else {
        return;
    };
    let sep = if url().contains('?') { '&' } else { '?' };
    let app_url = format!("{}{sep}application_name={}", url(), test_schema.name);
    let options = PostgresOptions {
        tls: Some(tls_to(std::path::Path::new(SERVER_CERT)).unwrap()),
        ..test_schema.options()
    };
    let mut store = PostgresStore::connect(&app_url, options)
        .unwrap_or_else(|e| panic!("a TLS connection to the test server ({SERVER_CERT}): {e}"));
    store
        .register_device(&DeviceId::new("acme", "tls").unwrap(), "h", None, 1)
        .unwrap();
    let mut c = client();
    let pid = backend_of(&mut c, &test_schema.name);
    let (ssl, version): (bool, Option<String>) = c
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = $1",
            &[&pid],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(ssl, "the store's connection is TLS ({version:?})");
    // A CA the server's certificate does not chain to: refused, nothing in clear text.
    let dir = tempfile::tempdir().unwrap();
    let other = devtables_tls::test_pki::TestCa::new("not the server's CA");
    let wrong = other.write_ca(dir.path(), "ca.pem");
    let refused = PostgresStore::connect(
        &url(),
        PostgresOptions {
            tls: Some(tls_to(&wrong).unwrap()),
            ..test_schema.options()
        },
    )
    .err()
    .expect("a server whose certificate does not chain to the CA is refused")
    .to_string();
    assert!(
        refused.to_lowercase().contains("certificate")
            || refused.to_lowercase().contains("tls")
            || refused.contains("error performing TLS"),
        "{refused}"
    );
}

/// Retention that purges every tombstone written before [`NOW`] + 1 s, when run at
/// [`PURGE_AT`].
const OLD_TOMBSTONES: Retention = Retention {
    tombstone_ms: 1000,
    max_conflicts: 1000,
    batch: Retention::DEFAULT_BATCH,
};
const PURGE_AT: u64 = NOW + 100_000;

/// Puts and deletes `name` of model `Down` for `d` at [`NOW`]: a tombstone retention may purge.
fn tombstone(store: &mut PostgresStore, clock: &mut HlcClock, d: &DeviceId, name: &str) {
    let sch = schema();
    let owner = Owner::Device(d.clone());
    let input = json!({"deviceId": d.device, "name": name});
    let (put, _) = store
        .write(
            &sch,
            clock,
            NOW,
            MAX_MSG,
            &owner,
            "Down",
            CloudOp::Put(item(&sch, "Down", input)),
        )
        .unwrap();
    store
        .write(
            &sch,
            clock,
            NOW,
            MAX_MSG,
            &owner,
            "Down",
            CloudOp::Delete(put.key),
        )
        .unwrap();
}

#[test]
fn a_purge_waits_for_a_writer_of_its_owner_and_keeps_the_tombstone_it_replaced() {
    let Some(test_schema) = TestSchema::fresh() else {
        return;
    };
    let sch = schema();
    let mut writer = test_schema.store();
    let mut clock = HlcClock::new(node_id_for("cloud-1"));
    let d = dev(ACCOUNT, "d0");
    writer.register_device(&d, "hash", None, NOW).unwrap();
    tombstone(&mut writer, &mut clock, &d, "k");
    tombstone(&mut writer, &mut clock, &d, "gone");
    // A group of the writer (a push's or an API write's transaction, held open) writes the
    // key again: it holds the owner's lock to its commit.
    writer.begin_group().unwrap();
    let owner = Owner::Device(d.clone());
    let input = json!({"deviceId": "d0", "name": "k", "v": 2});
    let (again, _) = writer
        .write(
            &sch,
            &mut clock,
            NOW + 50_000,
            MAX_MSG,
            &owner,
            "Down",
            CloudOp::Put(item(&sch, "Down", input)),
        )
        .unwrap();
    let mut c = client();
    let (waited, purged) = std::thread::scope(|s| {
        // Another process's retention finds both tombstones (the new write is not committed)
        // and waits for the owner's lock.
        let purge = s.spawn(|| {
            // Named after the schema, so the lock it waits for is found as its own.
            let sep = if url().contains('?') { '&' } else { '?' };
            let app_url = format!("{}{sep}application_name={}", url(), test_schema.name);
            let mut purger = PostgresStore::connect(&app_url, test_schema.options()).unwrap();
            purger.purge(PURGE_AT, &OLD_TOMBSTONES)
        });
        let deadline = Instant::now() + WAIT;
        let waited = loop {
            let waiting: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)
                     WHERE application_name = $1 AND locktype = 'advisory' AND NOT granted",
                    &[&test_schema.name],
                )
                .unwrap()
                .get(0);
            if waiting > 0 {
                break Ok(());
            }
            if purge.is_finished() {
                break Err("the purge did not wait for the writer");
            }
            if Instant::now() > deadline {
                break Err("the purge never waited for the owner's lock");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // Committed whatever was seen, so the purge (blocked on the lock or on a row) ends and
        // the scope can join it.
        writer.commit_group().unwrap();
        (waited, purge.join().unwrap())
    });
    waited.unwrap();
    let purged = purged.unwrap();
    assert_eq!(
        purged.tombstones, 1,
        "only the tombstone nobody replaced: {purged:?}"
    );
    let k = writer
        .get_item(&owner, "Down", &again.key)
        .unwrap()
        .unwrap();
    assert_eq!(
        (k.version, k.item.is_some()),
        (again.version, true),
        "the write that replaced the tombstone stays"
    );
    // Its feed entry stays too (the key's entry, coalesced, is the newest): a device that read
    // up to it reads it without a resync; the purged tombstone's entry raised the floor.
    let head = writer.device(&d).unwrap().unwrap().feed_head;
    let last = writer.read_feed(&d, head - 1, 100).unwrap();
    assert!(!last.resync_required, "{last:?}");
    assert_eq!(last.changes.len(), 1);
    assert_eq!(last.changes[0].1.version, again.version);
    assert!(writer.read_feed(&d, 1, 100).unwrap().resync_required);
}

#[test]
fn a_purge_batch_locks_at_most_256_owners() {
    let Some(test_schema) = TestSchema::fresh() else {
        return;
    };
    let mut store = test_schema.store();
    let mut clock = HlcClock::new(node_id_for("cloud"));
    let devices: Vec<DeviceId> = (0..300)
        .map(|i| dev(ACCOUNT, &format!("d{i:03}")))
        .collect();
    for d in &devices {
        store.register_device(d, "hash", None, NOW).unwrap();
        tombstone(&mut store, &mut clock, d, "k");
    }
    let first = store.purge(PURGE_AT, &OLD_TOMBSTONES).unwrap();
    assert_eq!((first.tombstones, first.more), (256, true), "{first:?}");
    let second = store.purge(PURGE_AT, &OLD_TOMBSTONES).unwrap();
    assert_eq!((second.tombstones, second.more), (44, false), "{second:?}");
    let mut c = client();
    let left: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM \"{}\".items WHERE deleted",
                test_schema.name
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
