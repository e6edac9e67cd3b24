//! Benchmarks of devtables: one entry point, [`run`], for `devtables bench` (crates/cli) and the
//! thin `devtables-bench` binary.
//!
//! Every benchmark prints a Markdown table (the form pasted into docs/benchmarks.md), writes its
//! figures as JSON with `--json PATH`, and has a `--quick` variant (tiny sizes, seconds) that CI
//! runs so the benchmarks never rot; no timing is ever asserted. Where a benchmark has a ceiling
//! (what the layer under devtables does alone on the same work), it is measured in the same run
//! and reported with the ratio.
//!
//! # Layout
//!
//! - `db`: the device database against SQLite on the original's workload (`workload`, `dt`,
//!   `sq`), with the raw log-store insert rate of the same bytes as its ceiling (`store_raw`).
//! - `sync`: replication latency and throughput end to end on loopback, with the raw MQTT QoS 1
//!   publish rate of the same payloads through the same embedded broker as its ceiling
//!   (`mqtt_raw`).
//! - `catch_up`: a device offline while changes accumulate for it, then its time and peak memory
//!   to hold them all, measured in its own process.
//! - `wire`: bytes per synced item in JSON against compact encodings.
//! - `memory`: the agent's resident memory with changes pending.
//! - `footprint`: the device-only agent binary's size and memory.
//! - `fleet`: the fleet simulator (`devtables-fleet`) swept over device counts and rates, each
//!   point against a fresh `devtables cloud` process.
//! - `scale_out`: a scaled-out cloud (PostgreSQL, Mosquitto, several `devtables cloud` nodes)
//!   against one node on SQLite: up-sync items/s of the same fleet workload with the raw insert
//!   rate of each store and the raw MQTT rate of each broker as ceilings, the takeover after a
//!   node is killed, and a broadcast to 1,000 and 10,000 devices.
//! - `plot`: PNGs from the JSON the others write (latency distributions, the fleet curve).
//! - `report`: number formatting, percentiles and the JSON file writer they share; `sys`: what
//!   /proc says about the process and the machine.
//!
//! Measurements that must be a process's own (peak RSS) run in a child: the running binary
//! re-executed with a hidden subcommand, through [`ChildCommand`].
//!
//! Errors: inside, the benchmarks use `anyhow` (a harness, not an API: every failure ends the
//! run with its message); [`run`] returns a typed [`BenchError`] naming the benchmark that
//! failed.

// `DbError` is what `Db::write` closures return (large, not ours to change); `is_multiple_of`
// is newer than the workspace's rust-version.
#![allow(clippy::result_large_err, clippy::manual_is_multiple_of)]

mod catch_up;
mod db;
mod dt;
mod fleet;
mod footprint;
mod memory;
mod mqtt_raw;
mod plot;
mod report;
mod scale_out;
mod spike;
mod sq;
mod store_raw;
mod sync;
mod sys;
mod wire;
mod workload;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;
use clap::Subcommand;

/// The benchmarks, as `devtables bench <cmd>` and `devtables-bench <cmd>` take them.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Device database: devtables against SQLite on the original's workload, with the raw
    /// log-store insert rate of the same bytes as the ceiling of its grouped creates.
    Db(db::DbArgs),
    /// Replication end to end on loopback: latency up and down, throughput, bytes per item, with
    /// the raw MQTT QoS 1 rate of the same payloads through the same broker as the ceiling.
    Sync(sync::SyncArgs),
    /// A device offline while N changes accumulate for it in the cloud, then connecting: time
    /// until it holds them all, its peak RSS against its idle RSS (its own process).
    CatchUp(catch_up::CatchUpArgs),
    /// Bytes per synced item: the wire's JSON against CBOR, MessagePack and JSON + DEFLATE.
    Wire(wire::WireArgs),
    /// The device-only agent binary: its size, and its RSS idle and after syncing items.
    Footprint(footprint::FootprintArgs),
    /// The agent's resident memory with 0, 10k, 100k changes pending (no broker reachable).
    Memory(memory::MemoryArgs),
    /// The fleet simulator swept over device counts and rates, each point against a fresh
    /// `devtables cloud` in its own process: up lag, throughput, the cloud's CPU and memory.
    Fleet(fleet::FleetArgs),
    /// A scaled-out cloud against the real PostgreSQL and Mosquitto: up-sync items/s on SQLite,
    /// PostgreSQL with one node and with three (ceilings: raw store inserts, raw MQTT), the
    /// takeover after a node is killed, and broadcasts to 1,000 and 10,000 devices.
    ScaleOut(scale_out::ScaleOutArgs),
    /// PNG plots from the JSON files the benchmarks write: latency distributions of `sync`, and
    /// the fleet curve (devices against up p99 lag and cloud RSS) from fleet reports.
    Plot(plot::PlotArgs),
    /// One configuration of `db`, in a fresh process; prints its metrics as JSON.
    #[command(hide = true)]
    Child(db::ChildArgs),
    /// One agent measurement of `memory`, in a fresh process; prints JSON.
    #[command(hide = true)]
    MemoryProbe(memory::ProbeArgs),
    /// The device of `catch-up`, in a fresh process; prints JSON.
    #[command(hide = true)]
    CatchUpProbe(catch_up::ProbeArgs),
    /// The standalone agent in `--stdin` mode (what `footprint` runs when no agent binary is
    /// given).
    #[command(hide = true)]
    AgentProcess(footprint::AgentProcessArgs),
}

impl BenchCmd {
    /// The name the command line uses, for messages.
    fn name(&self) -> &'static str {
        match self {
            BenchCmd::Db(_) => "db",
            BenchCmd::Sync(_) => "sync",
            BenchCmd::CatchUp(_) => "catch-up",
            BenchCmd::Wire(_) => "wire",
            BenchCmd::Footprint(_) => "footprint",
            BenchCmd::Memory(_) => "memory",
            BenchCmd::Fleet(_) => "fleet",
            BenchCmd::ScaleOut(_) => "scale-out",
            BenchCmd::Plot(_) => "plot",
            BenchCmd::Child(_) => "child",
            BenchCmd::MemoryProbe(_) => "memory-probe",
            BenchCmd::CatchUpProbe(_) => "catch-up-probe",
            BenchCmd::AgentProcess(_) => "agent-process",
        }
    }
}

/// How a benchmark starts a part of itself in a fresh process: the running program and the
/// arguments that lead to the benchmark commands (`bench` for `devtables`, none for
/// `devtables-bench`), followed by a hidden subcommand.
#[derive(Clone, Debug)]
pub struct ChildCommand {
    program: PathBuf,
    leading_args: Vec<OsString>,
}

impl ChildCommand {
    /// `program leading_args... <subcommand> ...`.
    pub fn new(program: impl Into<PathBuf>, leading_args: &[&str]) -> ChildCommand {
        ChildCommand {
            program: program.into(),
            leading_args: leading_args.iter().map(OsString::from).collect(),
        }
    }

    /// The running executable, with `leading_args`.
    pub fn current_exe(leading_args: &[&str]) -> std::io::Result<ChildCommand> {
        Ok(ChildCommand::new(std::env::current_exe()?, leading_args))
    }

    /// A command for the hidden subcommand `sub` (its own arguments still to add).
    pub(crate) fn command(&self, sub: &str) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.leading_args).arg(sub);
        c
    }

    /// The program, for reports.
    pub(crate) fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Runs `command` (made by [`Self::command`]) to its end and reads the last line of its
    /// stdout as JSON: the figures a child reports. `what` names the child in errors.
    pub(crate) fn output_json<T: serde::de::DeserializeOwned>(
        &self,
        mut command: Command,
        what: &str,
    ) -> anyhow::Result<T> {
        let out = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        if !out.status.success() {
            anyhow::bail!("{what} failed: {}", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("{what}: output {line:?}"))
    }
}

/// A cloud configuration for `dir` with its API and embedded broker on free loopback ports.
pub(crate) fn loopback_cloud(
    dir: &std::path::Path,
) -> anyhow::Result<devtables_cloud::CloudConfig> {
    let mut config = devtables_cloud::CloudConfig::new(dir);
    config.api_listen = "127.0.0.1:0".parse()?;
    config.broker = devtables_cloud::BrokerMode::Embedded {
        listen: "127.0.0.1:0".parse()?,
    };
    Ok(config)
}

/// A benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The benchmark (or its child process) stopped with this message (the whole cause chain).
    #[error("bench {bench}: {message}")]
    Failed {
        /// The subcommand that failed.
        bench: &'static str,
        /// What went wrong, with its causes.
        message: String,
    },
}

/// Runs one benchmark command; `child` says how to start this program again for the parts that
/// run in their own process.
pub fn run(cmd: BenchCmd, child: &ChildCommand) -> Result<(), BenchError> {
    let bench = cmd.name();
    let result = match cmd {
        BenchCmd::Db(args) => db::run(&args, child),
        BenchCmd::Sync(args) => sync::run(&args),
        BenchCmd::CatchUp(args) => catch_up::run(&args, child),
        BenchCmd::Wire(args) => wire::run(&args),
        BenchCmd::Footprint(args) => footprint::run(&args, child),
        BenchCmd::Memory(args) => memory::run(&args, child),
        BenchCmd::Fleet(args) => fleet::run(&args, child),
        BenchCmd::ScaleOut(args) => scale_out::run(&args, child),
        BenchCmd::Plot(args) => plot::run(&args),
        BenchCmd::Child(args) => db::child_main(&args),
        BenchCmd::MemoryProbe(args) => memory::probe(&args),
        BenchCmd::CatchUpProbe(args) => catch_up::probe(&args),
        BenchCmd::AgentProcess(args) => footprint::agent_process(&args),
    };
    result.map_err(|e| BenchError::Failed {
        bench,
        message: format!("{e:#}"),
    })
}
