//! The store against a model: random sequences of transactions (committed or dropped, durable
//! or not), reopens (read-write and read-only), compactions and reads, on a file store and an
//! in-memory one; after every step the store must equal a `BTreeMap` of `BTreeMap`s, and every
//! read inside a transaction must equal the model with that transaction's changes applied.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;

use devtables_logstore::{LogError, LogOptions, LogStore};
use proptest::prelude::*;

type Model = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

const TABLES: [&str; 3] = ["a", "b", "items"];

#[derive(Clone, Debug)]
enum TxnOp {
    Insert(usize, Vec<u8>, Vec<u8>),
    /// `insert_absent`: an insert when the view lacks the key, a refusal when this
    /// transaction's own changes hold it. When only the committed state holds it (a caller's
    /// bug the store asserts against in debug builds only), the key is removed first, so that
    /// the removed-then-inserted path runs often.
    InsertAbsent(usize, Vec<u8>, Vec<u8>),
    Remove(usize, Vec<u8>),
    DeleteTable(usize),
    Get(usize, Vec<u8>),
    Len(usize),
    Range(usize, Bounds, bool, usize),
    Keys(usize, Bounds, usize),
    TableNames,
}

#[derive(Clone, Debug)]
struct Bounds {
    lower: Option<(Vec<u8>, bool)>,
    upper: Option<(Vec<u8>, bool)>,
}

impl Bounds {
    fn as_bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        fn bound(b: &Option<(Vec<u8>, bool)>) -> Bound<&[u8]> {
            match b {
                None => Bound::Unbounded,
                Some((key, true)) => Bound::Included(&key[..]),
                Some((key, false)) => Bound::Excluded(&key[..]),
            }
        }
        (bound(&self.lower), bound(&self.upper))
    }

    /// Whether `key` is in the range, by definition (no `BTreeMap::range`, which panics on
    /// some bounds the store must answer with nothing).
    fn holds(&self, key: &[u8]) -> bool {
        let above = match &self.lower {
            None => true,
            Some((low, true)) => key >= &low[..],
            Some((low, false)) => key > &low[..],
        };
        let below = match &self.upper {
            None => true,
            Some((high, true)) => key <= &high[..],
            Some((high, false)) => key < &high[..],
        };
        above && below
    }
}

#[derive(Clone, Debug)]
enum Step {
    Txn {
        ops: Vec<TxnOp>,
        commit: bool,
        durable: bool,
    },
    Reopen,
    ReopenReadOnly,
    Compact,
    CompactIfWorth,
    Read(usize, Bounds, bool),
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..4, 0..3)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    // Around the inline limit of the options below, so values live in RAM and in the file.
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..20),
        prop::collection::vec(any::<u8>(), 20..80),
    ]
}

fn bounds() -> impl Strategy<Value = Bounds> {
    let bound = || prop::option::of((key(), any::<bool>()));
    (bound(), bound()).prop_map(|(lower, upper)| Bounds { lower, upper })
}

fn txn_op() -> impl Strategy<Value = TxnOp> {
    let table = 0..TABLES.len();
    prop_oneof![
        6 => (table.clone(), key(), value()).prop_map(|(t, k, v)| TxnOp::Insert(t, k, v)),
        4 => (table.clone(), key(), value()).prop_map(|(t, k, v)| TxnOp::InsertAbsent(t, k, v)),
        3 => (table.clone(), key()).prop_map(|(t, k)| TxnOp::Remove(t, k)),
        1 => table.clone().prop_map(TxnOp::DeleteTable),
        2 => (table.clone(), key()).prop_map(|(t, k)| TxnOp::Get(t, k)),
        1 => table.clone().prop_map(TxnOp::Len),
        2 => (table.clone(), bounds(), any::<bool>(), 0usize..6)
            .prop_map(|(t, b, r, l)| TxnOp::Range(t, b, r, l)),
        1 => (table, bounds(), 0usize..6).prop_map(|(t, b, l)| TxnOp::Keys(t, b, l)),
        1 => Just(TxnOp::TableNames),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (prop::collection::vec(txn_op(), 0..12), prop::bool::weighted(0.85), any::<bool>())
            .prop_map(|(ops, commit, durable)| Step::Txn { ops, commit, durable }),
        2 => Just(Step::Reopen),
        1 => Just(Step::ReopenReadOnly),
        1 => Just(Step::Compact),
        1 => Just(Step::CompactIfWorth),
        2 => (0..TABLES.len(), bounds(), any::<bool>()).prop_map(|(t, b, r)| Step::Read(t, b, r)),
    ]
}

fn options() -> LogOptions {
    LogOptions {
        inline_value_bytes: 24,
        compact_min_file_bytes: 256,
        compact_ratio: 1.5,
        ..LogOptions::default()
    }
}

fn model_range(model: &Model, table: &str, bounds: &Bounds) -> Vec<(Vec<u8>, Vec<u8>)> {
    model.get(table).map_or_else(Vec::new, |entries| {
        entries
            .iter()
            .filter(|(k, _)| bounds.holds(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    })
}

/// The whole store equals the model (tables, lengths, every entry both ways, absent keys).
fn check_equal(store: &LogStore, model: &Model) -> Result<(), TestCaseError> {
    let read = store.read().unwrap();
    let names: Vec<String> = model.keys().cloned().collect();
    prop_assert_eq!(read.table_names(), names);
    for (name, entries) in model {
        let table = read.table(name).unwrap();
        prop_assert_eq!(table.len(), entries.len() as u64);
        let forward: Vec<(Vec<u8>, Vec<u8>)> = table
            .range((Bound::Unbounded, Bound::Unbounded))
            .map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())))
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<_> = entries
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        prop_assert_eq!(&forward, &expected);
        let backward: Vec<Vec<u8>> = table
            .keys((Bound::Unbounded, Bound::Unbounded))
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let expected_keys: Vec<Vec<u8>> = entries.keys().rev().cloned().collect();
        prop_assert_eq!(backward, expected_keys);
        for (k, v) in entries {
            let got = table.get(k).unwrap();
            prop_assert_eq!(got.as_deref(), Some(&v[..]));
        }
        prop_assert!(!table.contains(&[9, 9]));
    }
    for name in TABLES {
        if !model.contains_key(name) {
            prop_assert!(read.table(name).is_none());
        }
    }
    Ok(())
}

/// Runs one transaction's operations against the store and a copy of the model.
fn run_txn(
    store: &LogStore,
    model: &Model,
    ops: &[TxnOp],
    commit: bool,
    durable: bool,
) -> Result<Model, TestCaseError> {
    let mut txn = store.write().unwrap();
    let mut view = model.clone();
    let mut mutated = false;
    // Keys whose value in the view this transaction wrote (what `insert_absent` refuses).
    let mut written: BTreeSet<(usize, Vec<u8>)> = BTreeSet::new();
    for op in ops {
        match op {
            TxnOp::Insert(t, k, v) => {
                txn.insert(TABLES[*t], k, v).unwrap();
                view.entry(TABLES[*t].to_owned())
                    .or_default()
                    .insert(k.clone(), v.clone());
                written.insert((*t, k.clone()));
                mutated = true;
            }
            TxnOp::InsertAbsent(t, k, v) => {
                let present = view.get(TABLES[*t]).is_some_and(|e| e.contains_key(k));
                let own = written.contains(&(*t, k.clone()));
                if present && !own {
                    prop_assert!(txn.remove(TABLES[*t], k).unwrap());
                }
                if !present || !own {
                    txn.insert_absent(TABLES[*t], k.clone(), v.clone()).unwrap();
                    view.entry(TABLES[*t].to_owned())
                        .or_default()
                        .insert(k.clone(), v.clone());
                    written.insert((*t, k.clone()));
                    mutated = true;
                } else {
                    let refused = txn.insert_absent(TABLES[*t], k.clone(), v.clone());
                    prop_assert!(
                        matches!(refused, Err(LogError::KeyPresent { .. })),
                        "{:?}",
                        refused
                    );
                }
            }
            TxnOp::Remove(t, k) => {
                let was = view.get_mut(TABLES[*t]).and_then(|e| e.remove(k)).is_some();
                prop_assert_eq!(txn.remove(TABLES[*t], k).unwrap(), was);
                written.remove(&(*t, k.clone()));
                mutated |= was;
            }
            TxnOp::DeleteTable(t) => {
                let was = view.remove(TABLES[*t]).is_some();
                prop_assert_eq!(txn.delete_table(TABLES[*t]).unwrap(), was);
                written.retain(|(table, _)| table != t);
                mutated |= was;
            }
            TxnOp::Get(t, k) => {
                let expected = view.get(TABLES[*t]).and_then(|e| e.get(k)).cloned();
                prop_assert_eq!(txn.contains(TABLES[*t], k).unwrap(), expected.is_some());
                prop_assert_eq!(txn.get(TABLES[*t], k).unwrap(), expected);
            }
            TxnOp::Len(t) => {
                let expected = view.get(TABLES[*t]).map_or(0, |e| e.len() as u64);
                prop_assert_eq!(txn.len(TABLES[*t]).unwrap(), expected);
            }
            TxnOp::Range(t, bounds, reverse, limit) => {
                let mut expected = model_range(&view, TABLES[*t], bounds);
                if *reverse {
                    expected.reverse();
                }
                expected.truncate(*limit);
                let got = txn
                    .range(TABLES[*t], bounds.as_bounds(), *reverse, *limit)
                    .unwrap();
                prop_assert_eq!(got, expected);
            }
            TxnOp::Keys(t, bounds, limit) => {
                let mut expected: Vec<Vec<u8>> = model_range(&view, TABLES[*t], bounds)
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                expected.truncate(*limit);
                prop_assert_eq!(
                    txn.keys(TABLES[*t], bounds.as_bounds(), *limit).unwrap(),
                    expected
                );
            }
            TxnOp::TableNames => {
                let expected: Vec<String> = view.keys().cloned().collect();
                prop_assert_eq!(txn.table_names().unwrap(), expected);
            }
        }
    }
    // Only a transaction that changed nothing may say so, and one whose view differs from
    // the committed state must not.
    if !mutated {
        prop_assert!(txn.is_empty());
    }
    if view != *model {
        prop_assert!(!txn.is_empty());
    }
    if commit {
        txn.commit(durable).unwrap();
        Ok(view)
    } else {
        drop(txn);
        Ok(model.clone())
    }
}

fn run(steps: &[Step], path: Option<&Path>) -> Result<(), TestCaseError> {
    let open = || match path {
        Some(path) => LogStore::open(path, options()).unwrap(),
        None => LogStore::in_memory(options()),
    };
    let mut store = open();
    let mut model = Model::new();
    for step in steps {
        match step {
            Step::Txn {
                ops,
                commit,
                durable,
            } => model = run_txn(&store, &model, ops, *commit, *durable)?,
            Step::Reopen => {
                if path.is_some() {
                    let live_bytes = store.stats().live_bytes;
                    drop(store);
                    store = open();
                    // Replay counts from the file alone: the running count must agree.
                    prop_assert_eq!(store.stats().live_bytes, live_bytes);
                }
            }
            Step::ReopenReadOnly => {
                if let Some(path) = path {
                    drop(store);
                    let reader = LogStore::open_read_only(path, options()).unwrap();
                    check_equal(&reader, &model)?;
                    drop(reader);
                    store = open();
                }
            }
            Step::Compact => {
                let before = store.stats();
                store.compact().unwrap();
                if path.is_some() {
                    let after = store.stats();
                    prop_assert_eq!(after.compactions, before.compactions + 1);
                    prop_assert!(after.file_bytes <= before.file_bytes);
                }
            }
            Step::CompactIfWorth => {
                store.compact_if_worth().unwrap();
            }
            Step::Read(t, bounds, reverse) => {
                let read = store.read().unwrap();
                let mut expected = model_range(&model, TABLES[*t], bounds);
                let got: Vec<(Vec<u8>, Vec<u8>)> = match read.table(TABLES[*t]) {
                    None => Vec::new(),
                    Some(table) => {
                        let range = table.range(bounds.as_bounds());
                        let entries: Vec<_> = if *reverse {
                            range.rev().collect()
                        } else {
                            range.collect()
                        };
                        entries
                            .into_iter()
                            .map(|e| e.map(|(k, v)| (k.to_vec(), v.into_owned())))
                            .collect::<Result<_, _>>()
                            .unwrap()
                    }
                };
                if *reverse {
                    expected.reverse();
                }
                prop_assert_eq!(got, expected);
            }
        }
        check_equal(&store, &model)?;
        let stats = store.stats();
        let entries: usize = model.values().map(BTreeMap::len).sum();
        prop_assert_eq!(stats.entries, entries as u64);
    }
    // Whatever the steps, the file replays to the model.
    if path.is_some() {
        let live_bytes = store.stats().live_bytes;
        drop(store);
        let reopened = open();
        check_equal(&reopened, &model)?;
        prop_assert_eq!(reopened.stats().live_bytes, live_bytes);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn file_store_equals_the_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        run(&steps, Some(&dir.path().join("log")))?;
    }

    #[test]
    fn in_memory_store_equals_the_model(steps in prop::collection::vec(step(), 1..40)) {
        run(&steps, None)?;
    }
}
