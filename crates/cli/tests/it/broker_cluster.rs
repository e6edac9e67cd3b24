//! A clustered broker carrying the fleet: three NATS servers (2.9, JetStream, the MQTT gateway)
//! in one cluster, a `devtables cloud` whose external broker is the three MQTT addresses, and
//! `devtables agent` processes each given the addresses in another order, so they spread over
//! the nodes. Devices write up and the cloud writes down while a node is killed with SIGKILL:
//! first the one that carries the cloud's reading connection, then (after it came back) another
//! one.
//! Each time the clients on the dead node must reconnect to another node (their status and logs
//! say where), and at the end every write each device made is in the cloud exactly once
//! (`changes_applied`) and every device holds every write the cloud made for it.
//!
//! A service test: it runs only with DEVTABLES_SERVICES set, and then a missing `nats-server`
//! fails it. The NATS configuration is what docs/brokers.md explains: accounts with JetStream,
//! MQTT streams replicated on every node (`stream_replicas: 3`), one user per device confined to
//! its own subjects, and the cloud's two users (ingress reads every up topic, egress writes
//! every down topic).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::harness::{
    eventually, eventually_within, free_port, unique_prefix, AgentProc, AgentSpec, BrokerChoice,
    CloudProc, Logs,
};
use super::services::services_on;

const ACCOUNT: &str = "acme";
const SERVICE_USER: &str = "devtables-service";
const EGRESS_USER: &str = "devtables-service-egress";
const SERVICE_PASSWORD: &str = "cluster-test-service-password";
const NODES: usize = 3;
const DEVICES: usize = 3;

/// The `nats-server` binary: `DEVTABLES_NATS_SERVER`, else the Debian package's, else `PATH`'s.
fn nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("DEVTABLES_NATS_SERVER") {
        return path.into();
    }
    let packaged = Path::new("/usr/sbin/nats-server");
    if packaged.exists() {
        packaged.to_path_buf()
    } else {
        "nats-server".into()
    }
}

/// An MQTT topic as the NATS subject it maps to (`/` between levels becomes `.`); the test's
/// topics have no `.` of their own.
fn subject(topic: &str) -> String {
    assert!(!topic.contains('.'), "{topic} would need NATS's escaping");
    topic.replace('/', ".")
}

/// A NATS user: its name, password, the subjects it may publish and those it may subscribe to
/// (none: denied all).
struct NatsUser {
    name: String,
    password: String,
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl NatsUser {
    fn conf(&self) -> String {
        let list = |subjects: &[String]| {
            if subjects.is_empty() {
                "{deny: \">\"}".to_string()
            } else {
                let quoted: Vec<String> = subjects.iter().map(|s| format!("\"{s}\"")).collect();
                format!("[{}]", quoted.join(", "))
            }
        };
        for text in [&self.name, &self.password] {
            assert!(
                !text.contains(['"', '\\', '\n']),
                "{text:?} cannot go into a quoted string of the NATS configuration"
            );
        }
        format!(
            "      {{user: \"{}\", password: \"{}\", allowed_connection_types: [\"MQTT\"], \
             permissions: {{publish: {}, subscribe: {}}}}}\n",
            self.name,
            self.password,
            list(&self.publish),
            list(&self.subscribe)
        )
    }
}

/// The cloud's users: its ingress connection reads every device's up topic, its egress
/// connection writes every down topic (each device's and each account's broadcast topic) and
/// the cloud's path probes (`{prefix}/_devtables/{node}/up`, read back by the ingress). QoS 1
/// deliveries reach an MQTT client through the gateway's internal `$MQTT.sub.<id>` subjects, so
/// a user that subscribes needs them too.
fn service_users(prefix: &str) -> Vec<NatsUser> {
    vec![
        NatsUser {
            name: SERVICE_USER.into(),
            password: SERVICE_PASSWORD.into(),
            publish: Vec::new(),
            subscribe: vec![subject(&format!("{prefix}/*/*/up")), "$MQTT.sub.>".into()],
        },
        NatsUser {
            name: EGRESS_USER.into(),
            password: SERVICE_PASSWORD.into(),
            publish: vec![
                subject(&format!("{prefix}/*/*/down")),
                subject(&format!("{prefix}/_devtables/*/up")),
            ],
            subscribe: Vec::new(),
        },
    ]
}

/// A device's user, named as its MQTT username (`account/device`): it publishes only on its own
/// up topic (its last will too) and reads only its own down topic and its account's broadcast
/// topic, as the embedded broker and `devtables broker-config mosquitto` allow.
fn device_user(prefix: &str, device: &str, secret: &str) -> NatsUser {
    NatsUser {
        name: format!("{ACCOUNT}/{device}"),
        password: secret.into(),
        publish: vec![subject(&format!("{prefix}/{ACCOUNT}/{device}/up"))],
        subscribe: vec![
            subject(&format!("{prefix}/{ACCOUNT}/{device}/down")),
            subject(&format!("{prefix}/{ACCOUNT}/_all/down")),
            "$MQTT.sub.>".into(),
        ],
    }
}

/// The ports of one node, each free when chosen.
#[derive(Clone, Copy)]
struct NodePorts {
    client: u16,
    route: u16,
    mqtt: u16,
    monitor: u16,
}

struct NatsNode {
    name: String,
    conf: PathBuf,
    ports: NodePorts,
    child: Option<Child>,
    logs: Logs,
}

impl NatsNode {
    fn mqtt_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.mqtt)
    }

    fn start(&mut self) {
        let mut child = Command::new(nats_server())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "DEVTABLES_SERVICES is set but nats-server ({}) cannot be started: {e}",
                    nats_server().display()
                )
            });
        self.logs = Logs::capture(child.stderr.take().unwrap(), self.name.clone());
        self.child = Some(child);
    }

    /// SIGKILL: the node dies with its connections, as a crashed machine would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log line of a node that exited because a port it was given was taken.
    fn port_taken(&mut self) -> Option<String> {
        let exited = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
        if !exited {
            return None;
        }
        // Its last lines may still be on their way from the pipe: a moment for them.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let line = self
                .logs
                .matching("address already in use")
                .into_iter()
                .next();
            if line.is_some() || std::time::Instant::now() >= deadline {
                return line;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `/healthz` answers ok: the server accepts connections and its JetStream is current with
    /// the cluster (a meta leader, its streams caught up).
    fn healthy(&mut self) -> Result<(), String> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server {} exited ({status}): {:?}",
                    self.name,
                    self.logs.tail(20)
                );
            }
        }
        let url = format!("http://127.0.0.1:{}/healthz", self.ports.monitor);
        match ureq::get(&url).call() {
            Ok(r) => r
                .into_json::<Value>()
                .map_err(|e| e.to_string())
                .and_then(|v| {
                    (v["status"] == "ok")
                        .then_some(())
                        .ok_or_else(|| v.to_string())
                }),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// SIGHUP, then waits until the server says it reloaded its configuration.
    fn reload(&self) {
        let child = self.child.as_ref().expect("a running node");
        let before = self.logs.matching("Reloaded server configuration").len();
        // SAFETY: kill(2) on the pid of a child this node owns and has not reaped yet.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGHUP);
        }
        eventually(
            &format!("{} to reload its configuration", self.name),
            || {
                let now = self.logs.matching("Reloaded server configuration").len();
                (now > before)
                    .then_some(())
                    .ok_or(format!("{:?}", self.logs.tail(5)))
            },
        );
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three NATS servers in one cluster, each with JetStream and the MQTT gateway, sharing one
/// users file (`users.conf`, beside their configurations: NATS resolves an include against the
/// including file's folder) that a reload re-reads.
struct NatsCluster {
    nodes: Vec<NatsNode>,
    users_file: PathBuf,
}

impl NatsCluster {
    /// Starts the cluster and waits until every node is healthy. Its ports are picked free and
    /// then bound by nats-server: a test running in parallel may take one in between (the node
    /// then exits, "address already in use"), and the cluster starts again on other ports.
    fn start(dir: &Path, users: &[NatsUser]) -> NatsCluster {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let mut cluster = NatsCluster::launch(dir, users);
            match cluster.wait_healthy() {
                Ok(()) => return cluster,
                Err(taken) if attempt < ATTEMPTS => {
                    eprintln!("{taken}; starting the cluster again on other ports");
                    drop(cluster);
                    for i in 0..NODES {
                        let _ = std::fs::remove_dir_all(dir.join(format!("jetstream-n{i}")));
                    }
                }
                Err(taken) => panic!("{taken}, {ATTEMPTS} times"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Writes the nodes' configurations on free ports and starts them.
    fn launch(dir: &Path, users: &[NatsUser]) -> NatsCluster {
        let ports: Vec<NodePorts> = (0..NODES)
            .map(|_| NodePorts {
                client: free_port(),
                route: free_port(),
                mqtt: free_port(),
                monitor: free_port(),
            })
            .collect();
        let users_file = dir.join("users.conf");
        let mut cluster = NatsCluster {
            nodes: Vec::new(),
            users_file,
        };
        cluster.write_users(users);
        for (i, own) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("\"nats-route://127.0.0.1:{}\"", p.route))
                .collect();
            let store = dir.join(format!("jetstream-{name}"));
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\n\
                     listen: \"127.0.0.1:{client}\"\n\
                     http: \"127.0.0.1:{monitor}\"\n\
                     jetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  \
                     max_file_store: 1GB\n}}\n\
                     cluster {{\n  name: devtables\n  listen: \"127.0.0.1:{route}\"\n  \
                     routes: [{routes}]\n}}\n\
                     mqtt {{\n  listen: \"127.0.0.1:{mqtt}\"\n  stream_replicas: {NODES}\n}}\n\
                     include \"users.conf\"\n",
                    client = own.client,
                    monitor = own.monitor,
                    store = store.display(),
                    route = own.route,
                    routes = routes.join(", "),
                    mqtt = own.mqtt,
                ),
            )
            .unwrap();
            let mut node = NatsNode {
                name,
                conf,
                ports: *own,
                child: None,
                logs: Logs::default(),
            };
            node.start();
            cluster.nodes.push(node);
        }
        cluster
    }

    /// The account the devices and the cloud share, with JetStream (the MQTT gateway keeps
    /// sessions and QoS 1 messages in it).
    fn write_users(&self, users: &[NatsUser]) {
        let mut text =
            String::from("accounts {\n  DEVTABLES {\n    jetstream: enabled\n    users: [\n");
        for user in users {
            text.push_str(&user.conf());
        }
        text.push_str("    ]\n  }\n}\n");
        let tmp = self.users_file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.users_file).unwrap();
    }

    /// New users on every running node, without a restart.
    fn set_users(&self, users: &[NatsUser]) {
        self.write_users(users);
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            node.reload();
        }
    }

    /// Waits until every node is healthy; `Err` when one exited because a port it was given
    /// was taken meanwhile.
    fn wait_healthy(&mut self) -> Result<(), String> {
        for node in &mut self.nodes {
            let what = format!("nats-server {} healthy", node.name);
            let mut taken = None;
            eventually(&what, || match node.port_taken() {
                Some(line) => {
                    taken = Some(format!("nats-server {} lost a port: {line}", node.name));
                    Ok(())
                }
                None => node.healthy(),
            });
            if let Some(taken) = taken {
                return Err(taken);
            }
        }
        Ok(())
    }

    /// Waits until the leader of each stream the MQTT gateway needs for every connect and every
    /// QoS 1 message (`$MQTT_sess`, `$MQTT_msgs`) counts node `i` as a current replica: once it
    /// is, another node may die without those streams losing their quorum. (`/healthz` is no
    /// signal here: NATS 2.9 can hold an idle consumer of a restarted node "not current" for
    /// good.)
    fn wait_caught_up(&self, i: usize) {
        let name = &self.nodes[i].name;
        eventually(
            &format!("{name} a current replica of the MQTT streams"),
            || {
                let mut current = Vec::new();
                for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                    let url = format!(
                        "http://127.0.0.1:{}/jsz?accounts=true&streams=true",
                        node.ports.monitor
                    );
                    let jsz: Value = ureq::get(&url)
                        .call()
                        .map_err(|e| e.to_string())?
                        .into_json()
                        .map_err(|e| e.to_string())?;
                    let streams = jsz["account_details"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
                    for stream in streams {
                        let cluster = &stream["cluster"];
                        // Only a stream's leader knows how current its followers are.
                        if cluster["leader"] != node.name.as_str() {
                            continue;
                        }
                        let follows = cluster["replicas"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|r| r["name"] == name.as_str() && r["current"] == true);
                        if follows {
                            current.push(stream["name"].as_str().unwrap_or_default().to_string());
                        }
                    }
                }
                ["$MQTT_sess", "$MQTT_msgs"]
                    .iter()
                    .all(|s| current.iter().any(|c| c == s))
                    .then_some(())
                    .ok_or(format!("current in {current:?}"))
            },
        );
    }

    fn mqtt_addrs(&self) -> Vec<String> {
        self.nodes.iter().map(NatsNode::mqtt_addr).collect()
    }
}

/// What one device has done and should hold.
struct Device {
    name: String,
    agent: AgentProc,
    /// Faults it created (each a new key: the cloud must count each exactly once).
    written: u64,
    /// Settings the cloud wrote for it: (name, value).
    settings: Vec<(String, String)>,
}

impl Device {
    fn status(&mut self) -> Value {
        self.agent.status()
    }

    /// Waits until the device is ready with an empty outbox, for as long as a cluster that
    /// lost a node may take (a subscription left deaf is noticed and made again within it);
    /// on failure, shows the device's and the cloud's last log lines.
    fn wait_synced(&mut self, cloud: &CloudProc) {
        let (name, agent_logs, cloud_logs) = (
            self.name.clone(),
            self.agent.logs.clone(),
            cloud.logs.clone(),
        );
        eventually_within(
            &format!("{name} synced (ready, outbox empty)"),
            Duration::from_secs(90),
            || {
                let s = self.status();
                (s["ready"] == true && s["pending"] == 0)
                    .then_some(())
                    .ok_or(s.to_string())
            },
            || last_lines(&name, &agent_logs, &cloud_logs),
        );
    }

    fn write(&mut self) {
        let id = format!("f{:05}", self.written);
        self.agent
            .op(json!({"op": "create", "model": "Fault", "item": {
            "deviceId": self.name, "id": id, "severity": "info", "message": "cluster"}}));
        self.written += 1;
    }
}

/// The broker address the last `MQTT {hop} connection ... is up` line of the cloud names, and
/// how many such lines there are.
fn cloud_connection(cloud: &CloudProc, hop: &str) -> (Option<String>, usize) {
    let (_, last, n) = connections_logged(
        &cloud.logs,
        &format!("MQTT {hop} connection to the broker at "),
    );
    (last, n)
}

/// The first and the last address a client's log says it connected to (the word after
/// `needle`), and how many such lines there are.
fn connections_logged(logs: &Logs, needle: &str) -> (Option<String>, Option<String>, usize) {
    let lines = logs.matching(needle);
    let address = |l: &String| {
        l.split(needle)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string)
    };
    (
        lines.first().and_then(address),
        lines.last().and_then(address),
        lines.len(),
    )
}

/// The cloud writes a setting for every device (down: it reaches the device through the feed).
fn write_down(cloud: &CloudProc, devices: &mut [Device], round: usize) {
    for d in devices.iter_mut() {
        let (name, value) = (format!("s{round}"), format!("v{round}-{}", d.name));
        let (status, body) = cloud.send(
            "POST",
            &format!("/v1/accounts/{ACCOUNT}/devices/{}/items/Setting", d.name),
            json!({"name": name, "value": value}),
        );
        assert_eq!(status, 201, "setting {name} for {}: {body}", d.name);
        d.settings.push((name, value));
    }
}

/// `rounds` writes on every device, one round every few milliseconds: a steady stream, so pushes
/// are in flight whenever the broker changes under them.
fn write_up(devices: &mut [Device], rounds: usize) {
    for _ in 0..rounds {
        for d in devices.iter_mut() {
            d.write();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The device's and the cloud's last log lines, for a failure message.
fn last_lines(name: &str, agent: &Logs, cloud: &Logs) -> String {
    format!(
        "\n{name}'s last log lines:\n{}\nthe cloud's last log lines:\n{}",
        agent.tail(40).join("\n"),
        cloud.tail(40).join("\n")
    )
}

/// Who had to move when a node died.
struct Moved {
    /// Devices that were on the node.
    devices: Vec<String>,
    /// The cloud's connections that were on it (`ingress`, `egress`).
    cloud: Vec<&'static str>,
}

/// Kills `victim` while devices write and the cloud writes down; then waits until every client
/// that was on it is connected to another node (and says so), and every device is synced again.
fn kill_mid_run(
    cluster: &mut NatsCluster,
    victim: usize,
    cloud: &CloudProc,
    devices: &mut [Device],
    round: usize,
) -> Moved {
    let dead = cluster.nodes[victim].mqtt_addr();
    let on_victim: Vec<usize> = devices
        .iter_mut()
        .enumerate()
        .filter_map(|(i, d)| (d.status()["broker"] == dead.as_str()).then_some(i))
        .collect();
    let failovers_before: Vec<u64> = devices
        .iter_mut()
        .map(|d| d.status()["broker_failovers"].as_u64().unwrap())
        .collect();
    let cloud_before: Vec<(Option<String>, usize)> = ["ingress", "egress"]
        .iter()
        .map(|hop| cloud_connection(cloud, hop))
        .collect();

    write_up(devices, 20);
    cluster.nodes[victim].kill();
    write_down(cloud, devices, round);
    write_up(devices, 40);

    for &i in &on_victim {
        let d = &mut devices[i];
        let name = d.name.clone();
        // NATS refuses subscriptions while it elects new JetStream leaders (seconds, longer on
        // a loaded machine); the agent asks again with backoff.
        let elections = std::time::Duration::from_secs(90);
        let (agent_logs, cloud_logs) = (d.agent.logs.clone(), cloud.logs.clone());
        eventually_within(
            &format!("{name} ready on another node than {dead}"),
            elections,
            || {
                let s = d.status();
                (s["ready"] == true && s["broker"] != dead.as_str())
                    .then_some(())
                    .ok_or(s.to_string())
            },
            || last_lines(&name, &agent_logs, &cloud_logs),
        );
        let s = d.status();
        assert!(
            s["broker_failovers"].as_u64().unwrap() > failovers_before[i],
            "{name} counts the failover: {s}"
        );
        assert!(
            !d.agent
                .logs
                .matching("another address than the last connection's")
                .is_empty(),
            "{name} logs the failover"
        );
    }
    let mut cloud_moved = Vec::new();
    for (hop, (before, lines)) in ["ingress", "egress"].iter().zip(&cloud_before) {
        if before.as_deref() != Some(dead.as_str()) {
            continue;
        }
        cloud_moved.push(*hop);
        eventually(
            &format!("the cloud's {hop} connection on another node"),
            || match cloud_connection(cloud, hop) {
                (Some(now), n) if n > *lines && now != dead => Ok(()),
                seen => Err(format!("{seen:?}")),
            },
        );
    }
    for d in devices.iter_mut() {
        d.wait_synced(cloud);
    }
    Moved {
        devices: on_victim.iter().map(|&i| devices[i].name.clone()).collect(),
        cloud: cloud_moved,
    }
}

#[test]
fn a_nats_cluster_carries_the_fleet_through_node_kills() {
    if !services_on() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let mut cluster = NatsCluster::start(dir.path(), &service_users(&prefix));
    let addrs = cluster.mqtt_addrs();

    // The cloud is given the nodes in order: it starts on the first.
    let quoted: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
    let cloud = CloudProc::start(
        dir.path(),
        &prefix,
        BrokerChoice::Configured(format!(
            "external_brokers: [{}], broker_username: '{SERVICE_USER}', \
             broker_password: '{SERVICE_PASSWORD}', broker_egress_username: '{EGRESS_USER}', \
             mqtt_probe_secs: 2,",
            quoted.join(", ")
        )),
    );
    // Starts: a connection may have moved on since (a node still electing JetStream leaders
    // that keeps refusing the subscription is given up after `subscribe_give_up`).
    for hop in ["ingress", "egress"] {
        let needle = format!("MQTT {hop} connection to the broker at ");
        assert_eq!(
            connections_logged(&cloud.logs, &needle).0.as_deref(),
            Some(addrs[0].as_str()),
            "the cloud's {hop} connection starts on the first address"
        );
    }

    // The devices' users, from the secrets the registry issued; a reload, no restart.
    let names: Vec<String> = (0..DEVICES).map(|i| format!("gw{i}")).collect();
    let mut users = service_users(&prefix);
    let secrets: Vec<String> = names.iter().map(|n| cloud.register(ACCOUNT, n)).collect();
    for (name, secret) in names.iter().zip(&secrets) {
        users.push(device_user(&prefix, name, secret));
    }
    cluster.set_users(&users);

    // Device i is given the nodes starting at node i: the fleet spreads over the cluster.
    let mut devices: Vec<Device> = names
        .iter()
        .zip(&secrets)
        .enumerate()
        .map(|(i, (name, secret))| {
            let order: Vec<&str> = (0..NODES)
                .map(|k| addrs[(i + k) % NODES].as_str())
                .collect();
            let agent = AgentProc::start_with(
                &AgentSpec {
                    dir: dir.path(),
                    name,
                    account: ACCOUNT,
                    device: name,
                    secret,
                    mqtt: &order.join(","),
                    prefix: &prefix,
                    schema: None,
                },
                // A connection whose hello goes unanswered is left sooner than by default.
                "subscribe_give_up_ms: 5000,",
            );
            Device {
                name: name.clone(),
                agent,
                written: 0,
                settings: Vec::new(),
            }
        })
        .collect();
    for d in &mut devices {
        d.wait_synced(&cloud);
    }
    let first: Vec<Option<String>> = devices
        .iter()
        .map(|d| connections_logged(&d.agent.logs, "connected to the broker at ").0)
        .collect();
    assert_eq!(
        first,
        addrs.iter().cloned().map(Some).collect::<Vec<_>>(),
        "each device starts on its own node"
    );

    // Traffic both ways before anything fails.
    write_up(&mut devices, 20);
    write_down(&cloud, &mut devices, 0);
    for d in &mut devices {
        d.wait_synced(&cloud);
    }

    // The node that carries the cloud's reading connection dies (the first node, unless the
    // connection moved on at the start), with the devices on it.
    let (cloud_on, _) = cloud_connection(&cloud, "ingress");
    let first_victim = (0..cluster.nodes.len())
        .find(|&n| Some(cluster.nodes[n].mqtt_addr()) == cloud_on)
        .expect("the cloud's ingress connection is on a node of the cluster");
    let moved = kill_mid_run(&mut cluster, first_victim, &cloud, &mut devices, 1);
    assert!(
        moved.cloud.contains(&"ingress"),
        "the cloud's ingress moved: {:?}",
        moved.cloud
    );

    // It comes back (its JetStream catches up), then another node dies.
    cluster.nodes[first_victim].start();
    cluster.wait_caught_up(first_victim);
    // The victim is the other node most devices are on now (the first victim only just
    // caught up): a device may have moved on its own meanwhile (NATS closes MQTT connections
    // while it elects JetStream leaders after the first victim's return, and the agent then
    // takes the next address), so a fixed node could hold none.
    let on: Vec<String> = devices
        .iter_mut()
        .map(|d| {
            d.status()["broker"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let victim = (0..cluster.nodes.len())
        .filter(|&n| n != first_victim)
        .max_by_key(|&n| {
            let addr = cluster.nodes[n].mqtt_addr();
            on.iter().filter(|b| **b == addr).count()
        })
        .expect("a cluster has several nodes");
    let moved = kill_mid_run(&mut cluster, victim, &cloud, &mut devices, 2);
    assert!(
        !moved.devices.is_empty() || !moved.cloud.is_empty(),
        "node {victim} carried a device or the cloud when it died (devices on {on:?})"
    );
    write_up(&mut devices, 20);
    write_down(&cloud, &mut devices, 3);

    for d in &mut devices {
        d.wait_synced(&cloud);
        // Every write the device made was acknowledged (its outbox is empty) and is in the
        // cloud exactly once: a duplicate apply would raise the count, a lost one lower it.
        let name = d.name.clone();
        let faults = cloud.items(ACCOUNT, &name, "Fault").unwrap();
        assert_eq!(
            faults.len() as u64,
            d.written,
            "{name}'s faults in the cloud"
        );
        assert_eq!(
            cloud.changes_applied(ACCOUNT, &name),
            d.written,
            "{name}'s writes applied exactly once"
        );
        // Every setting the cloud wrote for it is on the device, with its value.
        let expected = d.settings.clone();
        eventually(&format!("the cloud's settings on {name}"), || {
            let got = d
                .agent
                .op(json!({"op": "find", "model": "Setting", "item": {"deviceId": name}}));
            let mut held: Vec<(String, String)> = got
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or_default().to_string(),
                        s["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            held.sort();
            let mut want = expected.clone();
            want.sort();
            (held == want).then_some(()).ok_or(format!("{held:?}"))
        });
    }
    let failovers: u64 = devices
        .iter_mut()
        .map(|d| d.status()["broker_failovers"].as_u64().unwrap())
        .sum();
    assert!(failovers >= 2, "two kills moved devices: {failovers}");
    // What noticed a deaf subscription in this run, if any did (NATS decides whether one
    // happens): shown, for the CI log.
    let deaf: Vec<u64> = devices
        .iter_mut()
        .map(|d| d.status()["deaf_connections"].as_u64().unwrap_or(0))
        .collect();
    let verdicts = cloud.get("/v1/status").map(|s| s["probe_verdicts"].clone());
    eprintln!("deaf connections given up by the devices: {deaf:?}; the cloud's probe verdicts: {verdicts:?}");
    for d in devices {
        d.agent.stop();
    }
}
