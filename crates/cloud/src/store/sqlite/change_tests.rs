//! Unit tests of the SQLite store's change log that need the SQLite store itself (its
//! conformance transaction, a reopened file, an older layout). What every store keeps (what a
//! write appends, pages and filters, webhook cursors) is checked on SQLite and PostgreSQL alike
//! in `crates/cloud/tests/it/store_contract.rs`.

use super::tests::{clock, dev, put, schema, store, ver, NOW, RULES};
use super::*;
use crate::store::ChangePage;
use serde_json::json;

fn query(account: &str, after: u64) -> ChangeQuery {
    ChangeQuery {
        account: account.into(),
        after,
        model: None,
        device: None,
        limit: 1000,
        scan: 100_000,
    }
}

fn page(s: &mut SqliteStore, q: &ChangeQuery) -> ChangePage {
    match s.read_changes(q).unwrap() {
        ChangeRead::Page(p) => p,
        ChangeRead::Expired { floor, head } => {
            panic!(
                "expected a page, the cursor {} expired (floor {floor}, head {head})",
                q.after
            )
        }
    }
}

/// Writes `n` changes of `model` for d1 (items named `{model}{i}`), one push each.
fn write_n(s: &mut SqliteStore, model: &str, n: u64, at: u64) {
    let schema = schema();
    let d1 = dev("a", "d1");
    let mut c = clock();
    for i in 0..n {
        let ch = put(
            &schema,
            model,
            json!({"deviceId": "d1", "name": format!("{}{i}", model.to_lowercase()), "v": i}),
            ver(at + i, 7),
        );
        s.apply_push(&schema, &mut c, at + i, RULES, &d1, &[ch])
            .unwrap();
    }
}

#[test]
fn only_writes_that_store_a_row_append_and_a_rollback_appends_nothing() {
    let schema = schema();
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    let mut c = clock();
    let both = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "b", "v": 1}),
        ver(NOW, 7),
    );
    s.apply_push(
        &schema,
        &mut c,
        NOW,
        RULES,
        &d1,
        std::slice::from_ref(&both),
    )
    .unwrap();
    // A replay (duplicate) and a stale write store no row: no change.
    let stale = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "b", "v": 0}),
        ver(NOW - 5, 7),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, &[both.clone(), stale])
        .unwrap();
    assert_eq!(page(&mut s, &query("a", 0)).changes.len(), 1);
    // A transaction rolled back leaves no entry, though it took a sequence number.
    let hint = s.change_head_hint();
    s.conformance_txn(NOW, false, |t| {
        t.write_row(&devtables_sync::apply::RowWrite {
            owner: &Owner::Device(d1.clone()),
            model: "Both",
            key: &both.key,
            item: None,
            version: ver(NOW + 1, 7),
            base: None,
        })
    })
    .unwrap();
    assert!(
        s.change_head_hint() > hint,
        "the hint counts the rolled-back append"
    );
    let p = page(&mut s, &query("a", 0));
    assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
    // A revoked device's push fails whole: no change either.
    s.revoke_device(&d1, false).unwrap();
    let late = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "z"}),
        ver(NOW + 2, 7),
    );
    assert!(s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, &[late])
        .is_err());
    assert_eq!(page(&mut s, &query("a", 0)).changes.len(), 1);
}

#[test]
fn retention_by_count_and_age_expires_older_cursors_and_never_reuses_a_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let d1 = dev("a", "d1");
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    s.register_device(&d1, "hash", None, NOW).unwrap();
    write_n(&mut s, "Both", 5, NOW);
    let seqs: Vec<u64> = page(&mut s, &query("a", 0))
        .changes
        .iter()
        .map(|c| c.seq)
        .collect();

    // Too young and within the count: nothing removed.
    let keep_all = ChangeRetention {
        max_age_ms: 1000,
        max_per_account: 10,
        batch: 1000,
    };
    assert_eq!(
        s.purge_changes(NOW + 10, &keep_all).unwrap(),
        ChangePurgeStats {
            removed: 0,
            kept: Some(5),
            more: false,
        }
    );
    // At most 2 per account: the 3 oldest go, and a cursor before them is told so.
    let two = ChangeRetention {
        max_age_ms: 1000,
        max_per_account: 2,
        batch: 1000,
    };
    assert_eq!(
        s.purge_changes(NOW + 10, &two).unwrap(),
        ChangePurgeStats {
            removed: 3,
            kept: Some(2),
            more: false,
        }
    );
    assert_eq!(
        s.read_changes(&query("a", 0)).unwrap(),
        ChangeRead::Expired {
            floor: seqs[2],
            head: seqs[4]
        }
    );
    assert!(matches!(
        s.read_changes(&query("a", seqs[1])).unwrap(),
        ChangeRead::Expired { .. }
    ));
    // From the floor on, nothing was missed.
    let p = page(&mut s, &query("a", seqs[2]));
    assert_eq!(
        p.changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        seqs[3..]
    );
    // By age: everything is old an hour later; the log is empty, its head stays.
    let stats = s.purge_changes(NOW + 3_600_000, &two).unwrap();
    assert_eq!(
        stats,
        ChangePurgeStats {
            removed: 2,
            kept: Some(0),
            more: false,
        }
    );
    let p = page(&mut s, &query("a", seqs[4]));
    assert_eq!((p.changes.len(), p.head, p.next), (0, seqs[4], seqs[4]));
    // Reopened (a restart), the next change still gets a higher sequence number.
    drop(s);
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(s.change_head_hint(), seqs[4]);
    write_n(&mut s, "Up", 1, NOW + 4_000_000);
    let p = page(&mut s, &query("a", seqs[4]));
    assert_eq!(p.changes.len(), 1);
    assert!(p.changes[0].seq > seqs[4]);
}

#[test]
fn a_layout_6_file_gains_an_empty_change_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let d1 = dev("a", "d1");
    {
        let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        s.register_device(&d1, "h", None, NOW).unwrap();
        write_n(&mut s, "Both", 1, NOW);
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "DROP TABLE changes; DROP TABLE change_floors; DROP TABLE webhooks;
         DELETE FROM sqlite_sequence WHERE name = 'changes';
         UPDATE meta SET value = '6' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(raw);
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(s.device(&d1).unwrap().unwrap().changes_applied, 1, "intact");
    assert!(
        page(&mut s, &query("a", 0)).changes.is_empty(),
        "the old write is not a change"
    );
    write_n(&mut s, "Up", 1, NOW + 10);
    assert_eq!(page(&mut s, &query("a", 0)).changes.len(), 1);
}
