//! An agent that cannot connect says why in its status (`connection`): an unreachable broker
//! (nothing listens), refused credentials (a wrong secret against the cloud's embedded broker,
//! which checks them), and, once connected, nothing. An agent given several broker addresses
//! moves to the next one when an attempt fails or its connection is lost, and says which
//! address it is on.

use devtables_agent::config::BrokerAddress;
use devtables_agent::Agent;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::mqtt_packet::{read_packet, suback};
use super::support::{agent_config, device, eventually, free_port, offline, schema, start_cloud};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pointed_at_a_closed_port_says_the_broker_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(offline(dir.path()), schema()).unwrap();
    eventually(&agent, "the status to say the broker is unreachable", |a| {
        a.status()
            .connection
            .is_some_and(|c| c.starts_with("cannot connect: the broker is unreachable"))
    })
    .await;
    let status = agent.status();
    assert!(!status.connected, "{status:?}");
    assert!(
        status.last_error.is_some(),
        "last_error keeps the client's message: {status:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_said_to_be_refused_and_the_right_ones_clear_it() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    let port = super::support::mqtt_port(&cloud);

    let wrong = format!("{secret}x");
    let agent = Agent::start(agent_config(dir.path(), &wrong, port), schema()).unwrap();
    eventually(
        &agent,
        "the status to say the credentials were refused",
        |a| {
            a.status().connection.is_some_and(|c| {
                c.starts_with("cannot connect: the broker refused the credentials")
                    && c.contains("BadUserNamePassword")
            })
        },
    )
    .await;
    assert!(!agent.status().ready);
    agent.shutdown().await;

    let agent = Agent::start(agent_config(dir.path(), &secret, port), schema()).unwrap();
    eventually(&agent, "ready with the right secret", |a| a.status().ready).await;
    assert_eq!(
        agent.status().connection,
        None,
        "connected: nothing to explain"
    );
    agent.shutdown().await;
    cloud.shutdown().await;
}

/// A second address of the same broker: a TCP relay to it, whose [`Relay::close`] ends every
/// connection through it and stops listening, as a broker node that dies.
struct Relay {
    port: u16,
    tasks: JoinSet<()>,
}

impl Relay {
    async fn to(target_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            // Dropped with the accept loop when the relay closes: every relayed connection ends.
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { port, tasks }
    }

    async fn close(mut self) {
        self.tasks.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_round_its_broker_addresses_and_says_which_it_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    let direct = super::support::mqtt_port(&cloud);
    let relay = Relay::to(direct).await;
    let address = |port| BrokerAddress {
        host: "127.0.0.1".into(),
        port,
    };

    // First address: nothing listens there. Then the relay, then the broker itself.
    let dead = free_port();
    let mut config = agent_config(dir.path(), &secret, dead);
    config.broker_fallbacks = vec![address(relay.port), address(direct)];
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "ready through the second address", |a| {
        a.status().ready
    })
    .await;
    let status = agent.status();
    assert_eq!(
        status.broker,
        Some(address(relay.port).to_string()),
        "{status:?}"
    );
    assert_eq!(
        status.broker_failovers, 0,
        "the first connection is no failover"
    );

    // The node behind the second address dies: the agent goes on with the third.
    relay.close().await;
    eventually(&agent, "ready again on the broker's own address", |a| {
        let s = a.status();
        s.ready && s.broker == Some(address(direct).to_string())
    })
    .await;
    let status = agent.status();
    assert_eq!(status.disconnects, 1, "{status:?}");
    assert_eq!(status.broker_failovers, 1, "{status:?}");
    agent.shutdown().await;
    cloud.shutdown().await;
}

/// What a scripted broker saw, in order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Seen {
    /// A SUBSCRIBE, and whether it was granted.
    Subscribe { granted: bool },
    /// A PUBLISH from the device (its hello is the first).
    Publish,
}

/// A broker of one connection that answers CONNECT, refuses the first `refusals` SUBSCRIBEs
/// (return code 0x80 for every filter) and grants the next, and acknowledges publishes; it
/// records what it saw.
async fn scripted_broker(
    listener: TcpListener,
    refusals: usize,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
) {
    if let Ok((socket, _)) = listener.accept().await {
        serve_scripted(socket, refusals, seen).await;
    }
}

/// One connection of a scripted broker: CONNACK, SUBACKs refusing the first `refusals`
/// SUBSCRIBEs and granting the rest, PUBACK for publishes, PINGRESP; it records what it saw and
/// delivers nothing.
async fn serve_scripted(
    mut socket: TcpStream,
    refusals: usize,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
) {
    use tokio::io::AsyncWriteExt;
    let mut subscribes = 0;
    while let Ok((kind, body)) = read_packet(&mut socket).await {
        let answer: Vec<u8> = match kind >> 4 {
            1 => vec![0x20, 2, 0, 0],
            8 => {
                let granted = subscribes >= refusals;
                subscribes += 1;
                seen.lock().unwrap().push(Seen::Subscribe { granted });
                suback(&body, if granted { 1 } else { 0x80 })
            }
            3 => {
                seen.lock().unwrap().push(Seen::Publish);
                // QoS 1: topic length and topic, then the packet id.
                let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
                vec![0x40, 2, body[2 + topic], body[3 + topic]]
            }
            12 => vec![0xd0, 0],
            _ => continue,
        };
        if socket.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// A broker node that keeps refusing the device's subscription (a cluster node that cannot
/// store it) is given up after three attempts, and the agent's session starts on the next
/// address, which grants at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_keeps_refusing_the_subscription_is_left_for_the_next_address() {
    let dir = tempfile::tempdir().unwrap();
    let refusing = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let granting = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (refusing_port, granting_port) = (
        refusing.local_addr().unwrap().port(),
        granting.local_addr().unwrap().port(),
    );
    let seen_refusing = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_granting = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let brokers = [
        tokio::spawn(scripted_broker(refusing, usize::MAX, seen_refusing.clone())),
        tokio::spawn(scripted_broker(granting, 0, seen_granting.clone())),
    ];
    let mut config = agent_config(dir.path(), "secret", refusing_port);
    config.subscribe_give_up = std::time::Duration::from_millis(300);
    config.broker_fallbacks = vec![BrokerAddress {
        host: "127.0.0.1".into(),
        port: granting_port,
    }];
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "the hello on the second address", |_| {
        seen_granting.lock().unwrap().contains(&Seen::Publish)
    })
    .await;
    let refused = seen_refusing.lock().unwrap().clone();
    assert!(
        refused.len() >= 3
            && refused
                .iter()
                .all(|s| *s == Seen::Subscribe { granted: false }),
        "at least three attempts on the refusing node, nothing published there: {refused:?}"
    );
    let status = agent.status();
    assert_eq!(
        status.subscriptions_refused,
        refused.len() as u64,
        "{status:?}"
    );
    assert_eq!(status.subscriptions_abandoned, 1, "{status:?}");
    assert_eq!(status.broker_failovers, 1, "{status:?}");
    assert_eq!(
        status.broker,
        Some(format!("127.0.0.1:{granting_port}")),
        "{status:?}"
    );
    agent.shutdown().await;
    for broker in brokers {
        broker.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_asked_again_and_no_session_starts_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let broker = tokio::spawn(scripted_broker(listener, 2, seen.clone()));
    let agent = Agent::start(agent_config(dir.path(), "secret", port), schema()).unwrap();
    eventually(&agent, "the hello after the granted subscription", |_| {
        seen.lock().unwrap().contains(&Seen::Publish)
    })
    .await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(
        seen[..4],
        [
            Seen::Subscribe { granted: false },
            Seen::Subscribe { granted: false },
            Seen::Subscribe { granted: true },
            Seen::Publish,
        ],
        "asked again after each refusal, and nothing published before the grant"
    );
    let status = agent.status();
    assert_eq!(status.subscriptions_refused, 2, "{status:?}");
    assert!(
        status.connected && !status.ready,
        "no cloud answers here: {status:?}"
    );
    agent.shutdown().await;
    broker.abort();
}

/// A broker that serves every connection made to it: grants every subscription and
/// acknowledges publishes, but delivers nothing (the hello is never answered): a cluster node
/// that grants subscriptions it cannot deliver to, or a path to the cloud that is cut.
async fn deaf_broker(listener: TcpListener, seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>) {
    let mut connections = JoinSet::new();
    while let Ok((socket, _)) = listener.accept().await {
        connections.spawn(serve_scripted(socket, 0, seen.clone()));
    }
}

/// A node that grants the subscription and takes the hello but never delivers the cloud's
/// answer (a NATS node back from a restart did so while its peers elected leaders) is given up
/// after `subscribe_give_up`, and the session starts at the next address, a real cloud; its
/// welcome ends the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_delivers_the_answer_to_the_hello_is_left_for_the_next_address() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    let cloud_port = super::support::mqtt_port(&cloud);
    let deaf = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deaf_port = deaf.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let broker = tokio::spawn(deaf_broker(deaf, seen.clone()));
    let mut config = agent_config(dir.path(), &secret, deaf_port);
    config.subscribe_give_up = std::time::Duration::from_millis(300);
    config.broker_fallbacks = vec![BrokerAddress {
        host: "127.0.0.1".into(),
        port: cloud_port,
    }];
    let agent = Agent::start(config, schema()).unwrap();
    eventually(&agent, "ready on the cloud's address", |a| a.status().ready).await;
    assert_eq!(
        seen.lock().unwrap()[..2],
        [Seen::Subscribe { granted: true }, Seen::Publish],
        "the deaf node granted the subscription and took the hello"
    );
    let status = agent.status();
    assert_eq!(status.deaf_connections, 1, "{status:?}");
    assert_eq!(status.subscriptions_abandoned, 0, "{status:?}");
    assert_eq!(status.broker_failovers, 1, "{status:?}");
    assert_eq!(
        status.broker,
        Some(format!("127.0.0.1:{cloud_port}")),
        "{status:?}"
    );
    // Twice the give-up on the cloud's address: it answered, so the connection is kept (an
    // absence, so it takes a wait; a slow machine only makes the check weaker).
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let status = agent.status();
    assert_eq!(status.deaf_connections, 1, "{status:?}");
    assert!(status.ready, "{status:?}");
    agent.shutdown().await;
    cloud.shutdown().await;
    broker.abort();
}

/// A cloud that is down is deaf on every connection: each deaf connection in a row waits twice
/// as long as the last before it is given up, so the fleet does not reconnect at a fixed pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deaf_connections_in_a_row_are_given_up_after_longer_and_longer_waits() {
    let dir = tempfile::tempdir().unwrap();
    let deaf = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = deaf.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let broker = tokio::spawn(deaf_broker(deaf, seen.clone()));
    let mut config = agent_config(dir.path(), "secret", port);
    config.subscribe_give_up = std::time::Duration::from_millis(200);
    let agent = Agent::start(config, schema()).unwrap();
    // The reason of each give-up names the wait: 200 ms, then 400 ms, then 800 ms.
    for (n, waited) in [(1, "200ms"), (2, "400ms"), (3, "800ms")] {
        eventually(&agent, &format!("deaf connection {n} given up"), |a| {
            let s = a.status();
            s.deaf_connections == n
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(&format!("in {waited} while")))
        })
        .await;
    }
    let status = agent.status();
    assert_eq!(status.subscriptions_abandoned, 0, "{status:?}");
    assert_eq!(status.disconnects, 3, "{status:?}");
    agent.shutdown().await;
    broker.abort();
}

/// A relay to the broker whose way back can be muted: while muted it keeps the connection and
/// passes the device's bytes on, but delivers nothing to the device (a node that takes the
/// device's pushes and never delivers the cloud's acknowledgements).
struct MutableRelay {
    port: u16,
    muted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl MutableRelay {
    async fn to(target_port: u16) -> MutableRelay {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let muted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mute = muted.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let mute = mute.clone();
                connections.spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return;
                    };
                    let (mut from_device, mut to_device) = inbound.into_split();
                    let (mut from_broker, mut to_broker) = outbound.into_split();
                    let up = async move {
                        let _ = tokio::io::copy(&mut from_device, &mut to_broker).await;
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from_broker.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            if !mute.load(Ordering::SeqCst)
                                && to_device.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    tokio::join!(up, down);
                });
            }
        });
        MutableRelay { port, muted, task }
    }
}

/// A session that was welcomed and then stops hearing the cloud (its pushes go out, their
/// acknowledgements never come back) gives the connection up after `subscribe_give_up` and
/// carries on at the next address: every push is acknowledged there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_acknowledgements_stop_coming_moves_to_the_next_address() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    let direct = super::support::mqtt_port(&cloud);
    let relay = MutableRelay::to(direct).await;
    let mut config = agent_config(dir.path(), &secret, relay.port);
    config.subscribe_give_up = std::time::Duration::from_millis(500);
    config.broker_fallbacks = vec![BrokerAddress {
        host: "127.0.0.1".into(),
        port: direct,
    }];
    let agent = Agent::start(config, schema()).unwrap();
    let fault = |i: u32| {
        super::support::item(serde_json::json!({
            "deviceId": "d1", "id": format!("f{i}"), "severity": "info", "message": "m"
        }))
    };
    eventually(&agent, "ready through the relay", |a| a.status().ready).await;
    agent.db().create("Fault", &fault(0)).unwrap();
    eventually(&agent, "the first push acknowledged", |a| {
        a.status().acked == 1
    })
    .await;
    assert_eq!(agent.status().deaf_connections, 0);

    // The way back goes quiet: the next pushes are never acknowledged on this connection.
    relay.muted.store(true, Ordering::SeqCst);
    for i in 1..=5 {
        agent.db().create("Fault", &fault(i)).unwrap();
    }
    eventually(&agent, "every push acknowledged at the next address", |a| {
        let s = a.status();
        s.acked == 6 && s.pending == 0
    })
    .await;
    let status = agent.status();
    assert_eq!(status.deaf_connections, 1, "{status:?}");
    assert_eq!(
        status.broker,
        Some(format!("127.0.0.1:{direct}")),
        "{status:?}"
    );
    assert_eq!(status.broker_failovers, 1, "{status:?}");
    agent.shutdown().await;
    cloud.shutdown().await;
    relay.task.abort();
}
