//! `scale-out`'s up-sync figure for one variant: the fleet simulator (`devtables_fleet::run`,
//! against the running deployment) with devices writing up faster than the cloud answers, and
//! around its write phase the nodes' counters and the CPU of every process that did the work.
//!
//! The simulator reports the acknowledged rate and the up lag itself. At the first progress
//! tick of its write phase (up to a second late) and at the end of a window inside the writes
//! (the drain's first tick, or a second before the writes end), this reads every node's `GET /v1/status` (device messages handled, pushed changes applied) and
//! `/proc` (the nodes, PostgreSQL's processes, Mosquitto); the differences give messages per
//! second, items per message and each one's CPU over the writes.

use std::time::Duration;

use anyhow::Context;
use devtables_fleet::{FleetReport, Phase};
use serde::Serialize;

use super::cpu::{self, CpuReading, Group};
use super::deployment::{phase_sink, reached, Deployment};

/// The load of a run.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub devices: usize,
    pub rate: f64,
    pub duration: Duration,
    pub drain: Duration,
}

/// What one variant measured.
#[derive(Clone, Debug, Serialize)]
pub struct UpSyncFigure {
    pub variant: String,
    pub nodes: usize,
    pub devices: usize,
    pub rate_per_device: f64,
    pub offered_up_per_s: f64,
    /// Up writes acknowledged per second during the write phase (the simulator's figure).
    pub up_per_s: f64,
    pub up_lag_p50_ms: f64,
    pub up_lag_p99_ms: f64,
    pub up_lag_max_ms: f64,
    pub up_written: u64,
    pub up_acked: u64,
    /// Writes not acknowledged when the drain ended (0 on a complete run).
    pub unacknowledged: u64,
    /// Whether the simulator accounted for every write, with no duplicate.
    pub complete: bool,
    /// Device messages the nodes handled per second during the writes (summed over nodes;
    /// a node counts only the messages of the devices it serves).
    pub messages_per_s: Option<f64>,
    /// Pushed changes applied per handled device message during the writes.
    pub items_per_message: Option<f64>,
    /// CPU during the writes, in percent of one core: the cloud nodes together, PostgreSQL's
    /// processes, Mosquitto, the simulator.
    pub cloud_cpu_pct: Option<f64>,
    pub postgres_cpu_pct: Option<f64>,
    pub broker_cpu_pct: Option<f64>,
    pub sim_cpu_pct: Option<f64>,
    /// Errors and refusals the simulator counted, by kind.
    pub errors: std::collections::BTreeMap<String, u64>,
}

/// The readings at one moment: per node (messages handled, changes applied), and CPU.
struct Snapshot {
    messages: u64,
    applied: u64,
    cpu: Vec<(&'static str, CpuReading)>,
}

async fn snapshot(d: &Deployment, groups: &[(&'static str, Group)]) -> anyhow::Result<Snapshot> {
    let cpu = groups.iter().map(|(k, g)| (*k, cpu::read(g))).collect();
    let messages = d.counters("messages_in").await?.iter().sum();
    let applied = d.counters("push_changes_applied").await?.iter().sum();
    Ok(Snapshot {
        messages,
        applied,
        cpu,
    })
}

/// Runs the fleet against `d`; the deployment stays up (the caller stops it).
pub async fn measure(d: &Deployment, load: Load) -> anyhow::Result<(UpSyncFigure, FleetReport)> {
    let label = d.variant.label();
    let mut groups = vec![("cloud", d.cloud_group())];
    if d.variant.is_postgres() {
        groups.push(("postgres", Group::Named("postgres")));
        groups.push(("broker", Group::Named("mosquitto")));
    }
    let config = d.fleet_config(load.devices, load.rate, load.duration, load.drain);
    let (sink, mut phase) = phase_sink(label.clone());
    eprintln!(
        "== scale-out up-sync: {label}: {} devices × {}/s for {:?}",
        load.devices, load.rate, load.duration
    );
    let sim = tokio::spawn(devtables_fleet::run(config, sink));
    // The readings at the write phase's start and end; a simulation that ends early leaves
    // them out, and its own error says why.
    let mut readings = None;
    if reached(&mut phase, Phase::Writing).await {
        let start = snapshot(d, &groups).await?;
        // The first tick of the writes comes up to a second after they started, and a short
        // run may end before a tick shows the drain: the window ends at the drain's tick or
        // a second before the writes' end, whichever is first, so it lies within the writes.
        let window = load
            .duration
            .saturating_sub(Duration::from_secs(1))
            .max(load.duration / 2);
        let ended = tokio::select! {
            reached = reached(&mut phase, Phase::Draining) => reached,
            _ = tokio::time::sleep(window) => true,
        };
        if ended {
            readings = Some((start, snapshot(d, &groups).await?));
        }
    }
    let report = sim
        .await
        .context("the simulation task failed")?
        .with_context(|| format!("the simulation against {label}"))?;

    let mut figure = UpSyncFigure {
        variant: label,
        nodes: d.nodes.len(),
        devices: report.devices,
        rate_per_device: report.rate_per_device,
        offered_up_per_s: report.offered_up_per_s,
        up_per_s: report.up_per_s,
        up_lag_p50_ms: report.up_lag_ms.p50,
        up_lag_p99_ms: report.up_lag_ms.p99,
        up_lag_max_ms: report.up_lag_ms.max,
        up_written: report.up_written,
        up_acked: report.up_acked,
        unacknowledged: report.missing.up,
        complete: report.complete(),
        messages_per_s: None,
        items_per_message: None,
        cloud_cpu_pct: None,
        postgres_cpu_pct: None,
        broker_cpu_pct: None,
        sim_cpu_pct: report.sim.cpu_pct_avg,
        errors: report.errors.clone(),
    };
    if let Some((a, b)) = readings {
        let seconds = b
            .cpu
            .first()
            .zip(a.cpu.first())
            .map(|((_, rb), (_, ra))| rb.seconds_since(ra))
            .unwrap_or(0.0);
        let messages = b.messages.saturating_sub(a.messages);
        let applied = b.applied.saturating_sub(a.applied);
        if seconds > 0.0 {
            figure.messages_per_s = Some(messages as f64 / seconds);
        }
        if messages > 0 {
            figure.items_per_message = Some(applied as f64 / messages as f64);
        }
        for ((kind, before), (_, after)) in a.cpu.iter().zip(&b.cpu) {
            let pct = cpu::percent(before, after);
            match *kind {
                "cloud" => figure.cloud_cpu_pct = pct,
                "postgres" => figure.postgres_cpu_pct = pct,
                _ => figure.broker_cpu_pct = pct,
            }
        }
    }
    Ok((figure, report))
}
