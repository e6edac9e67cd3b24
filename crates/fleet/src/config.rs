//! What to simulate, and against which cloud. Every knob has a default that runs on a fresh
//! machine in seconds; `devtables sim --help` shows the same ones as flags.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::FleetError;

/// The example schema (`examples/schema.json5`), the cloud's default: the workload writes its
/// models (`Reading` up, `Setting` down, `Firmware` broadcast, `Command` both ways), so the
/// target cloud must run it.
pub const SCHEMA: &str = include_str!("../../../examples/schema.json5");

/// The cloud the fleet talks to.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Target {
    /// A cloud that runs already (embedded or external broker, any store).
    Running {
        /// `http://HOST:PORT` of its HTTP API.
        url: String,
        /// An admin key of [`FleetConfig::account`] (registers the devices, writes down).
        #[serde(skip)]
        admin_key: String,
        /// `HOST:PORT` of the broker the devices connect to.
        mqtt: String,
        /// The cloud's process, when it runs on this machine: its CPU and RSS are then read
        /// from `/proc`.
        cloud_pid: Option<u32>,
    },
    /// Start `PROGRAM cloud` as a child process on embedded defaults (SQLite, embedded broker)
    /// with free ports and its data in a temporary folder, create its admin key with
    /// `PROGRAM keys create`, and stop it at the end.
    Spawn {
        /// The `devtables` binary.
        program: PathBuf,
        /// `DEVTABLES_LOG` of the child (its log goes to `cloud.log` in its folder).
        log: String,
        /// Keep the child's folder (data and log) instead of deleting it at the end.
        keep_dir: bool,
        /// More keys of the child's configuration file (JSON5, e.g. `store_group_max: 1,`),
        /// after the simulator's own.
        extra_config: String,
        /// A control group folder (cgroup v1 or v2, made and limited beforehand, e.g. with
        /// `cpu.cfs_quota_us` or `cpu.max`) the child is moved into when it starts, so that
        /// the cloud, not the simulator beside it, is the fleet's bottleneck.
        cgroup: Option<PathBuf>,
    },
}

/// Where each device's database lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DbMode {
    /// In memory ([`devtables_db::Db::open_in_memory`]): no file, no fsync; what ten thousand
    /// devices in one process can afford.
    Memory,
    /// A file per device in a temporary folder, durable writes as on a device: one open file
    /// per device (with its socket, two descriptors per device).
    Disk,
}

/// A simulation.
#[derive(Clone, Debug, Serialize)]
pub struct FleetConfig {
    pub target: Target,
    /// Devices to simulate.
    pub devices: usize,
    /// Up writes (`Reading` items) per device per second; fractional rates are fine. Each
    /// device starts at a random point of its period, so devices do not write in step.
    pub rate_per_device: f64,
    /// Length of the write phase (after every device connected).
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Devices started per second while ramping up.
    pub connect_rate: f64,
    /// Registrations per second (`POST /v1/devices`).
    pub register_rate: f64,
    /// Down writes per second over the fleet: a new `Setting` item of a random connected
    /// device, through the API. 0: none.
    pub down_rate: f64,
    /// A broadcast (`Firmware` item, delivered to every device) this often. `None`: none.
    #[serde(serialize_with = "opt_secs")]
    pub broadcast_every: Option<Duration>,
    /// Commands per second over the fleet (`Command` items to random connected devices; each
    /// device's handler answers, and the answer syncs up). 0: none.
    pub command_rate: f64,
    /// Fraction of the devices that go offline once during the write phase (their agent
    /// stops: a power cut, no writes meanwhile) and come back after a pause.
    pub churn: f64,
    /// Fraction of the churned devices whose pause outlasts the cloud's retention: a delete
    /// made for them meanwhile is purged, so they come back to a full resync.
    pub churn_long: f64,
    /// Mean pause of the other churned devices (uniform between half and one and a half).
    #[serde(serialize_with = "secs")]
    pub churn_pause: Duration,
    /// The cloud's tombstone retention (set on a spawned cloud; for a running one, say what
    /// it runs with, or no long pause will outlast it).
    #[serde(serialize_with = "secs")]
    pub retention: Duration,
    /// How often the cloud purges (as for `retention`; whole seconds for a spawned cloud).
    #[serde(serialize_with = "secs")]
    pub purge_interval: Duration,
    pub db: DbMode,
    /// Longest wait for every device to connect before the writes start anyway.
    #[serde(serialize_with = "secs")]
    pub connect_timeout: Duration,
    /// Longest wait, after the write phase, for every write to be accounted for.
    #[serde(serialize_with = "secs")]
    pub drain_timeout: Duration,
    /// The account of the devices (the admin key's).
    pub account: String,
    /// Seed of the workload's choices (jitter, devices picked, churn plan).
    pub seed: u64,
    /// Most API requests in flight at once.
    pub api_concurrency: usize,
    /// Restart the cloud this long into the write phase (a reconnect storm: every device
    /// loses its connection at once and comes back to the restarted cloud on the same ports
    /// and data). Only with [`Target::Spawn`]. `None`: no restart.
    #[serde(serialize_with = "opt_secs")]
    pub restart_cloud_after: Option<Duration>,
}

impl FleetConfig {
    /// Defaults against `target`: 100 devices writing once a second for 10 s, a down write and
    /// a command every 100 ms, a broadcast every 5 s, no churn.
    pub fn new(target: Target) -> FleetConfig {
        FleetConfig {
            target,
            devices: 100,
            rate_per_device: 1.0,
            duration: Duration::from_secs(10),
            connect_rate: 500.0,
            register_rate: 1000.0,
            down_rate: 10.0,
            broadcast_every: Some(Duration::from_secs(5)),
            command_rate: 2.0,
            churn: 0.0,
            churn_long: 0.2,
            churn_pause: Duration::from_secs(2),
            retention: Duration::from_secs(3),
            purge_interval: Duration::from_secs(1),
            db: DbMode::Memory,
            connect_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(60),
            account: "sim".into(),
            seed: 1,
            api_concurrency: 32,
            restart_cloud_after: None,
        }
    }

    /// Up writes per second the fleet offers.
    pub fn offered_up_per_s(&self) -> f64 {
        self.devices as f64 * self.rate_per_device
    }

    /// How long a churned device stays away when its pause must outlast retention: the
    /// retention, two purge runs, and a margin.
    pub fn long_pause(&self) -> Duration {
        self.retention + self.purge_interval * 2 + Duration::from_millis(500)
    }

    pub fn validate(&self) -> Result<(), FleetError> {
        let bad = |m: String| Err(FleetError::Config(m));
        if self.devices == 0 {
            return bad("devices must be at least 1".into());
        }
        for (name, v) in [
            ("rate", self.rate_per_device),
            ("connect-rate", self.connect_rate),
            ("register-rate", self.register_rate),
            ("down-rate", self.down_rate),
            ("command-rate", self.command_rate),
        ] {
            if !v.is_finite() || v < 0.0 {
                return bad(format!("{name} must be a rate of 0 or more, not {v}"));
            }
        }
        if self.connect_rate == 0.0 || self.register_rate == 0.0 {
            return bad("connect-rate and register-rate must be above 0".into());
        }
        for (name, v) in [("churn", self.churn), ("churn-long", self.churn_long)] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} is a fraction between 0 and 1, not {v}"));
            }
        }
        if self.api_concurrency == 0 {
            return bad("api-concurrency must be at least 1".into());
        }
        if self.broadcast_every.is_some_and(|d| d.is_zero()) {
            return bad("broadcast-every must be above 0".into());
        }
        if self.account.is_empty() {
            return bad("account must not be empty".into());
        }
        if let Some(after) = self.restart_cloud_after {
            if !matches!(self.target, Target::Spawn { .. }) {
                return bad(
                    "restart-cloud-after needs a cloud the simulator starts (not --url)".into(),
                );
            }
            if after >= self.duration {
                return bad(format!(
                    "restart-cloud-after ({after:?}) must fall inside the write phase ({:?})",
                    self.duration
                ));
            }
        }
        Ok(())
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}
