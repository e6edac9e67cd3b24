//! `devtables agent --config FILE` and `devtables cloud --config FILE`: the standalone agent and
//! cloud service, until Ctrl-C (or SIGTERM).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use devtables_agent::standalone::{self, StandaloneOptions};
use devtables_cloud::{Cloud, CloudFile};
use devtables_schema::Schema;

#[derive(Args)]
pub struct ConfigArgs {
    /// The configuration file (JSON5).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Read operations on the device database as JSON lines from standard input
    /// (`{"op":"create","model":"Fault","item":{...}}`; ops: create, update, upsert, remove, get,
    /// find, status) and answer each with one JSON line on standard output. End of input stops
    /// the agent.
    #[arg(long)]
    stdin: bool,
}

/// The standalone agent: the loop shared with the device-only `devtables-agent` binary.
pub fn agent(args: AgentArgs) -> anyhow::Result<()> {
    standalone::run(StandaloneOptions {
        config: args.config.config,
        stdin: args.stdin,
    })?;
    Ok(())
}

pub fn cloud(args: ConfigArgs) -> anyhow::Result<()> {
    let (schema_path, config) = CloudFile::load(&args.config)
        .map_err(|e| anyhow::anyhow!("invalid cloud configuration: {e}"))?;
    let schema = Schema::load(&schema_path)
        .with_context(|| format!("cannot load schema {}", schema_path.display()))?;
    crate::limits::raise_open_files("each connected device holds a socket");
    runtime()?.block_on(async move {
        let cloud = Cloud::start(config, Arc::new(schema)).await?;
        eprintln!(
            "devtables cloud running: API http://{}  MQTT {}; Ctrl-C stops it",
            cloud.api_addr, cloud.mqtt_addr
        );
        stop_signal().await;
        cloud.shutdown().await;
        Ok(())
    })
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    standalone::runtime().context("cannot start the async runtime")
}

/// Ctrl-C or SIGTERM (the one the standalone agent also stops on).
pub(crate) use devtables_agent::standalone::stop_signal;
