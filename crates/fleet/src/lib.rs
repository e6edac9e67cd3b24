//! The fleet simulator behind `devtables sim` and `devtables bench fleet`: thousands of devices
//! in one process against one cloud, measured.
//!
//! Every simulated device is a real [`devtables_agent::Agent`]: its own engine, its own small
//! database (in memory, or a file in a temporary folder) and its own MQTT connection over TCP,
//! all on the caller's tokio runtime. The databases share one background thread
//! ([`devtables_db::Background::Shared`]), so ten thousand devices cost ten thousand sockets,
//! not ten thousand threads or files. The cloud is a running one (any broker, any store) or a
//! `devtables cloud` child process started on free ports in a temporary folder.
//!
//! The workload: registration through the HTTP API, a paced ramp of connections, up writes at
//! a rate per device (jittered), down writes, broadcasts and commands through the API, and
//! churn (devices that stop and start again, some after the cloud's retention, which makes
//! them resync). Then a drain phase waits until every write is accounted for. The report
//! ([`FleetReport`]) holds exact latency percentiles (HDR histograms), rates, errors by kind,
//! the cloud's CPU and memory read from `/proc`, and what is still missing.
//!
//! # Layout
//! - [`config`]: what to simulate and against which cloud ([`FleetConfig`], [`Target`]).
//! - `api`: the HTTP API client (keep-alive connections, `Retry-After` honoured).
//! - `spawn`: the `devtables cloud` child process of [`Target::Spawn`].
//! - [`procfs`]: CPU and RSS of a process from `/proc`, and the open-files limit.
//! - `device`: one simulated device: its database, its agent across restarts, what it still
//!   owes (writes not acknowledged, down writes not applied).
//! - `stats`: latency histograms and counters shared by the devices.
//! - [`report`]: the progress ticks, the final report, its table.
//! - `run`: the phases (setup, registration, ramp, writes, drain, shutdown).

pub mod config;
pub mod procfs;
pub mod report;

mod api;
mod device;
mod run;
mod spawn;
mod stats;

pub use config::{DbMode, FleetConfig, Target};
pub use report::{FleetReport, Phase, Progress, ProgressSink};
pub use run::run;
pub use spawn::{cloud_addresses, copy_cloud_log};

/// Why a simulation could not run (a run that ends with writes missing is not an error: its
/// report says what is missing).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid simulation settings: {0}")]
    Config(String),
    #[error("cannot start the cloud: {0}")]
    Spawn(String),
    #[error("the cloud at {url} is not ready: {reason}")]
    NotReady { url: String, reason: String },
    #[error("the cloud's API refused {what}: {reason}")]
    Api { what: String, reason: String },
    #[error("cannot open the database of device {device}: {source}")]
    Db {
        device: String,
        #[source]
        source: Box<devtables_db::OpenError>,
    },
    #[error("cannot start the agent of device {device}: {source}")]
    Agent {
        device: String,
        #[source]
        source: Box<devtables_agent::AgentError>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
