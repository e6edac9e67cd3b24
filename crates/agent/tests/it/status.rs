//! `AgentStatus` tells the truth: `pending` is the durable outbox at every moment (after
//! offline writes, acknowledgements and a restart), `cursor` follows a full resync, and
//! `last_error` clears once the cloud welcomes the device.

use devtables_agent::Agent;
use devtables_cloud::ops::WriteKind;
use devtables_sync::identity::Owner;
use serde_json::json;

use super::support::{
    agent_config, device, eventually, eventually_in_cloud, free_port, item, offline, register,
    schema, start_cloud,
};

fn fault(i: usize) -> devtables_schema::Item {
    item(json!({"deviceId": "d1", "id": format!("f{i:02}"), "severity": "info"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_counts_offline_writes_at_once_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = offline(dir.path());
    let agent = Agent::start(config.clone(), schema()).unwrap();
    let mut watch = agent.watch_status();
    for i in 0..20 {
        agent.db().create("Fault", &fault(i)).unwrap();
        // Exact as soon as the write returned, without waiting for the event loop.
        assert_eq!(agent.status().pending, i + 1);
    }
    // Coalesced writes of one key are one pending change.
    agent
        .db()
        .update(
            "Fault",
            &item(json!({"deviceId": "d1", "id": "f00", "severity": "warn"})),
        )
        .unwrap();
    assert_eq!(agent.status().pending, 20);
    // Watchers see the same number once the event loop has handled the changes.
    tokio::time::timeout(super::support::WAIT, watch.wait_for(|s| s.pending == 20))
        .await
        .expect("watchers see 20 pending")
        .unwrap();
    agent.shutdown().await;

    let agent = Agent::start(config, schema()).unwrap();
    assert_eq!(agent.status().pending, 20);
    assert_eq!(agent.watch_status().borrow().pending, 20);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_clears_the_error_resync_sets_the_cursor_and_acks_empty_pending() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let secret = register(&cloud_dir).await;
    // Items waiting in the cloud make the device's first full resync end at a cursor above 0.
    {
        let cloud = start_cloud(&cloud_dir, 0).await;
        for name in ["a", "b"] {
            cloud
                .write_item(
                    Owner::Device(device()),
                    "Setting",
                    item(json!({"name": name, "value": "1"})),
                    WriteKind::Create,
                )
                .await
                .unwrap();
        }
        cloud.shutdown().await;
    }

    // The broker is down: the agent records why it cannot connect, and writes wait.
    let port = free_port();
    let agent = Agent::start(agent_config(dir.path(), &secret, port), schema()).unwrap();
    for i in 0..5 {
        agent.db().create("Fault", &fault(i)).unwrap();
    }
    assert_eq!(agent.status().pending, 5);
    eventually(&agent, "a connection error", |a| {
        a.status().last_error.is_some()
    })
    .await;
    assert_eq!(agent.status().cursor, 0);

    let cloud = start_cloud(&cloud_dir, port).await;
    eventually(&agent, "ready", |a| a.status().ready).await;
    eventually_in_cloud(&cloud, &agent, "Fault", 5).await;
    eventually(&agent, "every change acknowledged", |a| {
        a.status().pending == 0
    })
    .await;
    let status = agent.status();
    assert!(status.ready);
    assert_eq!(status.last_error, None, "welcomed: the old error is over");
    // The cursor the device reports is where its resync ended: the head of its feed (the two
    // settings); the cloud records the end of the resync as the device's acknowledged cursor.
    let deadline = std::time::Instant::now() + super::support::WAIT;
    loop {
        let record = cloud
            .store
            .call(|c| c.store.device(&device()))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let cursor = agent.status().cursor;
        if cursor > 0 && cursor == record.feed_head && record.cursor_acked == cursor {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status cursor {cursor}, cloud record {record:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(agent.watch_status().borrow().pending, 0);
    // The settings came down with the resync.
    assert!(agent
        .db()
        .get("Setting", &item(json!({"deviceId": "d1", "name": "b"})))
        .unwrap()
        .is_some());
    agent.shutdown().await;
    cloud.shutdown().await;
}

/// A local change that loses to a newer cloud write is counted in `superseded`, named in
/// `last_error`, leaves the outbox, and the cloud's value is what the device holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_change_beaten_by_a_newer_cloud_write_is_counted_as_superseded() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let secret = register(&cloud_dir).await;
    let port = free_port();
    // Offline: the device changes a setting first...
    let agent = Agent::start(agent_config(dir.path(), &secret, port), schema()).unwrap();
    agent
        .db()
        .create(
            "Setting",
            &item(json!({"deviceId": "d1", "name": "mode", "value": "device"})),
        )
        .unwrap();
    assert_eq!(agent.status().pending, 1);
    // ... then the cloud changes it, later.
    let cloud = start_cloud(&cloud_dir, port).await;
    cloud
        .write_item(
            Owner::Device(device()),
            "Setting",
            item(json!({"name": "mode", "value": "cloud"})),
            WriteKind::Create,
        )
        .await
        .unwrap();
    eventually(&agent, "the local change superseded", |a| {
        a.status().superseded == 1 && a.status().pending == 0
    })
    .await;
    let held = agent
        .db()
        .get("Setting", &item(json!({"deviceId": "d1", "name": "mode"})))
        .unwrap()
        .expect("the setting");
    assert_eq!(held["value"], "cloud");
    let error = agent.status().last_error.unwrap_or_default();
    assert!(error.contains("superseded"), "the status says why: {error}");
    assert_eq!(agent.status().superseded, 1, "counted once");
    agent.shutdown().await;
    cloud.shutdown().await;
}
