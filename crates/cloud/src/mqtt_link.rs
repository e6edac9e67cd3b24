//! The service's MQTT connections: a task per connection that does nothing but poll rumqttc's
//! event loop, and a gauge of each client's request queue.
//!
//! The service's connections are of two kinds ([`Hop`]): *ingress* subscribes to the device
//! topics and only reads, *egress* only publishes to devices. Split, the sync loop can stop
//! reading device messages while an egress queue is full (backpressure: a publish waits for
//! room, it is never dropped) without stopping the connection that drains that queue, and
//! neither direction's traffic queues behind the other's in one socket. There are
//! `mqtt.ingress_clients` and `mqtt.egress_clients` of them (one each by default), each polled
//! by its own task; every event is tagged with its connection's index, so the sync loop keeps
//! one subscription state per ingress connection and one gauge per egress connection.
//!
//! This module exists for two reasons. First, the event loop must be polled all the time
//! (keep-alives, acknowledgements, reconnects) whatever the sync loop is doing, and its `poll`
//! must not be cancelled: a `select!` that drops it midway can lose a request it had already
//! taken from the queue, or restart a connection attempt forever. So it runs on its own task and
//! hands events to the sync loop over a bounded channel. Second, rumqttc does not tell how full
//! its request queue is, and a full queue silently refuses everything, the subscribe included.
//! [`RequestGauge`] counts it: +1 for every request the sync loop queues, -1 for every one the
//! event loop reports taking (`Outgoing` events), reset when a lost connection empties it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{Event, EventLoop, Outgoing, Packet, SubscribeReasonCode};
use tokio::sync::{mpsc, watch, Notify};

use crate::config::MqttClientConfig;
use crate::external_brokers::ExternalBrokers;
use crate::status::{LinkCount, SyncStatus};

/// Which of the service's two MQTT connections a task polls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hop {
    /// Subscribes to the device topics; reads device messages.
    Ingress,
    /// Publishes to the devices' topics.
    Egress,
}

impl Hop {
    /// The connection's name in the log.
    fn name(self) -> &'static str {
        match self {
            Hop::Ingress => "ingress",
            Hop::Egress => "egress",
        }
    }

    /// The status count of this direction's connections that are up.
    fn links(self, status: &SyncStatus) -> &LinkCount {
        match self {
            Hop::Ingress => &status.ingress_links,
            Hop::Egress => &status.egress_links,
        }
    }

    /// The suffix of the connection's MQTT client id: `in`/`out`, then its index when the
    /// direction has several (`in-0`, `in-1`...), so every connection of every node has an id
    /// of its own and a single connection keeps the id it always had.
    pub(crate) fn client_suffix(self, index: usize, of: usize) -> String {
        let direction = match self {
            Hop::Ingress => "in",
            Hop::Egress => "out",
        };
        if of <= 1 {
            direction.to_string()
        } else {
            format!("{direction}-{index}")
        }
    }
}

/// An event of one connection: which one (its index within its direction) and what happened.
pub(crate) type TaggedEvent = (usize, LinkEvent);

/// What the connection task tells the sync loop.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// A CONNACK: a new (clean) session.
    Connected,
    /// The connection failed or dropped; the task reconnects after a backoff.
    Lost(String),
    /// A message on a subscribed topic.
    Message { topic: String, payload: Vec<u8> },
    /// The client sent a SUBSCRIBE with this packet id.
    SubscribeSent(u16),
    /// A SUBACK: `granted` when every return code is a success.
    SubAck { pkid: u16, granted: bool },
}

/// How many requests wait in the MQTT client's request queue.
///
/// Publishes may use the queue up to `capacity - reserve`; the reserve is left for the
/// subscribe and the disconnect, so no burst of publishes can lock them out.
#[derive(Debug)]
pub(crate) struct RequestGauge {
    queued: AtomicUsize,
    /// Publishes sent and not yet acknowledged (rumqttc drops them with a lost clean session).
    unacked: AtomicUsize,
    capacity: usize,
    reserve: usize,
    /// Signalled whenever slots free up (a request left the queue, or the queue was emptied).
    freed: Notify,
}

impl RequestGauge {
    pub(crate) fn new(capacity: usize) -> RequestGauge {
        RequestGauge {
            queued: AtomicUsize::new(0),
            unacked: AtomicUsize::new(0),
            capacity,
            reserve: Self::reserve_for(capacity),
            freed: Notify::new(),
        }
    }

    /// Slots kept for control requests: an eighth of the queue, at least 1, at most 64.
    pub(crate) fn reserve_for(capacity: usize) -> usize {
        (capacity / 8)
            .clamp(1, 64)
            .min(capacity.saturating_sub(1))
            .max(1)
    }

    /// Requests waiting now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// How many more publishes fit now.
    pub(crate) fn publish_room(&self) -> usize {
        (self.capacity.saturating_sub(self.reserve)).saturating_sub(self.queued())
    }

    /// Takes a slot for a publish, if one is free (the caller then queues it, or gives the slot
    /// back with [`release`](Self::release)).
    pub(crate) fn try_take_publish_slot(&self) -> bool {
        let limit = self.capacity.saturating_sub(self.reserve);
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < limit).then_some(q + 1)
            })
            .is_ok()
    }

    /// Takes a slot for a control request (subscribe, disconnect), reserve included.
    pub(crate) fn try_take_control_slot(&self) -> bool {
        let limit = self.capacity;
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < limit).then_some(q + 1)
            })
            .is_ok()
    }

    /// Gives back a slot whose request could not be queued after all.
    pub(crate) fn release(&self) {
        let _ = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| q.checked_sub(1));
    }

    /// The event loop took a request from the queue.
    fn taken(&self) {
        self.release();
        self.freed.notify_one();
    }

    /// Waits until slots may have freed up since the last call (a stored wake-up makes it
    /// return at once, so a slot freed just before the wait is never missed).
    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }

    /// A lost connection moved the queue's content into rumqttc's pending list, which the next
    /// clean session discards. Returns how many requests that was, and how many publishes were
    /// sent without an acknowledgement (discarded too). A request queued by the sync loop in the
    /// instant between the two may be forgotten here; the count then errs low, which only
    /// the reserve has to absorb, and it heals when the queue next empties.
    fn drained(&self) -> (usize, usize) {
        let drained = (
            self.queued.swap(0, Ordering::SeqCst),
            self.unacked.swap(0, Ordering::SeqCst),
        );
        self.freed.notify_one();
        drained
    }
}

/// Polls the event loop of connection `index` of the `hop` direction until shutdown, forwarding
/// its events, tagged with `index`, to the sync loop. A reason received on `abandon` while
/// connected drops the connection as if it had failed (the sync loop's verdict on a broker node
/// that will not grant the device topic subscription): the next attempt goes to the next
/// address.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    hop: Hop,
    index: usize,
    mut eventloop: EventLoop,
    events: mpsc::Sender<TaggedEvent>,
    gauge: Arc<RequestGauge>,
    status: Arc<SyncStatus>,
    config: MqttClientConfig,
    mut shutdown: watch::Receiver<bool>,
    mut abandon: mpsc::Receiver<String>,
) {
    let mut connected = false;
    let mut delay = config.reconnect_min;
    let mut brokers = ExternalBrokers::new(&eventloop, &config.external_fallbacks);
    // At shutdown the sync loop queues a DISCONNECT; give it a moment to go out, never more.
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    tokio::pin!(stop);
    loop {
        let polled = tokio::select! {
            polled = eventloop.poll() => polled.map_err(|e| e.to_string()),
            _ = &mut stop => return,
            // Only while connected (never mid-connect). The poll dropped midway may have taken
            // a request: `clean` moves it, with what was in flight and queued, into rumqttc's
            // pending list, which the next clean session discards like any lost connection's
            // (counted below as lost publishes).
            Some(reason) = abandon.recv(), if connected => {
                eventloop.clean();
                Err(reason)
            }
        };
        let forward = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // A verdict on an earlier connection (sent as it dropped) is not this one's.
                while abandon.try_recv().is_ok() {}
                if !std::mem::replace(&mut connected, true) {
                    hop.links(&status).came_up();
                }
                delay = config.reconnect_min;
                // The message keeps its one-connection form (operators and tests read it);
                // which of several connections it is goes in a field.
                tracing::info!(
                    connection = index,
                    "MQTT {} connection to the broker at {} is up",
                    hop.name(),
                    brokers.current()
                );
                Some(LinkEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Some(LinkEvent::Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
            }),
            Ok(Event::Incoming(Packet::SubAck(ack))) => Some(LinkEvent::SubAck {
                pkid: ack.pkid,
                granted: !ack.return_codes.is_empty()
                    && ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            }),
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                let _ = gauge
                    .unacked
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                None
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                gauge.taken();
                gauge.unacked.fetch_add(1, Ordering::SeqCst);
                None
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                gauge.taken();
                Some(LinkEvent::SubscribeSent(pkid))
            }
            Ok(Event::Outgoing(Outgoing::Unsubscribe(_))) => {
                gauge.taken();
                None
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                gauge.taken();
                return;
            }
            Ok(_) => None,
            Err(e) => {
                if std::mem::take(&mut connected) {
                    hop.links(&status).went_down();
                    let (queued, unacked) = gauge.drained();
                    // The subscribe may be among them; it is not a publish but close enough
                    // for a loss estimate, and subscriptions are tracked on their own.
                    status.publishes_lost.fetch_add(
                        (queued + unacked) as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
                let broker = brokers.current();
                let said = match brokers.advance(&mut eventloop) {
                    Some(next) => format!("{e} (broker {broker}; the next attempt goes to {next})"),
                    None => format!("{e} (broker {broker})"),
                };
                if events.send((index, LinkEvent::Lost(said))).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = &mut stop => return,
                }
                delay = delay.saturating_mul(2).min(config.reconnect_max);
                continue;
            }
        };
        if let Some(event) = forward {
            // The sync loop never waits on anything but its select, so this only waits for
            // it to take the previous events.
            if events.send((index, event)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_never_take_the_reserve() {
        let g = RequestGauge::new(16);
        let reserve = RequestGauge::reserve_for(16);
        assert!(reserve >= 1);
        let mut n = 0;
        while g.try_take_publish_slot() {
            n += 1;
        }
        assert_eq!(n, 16 - reserve);
        assert_eq!(g.publish_room(), 0);
        // The subscribe still fits.
        assert!(g.try_take_control_slot());
        // Once the event loop took two requests (the subscribe and a publish), one publish fits.
        g.taken();
        g.taken();
        assert!(g.try_take_publish_slot());
        assert!(!g.try_take_publish_slot());
    }

    #[test]
    fn the_smallest_queue_keeps_one_slot_for_control() {
        assert_eq!(RequestGauge::reserve_for(2), 1);
        assert_eq!(RequestGauge::reserve_for(4096), 64);
        let g = RequestGauge::new(2);
        assert!(g.try_take_publish_slot());
        assert!(!g.try_take_publish_slot());
        assert!(g.try_take_control_slot());
        assert!(!g.try_take_control_slot());
    }

    #[test]
    fn a_lost_connection_empties_the_gauge() {
        let g = RequestGauge::new(64);
        for _ in 0..5 {
            assert!(g.try_take_publish_slot());
        }
        g.taken();
        g.unacked.fetch_add(1, Ordering::SeqCst);
        assert_eq!(g.drained(), (4, 1));
        assert_eq!(g.queued(), 0);
        // More answers than requests cannot make it negative.
        g.taken();
        assert_eq!(g.queued(), 0);
    }
}
