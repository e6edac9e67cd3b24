//! Property test: random operation sequences against the database and a `BTreeMap` model.
//! Finds (with pagination in both directions), index queries, filters and reopen-after-close
//! must all agree with the model.

use std::collections::BTreeMap;

use devtables_db::{Db, DbError, DbOptions, FindOptions};
use proptest::prelude::*;
use serde_json::json;

use super::{item, key, open, reading};

const STATUSES: [&str; 3] = ["ok", "warn", "fault"];

#[derive(Clone, Debug)]
enum Step {
    Create(u8, i32, usize),
    Update(u8, i32),
    Upsert(u8, i32, usize),
    Remove(u8),
    Get(u8),
    FindPrefix {
        digit: u8,
        limit: usize,
        reverse: bool,
    },
    FindIndex {
        status: usize,
        limit: usize,
        reverse: bool,
    },
    FindFilter {
        min: i32,
        limit: usize,
    },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let id = 0u8..30;
    prop_oneof![
        4 => (id.clone(), -50i32..50, 0usize..3).prop_map(|(i, v, s)| Step::Create(i, v, s)),
        3 => (id.clone(), -50i32..50).prop_map(|(i, v)| Step::Update(i, v)),
        2 => (id.clone(), -50i32..50, 0usize..3).prop_map(|(i, v, s)| Step::Upsert(i, v, s)),
        2 => id.clone().prop_map(Step::Remove),
        2 => id.prop_map(Step::Get),
        1 => (0u8..3, 1usize..7, any::<bool>()).prop_map(|(digit, limit, reverse)| Step::FindPrefix { digit, limit, reverse }),
        1 => (0usize..3, 1usize..7, any::<bool>()).prop_map(|(status, limit, reverse)| Step::FindIndex { status, limit, reverse }),
        1 => (-50i32..50, 1usize..7).prop_map(|(min, limit)| Step::FindFilter { min, limit }),
        1 => Just(Step::Reopen),
    ]
}

fn id(i: u8) -> String {
    format!("{i:02}")
}

/// The typed form of a reading (`Db::get_as`, `Db::find_as`), which must agree with the JSON form.
#[derive(Debug, serde::Deserialize, PartialEq)]
struct Typed {
    id: String,
    value: f64,
    status: String,
}

/// Every page of a find, concatenated: (id, value) pairs; each page read in the typed form too
/// must hold the same items and the same `next`.
fn all_pages(db: &Db, props: serde_json::Value, mut opts: FindOptions) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    loop {
        let page = db
            .find("Reading", &item(props.clone()), &opts)
            .expect("find");
        let typed = db
            .find_as::<Typed>("Reading", &item(props.clone()), &opts)
            .expect("find_as");
        assert_eq!(typed.next, page.next);
        let as_typed: Vec<Typed> = page
            .items
            .iter()
            .map(|i| serde_json::from_value(serde_json::Value::Object(i.clone())).unwrap())
            .collect();
        assert_eq!(typed.items, as_typed);
        if let Some(limit) = opts.limit {
            assert!(page.items.len() <= limit);
        }
        for it in &page.items {
            out.push((
                it["id"].as_str().unwrap().to_string(),
                it["value"].as_f64().unwrap() as i64,
            ));
        }
        match page.next {
            Some(next) => opts.next = Some(next),
            None => return out,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn database_agrees_with_a_btreemap(steps in proptest::collection::vec(step(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let mut db = open(&path, DbOptions::default());
        let mut model: BTreeMap<String, (i64, usize)> = BTreeMap::new();
        for s in steps {
            match s {
                Step::Create(i, v, st) => {
                    let r = db.create("Reading", &reading(&id(i), v as f64, STATUSES[st]));
                    match model.entry(id(i)) {
                        std::collections::btree_map::Entry::Occupied(_) => {
                            prop_assert!(matches!(r, Err(DbError::Exists { .. })), "expected Exists, got {:?}", r);
                        }
                        std::collections::btree_map::Entry::Vacant(slot) => {
                            prop_assert!(r.is_ok());
                            slot.insert((v as i64, st));
                        }
                    }
                }
                Step::Update(i, v) => {
                    let mut patch = key(&id(i));
                    patch.insert("value".into(), json!(v));
                    let r = db.update("Reading", &patch);
                    match model.get_mut(&id(i)) {
                        Some(entry) => { prop_assert!(r.is_ok()); entry.0 = v as i64; }
                        None => prop_assert!(matches!(r, Err(DbError::NotFound { .. })), "expected NotFound, got {:?}", r),
                    }
                }
                Step::Upsert(i, v, st) => {
                    db.upsert("Reading", &reading(&id(i), v as f64, STATUSES[st])).unwrap();
                    model.insert(id(i), (v as i64, st));
                }
                Step::Remove(i) => {
                    let r = db.remove("Reading", &key(&id(i))).unwrap();
                    prop_assert_eq!(r.is_some(), model.remove(&id(i)).is_some());
                }
                Step::Get(i) => {
                    let got = db.get("Reading", &key(&id(i))).unwrap();
                    let typed = db.get_as::<Typed>("Reading", &key(&id(i))).unwrap();
                    prop_assert_eq!(
                        typed.map(|t| (t.id, t.value as i64, t.status)),
                        got.as_ref().map(|g| (id(i), g["value"].as_f64().unwrap() as i64, g["status"].as_str().unwrap().to_string()))
                    );
                    let got = got.map(|g| (g["value"].as_f64().unwrap() as i64, g["status"].as_str().unwrap().to_string()));
                    let want = model.get(&id(i)).map(|(v, s)| (*v, STATUSES[*s].to_string()));
                    prop_assert_eq!(got, want);
                }
                Step::FindPrefix { digit, limit, reverse } => {
                    let opts = FindOptions { limit: Some(limit), reverse, ..Default::default() };
                    let got = all_pages(&db, json!({"deviceId": "d1", "sk": {"begins": format!("r#{digit}")}}), opts);
                    let mut want: Vec<_> = model.iter()
                        .filter(|(k, _)| k.starts_with(&digit.to_string()))
                        .map(|(k, (v, _))| (k.clone(), *v)).collect();
                    if reverse { want.reverse(); }
                    prop_assert_eq!(got, want);
                }
                Step::FindIndex { status, limit, reverse } => {
                    let opts = FindOptions { limit: Some(limit), reverse, index: Some("gs1".into()), ..Default::default() };
                    let got = all_pages(&db, json!({"gs1pk": format!("status#{}", STATUSES[status])}), opts);
                    let mut want: Vec<_> = model.iter()
                        .filter(|(_, (_, s))| *s == status)
                        .map(|(k, (v, _))| (k.clone(), *v)).collect();
                    if reverse { want.reverse(); }
                    prop_assert_eq!(got, want);
                }
                Step::FindFilter { min, limit } => {
                    let opts = FindOptions { limit: Some(limit), ..Default::default() };
                    let got = all_pages(&db, json!({"deviceId": "d1", "value": {">=": min}}), opts);
                    let want: Vec<_> = model.iter()
                        .filter(|(_, (v, _))| *v >= min as i64)
                        .map(|(k, (v, _))| (k.clone(), *v)).collect();
                    prop_assert_eq!(got, want);
                }
                Step::Reopen => {
                    db.close().unwrap();
                    db = open(&path, DbOptions::default());
                }
            }
        }
    }
}
