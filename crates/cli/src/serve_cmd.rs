//! `devtables agent --config FILE` and `devtables cloud --config FILE`: the standalone agent and
//! cloud service, until Ctrl-C (or SIGTERM).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use devtables_agent::config::AgentFile;
use devtables_agent::Agent;
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

pub fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let (file, config) = AgentFile::load(&args.config.config)?;
    let schema = Schema::load(&file.schema)
        .with_context(|| format!("cannot load schema {}", file.schema.display()))?;
    runtime()?.block_on(async move {
        let agent = Agent::start(config, Arc::new(schema))?;
        builtin_commands(&agent);
        eprintln!("devtables agent {} running; Ctrl-C stops it", agent.id());
        let mut status = agent.watch_status();
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs(5));
        let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<String>(64);
        if args.stdin {
            std::thread::spawn(move || {
                for line in std::io::stdin().lines() {
                    let Ok(line) = line else { break };
                    if lines_tx.blocking_send(line).is_err() {
                        break;
                    }
                }
            });
        } else {
            drop(lines_tx);
        }
        let reading = args.stdin;
        loop {
            tokio::select! {
                _ = stop_signal() => break,
                line = lines.recv(), if reading => match line {
                    Some(line) => {
                        let answer = stdin_op(&agent, &line);
                        println!("{answer}");
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    if reading { continue; }
                    let s = status.borrow_and_update().clone();
                    eprintln!("connected={} ready={} cursor={} pending={} rejected={} dropped={}",
                        s.connected, s.ready, s.cursor, s.pending, s.rejected, s.dropped);
                }
            }
        }
        agent.shutdown().await;
        Ok(())
    })
}

/// Commands every standalone agent answers (applications linking the library add their own).
fn builtin_commands(agent: &Agent) {
    let device = agent.id().to_string();
    agent.on_command(
        "ping",
        Arc::new(move |_cmd| Ok(serde_json::json!({"pong": device}))),
    );
    agent.on_command(
        "echo",
        Arc::new(|cmd| Ok(cmd.get("args").cloned().unwrap_or(serde_json::Value::Null))),
    );
}

/// One JSON-lines operation of `--stdin` mode.
fn stdin_op(agent: &Agent, line: &str) -> serde_json::Value {
    use serde_json::{json, Value};
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("not JSON: {e}")}),
    };
    let op = request
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let item = match request.get("item") {
        Some(Value::Object(m)) => m.clone(),
        _ => devtables_schema::Item::new(),
    };
    let db = agent.db();
    let result = match op {
        "create" => db.create(model, &item).map(|i| json!(i)),
        "update" => db.update(model, &item).map(|i| json!(i)),
        "upsert" => db.upsert(model, &item).map(|i| json!(i)),
        "remove" => db.remove(model, &item).map(|i| json!(i)),
        "get" => db.get(model, &item).map(|i| json!(i)),
        "find" => db
            .find(model, &item, &devtables_db::FindOptions::default())
            .map(|p| json!(p.items)),
        "status" => Ok(json!(agent.status())),
        other => return json!({"ok": false, "error": format!("unknown op {other:?}")}),
    };
    match result {
        Ok(value) => json!({"ok": true, "result": value}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

pub fn cloud(args: ConfigArgs) -> anyhow::Result<()> {
    let (schema_path, config) = CloudFile::load(&args.config)
        .map_err(|e| anyhow::anyhow!("invalid cloud configuration: {e}"))?;
    let schema = Schema::load(&schema_path)
        .with_context(|| format!("cannot load schema {}", schema_path.display()))?;
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
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
