//! The presence check of a node that takes over partitions: which devices the registry shows
//! online in them are still to be heard from, and when the silent ones are marked offline.
//!
//! It exists because a cluster node cannot do what a single node does at start (mark every
//! device offline): the other nodes' devices are connected. A device that left while its node
//! was dead (its `bye`, the broker's last will, reached no node serving it) would stay `online`
//! for good. The node that takes its partition over prompts every device the registry shows
//! online there (a connected one says hello, which records it as seen) and, `wait` later, marks
//! offline those it has no session with and no node saw since the check began
//! ([`crate::store::Store::mark_offline_unseen`]: conditional, so a device heard meanwhile
//! stays online).
//!
//! Sans-IO: the sync loop feeds it the listings and the time, and carries out what is due.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use devtables_sync::identity::DeviceId;

/// Devices of partitions taken over, to hear from by `due`.
#[derive(Debug, PartialEq)]
pub(crate) struct PresenceCheck {
    pub(crate) due: Instant,
    /// Wall time (ms) when the registry was read: a device seen at or after it is present.
    pub(crate) since_ms: u64,
    pub(crate) devices: Vec<DeviceId>,
}

/// The checks under way, in the order they fall due.
#[derive(Debug)]
pub(crate) struct PresenceChecks {
    wait: Duration,
    pending: VecDeque<PresenceCheck>,
}

impl PresenceChecks {
    pub(crate) fn new(wait: Duration) -> PresenceChecks {
        PresenceChecks {
            wait,
            pending: VecDeque::new(),
        }
    }

    /// The registry, read at `since_ms`, shows `devices` online in partitions this node just
    /// took over; they are prompted now.
    pub(crate) fn start(&mut self, now: Instant, since_ms: u64, devices: Vec<DeviceId>) {
        if devices.is_empty() {
            return;
        }
        // The wait is the same for every check, so they fall due in the order they started.
        self.pending.push_back(PresenceCheck {
            due: now + self.wait,
            since_ms,
            devices,
        });
    }

    /// When the next check falls due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.pending.front().map(|c| c.due)
    }

    /// The check due at `now`, if any. `unprompted` says whether a device's prompt has not
    /// gone out yet (prompts are paced): a check holding one is put off by another wait, so
    /// every device has had the whole wait to answer.
    pub(crate) fn take_due(
        &mut self,
        now: Instant,
        unprompted: impl Fn(&DeviceId) -> bool,
    ) -> Option<PresenceCheck> {
        let check = self.pending.front()?;
        if check.due > now {
            return None;
        }
        let mut check = self.pending.pop_front()?;
        if check.devices.iter().any(unprompted) {
            check.due = now + self.wait;
            self.pending.push_back(check);
            return None;
        }
        Some(check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(name: &str) -> DeviceId {
        DeviceId::new("acme", name).unwrap()
    }

    #[test]
    fn a_check_falls_due_after_the_wait_and_not_before() {
        let t0 = Instant::now();
        let mut checks = PresenceChecks::new(Duration::from_secs(60));
        checks.start(t0, 1_000, vec![dev("a"), dev("b")]);
        assert_eq!(checks.next_due(), Some(t0 + Duration::from_secs(60)));
        assert_eq!(
            checks.take_due(t0 + Duration::from_secs(59), |_| false),
            None
        );
        let due = checks
            .take_due(t0 + Duration::from_secs(60), |_| false)
            .unwrap();
        assert_eq!((due.since_ms, due.devices.len()), (1_000, 2));
        assert_eq!(checks.next_due(), None);
    }

    #[test]
    fn a_check_whose_prompts_have_not_all_gone_out_is_put_off() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(10);
        let mut checks = PresenceChecks::new(wait);
        checks.start(t0, 5, vec![dev("a"), dev("b")]);
        checks.start(t0 + Duration::from_secs(1), 6, vec![dev("c")]);
        // `b` is still queued for its prompt at the first check's time: put off by a wait, and
        // the second check comes first.
        let at = t0 + wait;
        assert_eq!(checks.take_due(at, |d| d.device == "b"), None);
        assert_eq!(checks.next_due(), Some(t0 + Duration::from_secs(11)));
        let second = checks
            .take_due(t0 + Duration::from_secs(11), |_| false)
            .unwrap();
        assert_eq!(second.devices, vec![dev("c")]);
        assert_eq!(checks.next_due(), Some(at + wait));
        let first = checks.take_due(at + wait, |_| false).unwrap();
        assert_eq!(first.since_ms, 5);
    }

    #[test]
    fn nothing_online_starts_no_check() {
        let mut checks = PresenceChecks::new(Duration::from_secs(1));
        checks.start(Instant::now(), 1, Vec::new());
        assert_eq!(checks.next_due(), None);
    }
}
