//! The agent's MQTT connection: a task that does nothing but poll rumqttc's event loop.
//!
//! This module exists because that `poll` must run all the time (keep-alives, acknowledgements,
//! reconnects) whatever the driver is doing, and must never be cancelled: a `select!` that drops
//! it midway restarts a connection attempt from scratch, so a device that writes more often than
//! a slow link completes a TCP and MQTT handshake never connects at all (the fault-injection test
//! `faults::busy_device_connects_over_a_slow_link` showed 1,268 connections opened for 1,268
//! writes). On its own task it also keeps polling while the driver waits for the database.

use std::hash::BuildHasher;
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
    /// The connection dropped (it was up), or an attempt failed; the task retries after a
    /// [`Backoff`] wait.
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
    mut backoff: Backoff,
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
                backoff.reset();
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
                    _ = tokio::time::sleep(backoff.next_wait()) => {}
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

/// The waits between reconnect attempts: doubling from `base` up to `max` while attempts fail,
/// each drawn at random in its upper half ("equal jitter"). Without the jitter, every device
/// of a fleet whose broker went away comes back in the same instant, again and again, and the
/// restarted cloud meets all of them at once.
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    /// Failed attempts since the last CONNACK.
    failures: u32,
    /// The random source: std's randomly keyed hasher, hashed over the attempt count and the
    /// time (no random-number crate for one draw per reconnect).
    random: std::collections::hash_map::RandomState,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
            random: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The wait before the next attempt (and one more failure counted).
    pub(crate) fn next_wait(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let draw = self
            .random
            .hash_one((self.failures, std::time::SystemTime::now()));
        let fraction = draw as f64 / u64::MAX as f64;
        ceiling / 2 + (ceiling / 2).mul_f64(fraction)
    }

    /// A connection was made: the next loss starts from `base` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_double_to_the_cap_with_jitter_and_reset_on_connect() {
        let (base, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut b = Backoff::new(base, max);
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        let waits: Vec<Duration> = ceilings.iter().map(|_| b.next_wait()).collect();
        for (wait, ceiling) in waits.iter().zip(ceilings) {
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                *wait >= ceiling / 2 && *wait <= ceiling,
                "{wait:?} not within the upper half of {ceiling:?}"
            );
        }
        b.reset();
        assert!(b.next_wait() <= base, "a CONNACK starts the waits over");

        // Two devices that lost the broker together do not retry in step.
        let draws: std::collections::BTreeSet<Duration> = (0..16)
            .map(|_| Backoff::new(base, max).next_wait())
            .collect();
        assert!(draws.len() > 1, "every draw was {draws:?}");
    }
}
