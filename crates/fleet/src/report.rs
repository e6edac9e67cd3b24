//! What a simulation tells: a [`Progress`] tick every second while it runs (the caller shows
//! it: `devtables sim` as a status line), and the [`FleetReport`] at the end, written as JSON
//! and shown as a table.
//!
//! The JSON field names are a contract: `devtables bench fleet` plots them and
//! `docs/fleet-sim.md` explains them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;

pub use crate::stats::Percentiles;
use crate::FleetConfig;

/// Where a simulation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Registering,
    Connecting,
    Writing,
    Draining,
    Stopping,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Registering => "registering",
            Phase::Connecting => "connecting",
            Phase::Writing => "writing",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        }
    }
}

/// One second of a simulation.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub phase: Phase,
    /// Seconds since the simulation started.
    pub t_s: f64,
    pub devices: usize,
    pub registered: usize,
    /// Devices whose session the cloud welcomed.
    pub connected: usize,
    /// Up writes acknowledged per second, over the last interval.
    pub up_per_s: f64,
    /// Down writes applied per second, over the last interval.
    pub down_per_s: f64,
    /// Up lag over the last interval, and over the run.
    pub up_lag_ms: Percentiles,
    pub up_lag_total_ms: Percentiles,
    pub down_lag_ms: Percentiles,
    pub down_lag_total_ms: Percentiles,
    /// Local changes waiting in the outboxes, summed over the devices.
    pub outbox: u64,
    /// Errors of every kind so far.
    pub errors: u64,
    pub cloud_cpu_pct: Option<f64>,
    pub cloud_rss_mib: Option<f64>,
}

/// Receives a [`Progress`] every second.
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

impl Progress {
    /// The status line `devtables sim` shows.
    pub fn status_line(&self) -> String {
        let mut line = format!("{:>6.1}s {:<11}", self.t_s, self.phase.name());
        if self.phase == Phase::Registering {
            let _ = write!(line, " registered {}/{}", self.registered, self.devices);
            return line;
        }
        let lag = |i: &Percentiles, t: &Percentiles| {
            format!(
                "{}/{}/{} ({}/{}/{})",
                ms(i.p50),
                ms(i.p99),
                ms(i.max),
                ms(t.p50),
                ms(t.p99),
                ms(t.max)
            )
        };
        let _ = write!(
            line,
            " conn {}/{}  up {:.0}/s p50/p99/max {}  down {:.0}/s {}  outbox {}  err {}",
            self.connected,
            self.devices,
            self.up_per_s,
            lag(&self.up_lag_ms, &self.up_lag_total_ms),
            self.down_per_s,
            lag(&self.down_lag_ms, &self.down_lag_total_ms),
            self.outbox,
            self.errors,
        );
        if let (Some(cpu), Some(rss)) = (self.cloud_cpu_pct, self.cloud_rss_mib) {
            let _ = write!(line, "  cloud {cpu:.0}% {rss:.0}MiB");
        }
        line
    }
}

/// A latency in ms, short: `0.8ms`, `12ms`, `3.4s`.
fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.1}s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}ms")
    } else {
        format!("{v:.1}ms")
    }
}

/// The cloud's footprint, read from `/proc` (all `None` when its process is unknown).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CloudFigures {
    pub pid: Option<u32>,
    /// CPU over the write phase, in percent of one core.
    pub cpu_pct_avg: Option<f64>,
    /// CPU milliseconds per acknowledged up write, from the start of the writes to the end of
    /// the drain (everything the cloud did meanwhile included): robust when other processes load
    /// the machine, unlike rates.
    pub cpu_ms_per_acked_push: Option<f64>,
    /// RSS once the devices were registered, before any connected.
    pub rss_start_mib: Option<f64>,
    /// RSS once every device connected (before the writes).
    pub rss_connected_mib: Option<f64>,
    pub rss_peak_mib: Option<f64>,
    /// (connected - start) / devices: what one connected, idle device costs the cloud.
    pub rss_per_device_kib: Option<f64>,
}

/// The simulator's own process.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimFigures {
    pub cpu_pct_avg: Option<f64>,
    /// CPU milliseconds per up write, from the start of the writes to the end of the drain
    /// (the agents' whole work for it: the write, the push, the answer).
    pub cpu_ms_per_write: Option<f64>,
    pub rss_peak_mib: Option<f64>,
}

/// What the cloud's `GET /v1/status` counted during the run (differences from the start), and
/// the devices' own counts from the registry.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CloudCounts {
    /// `push_changes_applied`: pushed changes answered `applied` (a resent change counts again).
    pub push_changes_applied: Option<u64>,
    /// `device_push_changes_covered`: resent copies of changes still being applied, not applied
    /// again (the original's answer answers them).
    pub push_changes_covered: Option<u64>,
    /// `device_push_changes_reanswered`: late copies of changes just applied, answered again
    /// without a store job.
    pub push_changes_reanswered: Option<u64>,
    /// The sum of the simulated devices' `changes_applied` (each stored write once).
    pub device_changes_applied: Option<u64>,
    /// The most sessions seen in a full resync at once (`sessions_resyncing`, read each second).
    pub sessions_resyncing_max: u64,
    /// Group commits of the cloud's store (`store_commits`) and the store jobs they made
    /// durable (`store_jobs_committed`): their ratio is the mean group size.
    pub store_commits: Option<u64>,
    pub store_jobs_committed: Option<u64>,
}

/// A reconnect storm ([`crate::FleetConfig::restart_cloud_after`]): the cloud restarted while
/// every device was connected, all of them reconnecting at once.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StormFigures {
    /// Devices welcomed when the cloud was stopped: the ones that must come back.
    pub devices: usize,
    /// Seconds from the stop signal to the restarted cloud serving (its "running" line).
    pub restart_s: f64,
    /// Seconds from serving to its `/ready` answering 200.
    pub ready_s: Option<f64>,
    /// Seconds from serving until half of the devices were welcomed again.
    pub half_served_s: Option<f64>,
    /// Seconds from serving until every one of them was welcomed again (`None`: not all within
    /// the storm's timeout; `served` says how many).
    pub all_served_s: Option<f64>,
    pub served: usize,
    /// The cloud's RSS before the stop, and the highest the restarted one reached during the
    /// storm.
    pub cloud_rss_before_mib: Option<f64>,
    pub cloud_rss_peak_mib: Option<f64>,
}

/// What the drain could not account for when it gave up (all zero on a good run).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Missing {
    /// Up writes not acknowledged.
    pub up: u64,
    /// Down writes not applied on their device.
    pub down: u64,
    /// (broadcast, device) pairs not applied.
    pub broadcasts: u64,
    /// Commands whose result the cloud did not acknowledge.
    pub commands: u64,
    /// Entries still in the devices' outboxes.
    pub outbox: u64,
}

impl Missing {
    pub fn total(&self) -> u64 {
        self.up + self.down + self.broadcasts + self.commands + self.outbox
    }
}

/// The result of a simulation. Field names are stable (see the module doc).
#[derive(Clone, Debug, Serialize)]
pub struct FleetReport {
    pub devices: usize,
    pub rate_per_device: f64,
    pub duration_s: f64,
    pub offered_up_per_s: f64,
    pub up_written: u64,
    /// Up writes the cloud applied (rejections are in `errors.device_rejected`), each once.
    pub up_acked: u64,
    /// Answers for up writes answered before (an entry sent again: delivery is at least once).
    pub up_acks_repeated: u64,
    /// Up writes acknowledged per second during the write phase.
    pub up_per_s: f64,
    pub down_written: u64,
    pub down_applied: u64,
    /// Down writes applied per second during the write phase.
    pub down_per_s: f64,
    pub up_lag_ms: Percentiles,
    pub down_lag_ms: Percentiles,
    pub broadcasts_written: u64,
    /// Broadcast items applied, summed over the devices.
    pub broadcasts_applied: u64,
    pub broadcast_lag_ms: Percentiles,
    pub commands_sent: u64,
    pub commands_run: u64,
    pub commands_done: u64,
    pub command_lag_ms: Percentiles,
    /// Seconds from the first connection to the last device welcomed; `None` if not all
    /// connected within the timeout.
    pub connect_s: Option<f64>,
    /// Seconds the drain took.
    pub drain_s: f64,
    /// The reconnect storm, when the cloud was restarted.
    pub storm: Option<StormFigures>,
    /// Errors, refusals and drops by kind (devices', the API's, and the cloud's own counters).
    pub errors: BTreeMap<String, u64>,
    pub cloud: CloudFigures,
    pub cloud_counts: CloudCounts,
    pub sim: SimFigures,
    /// Full resyncs after a device's first sync (devices back from past the retention).
    pub resyncs: u64,
    /// Pushes the devices sent again because no answer came within their retransmit timeout
    /// (agents' `push_timeouts`): a cloud behind. Not an error: the cloud answers each change
    /// once (`cloud_counts` says how it took the copies).
    pub push_timeouts: u64,
    /// Devices that went offline and came back in step (welcomed again; the long-away ones
    /// once their resync finished). One that did not is in `errors` (`churn_not_back`,
    /// `churn_long_without_resync`).
    pub churned: u64,
    /// Of them, away past the cloud's retention.
    pub churned_long: u64,
    /// Down writes and broadcasts applied twice on one device (must be 0).
    pub duplicates: u64,
    pub missing: Missing,
    pub config: FleetConfig,
    /// One sample per second.
    pub timeline: Vec<Progress>,
}

impl FleetReport {
    /// Whether every write was accounted for.
    pub fn complete(&self) -> bool {
        self.missing.total() == 0 && self.duplicates == 0
    }

    /// The table `devtables sim` prints at the end.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        row(
            "devices",
            format!(
                "{} ({} db), connected in {}",
                self.devices,
                match self.config.db {
                    crate::DbMode::Memory => "memory",
                    crate::DbMode::Disk => "disk",
                },
                self.connect_s
                    .map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "- (not all)".into())
            ),
        );
        row(
            "up",
            format!(
                "{} written, {} acked, {:.0}/s (offered {:.0}/s) over {:.0} s",
                self.up_written,
                self.up_acked,
                self.up_per_s,
                self.offered_up_per_s,
                self.duration_s
            ),
        );
        row("up lag", lags(&self.up_lag_ms));
        row(
            "down",
            format!(
                "{} written, {} applied, {:.1}/s",
                self.down_written, self.down_applied, self.down_per_s
            ),
        );
        row("down lag", lags(&self.down_lag_ms));
        row(
            "broadcasts",
            format!(
                "{} written, {} applied over the devices",
                self.broadcasts_written, self.broadcasts_applied
            ),
        );
        row("broadcast lag", lags(&self.broadcast_lag_ms));
        row(
            "commands",
            format!(
                "{} sent, {} run, {} results acked",
                self.commands_sent, self.commands_run, self.commands_done
            ),
        );
        row("command lag", lags(&self.command_lag_ms));
        row(
            "churn",
            format!(
                "{} devices ({} past retention), {} resyncs",
                self.churned, self.churned_long, self.resyncs
            ),
        );
        let opt = |v: Option<f64>, unit: &str| {
            v.map(|v| format!("{v:.1}{unit}"))
                .unwrap_or_else(|| "-".into())
        };
        row(
            "cloud",
            format!(
                "cpu {} ({} per acked push) rss start {} connected {} peak {}, {} per device",
                opt(self.cloud.cpu_pct_avg, "%"),
                opt(self.cloud.cpu_ms_per_acked_push, " ms"),
                opt(self.cloud.rss_start_mib, " MiB"),
                opt(self.cloud.rss_connected_mib, " MiB"),
                opt(self.cloud.rss_peak_mib, " MiB"),
                opt(self.cloud.rss_per_device_kib, " KiB"),
            ),
        );
        if let Some(st) = &self.storm {
            row(
                "restart storm",
                format!(
                    "{} devices: cloud back in {:.1} s, half served {} all {} ({} served), rss {} -> peak {}",
                    st.devices,
                    st.restart_s,
                    opt(st.half_served_s, " s"),
                    opt(st.all_served_s, " s"),
                    st.served,
                    opt(st.cloud_rss_before_mib, " MiB"),
                    opt(st.cloud_rss_peak_mib, " MiB"),
                ),
            );
        }
        let count = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        row(
            "cloud counts",
            format!(
                "push_changes_applied {} (devices' push timeouts {}, copies covered {}, \
                 answered again {}), devices' changes_applied {}, {} store jobs in {} commits",
                count(self.cloud_counts.push_changes_applied),
                self.push_timeouts,
                count(self.cloud_counts.push_changes_covered),
                count(self.cloud_counts.push_changes_reanswered),
                count(self.cloud_counts.device_changes_applied),
                count(self.cloud_counts.store_jobs_committed),
                count(self.cloud_counts.store_commits)
            ),
        );
        row(
            "simulator",
            format!(
                "cpu {} ({} per write) rss peak {}",
                opt(self.sim.cpu_pct_avg, "%"),
                opt(self.sim.cpu_ms_per_write, " ms"),
                opt(self.sim.rss_peak_mib, " MiB")
            ),
        );
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        row("errors", errors);
        let m = &self.missing;
        row(
            "missing",
            if self.complete() {
                format!("none (drained in {:.1} s)", self.drain_s)
            } else {
                format!(
                    "up {} down {} broadcasts {} commands {} outbox {} duplicates {}",
                    m.up, m.down, m.broadcasts, m.commands, m.outbox, self.duplicates
                )
            },
        );
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}

fn lags(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {} p90 {} p99 {} max {} ({} samples)",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.max),
        p.count
    )
}
