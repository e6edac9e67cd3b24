//! A rolling schema upgrade across a fleet, with real processes: the cloud and devices on
//! neighbouring schema versions exchange items without losing fields, a device upgraded before
//! its cloud keeps what the cloud cannot take yet and sends it after the cloud's upgrade, an
//! incompatible change is refused with the difference named, and a device upgraded last
//! catches up what its old schema could not hold. docs/schema.md, "Changing a schema in a live
//! fleet", describes these rules.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::example_schema;
use crate::harness::{eventually, unique_prefix, AgentProc, AgentSpec, BrokerChoice, CloudProc};

const ACCOUNT: &str = "acme";

/// Writes the example schema changed by `edits` (each a unique `from` → `to` replacement) as
/// `name` in `dir`.
fn schema_variant(dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(example_schema()).unwrap();
    for (from, to) in edits {
        assert_eq!(
            text.matches(from).count(),
            1,
            "`{from}` is in the example once"
        );
        text = text.replace(from, to);
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Version 2 of the example: compatible changes only (a new optional field on an up model and
/// on a both-ways model, a widened enum, a new up model and a new down model).
fn v2(dir: &Path) -> PathBuf {
    schema_variant(
        dir,
        "v2.json5",
        &[
            ("version: '1.0.0'", "version: '2.0.0'"),
            (
                "severity: {type: 'string', enum: ['info', 'warn', 'critical'], required: true},",
                "severity: {type: 'string', enum: ['info', 'warn', 'critical', 'fatal'], required: true},\n            code: {type: 'string'},",
            ),
            (
                "value: {type: 'string'},\n        },",
                "value: {type: 'string'},\n            unit: {type: 'string'},\n        },",
            ),
            (
                "Firmware: {sync: 'down', broadcast: true},",
                "Firmware: {sync: 'down', broadcast: true},\n        Alert: {sync: 'up'},\n        Notice: {sync: 'down'},",
            ),
            (
                "Firmware: {\n",
                "Alert: {\n            pk: {type: 'string', value: 'device#${deviceId}'},\n            sk: {type: 'string', value: 'alert#${name}'},\n            deviceId: {type: 'string', required: true},\n            name: {type: 'string', required: true},\n        },\n        Notice: {\n            pk: {type: 'string', value: 'device#${deviceId}'},\n            sk: {type: 'string', value: 'notice#${name}'},\n            deviceId: {type: 'string', required: true},\n            name: {type: 'string', required: true},\n            text: {type: 'string'},\n        },\n        Firmware: {\n",
            ),
        ],
    )
}

/// An incompatible change: a field's type.
fn v3_incompatible(dir: &Path) -> PathBuf {
    schema_variant(
        dir,
        "v3.json5",
        &[
            ("version: '1.0.0'", "version: '3.0.0'"),
            ("source: {type: 'string'},", "source: {type: 'object'},"),
        ],
    )
}

struct Fleet {
    dir: tempfile::TempDir,
    cloud: CloudProc,
    prefix: String,
}

impl Fleet {
    fn agent(&self, device: &str, secret: &str, schema: &Path) -> AgentProc {
        AgentProc::start(&AgentSpec {
            dir: self.dir.path(),
            name: device,
            account: ACCOUNT,
            device,
            secret,
            mqtt: &self.cloud.mqtt,
            prefix: &self.prefix,
            schema: Some(schema),
        })
    }

    /// The device's items of `model` in the cloud (an API failure panics, with its answer).
    fn items(&self, device: &str, model: &str) -> Vec<Value> {
        self.cloud
            .items(ACCOUNT, device, model)
            .unwrap_or_else(|e| panic!("reading {device}'s {model} items: {e}"))
            .into_iter()
            .map(|row| row["item"].clone())
            .collect()
    }

    fn cloud_count(&self, name: &str) -> u64 {
        let status = self.cloud.get("/v1/status").expect("the cloud's status");
        find_u64(&status, name).unwrap_or_else(|| panic!("no {name} in {status}"))
    }
}

/// The first number named `name` anywhere in `v`.
fn find_u64(v: &Value, name: &str) -> Option<u64> {
    match v {
        Value::Object(map) => map
            .get(name)
            .and_then(Value::as_u64)
            .or_else(|| map.values().find_map(|x| find_u64(x, name))),
        Value::Array(items) => items.iter().find_map(|x| find_u64(x, name)),
        _ => None,
    }
}

#[test]
fn a_fleet_upgrades_its_schema_one_side_at_a_time_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let v1 = example_schema();
    let v2 = v2(dir.path());
    let v3 = v3_incompatible(dir.path());
    let cloud = CloudProc::start_with_schema(dir.path(), &prefix, BrokerChoice::Embedded(0), &v1);
    let fleet = Fleet { dir, cloud, prefix };
    let old_secret = fleet.cloud.register(ACCOUNT, "old");
    let new_secret = fleet.cloud.register(ACCOUNT, "new");
    let bad_secret = fleet.cloud.register(ACCOUNT, "bad");

    // 1. Cloud on v1; one device on v1, one already on v2 (upgraded first).
    let mut old = fleet.agent("old", &old_secret, &v1);
    let mut new = fleet.agent("new", &new_secret, &v2);
    old.wait_synced();
    new.wait_synced();
    assert_eq!(
        new.status()["cloud_schema"]
            .as_str()
            .map(|t| t.starts_with("1.0.0+")),
        Some(true),
        "the v2 device sees that the cloud runs v1: {}",
        new.status()
    );
    // A fault with v2's new field and new enum value: the v1 cloud keeps both.
    let fault = new.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": "new", "severity": "fatal", "code": "E42", "message": "fan"}}));
    let id = fault["id"].as_str().unwrap().to_string();
    let held = eventually("the v2 fault in the v1 cloud", || {
        fleet
            .items("new", "Fault")
            .into_iter()
            .find(|f| f["id"] == id.as_str())
            .ok_or("not yet".to_string())
    });
    assert_eq!(held["code"], "E42", "{held}");
    assert_eq!(held["severity"], "fatal", "{held}");
    eventually("the device told the cloud kept it", || {
        let s = new.status();
        (s["kept_from_neighbour_schema"] == 1)
            .then_some(())
            .ok_or(format!("{s}"))
    });
    // Counted before the acknowledgement went out.
    assert_eq!(fleet.cloud_count("push_changes_kept_from_neighbour"), 1);
    // A model the v1 cloud lacks: deferred, kept in the device's outbox, never rejected.
    new.op(json!({"op": "create", "model": "Alert", "item": {"deviceId": "new", "name": "door"}}));
    eventually("the alert deferred", || {
        let s = new.status();
        (s["deferred"].as_u64() >= Some(1) && s["pending"] == 1)
            .then_some(())
            .ok_or(format!("{s}"))
    });
    assert_eq!(new.status()["rejected"], 0);
    let absent = fleet.cloud.items(ACCOUNT, "new", "Alert");
    assert!(
        absent
            .as_ref()
            .is_err_and(|e| e.contains("unknown model Alert")),
        "the v1 cloud holds no alert: {absent:?}"
    );
    assert!(fleet.cloud_count("push_changes_deferred") >= 1);

    // 2. The cloud upgrades to v2 (a restart): the deferred alert arrives.
    let mut fleet = fleet;
    fleet.cloud.restart_with_schema(&v2);
    eventually("the deferred alert in the v2 cloud", || {
        let alerts = fleet.items("new", "Alert");
        (alerts.len() == 1)
            .then_some(())
            .ok_or(format!("{alerts:?}"))
    });
    new.wait_synced();
    assert_eq!(new.status()["rejected"], 0);

    // The v2 cloud writes v2 items for the v1 device: a setting with a new field is kept whole
    // on the device; a notice (a model v1 lacks) is skipped for now.
    let (code, body) = fleet.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/old/items/Setting",
        json!({"deviceId": "old", "name": "speed", "value": "3", "unit": "rpm"}),
    );
    assert!(code < 300, "{code} {body}");
    let (code, body) = fleet.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/old/items/Notice",
        json!({"deviceId": "old", "name": "welcome", "text": "hello"}),
    );
    assert!(code < 300, "{code} {body}");
    let setting = eventually("the v2 setting on the v1 device", || {
        let got = old.op(json!({"op": "get", "model": "Setting",
            "item": {"deviceId": "old", "name": "speed"}}));
        (got["unit"] == "rpm")
            .then_some(got.clone())
            .ok_or(format!("{got}"))
    });
    assert_eq!(setting["value"], "3");
    // Stored by the page's transaction; counted once the agent has handled the page.
    eventually("the v1 device counted the item it kept", || {
        let s = old.status();
        (s["kept_from_neighbour_schema"] == 1)
            .then_some(())
            .ok_or(format!("{s}"))
    });
    // The v1 device changes another field of it: the field it does not know stays.
    old.op(json!({"op": "update", "model": "Setting",
        "item": {"deviceId": "old", "name": "speed", "value": "4"}}));
    old.wait_synced();
    let in_cloud = fleet
        .items("old", "Setting")
        .into_iter()
        .find(|s| s["name"] == "speed")
        .expect("the setting in the cloud");
    assert_eq!(
        (&in_cloud["value"], &in_cloud["unit"]),
        (&json!("4"), &json!("rpm"))
    );

    // 3. An incompatible device (a field's type changed) is refused, the difference named.
    let mut bad = fleet.agent("bad", &bad_secret, &v3);
    bad.wait_synced();
    bad.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": "bad", "severity": "warn", "source": {"pin": 7}}}));
    let status = eventually("the incompatible fault refused", || {
        let s = bad.status();
        (s["rejected"] == 1)
            .then_some(s.clone())
            .ok_or(format!("{s}"))
    });
    let why = status["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("source"), "the refusal names the field: {why}");
    assert!(fleet.items("bad", "Fault").is_empty());

    // 4. The v1 device upgrades last: it catches up the feed from the start, and the notice its
    // old schema could not hold arrives.
    old.stop();
    let mut old = fleet.agent("old", &old_secret, &v2);
    old.wait_synced();
    let notice = eventually("the notice after the device's upgrade", || {
        let got = old.op(json!({"op": "get", "model": "Notice",
            "item": {"deviceId": "old", "name": "welcome"}}));
        (got["text"] == "hello")
            .then_some(got.clone())
            .ok_or(format!("{got}"))
    });
    assert_eq!(notice["name"], "welcome");
    assert!(
        !old.logs
            .matching("catching up the cloud's feed from the start")
            .is_empty(),
        "the upgrade restarted the catch-up"
    );
    assert!(old.status()["cloud_schema"].is_null(), "same schema now");
}
