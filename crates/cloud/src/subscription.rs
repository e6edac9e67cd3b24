//! Keeps the service subscribed to the device topics: a small state machine, with the time as a
//! parameter, that the sync loop drives with MQTT events.
//!
//! This module exists because a subscription that silently failed once left the cloud deaf for
//! good: the request could not be queued (the queue was full of start-up prompts) and nothing
//! retried it. Here a subscription counts as held only when a SUBACK grants every filter; a
//! request that cannot be queued, a refused filter and a SUBACK that never comes are all retried
//! with backoff, and every new connection (the service uses clean sessions) starts over. A
//! connection on which the broker refused or left unanswered [`SUBSCRIBES_PER_CONNECTION`]
//! requests, over at least `give_up_after`, is given up ([`Subscription::exhausted`]): a node
//! of a broker cluster can refuse for minutes while another grants at once.

use std::time::{Duration, Instant};

/// Backoff and timeout settings (from [`crate::config::MqttClientConfig`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SubscribeTiming {
    pub(crate) retry_min: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) suback_timeout: Duration,
    /// Least time on one connection before it may be given up ([`Subscription::exhausted`]).
    pub(crate) give_up_after: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No connection: nothing can be subscribed.
    Offline,
    /// Connected; a SUBSCRIBE is to be sent at this time.
    Due(Instant),
    /// A SUBSCRIBE is queued or sent (`pkid` once the client reported it) and waits for its
    /// SUBACK until `deadline`.
    Requested {
        pkid: Option<u16>,
        deadline: Instant,
    },
    /// Every filter is granted on this connection.
    Held,
}

/// What a SUBACK meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubAckOutcome {
    /// Every filter granted: the subscription holds.
    Held,
    /// The broker refused a filter; another attempt is scheduled.
    Refused,
    /// Not the answer to the current request (a late answer to an earlier one).
    Ignored,
}

/// The subscription state of the current connection (one per ingress connection).
#[derive(Clone, Debug)]
pub(crate) struct Subscription {
    timing: SubscribeTiming,
    state: State,
    /// Failures in a row on this connection, for the backoff.
    failures: u32,
    /// SUBSCRIBEs the broker refused or left unanswered on this connection (a full request
    /// queue is the service's own state, not counted here).
    broker_failures: u32,
    /// When the current connection came up.
    connected_at: Option<Instant>,
}

/// SUBSCRIBEs refused or left unanswered on one connection before it is given up (the link
/// then connects to the next broker address): a node of a broker cluster may refuse, or hold,
/// subscriptions for minutes after losing a peer, while another node grants at once.
pub(crate) const SUBSCRIBES_PER_CONNECTION: u32 = 3;

impl Subscription {
    pub(crate) fn new(timing: SubscribeTiming) -> Subscription {
        Subscription {
            timing,
            state: State::Offline,
            failures: 0,
            broker_failures: 0,
            connected_at: None,
        }
    }

    /// Whether every filter is granted on the current connection.
    pub(crate) fn held(&self) -> bool {
        self.state == State::Held
    }

    /// Device messages come in-process from the embedded broker: nothing to subscribe, and
    /// held for good (no connection to lose).
    pub(crate) fn held_in_process(&mut self) {
        self.state = State::Held;
    }

    /// A new connection (CONNACK): subscriptions of a clean session start empty.
    pub(crate) fn connected(&mut self, now: Instant) {
        self.state = State::Due(now);
        self.failures = 0;
        self.broker_failures = 0;
        self.connected_at = Some(now);
    }

    /// Whether the broker refused or left unanswered [`SUBSCRIBES_PER_CONNECTION`] SUBSCRIBEs
    /// on this connection, which has been up for `give_up_after` without a grant: the caller
    /// gives the connection up (once it is lost, a new one starts the count again).
    pub(crate) fn exhausted(&self, now: Instant) -> bool {
        let up_long_enough = self
            .connected_at
            .is_some_and(|at| now.saturating_duration_since(at) >= self.timing.give_up_after);
        !matches!(self.state, State::Offline | State::Held)
            && self.broker_failures >= SUBSCRIBES_PER_CONNECTION
            && up_long_enough
    }

    /// The connection is gone.
    pub(crate) fn lost(&mut self) {
        self.state = State::Offline;
    }

    /// Whether a SUBSCRIBE should be queued now; if so the caller queues it and reports
    /// [`queued`](Self::queued) or [`not_queued`](Self::not_queued).
    pub(crate) fn due(&self, now: Instant) -> bool {
        matches!(self.state, State::Due(at) if at <= now)
    }

    /// The SUBSCRIBE is in the client's request queue.
    pub(crate) fn queued(&mut self, now: Instant) {
        self.state = State::Requested {
            pkid: None,
            deadline: now + self.timing.suback_timeout,
        };
    }

    /// The SUBSCRIBE could not be queued: try again after the backoff.
    pub(crate) fn not_queued(&mut self, now: Instant) {
        self.retry(now);
    }

    /// The client sent a SUBSCRIBE with this packet id.
    pub(crate) fn sent(&mut self, pkid: u16) {
        if let State::Requested { pkid: p, .. } = &mut self.state {
            *p = Some(pkid);
        }
    }

    /// A SUBACK arrived; `granted` is whether every return code is a success.
    pub(crate) fn suback(&mut self, now: Instant, pkid: u16, granted: bool) -> SubAckOutcome {
        match self.state {
            State::Offline | State::Held => SubAckOutcome::Ignored,
            // Every request of a connection asks for the same filters, so any full grant on
            // this connection means they are held.
            _ if granted => {
                self.state = State::Held;
                self.failures = 0;
                self.broker_failures = 0;
                SubAckOutcome::Held
            }
            State::Requested { pkid: Some(p), .. } if p == pkid => {
                self.broker_failures = self.broker_failures.saturating_add(1);
                self.retry(now);
                SubAckOutcome::Refused
            }
            _ => SubAckOutcome::Ignored,
        }
    }

    /// When [`on_timer`](Self::on_timer) must be called next.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Due(at) => Some(at),
            State::Requested { deadline, .. } => Some(deadline),
            State::Offline | State::Held => None,
        }
    }

    /// Time passed: a SUBACK that did not come in time counts as a failure. Returns whether it
    /// did (for the log).
    pub(crate) fn on_timer(&mut self, now: Instant) -> bool {
        match self.state {
            State::Requested { deadline, .. } if deadline <= now => {
                self.broker_failures = self.broker_failures.saturating_add(1);
                self.retry(now);
                true
            }
            _ => false,
        }
    }

    fn retry(&mut self, now: Instant) {
        let shift = self.failures.min(16);
        let wait = self
            .timing
            .retry_min
            .saturating_mul(1u32 << shift)
            .min(self.timing.retry_max);
        self.failures = self.failures.saturating_add(1);
        self.state = State::Due(now + wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_refused_or_unanswered_subscribes_exhaust_a_connection_and_a_full_queue_does_not() {
        let t = Instant::now();
        let mut s = Subscription::new(timing());
        s.connected(t);
        // A full request queue, however often, is not the broker's answer.
        for _ in 0..5 {
            s.not_queued(t);
        }
        assert!(!s.exhausted(t + Duration::from_secs(60)));
        let mut now = t;
        // Refused, unanswered, refused.
        for (pkid, answer) in [(1, Some(false)), (2, None), (3, Some(false))] {
            assert!(!s.exhausted(t + Duration::from_secs(60)));
            now = s.deadline().unwrap();
            assert!(s.due(now));
            s.queued(now);
            s.sent(pkid);
            match answer {
                Some(granted) => {
                    assert_eq!(s.suback(now, pkid, granted), SubAckOutcome::Refused)
                }
                None => {
                    now = s.deadline().unwrap();
                    assert!(s.on_timer(now));
                }
            }
        }
        // Three failures, but the connection is younger than `give_up_after`: not yet.
        assert!(now < t + Duration::from_secs(20));
        assert!(!s.exhausted(now));
        assert!(s.exhausted(t + Duration::from_secs(20)));
        // Given up: the lost connection's count goes with it, and the next starts afresh.
        s.lost();
        assert!(!s.exhausted(t + Duration::from_secs(60)));
        s.connected(now);
        assert!(!s.exhausted(now + Duration::from_secs(60)));
    }

    fn timing() -> SubscribeTiming {
        SubscribeTiming {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(1000),
            suback_timeout: Duration::from_secs(5),
            give_up_after: Duration::from_secs(20),
        }
    }

    #[test]
    fn nothing_is_held_before_a_granting_suback() {
        let t = Instant::now();
        let mut s = Subscription::new(timing());
        assert!(!s.due(t) && !s.held());
        s.connected(t);
        assert!(s.due(t));
        s.queued(t);
        assert!(!s.due(t) && !s.held());
        s.sent(7);
        assert_eq!(s.suback(t, 7, true), SubAckOutcome::Held);
        assert!(s.held());
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn a_request_that_cannot_be_queued_is_retried_with_backoff() {
        let t = Instant::now();
        let mut s = Subscription::new(timing());
        s.connected(t);
        s.not_queued(t);
        assert!(!s.due(t));
        assert_eq!(s.deadline(), Some(t + Duration::from_millis(100)));
        let t1 = t + Duration::from_millis(100);
        assert!(s.due(t1));
        s.not_queued(t1);
        assert_eq!(s.deadline(), Some(t1 + Duration::from_millis(200)));
        // The backoff stops growing at the maximum.
        let mut now = t1;
        for _ in 0..10 {
            now += Duration::from_secs(1);
            s.not_queued(now);
        }
        assert_eq!(s.deadline(), Some(now + Duration::from_millis(1000)));
    }

    #[test]
    fn a_refused_filter_is_retried_and_a_stale_refusal_ignored() {
        let t = Instant::now();
        let mut s = Subscription::new(timing());
        s.connected(t);
        s.queued(t);
        s.sent(3);
        assert_eq!(s.suback(t, 9, false), SubAckOutcome::Ignored);
        assert_eq!(s.suback(t, 3, false), SubAckOutcome::Refused);
        assert!(!s.held());
        assert_eq!(s.deadline(), Some(t + Duration::from_millis(100)));
        assert!(s.due(t + Duration::from_millis(100)));
    }

    #[test]
    fn a_missing_suback_is_retried_after_the_timeout() {
        let t = Instant::now();
        let mut s = Subscription::new(timing());
        s.connected(t);
        s.queued(t);
        assert!(!s.on_timer(t + Duration::from_secs(4)));
        assert!(s.on_timer(t + Duration::from_secs(5)));
        assert!(s.due(t + Duration::from_secs(5) + Duration::from_millis(100)));
    }

    #[test]
    fn every_reconnect_subscribes_again() {
        let t = Instant::now();
        let mut s = Subscription::new(timing());
        s.connected(t);
        s.queued(t);
        s.sent(1);
        s.suback(t, 1, true);
        assert!(s.held());
        s.lost();
        assert!(!s.held() && !s.due(t));
        // A late answer after the loss does not count.
        assert_eq!(s.suback(t, 1, true), SubAckOutcome::Ignored);
        s.connected(t);
        assert!(!s.held() && s.due(t));
    }
}
