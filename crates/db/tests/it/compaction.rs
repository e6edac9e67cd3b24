//! The log's compaction runs in the background work: a file that is mostly garbage (one item
//! updated thousands of times) shrinks to about its live data without a call from the
//! application, and holds the same data after a reopen.

use std::time::{Duration, Instant};

use devtables_db::{Db, DbOptions, Durability};
use serde_json::json;

use super::{item, key, reading, schema};

#[test]
fn the_background_work_compacts_a_log_that_is_mostly_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compact.db");
    let options = || DbOptions {
        durability: Durability::Periodic {
            interval: Duration::from_millis(20),
        },
        ttl_purge_interval: Duration::from_millis(20),
        ..DbOptions::default()
    };
    let db = Db::open(&path, schema(), options()).unwrap();
    db.create("Reading", &reading("a", 0.0, "ok")).unwrap();
    db.create("Reading", &reading("b", 0.0, "ok")).unwrap();
    let note = "n".repeat(400);
    // Each update appends a record of about half a KiB: some 2.5 MiB of log for two items,
    // past the 1 MiB from which a log twice its live bytes is compacted.
    for i in 1..=5_000 {
        db.update(
            "Reading",
            &item(json!({"id": "a", "deviceId": "d1", "value": i, "note": note})),
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut size = std::fs::metadata(&path).unwrap().len();
    // Compactions may run during the writes too; once they stop, the next tick compacts
    // whatever is past 1 MiB.
    while size >= 1024 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the log still holds {size} bytes for two items: no compaction ran"
        );
        std::thread::sleep(Duration::from_millis(20));
        size = std::fs::metadata(&path).unwrap().len();
    }
    db.close().unwrap();
    let db = Db::open_existing(&path, schema(), options()).unwrap();
    let a = db.get("Reading", &key("a")).unwrap().unwrap();
    assert_eq!(a["value"], json!(5000));
    assert_eq!(a["note"], json!(note));
    assert!(db.get("Reading", &key("b")).unwrap().is_some());
}
