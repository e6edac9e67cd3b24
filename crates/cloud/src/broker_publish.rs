//! The service's publishes to devices, handed straight to the embedded broker in-process.
//!
//! # Why
//!
//! The embedded broker (rmqtt) runs in the cloud's own process. Publishing to devices through
//! an MQTT client connected to it over loopback costs, per message, an encoding, two socket
//! hops, a decoding, a PUBACK back the same way and a task wake-up at each end: perf put about
//! 30 % of the cloud's CPU in the kernel under fleet load, largely that hop
//! (docs/benchmarks.md, "CPU per push, profiled"). [`EmbeddedPublisher`] gives each publish to
//! rmqtt's router the way rmqtt itself forwards a message it read from a superuser's
//! connection (past the ACL, which superusers skip): the router finds the sessions subscribed
//! to the topic and queues the message to each; each session then sends it at the QoS of the
//! subscription (the devices subscribe at QoS 1, so QoS 1 as before) through its own in-flight
//! window, retrying until the device acknowledges. The sync loop knows nothing of rmqtt's
//! types: it hands over a topic and bytes and is told a [`Delivery`].
//!
//! # What cannot be delivered, and backpressure
//!
//! - No session subscribed to the topic (the device is offline, has not subscribed yet, or its
//!   connection just closed): the message reaches nobody. [`Delivery::NoSubscriber`]; the sync
//!   loop counts it (`publishes_undelivered`) and warns, rate-limited. A loopback client's
//!   publish met the same fate without anyone knowing.
//! - A subscribed session that cannot take it (its connection closed between routing and
//!   queueing): [`Delivery::Refused`], counted the same way.
//! - A session whose queue is full (a device that stopped reading) drops the message later, in
//!   its own task: rmqtt's `MessageDropped` hook counts it in `broker_drops` and warns
//!   ([`crate::broker`]).
//!
//! In every case the engine's retransmission and the device's next hello recover what matters.
//! rmqtt offers no way to wait for room in a session (its channel to a session is unbounded and
//! the session's queue drops when full), so there is no backpressure on this path: the engine's
//! own windows bound what is outstanding per device, and the drops are counted.

use rmqtt::context::ServerContext;
use rmqtt::types::{CodecPublish, From, Id, Publish, QoS};

/// The client id the broker shows as the sender of the service's in-process publishes (in its
/// logs and drop reports). No client can take it: it is no device's id, and nothing connects
/// under it.
pub const IN_PROCESS_CLIENT_ID: &str = "devtables-cloud (in-process)";

/// What became of one in-process publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Queued to every session subscribed to the topic (at least one).
    Queued,
    /// No session is subscribed to the topic: nobody received it.
    NoSubscriber,
    /// A subscribed session could not take it (its connection had gone); why.
    Refused(String),
}

/// Publishes into the embedded broker's sessions, in-process (see the module documentation).
/// Cheap to clone; made by [`crate::broker::Broker::publisher`].
#[derive(Clone)]
pub struct EmbeddedPublisher {
    scx: ServerContext,
    from: From,
}

impl std::fmt::Debug for EmbeddedPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPublisher").finish_non_exhaustive()
    }
}

impl EmbeddedPublisher {
    pub(crate) fn new(scx: ServerContext) -> EmbeddedPublisher {
        let id = Id::new(
            scx.node.id(),
            0,
            None,
            None,
            IN_PROCESS_CLIENT_ID.into(),
            None,
        );
        EmbeddedPublisher {
            scx,
            from: From::from_admin(id),
        }
    }

    /// Queues `payload` at QoS 1, not retained, to every session subscribed to `topic`. It never
    /// waits for the devices: only for the broker's routing tables (read locks).
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Delivery {
        let packet = CodecPublish {
            dup: false,
            retain: false,
            qos: QoS::AtLeastOnce,
            topic: topic.into(),
            packet_id: None,
            payload: payload.into(),
            properties: None,
        };
        let publish = Publish::from(packet).create_time(rmqtt::utils::timestamp_millis());
        let shared = self.scx.extends.shared().await;
        match shared.forwards(None, self.from.clone(), publish).await {
            Ok(0) => Delivery::NoSubscriber,
            Ok(_) => Delivery::Queued,
            Err((_, refused)) => Delivery::Refused(
                refused
                    .first()
                    .map(|(to, _, _, reason)| format!("{}: {reason}", to.client_id))
                    .unwrap_or_default(),
            ),
        }
    }
}
