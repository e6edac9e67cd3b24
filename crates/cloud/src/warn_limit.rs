//! A rate limit for warnings: shared by the store (which is built without the `service`
//! feature) and the service's modules, so it lives apart from both.

use std::time::{Duration, Instant};

/// Rate-limits a warning that a storm could repeat thousands of times a second: the first
/// occurrence is logged at once, later ones at most once per interval, with how many happened
/// in between.
#[derive(Debug)]
pub(crate) struct WarnLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    /// How often a repeated warning is logged at most.
    pub(crate) const INTERVAL: Duration = Duration::from_secs(10);

    pub(crate) fn new(interval: Duration) -> WarnLimiter {
        WarnLimiter {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// One occurrence at `now`: `Some(n)` means log now, mentioning `n` occurrences not logged
    /// since the last warning; `None` means stay quiet (it is counted).
    pub(crate) fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(at) if now.saturating_duration_since(at) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_logs_once_per_interval_and_counts_the_rest() {
        let mut w = WarnLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.hit(t0), Some(0));
        for i in 1..1000 {
            assert_eq!(w.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(w.hit(t0 + Duration::from_secs(10)), Some(999));
        assert_eq!(w.hit(t0 + Duration::from_secs(11)), None);
    }
}
