//! The agent's MQTT connection: a task that does nothing but poll rumqttc's event loop.
//!
//! This module exists because that `poll` must run all the time (keep-alives, acknowledgements,
//! reconnects) whatever the driver is doing, and must never be cancelled: a `select!` that drops
//! it midway restarts a connection attempt from scratch, so a device that writes more often than
//! a slow link completes a TCP and MQTT handshake never connects at all (the fault-injection test
//! `faults::busy_device_connects_over_a_slow_link` showed 1,268 connections opened for 1,268
//! writes). On its own task it also keeps polling while the driver waits for the database.

use std::time::Duration;

use rumqttc::{Event, EventLoop, Outgoing, Packet};
use tokio::sync::{mpsc, watch};

/// What the connection task tells the driver.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// A CONNACK: a new (clean) session.
    Connected,
    /// A message on a subscribed topic.
    Message(Vec<u8>),
    /// The connection dropped (it was up), or an attempt failed; the task retries after
    /// `reconnect_delay`.
    Lost {
        /// Whether a connection was up.
        was_connected: bool,
        /// What failed.
        error: String,
    },
}

/// Most link events waiting for the driver. Incoming messages are bounded by the broker's
/// in-flight window; while the channel is full the task waits (and stops reading the socket),
/// which is TCP back-pressure, not loss.
pub(crate) const LINK_EVENTS: usize = 1024;

/// Polls `eventloop` until `shutdown` turns true and the disconnect went out (or one second
/// passed), forwarding events to `events`.
pub(crate) async fn run(
    mut eventloop: EventLoop,
    events: mpsc::Sender<LinkEvent>,
    mut shutdown: watch::Receiver<bool>,
    reconnect_delay: Duration,
) {
    let mut connected = false;
    loop {
        let event = tokio::select! {
            // Cancel-safe: only the shutdown flag races the poll, and after it the poll is
            // resumed below, never restarted while a connect is in progress.
            event = eventloop.poll() => event,
            _ = shutdown.changed(), if !*shutdown.borrow() => continue,
        };
        if *shutdown.borrow() {
            // The driver queued its goodbye and the disconnect: let them out, briefly.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                if matches!(event, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {
                    return;
                }
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
            return;
        }
        let forward = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                Some(LinkEvent::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Some(LinkEvent::Message(p.payload.to_vec())),
            Ok(_) => None,
            Err(e) => {
                let was_connected = std::mem::replace(&mut connected, false);
                if events
                    .send(LinkEvent::Lost {
                        was_connected,
                        error: e.to_string(),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(reconnect_delay) => {}
                    _ = shutdown.changed() => {}
                }
                None
            }
        };
        if let Some(event) = forward {
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}
