//! # devtables-schema
//!
//! Parses and validates a OneTable 1.1.0-compatible JSON5 schema and performs everything the
//! schema defines per item: casting, validation, defaults, generated ids, `${field}` value
//! templates for keys, timestamps, hidden fields, TTL and query-key resolution.
//!
//! The database crate stores what this crate prepares; the replication layer uses the same
//! models to check items arriving from other nodes ([`Model::normalize_stored`]). Nothing
//! here does I/O except [`Schema::load`], and the caller owns the clock (`now_ms`).
//!
//! ```
//! use devtables_schema::{Item, Schema};
//! let schema = Schema::from_json5(r#"{
//!     format: 'onetable:1.1.0', version: '1.0.0',
//!     indexes: {primary: {hash: 'pk', sort: 'sk'}},
//!     models: {Setting: {
//!         pk: {type: 'string', value: 'device#${deviceId}'},
//!         sk: {type: 'string', value: 'setting#${name}'},
//!         deviceId: {type: 'string', required: true},
//!         name: {type: 'string', required: true},
//!     }},
//! }"#).unwrap();
//! let model = schema.model("Setting").unwrap();
//! let input: Item = serde_json::from_str(r#"{"deviceId": "d1", "name": "volume"}"#).unwrap();
//! let item = model.prepare_create(&input, 0).unwrap();
//! assert_eq!(item["pk"], "device#d1");
//! assert_eq!(item["sk"], "setting#volume");
//! ```
//!
//! Modules: `parse` (loading and schema rules), `keys` (the catalogue of OneTable and Ioto
//! keys: supported, kept-and-ignored with a [`SchemaWarning`], refused), `schema` (schema-wide
//! types), `model` (per-item operations), `field` (types, casting, validation), `template`
//! (`${field}` templates), `query` (find properties → key condition and filters), `shape`
//! (what a schema means for stored data: [`SchemaShape`], its fingerprint, [`compare_shapes`]
//! and the compatibility rules; the values `unique` fields keep unique), `date`, `error`,
//! `exact_json` (JSON text in, without rounding integers past 64 bits). docs/schema.md says what
//! each schema key does in devtables.

mod date;
mod error;
mod exact_json;
mod field;
mod key_plan;
mod keys;
mod model;
mod parse;
mod query;
mod schema;
mod settings;
mod shape;
mod template;

pub use date::{format_iso_ms, format_iso_ms_bytes};
pub use error::{Reason, SchemaError, ValidationError};
pub use exact_json::{parse_json_exact, ExactJsonError};
pub use field::{Field, FieldType, Generate, MappedAttribute};
pub use key_plan::{JoinedKey, KeyBuf, KEY_INLINE};
pub use keys::SchemaWarning;
pub use model::{ttl_expiry_ms, ItemKey, Model, TtlValue};
pub use query::{Filter, FilterOp, Query, SortCondition};
pub use schema::Schema;
pub use settings::{Enable, Index, Params, Process, SyncDirection, Timestamps};
pub use shape::{compare_shapes, SchemaChange, SchemaChangeKind, SchemaChanges, SchemaShape};
pub use shape::{UniqueScope, UniqueValue};

/// A stored or input item: a JSON object.
pub type Item = serde_json::Map<String, serde_json::Value>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/schema.json5");
    const NOW: i64 = 1_795_629_600_000;

    fn example() -> Schema {
        Schema::load(std::path::Path::new(EXAMPLE)).unwrap()
    }

    fn item(v: Value) -> Item {
        v.as_object().cloned().unwrap_or_default()
    }

    fn check(model: &str, enable: Enable, sync: SyncDirection, lossy: bool, broadcast: bool) {
        let s = example();
        let p = s.model(model).map(Model::process);
        assert_eq!(
            p,
            Some(Process {
                enable,
                sync,
                lossy,
                broadcast
            }),
            "{model}"
        );
    }

    #[test]
    fn example_loads() {
        let s = example();
        assert_eq!((s.format(), s.version()), ("onetable:1.1.0", "1.0.0"));
        assert!(
            s.params().iso_dates && s.params().timestamps == Timestamps::Both && !s.params().nulls
        );
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());
        assert_eq!(
            s.primary_index(),
            &Index {
                name: "primary".into(),
                hash: "pk".into(),
                sort: Some("sk".into()),
                description: None,
            }
        );
        assert_eq!(
            s.secondary_indexes(),
            &[Index {
                name: "gs1".into(),
                hash: "gs1pk".into(),
                sort: Some("gs1sk".into()),
                description: None,
            }]
        );
        let names: Vec<&str> = s.models().map(Model::name).collect();
        assert_eq!(
            names,
            ["Command", "Fault", "Firmware", "Reading", "Scratch", "Setting", "Status"]
        );
        let text = std::fs::read_to_string(EXAMPLE).unwrap();
        assert_eq!(
            Schema::from_json5(&text).map(|s| s.models().count()).ok(),
            Some(7)
        );
    }

    #[test]
    fn example_process_settings() {
        use Enable::*;
        check("Status", Cloud, SyncDirection::None, false, false);
        check("Fault", Both, SyncDirection::Up, false, false);
        // Commands are delivered down; the example (since revised) also syncs results back up,
        // so only the documented direction is pinned here.
        let s = example();
        let command = s.model("Command").map(Model::process);
        assert!(
            command
                .is_some_and(|p| p.syncs_down() && p.on_device() && p.in_cloud() && !p.broadcast),
            "{command:?}"
        );
        check("Setting", Both, SyncDirection::Both, false, false);
        check("Reading", Both, SyncDirection::Up, true, false);
        check("Firmware", Both, SyncDirection::Down, false, true);
        check("Scratch", Device, SyncDirection::None, false, false);
    }

    #[test]
    fn example_fault_create() {
        let s = example();
        let fault = s.model("Fault").unwrap();
        let got = fault
            .prepare_create(
                &item(json!({"deviceId": "d1", "severity": "warn", "message": "hot"})),
                NOW,
            )
            .unwrap();
        let id = got["id"].as_str().unwrap_or_default().to_string();
        assert_eq!(id.len(), 26);
        assert!(
            ulid_time_ms(&id) == Some(NOW as u64),
            "the ulid carries the caller's clock"
        );
        assert_eq!(got["pk"], json!("device#d1"));
        assert_eq!(got["sk"], json!(format!("fault#{id}")));
        assert_eq!(got["gs1pk"], json!("fault#warn"));
        assert_eq!(got["gs1sk"], json!(format!("fault#d1#{id}")));
        assert_eq!(got["_type"], json!("Fault"));
        assert_eq!(got["created"], json!("2026-11-25T18:00:00.000Z"));
        assert_eq!(got["updated"], json!("2026-11-25T18:00:00.000Z"));
        assert_eq!(s.model_of(&got).map(Model::name), Some("Fault"));
        assert_eq!(
            fault
                .primary_key(&item(json!({"deviceId": "d1", "id": id})))
                .map(|k| k.sk),
            Ok(format!("fault#{id}"))
        );
        assert_eq!(
            fault.index_key(&got, &s.secondary_indexes()[0]),
            Some(("fault#warn".into(), format!("fault#d1#{id}")))
        );
        assert_eq!(fault.normalize_stored(got.clone()), Ok(got.clone()));

        let shown = fault.project(&got, false);
        assert!(
            !shown.contains_key("pk") && !shown.contains_key("sk") && !shown.contains_key("gs1pk")
        );
        assert_eq!(shown["severity"], json!("warn"));
        assert!(fault.project(&got, true).contains_key("pk"));
    }

    fn ulid_time_ms(id: &str) -> Option<u64> {
        ulid::Ulid::from_string(id).ok().map(|u| u.timestamp_ms())
    }

    #[test]
    fn example_fault_errors() {
        let s = example();
        let fault = s.model("Fault").unwrap();
        let err = fault
            .prepare_create(&item(json!({"deviceId": "d1"})), NOW)
            .unwrap_err();
        assert_eq!(
            (err.field.as_str(), &err.reason),
            ("severity", &Reason::Required)
        );
        assert!(err.to_string().starts_with("Fault.severity: "), "{err}");
        let err = fault
            .prepare_create(&item(json!({"deviceId": "d1", "severity": "x"})), NOW)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Fault.severity: value \"x\" is not one of [info, warn, critical]"
        );
        let err = fault
            .prepare_create(
                &item(json!({"deviceId": "d1", "severity": "info", "message": ""})),
                NOW,
            )
            .unwrap_err();
        assert!(matches!(err.reason, Reason::Pattern { .. }));
    }

    #[test]
    fn example_fault_ttl_and_query() {
        let s = example();
        let fault = s.model("Fault").unwrap();
        let input =
            item(json!({"deviceId": "d1", "severity": "info", "expires": "2026-11-26T18:00:00Z"}));
        let got = fault.prepare_create(&input, NOW).unwrap();
        assert_eq!(got["expires"], json!((NOW + 86_400_000) / 1000));
        assert_eq!(fault.expires_at_ms(&got), Some(NOW + 86_400_000));
        let q = fault.query(&item(json!({"deviceId": "d1"})), None).unwrap();
        assert_eq!(
            (q.hash.as_deref(), q.sort),
            (
                Some("device#d1"),
                SortCondition::BeginsWith("fault#".into())
            )
        );
        let q = fault
            .query(&item(json!({"severity": "info"})), s.index("gs1"))
            .unwrap();
        assert_eq!(
            (q.hash.as_deref(), q.sort),
            (
                Some("fault#info"),
                SortCondition::BeginsWith("fault#".into())
            )
        );
    }

    #[test]
    fn example_other_models() {
        let s = example();
        let status = s
            .model("Status")
            .unwrap()
            .prepare_create(&item(json!({"deviceId": "d1"})), NOW)
            .unwrap();
        assert_eq!(
            (
                status["pk"].clone(),
                status["sk"].clone(),
                status["state"].clone()
            ),
            (json!("status#d1"), json!("status#"), json!("offline"))
        );
        let command = s.model("Command").unwrap();
        let c = command
            .prepare_create(
                &item(json!({"deviceId": "d1", "command": "reboot", "args": {"delay": 5}})),
                NOW,
            )
            .unwrap();
        assert_eq!(c["status"], json!("pending"));
        let done = command
            .prepare_update(
                &c,
                &item(json!({"status": "done", "result": {"ok": true}})),
                NOW + 1,
            )
            .unwrap();
        assert_eq!(
            (done["status"].clone(), done["created"].clone()),
            (json!("done"), c["created"].clone())
        );
        assert_eq!(done["updated"], json!("2026-11-25T18:00:00.001Z"));
        let setting = s.model("Setting").unwrap();
        assert!(setting
            .prepare_create(&item(json!({"deviceId": "d1", "name": "Bad Name"})), NOW)
            .is_err());
        let reading = s
            .model("Reading")
            .unwrap()
            .prepare_create(
                &item(json!({"deviceId": "d", "name": "t", "value": "21.5"})),
                NOW,
            )
            .unwrap();
        assert_eq!(
            (reading["value"].clone(), reading["status"].clone()),
            (json!(21.5), json!("ok"))
        );
        let fw = s.model("Firmware").unwrap();
        assert_eq!(
            fw.primary_key(&item(json!({"version": "1.2"}))),
            Ok(ItemKey {
                pk: "firmware#".into(),
                sk: "firmware#1.2".into()
            })
        );
    }
}
