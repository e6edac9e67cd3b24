//! `devtables bench fleet`: the fleet simulator (`crates/fleet`) swept over device counts and
//! write rates, each point against a fresh `devtables cloud` started as a child process on
//! embedded defaults (SQLite, embedded broker), so the cloud's CPU and memory are its own.
//!
//! Each point writes the simulator's full report (`fleet-<devices>-<rate>.json` in `--out-dir`,
//! the fields `plot --fleet` reads); the table sums the points up: offered and acknowledged
//! writes, up lag (device write returned → the cloud's acknowledgement), the cloud's CPU and
//! peak RSS, and what was not accounted for. The points run one after the other; a point that
//! does not account for every write is reported, not fatal, so a sweep shows where it breaks
//! (with `--quick`, as in CI, it fails the run).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use devtables_fleet::{FleetConfig, FleetReport, Progress, Target};
use serde_json::json;

use crate::report::{short, thousands, write_json};
use crate::ChildCommand;

#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// Device counts of the sweep.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 5_000, 10_000])]
    devices: Vec<usize>,
    /// Up writes per device per second, for every device count.
    #[arg(long, value_delimiter = ',', default_values_t = [0.1f64, 1.0])]
    rates: Vec<f64>,
    /// Length of each point's write phase, in seconds.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Connections opened per second while a point ramps up.
    #[arg(long, default_value_t = 1000.0)]
    connect_rate: f64,
    /// Longest wait after the writes for every write to be acknowledged, in seconds.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// The `devtables` binary that runs the cloud (default: this program when it is
    /// `devtables`, else the `devtables` beside it).
    #[arg(long)]
    program: Option<PathBuf>,
    /// Where each point's report goes.
    #[arg(long, default_value = "fleet-reports")]
    out_dir: PathBuf,
    /// More keys of each point's cloud configuration (JSON5, e.g. `"store_group_max: 1,"` to
    /// commit every store job on its own, as before group commit).
    #[arg(long, default_value = "")]
    cloud_config: String,
    /// Move the cloud into this control group (made and limited beforehand, e.g. a cgroup v1
    /// folder under /sys/fs/cgroup/cpu with `cpu.cfs_quota_us` set): the cloud, not the
    /// simulator beside it, is then the bottleneck, and rates beyond its capacity show what
    /// an overloaded cloud does.
    #[arg(long)]
    cloud_cgroup: Option<PathBuf>,
    /// Restart the cloud this many seconds into each point's writes (a reconnect storm: every
    /// device comes back at once); a second table times it.
    #[arg(long)]
    restart_after_secs: Option<f64>,
    /// Tiny sizes (20 devices, 1 write/s, 3 s, a restart after 1 s), for CI.
    #[arg(long)]
    quick: bool,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The `devtables` binary: given, or this program if it is `devtables`, or its sibling.
fn cloud_program(args: &FleetArgs, child: &ChildCommand) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.program {
        return Ok(p.clone());
    }
    let this = &child.program;
    let name = this.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let program = if name == "devtables" {
        this.clone()
    } else {
        this.with_file_name("devtables")
    };
    anyhow::ensure!(
        program.is_file(),
        "no devtables binary at {} (build it, or pass --program)",
        program.display()
    );
    Ok(program)
}

pub fn run(args: &FleetArgs, child: &ChildCommand) -> anyhow::Result<()> {
    let program = cloud_program(args, child)?;
    let (devices, rates, duration) = if args.quick {
        (vec![20], vec![1.0], Duration::from_secs(3))
    } else {
        (
            args.devices.clone(),
            args.rates.clone(),
            Duration::from_secs(args.duration_secs),
        )
    };
    let most = devices.iter().copied().max().unwrap_or(0);
    match devtables_fleet::procfs::raise_open_files_limit() {
        Ok(l) => eprintln!(
            "open files: limit {} ({most} devices need about {})",
            l.after,
            most + 100
        ),
        Err(e) => eprintln!("open files: cannot raise the limit: {e}"),
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
        .context("cannot start the async runtime")?;
    let mut points = Vec::new();
    for &n in &devices {
        for &rate in &rates {
            let mut config = FleetConfig::new(Target::Spawn {
                program: program.clone(),
                log: "warn".into(),
                keep_dir: false,
                extra_config: args.cloud_config.clone(),
                cgroup: args.cloud_cgroup.clone(),
            });
            config.devices = n;
            config.rate_per_device = rate;
            config.duration = duration;
            config.connect_rate = args.connect_rate;
            config.register_rate = config.register_rate.max(args.connect_rate);
            // The curve is about the up path: no down writes, broadcasts, commands or churn.
            config.down_rate = 0.0;
            config.broadcast_every = None;
            config.command_rate = 0.0;
            config.churn = 0.0;
            config.drain_timeout = if args.quick {
                Duration::from_secs(30)
            } else {
                Duration::from_secs(args.drain_secs)
            };
            config.restart_cloud_after = if args.quick {
                Some(Duration::from_secs(1))
            } else {
                args.restart_after_secs.map(Duration::from_secs_f64)
            };
            config.validate()?;
            eprintln!("== fleet: {n} devices × {rate}/s for {duration:?}");
            let sink: devtables_fleet::ProgressSink =
                Arc::new(|p: &Progress| eprintln!("{}", p.status_line()));
            let report = runtime
                .block_on(devtables_fleet::run(config, sink))
                .with_context(|| format!("{n} devices at {rate}/s"))?;
            let path = args.out_dir.join(format!("fleet-{n}-{rate}.json"));
            std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            points.push((path, report));
        }
    }
    print!("{}", table(&points));
    if points.iter().any(|(_, r)| r.storm.is_some()) {
        print!("\n{}", storm_table(&points));
    }
    if let Some(path) = &args.json {
        let summary: Vec<_> = points
            .iter()
            .map(|(path, r)| {
                json!({
                    "report": path,
                    "devices": r.devices,
                    "rate_per_device": r.rate_per_device,
                    "offered_up_per_s": r.offered_up_per_s,
                    "up_per_s": r.up_per_s,
                    "up_written": r.up_written,
                    "up_acked": r.up_acked,
                    "up_lag_ms": r.up_lag_ms,
                    "cloud": r.cloud,
                    "missing": r.missing.total(),
                    "duplicates": r.duplicates,
                    "storm": r.storm,
                })
            })
            .collect();
        write_json(path, &json!({ "points": summary }))?;
    }
    // A sweep shows where the fleet breaks; the quick run (CI) must account for every write,
    // across its restart, and see every device back.
    if args.quick {
        if let Some((path, r)) = points
            .iter()
            .find(|(_, r)| r.storm.as_ref().is_none_or(|s| s.all_served_s.is_none()))
        {
            anyhow::bail!(
                "the cloud's restart at {} devices did not see every device back (see {})",
                r.devices,
                path.display()
            );
        }
        if let Some((path, r)) = points.iter().find(|(_, r)| !r.complete()) {
            anyhow::bail!(
                "{} writes unaccounted for and {} duplicates at {} devices (see {})",
                r.missing.total(),
                r.duplicates,
                r.devices,
                path.display()
            );
        }
    }
    Ok(())
}

/// The reconnect storms: how long until the restarted cloud served every device again.
fn storm_table(points: &[(PathBuf, FleetReport)]) -> String {
    let opt =
        |v: Option<f64>, unit: &str| v.map_or("–".into(), |v| format!("{} {unit}", short(v)));
    let mut out = String::from(
        "| devices | rate/device | back | half served | all served | served | cloud RSS before | storm peak | report |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for (path, r) in points {
        let Some(s) = &r.storm else { continue };
        out.push_str(&format!(
            "| {} | {}/s | {} s | {} | {} | {} of {} | {} | {} | {} |\n",
            thousands(r.devices as f64),
            r.rate_per_device,
            short(s.restart_s),
            opt(s.half_served_s, "s"),
            opt(s.all_served_s, "s"),
            thousands(s.served as f64),
            thousands(s.devices as f64),
            opt(s.cloud_rss_before_mib, "MiB"),
            opt(s.cloud_rss_peak_mib, "MiB"),
            file_name(path),
        ));
    }
    out
}

fn table(points: &[(PathBuf, FleetReport)]) -> String {
    let opt =
        |v: Option<f64>, unit: &str| v.map_or("–".into(), |v| format!("{} {unit}", short(v)));
    let mut out = String::from(
        "| devices | rate/device | offered/s | acked/s | up lag p50 | p99 | max | cloud CPU | cloud RSS peak | per device | not accounted for | report |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (path, r) in points {
        out.push_str(&format!(
            "| {} | {}/s | {} | {} | {} ms | {} ms | {} ms | {} | {} | {} | {} | {} |\n",
            thousands(r.devices as f64),
            r.rate_per_device,
            thousands(r.offered_up_per_s),
            thousands(r.up_per_s),
            short(r.up_lag_ms.p50),
            short(r.up_lag_ms.p99),
            short(r.up_lag_ms.max),
            opt(r.cloud.cpu_pct_avg, "%"),
            opt(r.cloud.rss_peak_mib, "MiB"),
            opt(r.cloud.rss_per_device_kib, "KiB"),
            r.missing.total() + r.duplicates,
            file_name(path),
        ));
    }
    out
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
