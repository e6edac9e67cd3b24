//! What an application (the fleet simulator) observes of its changes and its connection: the
//! acknowledgement hook and count, the resync and lost-connection counts, and an agent started
//! again on the in-memory database it was given.

use std::sync::{Arc, Mutex};

use devtables_agent::{Agent, AgentConfig};
use devtables_db::{Db, DbOptions};
use serde_json::json;

use super::support::{
    agent_config, eventually, eventually_in_cloud, item, mqtt_port, register, schema, start_cloud,
};

fn fault(i: usize) -> devtables_schema::Item {
    item(json!({"deviceId": "d1", "id": format!("f{i:02}"), "severity": "info"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_are_reported_once_per_entry_and_a_given_database_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let secret = register(&cloud_dir).await;
    let cloud = start_cloud(&cloud_dir, 0).await;
    let config: AgentConfig = agent_config(dir.path(), &secret, mqtt_port(&cloud));
    let db = Db::open_in_memory(schema(), DbOptions::default()).unwrap();

    let agent = Agent::start_with_db(config.clone(), db.clone()).unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let seen = acked.clone();
    agent.on_acked(Arc::new(move |entries| {
        let mut seen = seen.lock().unwrap();
        seen.extend(
            entries
                .iter()
                .map(|(model, key, _)| (model.clone(), key.sk.clone())),
        );
    }));
    eventually(&agent, "the first sync (a resync)", |a| {
        a.status().ready && a.status().resyncs == 1
    })
    .await;
    for i in 0..10 {
        agent.db().create("Fault", &fault(i)).unwrap();
    }
    eventually(&agent, "ten acknowledgements", |a| a.status().acked == 10).await;
    eventually_in_cloud(&cloud, &agent, "Fault", 10).await;
    let mut got = acked.lock().unwrap().clone();
    got.sort();
    let want: Vec<(String, String)> = (0..10)
        .map(|i| ("Fault".to_string(), format!("fault#f{i:02}")))
        .collect();
    assert_eq!(
        got, want,
        "each entry reported once, with its model and key"
    );
    assert_eq!(agent.status().pending, 0);
    agent.shutdown().await;

    // The agent did not close the database it was given: its items are still there, and a new
    // agent on it starts from the stored cursor (no second resync).
    assert_eq!(db.get("Fault", &fault(3)).unwrap().unwrap()["id"], "f03");
    let agent = Agent::start_with_db(config, db.clone()).unwrap();
    eventually(&agent, "ready again", |a| a.status().ready).await;
    agent.db().create("Fault", &fault(10)).unwrap();
    eventually(&agent, "the new write acknowledged", |a| {
        a.status().acked == 1
    })
    .await;
    assert_eq!(
        agent.status().resyncs,
        0,
        "the cursor was current: no resync"
    );
    assert_eq!(agent.status().disconnects, 0);

    // The cloud goes away: the established connection is lost, and counted once.
    cloud.shutdown().await;
    eventually(&agent, "the lost connection counted", |a| {
        a.status().disconnects == 1 && !a.status().connected
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_may_hold_its_database_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = super::support::offline(dir.path());
    config.db_in_memory = true;
    let agent = Agent::start(config.clone(), schema()).unwrap();
    agent.db().create("Fault", &fault(1)).unwrap();
    assert_eq!(agent.status().pending, 1);
    assert!(agent.db().memory_bytes().is_some());
    agent.shutdown().await;
    assert!(
        !config.db_path.exists(),
        "an in-memory agent writes no database file"
    );
}
