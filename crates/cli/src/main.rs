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
    Cloud(serve_cmd::ConfigArgs),
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
