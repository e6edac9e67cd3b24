//! The path probe: the cloud, on an external broker, publishes a small message of its own under
//! the device topic filter every `interval` and expects it back through its subscription.
//!
//! It exists because a subscription can be granted and then go deaf without the connection
//! dropping: a NATS cluster node keeps a QoS 1 subscription in a JetStream consumer, and a
//! consumer that lost its quorum (a node killed while another was still catching up) delivers
//! nothing, for good, while the connection stays up. Devices then talk to nobody. A probe that
//! does not come back `max_missed` times in a row, while the loop was reading the whole time,
//! is the verdict: the connections are dropped and made again (the next broker address), which
//! subscribes afresh. A verdict that changed nothing doubles the interval (up to 32 times), so
//! a path that stays broken costs a reconnect every few minutes, not every few seconds.
//!
//! Verdicts start only once a probe has come back: a broker whose access control does not let
//! the cloud publish its probes (an older ACL) drops them all, and the cloud must not reconnect
//! for that. It says so once instead ([`ProbeStep::NeverHeard`]).
//!
//! Sans-IO: the sync loop says when the links are whole, when it pauses reading (backpressure:
//! a probe waiting unread in the broker is not lost), what it heard, and carries out the steps.

use std::time::{Duration, Instant};

/// Probes lost in a row that make a verdict.
pub(crate) const PROBES_MISSED_FOR_VERDICT: u32 = 3;

/// The longest interval, in multiples of the configured one.
const INTERVAL_CEILING: u32 = 32;

/// What the sync loop does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ProbeStep {
    /// Publish probe `seq`.
    Send(u64),
    /// `missed` probes in a row did not come back: drop every connection and connect again.
    Deaf { missed: u32 },
    /// `missed` probes in a row did not come back and none ever has: the broker may not let
    /// the cloud publish them (say so, once); probing goes on, without verdicts.
    NeverHeard { missed: u32 },
}

#[derive(Debug)]
pub(crate) struct PathProbe {
    base: Duration,
    interval: Duration,
    /// The last probe sent, and when it counts as lost.
    outstanding: Option<(u64, Instant)>,
    /// When the next probe goes out (none while the links are not whole).
    next_send: Option<Instant>,
    /// Probes lost in a row.
    missed: u32,
    seq: u64,
    /// A probe came back once: the broker carries them, so a run of lost ones is a verdict.
    armed: bool,
    /// [`ProbeStep::NeverHeard`] was returned.
    said_never_heard: bool,
}

impl PathProbe {
    pub(crate) fn new(interval: Duration) -> PathProbe {
        PathProbe {
            base: interval,
            interval,
            outstanding: None,
            next_send: None,
            missed: 0,
            seq: 0,
            armed: false,
            said_never_heard: false,
        }
    }

    /// Every connection is up and the subscription held: probing (re)starts, the first probe
    /// one interval from now (the subscription has only just been granted).
    pub(crate) fn whole(&mut self, now: Instant) {
        if self.next_send.is_none() {
            self.next_send = Some(now + self.interval);
        }
    }

    /// A connection dropped or the subscription is not held: nothing is expected until the
    /// links are whole again.
    pub(crate) fn broken(&mut self) {
        self.next_send = None;
        self.outstanding = None;
        self.missed = 0;
    }

    /// The loop is not reading device messages now (backpressure): the probe in flight may be
    /// waiting in the broker, so its time starts again.
    pub(crate) fn hold(&mut self, now: Instant) {
        if let Some((_, lost_at)) = &mut self.outstanding {
            *lost_at = (*lost_at).max(now + self.interval);
        }
        if let Some(at) = &mut self.next_send {
            *at = (*at).max(now + self.interval);
        }
    }

    /// When [`Self::on_timer`] has something to do.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match (self.outstanding, self.next_send) {
            (Some((_, lost)), Some(send)) => Some(lost.min(send)),
            (Some((_, lost)), None) => Some(lost),
            (None, send) => send,
        }
    }

    pub(crate) fn on_timer(&mut self, now: Instant) -> Option<ProbeStep> {
        if let Some((_, lost_at)) = self.outstanding {
            if now >= lost_at {
                self.outstanding = None;
                self.missed += 1;
                if self.missed >= PROBES_MISSED_FOR_VERDICT && !self.armed {
                    let missed = std::mem::take(&mut self.missed);
                    if !std::mem::replace(&mut self.said_never_heard, true) {
                        return Some(ProbeStep::NeverHeard { missed });
                    }
                } else if self.missed >= PROBES_MISSED_FOR_VERDICT {
                    let missed = std::mem::take(&mut self.missed);
                    self.interval = self
                        .interval
                        .saturating_mul(2)
                        .min(self.base.saturating_mul(INTERVAL_CEILING));
                    // The connections drop: `broken`, then `whole` once they are back.
                    self.next_send = None;
                    return Some(ProbeStep::Deaf { missed });
                }
            }
        }
        match self.next_send {
            Some(at) if now >= at && self.outstanding.is_none() => {
                self.seq += 1;
                self.outstanding = Some((self.seq, now + self.interval));
                self.next_send = Some(now + self.interval);
                Some(ProbeStep::Send(self.seq))
            }
            _ => None,
        }
    }

    /// Probe `seq` could not even be queued (the request queue was full): not a loss of the
    /// path; it is tried again at the next interval.
    pub(crate) fn not_sent(&mut self, seq: u64) {
        if self.outstanding.is_some_and(|(s, _)| s == seq) {
            self.outstanding = None;
        }
    }

    /// A probe came back: the path works. A late one of an earlier probe counts too (the path
    /// works, slowly); one from before a verdict or of another run is ignored by its number.
    /// Returns whether it was one of this run's.
    pub(crate) fn heard(&mut self, seq: u64) -> bool {
        if seq == 0 || seq > self.seq {
            return false;
        }
        self.missed = 0;
        self.interval = self.base;
        self.armed = true;
        if self.outstanding.is_some_and(|(s, _)| s <= seq) {
            self.outstanding = None;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(10);

    /// Runs the probe's timer at `now`, expecting `step`.
    fn at(p: &mut PathProbe, now: Instant, step: Option<ProbeStep>) {
        assert_eq!(p.on_timer(now), step, "at {:?}", now);
    }

    #[test]
    fn probes_that_come_back_never_make_a_verdict() {
        let t0 = Instant::now();
        let mut p = PathProbe::new(I);
        assert_eq!(p.deadline(), None, "nothing before the links are whole");
        p.whole(t0);
        assert_eq!(p.deadline(), Some(t0 + I));
        for n in 1..=10u32 {
            let now = t0 + I * n;
            at(&mut p, now, Some(ProbeStep::Send(u64::from(n))));
            assert!(p.heard(u64::from(n)));
        }
    }

    /// A probe that came back: verdicts may follow.
    fn armed(t0: Instant) -> (PathProbe, Instant) {
        let mut p = PathProbe::new(I);
        p.whole(t0 - I);
        at(&mut p, t0, Some(ProbeStep::Send(1)));
        assert!(p.heard(1));
        (p, t0)
    }

    #[test]
    fn without_a_probe_ever_back_there_is_no_verdict_but_one_word() {
        let t0 = Instant::now();
        let mut p = PathProbe::new(I);
        p.whole(t0);
        for n in 1..=3 {
            at(&mut p, t0 + I * n, Some(ProbeStep::Send(u64::from(n))));
        }
        at(
            &mut p,
            t0 + I * 4,
            Some(ProbeStep::NeverHeard { missed: 3 }),
        );
        // Said once; probing goes on, never a verdict.
        at(&mut p, t0 + I * 4, Some(ProbeStep::Send(4)));
        for n in 5..=20 {
            at(&mut p, t0 + I * n, Some(ProbeStep::Send(u64::from(n))));
        }
        // One comes back at last: the next run of losses is a verdict.
        assert!(p.heard(20));
        at(&mut p, t0 + I * 21, Some(ProbeStep::Send(21)));
        at(&mut p, t0 + I * 22, Some(ProbeStep::Send(22)));
        at(&mut p, t0 + I * 23, Some(ProbeStep::Send(23)));
        at(&mut p, t0 + I * 24, Some(ProbeStep::Deaf { missed: 3 }));
    }

    #[test]
    fn three_lost_probes_in_a_row_make_a_verdict_and_the_next_waits_longer() {
        // Probe 1 went out at t0 and came back.
        let (mut p, t0) = armed(Instant::now());
        at(&mut p, t0 + I / 2, None);
        at(&mut p, t0 + I, Some(ProbeStep::Send(2)));
        // Lost, and the next goes out at the same time.
        at(&mut p, t0 + I * 2, Some(ProbeStep::Send(3)));
        at(&mut p, t0 + I * 3, Some(ProbeStep::Send(4)));
        at(&mut p, t0 + I * 4, Some(ProbeStep::Deaf { missed: 3 }));
        assert_eq!(
            p.deadline(),
            None,
            "nothing until the links are whole again"
        );
        // The connections came back: the interval is doubled.
        p.broken();
        let t1 = t0 + I * 5;
        p.whole(t1);
        assert_eq!(p.deadline(), Some(t1 + I * 2));
        // A probe that comes back resets it.
        at(&mut p, t1 + I * 2, Some(ProbeStep::Send(5)));
        assert!(p.heard(5));
        at(&mut p, t1 + I * 4, Some(ProbeStep::Send(6)));
        assert_eq!(p.deadline(), Some(t1 + I * 5));
    }

    #[test]
    fn a_probe_unread_while_the_loop_holds_back_is_not_lost() {
        let (mut p, t0) = armed(Instant::now());
        at(&mut p, t0 + I, Some(ProbeStep::Send(2)));
        // The loop stopped reading for 25 s: the probe's time starts again each time it holds.
        for s in [15, 20, 25, 30, 35] {
            p.hold(t0 + Duration::from_secs(s));
        }
        at(&mut p, t0 + Duration::from_secs(40), None);
        assert!(p.heard(2));
        at(
            &mut p,
            t0 + Duration::from_secs(45),
            Some(ProbeStep::Send(3)),
        );
    }

    #[test]
    fn a_verdict_needs_three_losses_in_a_row() {
        let (mut p, t0) = armed(Instant::now());
        at(&mut p, t0 + I, Some(ProbeStep::Send(2)));
        at(&mut p, t0 + I * 2, Some(ProbeStep::Send(3)));
        at(&mut p, t0 + I * 3, Some(ProbeStep::Send(4)));
        // 2 and 3 lost; 3 comes back late: the path works, the count starts again (4 is still
        // out).
        assert!(p.heard(3));
        at(&mut p, t0 + I * 4, Some(ProbeStep::Send(5)));
        at(&mut p, t0 + I * 5, Some(ProbeStep::Send(6)));
        at(&mut p, t0 + I * 6, Some(ProbeStep::Deaf { missed: 3 }));
    }

    #[test]
    fn unknown_numbers_are_ignored_and_a_probe_not_queued_is_no_loss() {
        let mut fresh = PathProbe::new(I);
        assert!(!fresh.heard(1), "none sent yet");
        let (mut p, t0) = armed(Instant::now());
        at(&mut p, t0 + I, Some(ProbeStep::Send(2)));
        assert!(!p.heard(0));
        assert!(!p.heard(7), "a number never sent (another run's)");
        p.not_sent(2);
        at(&mut p, t0 + I * 2, Some(ProbeStep::Send(3)));
        at(&mut p, t0 + I * 3, Some(ProbeStep::Send(4)));
        at(&mut p, t0 + I * 4, Some(ProbeStep::Send(5)));
        // 3, 4 and 5 lost; the unsent 2 did not count.
        at(&mut p, t0 + I * 5, Some(ProbeStep::Deaf { missed: 3 }));
    }

    #[test]
    fn the_interval_stops_doubling_at_its_ceiling() {
        let (mut p, mut now) = armed(Instant::now());
        for _ in 0..8 {
            p.broken();
            p.whole(now);
            let mut verdict = false;
            while !verdict {
                now = p.deadline().unwrap();
                verdict = matches!(p.on_timer(now), Some(ProbeStep::Deaf { .. }));
            }
        }
        p.broken();
        p.whole(now);
        assert_eq!(p.deadline(), Some(now + I * INTERVAL_CEILING));
    }
}
