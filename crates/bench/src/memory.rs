//! `devtables-bench memory`: the agent's resident memory with N local changes pending.
//!
//! A device that stays offline accumulates its outbox; what matters is whether the agent's
//! memory grows with it. For each N a fresh child process (the binary re-executed with the
//! hidden `memory-probe` subcommand) runs an agent whose broker is unreachable, so every change
//! stays pending, in one of two ways:
//! - `restart`: the database already holds N pending changes (written by the parent); the child
//!   starts the agent on it and measures once the event loop runs;
//! - `offline`: the child starts the agent on an empty database and writes N changes (telemetry
//!   `Reading` items, 100 per transaction); it measures once the event loop has taken them all.
//!
//! Each child reports its RSS before `Agent::start` (runtime, schema: the harness), after, and
//! its peak (VmHWM). Database files live in a temporary directory under /tmp removed at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_agent::{Agent, AgentConfig};
use devtables_db::{Durability, Origin};
use devtables_schema::{Item, Schema};
use serde_json::json;

use crate::{sys, ChildCommand};

const SCHEMA: &str = include_str!("../../../examples/schema.json5");

/// Changes per write transaction when filling the outbox.
const CHUNK: usize = 100;

#[derive(clap::Args, Debug)]
pub struct MemoryArgs {
    /// Pending-change counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [0usize, 10_000, 100_000])]
    pending: Vec<usize>,
    /// A label for the report's heading (for example the code version measured).
    #[arg(long, default_value = "")]
    label: String,
    /// A run of seconds for CI: 0 and 1,000 pending (overrides `--pending`); no claims.
    #[arg(long)]
    quick: bool,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// `restart` or `offline`.
    #[arg(long)]
    mode: String,
    #[arg(long)]
    n: usize,
    #[arg(long)]
    dir: PathBuf,
}

type Metrics = BTreeMap<String, f64>;

fn item(v: serde_json::Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

/// An agent of device `bench/mem1` whose broker port nobody listens on.
fn offline_config(dir: &Path, n: usize) -> anyhow::Result<AgentConfig> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut c = AgentConfig::new("bench", "mem1", "secret", dir.join("agent.db"));
    c.broker_port = port;
    c.reconnect_delay = Duration::from_millis(200);
    c.outbox_limit = n as u64 + 1;
    Ok(c)
}

/// Writes `n` readings through the agent (each gets its outbox entry) and waits until the
/// event loop has handed all of them to the engine.
async fn fill(agent: &Agent, n: usize) -> anyhow::Result<()> {
    let db = agent.db().clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for start in (0..n).step_by(CHUNK) {
            db.write(Origin::Local, |t| {
                for i in start..(start + CHUNK).min(n) {
                    let r = item(json!({
                        "deviceId": "mem1",
                        "id": format!("r{i:08}"),
                        "name": "temperature",
                        "value": i as f64 / 10.0,
                    }));
                    t.create("Reading", &r)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    })
    .await??;
    wait_pending(agent, n).await
}

/// Waits until the event loop reports `n` pending and has tried the (unreachable) broker.
async fn wait_pending(agent: &Agent, n: usize) -> anyhow::Result<()> {
    let mut watch = agent.watch_status();
    let seen = tokio::time::timeout(
        Duration::from_secs(120),
        watch.wait_for(|s| s.pending == n && s.last_error.is_some()),
    )
    .await;
    match seen {
        Ok(Ok(_)) => Ok(()),
        _ => bail!("the agent never reported {n} pending: {:?}", agent.status()),
    }
}

/// The child: one agent, one measurement, printed as JSON.
pub fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let schema = Arc::new(Schema::from_json5(SCHEMA)?);
    let mut m = Metrics::new();
    m.insert("n".into(), args.n as f64);
    m.insert("rss_before_mib".into(), sys::vm_mib("VmRSS"));
    let config = offline_config(&args.dir, args.n)?;
    let started = Instant::now();
    rt.block_on(async {
        let agent = Agent::start(config, schema)?;
        match args.mode.as_str() {
            "restart" => wait_pending(&agent, args.n).await?,
            "offline" => fill(&agent, args.n).await?,
            other => bail!("unknown mode {other}"),
        }
        m.insert("ready_s".into(), started.elapsed().as_secs_f64());
        m.insert("rss_mib".into(), sys::vm_mib("VmRSS"));
        m.insert("hwm_mib".into(), sys::vm_mib("VmHWM"));
        agent.shutdown().await;
        Ok(())
    })?;
    m.insert("db_mib".into(), sys::file_mib(&args.dir.join("agent.db")));
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

/// Prepares a database holding `n` pending changes (in this process: its memory does not count).
fn prepare(dir: &Path, n: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let schema = Arc::new(Schema::from_json5(SCHEMA)?);
    let mut config = offline_config(dir, n)?;
    config.durability = Durability::Periodic {
        interval: Duration::from_millis(200),
    };
    rt.block_on(async {
        let agent = Agent::start(config, schema)?;
        fill(&agent, n).await?;
        agent.shutdown().await;
        Ok(())
    })
}

fn run_probe(child: &ChildCommand, mode: &str, n: usize, dir: &Path) -> anyhow::Result<Metrics> {
    let mut command = child.command("memory-probe");
    command
        .args(["--mode", mode, "--n", &n.to_string()])
        .arg("--dir")
        .arg(dir);
    child.output_json(command, &format!("probe {mode} N={n}"))
}

pub fn run(args: &MemoryArgs, child: &ChildCommand) -> anyhow::Result<()> {
    let tmp = sys::TempDir::new("devtables-bench-memory")?;
    let machine = sys::machine_line();
    let pending = if args.quick {
        vec![0, 1_000]
    } else {
        args.pending.clone()
    };
    let mut rows = Vec::new();
    for &n in &pending {
        let dir = tmp.path().join(format!("restart-{n}"));
        std::fs::create_dir_all(&dir)?;
        eprintln!("== restart with {n} pending: preparing");
        prepare(&dir, n)?;
        eprintln!("   measuring");
        let restart = run_probe(child, "restart", n, &dir)?;
        std::fs::remove_dir_all(&dir)?;
        let dir = tmp.path().join(format!("offline-{n}"));
        std::fs::create_dir_all(&dir)?;
        eprintln!("== {n} offline writes");
        let offline = run_probe(child, "offline", n, &dir)?;
        std::fs::remove_dir_all(&dir)?;
        rows.push((n, restart, offline));
    }
    let command = command_line(args, &pending);
    let report = report(args, &command, &machine, &rows);
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(path) = &args.json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, restart, offline)| json!({"pending": n, "restart": restart, "offline": offline}))
            .collect();
        crate::report::write_json(
            path,
            &json!({
                "bench": "memory",
                "command": command,
                "machine": machine,
                "quick": args.quick,
                "rows": rows,
            }),
        )?;
    }
    Ok(())
}

fn get(m: &Metrics, k: &str) -> f64 {
    m.get(k).copied().unwrap_or(f64::NAN)
}

fn command_line(args: &MemoryArgs, pending: &[usize]) -> String {
    if args.quick {
        return "devtables bench memory --quick".into();
    }
    let counts: Vec<String> = pending.iter().map(|n| n.to_string()).collect();
    format!("devtables bench memory --pending {}", counts.join(","))
}

fn report(
    args: &MemoryArgs,
    command: &str,
    machine: &str,
    rows: &[(usize, Metrics, Metrics)],
) -> String {
    let mut s = String::new();
    let label = if args.label.is_empty() {
        String::new()
    } else {
        format!(" ({})", args.label)
    };
    s.push_str(&format!("Command: `{command}`{label}  \n"));
    s.push_str(&format!("Machine: {machine}\n\n"));
    s.push_str("| pending changes | restart: RSS before start | restart: RSS with the agent running | restart: peak RSS | restart: time to start | offline writes: RSS after | offline writes: peak RSS | database file |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    let base = rows.iter().find(|(n, _, _)| *n == 0);
    for (n, r, o) in rows {
        s.push_str(&format!(
            "| {n} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} s | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n",
            get(r, "rss_before_mib"),
            get(r, "rss_mib"),
            get(r, "hwm_mib"),
            get(r, "ready_s"),
            get(o, "rss_mib"),
            get(o, "hwm_mib"),
            get(r, "db_mib"),
        ));
    }
    if let Some((_, r0, o0)) = base {
        s.push('\n');
        for (n, r, o) in rows.iter().filter(|(n, _, _)| *n > 0) {
            let per = |a: f64, b: f64| (a - b) * 1024.0 * 1024.0 / *n as f64;
            s.push_str(&format!(
                "N={n}: {:.0} bytes of RSS per pending change after a restart, {:.0} after offline writes (over N=0).  \n",
                per(get(r, "rss_mib"), get(r0, "rss_mib")),
                per(get(o, "rss_mib"), get(o0, "rss_mib")),
            ));
        }
    }
    s
}
