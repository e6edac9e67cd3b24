//! A broker node that keeps refusing the device topic subscription is given up: the cloud's
//! ingress connection moves to the next broker address, where the subscription holds. Two
//! scripted MQTT brokers over real TCP stand for two nodes of a cluster, one of which (like a
//! NATS node after losing a peer) refuses every SUBSCRIBE.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devtables_cloud::{BrokerMode, Cloud};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{admin_key, config, eventually, get_as, schema};
use crate::mqtt_packet::{read_packet, suback};

/// What a scripted broker saw.
#[derive(Default)]
struct Seen {
    connects: AtomicUsize,
    subscribes: AtomicUsize,
}

/// One connection of a scripted broker: CONNACK, a SUBACK granting or refusing (0x80) every
/// filter, PUBACK for QoS 1 publishes, PINGRESP.
async fn serve(mut socket: TcpStream, grant: bool, seen: Arc<Seen>) {
    while let Ok((kind, body)) = read_packet(&mut socket).await {
        let answer: Vec<u8> = match kind >> 4 {
            1 => {
                seen.connects.fetch_add(1, Ordering::SeqCst);
                vec![0x20, 2, 0, 0]
            }
            8 => {
                seen.subscribes.fetch_add(1, Ordering::SeqCst);
                suback(&body, if grant { 1 } else { 0x80 })
            }
            3 if (kind >> 1) & 3 == 1 => {
                let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
                vec![0x40, 2, body[2 + topic], body[3 + topic]]
            }
            12 => vec![0xd0, 0],
            14 => return,
            _ => continue,
        };
        if socket.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// A scripted broker on a free port: its port, and what it saw.
async fn scripted_broker(grant: bool) -> (u16, Arc<Seen>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let accepting = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket, grant, accepting.clone()));
        }
    });
    (port, seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_connection_whose_broker_keeps_refusing_moves_to_the_next_address() {
    let dir = tempfile::tempdir().unwrap();
    let (refusing_port, refusing, refusing_task) = scripted_broker(false).await;
    let (granting_port, granting, granting_task) = scripted_broker(true).await;
    let mut c = config(dir.path());
    c.broker = BrokerMode::External {
        host: "127.0.0.1".into(),
        port: refusing_port,
        username: None,
        password: None,
    };
    c.mqtt.external_fallbacks = vec![("127.0.0.1".into(), granting_port)];
    c.mqtt.reconnect_min = Duration::from_millis(50);
    c.mqtt.reconnect_max = Duration::from_millis(200);
    c.mqtt.subscribe_retry_min = Duration::from_millis(50);
    c.mqtt.subscribe_retry_max = Duration::from_millis(200);
    c.mqtt.subscribe_give_up = Duration::from_millis(300);
    let cloud = Cloud::start(c, schema()).await.expect("the cloud starts");
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    let status = eventually("the subscription held on the second address", || {
        let key = key.clone();
        let granting = granting.clone();
        async move {
            let (_, s) = get_as(api, "/v1/status", &key).await;
            (s["subscribed"] == true && granting.subscribes.load(Ordering::SeqCst) > 0)
                .then_some(s.clone())
                .ok_or(s.to_string())
        }
    })
    .await;
    // At least three refusals on the first node (over `subscribe_give_up`), then the
    // connection was given up (once: the second node holds the subscription).
    assert!(refusing.subscribes.load(Ordering::SeqCst) >= 3);
    assert_eq!(status["subscriptions_abandoned"], 1, "{status}");
    assert!(
        granting.connects.load(Ordering::SeqCst) >= 1,
        "the ingress connection went to the second address"
    );
    cloud.shutdown().await;
    refusing_task.abort();
    granting_task.abort();
}
