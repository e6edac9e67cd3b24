//! `devtables sim`: the fleet simulator (`devtables_fleet`) from the command line.
//!
//! Flags map one to one onto `FleetConfig`; with no `--url` it starts its own cloud (this same
//! binary, `devtables cloud`, as a child process). A status line every second on stderr, a
//! table on stdout at the end, the report as JSON in `--json`; the exit code is non-zero when
//! any write is still unaccounted for after the drain.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use devtables_fleet::{DbMode, FleetConfig, Progress, Target};

use crate::demo_cmd::parse_duration;

/// The log filter of `devtables sim` when `DEVTABLES_LOG` is not set: thousands of agents in
/// one process would each warn of their clear-text connection and of every lost connection,
/// which the report counts instead.
pub const DEFAULT_LOG: &str = "warn,devtables_agent=error,rumqttc=error";

#[derive(Args)]
pub struct SimArgs {
    /// Devices to simulate (each a real agent with its own database and MQTT connection).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Up writes per device per second (fractions allowed: 0.1 is one every 10 s).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Length of the write phase, after every device connected (`30s`, `2m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Devices connected per second while ramping up.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Device registrations per second (`POST /v1/devices`).
    #[arg(long, default_value_t = 1000.0)]
    register_rate: f64,
    /// Down writes per second over the fleet (a `Setting` of a random connected device).
    #[arg(long, default_value_t = 10.0)]
    down_rate: f64,
    /// A broadcast (`Firmware` item to every device) this often; `0s`: none.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    broadcast_every: Duration,
    /// Commands per second over the fleet (`Command` items; each device answers).
    #[arg(long, default_value_t = 2.0)]
    command_rate: f64,
    /// Fraction of the devices that go offline once and come back.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Fraction of the churned devices away past the cloud's retention (they resync).
    #[arg(long, default_value_t = 0.2)]
    churn_long: f64,
    /// Mean pause of the other churned devices.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    churn_pause: Duration,
    /// The cloud's tombstone retention (set on a spawned cloud; for --url, what it runs with).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    retention: Duration,
    /// How often the cloud purges (as --retention; whole seconds for a spawned cloud).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    purge_interval: Duration,
    /// Where each device's database lives.
    #[arg(long, value_enum, default_value_t = DbArg::Memory)]
    db: DbArg,
    /// Longest wait for every device to connect.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Longest wait after the writes for every write to be accounted for.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// The devices' account (an admin key of it is needed with --url).
    #[arg(long, default_value = "sim")]
    account: String,
    /// Seed of the workload's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Most API requests in flight.
    #[arg(long, default_value_t = 32)]
    api_concurrency: usize,
    /// More keys for the started cloud's configuration file (JSON5, e.g.
    /// `"store_group_max: 1,"`).
    #[arg(long, default_value = "", conflicts_with = "url")]
    cloud_config: String,
    /// Move the spawned cloud into this control group (made and limited beforehand, e.g. a
    /// cgroup v1 folder under /sys/fs/cgroup/cpu with `cpu.cfs_quota_us` set), so that the
    /// cloud, not the simulator, is the bottleneck.
    #[arg(long, conflicts_with = "url")]
    cloud_cgroup: Option<std::path::PathBuf>,
    /// Restart the started cloud this long into the writes (a reconnect storm: every device
    /// comes back at once); the report times it.
    #[arg(long, value_parser = parse_duration, conflicts_with = "url")]
    restart_cloud_after: Option<Duration>,
    /// A running cloud's API, `http://HOST:PORT`. Without it a cloud is started (--spawn-cloud).
    #[arg(long, requires = "mqtt", conflicts_with = "spawn_cloud")]
    url: Option<String>,
    /// An admin key of --account on that cloud (or the DEVTABLES_ADMIN_KEY variable, which
    /// other users cannot read from the process list).
    #[arg(long)]
    admin_key: Option<String>,
    /// That cloud's broker, `HOST:PORT`.
    #[arg(long)]
    mqtt: Option<String>,
    /// That cloud's process id, to read its CPU and memory from /proc.
    #[arg(long)]
    cloud_pid: Option<u32>,
    /// Start `devtables cloud` as a child process on free ports in a temporary folder (the
    /// default without --url) and stop it at the end.
    #[arg(long)]
    spawn_cloud: bool,
    /// DEVTABLES_LOG of the spawned cloud (its log goes to cloud.log in its folder).
    #[arg(long, default_value = "warn")]
    cloud_log: String,
    /// Keep the spawned cloud's folder (data and cloud.log) after the run.
    #[arg(long)]
    keep_cloud_dir: bool,
    /// Where to write the report as JSON.
    #[arg(long, default_value = "fleet.json")]
    json: PathBuf,
    /// Threads of the simulator's runtime (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DbArg {
    Memory,
    Disk,
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let descriptors = args.devices * if matches!(args.db, DbArg::Disk) { 2 } else { 1 } + 100;
    crate::limits::raise_open_files(&format!(
        "{} devices need about {descriptors}",
        args.devices
    ));
    let target = match args.url {
        Some(url) => Target::Running {
            url,
            admin_key: args
                .admin_key
                .or_else(|| std::env::var("DEVTABLES_ADMIN_KEY").ok())
                .context("--url needs --admin-key (or DEVTABLES_ADMIN_KEY)")?,
            mqtt: args.mqtt.context("--url needs --mqtt")?,
            cloud_pid: args.cloud_pid,
        },
        None => Target::Spawn {
            program: std::env::current_exe().context("cannot find this program's path")?,
            log: args.cloud_log,
            keep_dir: args.keep_cloud_dir,
            extra_config: args.cloud_config.clone(),
            cgroup: args.cloud_cgroup.clone(),
        },
    };
    let mut config = FleetConfig::new(target);
    config.devices = args.devices;
    config.rate_per_device = args.rate;
    config.duration = args.duration;
    config.connect_rate = args.connect_rate;
    config.register_rate = args.register_rate;
    config.down_rate = args.down_rate;
    config.broadcast_every = (!args.broadcast_every.is_zero()).then_some(args.broadcast_every);
    config.command_rate = args.command_rate;
    config.churn = args.churn;
    config.churn_long = args.churn_long;
    config.churn_pause = args.churn_pause;
    config.retention = args.retention;
    config.purge_interval = args.purge_interval;
    config.db = match args.db {
        DbArg::Memory => DbMode::Memory,
        DbArg::Disk => DbMode::Disk,
    };
    config.connect_timeout = args.connect_timeout;
    config.drain_timeout = args.drain_timeout;
    config.account = args.account;
    config.seed = args.seed;
    config.api_concurrency = args.api_concurrency;
    config.restart_cloud_after = args.restart_cloud_after;
    config.validate()?;

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime
        .enable_all()
        // Database writes run on the blocking pool: bounded, so ten thousand devices writing at
        // once queue for a few threads instead of starting hundreds.
        .max_blocking_threads(64);
    if let Some(n) = args.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = runtime.build().context("cannot start the async runtime")?;
    let tty = std::io::stderr().is_terminal();
    let sink: devtables_fleet::ProgressSink = Arc::new(move |p: &Progress| {
        let line = p.status_line();
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    });
    let report = runtime.block_on(devtables_fleet::run(config, sink))?;
    if tty {
        eprintln!();
    }
    print!("{}", report.table());
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&args.json, json)
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    eprintln!("report written to {}", args.json.display());
    if !report.complete() {
        anyhow::bail!(
            "{} writes unaccounted for after the drain ({} duplicates); see \"missing\" in {}",
            report.missing.total(),
            report.duplicates,
            args.json.display()
        );
    }
    Ok(())
}
