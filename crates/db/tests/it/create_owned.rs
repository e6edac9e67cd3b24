//! `create_owned` (the input given away, the key returned) against `create`: the same stored
//! items, the same keys and the same errors, for random sequences of creates.

use std::sync::Arc;

use devtables_db::{Db, DbOptions, Durability};
use devtables_schema::Item;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::schema;

fn open() -> Db {
    let options = DbOptions {
        durability: Durability::Periodic {
            interval: std::time::Duration::from_secs(3600),
        },
        // One fixed instant: both databases stamp the same `created`/`updated`.
        clock: Arc::new(|| 1_795_629_600_000),
        ..DbOptions::default()
    };
    Db::open_in_memory(schema(), options).expect("an in-memory database opens")
}

/// A value of any kind, weighted to those the test schema's fields take.
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop::sample::select(vec!["a", "b", "ok", "fault", "bad", "7", "x\u{0}y", "", "Cfg"])
            .prop_map(|s| json!(s)),
        3 => (-3i32..3).prop_map(|n| json!(n)),
        1 => Just(json!(2.5)),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(json!({"k": 1})),
        1 => Just(json!("2026-11-25T18:00:00.000Z")),
    ]
}

/// A create input (no TTL: an expired item is not read back): some of its model's fields and values of any kind, the type field, a
/// timestamp or a key attribute now and then, rarely a field no model has.
fn input() -> impl Strategy<Value = (String, Item)> {
    let names = [
        "id", "deviceId", "value", "status", "note", "name", "pk", "_type", "created", "zzz",
    ];
    (
        prop::sample::select(vec!["Reading", "Cfg", "Cmd", "Nope"]),
        prop::collection::vec((value(), prop::bool::weighted(0.8)), names.len()),
        prop::collection::vec(prop::bool::weighted(0.1), 3),
        prop::option::weighted(0.6, 0u8..100),
    )
        .prop_map(move |(model, fields, rare, number)| {
            let schema = schema();
            let known = |name: &str| match name {
                "_type" => rare[0],
                "created" => rare[1],
                "zzz" => rare[2],
                _ => schema.model(model).is_some_and(|m| m.field(name).is_some()),
            };
            let mut item: Item = names
                .iter()
                .zip(fields)
                .filter(|(name, (_, present))| *present && known(name))
                .map(|(name, (v, _))| (name.to_string(), v))
                .collect();
            // Most readings get a valid value and their default status, so that most of them
            // are stored (random values alone fail the required number nearly always).
            if let (Some(n), "Reading") = (number, model) {
                item.insert("value".into(), json!(n));
                item.remove("status");
            }
            (model.to_string(), item)
        })
}

/// Applies `inputs` through `create` to one database and through `create_owned` to another;
/// returns how many creates succeeded.
fn compare(inputs: &[(String, Item)]) -> Result<usize, TestCaseError> {
    let (copying, owning) = (open(), open());
    let mut created = 0;
    for (model, input) in inputs {
        let copied = copying.create(model, input);
        let owned = owning.create_owned(model, input.clone());
        match (copied, owned) {
            (Ok(item), Ok(key)) => {
                created += 1;
                let stored = owning.read().unwrap().get_stored(&key).unwrap();
                let (stored_model, stored) = stored.expect("the returned key holds the item");
                prop_assert_eq!(&stored_model, model);
                // The item `create` returned is the stored one without its hidden fields.
                let schema = schema();
                let m = schema.model(model).unwrap();
                prop_assert_eq!(m.project(&stored, false), item);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
            (a, b) => prop_assert!(
                false,
                "create {a:?}, create_owned {b:?} of {model} {input:?}"
            ),
        }
    }
    // The same items in both, through their JSON form.
    for model in ["Reading", "Cfg"] {
        let a = copying.read().unwrap().scan_model(model).unwrap();
        let b = owning.read().unwrap().scan_model(model).unwrap();
        prop_assert_eq!(a, b);
    }
    Ok(created)
}

#[test]
fn a_create_by_value_stores_what_create_stores() {
    let created = std::cell::Cell::new(0);
    let mut runner = proptest::test_runner::TestRunner::default();
    let result = runner.run(&prop::collection::vec(input(), 1..24), |inputs| {
        created.set(created.get() + compare(&inputs)?);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Not a test that only ever compares two errors.
    assert!(created.get() > 50, "{} creates succeeded", created.get());
}
