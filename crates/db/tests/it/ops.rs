//! Operations through the public API on a real database file.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devtables_db::{
    ChangeOp, DbError, DbOptions, Durability, FindOptions, ItemChange, Origin, SideTables, TxnOp,
    WriteInterceptor,
};
use serde_json::json;

use super::{item, key, open, reading};

fn ids(items: &[devtables_schema::Item]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn fixture(n: usize) -> (tempfile::TempDir, devtables_db::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("t.db"), DbOptions::default());
    let ops: Vec<TxnOp> = (0..n)
        .map(|i| TxnOp::Create {
            model: "Reading".into(),
            item: reading(
                &format!("{i:03}"),
                i as f64,
                if i % 10 == 0 { "fault" } else { "ok" },
            ),
        })
        .collect();
    db.transaction(&ops).unwrap();
    (dir, db)
}

#[test]
fn create_get_update_upsert_remove() {
    let (_dir, db) = fixture(0);
    let created = db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    assert_eq!(created["value"], json!(1.0));
    assert!(created.get("pk").is_none(), "key fields are hidden");
    assert!(created.get("created").is_some());

    let err = db.create("Reading", &reading("a", 2.0, "ok")).unwrap_err();
    assert!(matches!(err, DbError::Exists { .. }), "{err}");

    let mut patch = key("a");
    patch.insert("note".into(), json!("hello"));
    let updated = db.update("Reading", &patch).unwrap();
    assert_eq!(updated["note"], json!("hello"));
    assert_eq!(
        updated["value"],
        json!(1.0),
        "partial update keeps other fields"
    );

    let err = db.update("Reading", &key("missing")).unwrap_err();
    assert!(matches!(err, DbError::NotFound { .. }), "{err}");
    let up = db.upsert("Reading", &reading("b", 5.0, "warn")).unwrap();
    assert_eq!(up["status"], json!("warn"));

    let removed = db.remove("Reading", &key("a")).unwrap();
    assert_eq!(removed.unwrap()["note"], json!("hello"));
    assert_eq!(db.get("Reading", &key("a")).unwrap(), None);
    assert_eq!(db.remove("Reading", &key("a")).unwrap(), None);
}

#[test]
fn invalid_input_names_model_and_field_and_writes_nothing() {
    let (_dir, db) = fixture(0);
    let err = db
        .create("Reading", &reading("a", 1.0, "exploded"))
        .unwrap_err();
    let DbError::Invalid(v) = &err else {
        panic!("expected a validation error, got {err}")
    };
    assert_eq!((v.model.as_str(), v.field.as_str()), ("Reading", "status"));
    assert_eq!(db.get("Reading", &key("a")).unwrap(), None);

    let err = db.create("Nope", &reading("a", 1.0, "ok")).unwrap_err();
    assert!(matches!(err, DbError::UnknownModel(_)), "{err}");
}

#[test]
fn schema_process_block_is_enforced_on_device_writes() {
    let (_dir, db) = fixture(0);
    let err = db.create("Cfg", &item(json!({"name": "x"}))).unwrap_err();
    assert!(matches!(err, DbError::NotOnDevice(_)), "{err}");
    let err = db.create("Cmd", &item(json!({"name": "x"}))).unwrap_err();
    assert!(matches!(err, DbError::DownOnly(_)), "{err}");
    // A remote (replicated) write of a down model is what the agent does, and is allowed.
    db.write(Origin::Remote, |t| {
        let stored = t.put_stored(
            "Cmd",
            item(json!({"pk": "cmd#", "sk": "cmd#x", "name": "x", "_type": "Cmd",
                        "created": "2026-01-01T00:00:00.000Z", "updated": "2026-01-01T00:00:00.000Z"})),
        );
        stored.map(|_| ())
    })
    .unwrap();
    assert!(db
        .get("Cmd", &item(json!({"name": "x"})))
        .unwrap()
        .is_some());
}

/// Side tables stay open for the whole write transaction: every call of one transaction sees
/// the calls before it, through any `side()` handle and the interceptor's, `clear` works on a
/// table already open (redb refuses to delete an open one), and a rollback leaves nothing.
#[test]
fn side_tables_of_one_transaction_see_each_other_and_roll_back_together() {
    let (_dir, db) = fixture(0);
    db.write(Origin::Local, |t| {
        t.side().put("a", b"k1", b"v1")?;
        t.side().put("b", b"k1", b"b1")?;
        let mut side = t.side();
        assert_eq!(side.get("a", b"k1")?.as_deref(), Some(&b"v1"[..]));
        side.put("a", b"k2", b"v2")?;
        assert_eq!(side.len("a")?, 2);
        assert!(side.remove("a", b"k1")?);
        assert!(!side.remove("a", b"k1")?);
        side.clear("b")?;
        assert!(side.is_empty("b")?);
        side.put("b", b"k3", b"b3")?;
        Ok(())
    })
    .unwrap();
    assert_eq!(db.side_get("a", b"k1").unwrap(), None);
    assert_eq!(
        db.side_get("a", b"k2").unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    assert_eq!(db.side_len("b").unwrap(), 1);
    assert_eq!(
        db.side_get("b", b"k3").unwrap().as_deref(),
        Some(&b"b3"[..])
    );

    let refused: Result<(), DbError> = db.write(Origin::Local, |t| {
        t.side().put("a", b"k9", b"v9")?;
        t.side().clear("b")?;
        t.create("Reading", &reading("x", 1.0, "ok"))?;
        t.create("Reading", &reading("x", 2.0, "ok"))?;
        Ok(())
    });
    assert!(matches!(refused, Err(DbError::Exists { .. })));
    assert_eq!(db.side_get("a", b"k9").unwrap(), None, "rolled back");
    assert_eq!(db.side_len("b").unwrap(), 1, "the clear rolled back");
}

#[test]
fn transaction_is_atomic() {
    let (_dir, db) = fixture(0);
    let ops = vec![
        TxnOp::Create {
            model: "Reading".into(),
            item: reading("a", 1.0, "ok"),
        },
        TxnOp::Create {
            model: "Reading".into(),
            item: reading("a", 2.0, "ok"),
        },
    ];
    assert!(matches!(db.transaction(&ops), Err(DbError::Exists { .. })));
    assert_eq!(
        db.get("Reading", &key("a")).unwrap(),
        None,
        "first op rolled back"
    );
}

#[test]
fn find_by_prefix_range_index_filter_and_direction() {
    let (_dir, db) = fixture(50);
    let all = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1"})),
            &FindOptions::default(),
        )
        .unwrap();
    assert_eq!(all.items.len(), 50);
    assert_eq!(all.next, None);

    // Partial template: sk = 'r#${id}' with no id is a begins-with on 'r#'; explicit begins too.
    let begins = FindOptions::default();
    let p = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1", "sk": {"begins": "r#01"}})),
            &begins,
        )
        .unwrap();
    assert_eq!(
        ids(&p.items),
        (10..20).map(|i| format!("{i:03}")).collect::<Vec<_>>()
    );

    let between = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1", "sk": {"between": ["r#005", "r#007"]}})),
            &begins,
        )
        .unwrap();
    assert_eq!(ids(&between.items), ["005", "006", "007"]);
    let lt = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1", "sk": {"<": "r#002"}})),
            &begins,
        )
        .unwrap();
    assert_eq!(ids(&lt.items), ["000", "001"]);
    let gt = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1", "sk": {">": "r#047"}})),
            &begins,
        )
        .unwrap();
    assert_eq!(ids(&gt.items), ["048", "049"]);

    let rev = FindOptions {
        reverse: true,
        limit: Some(2),
        ..Default::default()
    };
    let desc = db
        .find("Reading", &item(json!({"deviceId": "d1"})), &rev)
        .unwrap();
    assert_eq!(ids(&desc.items), ["049", "048"]);

    let on_index = FindOptions {
        index: Some("gs1".into()),
        ..Default::default()
    };
    let faults = db
        .find(
            "Reading",
            &item(json!({"gs1pk": "status#fault"})),
            &on_index,
        )
        .unwrap();
    assert_eq!(ids(&faults.items), ["000", "010", "020", "030", "040"]);

    let filtered = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1", "value": {">=": 45}})),
            &begins,
        )
        .unwrap();
    assert_eq!(ids(&filtered.items), ["045", "046", "047", "048", "049"]);
    let filtered_eq = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1", "status": "fault"})),
            &begins,
        )
        .unwrap();
    assert_eq!(filtered_eq.items.len(), 5);

    // No hash key: a scan of the model, still with filters.
    let scan = db
        .find("Reading", &item(json!({"status": "fault"})), &begins)
        .unwrap();
    assert_eq!(scan.items.len(), 5);

    let err = db
        .find(
            "Reading",
            &item(json!({})),
            &FindOptions {
                index: Some("nope".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, DbError::UnknownIndex(_)), "{err}");
    let err = db
        .find(
            "Reading",
            &item(json!({})),
            &FindOptions {
                next: Some("zz".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, DbError::BadCursor(_)), "{err}");
}

#[test]
fn pagination_is_stable_while_items_change() {
    let (_dir, db) = fixture(30);
    let props = item(json!({"deviceId": "d1"}));
    let mut opts = FindOptions {
        limit: Some(10),
        ..Default::default()
    };
    let first = db.find("Reading", &props, &opts).unwrap();
    assert_eq!(ids(&first.items).last().map(String::as_str), Some("009"));
    // Changes before and inside the next page: removed items vanish, new ones appear in order,
    // nothing already returned comes back.
    db.remove("Reading", &key("003")).unwrap();
    db.remove("Reading", &key("012")).unwrap();
    db.create("Reading", &reading("0105", 1.0, "ok")).unwrap();
    opts.next = first.next.clone();
    let second = db.find("Reading", &props, &opts).unwrap();
    assert_eq!(
        ids(&second.items),
        ["010", "0105", "011", "013", "014", "015", "016", "017", "018", "019"]
    );
    opts.next = second.next;
    let third = db.find("Reading", &props, &opts).unwrap();
    assert_eq!(third.items.len(), 10);
    opts.next = third.next;
    let end = db.find("Reading", &props, &opts).unwrap();
    assert!(end.items.is_empty());
    assert_eq!(end.next, None);
}

#[test]
fn ttl_hides_at_once_and_purges_in_background() {
    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicI64::new(1_800_000_000_000));
    let clock = now.clone();
    let options = DbOptions {
        ttl_purge_interval: Duration::from_millis(20),
        clock: Arc::new(move || clock.load(Ordering::SeqCst)),
        ..DbOptions::default()
    };
    let db = open(&dir.path().join("t.db"), options);
    let removed = Arc::new(Mutex::new(Vec::new()));
    let seen = removed.clone();
    db.subscribe(Arc::new(move |c: &ItemChange| {
        if c.origin == Origin::Expired {
            seen.lock().unwrap().push(c.key.sk.clone());
        }
    }));
    let mut r = reading("t", 1.0, "ok");
    r.insert("expires".into(), json!(1_800_000_060i64)); // epoch seconds, one minute ahead
    db.create("Reading", &r).unwrap();
    db.create("Reading", &reading("keep", 1.0, "ok")).unwrap();
    assert!(db.get("Reading", &key("t")).unwrap().is_some());

    now.store(1_800_000_061_000, Ordering::SeqCst);
    assert_eq!(
        db.get("Reading", &key("t")).unwrap(),
        None,
        "invisible at once"
    );
    let found = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1"})),
            &FindOptions::default(),
        )
        .unwrap();
    assert_eq!(ids(&found.items), ["keep"]);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while removed.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the background purge never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*removed.lock().unwrap(), ["r#t"]);
    assert_eq!(db.purge_expired().unwrap(), 0, "already purged");
}

#[test]
fn hooks_see_committed_changes_only_with_origin() {
    let (_dir, db) = fixture(0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    db.subscribe(Arc::new(move |c: &ItemChange| {
        sink.lock()
            .unwrap()
            .push((c.op, c.origin, c.key.sk.clone(), c.old.is_some()));
    }));
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    db.update("Reading", &reading("a", 2.0, "ok")).unwrap();
    let _ = db.transaction(&[
        TxnOp::Create {
            model: "Reading".into(),
            item: reading("b", 1.0, "ok"),
        },
        TxnOp::Create {
            model: "Reading".into(),
            item: reading("a", 1.0, "ok"),
        },
    ]);
    db.remove("Reading", &key("a")).unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (ChangeOp::Create, Origin::Local, "r#a".to_string(), false),
            (ChangeOp::Update, Origin::Local, "r#a".to_string(), true),
            (ChangeOp::Remove, Origin::Local, "r#a".to_string(), true),
        ],
        "the rolled-back transaction's create of b is never seen"
    );
}

struct CountingOutbox {
    limit: u64,
}

impl WriteInterceptor for CountingOutbox {
    fn on_change(&self, side: &mut SideTables<'_>, change: &ItemChange) -> Result<(), DbError> {
        if side.len("outbox")? >= self.limit {
            return Err(DbError::Refused("outbox full".into()));
        }
        side.put("outbox", change.key.sk.as_bytes(), b"1")
    }
}

#[test]
fn interceptor_writes_in_the_same_transaction_and_can_refuse() {
    let (_dir, db) = fixture(0);
    db.set_interceptor(Some(Arc::new(CountingOutbox { limit: 2 })));
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    db.create("Reading", &reading("b", 1.0, "ok")).unwrap();
    let err = db.create("Reading", &reading("c", 1.0, "ok")).unwrap_err();
    assert!(matches!(err, DbError::Refused(_)), "{err}");
    assert_eq!(
        db.get("Reading", &key("c")).unwrap(),
        None,
        "refused write left nothing"
    );
    assert_eq!(db.side_len("outbox").unwrap(), 2);
    let entries = db.side_scan("outbox", b"", 10).unwrap();
    assert_eq!(entries[0].0, b"r#a");
}

#[test]
fn export_import_round_trip_and_bad_line() {
    let (dir, db) = fixture(25);
    let mut out = Vec::new();
    assert_eq!(db.export(&mut out).unwrap(), 25);
    let copy = open(&dir.path().join("copy.db"), DbOptions::default());
    assert_eq!(copy.import(&mut out.as_slice()).unwrap(), 25);
    let props = item(json!({"deviceId": "d1"}));
    let hidden = FindOptions {
        hidden: true,
        ..Default::default()
    };
    assert_eq!(
        db.find("Reading", &props, &hidden).unwrap(),
        copy.find("Reading", &props, &hidden).unwrap()
    );

    let bad = b"{\"_type\":\"Reading\",\"id\":\"z\"}\n".to_vec();
    let fresh = open(&dir.path().join("fresh.db"), DbOptions::default());
    let err = fresh.import(&mut bad.as_slice()).unwrap_err();
    assert!(matches!(err, DbError::Import { line: 1, .. }), "{err}");

    // Invalid UTF-8 is refused with its line, not replaced: nothing of the file is imported.
    let mut latin1 = out.clone();
    let second = latin1.iter().position(|b| *b == b'\n').unwrap() + 1;
    let quote = second + latin1[second..].iter().position(|b| *b == b'"').unwrap();
    latin1.insert(quote + 1, 0xE9);
    let err = fresh.import(&mut latin1.as_slice()).unwrap_err();
    assert!(
        matches!(&err, DbError::Import { line: 2, source } if matches!(**source, DbError::BadInput(_))),
        "{err}"
    );
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
    assert!(fresh
        .find("Reading", &item(json!({})), &FindOptions::default())
        .unwrap()
        .items
        .is_empty());
}

/// A file can be opened again as soon as its last handle is dropped, even while the background
/// thread is in the middle of its work: the drop stops that work first. Before, the background
/// thread became the database's last owner and closed the file a moment later, so an open
/// right after the drop failed with "already open". The clock holds the background's TTL purge
/// in its write transaction for 300 ms, exactly when the handle is dropped.
#[test]
fn a_dropped_database_reopens_at_once_whatever_its_background_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let (inside_tx, inside_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let inside_tx = Mutex::new(Some(inside_tx));
    let slow_background_clock = move || {
        if std::thread::current().name() == Some("devtables-db") {
            if let Some(tx) = inside_tx.lock().unwrap().take() {
                let _ = tx.send(());
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        devtables_db::system_now_ms()
    };
    let options = DbOptions {
        ttl_purge_interval: Duration::from_millis(1),
        clock: Arc::new(slow_background_clock),
        ..DbOptions::default()
    };
    let db = devtables_db::Db::open(&path, super::schema(), options).unwrap();
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    inside_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the background purge never began");
    drop(db);
    let again = open(&path, DbOptions::default());
    assert!(again.get("Reading", &key("a")).unwrap().is_some());
}

#[test]
fn periodic_mode_flushes_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    {
        let db = open(
            &path,
            DbOptions {
                durability: Durability::Periodic {
                    interval: Duration::from_millis(50),
                },
                ..DbOptions::default()
            },
        );
        for i in 0..20 {
            db.create("Reading", &reading(&format!("{i}"), 1.0, "ok"))
                .unwrap();
        }
        db.flush().unwrap();
    }
    let db = open(&path, DbOptions::default());
    let all = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1"})),
            &FindOptions::default(),
        )
        .unwrap();
    assert_eq!(all.items.len(), 20);
}

/// The typed reads (`get_as`, `find_as`) see exactly what the JSON reads see: the same items,
/// hidden fields left out unless asked for, expired items invisible, and a clear error for an
/// item that does not fit the type.
#[test]
fn typed_reads_agree_with_the_json_form() {
    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Reading {
        id: String,
        #[serde(rename = "deviceId")]
        device_id: String,
        value: f64,
        status: Status,
        note: Option<String>,
        created: String,
        pk: Option<String>,
    }
    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Status {
        Ok,
        Warn,
        Fault,
    }

    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicI64::new(1_800_000_000_000));
    let clock = now.clone();
    let options = DbOptions {
        clock: Arc::new(move || clock.load(Ordering::SeqCst)),
        ..DbOptions::default()
    };
    let db = open(&dir.path().join("t.db"), options);
    let mut a = reading("a", 1.5, "fault");
    a.insert("note".into(), json!("hello"));
    db.create("Reading", &a).unwrap();
    db.create("Reading", &reading("b", -2.0, "ok")).unwrap();
    let mut t = reading("t", 3.0, "warn");
    t.insert("expires".into(), json!(1_800_000_060i64));
    db.create("Reading", &t).unwrap();

    let got: Reading = db.get_as("Reading", &key("a")).unwrap().unwrap();
    let json = db.get("Reading", &key("a")).unwrap().unwrap();
    assert_eq!(got.id, "a");
    assert_eq!(got.device_id, "d1");
    assert_eq!(got.value, 1.5);
    assert_eq!(got.status, Status::Fault);
    assert_eq!(got.note.as_deref(), Some("hello"));
    assert_eq!(
        json["created"],
        json!(got.created),
        "dates as their ISO text"
    );
    assert_eq!(got.pk, None, "hidden fields are left out");
    let as_value: serde_json::Value = db.get_as("Reading", &key("a")).unwrap().unwrap();
    assert_eq!(as_value, serde_json::Value::Object(json));
    let hidden: Reading = db
        .read()
        .unwrap()
        .get_as("Reading", &key("a"), true)
        .unwrap()
        .unwrap();
    assert_eq!(hidden.pk.as_deref(), Some("dev#d1"), "pk from the row key");
    assert!(db
        .get_as::<Reading>("Reading", &key("missing"))
        .unwrap()
        .is_none());

    // Finds: the same items in the same order, pages and next tokens alike.
    let all = item(json!({"deviceId": "d1"}));
    let page = db
        .find_as::<Reading>(
            "Reading",
            &all,
            &FindOptions {
                limit: Some(2),
                ..FindOptions::default()
            },
        )
        .unwrap();
    let ids_typed: Vec<&str> = page.items.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids_typed, ["a", "b"]);
    let json_page = db
        .find(
            "Reading",
            &all,
            &FindOptions {
                limit: Some(2),
                ..FindOptions::default()
            },
        )
        .unwrap();
    assert_eq!(page.next, json_page.next);
    let by_index = db
        .find_as::<Reading>(
            "Reading",
            &item(json!({"status": "fault"})),
            &FindOptions {
                index: Some("gs1".into()),
                ..FindOptions::default()
            },
        )
        .unwrap();
    assert_eq!(by_index.items.len(), 1);
    assert_eq!(by_index.items[0].id, "a");

    // An expired item is invisible to both forms at once.
    now.store(1_800_000_061_000, Ordering::SeqCst);
    assert!(db
        .get_as::<Reading>("Reading", &key("t"))
        .unwrap()
        .is_none());
    let rest = db
        .find_as::<Reading>("Reading", &all, &FindOptions::default())
        .unwrap();
    assert_eq!(rest.items.len(), 2);

    // A type the item does not fit: an error naming the model and key, not a panic.
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Wrong {
        value: String,
    }
    let err = db.get_as::<Wrong>("Reading", &key("a")).unwrap_err();
    assert!(matches!(err, DbError::Json(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("Reading") && text.contains("r#a") && text.contains("invalid type"),
        "{text}"
    );
    let err = db.get_as::<Reading>("Nope", &key("a")).unwrap_err();
    assert!(matches!(err, DbError::UnknownModel(_)), "{err}");
}
