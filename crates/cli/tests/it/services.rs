//! The end-to-end scenarios against real external services: Mosquitto with the SQLite store
//! (`mosquitto_*`), and Mosquitto with the PostgreSQL store (`postgres_*`, each test in a fresh
//! schema of its own, dropped after it; the cloud is then a one-node cluster, as in
//! docs/scale-out.md). Switched on by DEVTABLES_SERVICES=1 (set by `.ci/run`); with it set, a
//! missing service is a failure, never a skip. With it unset each test prints a `SKIPPED` line
//! and returns, so a run without the services says so instead of looking green.

use std::net::TcpStream;
use std::time::Duration;

use super::harness::{Backend, BrokerChoice, StoreChoice};
use super::scenarios;

pub(super) use super::services_gate::services_on;

/// The Mosquitto address when the service suites are on; None (skipped) when they are off.
fn mosquitto() -> Option<String> {
    if !services_on() {
        return None;
    }
    let addr = std::env::var("DEVTABLES_MOSQUITTO").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let sock = addr
        .parse()
        .unwrap_or_else(|e| panic!("DEVTABLES_MOSQUITTO={addr}: {e}"));
    if let Err(e) = TcpStream::connect_timeout(&sock, Duration::from_secs(2)) {
        panic!("DEVTABLES_SERVICES is set but Mosquitto at {addr} is unreachable: {e}");
    }
    Some(addr)
}

#[test]
fn mosquitto_up_down_both_and_commands() {
    let Some(addr) = mosquitto() else { return };
    scenarios::up_down_both_and_commands(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_offline_catch_up_with_deletes() {
    let Some(addr) = mosquitto() else { return };
    scenarios::offline_catch_up_with_deletes(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_conflict_converges_and_is_logged() {
    let Some(addr) = mosquitto() else { return };
    scenarios::conflict_converges_and_is_logged(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_agent_killed_mid_batch() {
    let Some(addr) = mosquitto() else { return };
    scenarios::agent_killed_mid_batch(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_cloud_killed_mid_apply() {
    let Some(addr) = mosquitto() else { return };
    scenarios::cloud_killed_mid_apply(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_killed_device_goes_offline() {
    let Some(addr) = mosquitto() else { return };
    scenarios::killed_device_goes_offline(BrokerChoice::External(addr));
}

/// A private Mosquitto on a free port, killed with SIGKILL and restarted on the same port while
/// a device writes: every acknowledged write reaches the cloud exactly once.
#[test]
fn mosquitto_broker_restarted_mid_stream() {
    use super::harness::{eventually, free_port, unique_prefix, AgentProc, AgentSpec, CloudProc};
    use serde_json::json;

    if !services_on() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let start_broker = || {
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("DEVTABLES_SERVICES is set but the mosquitto binary cannot be started");
        eventually("mosquitto listening", || {
            TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        child
    };
    let mut broker = start_broker();
    let addr = format!("127.0.0.1:{port}");
    let prefix = unique_prefix();
    let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::External(addr.clone()));
    let secret = cloud.register("acme", "gw7");
    let mut a = AgentProc::start(&AgentSpec {
        dir: dir.path(),
        name: "gw7",
        account: "acme",
        device: "gw7",
        secret: &secret,
        mqtt: &addr,
        prefix: &prefix,
        schema: None,
    });
    a.wait_synced();
    let total = 200;
    for i in 0..total {
        a.op(json!({"op": "create", "model": "Reading",
            "item": {"deviceId": "gw7", "id": format!("r{i:04}"), "name": "t", "value": i}}));
        if i == total / 2 {
            let _ = broker.kill();
            let _ = broker.wait();
        }
        if i == total * 3 / 4 {
            broker = start_broker();
        }
    }
    eventually(
        "every reading in the cloud after the broker restart",
        || {
            let items = cloud.items("acme", "gw7", "Reading")?;
            (items.len() == total)
                .then_some(())
                .ok_or(format!("{} of {total}", items.len()))
        },
    );
    a.stop();
    let _ = broker.kill();
    let _ = broker.wait();
    // Pushes lost or resent around the restart are answered as duplicates: each reading (one
    // key, one version) was written once.
    assert_eq!(
        cloud.changes_applied("acme", "gw7"),
        total as u64,
        "each reading applied exactly once"
    );
}

#[test]
fn mosquitto_offline_past_retention_resyncs() {
    let Some(addr) = mosquitto() else { return };
    scenarios::offline_past_retention_resyncs(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_newer_device_schema_is_kept_whole_and_said() {
    let Some(addr) = mosquitto() else { return };
    scenarios::newer_device_schema_is_kept_whole_and_said(BrokerChoice::External(addr));
}

/// The fault scenario with Mosquitto: each agent behind its own faulty proxy, and the cloud's own
/// MQTT client behind one too, so the broker-cloud hop also sees delays, stalls, resets and
/// refusals.
#[test]
fn mosquitto_cloud_link_restore_resends_lost_pushes() {
    let Some(addr) = mosquitto() else { return };
    super::faults::cloud_link_restore_resends_lost_pushes(addr);
}

#[test]
fn mosquitto_agents_and_cloud_converge_through_faulty_links() {
    let Some(addr) = mosquitto() else { return };
    super::faults::converge_through_faults(BrokerChoice::External(addr), true);
}

/// Mosquitto and PostgreSQL (a fresh schema, dropped with the last handle of it) when the
/// service suites are on; None (skipped) when they are off.
fn mosquitto_and_postgres() -> Option<Backend> {
    let addr = mosquitto()?;
    Some(Backend {
        broker: BrokerChoice::External(addr),
        store: StoreChoice::fresh_postgres(),
    })
}

#[test]
fn postgres_up_down_both_and_commands() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::up_down_both_and_commands(backend);
}

#[test]
fn postgres_offline_catch_up_with_deletes() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::offline_catch_up_with_deletes(backend);
}

#[test]
fn postgres_conflict_converges_and_is_logged() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::conflict_converges_and_is_logged(backend);
}

#[test]
fn postgres_agent_killed_mid_batch() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::agent_killed_mid_batch(backend);
}

#[test]
fn postgres_cloud_killed_mid_apply() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::cloud_killed_mid_apply(backend);
}

#[test]
fn postgres_killed_device_goes_offline() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::killed_device_goes_offline(backend);
}

#[test]
fn postgres_offline_past_retention_resyncs() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::offline_past_retention_resyncs(backend);
}

#[test]
fn postgres_newer_device_schema_is_kept_whole_and_said() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::newer_device_schema_is_kept_whole_and_said(backend);
}

#[test]
fn postgres_hostile_messages_get_error_replies() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::hostile_messages_get_error_replies(backend);
}

#[test]
fn postgres_hostile_pushes_cannot_touch_other_models_or_the_clock() {
    let Some(backend) = mosquitto_and_postgres() else {
        return;
    };
    scenarios::hostile_pushes_cannot_touch_other_models_or_the_clock(backend);
}
