//! `unique` fields: a value held by one live item is refused to another, on every write path;
//! rolled-back writes leave no value held; the values survive a reopen; a file gaining
//! `unique` gets its values built at open, or is refused when its items already collide.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use devtables_db::{Db, DbError, DbOptions, OpenError, Origin, TxnOp};
use devtables_schema::{Item, Schema};
use proptest::prelude::*;
use serde_json::json;

use super::item;

const UNIQUE_SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {primary: {hash: 'pk', sort: 'sk'}},
    models: {
        User: {
            pk: {type: 'string', value: 'user#${id}'},
            sk: {type: 'string', value: 'user#'},
            id: {type: 'string', required: true},
            email: {type: 'string', unique: true},
            org: {type: 'string'},
            nick: {type: 'string', unique: true, scope: 'org#${org}'},
            expires: {type: 'date', ttl: true},
        },
    },
}"#;

fn unique_schema() -> Arc<Schema> {
    Arc::new(Schema::from_json5(UNIQUE_SCHEMA).expect("unique schema loads"))
}

/// The same schema without `unique` on `email`.
fn plain_schema() -> Arc<Schema> {
    let text = UNIQUE_SCHEMA.replace(
        "email: {type: 'string', unique: true}",
        "email: {type: 'string'}",
    );
    Arc::new(Schema::from_json5(&text).expect("plain schema loads"))
}

fn user(id: &str, email: &str) -> Item {
    item(json!({"id": id, "email": email}))
}

fn id(id: &str) -> Item {
    item(json!({"id": id}))
}

fn open_unique(path: &Path) -> Db {
    Db::open(path, unique_schema(), DbOptions::default()).expect("database opens")
}

/// The (field, value, holder) of a NotUnique error, or a panic naming what came instead.
fn not_unique<T: std::fmt::Debug>(result: Result<T, DbError>) -> (String, String, String) {
    match result {
        Err(DbError::NotUnique {
            field,
            value,
            holder,
            ..
        }) => (field, value, holder),
        other => panic!("expected NotUnique, got {other:?}"),
    }
}

#[test]
fn a_held_value_is_refused_to_another_item_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_unique(&dir.path().join("u.db"));
    db.create("User", &user("u1", "a@x")).unwrap();
    let err = db.create("User", &user("u2", "a@x")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "User.email is unique: the value a@x is already held by item \"user#u1\"/\"user#\"; \
         choose another value, or change or remove that item first"
    );
    assert!(db.get("User", &id("u2")).unwrap().is_none());
    // The holder itself may keep and rewrite its value.
    db.update("User", &user("u1", "a@x")).unwrap();
    // Upsert, creating or updating, is held to the same rule.
    let (field, value, _) = not_unique(db.upsert("User", &user("u2", "a@x")));
    assert_eq!((field.as_str(), value.as_str()), ("email", "a@x"));
    db.create("User", &user("u2", "b@x")).unwrap();
    not_unique(db.upsert("User", &user("u2", "a@x")));
    // Items without the field hold nothing.
    db.create("User", &id("u3")).unwrap();
    db.create("User", &id("u4")).unwrap();
}

/// How many values the file's `unique` table holds.
fn held_values(path: &Path) -> u64 {
    use devtables_logstore::{LogOptions, LogStore};
    let store = LogStore::open_read_only(path, LogOptions::default()).unwrap();
    let read = store.read().unwrap();
    let held = read.table("unique").map_or(0, |t| t.len());
    held
}

#[test]
fn changing_or_removing_a_value_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.db");
    let db = open_unique(&path);
    db.create("User", &user("u1", "a@x")).unwrap();
    db.update("User", &user("u1", "b@x")).unwrap();
    db.create("User", &user("u2", "a@x")).unwrap();
    let (_, _, holder) = not_unique(db.create("User", &user("u3", "b@x")));
    assert!(holder.contains("user#u1"), "{holder}");
    // Unsetting the field frees the value too.
    db.update("User", &item(json!({"id": "u1", "email": null})))
        .unwrap();
    db.create("User", &user("u3", "b@x")).unwrap();
    db.remove("User", &id("u3")).unwrap();
    db.create("User", &user("u4", "b@x")).unwrap();
    db.create("User", &user("u5", "c@x")).unwrap();
    db.update("User", &user("u5", "d@x")).unwrap();
    db.remove("User", &id("u5")).unwrap();
    db.close().unwrap();
    // Only the values items hold now (u2: a@x, u4: b@x): freed ones left no entry behind.
    assert_eq!(held_values(&path), 2);
}

#[test]
fn a_scope_narrows_uniqueness_to_items_whose_scope_renders_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_unique(&dir.path().join("u.db"));
    let nick = |i: &str, org: Option<&str>| match org {
        Some(org) => item(json!({"id": i, "nick": "ace", "org": org})),
        None => item(json!({"id": i, "nick": "ace"})),
    };
    db.create("User", &nick("u1", Some("o1"))).unwrap();
    db.create("User", &nick("u2", Some("o2"))).unwrap();
    let err = db.create("User", &nick("u3", Some("o1"))).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("User.nick is unique in scope org#o1:"),
        "{err}"
    );
    // Items whose scope cannot render (no org) share one scope of their own.
    db.create("User", &nick("u4", None)).unwrap();
    not_unique(db.create("User", &nick("u5", None)));
}

#[test]
fn a_rolled_back_transaction_holds_no_value() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_unique(&dir.path().join("u.db"));
    db.create("User", &user("u1", "a@x")).unwrap();
    let ops = [
        TxnOp::Create {
            model: "User".into(),
            item: user("u2", "c@x"),
        },
        TxnOp::Create {
            model: "User".into(),
            item: user("u3", "a@x"),
        },
    ];
    not_unique(db.transaction(&ops));
    assert!(db.get("User", &id("u2")).unwrap().is_none());
    // c@x was claimed only inside the rolled-back transaction.
    db.create("User", &user("u4", "c@x")).unwrap();
    // Within one transaction, a value one operation frees another may take.
    let swap = [
        TxnOp::Update {
            model: "User".into(),
            item: user("u1", "d@x"),
            upsert: false,
        },
        TxnOp::Create {
            model: "User".into(),
            item: user("u5", "a@x"),
        },
    ];
    db.transaction(&swap).unwrap();
}

#[test]
fn import_refuses_colliding_lines_with_the_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_unique(&dir.path().join("u.db"));
    db.create("User", &user("u1", "a@x")).unwrap();
    let mut export = Vec::new();
    db.export(&mut export).unwrap();
    // Importing a database's own export replaces each item: no item collides with itself.
    assert_eq!(db.import(&mut export.as_slice()).unwrap(), 1);

    let line = |i: &str, email: &str| {
        json!({"_type": "User", "id": i, "email": email, "pk": format!("user#{i}"), "sk": "user#"})
            .to_string()
    };
    let input = [line("u2", "b@x"), line("u3", "c@x"), line("u4", "b@x")].join("\n");
    match db.import(&mut input.as_bytes()) {
        Err(DbError::Import { line: 3, source }) => {
            assert!(matches!(*source, DbError::NotUnique { .. }), "{source}")
        }
        other => panic!("expected a refusal at line 3, got {other:?}"),
    }
    assert!(db.get("User", &id("u2")).unwrap().is_none(), "rolled back");
    let input = line("u5", "a@x");
    not_unique_import(db.import(&mut input.as_bytes()));
}

fn not_unique_import(result: Result<u64, DbError>) {
    match result {
        Err(DbError::Import { line: 1, source }) => {
            assert!(matches!(*source, DbError::NotUnique { .. }), "{source}")
        }
        other => panic!("expected a refusal at line 1, got {other:?}"),
    }
}

#[test]
fn values_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.db");
    let db = open_unique(&path);
    db.create("User", &user("u1", "a@x")).unwrap();
    db.close().unwrap();
    let db = open_unique(&path);
    not_unique(db.create("User", &user("u2", "a@x")));
}

#[test]
fn a_replicated_item_takes_a_held_value_over_instead_of_stopping_replication() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_unique(&dir.path().join("u.db"));
    db.create("User", &user("u1", "a@x")).unwrap();
    let remote =
        item(json!({"_type": "User", "id": "r1", "email": "a@x", "pk": "user#r1", "sk": "user#"}));
    db.write(Origin::Remote, |t| t.put_stored("User", remote.clone()))
        .unwrap();
    let (_, _, holder) = not_unique(db.create("User", &user("u2", "a@x")));
    assert!(holder.contains("user#r1"), "{holder}");
    // When the replicated holder goes, the value is free again even though u1 still holds it
    // (the collision came from outside; the table follows the last writer).
    db.write(Origin::Remote, |t| {
        t.remove_stored(&devtables_schema::ItemKey {
            pk: "user#r1".into(),
            sk: "user#".into(),
        })
    })
    .unwrap();
    // u1 rewriting its value reclaims it.
    db.update("User", &user("u1", "a@x")).unwrap();
    not_unique(db.create("User", &user("u2", "a@x")));
}

#[test]
fn an_expired_holder_frees_its_value_and_its_purge_leaves_the_new_holder() {
    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicI64::new(1_800_000_000_000));
    let clock = now.clone();
    let options = DbOptions {
        clock: Arc::new(move || clock.load(Ordering::SeqCst)),
        ttl_purge_interval: std::time::Duration::from_secs(3600),
        ..DbOptions::default()
    };
    let db = Db::open(dir.path().join("u.db"), unique_schema(), options).unwrap();
    let mut short = user("u1", "a@x");
    short.insert("expires".into(), json!(1_800_000_001i64));
    db.create("User", &short).unwrap();
    not_unique(db.create("User", &user("u2", "a@x")));
    now.store(1_800_000_002_000, Ordering::SeqCst);
    db.create("User", &user("u2", "a@x")).unwrap();
    assert_eq!(db.purge_expired().unwrap(), 1);
    let (_, _, holder) = not_unique(db.create("User", &user("u3", "a@x")));
    assert!(holder.contains("user#u2"), "{holder}");
}

#[test]
fn a_file_gaining_unique_gets_its_values_built_or_is_refused_when_items_collide() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = DbOptions {
        allow_schema_change: true,
        ..DbOptions::default()
    };
    // Distinct values: built at open (a schema change the option must allow).
    let path = dir.path().join("distinct.db");
    let db = Db::open(&path, plain_schema(), DbOptions::default()).unwrap();
    db.create("User", &user("u1", "a@x")).unwrap();
    db.create("User", &user("u2", "b@x")).unwrap();
    db.close().unwrap();
    match Db::open(&path, unique_schema(), DbOptions::default()) {
        Err(e @ OpenError::SchemaChanged { .. }) => assert!(
            e.to_string()
                .contains("models.User.fields.email: made unique"),
            "{e}"
        ),
        Err(other) => panic!("expected SchemaChanged, got {other}"),
        Ok(_) => panic!("expected SchemaChanged, the open succeeded"),
    }
    let db = Db::open(&path, unique_schema(), allowed.clone()).unwrap();
    let (_, _, holder) = not_unique(db.create("User", &user("u3", "b@x")));
    assert!(holder.contains("user#u2"), "{holder}");
    db.close().unwrap();

    // Colliding values: refused, even with the change allowed, naming both items.
    let path = dir.path().join("colliding.db");
    let db = Db::open(&path, plain_schema(), DbOptions::default()).unwrap();
    db.create("User", &user("u1", "a@x")).unwrap();
    db.create("User", &user("u2", "a@x")).unwrap();
    db.close().unwrap();
    match Db::open(&path, unique_schema(), allowed.clone()) {
        Err(e @ OpenError::NotUnique(_)) => {
            let message = e.to_string();
            assert!(
                message.contains("User.email is unique in this schema, but items \"user#u1\"/\"user#\" and \"user#u2\"/\"user#\" both hold the value a@x"),
                "{message}"
            );
        }
        Err(other) => panic!("expected NotUnique, got {other}"),
        Ok(_) => panic!("expected NotUnique, the open succeeded"),
    }
    // Nothing was recorded: the file still opens with its own schema, and the fix works.
    let db = Db::open(&path, plain_schema(), DbOptions::default()).unwrap();
    assert!(db.schema_changes_at_open().is_empty());
    db.update("User", &user("u2", "b@x")).unwrap();
    db.close().unwrap();
    let db = Db::open(&path, unique_schema(), allowed).unwrap();
    not_unique(db.create("User", &user("u3", "a@x")));
    db.close().unwrap();

    // Dropping `unique` (compatible) drops the values: duplicates are then allowed.
    let db = Db::open(&path, plain_schema(), DbOptions::default()).unwrap();
    db.create("User", &user("u3", "a@x")).unwrap();
    db.close().unwrap();
}

#[derive(Clone, Debug)]
enum Step {
    Create(u8, Option<u8>),
    Update(u8, Option<u8>),
    Remove(u8),
}

fn step() -> impl Strategy<Value = Step> {
    let id = 0u8..6;
    let email = proptest::option::weighted(0.8, 0u8..4);
    prop_oneof![
        3 => (id.clone(), email.clone()).prop_map(|(i, e)| Step::Create(i, e)),
        3 => (id.clone(), email).prop_map(|(i, e)| Step::Update(i, e)),
        1 => id.prop_map(Step::Remove),
    ]
}

fn props(i: u8, email: Option<u8>) -> Item {
    item(json!({"id": format!("u{i}"), "email": email.map(|e| format!("e{e}"))}))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random writes against a model of who holds which value: every write the model allows
    /// succeeds, every other is refused as NotUnique (or as a missing / existing item).
    #[test]
    fn writes_agree_with_a_model_of_the_held_values(steps in proptest::collection::vec(step(), 1..40)) {
        let db = Db::open_in_memory(unique_schema(), DbOptions::default()).unwrap();
        let mut model: BTreeMap<u8, Option<u8>> = BTreeMap::new();
        let taken_by_other = |model: &BTreeMap<u8, Option<u8>>, i: u8, e: Option<u8>| {
            e.is_some() && model.iter().any(|(other, held)| *other != i && *held == e)
        };
        for step in steps {
            match step {
                Step::Create(i, e) => {
                    let got = db.create("User", &props(i, e));
                    if model.contains_key(&i) {
                        prop_assert!(matches!(got, Err(DbError::Exists { .. })), "{got:?}");
                    } else if taken_by_other(&model, i, e) {
                        prop_assert!(matches!(got, Err(DbError::NotUnique { .. })), "{got:?}");
                    } else {
                        prop_assert!(got.is_ok(), "{got:?}");
                        model.insert(i, e);
                    }
                }
                Step::Update(i, e) => {
                    let got = db.update("User", &props(i, e));
                    if !model.contains_key(&i) {
                        prop_assert!(matches!(got, Err(DbError::NotFound { .. })), "{got:?}");
                    } else if taken_by_other(&model, i, e) {
                        prop_assert!(matches!(got, Err(DbError::NotUnique { .. })), "{got:?}");
                    } else {
                        prop_assert!(got.is_ok(), "{got:?}");
                        model.insert(i, e);
                    }
                }
                Step::Remove(i) => {
                    db.remove("User", &props(i, None)).unwrap();
                    model.remove(&i);
                }
            }
        }
        for (i, e) in &model {
            let got = db.get("User", &props(*i, None)).unwrap().unwrap();
            prop_assert_eq!(got.get("email").and_then(|v| v.as_str()).map(str::to_string), e.map(|e| format!("e{e}")));
        }
    }
}
