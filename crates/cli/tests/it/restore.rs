//! The cloud restored from an older backup, end to end: a real `devtables cloud` (embedded
//! broker) and a real agent. The writes the cloud acknowledged after the backup was taken come
//! back from the device that made them, and the agent's status counts the re-push.
//!
//! It exists apart from the simulation's restore seeds because the re-push crosses the real
//! drivers: the SQLite store's answered count and feed generations in the backed-up file, the
//! agent's re-push slices over its redb state, and the agent's status.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::harness::{eventually, unique_prefix, AgentProc, AgentSpec, BrokerChoice, CloudProc};

const ACCOUNT: &str = "acme";
const DEVICE: &str = "gw-restore";

/// The files of the cloud's SQLite database (the WAL holds commits not yet in the main file).
fn db_files(data: &Path) -> Vec<PathBuf> {
    ["cloud.db", "cloud.db-wal", "cloud.db-shm"]
        .iter()
        .map(|f| data.join(f))
        .collect()
}

/// Copies the database files of `from` into `to` (the cloud is stopped); files `from` lacks
/// are removed from `to`, so `to` ends up holding exactly that database.
fn copy_db(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for (src, dst) in db_files(from).into_iter().zip(db_files(to)) {
        if src.exists() {
            std::fs::copy(&src, &dst).unwrap();
        } else if dst.exists() {
            std::fs::remove_file(&dst).unwrap();
        }
    }
}

fn fault_ids(cloud: &CloudProc) -> Result<Vec<String>, String> {
    let items = cloud.items(ACCOUNT, DEVICE, "Fault")?;
    let mut ids: Vec<String> = items
        .iter()
        .map(|i| i["item"]["id"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    Ok(ids)
}

fn create_fault(agent: &mut AgentProc, message: &str) -> String {
    let fault = agent.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": DEVICE, "severity": "warn", "message": message}}));
    fault["id"].as_str().expect("a fault id").to_string()
}

#[test]
fn a_cloud_restored_from_a_backup_gets_back_the_writes_it_had_acknowledged() {
    restored_cloud_gets_back_acknowledged_writes(BrokerChoice::Embedded(0));
}

/// With an external broker the device stays connected to the broker across the cloud's restart
/// and is idle: the restarted cloud prompts the devices that were online, so it says hello and
/// its re-push happens now, not at its next write.
#[test]
fn services_with_mosquitto_an_idle_device_gives_back_what_the_restored_cloud_lost() {
    if !super::services::services_on() {
        return;
    }
    let addr = std::env::var("DEVTABLES_MOSQUITTO").unwrap_or_else(|_| "127.0.0.1:1883".into());
    restored_cloud_gets_back_acknowledged_writes(BrokerChoice::External(addr));
}

fn restored_cloud_gets_back_acknowledged_writes(broker: BrokerChoice) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let mut cloud = CloudProc::start(dir.path(), &prefix, broker);
    let data = dir.path().join("cloud-data");
    let backup = dir.path().join("backup");
    let secret = cloud.register(ACCOUNT, DEVICE);
    let mqtt = cloud.mqtt.clone();
    let mut agent = AgentProc::start(&AgentSpec {
        dir: dir.path(),
        name: DEVICE,
        account: ACCOUNT,
        device: DEVICE,
        secret: &secret,
        mqtt: &mqtt,
        prefix: &prefix,
        schema: None,
    });
    agent.wait_synced();

    // Before the backup: one fault, in the cloud.
    let f0 = create_fault(&mut agent, "before the backup");
    agent.wait_synced();
    eventually("f0 in the cloud", || {
        let ids = fault_ids(&cloud)?;
        (ids == [f0.clone()])
            .then_some(())
            .ok_or(format!("{ids:?}"))
    });

    // The backup: the cloud's SQLite files, copied with the cloud stopped.
    cloud.kill();
    copy_db(&data, &backup);
    cloud.start_again();

    // After the backup: five faults and the delete of f0, each acknowledged by the cloud.
    agent.wait_synced();
    let mut later: Vec<String> = (1..=5)
        .map(|i| create_fault(&mut agent, &format!("after the backup {i}")))
        .collect();
    later.sort();
    agent.op(json!({"op": "remove", "model": "Fault", "item": {"deviceId": DEVICE, "id": f0}}));
    agent.wait_synced();
    eventually("the later writes in the cloud", || {
        let ids = fault_ids(&cloud)?;
        (ids == later).then_some(()).ok_or(format!("{ids:?}"))
    });
    let before: Value = agent.status();
    assert_eq!(before["restore_repushed"], 0, "{before}");

    // The restore: the backup put back with the cloud stopped, then the cloud started on it.
    cloud.kill();
    copy_db(&backup, &data);
    cloud.start_again();
    let restored = fault_ids(&cloud).expect("the restored cloud answers");
    assert_eq!(
        restored.as_slice(),
        std::slice::from_ref(&f0),
        "the restored cloud holds only what the backup held"
    );

    // The device gives back everything it holds: the five faults, and the delete of f0.
    eventually("the acknowledged writes back in the cloud", || {
        let ids = fault_ids(&cloud)?;
        (ids == later).then_some(()).ok_or(format!("{ids:?}"))
    });
    let status = eventually("the re-push counted in the agent's status", || {
        let s = agent.status();
        (s["restore_repushed"] == 6 && s["pending"] == 0)
            .then_some(s.clone())
            .ok_or(s.to_string())
    });
    assert!(
        status["ready"] == true,
        "the agent syncs on after the re-push: {status}"
    );
    let cloud_status = cloud.get("/v1/status").expect("the cloud's status");
    assert_eq!(
        cloud_status["restores_detected"], 1,
        "the restored cloud counted the detection: {cloud_status}"
    );
    assert!(
        !agent
            .logs
            .matching("re-push after a cloud restore")
            .is_empty(),
        "the re-push is logged: {:?}",
        agent.logs.tail(20)
    );
    // The restored cloud counted what it wrote again: the five faults and the tombstone.
    assert_eq!(
        cloud.changes_applied(ACCOUNT, DEVICE),
        1 + 6,
        "f0 once, then the re-push"
    );
    agent.stop();
}
