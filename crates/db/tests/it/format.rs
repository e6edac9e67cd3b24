//! The stored-item format: items round-trip through the stored encoding, files from before the
//! format was recorded (items as JSON text) are converted on open, unknown formats are refused.

use devtables_db::{DbOptions, FindOptions, OpenError};
use redb::{ReadableTable, TableDefinition};
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
    let db = open(&path, DbOptions::default());
    assert!(db.get("Reading", &key("x1")).unwrap().is_some());
}

#[test]
fn unknown_formats_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.redb");
    let db = open(&path, DbOptions::default());
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    db.close().unwrap();
    {
        let db = redb::Database::create(&path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut meta = tx.open_table(META).unwrap();
            assert_eq!(meta.get("format").unwrap().unwrap().value(), "2");
            meta.insert("format", "99").unwrap();
        }
        tx.commit().unwrap();
    }
    let err = match devtables_db::Db::open(&path, schema(), DbOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("a file of format 99 must be refused"),
    };
    assert!(matches!(&err, OpenError::UnsupportedFormat { found, .. } if found == "99"));
    let text = err.to_string();
    assert!(
        text.contains("format 99") && text.contains("format 2"),
        "{text}"
    );
    // Nothing was changed by the refused open.
    let db = redb::Database::create(&path).unwrap();
    let tx = db.begin_read().unwrap();
    assert_eq!(
        tx.open_table(META)
            .unwrap()
            .get("format")
            .unwrap()
            .unwrap()
            .value(),
        "99"
    );
    assert_eq!(tx.open_table(ITEMS).unwrap().iter().unwrap().count(), 1);
}
