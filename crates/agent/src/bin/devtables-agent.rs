//! `devtables-agent`: the device agent alone, for devices. It runs what `devtables agent` runs
//! (`devtables_agent::standalone`) from the same configuration file, but links neither the cloud
//! nor the embedded broker nor SQLite, so it is a fraction of the `devtables` binary's size
//! (docs/benchmarks.md, "Device-only agent").

use std::process::ExitCode;

use clap::Parser;
use devtables_agent::standalone::{self, AgentArgs};

#[derive(Parser)]
#[command(
    name = "devtables-agent",
    version,
    about = "The devtables device agent: the device database synced with the cloud over MQTT"
)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

fn main() -> ExitCode {
    standalone::init_logging();
    let cli = Cli::parse();
    match cli.args.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
