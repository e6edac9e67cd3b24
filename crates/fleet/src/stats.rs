//! What the devices measure, shared: latency histograms (the last interval and the whole run),
//! counters of items written and delivered, and errors by kind.
//!
//! Hooks of thousands of agents record here from the database's and the agents' threads, so
//! every record is one short lock or one atomic add.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest latency a histogram holds exactly (longer ones are recorded as this): one hour.
const MAX_LAG_US: u64 = 3_600_000_000;

/// Errors and refusals by kind (a name such as `api_rate_limited` or `device_rejected`).
#[derive(Default)]
pub(crate) struct Errors {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Errors {
    pub(crate) fn add(&self, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry(kind.to_string()).or_insert(0) += n;
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
    }
}

/// p50, p90, p99 and max of a latency, in ms (exact to the histogram's 3 significant digits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// One latency, over the last interval and over the run.
pub(crate) struct Lag {
    inner: Mutex<LagInner>,
}

struct LagInner {
    interval: Histogram<u64>,
    total: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to an hour, 3 significant digits: fixed size (a few tens of KiB), exact enough.
    Histogram::new_with_bounds(1, MAX_LAG_US, 3).expect("valid histogram bounds")
}

impl Lag {
    pub(crate) fn new() -> Lag {
        Lag {
            inner: Mutex::new(LagInner {
                interval: histogram(),
                total: histogram(),
            }),
        }
    }

    pub(crate) fn record(&self, lag: Duration) {
        let us = (lag.as_micros() as u64).clamp(1, MAX_LAG_US);
        let mut h = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // Within bounds by the clamp: recording cannot fail.
        let _ = h.interval.record(us);
        let _ = h.total.record(us);
    }

    /// The last interval's percentiles (the interval starts again) and the run's.
    pub(crate) fn take_interval(&self) -> (Percentiles, Percentiles) {
        let mut h = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let interval = Percentiles::of(&h.interval);
        h.interval.reset();
        (interval, Percentiles::of(&h.total))
    }

    pub(crate) fn total(&self) -> Percentiles {
        Percentiles::of(
            &self
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .total,
        )
    }
}

/// Counters of the whole fleet.
#[derive(Default)]
pub(crate) struct Counters {
    /// Up writes committed on a device.
    pub(crate) up_written: AtomicU64,
    /// Up writes the cloud applied (answered and not rejected), each counted once.
    pub(crate) up_acked: AtomicU64,
    /// Answers for up writes already answered (an entry sent again and answered twice).
    pub(crate) up_acks_repeated: AtomicU64,
    /// Up writes the cloud rejected.
    pub(crate) up_rejected: AtomicU64,
    /// Write slots skipped because the device was offline (churn).
    pub(crate) up_skipped_offline: AtomicU64,
    /// Down writes the API accepted.
    pub(crate) down_written: AtomicU64,
    /// Down writes applied on their device (first time).
    pub(crate) down_applied: AtomicU64,
    /// Down writes applied a second time on their device (must stay 0).
    pub(crate) down_duplicates: AtomicU64,
    pub(crate) broadcasts_written: AtomicU64,
    /// Broadcast items applied, summed over the devices.
    pub(crate) broadcasts_applied: AtomicU64,
    pub(crate) broadcast_duplicates: AtomicU64,
    pub(crate) commands_sent: AtomicU64,
    /// Command handler runs (a command may run twice after a crash; not here).
    pub(crate) commands_run: AtomicU64,
    /// Command results the cloud acknowledged.
    pub(crate) commands_done: AtomicU64,
    /// Devices that went offline and came back.
    pub(crate) churned: AtomicU64,
    /// Of them, those away past the cloud's retention.
    pub(crate) churned_long: AtomicU64,
}

impl Counters {
    pub(crate) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The measurements shared by every device and task.
pub(crate) struct Stats {
    pub(crate) counters: Counters,
    pub(crate) errors: std::sync::Arc<Errors>,
    /// Device write returned -> the cloud's acknowledgement reached the device.
    pub(crate) up_lag: Lag,
    /// API write returned -> the device applied it.
    pub(crate) down_lag: Lag,
    /// API broadcast returned -> each device applied it.
    pub(crate) broadcast_lag: Lag,
    /// API command write returned -> the device's result acknowledged by the cloud.
    pub(crate) command_lag: Lag,
    /// When each broadcast's API write returned, by sequence number.
    broadcasts: Mutex<std::collections::HashMap<u64, Instant>>,
}

impl Stats {
    pub(crate) fn new(errors: std::sync::Arc<Errors>) -> Stats {
        Stats {
            counters: Counters::default(),
            errors,
            up_lag: Lag::new(),
            down_lag: Lag::new(),
            broadcast_lag: Lag::new(),
            command_lag: Lag::new(),
            broadcasts: Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub(crate) fn broadcast_written(&self, seq: u64, at: Instant) {
        self.broadcasts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(seq, at);
    }

    pub(crate) fn broadcast_sent(&self, seq: u64) -> Option<Instant> {
        self.broadcasts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&seq)
            .copied()
    }

    /// The broadcasts written so far.
    pub(crate) fn broadcast_seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = self
            .broadcasts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        seqs.sort_unstable();
        seqs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact_to_three_digits_and_intervals_restart() {
        let lag = Lag::new();
        for ms in 1..=100u64 {
            lag.record(Duration::from_millis(ms));
        }
        let (interval, total) = lag.take_interval();
        assert_eq!(interval, total);
        assert_eq!(total.count, 100);
        assert!((total.p50 - 50.0).abs() < 0.1, "{total:?}");
        assert!((total.p99 - 99.0).abs() < 0.1, "{total:?}");
        assert!((total.max - 100.0).abs() < 0.1, "{total:?}");
        lag.record(Duration::from_secs(7200));
        let (interval, total) = lag.take_interval();
        assert_eq!(interval.count, 1);
        assert_eq!(total.count, 101);
        assert!(
            (interval.max - 3_600_000.0).abs() / 3_600_000.0 < 0.001,
            "clamped to an hour"
        );
    }

    #[test]
    fn errors_count_by_kind() {
        let e = Errors::default();
        e.add("a", 2);
        e.add("b", 0);
        e.add("a", 1);
        assert_eq!(
            e.snapshot().into_iter().collect::<Vec<_>>(),
            [("a".to_string(), 3)]
        );
        assert_eq!(e.total(), 3);
    }
}
