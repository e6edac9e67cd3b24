//! The agent's queues are bounded and losing a place in them loses nothing: a burst of writes
//! through a one-slot input queue all reach the cloud (the event loop reloads the durable
//! outbox), and publishes refused by a full MQTT request queue are counted and resent.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use devtables_agent::Agent;
use devtables_cloud::ops::WriteKind;
use devtables_schema::Item;
use devtables_sync::identity::Owner;
use serde_json::json;

use super::support::{
    agent_config, device, eventually, eventually_in_cloud, free_port, item, mqtt_port, register,
    schema, start_cloud,
};

fn fault(i: usize) -> Item {
    item(json!({"deviceId": "d1", "id": format!("f{i:03}"), "severity": "info"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_through_a_one_slot_input_queue_reaches_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    let mut config = agent_config(dir.path(), &secret, mqtt_port(&cloud));
    config.input_queue = 1;
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "ready", |a| a.status().ready).await;

    // A command whose handler holds the event loop until the burst is written: the queue
    // fills after one notification, whatever the scheduling.
    let (entered_tx, entered) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let (entered_tx, release_rx) = (Mutex::new(entered_tx), Mutex::new(release_rx));
    agent.on_command(
        "hold",
        Arc::new(move |_item: &Item| {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(super::support::WAIT);
            Ok(json!({}))
        }),
    );
    cloud
        .write_item(
            Owner::Device(device()),
            "Command",
            item(json!({"command": "hold"})),
            WriteKind::Create,
        )
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || entered.recv_timeout(super::support::WAIT))
        .await
        .unwrap()
        .expect("the command handler ran");

    let n = 50;
    for i in 0..n {
        agent.db().create("Fault", &fault(i)).unwrap();
    }
    assert_eq!(agent.status().pending, n);
    release.send(()).unwrap();

    eventually_in_cloud(&cloud, &agent, "Fault", n).await;
    eventually(&agent, "every change acknowledged", |a| {
        a.status().pending == 0
    })
    .await;
    let status = agent.status();
    assert!(
        status.inputs_missed >= 1,
        "the one-slot queue overflowed: {status:?}"
    );
    agent.shutdown().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_refused_by_a_full_mqtt_queue_are_counted_and_resent() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let secret = register(&cloud_dir).await;
    let port = free_port();
    let mut config = agent_config(dir.path(), &secret, port);
    // Room for the two subscriptions and the hello of a connect; one change per push, so the
    // welcome releases 32 pushes at once (the in-flight window) into three slots. The MQTT event
    // loop drains the queue on its own task meanwhile, so the burst must be far larger than the
    // queue for some publishes to meet it full.
    config.mqtt_queue = 3;
    config.sync.max_batch_changes = 1;
    config.sync.max_in_flight = 32;
    config.sync.retransmit_base_ms = 200;
    let agent = Agent::start(config, schema()).unwrap();
    let n = 32;
    for i in 0..n {
        agent.db().create("Fault", &fault(i)).unwrap();
    }
    let cloud = start_cloud(&cloud_dir, port).await;
    eventually_in_cloud(&cloud, &agent, "Fault", n).await;
    eventually(&agent, "every change acknowledged", |a| {
        a.status().pending == 0
    })
    .await;
    let status = agent.status();
    assert!(status.publish_dropped >= 1, "{status:?}");
    agent.shutdown().await;
    cloud.shutdown().await;
}
