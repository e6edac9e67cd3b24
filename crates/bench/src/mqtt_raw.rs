//! The ceiling of `sync`'s up throughput: the raw MQTT QoS 1 publish rate of the same payloads
//! through the same embedded broker, with no devtables above it.
//!
//! The broker is the cloud's own (`devtables_cloud::broker::Broker`, rmqtt with its
//! authentication and ACL hooks, default settings), started here on its own port with an
//! authenticator of two principals: a device publisher, whose every PUBLISH goes through the
//! device ACL as an agent's does, and a service subscriber on the `up` filter, as the cloud's
//! client. Both are rumqttc clients with `TCP_NODELAY`, as the agent and the cloud are. The
//! publisher keeps at most `window` messages on their way (published, not yet received by the
//! subscriber), the agent's `max_in_flight` batches waiting for the cloud's answer; the clock
//! stops when the subscriber has received every message and the publisher holds every PUBACK.

use std::net::SocketAddr;
use std::sync::Arc;
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
    pub elapsed: Duration,
}

impl RawRate {
    pub fn messages_per_s(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn options(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    secret: &str,
    max_packet: usize,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_credentials(user, secret);
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

/// Publishes `payloads` in order, `rounds` times over, at QoS 1 through a fresh embedded
/// broker, at most `window` on their way at once; see the module doc.
pub async fn publish_rate(
    payloads: &[Vec<u8>],
    rounds: usize,
    window: usize,
    max_packet: usize,
) -> anyhow::Result<RawRate> {
    let window = window.max(1);
    let device = DeviceId::new("bench", "raw1")?;
    let prefix = topics::DEFAULT_PREFIX;
    let broker = Broker::start(
        BrokerConfig::new("127.0.0.1:0".parse()?),
        Arc::new(TwoClients {
            device: device.clone(),
        }),
    )
    .await
    .context("start the embedded broker")?;
    let addr = broker.local_addr();

    let (sub, mut sub_loop) = client(options(
        addr,
        "bench-subscriber",
        SERVICE_USER,
        SERVICE_SECRET,
        max_packet,
    ));
    wait_for(&mut sub_loop, "subscriber connect", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await?;
    sub.subscribe(topics::up_filter(prefix), QoS::AtLeastOnce)
        .await?;
    wait_for(&mut sub_loop, "subscribe", |p| {
        matches!(p, Packet::SubAck(_))
    })
    .await?;

    let node = device.node_name();
    let (publisher, mut pub_loop) = client(options(addr, &node, &node, DEVICE_SECRET, max_packet));
    wait_for(&mut pub_loop, "publisher connect", |p| {
        matches!(p, Packet::ConnAck(_))
    })
    .await?;

    let n = payloads.len() * rounds;
    let on_the_way = Arc::new(Semaphore::new(window));
    let started = Instant::now();
    let receiver = {
        let on_the_way = on_the_way.clone();
        tokio::spawn(async move {
            let mut received = 0usize;
            let mut received_bytes = 0usize;
            while received < n {
                match sub_loop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        received += 1;
                        received_bytes += p.payload.len();
                        on_the_way.add_permits(1);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("raw MQTT subscriber: {e}")),
                }
            }
            // Let the last PUBACKs to the broker go out.
            let _ = tokio::time::timeout(Duration::from_millis(50), sub_loop.poll()).await;
            Ok((received, received_bytes))
        })
    };
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
    let topic = topics::up_topic(prefix, &device);
    let mut payload_bytes = 0usize;
    for p in std::iter::repeat_n(payloads, rounds).flatten() {
        on_the_way.acquire().await?.forget();
        publisher
            .publish(topic.clone(), QoS::AtLeastOnce, false, p.clone())
            .await?;
        payload_bytes += p.len();
    }
    let all = async {
        let received = receiver.await??;
        let acked = acker.await??;
        anyhow::Ok((received, acked))
    };
    let ((received, received_bytes), acked) = tokio::time::timeout(RUN_LIMIT, all)
        .await
        .context("the raw MQTT run did not finish")??;
    let elapsed = started.elapsed();
    if received != n || acked != n || received_bytes != payload_bytes {
        bail!(
            "raw MQTT: {n} published ({payload_bytes} B), {received} received ({received_bytes} B), {acked} acknowledged"
        );
    }
    let _ = publisher.disconnect().await;
    let _ = sub.disconnect().await;
    broker.shutdown().await;
    Ok(RawRate {
        messages: n,
        payload_bytes,
        window,
        elapsed,
    })
}
