//! The device-only `devtables-agent` binary: run as its own process from a configuration file
//! against the real cloud (embedded broker), it syncs what `--stdin` writes up and what the cloud
//! writes down, reports `ready`, and stops cleanly at the end of its input. Its dependency tree
//! holds none of the cloud's crates (that is the point of the binary).

use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use devtables_cloud::ops::WriteKind;
use devtables_sync::identity::Owner;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

use super::support::{cloud_items, device, item, mqtt_port, register, start_cloud, WAIT};

/// Writes the standalone agent's configuration file for `acme/d1` and returns its path.
fn write_config(dir: &Path, secret: &str, port: u16) -> std::path::PathBuf {
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/schema.json5");
    let path = dir.join("agent.json5");
    let text = json!({
        "account": "acme",
        "device": "d1",
        "secret": secret,
        "schema": schema,
        "db": "d1.db",
        "broker": format!("mqtt://127.0.0.1:{port}"),
    });
    std::fs::write(&path, text.to_string()).unwrap();
    path
}

/// Sends one `--stdin` operation and reads its answer line.
async fn ask(
    stdin: &mut ChildStdin,
    stdout: &mut Lines<BufReader<ChildStdout>>,
    op: Value,
) -> Value {
    stdin.write_all(format!("{op}\n").as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();
    let line = tokio::time::timeout(WAIT, stdout.next_line())
        .await
        .expect("an answer in time")
        .unwrap()
        .expect("an answer line, not the end of output");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?} is not JSON: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_only_binary_syncs_stdin_writes_up_and_cloud_writes_down() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_dir = dir.path().join("cloud");
    let secret = register(&cloud_dir).await;
    let cloud = start_cloud(&cloud_dir, 0).await;
    let config = write_config(dir.path(), &secret, mqtt_port(&cloud));

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_devtables-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the devtables-agent binary starts");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    // Standard error, collected in the background: the `ready` line, and the diagnosis if the
    // test fails.
    let (err_tx, mut err_rx) = tokio::sync::watch::channel(String::new());
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            err_tx.send_modify(|all| {
                all.push_str(&line);
                all.push('\n');
            });
        }
    });
    let ready = tokio::time::timeout(WAIT, err_rx.wait_for(|e| e.contains("acme/d1 ready")))
        .await
        .map(|_| ())
        .map_err(|_| err_rx.borrow().clone());
    assert_eq!(ready, Ok(()), "the agent reports ready on standard error");

    // Up: a Fault written through --stdin reaches the cloud.
    let answer = ask(
        &mut stdin,
        &mut stdout,
        json!({"op": "create", "model": "Fault",
               "item": {"deviceId": "d1", "id": "f1", "severity": "warn", "message": "from stdin"}}),
    )
    .await;
    assert_eq!(answer["ok"], true, "{answer}");
    let deadline = Instant::now() + WAIT;
    let faults = loop {
        let faults = cloud_items(&cloud, "Fault").await;
        if !faults.is_empty() {
            break faults;
        }
        assert!(
            Instant::now() < deadline,
            "the cloud never got the Fault; agent stderr:\n{}",
            err_rx.borrow().as_str()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(faults.len(), 1);
    assert_eq!(faults[0]["id"], "f1");
    assert_eq!(faults[0]["message"], "from stdin");

    // Down: a Setting the cloud writes for the device appears in the binary's database.
    cloud
        .write_item(
            Owner::Device(device()),
            "Setting",
            item(json!({"name": "mode", "value": "eco"})),
            WriteKind::Create,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let got = ask(
            &mut stdin,
            &mut stdout,
            json!({"op": "get", "model": "Setting", "item": {"deviceId": "d1", "name": "mode"}}),
        )
        .await;
        if got["ok"] == true && got["result"]["value"] == "eco" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Setting never arrived: last answer {got}; agent stderr:\n{}",
            err_rx.borrow().as_str()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The change was acknowledged: nothing is pending, and the status says so.
    let deadline = Instant::now() + WAIT;
    loop {
        let status = ask(&mut stdin, &mut stdout, json!({"op": "status"})).await;
        if status["result"]["pending"] == 0 && status["result"]["ready"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A bad line is answered, not fatal.
    let bad = ask(&mut stdin, &mut stdout, json!({"op": "explode"})).await;
    assert_eq!(bad["ok"], false, "{bad}");

    // The end of input stops the agent cleanly.
    drop(stdin);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the agent exits at the end of its input")
        .unwrap();
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        err_rx.borrow().as_str()
    );
    cloud.shutdown().await;
}

/// The crates the device-only binary must not link: the cloud service, its embedded broker, its
/// SQL store and the cloud side's TLS crypto. (axum, the cloud's HTTP server, is the agent's too:
/// it serves the local API on a Unix socket.)
const CLOUD_ONLY: [&str; 5] = [
    "devtables-cloud",
    "rmqtt",
    "rusqlite",
    "libsqlite3-sys",
    "aws-lc-sys",
];

#[test]
fn the_device_only_binary_links_none_of_the_cloud_crates() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "devtables-agent",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // The tree is the agent's: its own crates are there (the check reads real output).
    for needed in ["devtables-agent", "devtables-db", "rumqttc", "redb"] {
        assert!(names.contains(&needed), "{needed} missing from:\n{tree}");
    }
    let linked: Vec<&str> = CLOUD_ONLY
        .into_iter()
        .filter(|c| names.contains(c))
        .collect();
    assert!(
        linked.is_empty(),
        "the device-only agent depends on {linked:?}:\n{tree}"
    );
}
