//! The ceiling of the up path's throughput: the raw MQTT QoS 1 publish rate of push payloads
//! through a broker, with no devtables above it. `sync` measures it through the same embedded
//! broker as its cloud; `scale-out` through the embedded broker and through Mosquitto, with one
//! subscriber or with as many as it runs cloud nodes (each node reads every device message).
//!
//! The embedded broker is the cloud's own (`devtables_cloud::broker::Broker`, rmqtt with its
//! authentication and ACL hooks, default settings), started here on its own port with an
//! authenticator of two principals: a device publisher, whose every PUBLISH goes through the
//! device ACL as an agent's does, and a service subscriber on the `up` filter, as the cloud's
//! client. An external broker (Mosquitto) is used as it is configured: the clients connect
//! without credentials under fresh client ids, on a topic prefix of their own so no cloud
//! running against the same broker sees the messages. Every client is rumqttc with
//! `TCP_NODELAY`, as the agent and the cloud are. The publisher keeps at most `window` messages
//! on their way (published, not yet received by every subscriber), the agent's
//! `max_in_flight` batches waiting for the cloud's answer; the clock stops when every
//! subscriber has received every message and the publisher holds every PUBACK.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_cloud::broker::{
    Authenticator, Broker, BrokerConfig, PeerCertificate, Principal, Refusal,
};
use devtables_sync::identity::DeviceId;
use devtables_sync::topics;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::Semaphore;

const SERVICE_USER: &str = "bench-subscriber";
const SERVICE_SECRET: &str = "bench-subscriber-secret";
const DEVICE_SECRET: &str = "bench-publisher-secret";

/// Longest wait for the whole run, and for a connection.
const RUN_LIMIT: Duration = Duration::from_secs(600);
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Knows the two clients of the measurement and nobody else.
struct TwoClients {
    device: DeviceId,
}

impl Authenticator for TwoClients {
    fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        match (username, password) {
            (Some(SERVICE_USER), Some(p)) if p == SERVICE_SECRET.as_bytes() => {
                Ok(Principal::Service)
            }
            (Some(user), Some(p))
                if user == self.device.node_name()
                    && client_id == user
                    && p == DEVICE_SECRET.as_bytes() =>
            {
                Ok(Principal::Device(self.device.clone()))
            }
            _ => Err(Refusal::BadCredentials),
        }
    }

    fn authenticate_certificate(&self, _cert: &PeerCertificate) -> Result<Principal, Refusal> {
        Err(Refusal::NotAuthorized)
    }
}

/// What the raw run measured.
pub struct RawRate {
    pub messages: usize,
    pub payload_bytes: usize,
    pub window: usize,
    /// Subscribers that each received every message.
    pub subscribers: usize,
    pub elapsed: Duration,
}

impl RawRate {
    pub fn messages_per_s(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn options(addr: SocketAddr, client_id: &str, max_packet: usize) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_clean_session(true);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(max_packet, max_packet);
    o
}

fn client(options: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Polls until `want` matches an incoming packet.
async fn wait_for(
    eventloop: &mut EventLoop,
    what: &str,
    want: impl Fn(&Packet) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONNECT_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(p))) if want(&p) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("raw MQTT {what}: {e}"),
            Err(_) => bail!("raw MQTT {what}: no answer within {CONNECT_LIMIT:?}"),
        }
    }
}

/// The broker a raw run goes through.
pub enum RawBroker<'a> {
    /// A fresh instance of the cloud's embedded broker on a free loopback port.
    Embedded,
    /// A broker that runs already (`HOST:PORT`, clear text), allowing clients without
    /// credentials, as the Mosquitto of the service tests does.
    External(&'a str),
}

/// Publishes `payloads` in order, `rounds` times over, at QoS 1 through a fresh embedded
/// broker to one subscriber, at most `window` on their way at once; see the module doc.
pub async fn publish_rate(
    payloads: &[Vec<u8>],
    rounds: usize,
    window: usize,
    max_packet: usize,
) -> anyhow::Result<RawRate> {
    publish_rate_via(RawBroker::Embedded, 1, payloads, rounds, window, max_packet).await
}

/// Where the clients of a run connect, and as whom.
struct Endpoint {
    addr: SocketAddr,
    prefix: String,
    /// `(user, secret)` of the publisher and of the subscribers; `None`: anonymous.
    publisher: Option<(String, String)>,
    subscriber: Option<(String, String)>,
    /// A unique start of every client id, so runs against a shared broker do not take over
    /// each other's sessions.
    client_ids: String,
}

/// Publishes `payloads` in order, `rounds` times over, at QoS 1 through `broker` to
/// `subscribers` subscribers of the `up` filter, at most `window` on their way at once (a
/// message is on its way until every subscriber has it); see the module doc.
pub async fn publish_rate_via(
    broker: RawBroker<'_>,
    subscribers: usize,
    payloads: &[Vec<u8>],
    rounds: usize,
    window: usize,
    max_packet: usize,
) -> anyhow::Result<RawRate> {
    let window = window.max(1);
    let subscribers = subscribers.max(1);
    let device = DeviceId::new("bench", "raw1")?;
    let node = device.node_name();
    let mut embedded = None;
    let endpoint = match broker {
        RawBroker::Embedded => {
            let broker = Broker::start(
                BrokerConfig::new("127.0.0.1:0".parse()?),
                Arc::new(TwoClients {
                    device: device.clone(),
                }),
            )
            .await
            .context("start the embedded broker")?;
            let addr = broker.local_addr();
            embedded = Some(broker);
            Endpoint {
                addr,
                prefix: topics::DEFAULT_PREFIX.to_string(),
                publisher: Some((node.clone(), DEVICE_SECRET.into())),
                subscriber: Some((SERVICE_USER.into(), SERVICE_SECRET.into())),
                client_ids: String::new(),
            }
        }
        RawBroker::External(addr) => {
            let addr = tokio::net::lookup_host(addr)
                .await
                .with_context(|| format!("the broker address {addr}"))?
                .next()
                .with_context(|| format!("the broker address {addr} resolves to nothing"))?;
            let run = format!("{:08x}", rand::random::<u32>());
            Endpoint {
                addr,
                prefix: format!("dtbench{run}"),
                publisher: None,
                subscriber: None,
                client_ids: format!("dtbench-{run}-"),
            }
        }
    };
    let result = measure(
        &endpoint,
        &device,
        subscribers,
        payloads,
        rounds,
        window,
        max_packet,
    )
    .await;
    if let Some(broker) = embedded {
        broker.shutdown().await;
    }
    result
}

/// How many messages every subscriber has received, and how many window permits that gave
/// back: a message leaves the window once the slowest subscriber has it.
struct Receipts {
    per_subscriber: Vec<usize>,
    released: usize,
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    endpoint: &Endpoint,
    device: &DeviceId,
    subscribers: usize,
    payloads: &[Vec<u8>],
    rounds: usize,
    window: usize,
    max_packet: usize,
) -> anyhow::Result<RawRate> {
    let connect = |client_id: &str, credentials: &Option<(String, String)>| {
        let mut o = options(endpoint.addr, client_id, max_packet);
        if let Some((user, secret)) = credentials {
            o.set_credentials(user, secret);
        }
        client(o)
    };
    let mut subs = Vec::with_capacity(subscribers);
    for i in 0..subscribers {
        let id = format!("{}bench-subscriber-{i}", endpoint.client_ids);
        let (sub, mut sub_loop) = connect(&id, &endpoint.subscriber);
        wait_for(&mut sub_loop, "subscriber connect", |p| {
            matches!(p, Packet::ConnAck(_))
        })
        .await?;
        sub.subscribe(topics::up_filter(&endpoint.prefix), QoS::AtLeastOnce)
            .await?;
        wait_for(&mut sub_loop, "subscribe", |p| {
            matches!(p, Packet::SubAck(_))
        })
        .await?;
        subs.push((sub, sub_loop));
    }

    // The embedded broker's ACL wants the device's own client id; elsewhere it is made unique.
    let publisher_id = format!("{}{}", endpoint.client_ids, device.node_name());
    let (publisher, mut pub_loop) = connect(&publisher_id, &endpoint.publisher);
    wait_for(&mut pub_loop, "publisher connect", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await?;

    let n = payloads.len() * rounds;
    let on_the_way = Arc::new(Semaphore::new(window));
    let receipts = Arc::new(Mutex::new(Receipts {
        per_subscriber: vec![0; subscribers],
        released: 0,
    }));
    let started = Instant::now();
    let mut receivers = Vec::with_capacity(subscribers);
    let mut sub_clients = Vec::with_capacity(subscribers);
    for (i, (sub, mut sub_loop)) in subs.into_iter().enumerate() {
        sub_clients.push(sub);
        let (on_the_way, receipts) = (on_the_way.clone(), receipts.clone());
        receivers.push(tokio::spawn(async move {
            let mut received = 0usize;
            let mut received_bytes = 0usize;
            while received < n {
                match sub_loop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        received += 1;
                        received_bytes += p.payload.len();
                        let mut r = receipts.lock().unwrap_or_else(PoisonError::into_inner);
                        r.per_subscriber[i] = received;
                        let slowest = r.per_subscriber.iter().copied().min().unwrap_or(0);
                        if slowest > r.released {
                            on_the_way.add_permits(slowest - r.released);
                            r.released = slowest;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("raw MQTT subscriber {i}: {e}")),
                }
            }
            // Let the last PUBACKs to the broker go out.
            let _ = tokio::time::timeout(Duration::from_millis(50), sub_loop.poll()).await;
            Ok((received, received_bytes))
        }));
    }
    let acker = tokio::spawn(async move {
        let mut acked = 0usize;
        while acked < n {
            match pub_loop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("raw MQTT publisher: {e}")),
            }
        }
        Ok(acked)
    });
    let topic = topics::up_topic(&endpoint.prefix, device);
    let mut payload_bytes = 0usize;
    for p in std::iter::repeat_n(payloads, rounds).flatten() {
        on_the_way.acquire().await?.forget();
        publisher
            .publish(topic.clone(), QoS::AtLeastOnce, false, p.clone())
            .await?;
        payload_bytes += p.len();
    }
    let all = async {
        let mut got = Vec::with_capacity(receivers.len());
        for r in receivers {
            got.push(r.await??);
        }
        let acked = acker.await??;
        anyhow::Ok((got, acked))
    };
    let (got, acked) = tokio::time::timeout(RUN_LIMIT, all)
        .await
        .context("the raw MQTT run did not finish")??;
    let elapsed = started.elapsed();
    if acked != n || got.iter().any(|&(r, b)| r != n || b != payload_bytes) {
        bail!(
            "raw MQTT: {n} published ({payload_bytes} B), received (messages, bytes) per subscriber {got:?}, {acked} acknowledged"
        );
    }
    let _ = publisher.disconnect().await;
    for sub in sub_clients {
        let _ = sub.disconnect().await;
    }
    Ok(RawRate {
        messages: n,
        payload_bytes,
        window,
        subscribers,
        elapsed,
    })
}
