//! The outbox under a long outage: bounded, coalesced per key, lossy models drop their oldest
//! (counted), other models refuse new writes with a clear error; and it survives a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use devtables_agent::{Agent, AgentConfig, OutboxFull};
use devtables_db::DbError;
use serde_json::json;

use super::support::{item, schema};

/// An offline agent whose outbox holds at most `limit` entries.
fn offline(dir: &Path, limit: u64) -> AgentConfig {
    let mut c = super::support::offline(dir);
    c.outbox_limit = limit;
    c
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_refuses_or_drops_lossy_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(offline(dir.path(), 3), schema()).unwrap();
    let db = agent.db().clone();

    // Coalescing: many writes of one key hold one entry.
    for v in 0..5 {
        db.upsert(
            "Setting",
            &item(json!({"deviceId": "d1", "name": "a", "value": v.to_string()})),
        )
        .unwrap();
    }
    // Two lossy readings fill the outbox (limit 3).
    db.create(
        "Reading",
        &item(json!({"deviceId": "d1", "id": "r1", "name": "t", "value": 1})),
    )
    .unwrap();
    db.create(
        "Reading",
        &item(json!({"deviceId": "d1", "id": "r2", "name": "t", "value": 2})),
    )
    .unwrap();
    wait_for("3 pending", || agent.status().pending == 3);

    // A third reading drops the oldest lossy entry (r1), counted.
    db.create(
        "Reading",
        &item(json!({"deviceId": "d1", "id": "r3", "name": "t", "value": 3})),
    )
    .unwrap();
    // A non-lossy write also makes room by dropping a lossy entry (r2).
    db.create(
        "Fault",
        &item(json!({"deviceId": "d1", "severity": "warn"})),
    )
    .unwrap();
    // Now only Setting, r3 and the fault wait; r3 is the last lossy one.
    db.create(
        "Fault",
        &item(json!({"deviceId": "d1", "severity": "info"})),
    )
    .unwrap();
    // Nothing lossy is left: the next write of a synced model is refused, and nothing is written.
    let err = db
        .create(
            "Fault",
            &item(json!({"deviceId": "d1", "severity": "critical", "id": "f-refused"})),
        )
        .unwrap_err();
    match &err {
        DbError::Refused(inner) => assert!(inner.downcast_ref::<OutboxFull>().is_some(), "{err}"),
        other => panic!("expected OutboxFull, got {other}"),
    }
    assert!(err.to_string().contains("outbox is full"), "{err}");
    assert!(db
        .get("Fault", &item(json!({"deviceId": "d1", "id": "f-refused"})))
        .unwrap()
        .is_none());
    // Models that never leave the device are not limited by the outbox.
    db.create("Scratch", &item(json!({"name": "x", "data": {"k": 1}})))
        .unwrap();
    // All readings stay in the local database: only their replication was dropped.
    for id in ["r1", "r2", "r3"] {
        assert!(db
            .get("Reading", &item(json!({"deviceId": "d1", "id": id})))
            .unwrap()
            .is_some());
    }
    wait_for("3 pending", || agent.status().pending == 3);
    wait_for("3 dropped, counted", || agent.status().dropped == 3);
    drop(db);
    agent.shutdown().await;

    // After a restart the outbox (and its bound) is still there.
    let agent = Agent::start(offline(dir.path(), 3), schema()).unwrap();
    assert_eq!(agent.status().pending, 3);
    let err = agent
        .db()
        .create(
            "Fault",
            &item(json!({"deviceId": "d1", "severity": "critical"})),
        )
        .unwrap_err();
    assert!(matches!(err, DbError::Refused(_)), "{err}");
    agent.shutdown().await;
}
