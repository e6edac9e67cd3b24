//! First run and connection trouble: `devtables cloud` with `--api`, `--mqtt` and `--data`
//! overrides, a port already in use (named with the option and the key that move it), a failed
//! start that leaves nothing behind, the demo run twice on its own folder, an agent's `--mqtt`
//! and `--db`, the end of `--stdin` input waiting for the cloud, and the cloud's log of refused
//! logins.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::mpsc;

use rumqttc::{Client, ConnectionError, Event, MqttOptions, Packet};
use serde_json::json;

use super::harness::{unique_prefix, AgentProc, AgentSpec, BrokerChoice, CloudProc, WAIT};
use super::{bin, example_schema};

/// A cloud configuration file in `dir` whose data folder is `from-file` and whose addresses are
/// any free ports.
fn cloud_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("cloud.json5");
    std::fs::write(
        &path,
        format!(
            "{{schema: '{}', data_dir: 'from-file', api: '127.0.0.1:0', embedded_broker: '127.0.0.1:0'}}",
            example_schema().display()
        ),
    )
    .unwrap();
    path
}

/// `devtables cloud --config FILE ARGS...` that is expected to fail at start.
fn failed_cloud(file: &Path, args: &[&str]) -> String {
    let out: Output = bin()
        .args(["cloud", "--config"])
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the cloud started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_port_in_use_names_the_option_and_key_and_the_failed_start_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = cloud_file(dir.path());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let new = dir.path().join("new");

    let err = failed_cloud(&file, &["--mqtt", &addr, "--data", new.to_str().unwrap()]);
    assert!(
        err.contains(&format!("Port {port} is in use"))
            && err.contains(&format!("pass --mqtt 127.0.0.1:{}", port + 1))
            && err.contains("set `embedded_broker` in")
            && err.contains("cloud.json5"),
        "{err}"
    );
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    assert!(!new.exists(), "the data folder this run created is removed");
    assert!(
        !dir.path().join("from-file").exists(),
        "--data replaced data_dir"
    );

    let err = failed_cloud(&file, &["--api", &addr, "--data", new.to_str().unwrap()]);
    assert!(
        err.contains(&format!("pass --api 127.0.0.1:{}", port + 1)) && err.contains("set `api` in"),
        "{err}"
    );
    assert!(!new.exists());

    // A folder that was there keeps what it held, and only that.
    let old = dir.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("notes.txt"), "mine").unwrap();
    let err = failed_cloud(&file, &["--api", &addr, "--data", old.to_str().unwrap()]);
    assert!(err.contains("is in use"), "{err}");
    assert_eq!(entries(&old), ["notes.txt"]);
    drop(taken);
}

#[test]
fn the_overrides_replace_the_file_s_addresses_and_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let file = cloud_file(dir.path());
    let data = dir.path().join("elsewhere");
    let mut child = bin()
        .args(["cloud", "--config"])
        .arg(&file)
        .args(["--api", "127.0.0.1:0", "--mqtt", "127.0.0.1:0", "--data"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let running = loop {
        match rx.recv_timeout(WAIT) {
            Ok(line) if line.contains("devtables cloud running") => break line,
            Ok(_) => continue,
            Err(e) => panic!("the cloud did not start: {e}"),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(running.contains("API http://127.0.0.1:"), "{running}");
    assert!(data.join("cloud.db").exists(), "the store is in --data");
    assert!(!dir.path().join("from-file").exists());
}

#[test]
fn the_demo_runs_again_on_its_own_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    for run in 1..=2 {
        let out = bin()
            .args(["demo", "--devices", "1", "--duration", "1s", "--data"])
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "run {run}: {err}");
        assert!(err.contains("stopped; data kept in"), "run {run}: {err}");
    }
    assert!(data.join("dev-1.db").exists());
}

/// A cloud with device `acme/{device}` registered: (cloud, its temp dir, prefix, secret).
fn cloud_with(device: &str) -> (CloudProc, tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::Embedded(0));
    let secret = cloud.register("acme", device);
    (cloud, dir, prefix, secret)
}

#[test]
fn the_end_of_stdin_waits_until_the_cloud_has_every_change() {
    let (cloud, dir, prefix, secret) = cloud_with("pipe");
    let mut agent = AgentProc::start(&AgentSpec {
        dir: dir.path(),
        name: "pipe",
        account: "acme",
        device: "pipe",
        secret: &secret,
        mqtt: &cloud.mqtt,
        prefix: &prefix,
        schema: None,
    });
    // A script's pipe: a write, then the end of input, without waiting for anything.
    agent.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": "pipe", "id": "f1", "severity": "warn", "message": "piped"}}));
    agent.close_input();
    assert!(agent.wait_exit().success());
    // Read once, no waiting: the agent exited only after the cloud acknowledged it.
    let items = cloud.items("acme", "pipe", "Fault").unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["item"]["message"], "piped");
}

#[test]
fn without_a_cloud_the_end_of_stdin_waits_its_bound_and_says_what_stays_queued() {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("127.0.0.1:{}", super::harness::free_port());
    let db = dir.path().join("moved.db");
    let config = dir.path().join("agent.json5");
    std::fs::write(
        &config,
        format!(
            "{{account: 'acme', device: 'lonely', secret: 's', schema: '{}', db: 'unused.db', \
              broker: '127.0.0.1:1', stdin_drain_secs: 30}}",
            example_schema().display()
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut child = bin()
        .args(["agent", "--stdin", "--stdin-drain-secs", "1", "--config"])
        .arg(&config)
        .args(["--mqtt", &dead, "--db"])
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(
            stdin,
            "{}",
            json!({"op": "create", "model": "Fault",
                   "item": {"deviceId": "lonely", "id": "f1", "severity": "info"}})
        )
        .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"),
        "the write was answered"
    );
    // The flag's second, not the file's 30.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{err}"
    );
    assert!(
        err.contains("stopping with 1 change still queued") && err.contains("next start"),
        "{err}"
    );
    // --mqtt replaced the file's broker (port 1), and the status says why it never connected.
    assert!(
        err.contains(&format!("MQTT to {dead} is in clear text")),
        "{err}"
    );
    assert!(err.contains("the broker is unreachable"), "{err}");
    // --db replaced the file's database, which keeps the change for the next start.
    assert!(db.exists() && !dir.path().join("unused.db").exists());
}

/// A CONNECT as `username` with a wrong password, until the broker refuses it.
fn refused_connect(mqtt: &str, username: &str) {
    let (host, port) = mqtt.rsplit_once(':').expect("host:port");
    let mut options = MqttOptions::new(username, host, port.parse().expect("a port"));
    options.set_credentials(username, "wrong");
    let (_client, mut connection) = Client::new(options, 10);
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => panic!("{username} was accepted"),
            Ok(_) => continue,
            Err(ConnectionError::ConnectionRefused(_)) => return,
            Err(e) => panic!("{username}: not a refusal: {e}"),
        }
    }
}

#[test]
fn the_cloud_logs_refused_logins_once_per_username_with_the_peer() {
    let (cloud, _dir, _prefix, _secret) = cloud_with("real");
    for _ in 0..5 {
        refused_connect(&cloud.mqtt, "acme/guess");
    }
    // Another name's line comes after the five refusals of the first in the log.
    refused_connect(&cloud.mqtt, "acme/other");
    cloud.logs.wait_for("the refusal of acme/other", |l| {
        l.contains("MQTT login refused") && l.contains("acme/other")
    });
    // (rmqtt logs each refused handshake itself, at info: only the cloud's own lines count.)
    let lines: Vec<String> = cloud
        .logs
        .matching("MQTT login refused")
        .into_iter()
        .filter(|l| l.contains("acme/guess"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one line per username per interval: {lines:?}"
    );
    let line = &lines[0];
    assert!(
        line.contains("INFO")
            && line.contains("bad user name or password")
            && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
}
