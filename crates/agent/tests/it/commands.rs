//! Commands run at least once: a command found pending in the database (it arrived before a
//! crash, or before its handler was registered) runs when the handler is registered, also after
//! a SIGKILL in the middle of the handler; a result write that fails (a full outbox) is retried
//! until it succeeds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devtables_agent::{Agent, CommandHandler};
use devtables_db::{Db, DbOptions, Origin};
use devtables_schema::Item;
use serde_json::json;

use devtables_cloud::ops::WriteKind;
use devtables_sync::identity::Owner;

use super::support::{
    agent_config, cloud_items, device, eventually, free_port, item, mqtt_port, offline, schema,
    start_cloud, WAIT,
};

const CHILD_ENV: &str = "DEVTABLES_AGENT_CRASH_CHILD";

/// Writes a pending command item as the agent applies one from the cloud (a remote write).
fn inject(db: &Db, id: &str, name: &str) {
    let model = db.schema().model("Command").unwrap();
    let full = model
        .prepare_create(
            &item(json!({"deviceId": "d1", "id": id, "command": name, "args": {"n": 1}})),
            devtables_db::system_now_ms(),
        )
        .unwrap();
    let full = model.normalize_stored(full).unwrap();
    db.write(Origin::Remote, |t| t.put_stored("Command", full.clone()))
        .unwrap();
}

fn command_status(db: &Db, id: &str) -> Option<String> {
    db.get("Command", &item(json!({"deviceId": "d1", "id": id})))
        .unwrap()
        .and_then(|c| c.get("status")?.as_str().map(String::from))
}

/// A handler that records the ids it ran for.
fn recording(calls: &Arc<Mutex<Vec<String>>>) -> CommandHandler {
    let calls = calls.clone();
    Arc::new(move |item: &Item| {
        let id = item.get("id").and_then(|v| v.as_str()).unwrap_or("?");
        calls.lock().unwrap().push(id.to_string());
        Ok(json!({"rebooted": true}))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_found_pending_runs_when_its_handler_registers() {
    let dir = tempfile::tempdir().unwrap();
    let config = offline(dir.path());
    // c1 arrived from the cloud, but the process died before its handler ran.
    {
        let db = Db::open(&config.db_path, schema(), DbOptions::default()).unwrap();
        inject(&db, "c1", "reboot");
        db.close().unwrap();
    }
    let agent = Agent::start(config.clone(), schema()).unwrap();
    // c2 is a command the device wrote itself: not the agent's to run.
    agent
        .db()
        .create(
            "Command",
            &item(json!({"deviceId": "d1", "id": "c2", "command": "reboot"})),
        )
        .unwrap();
    assert_eq!(command_status(agent.db(), "c1").as_deref(), Some("pending"));
    let calls = Arc::new(Mutex::new(Vec::new()));
    agent.on_command("reboot", recording(&calls));
    eventually(&agent, "c1 done", |a| {
        command_status(a.db(), "c1").as_deref() == Some("done")
    })
    .await;
    assert_eq!(*calls.lock().unwrap(), ["c1"]);
    assert_eq!(agent.status().commands_recovered, 1);
    assert_eq!(command_status(agent.db(), "c2").as_deref(), Some("pending"));
    let c1 = agent
        .db()
        .get("Command", &item(json!({"deviceId": "d1", "id": "c1"})))
        .unwrap()
        .unwrap();
    assert_eq!(c1["result"], json!({"rebooted": true}));
    agent.shutdown().await;

    // After a restart a finished command does not run again; a new one does.
    let agent = Agent::start(config, schema()).unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    agent.on_command("reboot", recording(&calls));
    inject(agent.db(), "c3", "reboot");
    eventually(&agent, "c3 done", |a| {
        command_status(a.db(), "c3").as_deref() == Some("done")
    })
    .await;
    assert_eq!(*calls.lock().unwrap(), ["c3"]);
    agent.shutdown().await;
}

/// Entry point of the child process (does nothing unless the parent set the variable): an
/// offline agent whose `reboot` handler notes that it started, then hangs until the parent
/// kills the process.
#[test]
fn sigkill_child_entry() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let agent = Agent::start(offline(&dir), schema()).unwrap();
        let marker = dir.join("ran");
        agent.on_command(
            "reboot",
            Arc::new(move |_item: &Item| {
                note_run(&marker);
                loop {
                    std::thread::park();
                }
            }),
        );
        inject(agent.db(), "c1", "reboot");
        std::future::pending::<()>().await;
    });
}

/// Appends one line to the marker file (durably: the process may be killed right after).
fn note_run(marker: &Path) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(marker)
        .unwrap();
    f.write_all(b"ran\n").unwrap();
    f.sync_all().unwrap();
}

fn runs(marker: &Path) -> usize {
    std::fs::read_to_string(marker)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_killed_mid_handler_runs_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "commands::sigkill_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while runs(&marker) == 0 {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the child never started the handler");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL, in the middle of the handler
    child.wait().unwrap();

    let agent = Agent::start(offline(dir.path()), schema()).unwrap();
    assert_eq!(command_status(agent.db(), "c1").as_deref(), Some("pending"));
    let m = marker.clone();
    agent.on_command(
        "reboot",
        Arc::new(move |_item: &Item| {
            note_run(&m);
            Ok(json!({"rebooted": true}))
        }),
    );
    eventually(&agent, "c1 done after the restart", |a| {
        command_status(a.db(), "c1").as_deref() == Some("done")
    })
    .await;
    assert_eq!(runs(&marker), 2, "once before the kill, once after");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_result_write_is_retried_until_the_outbox_drains() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    // First the device syncs once (a setting moves its cursor above 0), so the reconnect below
    // resumes its feed instead of starting a full resync (which would sweep the local command).
    {
        let cloud = start_cloud(&cloud_dir, 0).await;
        let secret = cloud.register_device(&device()).await.unwrap();
        cloud
            .write_item(
                Owner::Device(device()),
                "Setting",
                item(json!({"name": "s", "value": "1"})),
                WriteKind::Create,
            )
            .await
            .unwrap();
        let agent = Agent::start(
            agent_config(dir.path(), &secret, mqtt_port(&cloud)),
            schema(),
        )
        .unwrap();
        eventually(&agent, "synced", |a| {
            a.status().ready && a.status().cursor > 0
        })
        .await;
        agent.shutdown().await;
        cloud.shutdown().await;
        std::fs::write(dir.path().join("secret"), secret).unwrap();
    }
    let secret = std::fs::read_to_string(dir.path().join("secret")).unwrap();
    let port = free_port();
    let mut config = agent_config(dir.path(), &secret, port);
    config.outbox_limit = 2;
    config.command_result_backoff = Duration::from_millis(50);
    config.command_result_attempts = 100;
    let agent = Agent::start(config, schema()).unwrap();
    // Offline, two faults fill the outbox: the result write (a synced change) is refused.
    for id in ["f1", "f2"] {
        agent
            .db()
            .create(
                "Fault",
                &item(json!({"deviceId": "d1", "id": id, "severity": "warn"})),
            )
            .unwrap();
    }
    let calls = Arc::new(Mutex::new(Vec::new()));
    agent.on_command("reboot", recording(&calls));
    inject(agent.db(), "c1", "reboot");
    eventually(&agent, "two failed result writes", |a| {
        a.status().command_result_retries >= 2
    })
    .await;
    assert_eq!(command_status(agent.db(), "c1").as_deref(), Some("pending"));
    assert_eq!(*calls.lock().unwrap(), ["c1"], "the handler ran once");

    // The cloud comes up, acknowledges the faults, the outbox has room: the retry succeeds,
    // and the result replicates up.
    let cloud = start_cloud(&cloud_dir, port).await;
    eventually(&agent, "c1 done", |a| {
        command_status(a.db(), "c1").as_deref() == Some("done")
    })
    .await;
    eventually(&agent, "everything acknowledged", |a| {
        a.status().pending == 0
    })
    .await;
    let commands = cloud_items(&cloud, "Command").await;
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0]["status"], json!("done"));
    let status = agent.status();
    assert_eq!(status.command_results_abandoned, 0, "{status:?}");
    assert_eq!(
        *calls.lock().unwrap(),
        ["c1"],
        "retries do not run the handler again"
    );
    agent.shutdown().await;
    cloud.shutdown().await;
}
