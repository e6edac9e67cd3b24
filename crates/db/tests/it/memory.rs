//! In-memory databases (`Db::open_in_memory`) and the background thread many databases share
//! (`Background::Shared`): what a process holding thousands of small databases relies on.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devtables_db::{Background, Db, DbOptions, Durability, FindOptions, ItemChange, Origin};
use serde_json::json;

use super::{item, key, reading, schema};

fn memory_db(options: DbOptions) -> Db {
    Db::open_in_memory(schema(), options).expect("an in-memory database opens")
}

#[test]
fn an_in_memory_database_reads_writes_and_runs_hooks_like_a_file() {
    let db = memory_db(DbOptions::default());
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    db.subscribe(Arc::new(move |_: &ItemChange| {
        count.fetch_add(1, Ordering::SeqCst);
    }));
    for i in 0..200 {
        db.create("Reading", &reading(&format!("r{i:03}"), i as f64, "ok"))
            .unwrap();
    }
    db.remove("Reading", &key("r007")).unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), 201, "one hook call per change");
    let page = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1"})),
            &FindOptions {
                limit: Some(1000),
                ..FindOptions::default()
            },
        )
        .unwrap();
    assert_eq!(page.items.len(), 199);
    assert_eq!(
        db.get("Reading", &key("r100")).unwrap().unwrap()["value"],
        json!(100.0)
    );
    db.close().unwrap();
}

#[test]
fn an_empty_in_memory_database_costs_little_and_grows_with_its_items() {
    let db = memory_db(DbOptions::default());
    let empty = db
        .memory_bytes()
        .expect("an in-memory database tells its size");
    // A process holds thousands of these (the fleet simulator): an empty one must be small.
    assert!(empty < 16 * 1024, "an empty database holds {empty} bytes");
    const ITEMS: u64 = 500;
    for i in 0..ITEMS {
        db.create("Reading", &reading(&format!("r{i:03}"), i as f64, "ok"))
            .unwrap();
    }
    let full = db.memory_bytes().unwrap();
    let per_item = (full - empty) / ITEMS;
    // An item here is about 150 bytes stored, plus its index entry: the store holds it with
    // its keys and a bounded overhead, nothing like a page per item.
    assert!(
        (100..2048).contains(&per_item),
        "{per_item} bytes per item ({empty} -> {full})"
    );
    for i in 0..ITEMS {
        db.remove("Reading", &key(&format!("r{i:03}"))).unwrap();
    }
    // A removal is a marker in the store's small map of recent changes until a merge drops
    // the entry from its sorted pages (`devtables-logstore`, `index.rs`): what removed items
    // still hold is bounded by that map's floor of 256 changes per table, not by the items.
    let held_at_most = empty + 2 * 256 * per_item;
    let emptied = db.memory_bytes().unwrap();
    assert!(
        emptied < full && emptied < held_at_most,
        "removed items give their memory back ({full} -> {emptied}, at most {held_at_most})"
    );
    // Churn does not make it grow: ten more rounds of creating and removing every item.
    for round in 0..10 {
        for i in 0..ITEMS {
            let id = format!("c{round}-{i:03}");
            db.create("Reading", &reading(&id, i as f64, "ok")).unwrap();
            db.remove("Reading", &key(&id)).unwrap();
        }
        let now = db.memory_bytes().unwrap();
        assert!(
            now < held_at_most,
            "round {round}: {now} bytes held, more than {held_at_most}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = super::open(&dir.path().join("f.db"), DbOptions::default());
    assert_eq!(
        file.memory_bytes(),
        None,
        "a file reports no memory storage"
    );
}

#[test]
fn databases_sharing_the_background_thread_are_purged_and_leave_it_on_close() {
    const DATABASES: usize = 40;
    let now = Arc::new(AtomicI64::new(1_800_000_000_000));
    let expired = Arc::new(Mutex::new(Vec::new()));
    let before = devtables_db::testing::shared_background_entries();
    let mut dbs = Vec::new();
    for i in 0..DATABASES {
        let clock = now.clone();
        let db = memory_db(DbOptions {
            background: Background::Shared,
            durability: Durability::Periodic {
                interval: Duration::from_millis(10),
            },
            ttl_purge_interval: Duration::from_millis(20),
            clock: Arc::new(move || clock.load(Ordering::SeqCst)),
            ..DbOptions::default()
        });
        let seen = expired.clone();
        db.subscribe(Arc::new(move |c: &ItemChange| {
            if c.origin == Origin::Expired {
                seen.lock().unwrap().push(i);
            }
        }));
        let mut r = reading("t", 1.0, "ok");
        r.insert("expires".into(), json!(1_800_000_060i64));
        db.create("Reading", &r).unwrap();
        dbs.push(db);
    }
    assert_eq!(
        devtables_db::testing::shared_background_entries(),
        before + DATABASES,
        "every database registered with the one shared thread"
    );
    now.store(1_800_000_061_000, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let purged = expired.lock().unwrap().len();
        if purged == DATABASES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the shared thread purged {purged} of {DATABASES} databases"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut purged = expired.lock().unwrap().clone();
    purged.sort_unstable();
    assert_eq!(
        purged,
        (0..DATABASES).collect::<Vec<_>>(),
        "each purged once"
    );
    for db in dbs {
        db.close().unwrap();
    }
    assert_eq!(
        devtables_db::testing::shared_background_entries(),
        before,
        "closed databases leave the shared thread"
    );
}
