//! A scaled-out cloud (docs/scale-out.md): three `devtables cloud` processes on one PostgreSQL
//! schema of the test's own and a Mosquitto of the test's own, with simulated devices (`devtables sim`, a
//! separate process) writing up and receiving down changes, broadcasts and commands through the
//! first node's API. A node is killed with SIGKILL mid-run and restarted; in a second run the
//! broker is. Needs DEVTABLES_SERVICES=1 (PostgreSQL at DEVTABLES_POSTGRES, default
//! `postgres://postgres@127.0.0.1:5432/test`, and the `mosquitto` program), else skipped.
//!
//! Each test starts its own Mosquitto on a free port: the tests run in parallel, and on one
//! shared broker their nodes (named `node-1`...) would take each other's MQTT client ids and
//! hear each other's devices.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use super::bin;
use super::harness::{
    create_key_in, eventually, free_port, AgentProc, AgentSpec, Backend, BrokerChoice, CloudProc,
    MosquittoProc, StoreChoice, KEY_ACCOUNT,
};
use super::pg::PgSchema;
use super::services::services_on;

const PARTITIONS: u64 = 64;
const LEASE_MS: u64 = 1500;

/// PostgreSQL in a fresh schema of the test's own, shared by the three nodes.
fn fresh_store() -> (Arc<PgSchema>, StoreChoice) {
    let pg = Arc::new(PgSchema::fresh());
    (pg.clone(), StoreChoice::Postgres(pg))
}

/// What every test here starts from: a PostgreSQL schema of its own, a folder, a Mosquitto of
/// its own (and its address) and the admin key. Each test keeps every part alive to its end
/// (dropping the schema or the broker ends them).
struct Setup {
    pg: Arc<PgSchema>,
    store: StoreChoice,
    dir: tempfile::TempDir,
    mosquitto: PrivateBroker,
    broker: String,
    key: String,
}

impl Setup {
    fn new() -> Setup {
        let (pg, store) = fresh_store();
        let dir = tempfile::tempdir().unwrap();
        let mosquitto = PrivateBroker::start(dir.path());
        let broker = mosquitto.addr.clone();
        let key = admin_key(&store, dir.path());
        Setup {
            pg,
            store,
            dir,
            mosquitto,
            broker,
            key,
        }
    }
}

/// The admin key of [`KEY_ACCOUNT`], made in PostgreSQL by `devtables keys create --database`
/// (the bootstrap path of a scaled-out cloud; no data folder is involved).
fn admin_key(store: &StoreChoice, dir: &Path) -> String {
    create_key_in(store, dir, KEY_ACCOUNT, "admin")
}

fn start_node(dir: &Path, i: usize, store: &StoreChoice, broker: &str, key: &str) -> CloudProc {
    start_node_with(dir, i, store, broker, key, "")
}

/// [`start_node`] with extra configuration keys (JSON5).
fn start_node_with(
    dir: &Path,
    i: usize,
    store: &StoreChoice,
    broker: &str,
    key: &str,
    more: &str,
) -> CloudProc {
    let extra = format!(
        "node_name: 'node-{i}', cluster_partitions: {PARTITIONS}, cluster_lease_ms: {LEASE_MS}, {more}"
    );
    let dir = dir.join(format!("node-{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let backend = Backend {
        broker: BrokerChoice::External(broker.to_string()),
        store: store.clone(),
    };
    CloudProc::start_keyed(
        &dir,
        devtables_sync_prefix(),
        backend,
        &extra,
        key.to_string(),
    )
}

/// A Mosquitto of the test's own on a free port (anonymous: the scale-out tests are about the
/// nodes, not the broker's access control).
struct PrivateBroker {
    mosquitto: Option<MosquittoProc>,
    conf: PathBuf,
    port: u16,
    /// `127.0.0.1:port`.
    addr: String,
}

impl PrivateBroker {
    fn start(dir: &Path) -> PrivateBroker {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mosquitto = MosquittoProc::start(&conf, port);
        let addr = mosquitto.addr.clone();
        PrivateBroker {
            mosquitto: Some(mosquitto),
            conf,
            port,
            addr,
        }
    }

    /// Kills the broker and starts it again on the same configuration and port.
    fn restart(&mut self) {
        drop(self.mosquitto.take());
        self.mosquitto = Some(MosquittoProc::start(&self.conf, self.port));
    }
}

/// `devtables sim` uses the default topic prefix.
fn devtables_sync_prefix() -> &'static str {
    "devtables"
}

fn status(node: &CloudProc) -> Value {
    node.get("/v1/status").unwrap_or(Value::Null)
}

fn num(v: &Value, field: &str) -> u64 {
    v["sync"][field]
        .as_u64()
        .or_else(|| v[field].as_u64())
        .unwrap_or(0)
}

fn held(node: &CloudProc) -> u64 {
    num(&status(node), "cluster_partitions_held")
}

/// `devtables sim` against the first node's API, as a child process.
fn start_sim(dir: &Path, api: &str, broker: &str, key: &str, devices: usize) -> Child {
    bin()
        .arg("sim")
        .args(["--url", &format!("http://{api}"), "--mqtt", broker])
        .args(["--admin-key", key, "--account", KEY_ACCOUNT])
        .args(["--devices", &devices.to_string(), "--rate", "1"])
        .args([
            "--duration",
            "15s",
            "--down-rate",
            "5",
            "--command-rate",
            "2",
        ])
        .args(["--broadcast-every", "4s", "--drain-timeout", "90s"])
        .arg("--json")
        .arg(dir.join("fleet.json"))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("devtables sim starts")
}

/// Waits for the simulator and returns its report; it must have accounted for every write.
fn finish_sim(sim: Child, dir: &Path) -> Value {
    let out = sim.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "devtables sim failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.join("fleet.json")).unwrap()).unwrap();
    let written = report["up_written"].as_u64().unwrap();
    assert!(written > 0, "{report}");
    // Every acknowledged write is in the store exactly once: the devices' `changes_applied`
    // (counted by the store in each push's transaction) equal the writes acknowledged, up
    // writes and the devices' command results.
    assert_eq!(report["up_acked"].as_u64(), Some(written), "{stdout}");
    let results = report["commands_done"].as_u64().unwrap();
    assert_eq!(report["commands_sent"].as_u64(), Some(results), "{stdout}");
    assert_eq!(
        report["cloud_counts"]["device_changes_applied"].as_u64(),
        Some(written + results),
        "{stdout}"
    );
    // Every device holds the cloud's writes: down writes, broadcasts, commands.
    assert_eq!(report["missing"]["down"], 0, "{stdout}");
    assert_eq!(report["missing"]["broadcasts"], 0, "{stdout}");
    assert_eq!(report["missing"]["commands"], 0, "{stdout}");
    assert_eq!(report["duplicates"], 0, "{stdout}");
    assert_eq!(report["down_applied"], report["down_written"], "{stdout}");
    assert!(report["down_written"].as_u64().unwrap() > 0, "{stdout}");
    report
}

/// Three nodes share the partitions; waits until each holds some and together all.
fn wait_spread(nodes: &[&CloudProc]) {
    eventually("the three nodes to share the partitions", || {
        let h: Vec<u64> = nodes.iter().map(|n| held(n)).collect();
        if h.iter().sum::<u64>() == PARTITIONS && h.iter().all(|x| *x > 0) {
            Ok(())
        } else {
            Err(format!("held {h:?}"))
        }
    });
}

#[test]
fn a_node_killed_mid_run_is_taken_over_and_nothing_acknowledged_is_lost() {
    if !services_on() {
        return;
    }
    let Setup {
        pg,
        store,
        dir,
        mosquitto: _mosquitto,
        broker,
        key,
    } = Setup::new();
    let n1 = start_node(dir.path(), 1, &store, &broker, &key);
    let mut n2 = start_node(dir.path(), 2, &store, &broker, &key);
    let n3 = start_node(dir.path(), 3, &store, &broker, &key);
    wait_spread(&[&n1, &n2, &n3]);

    let sim = start_sim(dir.path(), &n1.api, &broker, &key, 150);
    // Node 2 serves devices (its share of them said hello to it), then dies.
    eventually("node 2 serving devices", || {
        let s = num(&status(&n2), "sessions");
        if s >= 10 {
            Ok(())
        } else {
            Err(format!("{s} sessions"))
        }
    });
    let claimed_before = num(&status(&n1), "cluster_partitions_claimed")
        + num(&status(&n3), "cluster_partitions_claimed");
    let held_by_2 = held(&n2);
    n2.kill();
    let killed = Instant::now();
    eventually("nodes 1 and 3 to take node 2's partitions", || {
        let h = held(&n1) + held(&n3);
        if h == PARTITIONS {
            Ok(())
        } else {
            Err(format!("{h} held"))
        }
    });
    let takeover = killed.elapsed();
    let claimed_after = num(&status(&n1), "cluster_partitions_claimed")
        + num(&status(&n3), "cluster_partitions_claimed");
    assert!(
        claimed_after >= claimed_before + held_by_2,
        "the survivors claimed node 2's {held_by_2} partitions: {claimed_before} -> {claimed_after}"
    );
    eprintln!("takeover after SIGKILL: {} ms", takeover.as_millis());

    // Node 2 comes back under its name and takes its share again.
    n2.start_again();
    wait_spread(&[&n1, &n2, &n3]);

    finish_sim(sim, dir.path());
    // The nodes left each other's devices alone, and the API writes on node 1 woke devices
    // the other nodes serve.
    let statuses: Vec<Value> = [&n1, &n2, &n3].iter().map(|n| status(n)).collect();
    let other: u64 = statuses
        .iter()
        .map(|s| num(s, "cluster_messages_other_nodes"))
        .sum();
    assert!(other > 0, "{statuses:?}");
    assert!(
        num(&statuses[0], "cluster_wakeups_sent") > 0,
        "{:?}",
        statuses[0]
    );
    let heard: u64 = statuses[1..]
        .iter()
        .map(|s| num(s, "cluster_wakeups_heard"))
        .sum();
    assert!(heard > 0, "{statuses:?}");
    // One lease row per partition, every one held, by three nodes.
    assert_eq!(
        pg.query_i64("SELECT count(*) FROM {s}.cluster_leases WHERE node IS NOT NULL"),
        PARTITIONS as i64
    );
    assert_eq!(
        pg.query_i64("SELECT count(DISTINCT node) FROM {s}.cluster_leases"),
        3
    );
}

#[test]
fn the_broker_killed_mid_run_loses_nothing_acknowledged() {
    if !services_on() {
        return;
    }
    let Setup {
        pg: _pg,
        store,
        dir,
        mut mosquitto,
        broker,
        key,
    } = Setup::new();
    let nodes: Vec<CloudProc> = (1..=3)
        .map(|i| start_node(dir.path(), i, &store, &broker, &key))
        .collect();
    wait_spread(&nodes.iter().collect::<Vec<_>>());
    let restarted_before: u64 = nodes
        .iter()
        .map(|n| num(&status(n), "sessions_restarted"))
        .sum();

    let sim = start_sim(dir.path(), &nodes[0].api, &broker, &key, 60);
    eventually("the nodes serving devices", || {
        let s: u64 = nodes.iter().map(|n| num(&status(n), "sessions")).sum();
        if s >= 40 {
            Ok(())
        } else {
            Err(format!("{s} sessions"))
        }
    });
    // The broker dies and comes back on the same port.
    mosquitto.restart();
    finish_sim(sim, dir.path());
    // The nodes noticed: their sessions restarted after the broker came back.
    let restarted_after: u64 = nodes
        .iter()
        .map(|n| num(&status(n), "sessions_restarted"))
        .sum();
    assert!(
        restarted_after > restarted_before,
        "{restarted_before} -> {restarted_after}"
    );
    drop(mosquitto);
}

#[test]
fn change_log_readers_and_webhooks_hear_writes_made_on_other_nodes_once() {
    if !services_on() {
        return;
    }
    let Setup {
        pg: _pg,
        store,
        dir,
        mosquitto: _mosquitto,
        broker,
        key,
    } = Setup::new();
    let nodes: Vec<CloudProc> = (1..=3)
        .map(|i| start_node(dir.path(), i, &store, &broker, &key))
        .collect();
    wait_spread(&nodes.iter().collect::<Vec<_>>());
    nodes[0].register(KEY_ACCOUNT, "dev-1");

    // A webhook (created on node 2) and a long poll (on node 3), both before any write.
    let port = free_port();
    let receiver = super::changes::Receiver::start(port, 200);
    let (status, body) = nodes[1].send(
        "POST",
        &format!("/v1/accounts/{KEY_ACCOUNT}/webhooks"),
        serde_json::json!({"url": format!("http://127.0.0.1:{port}/hook")}),
    );
    assert_eq!(status, 201, "{body}");
    let head = nodes[2]
        .get(&format!("/v1/accounts/{KEY_ACCOUNT}/changes"))
        .unwrap()["head"]
        .as_u64()
        .unwrap();
    let poller = {
        let client = nodes[2].client();
        std::thread::spawn(move || {
            client
                .get(&format!(
                    "/v1/accounts/{KEY_ACCOUNT}/changes?after={head}&wait=30"
                ))
                .unwrap()
        })
    };

    // Writes through node 1 only.
    let writes = 6;
    for i in 0..writes {
        let (status, body) = nodes[0].send(
            "POST",
            &format!("/v1/accounts/{KEY_ACCOUNT}/devices/dev-1/items/Setting"),
            serde_json::json!({"deviceId": "dev-1", "name": format!("s{i}"), "value": "v"}),
        );
        assert_eq!(status, 201, "{body}");
    }
    // The long poll on node 3 was woken by node 1's commit (without the change log's head
    // told across nodes it would wait out its 30 s and answer nothing).
    let answered = poller.join().unwrap();
    assert!(
        !answered["changes"].as_array().unwrap().is_empty(),
        "{answered}"
    );
    // The webhook gets every change exactly once, though three nodes hold it.
    let seqs = || -> Vec<u64> {
        receiver
            .received()
            .iter()
            .filter(|r| r.answered == 200)
            .flat_map(|r| {
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                body["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["seq"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    eventually("the webhook delivered every write", || {
        let n = seqs().len();
        if n >= writes {
            Ok(())
        } else {
            Err(format!("{n} of {writes}"))
        }
    });
    // No node delivers after the leader caught up: the webhook's cursor is at the head.
    let hook_id = body["webhook"]["id"].as_str().unwrap().to_string();
    let last = *seqs().iter().max().unwrap();
    eventually("the webhook's cursor at the last change", || {
        let h = nodes[0]
            .get(&format!("/v1/accounts/{KEY_ACCOUNT}/webhooks/{hook_id}"))
            .unwrap();
        (h["cursor"].as_u64() == Some(last))
            .then_some(())
            .ok_or(h.to_string())
    });
    let mut got = seqs();
    got.sort_unstable();
    let mut unique = got.clone();
    unique.dedup();
    assert_eq!(got, unique, "a change delivered twice");
    assert_eq!(got.len(), writes);
}

/// Whether the registry, read through `node`'s API, shows the device online.
fn shown_online(node: &CloudProc, device: &str) -> Result<bool, String> {
    let record = node.get(&format!("/v1/devices/{KEY_ACCOUNT}/{device}"))?;
    record["online"]
        .as_bool()
        .ok_or_else(|| format!("no online flag: {record}"))
}

/// A device that left while the only node serving it was dead (its last will reached no live
/// node) is marked offline by the node that takes its partition over: that node prompts every
/// device the registry shows online in the partitions it took and marks the silent ones. A
/// device still connected answers the prompt and stays online.
#[test]
fn a_device_that_left_while_its_node_was_dead_is_marked_offline_by_the_next() {
    if !services_on() {
        return;
    }
    let Setup {
        pg: _pg,
        store,
        dir,
        mosquitto: _mosquitto,
        broker,
        key,
    } = Setup::new();
    let presence = "cluster_presence_check_ms: 2000,";
    let mut n1 = start_node_with(dir.path(), 1, &store, &broker, &key, presence);
    eventually("node 1 to hold every partition", || match held(&n1) {
        PARTITIONS => Ok(()),
        h => Err(format!("{h} held")),
    });
    let mut agents: Vec<AgentProc> = ["stays", "leaves"]
        .iter()
        .map(|name| {
            let secret = n1.register(KEY_ACCOUNT, name);
            AgentProc::start(&AgentSpec {
                dir: dir.path(),
                name,
                account: KEY_ACCOUNT,
                device: name,
                secret: &secret,
                mqtt: &broker,
                prefix: devtables_sync_prefix(),
                schema: None,
            })
        })
        .collect();
    for agent in &mut agents {
        agent.wait_synced();
    }
    for name in ["stays", "leaves"] {
        eventually(&format!("{name} shown online"), || {
            shown_online(&n1, name)?
                .then_some(())
                .ok_or_else(|| "offline".to_string())
        });
    }

    // The node dies, then one device leaves: its last will reaches no node.
    n1.kill();
    let leaves = agents.pop().unwrap();
    leaves.kill();
    let mut stays = agents.pop().unwrap();

    // Another node takes the partitions over once node 1's leases run out.
    let n2 = start_node_with(dir.path(), 2, &store, &broker, &key, presence);
    eventually(
        "node 2 to mark the device that left offline",
        || match shown_online(&n2, "leaves")? {
            false => Ok(()),
            true => Err(format!("still online; node 2: {}", status(&n2))),
        },
    );
    let s = status(&n2);
    assert_eq!(num(&s, "cluster_presence_marked_offline"), 1, "{s}");
    assert_eq!(num(&s, "cluster_partitions_held"), PARTITIONS, "{s}");
    // The connected device answered the prompt: a session on node 2, still online.
    assert!(shown_online(&n2, "stays").unwrap(), "{s}");
    assert_eq!(num(&s, "sessions"), 1, "{s}");
    stays.wait_synced();
    assert_eq!(stays.status()["ready"], true);
}

#[test]
fn registry_commands_reach_the_postgresql_store() {
    if !services_on() {
        return;
    }
    let Setup {
        pg,
        store,
        dir,
        mosquitto: _mosquitto,
        broker,
        key,
    } = Setup::new();
    let node = start_node(dir.path(), 1, &store, &broker, &key);
    node.register(KEY_ACCOUNT, "dev-a");
    node.register(KEY_ACCOUNT, "dev-b");
    let pg_args = ["--database", &pg.url, "--database-schema", &pg.name];
    // A registry command on the PostgreSQL store; it must succeed.
    let run = |args: &[&str]| {
        let out = bin().args(args).args(pg_args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The Mosquitto configuration from the PostgreSQL registry: both devices.
    let out = dir.path().join("mosquitto");
    let out_arg = out.to_str().unwrap();
    run(&["broker-config", "mosquitto", "--out", out_arg]);
    let passwords = std::fs::read_to_string(out.join("passwords")).unwrap();
    for d in ["dev-a", "dev-b"] {
        assert!(
            passwords.contains(&format!("{KEY_ACCOUNT}/{d}:")),
            "{passwords}"
        );
    }
    // A revocation in PostgreSQL, and the next export leaves the device out.
    run(&[
        "devices",
        "revoke",
        "--account",
        KEY_ACCOUNT,
        "--device",
        "dev-b",
    ]);
    assert_eq!(
        pg.query_i64(
            "SELECT count(*) FROM {s}.devices WHERE device = 'dev-b' AND secret_hash = 'revoked'"
        ),
        1
    );
    run(&["broker-config", "mosquitto", "--out", out_arg]);
    let passwords = std::fs::read_to_string(out.join("passwords")).unwrap();
    assert!(!passwords.contains("dev-b:"), "{passwords}");
    assert!(passwords.contains("dev-a:"), "{passwords}");
}
