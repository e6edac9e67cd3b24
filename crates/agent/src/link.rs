//! The agent's MQTT connection: a task that does nothing but poll rumqttc's event loop.
//!
//! This module exists because that `poll` must run all the time (keep-alives, acknowledgements,
//! reconnects) whatever the driver is doing, and must never be cancelled: a `select!` that drops
//! it midway restarts a connection attempt from scratch, so a device that writes more often than
//! a slow link completes a TCP and MQTT handshake never connects at all (the fault-injection test
//! `faults::busy_device_connects_over_a_slow_link` showed 1,268 connections opened for 1,268
//! writes). On its own task it also keeps polling while the driver waits for the database.
//!
//! It also says why an attempt failed ([`ConnectFailure`]: refused credentials, an unreachable
//! broker, TLS, other), and decides which failures deserve a warning ([`FailureLog`]), since a
//! device that cannot connect retries for as long as it runs.
//!
//! A broker may have several addresses (the nodes of a broker cluster, [`BrokerRotation`]):
//! every failed attempt and every lost connection moves the next attempt to the next address,
//! so a device whose node died reconnects to another one after one backoff wait. The session is
//! clean on every node: what was in flight is recovered by the protocol (the outbox is resent,
//! the feed is read again from the cursor the device announces), not by the broker.

use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use rumqttc::{
    ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, watch};

use crate::config::BrokerAddress;

/// What the connection task tells the driver.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// A CONNACK: a new (clean) session, with the broker at this address.
    Connected { broker: BrokerAddress },
    /// A message on a subscribed topic.
    Message(Vec<u8>),
    /// A SUBACK: `granted` when every filter of the SUBSCRIBE was granted. A broker cluster
    /// refuses (return code 0x80) while it cannot store the subscription (NATS, while its
    /// JetStream elects a new leader after a node died); without the subscription no answer of
    /// the cloud arrives, so the driver starts the session only once it is granted, and
    /// subscribes again after a refusal.
    SubAck { granted: bool },
    /// The connection dropped (it was up), or an attempt failed; the task retries after a
    /// [`Backoff`] wait.
    Lost {
        /// The address the connection or attempt was to.
        broker: BrokerAddress,
        /// The address the next attempt goes to, when it is another one.
        next: Option<BrokerAddress>,
        /// Whether a connection was up.
        was_connected: bool,
        /// What failed.
        error: String,
        /// Why the attempt failed, when it was one (not a connection that was up).
        failure: Option<ConnectFailure>,
        /// Whether to say it as a warning ([`FailureLog`]); otherwise it is a debug line.
        warn: bool,
    },
}

/// Why a connection attempt failed, in the terms of what to fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnectFailure {
    /// The broker answered CONNACK "bad user name or password" or "not authorized": a wrong
    /// secret, a device not registered or revoked, a client certificate no longer valid.
    Credentials,
    /// No TCP connection, or no answer in time: the address or port is wrong, nothing listens
    /// there, the name does not resolve, a firewall drops the packets.
    Unreachable,
    /// The TLS handshake failed: a CA that does not sign the broker's certificate, a server name
    /// it does not carry, a client certificate the broker refuses.
    Tls,
    /// Anything else: the broker refused for another reason or closed the connection.
    Other,
}

impl ConnectFailure {
    pub(crate) fn of(error: &ConnectionError) -> ConnectFailure {
        match error {
            ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
            ) => ConnectFailure::Credentials,
            // The only I/O before the MQTT handshake is resolving the name and the TCP connect;
            // the timeout covers the whole handshake.
            ConnectionError::Io(_) | ConnectionError::NetworkTimeout => ConnectFailure::Unreachable,
            ConnectionError::Tls(_) => ConnectFailure::Tls,
            _ => ConnectFailure::Other,
        }
    }

    /// The status line of an agent whose attempts to `broker` fail so (`error` is the client's
    /// message).
    pub(crate) fn describe(self, broker: &BrokerAddress, error: &str) -> String {
        let why = match self {
            ConnectFailure::Credentials => format!(
                "cannot connect: the broker refused the credentials (check the device secret or \
                 client certificate, and that the device is registered and not revoked): {error}"
            ),
            ConnectFailure::Unreachable => format!(
                "cannot connect: the broker is unreachable (check the broker address and port, \
                 and that the broker runs): {error}"
            ),
            ConnectFailure::Tls => format!(
                "cannot connect: the TLS handshake failed (check the CA file, the server name \
                 and the client certificate): {error}"
            ),
            ConnectFailure::Other => format!("cannot connect: {error}"),
        };
        format!("{why} (broker {broker})")
    }
}

/// Which failed attempts are warned about: the first after a connection (or the start), one
/// that fails for another reason than the last, and otherwise one a [`FailureLog::REPEAT`]; the
/// others are debug lines. A device whose broker is away for a day retries thousands of times.
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    /// The last failure warned about, and when.
    last: Option<(ConnectFailure, Instant)>,
}

impl FailureLog {
    /// The longest a failure that goes on is not warned about again.
    pub(crate) const REPEAT: Duration = Duration::from_secs(60);

    /// Whether the attempt that failed with `failure` at `now` is warned about.
    pub(crate) fn warn(&mut self, failure: ConnectFailure, now: Instant) -> bool {
        let warn = match self.last {
            Some((last, at)) => {
                last != failure || now.saturating_duration_since(at) >= Self::REPEAT
            }
            None => true,
        };
        if warn {
            self.last = Some((failure, now));
        }
        warn
    }

    /// A connection was made: the next failure is news again.
    pub(crate) fn reset(&mut self) {
        self.last = None;
    }
}

/// Most link events waiting for the driver. Incoming messages are bounded by the broker's
/// in-flight window; while the channel is full the task waits (and stops reading the socket),
/// which is TCP back-pressure, not loss.
pub(crate) const LINK_EVENTS: usize = 1024;

/// The broker's addresses, each with the client options that connect to it, and the one the
/// next attempt uses. rumqttc keeps one address in its options and has no setter for it, so
/// every address gets options of its own, built alike by the caller; moving on swaps them into
/// the event loop between two attempts.
pub(crate) struct BrokerRotation {
    addresses: Vec<(BrokerAddress, MqttOptions)>,
    current: usize,
}

impl BrokerRotation {
    /// `None` when `addresses` is empty. The event loop must start on the first one.
    pub(crate) fn new(addresses: Vec<(BrokerAddress, MqttOptions)>) -> Option<BrokerRotation> {
        (!addresses.is_empty()).then_some(BrokerRotation {
            addresses,
            current: 0,
        })
    }

    /// The address the current connection or the next attempt is to.
    pub(crate) fn current(&self) -> &BrokerAddress {
        &self.addresses[self.current].0
    }

    /// Points `eventloop` at the next address, round the list; returns it when it is another
    /// one (never with a single address).
    pub(crate) fn advance(&mut self, eventloop: &mut EventLoop) -> Option<BrokerAddress> {
        if self.addresses.len() < 2 {
            return None;
        }
        self.current = (self.current + 1) % self.addresses.len();
        let (address, options) = &self.addresses[self.current];
        eventloop.mqtt_options = options.clone();
        Some(address.clone())
    }
}

/// Polls `eventloop` until `shutdown` turns true and the disconnect went out (or one second
/// passed), forwarding events to `events`; after a failure the next attempt goes to the next
/// address of `brokers`. A reason received on `abandon` while connected drops the connection
/// as if it had failed (the driver's verdict on a broker node that will not grant the device's
/// subscription): the next attempt goes to the next address.
pub(crate) async fn run(
    mut eventloop: EventLoop,
    mut brokers: BrokerRotation,
    events: mpsc::Sender<LinkEvent>,
    mut shutdown: watch::Receiver<bool>,
    mut abandon: mpsc::Receiver<String>,
    mut backoff: Backoff,
) {
    let mut connected = false;
    let mut failures = FailureLog::default();
    loop {
        let event = tokio::select! {
            // Cancel-safe: only the shutdown flag races the poll, and after it the poll is
            // resumed below, never restarted while a connect is in progress.
            event = eventloop.poll() => event.map_err(Dropped::Failed),
            _ = shutdown.changed(), if !*shutdown.borrow() => continue,
            // Only while connected (never mid-connect). The poll dropped midway may have
            // taken a request: `clean` moves it, with what was in flight and queued, into
            // rumqttc's pending list, which a clean session's CONNACK discards as after any
            // lost connection; the protocol resends what matters (the outbox, the feed from
            // the device's cursor).
            Some(reason) = abandon.recv(), if connected => {
                eventloop.clean();
                Err(Dropped::Abandoned(reason))
            }
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
                // A verdict on an earlier connection (sent as it dropped) is not this one's.
                while abandon.try_recv().is_ok() {}
                backoff.reset();
                failures.reset();
                Some(LinkEvent::Connected {
                    broker: brokers.current().clone(),
                })
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Some(LinkEvent::Message(p.payload.to_vec())),
            Ok(Event::Incoming(Packet::SubAck(ack))) => Some(LinkEvent::SubAck {
                granted: !ack.return_codes.is_empty()
                    && ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            }),
            Ok(_) => None,
            Err(dropped) => {
                let was_connected = std::mem::replace(&mut connected, false);
                let (error, failure) = match dropped {
                    Dropped::Failed(e) => (
                        e.to_string(),
                        (!was_connected).then(|| ConnectFailure::of(&e)),
                    ),
                    Dropped::Abandoned(reason) => (reason, None),
                };
                let warn = match failure {
                    Some(failure) => failures.warn(failure, Instant::now()),
                    None => true,
                };
                let broker = brokers.current().clone();
                let next = brokers.advance(&mut eventloop);
                if events
                    .send(LinkEvent::Lost {
                        broker,
                        next,
                        was_connected,
                        error,
                        failure,
                        warn,
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

/// Why the link left a connection or an attempt.
enum Dropped {
    /// The event loop failed: the attempt, or the connection that was up.
    Failed(ConnectionError),
    /// The driver gave the connection up, for this reason.
    Abandoned(String),
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
    fn failed_attempts_are_classified_by_what_to_fix() {
        use std::io::{Error, ErrorKind};
        let cases = [
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
                ConnectFailure::Credentials,
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                ConnectFailure::Credentials,
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable),
                ConnectFailure::Other,
            ),
            (
                ConnectionError::Io(Error::from(ErrorKind::ConnectionRefused)),
                ConnectFailure::Unreachable,
            ),
            (ConnectionError::NetworkTimeout, ConnectFailure::Unreachable),
            (
                ConnectionError::Tls(rumqttc::TlsError::Io(Error::other(
                    "invalid peer certificate",
                ))),
                ConnectFailure::Tls,
            ),
            (
                ConnectionError::MqttState(rumqttc::StateError::ConnectionAborted),
                ConnectFailure::Other,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(ConnectFailure::of(&error), expected, "{error}");
        }
        let broker = BrokerAddress {
            host: "b.example".into(),
            port: 8883,
        };
        let said = ConnectFailure::Credentials.describe(
            &broker,
            "Connection refused, return code: `BadUserNamePassword`",
        );
        assert!(
            said.contains("refused the credentials")
                && said.contains("BadUserNamePassword")
                && said.contains("b.example:8883"),
            "{said}"
        );
        assert!(ConnectFailure::Unreachable
            .describe(&broker, "x")
            .contains("unreachable"));
    }

    #[test]
    fn the_rotation_moves_the_event_loop_round_the_addresses() {
        let address = |host: &str, port| BrokerAddress {
            host: host.into(),
            port,
        };
        let options = |a: &BrokerAddress| MqttOptions::new("acme/d1", a.host.clone(), a.port);
        let list = [address("a", 1), address("b", 2), address("c", 3)];
        let mut rotation =
            BrokerRotation::new(list.iter().map(|a| (a.clone(), options(a))).collect()).unwrap();
        let mut eventloop = EventLoop::new(options(&list[0]), 8);
        assert_eq!(rotation.current(), &list[0]);
        for expected in [&list[1], &list[2], &list[0], &list[1]] {
            assert_eq!(rotation.advance(&mut eventloop).as_ref(), Some(expected));
            assert_eq!(rotation.current(), expected);
            assert_eq!(
                eventloop.mqtt_options.broker_address(),
                (expected.host.clone(), expected.port),
                "the next attempt goes to {expected}"
            );
        }
        // One address: nowhere to move.
        let mut single = BrokerRotation::new(vec![(list[0].clone(), options(&list[0]))]).unwrap();
        let mut eventloop = EventLoop::new(options(&list[0]), 8);
        assert_eq!(single.advance(&mut eventloop), None);
        assert_eq!(eventloop.mqtt_options.broker_address(), ("a".into(), 1));
        assert!(BrokerRotation::new(Vec::new()).is_none());
    }

    #[test]
    fn a_failure_is_warned_when_new_when_it_changes_and_once_a_minute() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(log.warn(ConnectFailure::Unreachable, at(0)), "the first");
        assert!(!log.warn(ConnectFailure::Unreachable, at(1)));
        assert!(!log.warn(ConnectFailure::Unreachable, at(59)));
        assert!(log.warn(ConnectFailure::Unreachable, at(60)), "a minute on");
        assert!(
            log.warn(ConnectFailure::Credentials, at(61)),
            "another reason"
        );
        assert!(!log.warn(ConnectFailure::Credentials, at(62)));
        log.reset();
        assert!(
            log.warn(ConnectFailure::Credentials, at(63)),
            "after a connection"
        );
    }

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
