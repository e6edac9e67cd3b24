//! The cloud's path probe through an external broker: a subscription that stays granted but
//! stops delivering (a NATS node whose JetStream consumer lost its quorum does this, the
//! connection up) is noticed by probes that no longer come back, and every connection is made
//! again, to the next address. Scripted MQTT brokers over real TCP stand for the nodes: they
//! carry what one connection publishes to the connections that subscribed, until told to go
//! deaf.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devtables_cloud::{BrokerMode, Cloud, CloudConfig};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

use crate::harness::{admin_key, config, eventually, get_as, schema};
use crate::mqtt_packet::{read_packet, suback};

/// A broker node: what it saw, and a switch that makes it deaf (it keeps granting and
/// acknowledging, and delivers nothing).
#[derive(Default)]
struct Node {
    connects: AtomicUsize,
    delivered: AtomicUsize,
    deaf: AtomicBool,
}

/// An MQTT PUBLISH at QoS 0.
fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut rest = Vec::with_capacity(2 + topic.len() + payload.len());
    rest.extend((topic.len() as u16).to_be_bytes());
    rest.extend(topic.as_bytes());
    rest.extend(payload);
    let mut packet = vec![0x30];
    let mut len = rest.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(rest);
    packet
}

/// Starts a broker node on a free port: every PUBLISH any connection sends goes to every
/// connection that subscribed (filters are not matched: the cloud is the only client here).
async fn start_node() -> (u16, Arc<Node>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let node = Arc::new(Node::default());
    let (routed, _) = broadcast::channel::<Vec<u8>>(1024);
    let serving = node.clone();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (mut reader, mut writer) = socket.into_split();
            let (out, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
            tokio::spawn(async move {
                while let Some(bytes) = outgoing.recv().await {
                    if writer.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
            let (node, routed) = (serving.clone(), routed.clone());
            tokio::spawn(async move {
                while let Ok((kind, body)) = read_packet(&mut reader).await {
                    let answer: Vec<u8> = match kind >> 4 {
                        1 => {
                            node.connects.fetch_add(1, Ordering::SeqCst);
                            vec![0x20, 2, 0, 0]
                        }
                        8 => {
                            // From now on this connection hears what is routed.
                            let mut heard = routed.subscribe();
                            let (out, node) = (out.clone(), node.clone());
                            tokio::spawn(async move {
                                while let Ok(packet) = heard.recv().await {
                                    if node.deaf.load(Ordering::SeqCst) {
                                        continue;
                                    }
                                    node.delivered.fetch_add(1, Ordering::SeqCst);
                                    if out.send(packet).is_err() {
                                        return;
                                    }
                                }
                            });
                            suback(&body, 1)
                        }
                        3 => {
                            let qos = (kind >> 1) & 3;
                            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                            let topic = String::from_utf8_lossy(&body[2..2 + topic_len]);
                            let payload_at = 2 + topic_len + if qos > 0 { 2 } else { 0 };
                            let _ = routed.send(publish_packet(&topic, &body[payload_at..]));
                            if qos == 0 {
                                continue;
                            }
                            vec![0x40, 2, body[2 + topic_len], body[3 + topic_len]]
                        }
                        12 => vec![0xd0, 0],
                        14 => return,
                        _ => continue,
                    };
                    if out.send(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, node, task)
}

/// The cloud on an external broker at `port`, then `fallback`, probing every 200 ms.
fn probing_config(dir: &std::path::Path, port: u16, fallback: Option<u16>) -> CloudConfig {
    let mut c = config(dir);
    c.broker = BrokerMode::External {
        host: "127.0.0.1".into(),
        port,
        username: None,
        password: None,
    };
    c.mqtt.external_fallbacks = fallback
        .map(|p| vec![("127.0.0.1".to_string(), p)])
        .unwrap_or_default();
    c.mqtt.reconnect_min = Duration::from_millis(50);
    c.mqtt.reconnect_max = Duration::from_millis(200);
    c.mqtt.probe_interval = Duration::from_millis(200);
    c
}

async fn status(cloud: &Cloud, key: &str) -> Value {
    get_as(cloud.api_addr, "/v1/status", key).await.1
}

fn n(status: &Value, field: &str) -> u64 {
    status[field].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_stops_delivering_is_noticed_and_made_again_at_the_next_address() {
    let dir = tempfile::tempdir().unwrap();
    let (first_port, first, first_task) = start_node().await;
    let (second_port, second, second_task) = start_node().await;
    let cloud = Cloud::start(
        probing_config(dir.path(), first_port, Some(second_port)),
        schema(),
    )
    .await
    .expect("the cloud starts");
    let key = admin_key(&cloud).await;

    // Probes come back through the first node.
    eventually("probes heard through the first node", || {
        let (cloud, key) = (&cloud, key.clone());
        async move {
            let s = status(cloud, &key).await;
            (n(&s, "probes_heard") >= 3)
                .then_some(())
                .ok_or(s.to_string())
        }
    })
    .await;
    assert_eq!(
        first.connects.load(Ordering::SeqCst),
        2,
        "ingress and egress"
    );
    assert_eq!(second.connects.load(Ordering::SeqCst), 0);

    // The first node goes deaf, its connections up: three probes lost, every connection made
    // again at the next address, where probes come back.
    first.deaf.store(true, Ordering::SeqCst);
    let heard_before = n(&status(&cloud, &key).await, "probes_heard");
    let s = eventually("probes heard through the second node", || {
        let (cloud, key, second) = (&cloud, key.clone(), second.clone());
        async move {
            let s = status(cloud, &key).await;
            (n(&s, "probe_verdicts") >= 1 && second.delivered.load(Ordering::SeqCst) >= 3)
                .then_some(s.clone())
                .ok_or(s.to_string())
        }
    })
    .await;
    assert_eq!(n(&s, "probe_verdicts"), 1, "{s}");
    assert!(n(&s, "probes_heard") > heard_before, "{s}");
    assert!(n(&s, "probes_sent") >= n(&s, "probes_heard") + 3, "{s}");
    assert_eq!(
        second.connects.load(Ordering::SeqCst),
        2,
        "ingress and egress moved"
    );
    assert_eq!(s["subscribed"], true, "{s}");
    cloud.shutdown().await;
    first_task.abort();
    second_task.abort();
}

/// A broker that never carries a probe back (its access control refuses them, say) costs a
/// warning, never a reconnect: verdicts start once a probe has come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_that_never_came_back_make_no_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let (port, node, task) = start_node().await;
    node.deaf.store(true, Ordering::SeqCst);
    let cloud = Cloud::start(probing_config(dir.path(), port, None), schema())
        .await
        .expect("the cloud starts");
    let key = admin_key(&cloud).await;
    let s = eventually("six probes sent", || {
        let (cloud, key) = (&cloud, key.clone());
        async move {
            let s = status(cloud, &key).await;
            (n(&s, "probes_sent") >= 6)
                .then_some(s.clone())
                .ok_or(s.to_string())
        }
    })
    .await;
    assert_eq!(n(&s, "probes_heard"), 0, "{s}");
    assert_eq!(n(&s, "probe_verdicts"), 0, "{s}");
    assert_eq!(node.connects.load(Ordering::SeqCst), 2, "never reconnected");
    cloud.shutdown().await;
    task.abort();
}
