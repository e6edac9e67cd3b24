//! Unit tests of the SQLite store, against a private in-memory (or temporary file) database: what
//! only this store has (file layouts and their upgrades, damaged rows, groups over a file). The
//! contract every store keeps is checked on SQLite and PostgreSQL alike in
//! `crates/cloud/tests/it/store_contract.rs`.

use super::*;
use crate::store::REVOKED_SECRET_HASH;
use devtables_schema::Item;
use devtables_sync::hlc::node_id_for;
use devtables_sync::wire::{ChangeStatus, Op};
use serde_json::json;

pub(super) const NOW: u64 = 1_795_629_600_000;
pub(super) const MAX_MSG: usize = 128 * 1024;
pub(super) const DRIFT: u64 = 60_000;
/// The push rules of these tests: [`DRIFT`], no neighbouring schema.
pub(super) const RULES: &PushRules = &PushRules {
    max_drift_ms: DRIFT,
    from_neighbour: false,
    cloud_schema: String::new(),
};

/// Shared with the store contract (`tests/it/store_contract.rs`).
const SCHEMA: &str = include_str!("../../../tests/store_schema.json5");

pub(super) fn schema() -> Schema {
    Schema::from_json5(SCHEMA).unwrap()
}

pub(super) fn dev(account: &str, device: &str) -> DeviceId {
    DeviceId::new(account, device).unwrap()
}

pub(super) fn clock() -> HlcClock {
    HlcClock::new(node_id_for("cloud"))
}

pub(super) fn item(schema: &Schema, model: &str, input: serde_json::Value) -> Item {
    let input = input.as_object().cloned().unwrap();
    schema
        .model(model)
        .unwrap()
        .prepare_create(&input, NOW as i64)
        .unwrap()
}

pub(super) fn ver(wall_ms: u64, node: u64) -> Hlc {
    Hlc {
        wall_ms,
        counter: 0,
        node,
    }
}

pub(super) fn put(schema: &Schema, model: &str, input: serde_json::Value, version: Hlc) -> Change {
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

pub(super) fn store(devices: &[&DeviceId]) -> SqliteStore {
    let mut s = SqliteStore::open_in_memory().unwrap();
    for d in devices {
        s.register_device(d, "hash", None, NOW).unwrap();
    }
    s
}

pub(super) fn api_put(
    s: &mut SqliteStore,
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

fn key(pk: &str, sk: &str) -> ItemKey {
    ItemKey {
        pk: pk.into(),
        sk: sk.into(),
    }
}

#[test]
fn file_store_reopens_intact_and_refuses_newer_layouts() {
    let schema = schema();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let d1 = dev("a", "d1");
    let ch = {
        let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        s.register_device(&d1, "h", None, NOW).unwrap();
        api_put(
            &mut s,
            &schema,
            &mut clock(),
            NOW,
            &Owner::Device(d1.clone()),
            "Down",
            json!({"deviceId": "d1", "name": "n", "v": 1}),
        )
        .0
    };
    let mut s = SqliteStore::open(
        &path,
        SqliteOptions {
            synchronous_full: false,
            busy_timeout_ms: 100,
            ..SqliteOptions::default()
        },
    )
    .unwrap();
    assert_eq!(s.device(&d1).unwrap().unwrap().feed_head, 2);
    let got = s
        .get_item(&Owner::Device(d1.clone()), "Down", &ch.key)
        .unwrap()
        .unwrap();
    assert_eq!((got.item, got.version), (ch.item.clone(), ch.version));
    assert_eq!(s.read_feed(&d1, 1, 10).unwrap().changes.len(), 1);
    assert_eq!(
        s.get_item(&Owner::Device(d1.clone()), "Both", &key("d#d1", "x#n"))
            .unwrap(),
        None,
        "other model"
    );
    drop(s);

    let raw = Connection::open(&path).unwrap();
    let newer = SCHEMA_VERSION + 1;
    raw.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'schema_version'",
        [newer.to_string()],
    )
    .unwrap();
    drop(raw);
    let err = SqliteStore::open(&path, SqliteOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(&err, StoreError::Database(m) if m.contains(&format!("version {newer}"))),
        "{err}"
    );
}

#[test]
fn a_layout_1_file_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         INSERT INTO meta VALUES ('schema_version', '1');
         CREATE TABLE devices (account TEXT NOT NULL, device TEXT NOT NULL, secret_hash TEXT NOT NULL,
            registered_ms INTEGER NOT NULL, online INTEGER NOT NULL DEFAULT 0, last_seen_ms INTEGER,
            schema_version TEXT, cursor_acked INTEGER NOT NULL DEFAULT 0, feed_head INTEGER NOT NULL DEFAULT 0,
            feed_floor INTEGER NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 0, last_error TEXT,
            PRIMARY KEY (account, device)) WITHOUT ROWID;
         INSERT INTO devices (account, device, secret_hash, registered_ms, feed_head, feed_floor)
            VALUES ('a', 'd1', 'h', 1, 1, 1);
         CREATE TABLE items (account TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL,
            pk TEXT NOT NULL, sk TEXT NOT NULL, item TEXT, version TEXT NOT NULL, deleted INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL, PRIMARY KEY (account, device, pk, sk)) WITHOUT ROWID;",
    )
    .unwrap();
    drop(raw);
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let d1 = dev("a", "d1");
    let rec = s.device(&d1).unwrap().unwrap();
    assert_eq!(rec.changes_applied, 0);
    let schema = schema();
    let ch = put(
        &schema,
        "Up",
        json!({"deviceId": "d1", "name": "n"}),
        ver(NOW, 1),
    );
    let (r, _) = s
        .apply_push(&schema, &mut clock(), NOW, RULES, &d1, &[ch])
        .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    assert_eq!(s.device(&d1).unwrap().unwrap().changes_applied, 1);
    let layout: String = s
        .conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(layout, SCHEMA_VERSION.to_string());
}

/// The layout-2 tables as that version created them (no `api_keys`).
const LAYOUT_2: &str = "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('schema_version', '2');
    CREATE TABLE devices (account TEXT NOT NULL, device TEXT NOT NULL, secret_hash TEXT NOT NULL,
        registered_ms INTEGER NOT NULL, online INTEGER NOT NULL DEFAULT 0, last_seen_ms INTEGER,
        schema_version TEXT, cursor_acked INTEGER NOT NULL DEFAULT 0, feed_head INTEGER NOT NULL DEFAULT 0,
        feed_floor INTEGER NOT NULL DEFAULT 0, pending INTEGER NOT NULL DEFAULT 0, last_error TEXT,
        changes_applied INTEGER NOT NULL DEFAULT 0, changes_superseded INTEGER NOT NULL DEFAULT 0,
        changes_rejected INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account, device)) WITHOUT ROWID;
    INSERT INTO devices (account, device, secret_hash, registered_ms, feed_head, feed_floor, changes_applied)
        VALUES ('a', 'd1', 'h', 1, 1, 1, 7);
    CREATE TABLE items (account TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL,
        pk TEXT NOT NULL, sk TEXT NOT NULL, item TEXT, version TEXT NOT NULL, deleted INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL, base TEXT, PRIMARY KEY (account, device, pk, sk)) WITHOUT ROWID;
";

#[test]
fn a_layout_2_file_is_upgraded_in_place_with_an_empty_key_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch(LAYOUT_2).unwrap();
    let has_keys: bool = raw
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'api_keys'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .unwrap();
    assert!(!has_keys, "the layout-2 file starts without the key table");
    drop(raw);

    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    // The old rows are intact.
    let rec = s.device(&dev("a", "d1")).unwrap().unwrap();
    assert_eq!(rec.changes_applied, 7);
    // The new table works.
    assert_eq!(s.live_api_keys().unwrap(), 0);
    let id = s
        .create_api_key("a", KeyScope::Admin, "sha256:x", NOW)
        .unwrap();
    assert_eq!(s.api_key(&id).unwrap().unwrap().scope, KeyScope::Admin);
    let layout: String = s
        .conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(layout, SCHEMA_VERSION.to_string());
    drop(s);
    // Reopening an upgraded file changes nothing.
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(s.api_keys("a").unwrap().len(), 1);
}

#[test]
fn a_layout_3_file_is_upgraded_with_devices_that_have_no_broker_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch(&LAYOUT_2.replace("('schema_version', '2')", "('schema_version', '3')"))
        .unwrap();
    raw.execute_batch(
        "CREATE TABLE api_keys (id TEXT PRIMARY KEY, account TEXT NOT NULL, scope TEXT NOT NULL,
            secret_hash TEXT NOT NULL, created_ms INTEGER NOT NULL, revoked_ms INTEGER) WITHOUT ROWID;",
    )
    .unwrap();
    drop(raw);

    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let d1 = dev("a", "d1");
    let old = s.device(&d1).unwrap().unwrap();
    assert_eq!(
        (old.changes_applied, old.broker_hash.as_deref()),
        (7, None),
        "the old row is intact and has no broker hash (its secret was never stored)"
    );
    // A rotation gives it one.
    assert!(s
        .set_device_secret(&d1, "sha256:new", Some("$7$b"))
        .unwrap());
    assert_eq!(
        s.device(&d1).unwrap().unwrap().broker_hash.as_deref(),
        Some("$7$b")
    );
    let layout: String = s
        .conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!((layout.as_str(), SCHEMA_VERSION), ("8", 8));
}

#[test]
fn a_layout_5_file_is_upgraded_with_answered_counts_and_feed_generations_from_zero() {
    let schema = schema();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let d1 = dev("a", "d1");
    {
        let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        s.register_device(&d1, "h", None, NOW).unwrap();
        let ch = put(
            &schema,
            "Both",
            json!({"deviceId": "d1", "name": "n"}),
            ver(NOW, 1),
        );
        s.apply_push(&schema, &mut clock(), NOW, RULES, &d1, &[ch])
            .unwrap();
    }
    // The file as layout 5 had it: without the four columns.
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch(
        "ALTER TABLE devices DROP COLUMN changes_duplicate;
         ALTER TABLE devices DROP COLUMN changes_answered;
         ALTER TABLE devices DROP COLUMN feed_gen;
         ALTER TABLE devices DROP COLUMN feed_generations;
         UPDATE meta SET value = '5' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(raw);
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let rec = s.device(&d1).unwrap().unwrap();
    assert_eq!(
        (rec.changes_applied, rec.feed_head),
        (1, 2),
        "the old row is intact"
    );
    let page = s.read_feed(&d1, 1, 10).unwrap();
    assert_eq!(
        (page.answered, page.generations.clone()),
        (
            0,
            vec![devtables_sync::cloud::FeedGeneration { gen: 0, base: 0 }]
        ),
        "a migrated store starts below every figure a layout-6 store told a device"
    );
    let again = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "m"}),
        ver(NOW, 2),
    );
    s.apply_push(&schema, &mut clock(), NOW, RULES, &d1, &[again])
        .unwrap();
    let page = s.read_feed(&d1, 1, 10).unwrap();
    assert_eq!(page.answered, 1);
    assert_eq!(page.generations.len(), 2, "{:?}", page.generations);
    assert_eq!(
        page.generations[1].base, 2,
        "the new generation took over at the old head"
    );
    let layout: String = s
        .conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(layout, SCHEMA_VERSION.to_string());
}

/// Rows of `table` that belong to the device.

#[test]
fn a_group_keeps_each_operation_whole_and_is_durable_only_at_its_commit() {
    let (schema, d1, d2) = (schema(), dev("a", "d1"), dev("a", "d2"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let open = || SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    let mut c = clock();
    let push = |s: &mut SqliteStore, c: &mut HlcClock, d: &DeviceId, name: &str| {
        let p = put(
            &schema,
            "Both",
            json!({"deviceId": d.device, "name": name, "v": 1}),
            ver(NOW + 1, 7),
        );
        s.apply_push(&schema, c, NOW, RULES, d, &[p])
    };
    // Pushes applied for the device, and its feed head, as this connection reads them.
    let written = |s: &mut SqliteStore, d: &DeviceId| {
        let r = s.device(d).unwrap().unwrap();
        (r.changes_applied, r.feed_head)
    };
    {
        let mut s = open();
        s.register_device(&d1, "hash", None, NOW).unwrap();
        s.register_device(&d2, "hash", None, NOW).unwrap();

        // A group that never commits (the process dies with it open) leaves nothing.
        s.begin_group().unwrap();
        push(&mut s, &mut c, &d1, "lost").unwrap();
        assert_eq!(
            written(&mut s, &d1).0,
            1,
            "the group's reads see its own writes"
        );
        let page = s.read_feed(&d1, 0, 10).unwrap();
        assert_eq!(
            page.head,
            written(&mut s, &d1).1,
            "a feed read in a group sees it too"
        );
    }
    let mut s = open();
    let (applied, head) = written(&mut s, &d1);
    assert_eq!(applied, 0, "an uncommitted group is not durable");

    // Inside a group, a failed operation undoes only itself.
    s.begin_group().unwrap();
    assert!(
        s.begin_group().is_err(),
        "a group inside a group is refused"
    );
    push(&mut s, &mut c, &d1, "kept").unwrap();
    s.revoke_device(&d2, false).unwrap();
    assert!(matches!(
        push(&mut s, &mut c, &d2, "refused"),
        Err(StoreError::DeviceRevoked(_))
    ));
    push(&mut s, &mut c, &d1, "kept too").unwrap();
    s.commit_group().unwrap();
    s.commit_group().unwrap(); // nothing open: nothing to do
    drop(s);

    let mut s = open();
    assert_eq!(
        written(&mut s, &d1),
        (2, head + 2),
        "both pushes of d1 committed"
    );
    assert_eq!(written(&mut s, &d2).0, 0, "the refused push left nothing");
    assert_eq!(
        s.device(&d2).unwrap().unwrap().secret_hash,
        REVOKED_SECRET_HASH
    );
    // Outside a group every operation commits on its own, as before.
    push(&mut s, &mut c, &d1, "alone").unwrap();
    drop(s);
    assert_eq!(written(&mut open(), &d1), (3, head + 3));
}

/// A fan-out pending when the process stops (its job committed with the item) is found at the
/// next open and worked off from where the write left it.
#[test]
fn a_pending_fan_out_survives_a_reopen_and_is_worked_off() {
    let schema = schema();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let options = SqliteOptions {
        fanout_batch: 2,
        ..SqliteOptions::default()
    };
    let devices: Vec<DeviceId> = (0..5).map(|i| dev("acme", &format!("d{i}"))).collect();
    {
        let mut s = SqliteStore::open(&path, options.clone()).unwrap();
        for d in &devices {
            s.register_device(d, "hash", None, NOW).unwrap();
        }
        assert!(!s.fanout_pending_hint());
        let acct = Owner::Account("acme".into());
        let (_, advanced) = api_put(
            &mut s,
            &schema,
            &mut clock(),
            NOW,
            &acct,
            "Bcast",
            json!({"name": "fw"}),
        );
        let reached: Vec<&DeviceId> = advanced.iter().map(|(d, _)| d).collect();
        assert_eq!(reached, vec![&devices[0], &devices[1]], "the write's batch");
        assert!(s.fanout_pending_hint());
        // Stopped here, no step run.
    }
    let mut s = SqliteStore::open(&path, options).unwrap();
    assert!(s.fanout_pending_hint(), "found at open");
    let mut steps = Vec::new();
    while let Some(step) = s.fanout_step().unwrap() {
        steps.push(step.into_iter().map(|(d, _)| d).collect::<Vec<_>>());
    }
    assert_eq!(
        steps,
        vec![
            vec![devices[2].clone(), devices[3].clone()],
            vec![devices[4].clone()]
        ]
    );
    assert!(
        !s.fanout_pending_hint(),
        "cleared by the step that found none"
    );
    for d in &devices {
        let page = s.read_feed(d, 1, 10).unwrap();
        assert_eq!(
            (page.head, page.changes.len()),
            (2, 1),
            "{d}: one entry, at the head after its registration's"
        );
    }
}
