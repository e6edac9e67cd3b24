//! The schema a file was written with: recorded at open, compared with the schema of every later
//! open; compatible changes accepted and recorded, incompatible ones refused unless allowed,
//! read-only opens never writing, files from before the record recorded on their first open.

use std::path::Path;
use std::sync::Arc;

use devtables_db::{Db, DbOptions, OpenError};
use devtables_logstore::{LogOptions, LogStore};
use devtables_schema::{Schema, SchemaChangeKind};
use serde_json::json;

use super::{key, open, reading, schema, SCHEMA};

/// The test schema with `edit` applied to its text.
fn edited(from: &str, to: &str) -> Arc<Schema> {
    assert!(SCHEMA.contains(from), "{from}");
    Arc::new(Schema::from_json5(&SCHEMA.replace(from, to)).expect("edited schema loads"))
}

/// The test schema with an optional `color` field on Reading.
fn with_color() -> Arc<Schema> {
    edited(
        "note: {type: 'string'},",
        "note: {type: 'string'}, color: {type: 'string'},",
    )
}

/// The test schema with Reading's `value` a string.
fn value_as_string() -> Arc<Schema> {
    edited(
        "value: {type: 'number', required: true}",
        "value: {type: 'string', required: true}",
    )
}

fn meta(path: &Path, key: &str) -> Option<String> {
    let store = LogStore::open_read_only(path, LogOptions::default()).unwrap();
    let read = store.read().unwrap();
    let value = read
        .table("meta")
        .unwrap()
        .get(key.as_bytes())
        .unwrap()
        .map(|v| String::from_utf8(v.into_owned()).unwrap());
    value
}

/// Changes the `meta` table of the closed log at `path`: `value` None removes `key`.
fn set_meta(path: &Path, entries: &[(&str, Option<&str>)]) {
    let store = LogStore::open(path, LogOptions::default()).unwrap();
    let mut tx = store.write().unwrap();
    for (key, value) in entries {
        match value {
            Some(v) => tx.insert("meta", key.as_bytes(), v.as_bytes()).unwrap(),
            None => {
                tx.remove("meta", key.as_bytes()).unwrap();
            }
        }
    }
    tx.commit(true).unwrap();
    store.close().unwrap();
}

fn with_one_reading(path: &Path) {
    let db = open(path, DbOptions::default());
    db.create("Reading", &reading("a1", 1.5, "ok")).unwrap();
    db.close().unwrap();
}

fn refused(result: Result<Db, OpenError>) -> (String, devtables_schema::SchemaChanges) {
    match result {
        Err(e @ OpenError::SchemaChanged { .. }) => {
            let message = e.to_string();
            let OpenError::SchemaChanged { changes, .. } = e else {
                unreachable!()
            };
            (message, changes)
        }
        Err(other) => panic!("expected SchemaChanged, got {other}"),
        Ok(_) => panic!("expected SchemaChanged, the open succeeded"),
    }
}

#[test]
fn a_new_file_records_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let db = open(&path, DbOptions::default());
    let fingerprint = schema().shape().fingerprint();
    assert_eq!(db.recorded_fingerprint(), Some(fingerprint.as_str()));
    assert_eq!(db.previous_fingerprint(), None);
    assert!(db.schema_changes_at_open().is_empty());
    db.close().unwrap();
    assert_eq!(meta(&path, "schema_fingerprint"), Some(fingerprint));
    let recorded: devtables_schema::SchemaShape =
        serde_json::from_str(&meta(&path, "schema").expect("the shape is recorded")).unwrap();
    assert_eq!(recorded, schema().shape());
}

#[test]
fn reopening_with_the_same_schema_changes_nothing_whatever_its_documentation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    with_one_reading(&path);
    let documented = edited(
        "note: {type: 'string'},",
        "note: {type: 'string', description: 'free text'},",
    );
    let db = Db::open(&path, documented, DbOptions::default()).unwrap();
    assert!(db.schema_changes_at_open().is_empty());
    assert_eq!(db.previous_fingerprint(), db.recorded_fingerprint());
    db.close().unwrap();
}

#[test]
fn an_added_optional_field_is_recorded_and_the_old_schema_then_lacks_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    with_one_reading(&path);
    let v1 = schema().shape().fingerprint();
    let v2 = with_color().shape().fingerprint();
    assert_ne!(v1, v2);

    let db = Db::open(&path, with_color(), DbOptions::default()).unwrap();
    let changes = db.schema_changes_at_open();
    assert_eq!(
        changes.to_string(),
        "models.Reading.fields.color: added optional field (compatible)"
    );
    assert_eq!(
        (db.previous_fingerprint(), db.recorded_fingerprint()),
        (Some(v1.as_str()), Some(v2.as_str()))
    );
    let mut colored = reading("a2", 2.0, "ok");
    colored.insert("color".into(), json!("red"));
    db.create("Reading", &colored).unwrap();
    assert!(db.get("Reading", &key("a1")).unwrap().is_some());
    db.close().unwrap();
    assert_eq!(meta(&path, "schema_fingerprint"), Some(v2.clone()));

    // Back to the first schema: the field the file's items may hold is gone.
    let (message, changes) = refused(Db::open(&path, schema(), DbOptions::default()));
    assert_eq!(changes.changes.len(), 1);
    assert_eq!(changes.changes[0].kind, SchemaChangeKind::FieldRemoved);
    assert!(
        message.contains("models.Reading.fields.color: removed field"),
        "{message}"
    );
    assert_eq!(meta(&path, "schema_fingerprint"), Some(v2));
}

#[test]
fn a_type_change_is_refused_naming_the_field_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    with_one_reading(&path);
    let before = std::fs::read(&path).unwrap();
    let (message, changes) = refused(Db::open(&path, value_as_string(), DbOptions::default()));
    assert!(!changes.is_compatible());
    assert!(
        message.contains(
            "models.Reading.fields.value: type changed from number to string (incompatible)"
        ),
        "{message}"
    );
    assert!(
        message.contains("DbOptions::allow_schema_change"),
        "{message}"
    );
    assert!(message.contains(&path.display().to_string()), "{message}");
    // Refused before anything was written; the file opens as before with its own schema.
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let db = open(&path, DbOptions::default());
    assert!(db.schema_changes_at_open().is_empty());
    db.close().unwrap();
}

#[test]
fn allow_schema_change_accepts_an_incompatible_change_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    with_one_reading(&path);
    let options = DbOptions {
        allow_schema_change: true,
        ..DbOptions::default()
    };
    let db = Db::open(&path, value_as_string(), options).unwrap();
    let changes = db.schema_changes_at_open();
    assert_eq!(changes.incompatible().count(), 1, "{changes}");
    let fingerprint = value_as_string().shape().fingerprint();
    assert_eq!(db.recorded_fingerprint(), Some(fingerprint.as_str()));
    // The stored item stays as it was written: a number, which the new schema would refuse.
    let stored = db.get("Reading", &key("a1")).unwrap().unwrap();
    assert_eq!(stored["value"], json!(1.5));
    db.close().unwrap();
    // Keys made by the former templates may not fit the new ones: from now on, a lookup by key
    // alone asks every model's table (format 3 keeps one table per model).
    assert_eq!(meta(&path, "stray_keys").as_deref(), Some("1"));
    // Recorded: the next open with the same schema needs no permission.
    let db = Db::open(&path, value_as_string(), DbOptions::default()).unwrap();
    assert!(db.schema_changes_at_open().is_empty());
    db.close().unwrap();
}

#[test]
fn a_read_only_open_never_writes_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    with_one_reading(&path);
    let before = std::fs::read(&path).unwrap();
    let v1 = schema().shape().fingerprint();

    let db = Db::open_read_only(&path, with_color(), DbOptions::default()).unwrap();
    assert_eq!(db.schema_changes_at_open().changes.len(), 1);
    assert_eq!(db.recorded_fingerprint(), Some(v1.as_str()));
    assert!(db.get("Reading", &key("a1")).unwrap().is_some());
    db.close().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);

    refused(Db::open_read_only(
        &path,
        value_as_string(),
        DbOptions::default(),
    ));
    let allowed = DbOptions {
        allow_schema_change: true,
        ..DbOptions::default()
    };
    let db = Db::open_read_only(&path, value_as_string(), allowed).unwrap();
    assert_eq!(db.recorded_fingerprint(), Some(v1.as_str()));
    db.close().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(meta(&path, "schema_fingerprint"), Some(v1));
}

/// Removes the schema record, as in a file written before it existed.
fn forget_record(path: &Path) {
    set_meta(path, &[("schema", None), ("schema_fingerprint", None)]);
}

#[test]
fn a_file_from_before_the_record_opens_and_gets_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    with_one_reading(&path);
    forget_record(&path);
    assert_eq!(meta(&path, "schema_fingerprint"), None);

    // Read-only: accepted as it is, nothing recorded.
    let db = Db::open_read_only(&path, with_color(), DbOptions::default()).unwrap();
    assert_eq!(db.recorded_fingerprint(), None);
    assert!(db.schema_changes_at_open().is_empty());
    db.close().unwrap();
    assert_eq!(meta(&path, "schema_fingerprint"), None);

    // The first writable open records the schema it is given.
    let db = Db::open(&path, with_color(), DbOptions::default()).unwrap();
    let fingerprint = with_color().shape().fingerprint();
    assert_eq!(db.recorded_fingerprint(), Some(fingerprint.as_str()));
    assert_eq!(db.previous_fingerprint(), None);
    assert!(db.get("Reading", &key("a1")).unwrap().is_some());
    db.close().unwrap();
    assert_eq!(meta(&path, "schema_fingerprint"), Some(fingerprint));
}

#[test]
fn an_unreadable_record_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    with_one_reading(&path);
    set_meta(
        &path,
        &[
            ("schema", Some("{not json")),
            ("schema_fingerprint", Some("0000000000000000")),
        ],
    );
    match Db::open(&path, schema(), DbOptions::default()) {
        Err(e @ OpenError::SchemaRecord { .. }) => {
            assert!(e.to_string().contains("allow_schema_change"), "{e}")
        }
        Err(other) => panic!("expected SchemaRecord, got {other}"),
        Ok(_) => panic!("expected SchemaRecord, the open succeeded"),
    }
    let allowed = DbOptions {
        allow_schema_change: true,
        ..DbOptions::default()
    };
    let db = Db::open(&path, schema(), allowed).unwrap();
    db.close().unwrap();
    assert_eq!(
        meta(&path, "schema_fingerprint"),
        Some(schema().shape().fingerprint())
    );
}

#[test]
fn an_in_memory_database_records_nothing() {
    let db = Db::open_in_memory(schema(), DbOptions::default()).unwrap();
    assert_eq!(db.recorded_fingerprint(), None);
    assert!(db.schema_changes_at_open().is_empty());
}
