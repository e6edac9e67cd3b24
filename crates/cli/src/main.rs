//! The `devtables` command. It only parses arguments and calls into the library crates; every
//! decision lives there.

#[cfg(feature = "bench")]
mod bench_cmd;
mod broker_config_cmd;
mod db_cmd;
mod demo_cmd;
mod devices_cmd;
mod keys_cmd;
mod limits;
mod schema_cmd;
mod serve_cmd;
mod sim_cmd;
mod store_target;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "devtables",
    version,
    about = "Device databases synced with one cloud database over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with a device database file: get, find, create, update, upsert, remove, export, import.
    Db(db_cmd::DbArgs),
    /// Check a OneTable schema file as devtables loads it (models, replication, indexes, keys
    /// kept but ignored), or show one model's fields.
    Schema(schema_cmd::SchemaArgs),
    /// Run the whole system on embedded defaults: the cloud (SQLite, embedded broker, HTTP API)
    /// and a few devices, with a live status line.
    Demo(demo_cmd::DemoArgs),
    /// Run a device agent (database + replication) from a configuration file.
    Agent(serve_cmd::AgentArgs),
    /// Run the cloud service (store, broker, sync, HTTP API) from a configuration file.
    Cloud(serve_cmd::CloudArgs),
    /// Create, list and revoke the cloud HTTP API's keys in a cloud's data folder.
    Keys(keys_cmd::KeysArgs),
    /// Act on the device registry in a cloud's data folder (revoke a device).
    Devices(devices_cmd::DevicesArgs),
    /// Simulate a fleet of devices (real agents, one process) against a cloud and measure lag,
    /// throughput, errors and the cloud's CPU and memory; starts its own cloud without --url.
    Sim(sim_cmd::SimArgs),
    /// Write an external broker's configuration (Mosquitto: password file, per-device ACL, TLS
    /// listener) from the device registry in a cloud's data folder.
    BrokerConfig(broker_config_cmd::BrokerConfigArgs),
    /// Run a benchmark: db, sync, catch-up, wire, footprint, memory (each prints a table, `--json
    /// PATH` writes its figures, `--quick` is a run of seconds), or plot PNGs from their JSON.
    #[cfg(feature = "bench")]
    Bench(bench_cmd::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    devtables_agent::standalone::init_logging_with(match cli.command {
        Command::Sim(_) => sim_cmd::DEFAULT_LOG,
        _ => devtables_agent::standalone::DEFAULT_LOG,
    });
    let result = match cli.command {
        Command::Db(args) => db_cmd::run(args),
        Command::Schema(args) => schema_cmd::run(args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Agent(args) => serve_cmd::agent(args),
        Command::Cloud(args) => serve_cmd::cloud(args),
        Command::Keys(args) => keys_cmd::run(args),
        Command::Devices(args) => devices_cmd::run(args),
        Command::Sim(args) => sim_cmd::run(args),
        Command::BrokerConfig(args) => broker_config_cmd::run(args),
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once. Many errors put their cause's text in
/// their own message and also return the cause as their `source()` (every thiserror field named
/// `source`): printing the whole chain would repeat it, so a cause whose text is already there is
/// left out.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if message.is_empty() || text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that says its cause and also returns it as its source, as thiserror makes one
    /// with `#[error("...: {source}")]`.
    #[derive(Debug)]
    struct Says {
        path: &'static str,
        source: std::io::Error,
    }

    impl std::fmt::Display for Says {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot open {}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for Says {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let io = || std::io::Error::other("disk on fire");
        // A cause the message already holds is not repeated...
        let e = anyhow::Error::new(Says {
            path: "f",
            source: io(),
        })
        .context("cannot start");
        assert_eq!(error_text(&e), "cannot start: cannot open f: disk on fire");
        // ... and one it does not hold is added.
        let e = anyhow::Error::new(io()).context("cannot read f");
        assert_eq!(error_text(&e), "cannot read f: disk on fire");
    }
}
