//! `get_view` (the borrowed, lazily decoded item view) against `get`: for random items of a
//! model with a field of every type, hidden fields, dates, nested objects and absent or null
//! fields, the view shows exactly the JSON form, field by field and whole.

use std::sync::Arc;

use devtables_db::{Db, DbError, DbOptions, FieldRef};
use devtables_schema::{format_iso_ms, Item, Schema};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::{item, key, reading};

const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {primary: {hash: 'pk', sort: 'sk'}},
    params: {timestamps: true, isoDates: true},
    models: {
        All: {
            pk: {type: 'string', value: 'all#${id}'},
            sk: {type: 'string', value: 'all#'},
            id: {type: 'string', required: true},
            s: {type: 'string'},
            n: {type: 'number'},
            b: {type: 'boolean'},
            d: {type: 'date'},
            o: {type: 'object'},
            a: {type: 'array'},
            bin: {type: 'binary'},
            secret: {type: 'string', hidden: true},
            label: {type: 'string', value: 'label-${id}'},
        },
        Num: {
            pk: {type: 'string', value: 'num#${id}'},
            sk: {type: 'string', value: 'num#'},
            id: {type: 'string', required: true},
            until: {type: 'number', ttl: true},
        },
        Hid: {
            pk: {type: 'string', value: 'hid#${id}'},
            sk: {type: 'string', value: 'hid#'},
            id: {type: 'string', required: true},
            until: {type: 'date', ttl: true, hidden: true},
        },
    },
}"#;

fn open() -> Db {
    let schema = Arc::new(Schema::from_json5(SCHEMA).expect("schema loads"));
    let options = DbOptions {
        clock: Arc::new(|| 1_795_629_600_000),
        ..DbOptions::default()
    };
    Db::open_in_memory(schema, options).expect("an in-memory database opens")
}

fn date() -> impl Strategy<Value = String> {
    (-62_167_219_200_000i64..253_402_300_799_999).prop_map(|ms| format_iso_ms(ms).unwrap())
}

/// Any JSON value, dates and date-like strings among the strings.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z\u{e9}\u{0}\"\\\\]{0,8}".prop_map(Value::String),
        date().prop_map(Value::String),
        Just(json!("2026-11-25T18:00:00Z")),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,4}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A create input: the key, then each other field absent, null, or a value of its type (and
/// now and then of any type, which the cast may refuse).
fn input() -> impl Strategy<Value = Item> {
    let opt = |s: BoxedStrategy<Value>| {
        prop_oneof![
            3 => Just(None),
            1 => Just(Some(Value::Null)),
            6 => s.prop_map(Some),
            1 => json_value().prop_map(Some),
        ]
    };
    (
        "[a-z0-9]{1,6}",
        opt("[a-zA-Z \u{e9}\u{1f600}]{0,10}"
            .prop_map(Value::String)
            .boxed()),
        opt(prop_oneof![
            any::<u32>().prop_map(|n| json!(n)),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e9f64..1e9).prop_map(|f| json!(f)),
        ]
        .boxed()),
        opt(any::<bool>().prop_map(Value::Bool).boxed()),
        opt(date().prop_map(Value::String).boxed()),
        opt(
            prop::collection::btree_map("[a-z]{0,4}", json_value(), 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
                .boxed(),
        ),
        opt(prop::collection::vec(json_value(), 0..5)
            .prop_map(Value::Array)
            .boxed()),
        opt(Just(json!("AAEC")).boxed()),
        opt("[a-z]{0,6}".prop_map(Value::String).boxed()),
    )
        .prop_map(|(id, s, n, b, d, o, a, bin, secret)| {
            let mut item = Item::new();
            item.insert("id".into(), json!(id));
            for (name, value) in [
                ("s", s),
                ("n", n),
                ("b", b),
                ("d", d),
                ("o", o),
                ("a", a),
                ("bin", bin),
                ("secret", secret),
            ] {
                if let Some(value) = value {
                    item.insert(name.into(), value);
                }
            }
            item
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// The view equals the JSON form whole (`to_item`), field by field (`fields`, `get`), with
    /// and without hidden fields.
    #[test]
    fn the_view_shows_exactly_the_json_form(inputs in prop::collection::vec(input(), 1..6)) {
        let db = open();
        for input in &inputs {
            // Inputs the cast refuses are left out; the same key twice keeps the first.
            let _ = db.create("All", input);
        }
        let r = db.read().unwrap();
        for input in &inputs {
            let key = item(json!({"id": input["id"]}));
            for hidden in [false, true] {
                let got = r.get("All", &key, hidden).unwrap();
                let view = r.get_view("All", &key, hidden).unwrap();
                let (Some(got), Some(view)) = (got, view) else {
                    prop_assert!(r.get("All", &key, hidden).unwrap().is_none());
                    prop_assert!(r.get_view("All", &key, hidden).unwrap().is_none());
                    continue;
                };
                prop_assert_eq!(&view.to_item(), &got);
                // The key as (name, text) pairs instead of an item: the same view.
                let id = input["id"].as_str().unwrap();
                let by = r.get_view_by("All", &[("id", id)], hidden).unwrap();
                prop_assert_eq!(by.map(|v| v.to_item()), Some(got.clone()));
                let names: Vec<&str> = view.fields().map(|(name, _)| name).collect();
                let expected: Vec<&str> = got.keys().map(String::as_str).collect();
                prop_assert_eq!(names, expected);
                for (name, value) in view.fields() {
                    prop_assert_eq!(&value.to_value(), &got[name]);
                    prop_assert_eq!(view.get(name), Some(value));
                }
                prop_assert_eq!(view.get("secret").is_some(), hidden && got.contains_key("secret"));
                prop_assert_eq!(view.get("label").is_some(), hidden);
                prop_assert_eq!(view.get("nope"), None);
                prop_assert_eq!(view.pk(), format!("all#{}", input["id"].as_str().unwrap()));
                // The dates are dates, read in place, spelled as the JSON form spells them.
                for name in ["created", "updated"] {
                    let date = view.get(name).and_then(|v| v.as_date());
                    prop_assert_eq!(date.map(|d| d.epoch_ms()), Some(1_795_629_600_000));
                    prop_assert_eq!(date.map(|d| d.to_string()), got[name].as_str().map(String::from));
                }
                if let Some(db_get) = (!hidden).then(|| db.get_view("All", &key).unwrap()) {
                    prop_assert_eq!(db_get.map(|v| v.to_item()), Some(got.clone()));
                }
            }
        }
    }
}

/// A TTL value of any kind near the test clock's instant (seconds 1_795_629_600).
fn ttl_value() -> impl Strategy<Value = Value> {
    let now_s = 1_795_629_600i64;
    prop_oneof![
        (-5i64..5).prop_map(move |d| json!(now_s + d)),
        (-5.0f64..5.0).prop_map(move |d| json!(now_s as f64 + d)),
        (-5_000i64..5_000).prop_map(move |d| json!(format_iso_ms(now_s * 1000 + d).unwrap())),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1e300)),
        Just(json!("2026-11-25T18:00:00Z")),
        Just(json!("2026-11-25")),
        Just(json!("not a date")),
        Just(json!(true)),
        Just(json!([1])),
    ]
}

proptest! {
    /// Expiry read from the view (no map) hides exactly the items `get` hides, for a number
    /// and a hidden date TTL field and values of every kind.
    #[test]
    fn the_view_expires_what_get_expires(values in prop::collection::vec(ttl_value(), 1..8)) {
        let db = open();
        let r = db.read().unwrap();
        for (i, value) in values.iter().enumerate() {
            for model in ["Num", "Hid"] {
                let id = format!("{model}{i}");
                let _ = db.create(model, &item(json!({"id": id, "until": value})));
                let key = item(json!({"id": id}));
                for hidden in [false, true] {
                    let got = r.get(model, &key, hidden).unwrap();
                    let view = r.get_view(model, &key, hidden).unwrap();
                    prop_assert_eq!(view.map(|v| v.to_item()), got, "{} {}", model, value);
                }
            }
        }
    }
}

#[test]
fn strings_are_lent_from_the_record_and_the_key() {
    let db = open();
    db.create(
        "All",
        &item(json!({"id": "x1", "s": "text", "o": {"k": ["v", 2]}})),
    )
    .unwrap();
    let view = db
        .get_view("All", &item(json!({"id": "x1"})))
        .unwrap()
        .unwrap();
    assert_eq!(view.get("s").and_then(|v| v.as_str()), Some("text"));
    assert_eq!(view.get("id").and_then(|v| v.as_str()), Some("x1"));
    let Some(FieldRef::Object(o)) = view.get("o") else {
        panic!("an object")
    };
    let Some(FieldRef::Array(a)) = o.get("k") else {
        panic!("an array")
    };
    let elements: Vec<FieldRef<'_>> = a.iter().collect();
    assert_eq!(elements, [FieldRef::Str("v"), FieldRef::U64(2)]);
    let r = db.read().unwrap();
    let with_hidden = r
        .get_view("All", &item(json!({"id": "x1"})), true)
        .unwrap()
        .unwrap();
    // pk and sk are left out of the stored bytes: lent from the key.
    assert_eq!(with_hidden.get("pk"), Some(FieldRef::Str("all#x1")));
    assert_eq!(with_hidden.get("sk"), Some(FieldRef::Str("all#")));
    assert_eq!(with_hidden.get("label"), Some(FieldRef::Str("label-x1")));
}

#[test]
fn absent_expired_and_unknown_are_answered_as_get_answers_them() {
    let db = Db::open_in_memory(
        super::schema(),
        DbOptions {
            clock: Arc::new(|| 1_795_629_600_000),
            ..DbOptions::default()
        },
    )
    .unwrap();
    db.create("Reading", &reading("live", 1.0, "ok")).unwrap();
    let mut old = reading("old", 2.0, "ok");
    old.insert("expires".into(), json!("2026-01-01T00:00:00.000Z"));
    db.create("Reading", &old).unwrap();
    assert!(db.get_view("Reading", &key("live")).unwrap().is_some());
    assert!(db.get("Reading", &key("old")).unwrap().is_none());
    assert!(
        db.get_view("Reading", &key("old")).unwrap().is_none(),
        "expired"
    );
    assert!(db.get_view("Reading", &key("none")).unwrap().is_none());
    assert!(matches!(
        db.get_view("Nope", &key("live")),
        Err(DbError::UnknownModel(_))
    ));
    assert!(db.get("Reading", &item(json!({"id": "live"}))).is_err());
    assert!(db
        .get_view("Reading", &item(json!({"id": "live"})))
        .is_err());
    let live = [("deviceId", "d1"), ("id", "live")];
    assert!(db.get_view_by("Reading", &live).unwrap().is_some());
    assert!(db
        .get_view_by("Reading", &[("deviceId", "d1"), ("id", "old")])
        .unwrap()
        .is_none());
    assert!(db.get_view_by("Reading", &[("id", "live")]).is_err());
    assert!(db
        .get_view_by("Reading", &[("deviceId", "d\u{0}"), ("id", "x")])
        .is_err());
}
