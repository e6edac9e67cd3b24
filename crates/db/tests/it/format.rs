//! The file format: items round-trip through the stored encoding; a new file is a log (format
//! 4) with one items table per model and no model index; the redb files of earlier versions
//! (format 1, items as JSON text; format 2, one `items` table with the `types` model index
//! beside it; format 3, the tables the log keeps) are converted to a log at open with every
//! entry intact, a crash leaving the whole redb file or the whole log; unknown formats are
//! refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devtables_db::{Db, DbOptions, FindOptions, OpenError, Origin};
use devtables_logstore::{LogOptions, LogStore};
use devtables_schema::{ItemKey, Schema};
use redb::{ReadableTable, TableDefinition, TableHandle};
use serde_json::json;

use super::{item, key, open, reading, schema};

const ITEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
const TYPES: TableDefinition<&[u8], ()> = TableDefinition::new("types");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

#[test]
fn items_round_trip_through_the_stored_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.redb");
    let db = open(&path, DbOptions::default());
    let mut input = reading("a1", 1.0 / 3.0, "warn");
    input.insert("note".into(), json!("é \u{0001} \"quoted\" \\ 😀"));
    let created = db.create("Reading", &input).unwrap();
    db.close().unwrap();
    let db = open(&path, DbOptions::default());
    let got = db.get("Reading", &key("a1")).unwrap().unwrap();
    assert_eq!(got, created);
    assert_eq!(got["value"].as_f64(), Some(1.0 / 3.0), "floats are exact");
    let full = db
        .read()
        .unwrap()
        .get("Reading", &key("a1"), true)
        .unwrap()
        .unwrap();
    assert_eq!(full["pk"], json!("dev#d1"));
    assert_eq!(full["gs1pk"], json!("status#warn"));
    // Export writes JSON, import reads it back into an equal database.
    let mut out = Vec::new();
    assert_eq!(db.export(&mut out).unwrap(), 1);
    let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(line, serde_json::Value::Object(full.clone()));
    let db2 = open(&dir.path().join("t2.redb"), DbOptions::default());
    db2.import(&mut out.as_slice()).unwrap();
    let again = db2
        .read()
        .unwrap()
        .get("Reading", &key("a1"), true)
        .unwrap()
        .unwrap();
    assert_eq!(again, full);
}

#[test]
fn json_files_from_before_the_format_are_converted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.redb");
    let stored = item(json!({
        "_type": "Reading", "id": "x1", "deviceId": "d1", "value": 2.5, "status": "fault",
        "pk": "dev#d1", "sk": "r#x1", "gs1pk": "status#fault", "gs1sk": "r#x1",
        "created": "2026-01-01T00:00:00.000Z", "updated": "2026-01-01T00:00:00.000Z",
    }));
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut items = tx.open_table(ITEMS).unwrap();
            let body = serde_json::to_vec(&stored).unwrap();
            items
                .insert(b"dev#d1\0r#x1".as_slice(), body.as_slice())
                .unwrap();
            let mut types = tx.open_table(TYPES).unwrap();
            types
                .insert(b"Reading\0dev#d1\0r#x1".as_slice(), ())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let db = open(&path, DbOptions::default());
    let full = db
        .read()
        .unwrap()
        .get("Reading", &key("x1"), true)
        .unwrap()
        .unwrap();
    assert_eq!(full, stored);
    // The index was built from the converted items.
    let by_index = FindOptions {
        index: Some("gs1".into()),
        ..FindOptions::default()
    };
    let page = db
        .find("Reading", &item(json!({"status": "fault"})), &by_index)
        .unwrap();
    assert_eq!(page.items.len(), 1);
    db.close().unwrap();
    assert!(is_log(&path), "the redb file was replaced by a log");
    assert_eq!(meta_value(&path, "format").as_deref(), Some("4"));
    assert!(!table_names(&path).contains("types"));
    let db = open(&path, DbOptions::default());
    assert!(db.get("Reading", &key("x1")).unwrap().is_some());
}

/// Every table of the log at `path`, with its entries.
type Tables = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

fn log_tables(path: &Path) -> Tables {
    let store = LogStore::open_read_only(path, LogOptions::default()).unwrap();
    let read = store.read().unwrap();
    read.table_names()
        .into_iter()
        .map(|name| {
            let entries = read
                .table(&name)
                .unwrap()
                .range((std::ops::Bound::Unbounded, std::ops::Bound::Unbounded))
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (k.to_vec(), v.into_owned())
                })
                .collect();
            (name, entries)
        })
        .collect()
}

/// The names of the tables in the log at `path`.
fn table_names(path: &Path) -> BTreeSet<String> {
    log_tables(path).into_keys().collect()
}

/// The keys of a table of the log (TTL, a secondary index).
fn keys_of(path: &Path, table: &str) -> Vec<Vec<u8>> {
    log_tables(path)
        .remove(table)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

fn meta_value(path: &Path, key: &str) -> Option<String> {
    log_tables(path)
        .remove("meta")?
        .into_iter()
        .find(|(k, _)| k.as_slice() == key.as_bytes())
        .map(|(_, v)| String::from_utf8(v).unwrap())
}

fn is_log(path: &Path) -> bool {
    std::fs::read(path)
        .unwrap()
        .starts_with(&devtables_logstore::MAGIC)
}

fn is_redb(path: &Path) -> bool {
    std::fs::read(path)
        .unwrap()
        .starts_with(&devtables_db::legacy::REDB_MAGIC)
}

/// The names of the tables of the redb file at `path`.
fn redb_table_names(path: &Path) -> BTreeSet<String> {
    let db = redb::Database::create(path).unwrap();
    let tx = db.begin_read().unwrap();
    let names = tx
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    names
}

fn redb_meta_value(path: &Path, key: &str) -> Option<String> {
    let db = redb::Database::create(path).unwrap();
    let tx = db.begin_read().unwrap();
    let meta = tx.open_table(META).unwrap();
    let value = meta.get(key).unwrap().map(|v| v.value().to_string());
    value
}

/// Writes a log of the current format (the closed database at `log`) as the redb file format
/// 3 was, at `redb_file`.
fn as_format_3(log: &Path, redb_file: &Path) {
    devtables_db::legacy::write_fixture(log, redb_file).unwrap();
    assert_eq!(redb_meta_value(redb_file, "format").as_deref(), Some("3"));
}

#[test]
fn unknown_formats_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    let db = open(&path, DbOptions::default());
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    db.close().unwrap();
    assert_eq!(meta_value(&path, "format").as_deref(), Some("4"));
    {
        let store = LogStore::open(&path, LogOptions::default()).unwrap();
        let mut tx = store.write().unwrap();
        tx.insert("meta", b"format", b"99").unwrap();
        tx.commit(true).unwrap();
        store.close().unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    let err = match devtables_db::Db::open(&path, schema(), DbOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("a file of format 99 must be refused"),
    };
    assert!(matches!(&err, OpenError::UnsupportedFormat { found, .. } if found == "99"));
    let text = err.to_string();
    assert!(
        text.contains("format 99") && text.contains("format 4"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the refused open changed nothing"
    );

    // A log of a newer log format (its header's version) is refused alike.
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&(devtables_logstore::FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&path, &newer).unwrap();
    assert!(matches!(
        Db::open(&path, schema(), DbOptions::default()),
        Err(OpenError::UnsupportedFormat { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), newer);

    // A redb file of a format after 3 that no version wrote is refused, and left as it is.
    let redb_file = dir.path().join("odd.redb");
    {
        let db = redb::Database::create(&redb_file).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(META).unwrap().insert("format", "7").unwrap();
        tx.commit().unwrap();
    }
    let before = std::fs::read(&redb_file).unwrap();
    assert!(matches!(
        Db::open(&redb_file, schema(), DbOptions::default()),
        Err(OpenError::UnsupportedFormat { found, .. }) if found == "7"
    ));
    assert_eq!(std::fs::read(&redb_file).unwrap(), before);
}

/// Rewrites a closed file of the current format in the layout format 2 wrote: every item in one
/// `items` table (`pk \0 sk` → the item, the same encoding) with the model index `types`
/// (`model \0 pk \0 sk` → ()) beside it. Every other table (TTL, indexes, unique values, side
/// tables, meta) is laid out alike in both formats and stays as it is.
fn downgrade_to_format_2(path: &Path) {
    let db = redb::Database::create(path).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let names: Vec<String> = tx
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_string())
            .filter(|n| n.starts_with("items:"))
            .collect();
        assert!(!names.is_empty(), "a format-3 file has items tables");
        let mut items = tx.open_table(ITEMS).unwrap();
        let mut types = tx.open_table(TYPES).unwrap();
        for name in &names {
            let model = &name["items:".len()..];
            let def: TableDefinition<&[u8], &[u8]> = TableDefinition::new(name);
            {
                let table = tx.open_table(def).unwrap();
                for entry in table.iter().unwrap() {
                    let (k, v) = entry.unwrap();
                    items.insert(k.value(), v.value()).unwrap();
                    let mut type_key = model.as_bytes().to_vec();
                    type_key.push(0);
                    type_key.extend_from_slice(k.value());
                    types.insert(type_key.as_slice(), ()).unwrap();
                }
            }
            tx.delete_table(def).unwrap();
        }
        tx.open_table(META).unwrap().insert("format", "2").unwrap();
    }
    tx.commit().unwrap();
}

fn options_at(now: &Arc<AtomicI64>) -> DbOptions {
    let clock = now.clone();
    DbOptions {
        // Purged only when the test says so.
        ttl_purge_interval: Duration::from_secs(3600),
        clock: Arc::new(move || clock.load(Ordering::SeqCst)),
        ..DbOptions::default()
    }
}

const START_MS: i64 = 1_800_000_000_000;

/// A database with readings (every tenth with a TTL a minute ahead), two items of another model
/// written as replication writes them, and side-table entries.
fn populate(path: &Path, options: DbOptions, readings: usize) {
    let db = Db::open(path, schema(), options).unwrap();
    for i in 0..readings {
        let status = ["ok", "warn", "fault"][i % 3];
        let mut r = reading(&format!("r{i:04}"), i as f64, status);
        if i % 10 == 0 {
            r.insert("expires".into(), json!(START_MS / 1000 + 60));
        }
        db.create("Reading", &r).unwrap();
    }
    db.write(Origin::Remote, |t| {
        for name in ["a", "b"] {
            let cmd = item(
                json!({"_type": "Cmd", "name": name, "pk": "cmd#", "sk": format!("cmd#{name}")}),
            );
            t.put_stored("Cmd", cmd)?;
        }
        t.side().put("outbox", b"k1", b"v1")?;
        t.side().put("outbox", b"k2", b"v2")
    })
    .unwrap();
    db.close().unwrap();
}

fn export(db: &Db) -> String {
    let mut out = Vec::new();
    db.export(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn ids_with_status(db: &Db, status: &str) -> Vec<String> {
    let by_index = FindOptions {
        index: Some("gs1".into()),
        ..FindOptions::default()
    };
    db.find("Reading", &item(json!({"status": status})), &by_index)
        .unwrap()
        .items
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

/// A redb file of format 3 at `path` holding what [`populate`] writes; returns every table of
/// the log it was made from.
fn populate_format_3(path: &Path, options: DbOptions, readings: usize) -> Tables {
    let log = path.with_extension("source-log");
    populate(&log, options, readings);
    as_format_3(&log, path);
    let tables = log_tables(&log);
    std::fs::remove_file(&log).unwrap();
    tables
}

#[test]
fn new_files_have_one_items_table_per_model_and_no_model_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.db");
    let now = Arc::new(AtomicI64::new(START_MS));
    populate(&path, options_at(&now), 3);
    assert!(is_log(&path));
    let names = table_names(&path);
    assert!(!names.contains("types"), "no model index table: {names:?}");
    assert!(!names.contains("items"), "no single items table: {names:?}");
    // A table exists once it holds a key: `Cfg` has no item here.
    for expected in [
        "items:Reading",
        "items:Cmd",
        "ttl",
        "idx:gs1",
        "meta",
        "x:outbox",
    ] {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    assert_eq!(meta_value(&path, "format").as_deref(), Some("4"));
    assert_eq!(meta_value(&path, "stray_keys"), None);
}

/// A schema with a `unique` field, so conversions can be checked to keep the `unique` table.
const UNIQUE_SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {primary: {hash: 'pk', sort: 'sk'}},
    params: {timestamps: false},
    models: {
        User: {
            pk: {type: 'string', value: 'user#'},
            sk: {type: 'string', value: 'user#${id}'},
            id: {type: 'string', required: true},
            email: {type: 'string', unique: true},
        },
    },
}"#;

#[test]
fn format_3_files_are_converted_with_every_table_and_entry_intact() {
    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicI64::new(START_MS));
    let path = dir.path().join("f3.redb");
    let before = populate_format_3(&path, options_at(&now), 300);
    assert_eq!(before["ttl"].len(), 30);
    assert_eq!(before["x:outbox"].len(), 2);
    assert!(is_redb(&path));
    let db = Db::open(&path, schema(), options_at(&now)).unwrap();
    assert_eq!(export(&db).lines().count(), 302);
    db.close().unwrap();
    assert!(is_log(&path));
    assert!(!dir.path().join("f3.redb.converting").exists());
    assert_eq!(
        log_tables(&path),
        before,
        "every table, every entry, format 4"
    );

    // The `unique` table too: its entries come over, and they still refuse a taken value.
    let schema = Arc::new(Schema::from_json5(UNIQUE_SCHEMA).unwrap());
    let log = dir.path().join("unique.log");
    {
        let db = Db::open(&log, schema.clone(), DbOptions::default()).unwrap();
        for (id, email) in [("u1", "a@x"), ("u2", "b@x")] {
            db.create("User", &item(json!({"id": id, "email": email})))
                .unwrap();
        }
        db.close().unwrap();
    }
    let before = log_tables(&log);
    assert_eq!(before["unique"].len(), 2);
    let path = dir.path().join("unique.redb");
    as_format_3(&log, &path);
    let db = Db::open(&path, schema, DbOptions::default()).unwrap();
    assert!(matches!(
        db.create("User", &item(json!({"id": "u3", "email": "a@x"}))),
        Err(devtables_db::DbError::NotUnique { .. })
    ));
    db.close().unwrap();
    assert_eq!(log_tables(&path), before);
}

#[test]
fn format_2_files_are_converted_with_every_entry_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f2.redb");
    let now = Arc::new(AtomicI64::new(START_MS));
    let before = populate_format_3(&path, options_at(&now), 300);
    let ttl_before = before["ttl"]
        .iter()
        .map(|(k, _)| k.clone())
        .collect::<Vec<_>>();
    let gs1_before = before["idx:gs1"]
        .iter()
        .map(|(k, _)| k.clone())
        .collect::<Vec<_>>();
    assert_eq!(ttl_before.len(), 30);

    downgrade_to_format_2(&path);
    let names = redb_table_names(&path);
    assert!(
        names.contains("types") && !names.contains("items:Reading"),
        "{names:?}"
    );

    let db = Db::open(&path, schema(), options_at(&now)).unwrap();
    assert_eq!(export(&db).lines().count(), 302);
    assert_eq!(db.side_scan("outbox", b"", 10).unwrap(), before["x:outbox"]);
    assert_eq!(ids_with_status(&db, "fault").len(), 100);
    db.close().unwrap();
    assert!(is_log(&path));
    assert_eq!(
        log_tables(&path),
        before,
        "every table, every entry, as format 3 had them"
    );
    assert_eq!(
        keys_of(&path, "ttl"),
        ttl_before,
        "TTL entries as they were"
    );

    // The TTL entries work on the converted items: the expired readings are purged by them.
    let db = Db::open(&path, schema(), options_at(&now)).unwrap();
    now.store(START_MS + 61_000, Ordering::SeqCst);
    assert_eq!(db.purge_expired().unwrap(), 30);
    assert_eq!(db.get("Reading", &key("r0010")).unwrap(), None);
    assert!(db.get("Reading", &key("r0011")).unwrap().is_some());
    assert!(!ids_with_status(&db, "ok").contains(&"r0030".to_string()));
    db.close().unwrap();
    assert_eq!(keys_of(&path, "ttl"), Vec::<Vec<u8>>::new());
    assert_eq!(keys_of(&path, "idx:gs1").len(), gs1_before.len() - 30);
}

#[test]
fn a_conversion_that_fails_half_way_leaves_the_format_2_file_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.redb");
    let now = Arc::new(AtomicI64::new(START_MS));
    populate_format_3(&path, options_at(&now), 200);
    downgrade_to_format_2(&path);
    // Damage the second half: the last item the model index names (the model index is in
    // model order, `Reading` after `Cmd`) leaves the items table, so the conversion fails
    // after it moved every other item.
    let last = b"dev#d1\0r#r0199".as_slice();
    let kept = {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        let kept = {
            let mut items = tx.open_table(ITEMS).unwrap();
            let kept = items.remove(last).unwrap().unwrap().value().to_vec();
            kept
        };
        tx.commit().unwrap();
        kept
    };
    let before = std::fs::read(&path).unwrap();

    let err = match Db::open(&path, schema(), options_at(&now)) {
        Err(e) => e,
        Ok(_) => panic!("a model index naming a missing item must refuse the conversion"),
    };
    let text = err.to_string();
    assert!(
        matches!(err, OpenError::Damaged { .. }) && text.contains("model index"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "nothing of the conversion was kept"
    );
    assert!(!dir.path().join("half.redb.converting").exists());

    // Repaired, the same file converts.
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(ITEMS)
            .unwrap()
            .insert(last, kept.as_slice())
            .unwrap();
        tx.commit().unwrap();
    }
    let db = Db::open(&path, schema(), options_at(&now)).unwrap();
    assert_eq!(export(&db).lines().count(), 202);
    assert!(db.get("Reading", &key("r0199")).unwrap().is_some());
}

#[test]
fn a_read_only_open_of_a_format_2_file_converts_in_memory_and_leaves_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.redb");
    let now = Arc::new(AtomicI64::new(START_MS));
    let log = dir.path().join("ro.log");
    populate(&log, options_at(&now), 50);
    let expected = {
        let db = Db::open(&log, schema(), options_at(&now)).unwrap();
        let e = export(&db);
        db.close().unwrap();
        e
    };
    as_format_3(&log, &path);
    downgrade_to_format_2(&path);
    let bytes = std::fs::read(&path).unwrap();

    let db = Db::open_read_only(&path, schema(), options_at(&now)).unwrap();
    assert_eq!(export(&db), expected);
    assert_eq!(ids_with_status(&db, "fault").len(), 16);
    assert!(db.get("Reading", &key("r0007")).unwrap().is_some());
    assert!(matches!(
        db.create("Reading", &reading("new", 1.0, "ok")),
        Err(devtables_db::DbError::ReadOnly { .. })
    ));
    drop(db);
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "the file was not written"
    );
    assert!(!dir.path().join("ro.redb.converting").exists());

    let db = Db::open(&path, schema(), options_at(&now)).unwrap();
    assert_eq!(export(&db), expected);
    db.close().unwrap();
    assert_eq!(meta_value(&path, "format").as_deref(), Some("4"));
}

#[test]
fn a_key_its_model_cannot_produce_is_still_found_after_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stray.redb");
    let now = Arc::new(AtomicI64::new(START_MS));
    populate_format_3(&path, options_at(&now), 3);
    downgrade_to_format_2(&path);
    // A `Cfg` item under a key `Cfg`'s templates (`cfg#`, `cfg#${name}`) cannot produce, as a
    // schema change accepted with `allow_schema_change` can leave.
    let stray_key = ItemKey {
        pk: "old".into(),
        sk: "cfg-x".into(),
    };
    let stored = item(json!({"_type": "Cfg", "name": "x", "pk": "old", "sk": "cfg-x"}));
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let bytes = devtables_db::fuzzing::encode_item(&stored, &stray_key);
            tx.open_table(ITEMS)
                .unwrap()
                .insert(b"old\0cfg-x".as_slice(), bytes.as_slice())
                .unwrap();
            tx.open_table(TYPES)
                .unwrap()
                .insert(b"Cfg\0old\0cfg-x".as_slice(), ())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let db = Db::open(&path, schema(), options_at(&now)).unwrap();
    let found = db.read().unwrap().get_stored(&stray_key).unwrap();
    assert_eq!(found, Some(("Cfg".to_string(), stored)));
    db.close().unwrap();
    assert_eq!(meta_value(&path, "stray_keys").as_deref(), Some("1"));
    // Recorded: later opens still ask every model's table.
    let db = Db::open(&path, schema(), options_at(&now)).unwrap();
    assert!(db.read().unwrap().get_stored(&stray_key).unwrap().is_some());
}

const CHILD_ENV: &str = "DEVTABLES_CONVERT_CHILD_DB";

/// Entry point of the child process of the test below (does nothing unless it set the
/// variable): opens, so converts, the file, and says when it starts and ends.
#[test]
fn conversion_child_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    println!("opening");
    let db = Db::open(&path, schema(), DbOptions::default()).expect("child open");
    println!("opened");
    db.close().expect("child close");
}

/// A format-2 file of `n` readings (written in transactions of 1,000 to a log, copied to redb
/// as format 3 wrote it, then laid out as format 2 wrote it); returns its export.
fn format_2_file(path: &Path, n: usize) -> String {
    let log = path.with_extension("source-log");
    let db = Db::open(&log, schema(), DbOptions::default()).unwrap();
    for start in (0..n).step_by(1_000) {
        let ops: Vec<_> = (start..n.min(start + 1_000))
            .map(|i| devtables_db::TxnOp::Create {
                model: "Reading".into(),
                item: reading(
                    &format!("r{i:06}"),
                    i as f64,
                    ["ok", "warn", "fault"][i % 3],
                ),
            })
            .collect();
        db.transaction(&ops).unwrap();
    }
    let expected = export(&db);
    db.close().unwrap();
    as_format_3(&log, path);
    downgrade_to_format_2(path);
    expected
}
/// Runs the child on `path` and kills it (SIGKILL) `after` it said it is opening, or lets it
/// finish when `after` is None; returns how long its open took when it finished.
fn open_in_child(path: &Path, after: Option<Duration>) -> Option<Duration> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "format::conversion_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let started = loop {
        let line = lines.next().expect("the child says it is opening").unwrap();
        if line.trim_end().ends_with("opening") {
            break std::time::Instant::now();
        }
    };
    let took = match after {
        Some(delay) => {
            // The crash's moment, not a wait for a condition: the delays spread over the open.
            std::thread::sleep(delay);
            child.kill().unwrap();
            None
        }
        None => {
            let opened =
                lines.any(|l| l.map(|l| l.trim_end().ends_with("opened")).unwrap_or(false));
            assert!(opened, "the child opened the file");
            Some(started.elapsed())
        }
    };
    child.wait().unwrap();
    took
}

#[test]
fn a_conversion_killed_part_way_leaves_a_file_that_opens_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("killed.redb");
    let expected = format_2_file(&path, 10_000);
    let pristine = std::fs::read(&path).unwrap();
    let full = open_in_child(&path, None).expect("a whole open");
    assert!(is_log(&path));
    assert_eq!(meta_value(&path, "format").as_deref(), Some("4"));
    let mut found_after_kill = Vec::new();
    for round in 0..6u32 {
        std::fs::write(&path, &pristine).unwrap();
        open_in_child(&path, Some(full * round / 5));
        // Either the redb file as it was (format 2) or the whole log (format 4), never in
        // between: the log is written beside the file and renamed over it once durable.
        if is_redb(&path) {
            assert_eq!(std::fs::read(&path).unwrap(), pristine, "round {round}");
            found_after_kill.push("redb");
        } else {
            assert!(is_log(&path), "round {round}: neither redb nor a log");
            assert_eq!(meta_value(&path, "format").as_deref(), Some("4"));
            found_after_kill.push("log");
        }
        let db = Db::open(&path, schema(), DbOptions::default()).unwrap();
        assert_eq!(
            export(&db),
            expected,
            "round {round}: every item after the kill"
        );
        db.close().unwrap();
        assert!(
            !dir.path().join("killed.redb.converting").exists(),
            "round {round}: leftover removed"
        );
    }
    eprintln!("open took {full:?}; files found after the kills: {found_after_kill:?}");
}
