//! The device's estimate of how long the cloud takes to answer a push, for its retransmit
//! timeout.
//!
//! A fixed first timeout (1 s) is right for an idle cloud and wrong for a loaded one: when
//! answers take ten seconds, every device resends each push several times before its answer
//! arrives, and the cloud applies every resend again (a replay, answered `applied`), doing two
//! or three times the work exactly when it has the least room (measured: 157,680 changes
//! answered for 67,627 written, 10,000 devices). So the timeout follows the answers, as TCP's
//! does (RFC 6298: smoothed round-trip time plus four deviations), never below the configured
//! first timeout and never above the longest.

/// Smoothed round-trip time and its deviation, in ms, from the answers to pushes sent once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RttEstimate {
    /// `None` until the first answer.
    srtt_ms: Option<u64>,
    rttvar_ms: u64,
}

impl RttEstimate {
    /// Takes one measured answer time (a push sent at `sent`, answered `took_ms` later).
    pub(crate) fn observe(&mut self, took_ms: u64) {
        match self.srtt_ms {
            None => {
                self.srtt_ms = Some(took_ms);
                self.rttvar_ms = took_ms / 2;
            }
            Some(srtt) => {
                // RFC 6298, alpha 1/8 and beta 1/4, in integers.
                let err = srtt.abs_diff(took_ms);
                self.rttvar_ms = (3 * self.rttvar_ms + err) / 4;
                self.srtt_ms = Some((7 * srtt + took_ms) / 8);
            }
        }
    }

    /// The first retransmit timeout these answers call for: `srtt + 4 × rttvar`, at least
    /// `floor_ms` (and `floor_ms` before any answer).
    pub(crate) fn timeout_ms(&self, floor_ms: u64) -> u64 {
        match self.srtt_ms {
            None => floor_ms,
            Some(srtt) => srtt
                .saturating_add(self.rttvar_ms.saturating_mul(4))
                .max(floor_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_follows_the_answers_and_never_drops_below_the_floor() {
        let mut r = RttEstimate::default();
        assert_eq!(
            r.timeout_ms(1000),
            1000,
            "no answer yet: the configured timeout"
        );
        for _ in 0..20 {
            r.observe(5);
        }
        assert_eq!(r.timeout_ms(1000), 1000, "fast answers keep the floor");
        for _ in 0..20 {
            r.observe(8000);
        }
        let slow = r.timeout_ms(1000);
        assert!(
            (8000..12_000).contains(&slow),
            "answers taking 8 s: a timeout past them, got {slow}"
        );
        for _ in 0..40 {
            r.observe(10);
        }
        assert_eq!(
            r.timeout_ms(1000),
            1000,
            "and back once the cloud is quick again"
        );
    }

    #[test]
    fn a_jittery_cloud_gets_room_for_its_deviation() {
        let mut r = RttEstimate::default();
        for i in 0..50 {
            r.observe(if i % 2 == 0 { 1000 } else { 3000 });
        }
        assert!(r.timeout_ms(100) > 3000, "{}", r.timeout_ms(100));
    }
}
