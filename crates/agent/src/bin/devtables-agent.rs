//! `devtables-agent`: the device agent alone, for devices. It runs what `devtables agent` runs
//! (`devtables_agent::standalone`) from the same configuration file, but links neither the cloud
//! nor the embedded broker nor SQLite, so it is a fraction of the `devtables` binary's size
//! (docs/benchmarks.md, "Device-only agent").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use devtables_agent::config::AgentFile;
use devtables_agent::standalone::{self, StandaloneError, StandaloneOptions};

#[derive(Parser)]
#[command(
    name = "devtables-agent",
    version,
    about = "The devtables device agent: the device database synced with the cloud over MQTT"
)]
struct Cli {
    /// The configuration file (JSON5).
    #[arg(long)]
    config: PathBuf,
    /// Read operations on the device database as JSON lines from standard input
    /// (`{"op":"create","model":"Fault","item":{...}}`; ops: create, update, upsert, remove, get,
    /// find, batch, status; an "id" is echoed) and answer each with one JSON line on standard
    /// output. End of input stops
    /// the agent once the cloud has every change (see --stdin-drain-secs).
    #[arg(long)]
    stdin: bool,
    /// With --stdin: how long the end of input waits for the cloud to acknowledge every queued
    /// change before the agent stops (default: the file's `stdin_drain_secs`, else 10). What is
    /// still queued then goes at the next start.
    #[arg(long, value_name = "SECS")]
    stdin_drain_secs: Option<u64>,
    /// The local API's Unix socket, instead of the file's `local_api.socket` (default: the
    /// database file with the extension `.sock`).
    #[arg(long, value_name = "PATH")]
    local_api_socket: Option<PathBuf>,
    /// Also serve the local API on this loopback address, e.g. 127.0.0.1:7070 (the file's
    /// `local_api.tcp`; default: no TCP).
    #[arg(long, value_name = "ADDR")]
    local_api_tcp: Option<String>,
    /// Serve no local API (the file's `local_api: {enabled: false}`).
    #[arg(long, conflicts_with_all = ["local_api_socket", "local_api_tcp"])]
    no_local_api: bool,
}

fn main() -> ExitCode {
    standalone::init_logging();
    let cli = Cli::parse();
    let run = || -> Result<(), StandaloneError> {
        let (mut file, config) = AgentFile::load(&cli.config)?;
        file.override_local_api(cli.local_api_socket, cli.local_api_tcp, cli.no_local_api);
        let options = StandaloneOptions {
            config: cli.config.clone(),
            stdin: cli.stdin,
            stdin_drain: cli.stdin_drain_secs.map(std::time::Duration::from_secs),
        };
        standalone::run_loaded(&options, &file, config)
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
