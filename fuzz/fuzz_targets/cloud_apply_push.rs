//! A hostile device's push applied to the real cloud store: whatever a registered device sends
//! (any model, key, item, version or base), the cloud answers every change with a typed status
//! and never panics or fails the store transaction.
#![no_main]

use devtables_cloud::store::sqlite::SqliteStore;
use devtables_cloud::store::CloudStore;
use devtables_schema::Schema;
use devtables_sync::apply::PushRules;
use devtables_sync::hlc::{node_id_for, HlcClock};
use devtables_sync::identity::DeviceId;
use devtables_sync::wire::{decode_up, ChangeStatus, UpMsg, WireConfig};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// 2026-11-26T12:00:00Z: the seeds' versions are around it.
const NOW: u64 = 1_795_694_400_000;
const DRIFT: u64 = 60_000;

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::from_json5(include_str!("../../examples/schema.json5")).expect("the example schema")
    })
}

fuzz_target!(|data: &[u8]| {
    let cfg = WireConfig {
        max_message_bytes: 16 * 1024,
        max_changes: 16,
    };
    let Ok(decoded) = decode_up(data, &cfg) else {
        return;
    };
    let UpMsg::Push { changes, .. } = decoded.msg else {
        return;
    };
    let schema = schema();
    let mut store = SqliteStore::open_in_memory().expect("an in-memory store");
    let dev = DeviceId::new("acme", "d1").expect("a device id");
    store.register_device(&dev, "unused-hash", None, NOW).expect("register");
    let mut clock = HlcClock::new(node_id_for("cloud"));
    // As the cloud engine decides it: a sender announcing another schema tag gets the
    // neighbour rules (fields and enum values the schema lacks are kept).
    let rules = PushRules {
        max_drift_ms: DRIFT,
        from_neighbour: decoded.schema != schema.tag() && decoded.schema.contains('+'),
        cloud_schema: schema.tag().to_string(),
    };
    // Twice: a retransmitted push must be answered as well as the first.
    for _ in 0..2 {
        let (results, _) = store
            .apply_push(schema, &mut clock, NOW, &rules, &dev, &changes)
            .expect("a hostile push is answered, not a store failure");
        assert_eq!(results.len(), changes.len(), "one result per change");
        for (r, c) in results.iter().zip(&changes) {
            assert_eq!((&r.model, &r.key, r.version), (&c.model, &c.key, c.version));
            match &r.status {
                ChangeStatus::Applied | ChangeStatus::Stale { .. } | ChangeStatus::Rejected { .. } => {}
            }
        }
    }
    assert!(
        clock.last().wall_ms <= NOW + DRIFT,
        "a pushed version moved the cloud clock past the drift bound"
    );
});
