//! The contract of [`CloudStore`] itself, checked against every store the service can run on:
//! SQLite (a file, with a second connection for what a check reads or breaks behind the store)
//! and PostgreSQL (a fresh schema per check; a service test). Each check is one function of
//! this file, run once per store by [`contract!`] (`store_contract::sqlite::<check>` and
//! `store_contract::postgres::<check>`): the device registry, revocation and rotation, API keys,
//! pushes (drift, idempotence, conflicts, ownership, the row's model), API writes and their
//! errors, feeds and snapshots, broadcast fan-out, retention and purge watermarks, item queries
//! with filters and pages, the change log's pages and the webhooks' cursors.
//!
//! What only one store has (SQLite's file layouts and damaged files, PostgreSQL's concurrency
//! and reconnects) stays with that store: `crates/cloud/src/store/sqlite/tests.rs`, and
//! `postgres.rs` beside this file.

use std::cell::{Cell, RefCell};
use std::ops::{Deref, DerefMut};

use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::{
    Advanced, ChangeEvent, ChangeOp, ChangePage, ChangeQuery, ChangeRead, ChangeRetention,
    CloudStore, DeviceQuotas, DeviceRecord, ItemPage, ItemQuery, KeyScope, NewWebhook, PurgeStats,
    Retention, StatusUpdate, StoreError, WebhookAttempt, REVOKED_SECRET_HASH,
};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{CloudOp, CloudWriteError, PushRules};
use devtables_sync::cloud::SnapshotCursor;
use devtables_sync::hlc::{node_id_for, Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{hlc_to_string, Change, ChangeStatus, Op, RejectReason};
use serde_json::json;

use super::pg::TestSchema;
use super::services_gate::services_on;

pub const NOW: u64 = 1_795_629_600_000;
pub const MAX_MSG: usize = 128 * 1024;
pub const DRIFT: u64 = 60_000;
/// The push rules of these checks: [`DRIFT`], no neighbouring schema.
pub const RULES: &PushRules = &PushRules {
    max_drift_ms: DRIFT,
    from_neighbour: false,
    cloud_schema: String::new(),
};

/// Which store the checks of this thread run on (each test runs on a thread of its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

thread_local! {
    static BACKEND: Cell<Backend> = const { Cell::new(Backend::Sqlite) };
}

/// Runs `check` on `backend`'s stores; a PostgreSQL check is skipped (with its `SKIPPED` line)
/// unless the service tests are on.
pub fn on(backend: Backend, check: fn()) {
    if backend == Backend::Postgres && !services_on() {
        return;
    }
    BACKEND.with(|b| b.set(backend));
    check();
}

/// A second way into the store's database, for what a check reads or breaks behind the store.
enum Raw {
    Sqlite(rusqlite::Connection),
    Postgres(::postgres::Client),
}

/// A store under a check: it derefs to the store; [`Subject::sql`] and [`Subject::count`] go
/// to its database directly. Dropped in field order: the store, the raw connection, then what
/// holds the database (a directory, a schema).
pub struct Subject {
    store: Box<dyn CloudStore>,
    raw: RefCell<Raw>,
    _keep: Box<dyn std::any::Any>,
}

impl Deref for Subject {
    type Target = dyn CloudStore;
    fn deref(&self) -> &(dyn CloudStore + 'static) {
        &*self.store
    }
}

impl DerefMut for Subject {
    fn deref_mut(&mut self) -> &mut (dyn CloudStore + 'static) {
        &mut *self.store
    }
}

impl Subject {
    /// Runs SQL (the same text on both stores) behind the store; the rows it changed.
    pub fn sql(&self, text: &str) -> Result<u64, String> {
        match &mut *self.raw.borrow_mut() {
            Raw::Sqlite(c) => c
                .execute(text, [])
                .map(|n| n as u64)
                .map_err(|e| e.to_string()),
            Raw::Postgres(c) => c.execute(text, &[]).map_err(|e| e.to_string()),
        }
    }

    /// The rows of a query whose one column is text (the same SQL on both stores: build it
    /// with `||` and `CAST(... AS TEXT)`), sorted.
    pub fn texts(&self, text: &str) -> Vec<String> {
        let mut rows: Vec<String> = match &mut *self.raw.borrow_mut() {
            Raw::Sqlite(c) => {
                let mut st = c.prepare(text).unwrap();
                let rows = st.query_map([], |r| r.get(0)).unwrap();
                rows.collect::<Result<_, _>>().unwrap()
            }
            Raw::Postgres(c) => c
                .query(text, &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect(),
        };
        rows.sort();
        rows
    }

    /// The one integer a `SELECT count(*) ...` answers.
    pub fn count(&self, text: &str) -> i64 {
        match &mut *self.raw.borrow_mut() {
            Raw::Sqlite(c) => c.query_row(text, [], |r| r.get(0)).unwrap(),
            Raw::Postgres(c) => c.query_one(text, &[]).unwrap().get(0),
        }
    }
}

/// A fresh store of this thread's backend with `quotas`.
pub fn open(quotas: DeviceQuotas) -> Subject {
    match BACKEND.with(Cell::get) {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("cloud.db");
            let options = SqliteOptions {
                quotas,
                synchronous_full: false,
                ..SqliteOptions::default()
            };
            let store = SqliteStore::open(&path, options).unwrap();
            Subject {
                store: Box::new(store),
                raw: RefCell::new(Raw::Sqlite(rusqlite::Connection::open(&path).unwrap())),
                _keep: Box::new(dir),
            }
        }
        Backend::Postgres => {
            let schema = TestSchema::fresh().expect("the service tests are on");
            let mut options = schema.options();
            options.quotas = quotas;
            let store = schema.store_with(options);
            let mut raw = super::pg::client();
            raw.batch_execute(&format!("SET search_path TO \"{}\"", schema.name))
                .unwrap();
            Subject {
                store: Box::new(store),
                raw: RefCell::new(Raw::Postgres(raw)),
                _keep: Box::new(schema),
            }
        }
    }
}

/// A fresh store with default quotas and `devices` registered.
pub fn store(devices: &[&DeviceId]) -> Subject {
    let mut s = open(DeviceQuotas::default());
    for d in devices {
        s.register_device(d, "hash", None, NOW).unwrap();
    }
    s
}

/// Every check, once per store.
macro_rules! contract {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $check() { super::on(super::Backend::Sqlite, super::$check) })*
        }
        mod postgres {
            $(#[test] fn $check() { super::on(super::Backend::Postgres, super::$check) })*
        }
    };
}

contract!(
    a_version_beyond_the_drift_bound_is_refused_and_moves_no_clock,
    a_change_may_only_touch_rows_of_its_own_model,
    every_write_meets_the_purge_watermark,
    a_restored_devices_losing_write_is_logged_but_a_late_duplicate_is_not,
    push_is_idempotent_and_stale_writes_lose_with_a_conflict,
    push_naming_another_device_is_rejected_and_not_stored,
    push_from_an_unregistered_device_fails_whole,
    two_devices_writing_one_key_get_separate_rows,
    api_write_advances_the_feed_and_coalesces,
    feed_pages_respect_the_limit,
    new_device_starts_with_a_resync,
    broadcast_write_fans_out_to_the_account_only,
    delete_then_purge_raises_the_floor,
    purge_trims_the_conflict_log_per_account,
    a_purge_in_batches_keeps_every_mark_and_ends_where_one_purge_ends,
    a_change_log_purge_in_batches_ends_where_one_purge_ends,
    snapshot_pages_return_every_down_item_once,
    query_items_filters_and_pages,
    api_write_errors,
    devices_register_status_and_ack,
    only_devices_unseen_since_a_time_are_marked_offline,
    the_broker_hash_is_set_at_registration_and_rotation_and_removed_at_revocation,
    api_keys_are_created_listed_revoked_and_looked_up_per_account,
    a_revoked_device_keeps_its_rows_and_its_pushes_are_refused_until_rotated,
    revoking_with_delete_items_removes_only_that_devices_rows_and_feed,
    corrupt_rows_are_reported,
    every_row_write_appends_one_change_in_commit_order_with_its_item,
    pages_hold_at_most_limit_and_filters_move_the_cursor_past_what_they_examined,
    a_webhook_starts_at_the_head_and_its_cursor_moves_only_forward_on_success_or_skip,
);

/// Shared with the SQLite store's unit tests.
const SCHEMA: &str = include_str!("../store_schema.json5");

pub fn schema() -> Schema {
    Schema::from_json5(SCHEMA).unwrap()
}

pub fn dev(account: &str, device: &str) -> DeviceId {
    DeviceId::new(account, device).unwrap()
}

pub fn clock() -> HlcClock {
    HlcClock::new(node_id_for("cloud"))
}

pub fn item(schema: &Schema, model: &str, input: serde_json::Value) -> Item {
    let input = input.as_object().cloned().unwrap();
    schema
        .model(model)
        .unwrap()
        .prepare_create(&input, NOW as i64)
        .unwrap()
}

pub fn ver(wall_ms: u64, node: u64) -> Hlc {
    Hlc {
        wall_ms,
        counter: 0,
        node,
    }
}

pub fn put(schema: &Schema, model: &str, input: serde_json::Value, version: Hlc) -> Change {
    let item = item(schema, model, input);
    let key = schema.model(model).unwrap().primary_key(&item).unwrap();
    Change {
        model: model.into(),
        key,
        op: Op::Put,
        item: Some(item),
        version,
        base: None,
    }
}

pub fn api_put(
    s: &mut Subject,
    schema: &Schema,
    clock: &mut HlcClock,
    now: u64,
    owner: &Owner,
    model: &str,
    input: serde_json::Value,
) -> (Change, Advanced) {
    let it = item(schema, model, input);
    s.write(schema, clock, now, MAX_MSG, owner, model, CloudOp::Put(it))
        .unwrap()
}

fn query(model: &str) -> ItemQuery {
    ItemQuery {
        account: "a".into(),
        model: model.into(),
        limit: 100,
        ..Default::default()
    }
}

fn sks(page: &ItemPage) -> Vec<String> {
    page.items.iter().map(|i| i.sk.clone()).collect()
}

/// Rows of `table` owned by `d`, as the database holds them.
fn rows_of(s: &Subject, table: &str, d: &DeviceId) -> i64 {
    s.count(&format!(
        "SELECT count(*) FROM {table} WHERE account = '{}' AND device = '{}'",
        d.account, d.device
    ))
}

fn key(pk: &str, sk: &str) -> ItemKey {
    ItemKey {
        pk: pk.into(),
        sk: sk.into(),
    }
}

fn change_query(account: &str, after: u64) -> ChangeQuery {
    ChangeQuery {
        account: account.into(),
        after,
        model: None,
        device: None,
        limit: 1000,
        scan: 100_000,
    }
}

fn page(s: &mut Subject, q: &ChangeQuery) -> ChangePage {
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

/// (op, device, model, sk, item's `v`) of one change: what a reader learns.
type Seen<'a> = (ChangeOp, Option<&'a str>, &'a str, &'a str, Option<i64>);

fn seen(changes: &[ChangeEvent]) -> Vec<Seen<'_>> {
    changes
        .iter()
        .map(|c| {
            (
                c.op,
                c.device.as_deref(),
                c.model.as_str(),
                c.key.sk.as_str(),
                c.item
                    .as_ref()
                    .and_then(|i| i.get("v"))
                    .and_then(|v| v.as_i64()),
            )
        })
        .collect()
}

fn del(change: &Change, version: Hlc) -> Change {
    Change {
        op: Op::Delete,
        item: None,
        version,
        base: Some(change.version),
        ..change.clone()
    }
}

fn a_version_beyond_the_drift_bound_is_refused_and_moves_no_clock() {
    let (schema, d1) = (schema(), dev("a", "d1"));
    let mut s = store(&[&d1]);
    let mut c = clock();
    let ten_hours = 10 * 3_600_000;
    let ahead = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 1}),
        ver(NOW + ten_hours, 7),
    );
    let (r, adv) = s
        .apply_push(
            &schema,
            &mut c,
            NOW,
            RULES,
            &d1,
            std::slice::from_ref(&ahead),
        )
        .unwrap();
    assert_eq!(
        r[0].status,
        ChangeStatus::Rejected {
            reason: RejectReason::VersionAhead {
                cloud_ms: NOW,
                max_drift_ms: DRIFT
            }
        }
    );
    assert!(adv.is_empty());
    assert!(
        c.last().wall_ms <= NOW,
        "the refused version moved the cloud clock"
    );
    assert_eq!(s.max_version().unwrap(), None, "nothing stored");
    // An API write right after is stamped on the cloud's own time.
    let (w, _) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &Owner::Device(d1.clone()),
        "Both",
        json!({"deviceId": "d1", "name": "m"}),
    );
    assert_eq!(w.version.wall_ms, NOW);
    // Exactly at the bound is accepted, and counted.
    let edge = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 2}),
        ver(NOW + DRIFT, 7),
    );
    let (r, _) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, &[edge])
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    let rec = s.device(&d1).unwrap().unwrap();
    assert_eq!((rec.changes_applied, rec.changes_rejected), (1, 1));
}

fn a_change_may_only_touch_rows_of_its_own_model() {
    let (schema, d1) = (schema(), dev("a", "d1"));
    let mut s = store(&[&d1]);
    let mut c = clock();
    let up = put(
        &schema,
        "Up",
        json!({"deviceId": "d1", "name": "n"}),
        ver(NOW, 7),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, std::slice::from_ref(&up))
        .unwrap();
    // Both's template produces the same key as Up's: the live Up row is not Both's.
    let both = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n"}),
        ver(NOW + 1, 7),
    );
    let mut del_both = both.clone();
    del_both.op = Op::Delete;
    del_both.item = None;
    // A delete under Up of a key only Shared's template produces.
    let shared_key = Change {
        model: "Up".into(),
        key: key("n#", "x#n"),
        op: Op::Delete,
        item: None,
        version: ver(NOW + 1, 7),
        base: None,
    };
    let (r, _) = s
        .apply_push(
            &schema,
            &mut c,
            NOW,
            RULES,
            &d1,
            &[both, del_both, shared_key],
        )
        .unwrap();
    let statuses: Vec<_> = r.into_iter().map(|r| r.status).collect();
    let wrong = ChangeStatus::Rejected {
        reason: RejectReason::WrongModel {
            stored: "Up".into(),
        },
    };
    assert_eq!(
        statuses,
        vec![
            wrong.clone(),
            wrong,
            ChangeStatus::Rejected {
                reason: RejectReason::KeyNotOfModel
            }
        ]
    );
    let row = s
        .get_item(&Owner::Device(d1.clone()), "Up", &up.key)
        .unwrap()
        .unwrap();
    assert_eq!(row.version, up.version, "the Up row is untouched");
    // The API cannot create a Both item over the Up row either.
    let it = item(&schema, "Both", json!({"deviceId": "d1", "name": "n"}));
    let e = s
        .write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &Owner::Device(d1.clone()),
            "Both",
            CloudOp::Put(it),
        )
        .unwrap_err();
    assert!(
        matches!(&e, CloudWriteError::WrongModel { stored, .. } if stored == "Up"),
        "{e}"
    );
    let e = s
        .write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &Owner::Device(d1.clone()),
            "Both",
            CloudOp::Delete(key("n#", "x#n")),
        )
        .unwrap_err();
    assert!(matches!(e, CloudWriteError::KeyNotOfModel { .. }), "{e}");
    assert_eq!(s.device(&d1).unwrap().unwrap().changes_rejected, 3);
}

fn every_write_meets_the_purge_watermark() {
    let (schema, d1) = (schema(), dev("a", "d1"));
    let mut s = store(&[&d1]);
    let mut c = clock();
    let owner = Owner::Device(d1.clone());
    // The device created the item, the cloud deleted it later, retention purged the delete.
    let v1 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 1}),
        ver(NOW, 7),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, std::slice::from_ref(&v1))
        .unwrap();
    let (del, _) = s
        .write(
            &schema,
            &mut c,
            NOW + 100,
            MAX_MSG,
            &owner,
            "Both",
            CloudOp::Delete(v1.key.clone()),
        )
        .unwrap();
    let later = NOW + 1000;
    let stats = s
        .purge(
            later,
            &Retention {
                tombstone_ms: 10,
                max_conflicts: 100,
                batch: Retention::DEFAULT_BATCH,
            },
        )
        .unwrap();
    assert_eq!(stats.tombstones, 1);
    assert_eq!(s.get_item(&owner, "Both", &v1.key).unwrap(), None, "purged");
    // The offline device's pending edit, older than the delete, must not resurrect it.
    let mut v2 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 2}),
        ver(NOW + 50, 7),
    );
    v2.base = Some(v1.version);
    let (r, _) = s
        .apply_push(
            &schema,
            &mut c,
            later,
            RULES,
            &d1,
            std::slice::from_ref(&v2),
        )
        .unwrap();
    assert_eq!(
        r[0].status,
        ChangeStatus::Stale {
            winner: del.version
        }
    );
    // The delete that won is back in the feed, so the device converges.
    let head = s.device(&d1).unwrap().unwrap().feed_head;
    let page = s.read_feed(&d1, head - 1, 10).unwrap();
    assert_eq!(page.changes.len(), 1);
    assert_eq!(
        (page.changes[0].1.op, page.changes[0].1.version),
        (Op::Delete, del.version)
    );
    assert_eq!(
        s.conflicts("a", None, 10).unwrap().len(),
        1,
        "the lost edit is logged"
    );
    // A create (no base) below the watermark loses too: it may be a create whose ack was lost,
    // resent after the delete of its key was purged. Visibly: stale, with the watermark.
    let resent = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "new"}),
        ver(NOW + 60, 7),
    );
    let (r, _) = s
        .apply_push(
            &schema,
            &mut c,
            later,
            RULES,
            &d1,
            std::slice::from_ref(&resent),
        )
        .unwrap();
    assert_eq!(
        r[0].status,
        ChangeStatus::Stale {
            winner: del.version
        }
    );
    assert_eq!(
        s.device(&d1).unwrap().unwrap().changes_superseded,
        2,
        "both losses are counted"
    );
    // One above the watermark is created.
    let fresh = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "new2"}),
        ver(NOW + 150, 7),
    );
    let (r, _) = s
        .apply_push(&schema, &mut c, later, RULES, &d1, &[fresh])
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    // An edit newer than the delete wins, as it would against the tombstone.
    let mut v3 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 3}),
        ver(NOW + 200, 7),
    );
    v3.base = Some(v1.version);
    let (r, _) = s
        .apply_push(&schema, &mut c, later, RULES, &d1, &[v3])
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    let rec = s.device(&d1).unwrap().unwrap();
    assert_eq!((rec.changes_applied, rec.changes_superseded), (3, 2));
}

fn a_restored_devices_losing_write_is_logged_but_a_late_duplicate_is_not() {
    let (schema, d1) = (schema(), dev("a", "d1"));
    let mut s = store(&[&d1]);
    let mut c = clock();
    let v1 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 1}),
        ver(NOW + 1, 7),
    );
    let mut v2 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 2}),
        ver(NOW + 2, 7),
    );
    v2.base = Some(v1.version);
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, &[v1.clone(), v2.clone()])
        .unwrap();
    // The network delivers the first write again: it lost to its own successor, no conflict.
    let (r, _) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, std::slice::from_ref(&v1))
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Stale { winner: v2.version });
    assert!(s.conflicts("a", None, 10).unwrap().is_empty());
    // The device is restored from a backup taken before it ever synced the key, and writes
    // it again with a clock behind its lost writes: it loses, and the regression is logged.
    let v2b = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 9}),
        Hlc {
            wall_ms: NOW + 1,
            counter: 5,
            node: 7,
        },
    );
    let (r, _) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, &[v2b])
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Stale { winner: v2.version });
    let log = s.conflicts("a", None, 10).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].lost, "incoming");
}

fn push_is_idempotent_and_stale_writes_lose_with_a_conflict() {
    let (schema, d1) = (schema(), dev("a", "d1"));
    let mut s = store(&[&d1]);
    let mut c = clock();
    let v2 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 2}),
        ver(NOW + 2, 7),
    );
    let (r, adv) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, std::slice::from_ref(&v2))
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    assert_eq!(adv, vec![(d1.clone(), 2)]);
    let (r, adv) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, std::slice::from_ref(&v2))
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    assert!(adv.is_empty(), "a replay writes nothing");
    assert!(s.conflicts("a", None, 10).unwrap().is_empty());

    let v1 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 1}),
        ver(NOW + 1, 8),
    );
    let (r, _) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, &[v1])
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Stale { winner: v2.version });
    let stored = s
        .get_item(&Owner::Device(d1.clone()), "Both", &v2.key)
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.item.as_ref().unwrap()["v"].clone(), stored.version),
        (json!(2), v2.version)
    );
    let log = s.conflicts("a", None, 10).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (
            log[0].lost.as_str(),
            log[0].winner.clone(),
            log[0].loser.clone(),
            log[0].device.as_deref()
        ),
        (
            "incoming",
            hlc_to_string(ver(NOW + 2, 7)),
            hlc_to_string(ver(NOW + 1, 8)),
            Some("d1")
        )
    );
    assert_eq!(log[0].loser_item.as_ref().unwrap()["v"], json!(1));

    // A newer write from another node that did not see v2: the stored item loses, logged.
    let v3 = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n", "v": 3}),
        ver(NOW + 3, 9),
    );
    let (r, _) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, &[v3])
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    let log = s.conflicts("a", None, 10).unwrap();
    assert_eq!(log.len(), 2);
    assert!(log[0].id > log[1].id, "newest first");
    assert_eq!(log[0].lost, "stored");
    assert_eq!(log[0].loser_item.as_ref().unwrap()["v"], json!(2));
    assert_eq!(
        s.conflicts("a", Some(log[0].id), 10).unwrap(),
        vec![log[1].clone()]
    );
    assert!(s.conflicts("b", None, 10).unwrap().is_empty());
}

fn push_naming_another_device_is_rejected_and_not_stored() {
    let (schema, d1) = (schema(), dev("a", "d1"));
    let mut s = store(&[&d1, &dev("a", "d2")]);
    let ch = put(
        &schema,
        "Up",
        json!({"deviceId": "d2", "name": "n"}),
        ver(NOW, 7),
    );
    let (r, adv) = s
        .apply_push(
            &schema,
            &mut clock(),
            NOW,
            RULES,
            &d1,
            std::slice::from_ref(&ch),
        )
        .unwrap();
    assert_eq!(
        r[0].status,
        ChangeStatus::Rejected {
            reason: RejectReason::Ownership
        }
    );
    assert!(adv.is_empty());
    for owner in [Owner::Device(d1.clone()), Owner::Device(dev("a", "d2"))] {
        assert_eq!(s.get_item(&owner, "Up", &ch.key).unwrap(), None);
    }
    let q = ItemQuery {
        account: "a".into(),
        model: "Up".into(),
        limit: 10,
        ..Default::default()
    };
    assert!(s.query_items(&q).unwrap().items.is_empty());
}

fn push_from_an_unregistered_device_fails_whole() {
    let schema = schema();
    let mut s = store(&[]);
    let ch = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n"}),
        ver(NOW, 7),
    );
    let err = s
        .apply_push(
            &schema,
            &mut clock(),
            NOW,
            RULES,
            &dev("a", "d1"),
            std::slice::from_ref(&ch),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownDevice(_)), "{err}");
    assert_eq!(
        s.get_item(&Owner::Device(dev("a", "d1")), "Both", &ch.key)
            .unwrap(),
        None,
        "rolled back"
    );
}

fn two_devices_writing_one_key_get_separate_rows() {
    let schema = schema();
    let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
    let mut s = store(&[&d1, &d2]);
    let mut c = clock();
    let c1 = put(
        &schema,
        "Shared",
        json!({"name": "k", "v": 1}),
        ver(NOW + 5, 1),
    );
    let c2 = put(
        &schema,
        "Shared",
        json!({"name": "k", "v": 2}),
        ver(NOW + 1, 2),
    );
    assert_eq!(c1.key, c2.key);
    let (r1, a1) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, std::slice::from_ref(&c1))
        .unwrap();
    let (r2, a2) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d2, std::slice::from_ref(&c2))
        .unwrap();
    assert_eq!(
        (r1[0].status.clone(), r2[0].status.clone()),
        (ChangeStatus::Applied, ChangeStatus::Applied)
    );
    assert_eq!((a1, a2), (vec![(d1.clone(), 2)], vec![(d2.clone(), 2)]));
    let q = ItemQuery {
        account: "a".into(),
        model: "Shared".into(),
        limit: 10,
        ..Default::default()
    };
    let page = s.query_items(&q).unwrap();
    let got: Vec<(Option<&str>, serde_json::Value)> = page
        .items
        .iter()
        .map(|i| (i.device.as_deref(), i.item.as_ref().unwrap()["v"].clone()))
        .collect();
    assert_eq!(got, vec![(Some("d1"), json!(1)), (Some("d2"), json!(2))]);
    assert!(s.conflicts("a", None, 10).unwrap().is_empty());
    // Each device's feed holds only its own row.
    let f2 = s.read_feed(&d2, 1, 10).unwrap();
    assert_eq!(f2.changes.len(), 1);
    assert_eq!(f2.changes[0].1.item.as_ref().unwrap()["v"], json!(2));
}

fn api_write_advances_the_feed_and_coalesces() {
    let schema = schema();
    let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
    let mut s = store(&[&d1, &d2]);
    let mut c = clock();
    let owner = Owner::Device(d1.clone());
    let (ch, adv) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &owner,
        "Down",
        json!({"deviceId": "d1", "name": "x", "v": 1}),
    );
    assert_eq!(adv, vec![(d1.clone(), 2)]);
    let page = s.read_feed(&d1, 1, 10).unwrap();
    assert_eq!((page.head, page.resync_required), (2, false));
    assert_eq!(
        page.changes,
        vec![(
            2,
            Change {
                base: None,
                ..ch.clone()
            }
        )]
    );
    assert_eq!(s.read_feed(&d2, 1, 10).unwrap().changes, vec![]);
    assert_eq!(s.device(&d1).unwrap().unwrap().feed_head, 2);
    assert_eq!(s.device(&d2).unwrap().unwrap().feed_head, 1);

    // A second write of the key replaces its entry: one entry, at the new sequence.
    let (ch2, adv) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &owner,
        "Down",
        json!({"deviceId": "d1", "name": "x", "v": 2}),
    );
    assert_eq!(adv, vec![(d1.clone(), 3)]);
    assert_eq!(ch2.base, Some(ch.version));
    assert!(ch2.version > ch.version);
    let page = s.read_feed(&d1, 1, 10).unwrap();
    assert_eq!(page.head, 3);
    assert_eq!(page.changes.len(), 1);
    assert_eq!(page.changes[0].0, 3);
    assert_eq!(page.changes[0].1.item.as_ref().unwrap()["v"], json!(2));
    assert_eq!(page.changes[0].1.version, ch2.version);
    assert_eq!(page.changes[0].1.base, None);
    assert!(s.read_feed(&d1, 3, 10).unwrap().changes.is_empty());
    // An API overwrite of its own prior write is no conflict.
    assert!(s.conflicts("a", None, 10).unwrap().is_empty());
}

fn feed_pages_respect_the_limit() {
    let schema = schema();
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    let mut c = clock();
    let owner = Owner::Device(d1.clone());
    for i in 0..5 {
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW + i,
            &owner,
            "Down",
            json!({"deviceId": "d1", "name": format!("n{i}")}),
        );
    }
    let p = s.read_feed(&d1, 1, 2).unwrap();
    assert_eq!(
        p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![2, 3]
    );
    let p = s.read_feed(&d1, 3, 2).unwrap();
    assert_eq!(
        p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![4, 5]
    );
    let p = s.read_feed(&d1, 5, 2).unwrap();
    assert_eq!(
        (
            p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
            p.head
        ),
        (vec![6], 6)
    );

    // An entry whose row vanished (manual SQL) is skipped without shortening the page.
    s.sql("DELETE FROM items WHERE sk = 'x#n1'").unwrap();
    let p = s.read_feed(&d1, 1, 2).unwrap();
    assert_eq!(
        p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![2, 4]
    );
    assert!(matches!(
        s.read_feed(&dev("a", "nope"), 0, 2),
        Err(StoreError::UnknownDevice(_))
    ));
}

fn new_device_starts_with_a_resync() {
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    let p = s.read_feed(&d1, 0, 10).unwrap();
    assert!(p.resync_required);
    let p = s.read_feed(&d1, 1, 10).unwrap();
    assert!(!p.resync_required && p.changes.is_empty() && p.head == 1);
}

fn broadcast_write_fans_out_to_the_account_only() {
    let schema = schema();
    let (d1, d2, d3) = (dev("a", "d1"), dev("a", "d2"), dev("b", "d3"));
    let mut s = store(&[&d1, &d2, &d3]);
    let mut c = clock();
    let (ch, adv) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &Owner::Account("a".into()),
        "Bcast",
        json!({"name": "fw", "v": 1}),
    );
    assert_eq!(adv, vec![(d1.clone(), 2), (d2.clone(), 2)]);
    for d in [&d1, &d2] {
        let p = s.read_feed(d, 1, 10).unwrap();
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].1.key, ch.key);
    }
    assert!(s.read_feed(&d3, 1, 10).unwrap().changes.is_empty());
    let q = ItemQuery {
        account: "a".into(),
        model: "Bcast".into(),
        limit: 10,
        ..Default::default()
    };
    let page = s.query_items(&q).unwrap();
    assert_eq!(page.items.len(), 1, "one row for the whole account");
    assert_eq!(page.items[0].device, None);
    // A broadcast model needs an account owner, and the device model a device owner.
    let err = s
        .write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &Owner::Device(d1.clone()),
            "Bcast",
            CloudOp::Put(item(&schema, "Bcast", json!({"name": "x"}))),
        )
        .unwrap_err();
    assert!(matches!(err, CloudWriteError::WrongOwner { .. }), "{err}");
    // A push of a broadcast model is refused.
    let ch = put(&schema, "Bcast", json!({"name": "x"}), ver(NOW, 7));
    let (r, _) = s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, &[ch])
        .unwrap();
    assert_eq!(
        r[0].status,
        ChangeStatus::Rejected {
            reason: RejectReason::NotSyncedUp
        }
    );
}

fn delete_then_purge_raises_the_floor() {
    let schema = schema();
    let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
    let mut s = store(&[&d1, &d2]);
    let mut c = clock();
    let owner = Owner::Device(d1.clone());
    let (ch, _) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &owner,
        "Down",
        json!({"deviceId": "d1", "name": "x"}),
    );
    api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &owner,
        "Down",
        json!({"deviceId": "d1", "name": "keep"}),
    );
    let (bc, _) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &Owner::Account("a".into()),
        "Bcast",
        json!({"name": "fw"}),
    );
    let (del, adv) = s
        .write(
            &schema,
            &mut c,
            NOW + 10,
            MAX_MSG,
            &owner,
            "Down",
            CloudOp::Delete(ch.key.clone()),
        )
        .unwrap();
    assert_eq!(adv, vec![(d1.clone(), 5)]);
    assert_eq!((del.op, del.item.clone()), (Op::Delete, None));
    let p = s.read_feed(&d1, 1, 10).unwrap();
    assert_eq!(
        p.changes.iter().map(|(q, _)| *q).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(
        p.changes[2].1,
        Change {
            model: "Down".into(),
            key: ch.key.clone(),
            op: Op::Delete,
            item: None,
            version: del.version,
            base: None
        }
    );
    let stored = s.get_item(&owner, "Down", &ch.key).unwrap().unwrap();
    assert_eq!((stored.item, stored.version), (None, del.version));
    let (bdel, _) = s
        .write(
            &schema,
            &mut c,
            NOW + 20,
            MAX_MSG,
            &Owner::Account("a".into()),
            "Bcast",
            CloudOp::Delete(bc.key.clone()),
        )
        .unwrap();
    assert_eq!(bdel.op, Op::Delete);

    let retention = Retention {
        tombstone_ms: 1000,
        max_conflicts: 100,
        batch: Retention::DEFAULT_BATCH,
    };
    // Too young: nothing purged.
    assert_eq!(
        s.purge(NOW + 500, &retention).unwrap(),
        PurgeStats::default()
    );
    let stats = s.purge(NOW + 100_000, &retention).unwrap();
    assert_eq!(
        stats,
        PurgeStats {
            tombstones: 2,
            conflicts: 0,
            more: false,
        }
    );
    assert_eq!(s.get_item(&owner, "Down", &ch.key).unwrap(), None);
    // d1: feed 3 = keep, 5 = delete x, 6 = delete fw; d2: 2 = fw put -> 3 = fw delete.
    assert!(s.read_feed(&d1, 5, 10).unwrap().resync_required);
    assert!(s.read_feed(&d1, 1, 10).unwrap().resync_required);
    let p = s.read_feed(&d1, 6, 10).unwrap();
    assert!(!p.resync_required && p.changes.is_empty() && p.head == 6);
    assert!(s.read_feed(&d2, 2, 10).unwrap().resync_required);
    assert!(!s.read_feed(&d2, 3, 10).unwrap().resync_required);
    let n = s.count("SELECT count(*) FROM feed WHERE account = 'a'");
    assert_eq!(n, 1, "only the live item's entry is left");
}

fn purge_trims_the_conflict_log_per_account() {
    let schema = schema();
    let (d1, e1) = (dev("a", "d1"), dev("b", "e1"));
    let mut s = store(&[&d1, &e1]);
    let mut c = clock();
    for (d, n) in [(&d1, 4u64), (&e1, 2)] {
        for i in 0..=n {
            let ch = put(
                &schema,
                "Both",
                json!({"deviceId": d.device, "name": "k", "v": i}),
                ver(NOW + i, 100 + i),
            );
            s.apply_push(&schema, &mut c, NOW, RULES, d, &[ch]).unwrap();
        }
    }
    assert_eq!(s.conflicts("a", None, 100).unwrap().len(), 4);
    assert_eq!(s.conflicts("b", None, 100).unwrap().len(), 2);
    let stats = s
        .purge(
            NOW,
            &Retention {
                tombstone_ms: 1000,
                max_conflicts: 3,
                batch: Retention::DEFAULT_BATCH,
            },
        )
        .unwrap();
    assert_eq!(
        stats,
        PurgeStats {
            tombstones: 0,
            conflicts: 1,
            more: false,
        }
    );
    let a = s.conflicts("a", None, 100).unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(
        a[0].winner,
        hlc_to_string(ver(NOW + 4, 104)),
        "the newest are kept"
    );
    assert_eq!(s.conflicts("b", None, 100).unwrap().len(), 2);
}

/// Tombstones of several owners (two devices' own items, an account's broadcast items, a
/// device's pushed items the cloud deleted), deleted at different times, live items beside them,
/// and conflicts beyond the account's limit: what the batch checks purge.
fn fill_for_retention(s: &mut Subject) {
    let schema = schema();
    let mut c = clock();
    let (d1, d2, e1) = (dev("a", "d1"), dev("a", "d2"), dev("b", "e1"));
    let mut at = NOW;
    let mut step = || {
        at += 10;
        at
    };
    let mut tombstone = |s: &mut Subject,
                         c: &mut HlcClock,
                         owner: &Owner,
                         model: &str,
                         input: serde_json::Value| {
        let (put, _) = api_put(s, &schema, c, step(), owner, model, input);
        s.write(
            &schema,
            c,
            step(),
            MAX_MSG,
            owner,
            model,
            CloudOp::Delete(put.key),
        )
        .unwrap();
    };
    let (o1, o2, acct) = (
        Owner::Device(d1.clone()),
        Owner::Device(d2.clone()),
        Owner::Account("a".into()),
    );
    for i in 0..4 {
        tombstone(
            s,
            &mut c,
            &o1,
            "Down",
            json!({"deviceId": "d1", "name": format!("x{i}")}),
        );
        tombstone(s, &mut c, &acct, "Bcast", json!({"name": format!("fw{i}")}));
    }
    for i in 0..2 {
        tombstone(
            s,
            &mut c,
            &o2,
            "Down",
            json!({"deviceId": "d2", "name": format!("y{i}")}),
        );
    }
    api_put(
        s,
        &schema,
        &mut c,
        step(),
        &o1,
        "Down",
        json!({"deviceId": "d1", "name": "keep"}),
    );
    api_put(
        s,
        &schema,
        &mut c,
        step(),
        &acct,
        "Bcast",
        json!({"name": "fw-keep"}),
    );
    // e1 pushes an item and then the same key five more times, each write newer: five
    // conflicts in account b; then the cloud deletes it.
    let mut last = None;
    for i in 0..6u64 {
        let ch = put(
            &schema,
            "Both",
            json!({"deviceId": "e1", "name": "k", "v": i}),
            ver(NOW + i, 100 + i),
        );
        s.apply_push(&schema, &mut c, NOW, RULES, &e1, std::slice::from_ref(&ch))
            .unwrap();
        last = Some(ch);
    }
    let last = last.unwrap();
    s.write(
        &schema,
        &mut c,
        step(),
        MAX_MSG,
        &Owner::Device(e1.clone()),
        "Both",
        CloudOp::Delete(last.key),
    )
    .unwrap();
}

/// What retention leaves, as the database holds it: items, watermarks, feed entries, feed
/// floors, conflicts.
fn retention_state(s: &Subject) -> Vec<Vec<String>> {
    [
        "SELECT account || '|' || device || '|' || pk || '|' || sk || '|' || version || '|' \
           || CAST(deleted AS TEXT) FROM items",
        "SELECT account || '|' || device || '|' || purged_below FROM watermarks",
        "SELECT account || '|' || device || '|' || CAST(seq AS TEXT) || '|' || owner || '|' \
           || pk || '|' || sk FROM feed",
        "SELECT account || '|' || device || '|' || CAST(feed_floor AS TEXT) || '|' \
           || CAST(feed_head AS TEXT) FROM devices",
        "SELECT account || '|' || winner || '|' || loser FROM conflicts",
    ]
    .iter()
    .map(|q| s.texts(q))
    .collect()
}

/// Split on `|`.
fn cols(row: &str) -> Vec<&str> {
    row.split('|').collect()
}

fn a_purge_in_batches_keeps_every_mark_and_ends_where_one_purge_ends() {
    let devices = [&dev("a", "d1"), &dev("a", "d2"), &dev("b", "e1")];
    let mut whole = store(&devices);
    let mut batched = store(&devices);
    fill_for_retention(&mut whole);
    fill_for_retention(&mut batched);
    assert_eq!(
        retention_state(&whole),
        retention_state(&batched),
        "the same writes leave the same rows"
    );
    let later = NOW + 100_000;
    let retention = Retention {
        tombstone_ms: 1000,
        max_conflicts: 1,
        batch: Retention::DEFAULT_BATCH,
    };
    let one = whole.purge(later, &retention).unwrap();
    // 4 + 4 + 2 + 1 tombstones; 5 conflicts of account b, 1 kept.
    assert_eq!(
        one,
        PurgeStats {
            tombstones: 11,
            conflicts: 4,
            more: false
        }
    );

    // Bounded: at most 3 tombstones and 3 conflicts a call.
    let small = Retention {
        batch: 3,
        ..retention
    };
    let tombstones_before =
        batched.texts("SELECT account || '|' || device || '|' || version FROM items WHERE deleted");
    let entries_before =
        batched.texts("SELECT account || '|' || device || '|' || CAST(seq AS TEXT) FROM feed");
    let mut total = PurgeStats::default();
    let mut calls = 0;
    loop {
        let stats = batched.purge(later, &small).unwrap();
        calls += 1;
        assert!(
            stats.tombstones <= 3 && stats.conflicts <= 3,
            "call {calls}: {stats:?}"
        );
        total.add(stats);
        // After every call: each tombstone gone is covered by its owner's watermark, each
        // feed entry gone by its device's floor.
        let tombstones = batched
            .texts("SELECT account || '|' || device || '|' || version FROM items WHERE deleted");
        let marks =
            batched.texts("SELECT account || '|' || device || '|' || purged_below FROM watermarks");
        for gone in tombstones_before.iter().filter(|t| !tombstones.contains(t)) {
            let g = cols(gone);
            let mark = marks
                .iter()
                .map(|m| cols(m))
                .find(|m| m[..2] == g[..2])
                .unwrap_or_else(|| panic!("call {calls}: no watermark for purged {gone}"));
            assert!(
                mark[2] >= g[2],
                "call {calls}: {gone} above its watermark {mark:?}"
            );
        }
        let entries =
            batched.texts("SELECT account || '|' || device || '|' || CAST(seq AS TEXT) FROM feed");
        let floors = batched.texts(
            "SELECT account || '|' || device || '|' || CAST(feed_floor AS TEXT) FROM devices",
        );
        for gone in entries_before.iter().filter(|e| !entries.contains(e)) {
            let g = cols(gone);
            let floor = floors
                .iter()
                .map(|f| cols(f))
                .find(|f| f[..2] == g[..2])
                .unwrap();
            let (floor, seq): (u64, u64) = (floor[2].parse().unwrap(), g[2].parse().unwrap());
            assert!(
                floor >= seq,
                "call {calls}: feed entry {gone} above the floor {floor}"
            );
        }
        if !stats.more {
            break;
        }
        assert!(calls < 20, "the purge never says it is done: {total:?}");
    }
    assert_eq!(
        (total.tombstones, total.conflicts),
        (one.tombstones, one.conflicts)
    );
    assert!(
        calls >= 4,
        "11 tombstones at 3 a call take 4 calls or more, not {calls}"
    );
    assert_eq!(
        retention_state(&batched),
        retention_state(&whole),
        "the batches end where one purge ends"
    );
    // Nothing is left for another call.
    assert_eq!(batched.purge(later, &small).unwrap(), PurgeStats::default());
}

fn a_change_log_purge_in_batches_ends_where_one_purge_ends() {
    let (d1, e1) = (dev("a", "d1"), dev("b", "e1"));
    let mut whole = store(&[&d1, &e1]);
    let mut batched = store(&[&d1, &e1]);
    // 6 old changes of account a, then 4 young ones of a and 5 of b: by age the 6 go, by count
    // (3 per account) one of a's young and two of b's.
    for s in [&mut whole, &mut batched] {
        write_n(s, "Both", 6, NOW);
        write_n(s, "Up", 4, NOW + 50_000);
        let schema = schema();
        let mut c = clock();
        for i in 0..5 {
            api_put(
                s,
                &schema,
                &mut c,
                NOW + 50_000,
                &Owner::Device(e1.clone()),
                "Down",
                json!({"deviceId": "e1", "name": format!("n{i}")}),
            );
        }
    }
    let log = |s: &Subject| {
        vec![
            s.texts("SELECT account || '|' || CAST(seq AS TEXT) FROM changes"),
            s.texts("SELECT account || '|' || CAST(floor AS TEXT) FROM change_floors"),
        ]
    };
    let retention = ChangeRetention {
        max_age_ms: 10_000,
        max_per_account: 3,
        batch: 1000,
    };
    let now = NOW + 55_000;
    let one = whole.purge_changes(now, &retention).unwrap();
    assert_eq!(
        (one.removed, one.kept, one.more),
        (9, Some(6), false),
        "{one:?}"
    );
    let small = ChangeRetention {
        batch: 2,
        ..retention
    };
    let (mut removed, mut calls, mut kept) = (0, 0, None);
    loop {
        let stats = batched.purge_changes(now, &small).unwrap();
        calls += 1;
        assert!(stats.removed <= 2, "call {calls}: {stats:?}");
        removed += stats.removed;
        kept = stats.kept.or(kept);
        if !stats.more {
            break;
        }
        assert!(calls < 20, "the purge never says it is done");
    }
    assert_eq!((removed, kept), (9, Some(6)));
    assert!(
        calls >= 5,
        "9 entries at 2 a call take 5 calls or more, not {calls}"
    );
    assert_eq!(
        log(&batched),
        log(&whole),
        "the batches end where one purge ends"
    );
    // A reader below the floor is told, on both.
    for s in [&mut whole, &mut batched] {
        assert!(matches!(
            s.read_changes(&change_query("a", 0)).unwrap(),
            ChangeRead::Expired { .. }
        ));
    }
}

fn snapshot_pages_return_every_down_item_once() {
    let schema = schema();
    let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
    let mut s = store(&[&d1, &d2]);
    let mut c = clock();
    let o1 = Owner::Device(d1.clone());
    let o2 = Owner::Device(d2.clone());
    let mut expected = Vec::new();
    for i in 0..3 {
        expected.push(
            api_put(
                &mut s,
                &schema,
                &mut c,
                NOW,
                &o1,
                "Down",
                json!({"deviceId": "d1", "name": format!("d{i}")}),
            )
            .0,
        );
        expected.push(
            api_put(
                &mut s,
                &schema,
                &mut c,
                NOW,
                &o1,
                "Both",
                json!({"deviceId": "d1", "name": format!("b{i}")}),
            )
            .0,
        );
        expected.push(
            api_put(
                &mut s,
                &schema,
                &mut c,
                NOW,
                &Owner::Account("a".into()),
                "Bcast",
                json!({"name": format!("f{i}")}),
            )
            .0,
        );
        // Another device's items and up-only items are not part of d1's snapshot.
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &o2,
            "Down",
            json!({"deviceId": "d2", "name": format!("o{i}")}),
        );
        let up = put(
            &schema,
            "Up",
            json!({"deviceId": "d1", "name": format!("u{i}")}),
            ver(NOW, 7),
        );
        s.apply_push(&schema, &mut c, NOW, RULES, &d1, &[up])
            .unwrap();
    }
    api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &Owner::Account("b".into()),
        "Bcast",
        json!({"name": "other"}),
    );
    // A deleted item is not in a snapshot.
    let (gone, _) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &o1,
        "Down",
        json!({"deviceId": "d1", "name": "gone"}),
    );
    s.write(
        &schema,
        &mut c,
        NOW,
        MAX_MSG,
        &o1,
        "Down",
        CloudOp::Delete(gone.key),
    )
    .unwrap();
    let head = s.device(&d1).unwrap().unwrap().feed_head;

    for limit in [1, 2, 4, 9, 100] {
        let mut got: Vec<Change> = Vec::new();
        let mut from: Option<SnapshotCursor> = None;
        let mut pages = 0;
        loop {
            let page = s
                .read_snapshot(&schema, &d1, 42, from.as_ref(), limit)
                .unwrap();
            assert_eq!((page.resync, page.cursor), (42, head));
            assert!(page.items.len() <= limit);
            pages += 1;
            got.extend(page.items);
            match page.next {
                Some(n) => from = Some(n),
                None => break,
            }
        }
        assert_eq!(pages, expected.len().div_ceil(limit), "limit {limit}");
        let mut want: Vec<Change> = expected
            .iter()
            .map(|c| Change {
                base: None,
                ..c.clone()
            })
            .collect();
        want.sort_by(|a, b| (&a.model, &a.key).cmp(&(&b.model, &b.key)));
        assert_eq!(got, want, "limit {limit}");
    }
}

fn query_items_filters_and_pages() {
    let schema = schema();
    let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
    let mut s = store(&[&d1, &d2]);
    let mut c = clock();
    let o1 = Owner::Device(d1.clone());
    for (name, v) in [
        ("a%b", 1.0),
        ("a%bc", 2.0),
        ("a_b", 3.0),
        ("axb", 3.5),
        ("ab", 4.0),
        ("b", 3.0),
    ] {
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &o1,
            "Down",
            json!({"deviceId": "d1", "name": name, "v": v}),
        );
    }
    api_put(
        &mut s,
        &schema,
        &mut c,
        NOW,
        &Owner::Device(d2.clone()),
        "Down",
        json!({"deviceId": "d2", "name": "a%b", "v": 3}),
    );
    let up = put(
        &schema,
        "Up",
        json!({"deviceId": "d1", "name": "a%b", "v": 3}),
        ver(NOW, 7),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, &[up])
        .unwrap();

    let all = s.query_items(&query("Down")).unwrap();
    assert_eq!(all.items.len(), 7);
    assert_eq!(all.next, None);
    let devices: Vec<Option<&str>> = all.items.iter().map(|i| i.device.as_deref()).collect();
    assert_eq!(devices.iter().filter(|d| **d == Some("d2")).count(), 1);
    assert_eq!(devices.last(), Some(&Some("d2")), "ordered by device");

    let q = ItemQuery {
        device: Some("d1".into()),
        ..query("Down")
    };
    assert_eq!(s.query_items(&q).unwrap().items.len(), 6);
    let q = ItemQuery {
        pk: Some("d#d2".into()),
        ..query("Down")
    };
    assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a%b"]);
    let q = ItemQuery {
        device: Some("d1".into()),
        sk_prefix: Some("x#a%".into()),
        ..query("Down")
    };
    assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a%b", "x#a%bc"]);
    let q = ItemQuery {
        device: Some("d1".into()),
        sk_prefix: Some("x#a_".into()),
        ..query("Down")
    };
    assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a_b"]);
    let q = ItemQuery {
        device: Some("d1".into()),
        sk_prefix: Some("x#a".into()),
        ..query("Down")
    };
    assert_eq!(sks(&s.query_items(&q).unwrap()).len(), 5);

    // Field equality: numbers compare numerically, strings as strings.
    let q = ItemQuery {
        device: Some("d1".into()),
        filters: vec![("v".into(), json!(3))],
        ..query("Down")
    };
    assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a_b", "x#b"]);
    let q = ItemQuery {
        filters: vec![("v".into(), json!(3.5))],
        ..query("Down")
    };
    assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#axb"]);
    let q = ItemQuery {
        filters: vec![("name".into(), json!("a_b"))],
        ..query("Down")
    };
    assert_eq!(sks(&s.query_items(&q).unwrap()), vec!["x#a_b"]);
    let q = ItemQuery {
        filters: vec![("v".into(), json!("3"))],
        ..query("Down")
    };
    assert!(
        s.query_items(&q).unwrap().items.is_empty(),
        "the string \"3\" is not the number 3"
    );
    let q = ItemQuery {
        filters: vec![("name".into(), json!("a%b")), ("v".into(), json!(3))],
        ..query("Down")
    };
    assert_eq!(s.query_items(&q).unwrap().items.len(), 1);
    let q = ItemQuery {
        filters: vec![("missing".into(), serde_json::Value::Null)],
        ..query("Down")
    };
    assert_eq!(s.query_items(&q).unwrap().items.len(), 7);
    for bad in ["na me", "a.b", "x\"", ""] {
        let q = ItemQuery {
            filters: vec![(bad.into(), json!(1))],
            ..query("Down")
        };
        assert!(
            matches!(s.query_items(&q), Err(StoreError::BadQuery(_))),
            "{bad:?}"
        );
    }
    let q = ItemQuery {
        filters: vec![("v".into(), json!([1]))],
        ..query("Down")
    };
    assert!(matches!(s.query_items(&q), Err(StoreError::BadQuery(_))));

    // Pagination: every item once, in order.
    let mut q = ItemQuery {
        limit: 3,
        ..query("Down")
    };
    let mut seen = Vec::new();
    loop {
        let page = s.query_items(&q).unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.into_iter().map(|i| (i.device, i.pk, i.sk)));
        match page.next {
            Some(n) => q.next = Some(n),
            None => break,
        }
    }
    let want: Vec<_> = all
        .items
        .iter()
        .map(|i| (i.device.clone(), i.pk.clone(), i.sk.clone()))
        .collect();
    assert_eq!(seen, want);
    for bad in ["zz", "00", &hex::encode("[1,2]")] {
        let q = ItemQuery {
            next: Some(bad.to_string()),
            ..query("Down")
        };
        assert!(
            matches!(s.query_items(&q), Err(StoreError::BadQuery(_))),
            "{bad}"
        );
    }
    // Broadcast rows are found with device None and paged with the '' device.
    let ab = Owner::Account("a".into());
    for n in ["p", "q"] {
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &ab,
            "Bcast",
            json!({"name": n}),
        );
    }
    let page = s
        .query_items(&ItemQuery {
            limit: 1,
            ..query("Bcast")
        })
        .unwrap();
    let page2 = s
        .query_items(&ItemQuery {
            limit: 1,
            next: page.next.clone(),
            ..query("Bcast")
        })
        .unwrap();
    assert_eq!(
        (sks(&page), sks(&page2), page2.next),
        (vec!["x#p".to_string()], vec!["x#q".to_string()], None)
    );
}

fn api_write_errors() {
    let schema = schema();
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    let mut c = clock();
    let o1 = Owner::Device(d1.clone());
    let err = s
        .write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &o1,
            "Up",
            CloudOp::Put(item(&schema, "Up", json!({"deviceId": "d1", "name": "n"}))),
        )
        .unwrap_err();
    assert!(matches!(err, CloudWriteError::UpOnly(_)), "{err}");
    let err = s
        .write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &o1,
            "Down",
            CloudOp::Put(item(
                &schema,
                "Down",
                json!({"deviceId": "d9", "name": "n"}),
            )),
        )
        .unwrap_err();
    assert!(matches!(err, CloudWriteError::Ownership(_)), "{err}");
    let ghost = Owner::Device(dev("a", "ghost"));
    let err = s
        .write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &ghost,
            "Down",
            CloudOp::Put(item(
                &schema,
                "Down",
                json!({"deviceId": "ghost", "name": "n"}),
            )),
        )
        .unwrap_err();
    assert!(
        matches!(err, CloudWriteError::Store(StoreError::UnknownDevice(_))),
        "{err}"
    );
    let err = s
        .write(
            &schema,
            &mut c,
            NOW,
            100,
            &o1,
            "Down",
            CloudOp::Put(item(
                &schema,
                "Down",
                json!({"deviceId": "d1", "name": "n"}),
            )),
        )
        .unwrap_err();
    assert!(matches!(err, CloudWriteError::TooLarge { .. }), "{err}");
    let n = s.count("SELECT count(*) FROM items");
    assert_eq!(n, 0);
    assert_eq!(s.device(&d1).unwrap().unwrap().feed_head, 1);
}

fn devices_register_status_and_ack() {
    let (d1, d2, e1) = (dev("a", "d1"), dev("a", "d2"), dev("b", "e1"));
    let mut s = store(&[&d2, &e1, &d1]);
    assert!(matches!(
        s.register_device(&d1, "x", None, NOW),
        Err(StoreError::DeviceExists(_))
    ));
    let r = s.device(&d1).unwrap().unwrap();
    assert_eq!(
        (
            r.secret_hash.as_str(),
            r.registered_ms,
            r.online,
            r.cursor_acked
        ),
        ("hash", NOW, false, 0)
    );
    assert_eq!(s.device(&dev("a", "zz")).unwrap(), None);

    let names = |v: Vec<DeviceRecord>| {
        v.into_iter()
            .map(|r| format!("{}/{}", r.account, r.device))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(s.devices(None, None, 10).unwrap()),
        ["a/d1", "a/d2", "b/e1"]
    );
    assert_eq!(
        names(s.devices(Some("a"), None, 10).unwrap()),
        ["a/d1", "a/d2"]
    );
    assert_eq!(names(s.devices(None, Some(&d1), 1).unwrap()), ["a/d2"]);
    assert_eq!(
        names(s.devices(Some("a"), Some(&d2), 10).unwrap()),
        Vec::<String>::new()
    );

    let up = StatusUpdate {
        online: Some(true),
        last_seen_ms: Some(NOW + 1),
        schema_version: Some("1".into()),
        pending: Some(4),
        last_error: Some(Some("boom".into())),
        ..Default::default()
    };
    s.update_status(&d1, &up).unwrap();
    s.update_status(
        &d1,
        &StatusUpdate {
            last_seen_ms: Some(NOW + 2),
            ..Default::default()
        },
    )
    .unwrap();
    let r = s.device(&d1).unwrap().unwrap();
    assert_eq!(
        (
            r.online,
            r.last_seen_ms,
            r.schema_version.as_deref(),
            r.pending,
            r.last_error.as_deref()
        ),
        (true, Some(NOW + 2), Some("1"), 4, Some("boom"))
    );
    s.update_status(
        &d1,
        &StatusUpdate {
            last_error: Some(None),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.device(&d1).unwrap().unwrap().last_error, None);
    assert!(matches!(
        s.update_status(&dev("a", "zz"), &up),
        Err(StoreError::UnknownDevice(_))
    ));
    s.reset_online().unwrap();
    assert!(!s.device(&d1).unwrap().unwrap().online);

    s.sql("UPDATE devices SET feed_head = 8").unwrap();
    s.ack_cursor(&d1, 5).unwrap();
    s.ack_cursor(&d1, 3).unwrap();
    assert_eq!(s.device(&d1).unwrap().unwrap().cursor_acked, 5);
    s.ack_cursor(&d1, 7).unwrap();
    assert_eq!(s.device(&d1).unwrap().unwrap().cursor_acked, 7);
    // A cursor the feed never issued (hostile, or a cloud restored from a backup) is not
    // recorded: the device still counts as behind.
    s.ack_cursor(&d1, u64::MAX).unwrap();
    s.ack_cursor(&d1, 9).unwrap();
    assert_eq!(s.device(&d1).unwrap().unwrap().cursor_acked, 7);
    assert!(matches!(
        s.ack_cursor(&dev("a", "zz"), 1),
        Err(StoreError::UnknownDevice(_))
    ));
}

/// A node that took partitions over marks offline the devices it prompted and never heard
/// from: only those still online and not seen since the check began.
fn only_devices_unseen_since_a_time_are_marked_offline() {
    let (seen_before, seen_after, never_seen, offline, other) = (
        dev("a", "before"),
        dev("a", "after"),
        dev("a", "never"),
        dev("a", "offline"),
        dev("a", "other"),
    );
    let mut s = store(&[&seen_before, &seen_after, &never_seen, &offline, &other]);
    let online_at = |ms: Option<u64>| StatusUpdate {
        online: Some(true),
        last_seen_ms: ms,
        ..Default::default()
    };
    s.update_status(&seen_before, &online_at(Some(NOW + 10)))
        .unwrap();
    s.update_status(&seen_after, &online_at(Some(NOW + 20)))
        .unwrap();
    s.update_status(&never_seen, &online_at(None)).unwrap();
    s.update_status(&other, &online_at(Some(NOW))).unwrap();
    let unknown = dev("a", "unregistered");
    let marked = s
        .mark_offline_unseen(
            &[
                seen_before.clone(),
                seen_after.clone(),
                never_seen.clone(),
                offline.clone(),
                unknown,
            ],
            NOW + 20,
        )
        .unwrap();
    // Seen before the check (10 < 20) and never seen: marked. Seen at its start: kept. Already
    // offline, unregistered: nothing to mark. Not named: untouched.
    assert_eq!(marked, 2);
    let online = |s: &mut Subject, d: &DeviceId| s.device(d).unwrap().unwrap().online;
    assert!(!online(&mut s, &seen_before));
    assert!(online(&mut s, &seen_after));
    assert!(!online(&mut s, &never_seen));
    assert!(!online(&mut s, &offline));
    assert!(online(&mut s, &other));
    // Nothing named, nothing marked.
    assert_eq!(s.mark_offline_unseen(&[], NOW).unwrap(), 0);
}

fn the_broker_hash_is_set_at_registration_and_rotation_and_removed_at_revocation() {
    let mut s = store(&[]);
    let (d1, d2) = (dev("a", "d1"), dev("a", "d2"));
    s.register_device(&d1, "sha256:1", Some("$7$one"), NOW)
        .unwrap();
    s.register_device(&d2, "sha256:2", None, NOW).unwrap();
    let broker_hash = |s: &mut Subject, d: &DeviceId| s.device(d).unwrap().unwrap().broker_hash;
    assert_eq!(broker_hash(&mut s, &d1).as_deref(), Some("$7$one"));
    assert_eq!(broker_hash(&mut s, &d2), None);
    let listed = s.devices(Some("a"), None, 10).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|r| r.broker_hash.as_deref())
            .collect::<Vec<_>>(),
        [Some("$7$one"), None],
        "the listing carries it too (the command exports from it)"
    );

    assert!(s
        .set_device_secret(&d1, "sha256:1b", Some("$7$two"))
        .unwrap());
    assert_eq!(broker_hash(&mut s, &d1).as_deref(), Some("$7$two"));
    assert!(s.revoke_device(&d1, false).unwrap());
    assert_eq!(broker_hash(&mut s, &d1), None, "a revoked device has none");
    assert_eq!(
        broker_hash(&mut s, &d2),
        None,
        "the other device is untouched"
    );
    // A rotation lifts the revocation with a new one.
    assert!(s
        .set_device_secret(&d1, "sha256:1c", Some("$7$three"))
        .unwrap());
    assert_eq!(broker_hash(&mut s, &d1).as_deref(), Some("$7$three"));
}

fn api_keys_are_created_listed_revoked_and_looked_up_per_account() {
    let mut s = store(&[]);
    assert_eq!(s.live_api_keys().unwrap(), 0);
    let a1 = s.create_api_key("a", KeyScope::Read, "h1", NOW).unwrap();
    let a2 = s
        .create_api_key("a", KeyScope::Admin, "h2", NOW + 1)
        .unwrap();
    let b1 = s.create_api_key("b", KeyScope::Write, "h3", NOW).unwrap();
    assert_ne!(a1, a2);
    assert_eq!(a1.len(), 16);
    assert!(a1.bytes().all(|c| c.is_ascii_hexdigit()), "{a1}");
    assert_eq!(s.live_api_keys().unwrap(), 3);

    let listed = s.api_keys("a").unwrap();
    assert_eq!(
        listed.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        [a1.as_str(), a2.as_str()],
        "only the account's keys, oldest first"
    );
    assert_eq!(listed[1].scope, KeyScope::Admin);
    assert_eq!(listed[1].secret_hash, "h2");
    assert_eq!(listed[1].created_ms, NOW + 1);
    assert_eq!(listed[1].revoked_ms, None);

    let got = s.api_key(&b1).unwrap().unwrap();
    assert_eq!((got.account.as_str(), got.scope), ("b", KeyScope::Write));
    assert_eq!(s.api_key("0000000000000000").unwrap(), None);

    // Another account cannot revoke the key; its own can, once (the first time is kept).
    assert!(!s.revoke_api_key("a", &b1, NOW + 5).unwrap());
    assert_eq!(s.api_key(&b1).unwrap().unwrap().revoked_ms, None);
    assert!(s.revoke_api_key("b", &b1, NOW + 5).unwrap());
    assert!(s.revoke_api_key("b", &b1, NOW + 9).unwrap());
    assert_eq!(s.api_key(&b1).unwrap().unwrap().revoked_ms, Some(NOW + 5));
    assert!(!s.revoke_api_key("b", "nope", NOW).unwrap());
    assert_eq!(s.live_api_keys().unwrap(), 2);
    // A revoked key is still listed, with its revocation time.
    assert_eq!(s.api_keys("b").unwrap()[0].revoked_ms, Some(NOW + 5));

    // A scope the table cannot hold is refused by its constraint.
    assert!(s
        .sql(&format!(
            "UPDATE api_keys SET scope = 'root' WHERE id = '{a1}'"
        ))
        .is_err());
}

fn a_revoked_device_keeps_its_rows_and_its_pushes_are_refused_until_rotated() {
    let (schema, d1) = (schema(), dev("a", "d1"));
    let mut s = store(&[&d1]);
    let mut c = clock();
    let first = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "n"}),
        ver(NOW, 7),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, &[first])
        .unwrap();
    let (items, feed) = (rows_of(&s, "items", &d1), rows_of(&s, "feed", &d1));
    assert_eq!(items, 1);

    assert!(s.revoke_device(&d1, false).unwrap());
    let rec = s.device(&d1).unwrap().unwrap();
    assert_eq!(rec.secret_hash, REVOKED_SECRET_HASH);
    assert_eq!(
        (rows_of(&s, "items", &d1), rows_of(&s, "feed", &d1)),
        (items, feed)
    );
    assert_eq!(s.revoked_devices(None, 10).unwrap(), vec![d1.clone()]);
    assert!(s.revoked_devices(Some(&d1), 10).unwrap().is_empty());

    // A push that was in flight when the device was revoked is not applied.
    let late = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "m"}),
        ver(NOW + 1, 7),
    );
    let err = s
        .apply_push(
            &schema,
            &mut c,
            NOW,
            RULES,
            &d1,
            std::slice::from_ref(&late),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::DeviceRevoked(_)), "{err:?}");
    assert_eq!(rows_of(&s, "items", &d1), items);

    // A new secret lifts the revocation; the rows and the cursor stayed.
    assert!(s.set_device_secret(&d1, "sha256:new", None).unwrap());
    assert!(s.revoked_devices(None, 10).unwrap().is_empty());
    let after = s.device(&d1).unwrap().unwrap();
    assert_eq!(
        (after.cursor_acked, after.feed_head),
        (rec.cursor_acked, rec.feed_head)
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, &[late])
        .unwrap();
    assert_eq!(rows_of(&s, "items", &d1), items + 1);

    let unknown = dev("a", "nobody");
    assert!(!s.revoke_device(&unknown, false).unwrap());
    assert!(!s.set_device_secret(&unknown, "sha256:x", None).unwrap());
}

fn revoking_with_delete_items_removes_only_that_devices_rows_and_feed() {
    let (schema, d1, d2) = (schema(), dev("a", "d1"), dev("a", "d2"));
    let mut s = store(&[&d1, &d2]);
    let mut c = clock();
    for (d, name) in [(&d1, "d1"), (&d2, "d2")] {
        let ch = put(
            &schema,
            "Both",
            json!({"deviceId": name, "name": "n"}),
            ver(NOW, 7),
        );
        s.apply_push(&schema, &mut c, NOW, RULES, d, &[ch]).unwrap();
    }
    let d2_rows = (rows_of(&s, "items", &d2), rows_of(&s, "feed", &d2));
    assert_eq!(rows_of(&s, "items", &d1), 1);

    assert!(s.revoke_device(&d1, true).unwrap());
    assert_eq!(
        (rows_of(&s, "items", &d1), rows_of(&s, "feed", &d1)),
        (0, 0)
    );
    assert_eq!(
        (rows_of(&s, "items", &d2), rows_of(&s, "feed", &d2)),
        d2_rows
    );
    assert_eq!(
        s.device(&d1).unwrap().unwrap().secret_hash,
        REVOKED_SECRET_HASH
    );
}

/// Writes `n` changes of `model` for d1 (items named `{model}{i}`), one push each.
fn write_n(s: &mut Subject, model: &str, n: u64, at: u64) {
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

fn every_row_write_appends_one_change_in_commit_order_with_its_item() {
    let schema = schema();
    let (d1, x1) = (dev("a", "d1"), dev("b", "x1"));
    let mut s = store(&[&d1, &x1]);
    let mut c = clock();
    let up = put(
        &schema,
        "Up",
        json!({"deviceId": "d1", "name": "u", "v": 1}),
        ver(NOW, 7),
    );
    let both = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "b", "v": 2}),
        ver(NOW + 1, 7),
    );
    s.apply_push(
        &schema,
        &mut c,
        NOW,
        RULES,
        &d1,
        &[up.clone(), both.clone()],
    )
    .unwrap();
    let (down, _) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW + 2,
        &Owner::Device(d1.clone()),
        "Down",
        json!({"deviceId": "d1", "name": "w", "v": 3}),
    );
    api_put(
        &mut s,
        &schema,
        &mut c,
        NOW + 3,
        &Owner::Account("a".into()),
        "Bcast",
        json!({"name": "f", "v": 4}),
    );
    s.apply_push(
        &schema,
        &mut c,
        NOW + 4,
        RULES,
        &d1,
        &[del(&up, ver(NOW + 4, 7))],
    )
    .unwrap();
    // Another account's write is not in this account's log.
    let other = put(
        &schema,
        "Both",
        json!({"deviceId": "x1", "name": "b", "v": 9}),
        ver(NOW, 8),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &x1, &[other])
        .unwrap();

    let p = page(&mut s, &change_query("a", 0));
    assert_eq!(
        seen(&p.changes),
        vec![
            (ChangeOp::Put, Some("d1"), "Up", "x#u", Some(1)),
            (ChangeOp::Put, Some("d1"), "Both", "x#b", Some(2)),
            (ChangeOp::Put, Some("d1"), "Down", "x#w", Some(3)),
            (ChangeOp::Put, None, "Bcast", "x#f", Some(4)),
            (ChangeOp::Delete, Some("d1"), "Up", "x#u", None),
        ]
    );
    let seqs: Vec<u64> = p.changes.iter().map(|c| c.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!((p.next, p.head), (seqs[4], seqs[4]));
    assert_eq!(p.changes[0].version, up.version);
    assert_eq!(
        p.changes[2].version, down.version,
        "the API write's own version"
    );
    assert_eq!(p.changes[0].at_ms, NOW);
    assert!(p.changes.iter().all(|c| c.account == "a"));
    // The JSON a reader gets: key as an object, version as text, no item on a delete.
    let event = serde_json::to_value(&p.changes[4]).unwrap();
    assert_eq!(event["key"], json!({"pk": "d#d1", "sk": "x#u"}));
    assert_eq!(event["version"], hlc_to_string(ver(NOW + 4, 7)));
    assert_eq!(event["op"], "delete");
    assert!(event.get("item").is_none(), "{event}");

    let b = page(&mut s, &change_query("b", 0));
    assert_eq!(b.changes.len(), 1);
    assert!(b.changes[0].seq > seqs[4], "one sequence across accounts");
    // Reading from the last seen sequence gives nothing more, and the hint is the head.
    let rest = page(&mut s, &change_query("a", seqs[4]));
    assert!(rest.changes.is_empty());
    assert_eq!(s.change_head_hint(), b.changes[0].seq);
}

fn pages_hold_at_most_limit_and_filters_move_the_cursor_past_what_they_examined() {
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    write_n(&mut s, "Both", 10, NOW);
    write_n(&mut s, "Up", 1, NOW + 100);
    let all = page(&mut s, &change_query("a", 0));
    assert_eq!(all.changes.len(), 11);
    let up_seq = all.changes[10].seq;

    // Pages of 4: the cursor is the last change returned.
    let mut q = change_query("a", 0);
    q.limit = 4;
    let mut got = Vec::new();
    loop {
        let p = page(&mut s, &q);
        assert!(p.changes.len() <= 4);
        got.extend(p.changes.iter().map(|c| c.seq));
        if p.changes.is_empty() {
            assert_eq!(p.next, q.after, "an empty page stays where it was");
            break;
        }
        q.after = p.next;
    }
    assert_eq!(got, all.changes.iter().map(|c| c.seq).collect::<Vec<_>>());

    // A model filter that matches only the last entry, examining 3 entries a read: empty
    // pages whose cursor moves 3 entries on, then the match.
    let mut q = change_query("a", 0);
    q.model = Some("Up".into());
    q.scan = 3;
    let mut reads = 0;
    let found = loop {
        let p = page(&mut s, &q);
        reads += 1;
        if let Some(c) = p.changes.first() {
            break c.clone();
        }
        assert!(p.next > q.after, "an empty filtered read moves on");
        q.after = p.next;
    };
    assert_eq!((found.seq, found.model.as_str()), (up_seq, "Up"));
    assert_eq!(reads, 4, "11 entries, 3 examined a read");
    // A device filter: d1's changes, none for another device.
    let mut q = change_query("a", 0);
    q.device = Some("d1".into());
    assert_eq!(page(&mut s, &q).changes.len(), 11);
    q.device = Some("d2".into());
    let p = page(&mut s, &q);
    assert!(p.changes.is_empty());
    assert_eq!(p.next, p.head, "everything examined");
}

fn a_webhook_starts_at_the_head_and_its_cursor_moves_only_forward_on_success_or_skip() {
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    write_n(&mut s, "Both", 2, NOW);
    let head = page(&mut s, &change_query("a", 0)).head;
    let new = |after| NewWebhook {
        account: "a".into(),
        url: "http://127.0.0.1:9/hook".into(),
        model: Some("Up".into()),
        secret: "whsec_test".into(),
        after,
    };
    let hook = s.create_webhook(&new(None), NOW).unwrap();
    assert_eq!(hook.cursor, head, "only changes from now on");
    assert_eq!(hook.id.len(), 16);
    let from_start = s.create_webhook(&new(Some(0)), NOW).unwrap();
    assert_eq!(from_start.cursor, 0);
    assert_eq!(s.webhooks(Some("a")).unwrap().len(), 2);
    assert!(s.webhooks(Some("b")).unwrap().is_empty());

    // Nothing of its model is pending; an Up change is.
    assert_eq!(s.webhook_pending_since(&hook, 100).unwrap(), None);
    write_n(&mut s, "Up", 1, NOW + 50);
    assert_eq!(s.webhook_pending_since(&hook, 100).unwrap(), Some(NOW + 50));

    let fail = WebhookAttempt::Failed {
        status: Some(503),
        error: "HTTP 503".into(),
    };
    assert!(s.record_webhook_attempt(&hook.id, &fail, NOW + 60).unwrap());
    assert!(s.record_webhook_attempt(&hook.id, &fail, NOW + 61).unwrap());
    let h = s.webhook(&hook.id).unwrap().unwrap();
    assert_eq!(
        (
            h.cursor,
            h.failures,
            h.failures_total,
            h.last_status,
            h.last_error.as_deref()
        ),
        (head, 2, 2, Some(503), Some("HTTP 503"))
    );
    let up_head = page(&mut s, &change_query("a", 0)).head;
    let ok = WebhookAttempt::Delivered {
        status: 204,
        cursor: up_head,
        changes: 1,
        gap: false,
    };
    assert!(s.record_webhook_attempt(&hook.id, &ok, NOW + 70).unwrap());
    let h = s.webhook(&hook.id).unwrap().unwrap();
    assert_eq!(
        (
            h.cursor,
            h.failures,
            h.failures_total,
            h.deliveries,
            h.changes_delivered
        ),
        (up_head, 0, 2, 1, 1)
    );
    assert_eq!((h.last_error, h.last_success_ms), (None, Some(NOW + 70)));
    // Never back: a stale skip does not move it.
    s.record_webhook_attempt(&hook.id, &WebhookAttempt::Skipped { cursor: 1 }, NOW)
        .unwrap();
    assert_eq!(s.webhook(&hook.id).unwrap().unwrap().cursor, up_head);

    assert!(
        !s.delete_webhook("b", &hook.id).unwrap(),
        "another account's"
    );
    assert!(s.delete_webhook("a", &hook.id).unwrap());
    assert!(!s.record_webhook_attempt(&hook.id, &ok, NOW).unwrap());
    assert_eq!(s.webhook(&hook.id).unwrap(), None);
}

fn corrupt_rows_are_reported() {
    let schema = schema();
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    let (ch, _) = api_put(
        &mut s,
        &schema,
        &mut clock(),
        NOW,
        &Owner::Device(d1.clone()),
        "Down",
        json!({"deviceId": "d1", "name": "n"}),
    );
    // Valid JSON (PostgreSQL's jsonb takes nothing else), but not an item.
    s.sql("UPDATE items SET item = '[1]'").unwrap();
    // An unreadable row never stalls the feed: it is reported and skipped.
    let page = s.read_feed(&d1, 1, 10).unwrap();
    assert!(page.changes.is_empty());
    assert_eq!(page.unreadable.len(), 1);
    assert_eq!(page.unreadable[0].key, ch.key);
    assert!(
        page.unreadable[0].reason.contains("JSON"),
        "{:?}",
        page.unreadable
    );
    s.sql("UPDATE items SET item = '{}', version = 'bad'")
        .unwrap();
    assert!(matches!(
        s.get_item(&Owner::Device(d1.clone()), "Down", &ch.key),
        Err(StoreError::Corrupt(_))
    ));
    s.sql("UPDATE devices SET feed_head = -1").unwrap();
    assert!(matches!(s.device(&d1), Err(StoreError::Corrupt(_))));
}
