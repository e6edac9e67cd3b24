//! Several MQTT clients per direction to an external broker (`mqtt.ingress_clients`,
//! `mqtt.egress_clients`), against a real Mosquitto over TCP: three ingress clients share one
//! subscription, three egress clients split the devices, devices sync both ways with every push
//! answered exactly once, Mosquitto sees the six sessions under their own ids, and a client whose
//! connection is taken from it comes back with every device session restarted and nothing lost.
//!
//! Service tests: they run with `DEVTABLES_SERVICES` set (a private Mosquitto is started on a
//! free port, so the test may take its sessions away without disturbing anything else).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use devtables_cloud::ops::WriteKind;
use devtables_cloud::{BrokerMode, Cloud};
use devtables_sync::identity::Owner;
use devtables_sync::wire::{DownMsg, UpMsg};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use serde_json::Value;

use super::services_gate::services_on;
use crate::harness::{
    admin_key, config, device, eventually, free_port, get_as, put_of, schema, setting, RawDevice,
};

const CLIENTS: usize = 3;
const DEVICES: usize = 6;
const PUSHES: u64 = 20;
const NODE: &str = "pooltest";

/// A private Mosquitto: killed when dropped.
struct Mosquitto {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts Mosquitto on a free port, logging connections and subscriptions to a file (in a
    /// folder anyone may write: Mosquitto started as root writes as the `mosquitto` user; its
    /// standard output would be buffered until it exits).
    async fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let logs = dir.join("broker-log");
        std::fs::create_dir(&logs).unwrap();
        std::fs::set_permissions(&logs, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let log = logs.join("mosquitto.log");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest file {}\nlog_type notice\nlog_type subscribe\nconnection_messages true\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("DEVTABLES_SERVICES is set but the mosquitto binary cannot be started");
        eventually("mosquitto listening", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
        Mosquitto { child, port, log }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What Mosquitto logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times Mosquitto logged a new connection under `client_id`.
    fn connections_of(&self, client_id: &str) -> usize {
        let needle = format!(" as {client_id} (");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// The filters `client_id` subscribed to, as Mosquitto logged them.
    fn filters_of(&self, client_id: &str) -> BTreeSet<String> {
        let prefix = format!(": {client_id} ");
        self.log()
            .lines()
            .filter_map(|l| l.split_once(&prefix))
            .filter_map(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string))
            .collect()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn service_ids() -> Vec<String> {
    (0..CLIENTS)
        .flat_map(|i| {
            [
                format!("devtables-cloud-{NODE}-in-{i}"),
                format!("devtables-cloud-{NODE}-out-{i}"),
            ]
        })
        .collect()
}

/// Connects under `client_id`, which makes Mosquitto close the session that had it (a session
/// takeover), then leaves.
async fn take_over(port: u16, client_id: &str) {
    let options = MqttOptions::new(client_id, "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("the takeover of {client_id} did not connect: {other:?}"),
        }
    }
    client.disconnect().await.expect("queue the disconnect");
    // Poll until the DISCONNECT is out (the loop then ends).
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
}

/// Every device pushes `PUSHES` batches (numbered from `first`) at once, without waiting, then
/// collects the answers: each batch must be answered exactly once.
async fn push_round(devices: &mut [RawDevice], first: u64) {
    let now = wall_ms();
    for (i, dev) in devices.iter().enumerate() {
        for batch in first..first + PUSHES {
            let change = put_of(&device(i), "Setting", &format!("s{batch}"), now + batch);
            dev.send(&UpMsg::Push {
                batch,
                changes: vec![change],
                session: None,
            })
            .await;
        }
    }
    for (i, dev) in devices.iter_mut().enumerate() {
        let mut answered = BTreeSet::new();
        while answered.len() < PUSHES as usize {
            let batch = dev
                .recv(|m| match m {
                    DownMsg::PushAck { batch, .. } => Some(*batch),
                    _ => None,
                })
                .await;
            let Some(batch) = batch else {
                panic!("device {i}: {} of {PUSHES} pushes answered", answered.len());
            };
            assert!(
                (first..first + PUSHES).contains(&batch),
                "device {i}: an answer to batch {batch}, not of this round"
            );
            assert!(
                answered.insert(batch),
                "device {i}: batch {batch} answered twice"
            );
        }
    }
}

/// A cloud write to every device, down through the egress clients: each device gets its item.
async fn write_down(cloud: &Cloud, devices: &mut [RawDevice]) {
    for i in 0..devices.len() {
        cloud
            .write_item(
                Owner::Device(device(i)),
                "Setting",
                setting(i),
                WriteKind::Create,
            )
            .await
            .expect("write");
    }
    let mode = Value::from("mode");
    for (i, dev) in devices.iter_mut().enumerate() {
        let fed = dev
            .recv(|m| match m {
                DownMsg::Feed { changes, .. } => changes
                    .iter()
                    .any(|c| c.item.as_ref().and_then(|it| it.get("name")) == Some(&mode))
                    .then_some(()),
                _ => None,
            })
            .await;
        assert!(
            fed.is_some(),
            "device {i}: the cloud write never reached it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_each_way_share_the_devices_and_survive_a_lost_connection() {
    if !services_on() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).await;
    let mut c = config(dir.path());
    c.node_name = NODE.into();
    c.broker = BrokerMode::External {
        host: "127.0.0.1".into(),
        port: broker.port,
        username: None,
        password: None,
    };
    c.mqtt.ingress_clients = CLIENTS;
    c.mqtt.egress_clients = CLIENTS;
    c.mqtt.reconnect_min = Duration::from_millis(50);
    c.mqtt.reconnect_max = Duration::from_millis(200);
    c.sync.device_rate.per_sec = 0;
    c.sync.max_pushes_in_progress = PUSHES as usize;
    let cloud = Cloud::start(c, schema()).await.expect("the cloud starts");
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    let status = |key: String| async move {
        let (_, s) = get_as(api, "/v1/status", &key).await;
        s
    };
    let all_up = |s: &Value| {
        s["ingress_clients_up"] == CLIENTS as u64
            && s["egress_clients_up"] == CLIENTS as u64
            && s["broker_connected"] == true
            && s["egress_connected"] == true
            && s["subscribed"] == true
    };
    let ready = eventually("every client up and subscribed", || {
        let key = key.clone();
        async move {
            let s = status(key).await;
            all_up(&s).then_some(s.clone()).ok_or(s.to_string())
        }
    })
    .await;
    assert_eq!(ready["subscriptions_held"], CLIENTS as u64, "{ready}");

    // Mosquitto sees the six service sessions under ids of their own, and the three ingress
    // clients joined one shared subscription (one plain one each would hand every device
    // message to all three).
    for id in service_ids() {
        assert_eq!(broker.connections_of(&id), 1, "{id}:\n{}", broker.log());
    }
    for i in 0..CLIENTS {
        let id = format!("devtables-cloud-{NODE}-in-{i}");
        assert_eq!(
            broker.filters_of(&id),
            BTreeSet::from([format!("$share/devtables-{NODE}/devtables/+/+/up")]),
            "{}",
            broker.log()
        );
    }

    let mut devices = Vec::new();
    let mut cursors = HashMap::new();
    for i in 0..DEVICES {
        let secret = cloud.register_device(&device(i)).await.expect("register");
        let mut dev = RawDevice::connect(&broker.addr(), device(i), &secret).await;
        assert!(dev.hello(1, 0).await, "device {i} welcomed");
        let (_, cursor) = dev.finish_resync().await;
        cursors.insert(i, cursor);
        devices.push(dev);
    }

    // Both ways. Each device message is read once: by one of the three clients. So far each
    // device sent a hello and acknowledged its (one-page) resync.
    let n = |s: &Value, k: &str| s[k].as_u64().unwrap_or(u64::MAX);
    let before = eventually("the hellos and resync acknowledgements read", || {
        let key = key.clone();
        async move {
            let s = status(key).await;
            (n(&s, "messages_in") == 2 * DEVICES as u64)
                .then_some(s.clone())
                .ok_or(s.to_string())
        }
    })
    .await;
    push_round(&mut devices, 1).await;
    write_down(&cloud, &mut devices).await;
    let after = status(key.clone()).await;
    assert_eq!(
        n(&after, "messages_in") - n(&before, "messages_in"),
        DEVICES as u64 * PUSHES,
        "every push read exactly once: {after}"
    );
    assert_eq!(
        n(&after, "push_changes_applied"),
        DEVICES as u64 * PUSHES,
        "{after}"
    );

    // Take one ingress and one egress client's connection away (Mosquitto closes a session
    // whose id another client connects with). Each comes back; the device sessions restart.
    let restarted_before = n(&after, "sessions_restarted");
    for id in [
        format!("devtables-cloud-{NODE}-in-1"),
        format!("devtables-cloud-{NODE}-out-2"),
    ] {
        take_over(broker.port, &id).await;
        eventually("the client reconnected", || {
            let id = id.clone();
            let broker = &broker;
            async move {
                let connections = broker.connections_of(&id);
                (connections >= 3)
                    .then_some(())
                    .ok_or(format!("{id} connected {connections} times"))
            }
        })
        .await;
    }
    let restored = eventually("every client back and the sessions restarted", || {
        let key = key.clone();
        async move {
            let s = status(key).await;
            (all_up(&s) && n(&s, "sessions_restarted") >= restarted_before + DEVICES as u64)
                .then_some(s.clone())
                .ok_or(s.to_string())
        }
    })
    .await;
    assert!(
        n(&restored, "subscribe_attempts") > CLIENTS as u64,
        "the ingress client subscribed again: {restored}"
    );
    assert!(
        n(&restored, "publishes_lost") <= n(&restored, "publishes_queued"),
        "{restored}"
    );

    // The devices say hello again (their sessions ended) and sync both ways as before:
    // nothing was lost, every push of both rounds applied once.
    for (i, dev) in devices.iter_mut().enumerate() {
        assert!(
            dev.hello(2, cursors[&i]).await,
            "device {i} welcomed after the restart"
        );
    }
    push_round(&mut devices, PUSHES + 1).await;
    let end = status(key.clone()).await;
    assert_eq!(
        n(&end, "push_changes_applied"),
        2 * DEVICES as u64 * PUSHES,
        "{end}"
    );
    assert_eq!(n(&end, "publishes_dropped"), 0, "{end}");
    assert_eq!(n(&end, "device_pushes_busy"), 0, "{end}");
    cloud.shutdown().await;
}
