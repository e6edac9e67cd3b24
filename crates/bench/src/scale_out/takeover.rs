//! `scale-out`'s takeover figure: three nodes on PostgreSQL and Mosquitto serve a fleet that
//! writes (the simulator against node 1); once every device is served, the last node is killed
//! with SIGKILL, and the two survivors' `GET /v1/status` is read every 20 ms until
//!
//! - they hold every partition (`cluster_partitions_held`, summed): the lease of the dead node
//!   ran out and their lease rounds claimed its share; and
//! - they hold a session with every device (`sessions`, summed): each of the dead node's
//!   devices was welcomed again by a survivor, after its next push met a node without its
//!   session ("send hello") or the new node prompted it.
//!
//! The devices keep their MQTT connections (the broker is not what died), so the simulator's
//! up lag shows the wait of the writes the dead node left unanswered: its maximum over the run
//! is the longest a write waited for its acknowledgement across the takeover.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_fleet::{FleetReport, Phase};
use serde::Serialize;

use super::deployment::{phase_sink, reached, Deployment};
use super::nodes::PARTITIONS;
use super::up_sync::Load;

/// How often the survivors are read.
const POLL: Duration = Duration::from_millis(20);
/// Longest wait for every device to be served before the kill, and for the takeover.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// What the takeover measured.
#[derive(Clone, Debug, Serialize)]
pub struct TakeoverFigure {
    pub devices: usize,
    pub rate_per_device: f64,
    pub lease_ms: u64,
    pub partitions: u64,
    /// What the killed node held and served when it died.
    pub killed_partitions: u64,
    pub killed_sessions: u64,
    /// Seconds from the SIGKILL until the survivors held every partition (`None`: not within
    /// the limit).
    pub partitions_s: Option<f64>,
    /// Seconds from the SIGKILL until the survivors held a session with every device.
    pub sessions_s: Option<f64>,
    /// The simulator's up lag over the whole run (the takeover's wait is its tail).
    pub up_lag_p50_ms: f64,
    pub up_lag_p99_ms: f64,
    pub up_lag_max_ms: f64,
    pub up_written: u64,
    pub up_acked: u64,
    /// Writes not acknowledged when the drain ended (0 on a complete run).
    pub unacknowledged: u64,
    /// Whether the simulator accounted for every write, with no duplicate.
    pub complete: bool,
}

fn sum(v: &[u64]) -> u64 {
    v.iter().sum()
}

/// Serves a fleet on `d` (three or more nodes), kills the last node, times the takeover.
pub async fn measure(
    d: &mut Deployment,
    load: Load,
    lease_ms: u64,
) -> anyhow::Result<(TakeoverFigure, FleetReport)> {
    if d.nodes.len() < 2 {
        bail!("a takeover needs two nodes or more");
    }
    let config = d.fleet_config(load.devices, load.rate, load.duration, load.drain);
    let (sink, mut phase) = phase_sink("takeover".into());
    eprintln!(
        "== scale-out takeover: {} nodes, {} devices × {}/s, lease {lease_ms} ms",
        d.nodes.len(),
        load.devices,
        load.rate
    );
    let sim = tokio::spawn(devtables_fleet::run(config, sink));
    let timed = kill_and_time(d, load.devices as u64, &mut phase).await;
    // The simulation's own failure, if it had one, says more than the takeover's.
    let report = sim
        .await
        .context("the simulation task failed")?
        .context("the simulation of the takeover")?;
    let (killed_partitions, killed_sessions, partitions_s, sessions_s) = timed?;
    Ok((
        TakeoverFigure {
            devices: report.devices,
            rate_per_device: report.rate_per_device,
            lease_ms,
            partitions: PARTITIONS,
            killed_partitions,
            killed_sessions,
            partitions_s,
            sessions_s,
            up_lag_p50_ms: report.up_lag_ms.p50,
            up_lag_p99_ms: report.up_lag_ms.p99,
            up_lag_max_ms: report.up_lag_ms.max,
            up_written: report.up_written,
            up_acked: report.up_acked,
            unacknowledged: report.missing.up,
            complete: report.complete(),
        },
        report,
    ))
}

/// Waits until the fleet writes and every device is served, kills the last node, and polls
/// the survivors: (partitions and sessions of the killed node, seconds to all partitions,
/// seconds to all sessions).
async fn kill_and_time(
    d: &mut Deployment,
    devices: u64,
    phase: &mut tokio::sync::watch::Receiver<Phase>,
) -> anyhow::Result<(u64, u64, Option<f64>, Option<f64>)> {
    if !reached(phase, Phase::Writing).await {
        bail!("the simulation ended before its writes");
    }
    let waiting = Instant::now();
    let (held, sessions) = loop {
        let held = d.counters("cluster_partitions_held").await?;
        let sessions = d.counters("sessions").await?;
        if sum(&sessions) >= devices && sessions.last().is_some_and(|s| *s > 0) {
            break (held, sessions);
        }
        if waiting.elapsed() > WAIT_LIMIT || *phase.borrow() != Phase::Writing {
            bail!("not every device was served during the writes: sessions per node {sessions:?} of {devices} devices");
        }
        tokio::time::sleep(POLL).await;
    };
    let last = d.nodes.len() - 1;
    let (killed_partitions, killed_sessions) = (held[last], sessions[last]);
    eprintln!(
        "killing {} (SIGKILL): it holds {killed_partitions} partitions and {killed_sessions} sessions",
        d.nodes[last].name
    );
    d.nodes[last].kill().await?;
    let killed_at = Instant::now();
    let survivors = &d.nodes[..last];
    let (mut partitions_s, mut sessions_s) = (None, None);
    while killed_at.elapsed() < WAIT_LIMIT && (partitions_s.is_none() || sessions_s.is_none()) {
        let mut held = 0;
        let mut served = 0;
        for node in survivors {
            let status = node.status(&d.key).await?;
            held += super::http::counter(&status, "cluster_partitions_held");
            served += super::http::counter(&status, "sessions");
        }
        let t = killed_at.elapsed().as_secs_f64();
        if partitions_s.is_none() && held == PARTITIONS {
            partitions_s = Some(t);
            eprintln!("the survivors hold every partition after {t:.2} s");
        }
        if sessions_s.is_none() && served >= devices {
            sessions_s = Some(t);
            eprintln!("the survivors serve every device after {t:.2} s");
        }
        tokio::time::sleep(POLL).await;
    }
    // The dead node is out of the deployment (its SIGTERM at the end would find nothing).
    d.nodes.remove(last).stop().await;
    Ok((killed_partitions, killed_sessions, partitions_s, sessions_s))
}
