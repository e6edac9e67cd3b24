//! The `versions` table stays bounded: the periodic collection forgets the versions of
//! acknowledged changes of up-only models and old tombstones, and keeps what is still needed
//! (pending keys, live items that sync down).

use std::time::Duration;

use devtables_agent::Agent;
use devtables_cloud::ops::WriteKind;
use devtables_sync::identity::Owner;
use serde_json::json;

use super::support::{
    agent_config, device, eventually, eventually_in_cloud, item, mqtt_port, schema, start_cloud,
};

/// The side table the agent keeps versions in.
const VERSIONS: &str = "versions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collection_forgets_what_nobody_needs_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    let mut config = agent_config(dir.path(), &secret, mqtt_port(&cloud));
    config.version_gc_interval = Duration::from_millis(50);
    config.version_gc_slice = 3;
    config.tombstone_retention = Duration::ZERO;
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "ready", |a| a.status().ready).await;
    let db = agent.db().clone();

    // Up-only changes: their versions are useless once acknowledged.
    for i in 0..10 {
        db.create(
            "Fault",
            &item(json!({"deviceId": "d1", "id": format!("f{i}"), "severity": "info"})),
        )
        .unwrap();
    }
    // A setting that stays (syncs down: its version guards against older cloud writes) and
    // one deleted from the cloud (a tombstone; the retention here is zero).
    for name in ["keep", "gone"] {
        db.create(
            "Setting",
            &item(json!({"deviceId": "d1", "name": name, "value": "1"})),
        )
        .unwrap();
    }
    eventually_in_cloud(&cloud, &agent, "Setting", 2).await;
    eventually(&agent, "acknowledged", |a| a.status().pending == 0).await;
    cloud
        .write_item(
            Owner::Device(device()),
            "Setting",
            item(json!({"name": "gone"})),
            WriteKind::Remove,
        )
        .await
        .unwrap();
    eventually(&agent, "the remote delete applied", |a| {
        a.db()
            .get("Setting", &item(json!({"deviceId": "d1", "name": "gone"})))
            .unwrap()
            .is_none()
    })
    .await;
    eventually(&agent, "the collection ran, one version left", |a| {
        let s = a.status();
        s.versions_collected >= 10
            && s.tombstones_collected >= 1
            && a.db().side_len(VERSIONS).unwrap() == 1
    })
    .await;

    // The one left is the live setting's.
    assert!(db
        .side_get(VERSIONS, b"device#d1\0setting#keep")
        .unwrap()
        .is_some());
    cloud.shutdown().await;
    drop(db);
    agent.shutdown().await;
}
