//! What syncing costs the device in database transactions, per acknowledged write, counted two
//! ways: by the agent (`AgentStatus::db_reads`, `db_writes`: the event loop's own transactions)
//! and by the database itself, whose clock is called once per write transaction and once per
//! read snapshot (a counting clock given in `DbOptions`), so a transaction the agent forgot to
//! count still shows. The figures fail the test if they go back up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devtables_agent::{Agent, AgentStatus};
use devtables_db::{Db, DbOptions};
use serde_json::json;

use super::support::{agent_config, eventually, item, mqtt_port, register, schema, start_cloud};

/// A device database whose clock counts its calls: one per write transaction (and per read
/// snapshot); the items' side-table reads do not call it.
fn counting_db() -> (Db, Arc<AtomicU64>) {
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let options = DbOptions {
        clock: Arc::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            devtables_db::system_now_ms()
        }),
        // No background purge transaction during the measurement.
        ttl_purge_interval: Duration::from_secs(3600),
        ..DbOptions::default()
    };
    (Db::open_in_memory(schema(), options).unwrap(), calls)
}

fn fault(i: usize) -> devtables_schema::Item {
    item(json!({"deviceId": "d1", "id": format!("f{i:03}"), "severity": "info"}))
}

/// (database write transactions and read snapshots, the agent's reads, the agent's writes).
fn counts(calls: &AtomicU64, status: &AgentStatus) -> (u64, u64, u64) {
    (
        calls.load(Ordering::SeqCst),
        status.db_reads,
        status.db_writes,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_costs_the_device_one_read_and_one_write_of_the_agent_until_acknowledged() {
    const WRITES: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let secret = register(&cloud_dir).await;
    let cloud = start_cloud(&cloud_dir, 0).await;
    let mut config = agent_config(dir.path(), &secret, mqtt_port(&cloud));
    config.version_gc_interval = Duration::from_secs(3600);
    let (db, calls) = counting_db();
    let agent = Agent::start_with_db(config, db).unwrap();
    eventually(&agent, "the first sync (a resync)", |a| {
        let s = a.status();
        s.ready && s.resyncs == 1 && s.in_flight == 0
    })
    .await;

    // A device that writes now and then: each write is acknowledged before the next.
    let status = agent.watch_status();
    let before = counts(&calls, &status.borrow());
    for i in 0..WRITES as usize {
        agent.db().create("Fault", &fault(i)).unwrap();
        eventually(&agent, "the write acknowledged", |a| {
            let s = a.watch_status().borrow().clone();
            s.acked == i as u64 + 1 && s.pending == 0
        })
        .await;
    }
    let after = counts(&calls, &status.borrow());
    let (db_calls, reads, writes) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    eprintln!(
        "per acknowledged write: {:.2} database transactions (application's included), \
         agent {:.2} reads, {:.2} writes",
        db_calls as f64 / WRITES as f64,
        reads as f64 / WRITES as f64,
        writes as f64 / WRITES as f64
    );
    // The application's write and the outbox trim once the cloud answered; nothing else
    // writes, and the agent opens no read snapshot.
    assert_eq!(
        db_calls,
        2 * WRITES,
        "database transactions: one write of the application and one trim per write"
    );
    assert_eq!(writes, WRITES, "the agent's writes: one trim per answer");
    // The new entry read once (the batch is built from it), and the outbox's size once for
    // the status; the answer's turn reads nothing (the trim tells the new size).
    assert!(
        reads <= 2 * WRITES,
        "the agent's reads: {reads} for {WRITES} writes, at most 2 each"
    );
    assert_eq!(agent.status().dropped, 0);
    agent.shutdown().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_answered_together_leave_the_outbox_in_one_transaction() {
    const WRITES: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let secret = register(&cloud_dir).await;
    let port = super::support::free_port();
    let mut config = agent_config(dir.path(), &secret, port);
    config.version_gc_interval = Duration::from_secs(3600);
    let (db, _) = counting_db();
    let agent = Agent::start_with_db(config, db).unwrap();
    // Written while the cloud is away: they wait in the outbox and go as one batch.
    for i in 0..WRITES as usize {
        agent.db().create("Fault", &fault(i)).unwrap();
    }
    assert_eq!(agent.status().pending as u64, WRITES);
    let cloud = start_cloud(&cloud_dir, port).await;
    eventually(&agent, "every write acknowledged", |a| {
        let s = a.watch_status().borrow().clone();
        s.acked == WRITES && s.pending == 0
    })
    .await;
    let s = agent.status();
    // The first session's resync applies pages (a write each) before the batch goes out; the
    // batch's answer is one trim. Per entry, that would be 30.
    assert!(
        s.db_writes < 10,
        "{} write transactions of the agent for one answered batch of {WRITES}",
        s.db_writes
    );
    agent.shutdown().await;
    cloud.shutdown().await;
}
