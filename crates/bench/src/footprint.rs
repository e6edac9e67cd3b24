//! `devtables-bench footprint`: what the device-only agent costs a device, measured on the real
//! binary as its own process: its file size (next to the full `devtables` binary when given),
//! its resident memory once the cloud has welcomed it with nothing to sync, and after 10,000
//! items synced up (written through `--stdin`) and 10,000 down (written in the cloud).
//!
//! The cloud (SQLite, embedded broker) runs in this process; only the agent's process is
//! measured (so this harness's own build profile does not matter, the agent binary's does),
//! from /proc/PID/status (`VmRSS` now, `VmHWM` the peak). The agent's files live in a
//! temporary directory under /tmp removed at the end.
//!
//! Without `--agent` (and without a `release-device` build at the default path, or with
//! `--quick`), the agent measured is this program's own (`agent-process`, the same standalone
//! loop): the run then proves the harness works, its figures are not the device build's.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_cloud::ops::WriteKind;
use devtables_cloud::Cloud;
use devtables_schema::{Item, Schema};
use devtables_sync::identity::{DeviceId, Owner};
use serde_json::{json, Value};

use crate::{sys, ChildCommand};

const SCHEMA: &str = include_str!("../../../examples/schema.json5");

/// Where `cargo build --profile release-device -p devtables-agent` puts the device-only agent.
const DEVICE_BUILD: &str = "target/release-device/devtables-agent";

/// Longest wait for any one step (ready, an answer, the end of a sync).
const STEP: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug)]
pub struct FootprintArgs {
    /// The device-only agent binary to run (build it with
    /// `cargo build --profile release-device -p devtables-agent`). Default:
    /// target/release-device/devtables-agent if it exists, else this program's own agent.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The full `devtables` binary, for the size comparison.
    #[arg(long)]
    full: Option<PathBuf>,
    /// Items synced each way.
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// A run of seconds for CI: 200 items each way, this program's own agent unless `--agent`
    /// names one; no claims.
    #[arg(long)]
    quick: bool,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The standalone agent, run by `footprint` in its own process.
#[derive(clap::Args, Debug)]
pub struct AgentProcessArgs {
    /// The agent's configuration file.
    #[arg(long)]
    config: PathBuf,
}

/// The standalone agent with `--stdin`: what `devtables agent` and `devtables-agent` run.
pub fn agent_process(args: &AgentProcessArgs) -> anyhow::Result<()> {
    devtables_agent::standalone::run(devtables_agent::standalone::StandaloneOptions {
        config: args.config.clone(),
        stdin: true,
        stdin_drain: None,
    })?;
    Ok(())
}

/// The agent process to measure: a binary, or this program's `agent-process`.
enum AgentBinary {
    File(PathBuf),
    ThisProgram(ChildCommand),
}

impl AgentBinary {
    fn choose(args: &FootprintArgs, child: &ChildCommand) -> AgentBinary {
        match &args.agent {
            Some(path) => AgentBinary::File(path.clone()),
            None if !args.quick && Path::new(DEVICE_BUILD).exists() => {
                AgentBinary::File(PathBuf::from(DEVICE_BUILD))
            }
            None => AgentBinary::ThisProgram(child.clone()),
        }
    }

    fn command(&self, config: &Path) -> Command {
        let mut c = match self {
            AgentBinary::File(path) => {
                let mut c = Command::new(path);
                c.arg("--stdin");
                c
            }
            AgentBinary::ThisProgram(child) => child.command("agent-process"),
        };
        c.arg("--config").arg(config);
        c
    }

    fn path(&self) -> &Path {
        match self {
            AgentBinary::File(path) => path,
            AgentBinary::ThisProgram(child) => child.program(),
        }
    }

    fn label(&self) -> String {
        match self {
            AgentBinary::File(path) => format!("`{}`", path.display()),
            AgentBinary::ThisProgram(child) => format!(
                "`{}` (this program's own agent, not the device-only build)",
                child.program().display()
            ),
        }
    }
}

/// The agent process with its standard input and the answers it prints.
struct AgentProc {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl AgentProc {
    fn start(bin: &AgentBinary, config: &Path) -> anyhow::Result<AgentProc> {
        let mut child = bin
            .command(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", bin.path().display()))?;
        let answers = forward(child.stdout.take().context("agent stdout")?);
        let stderr = forward(child.stderr.take().context("agent stderr")?);
        let stdin = child.stdin.take();
        Ok(AgentProc {
            child,
            stdin,
            answers,
            stderr,
        })
    }

    fn send(&mut self, op: &Value) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("agent stdin closed")?;
        writeln!(stdin, "{op}").context("write to the agent")?;
        Ok(())
    }

    fn answer(&self) -> anyhow::Result<Value> {
        let line = self
            .answers
            .recv_timeout(STEP)
            .context("no answer from the agent")?;
        serde_json::from_str(&line).with_context(|| format!("answer {line:?}"))
    }

    fn status(&mut self) -> anyhow::Result<Value> {
        self.send(&json!({"op": "status"}))?;
        let a = self.answer()?;
        Ok(a["result"].clone())
    }

    /// `(VmRSS, VmHWM)` of the agent process, in MiB.
    fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
                .map(|kib| kib / 1024.0)
                .unwrap_or(f64::NAN)
        };
        (field("VmRSS"), field("VmHWM"))
    }

    /// Polls the status op until `done` holds.
    fn wait_status(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP;
        loop {
            let s = self.status()?;
            if done(&s) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}: {s}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Closes standard input (the agent stops) and waits for its exit.
    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the agent exited with {status}");
        }
        Ok(())
    }
}

fn forward(from: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn item(v: Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

/// One row of the report: where the agent was, its RSS and peak RSS.
struct Row {
    label: String,
    rss: f64,
    hwm: f64,
    seconds: f64,
}

pub fn run(args: &FootprintArgs, child: &ChildCommand) -> anyhow::Result<()> {
    let machine = sys::machine_line();
    let tmp = sys::TempDir::new("devtables-bench-footprint")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bin = AgentBinary::choose(args, child);
    let items = if args.quick { 200 } else { args.items };
    let rows = rt.block_on(measure(&bin, items, tmp.path()))?;
    let command = if args.quick {
        "devtables bench footprint --quick".to_string()
    } else {
        format!(
            "devtables bench footprint --agent {}{} --items {items}",
            bin.path().display(),
            args.full
                .as_ref()
                .map(|p| format!(" --full {}", p.display()))
                .unwrap_or_default(),
        )
    };
    let sizes = sizes(args, &bin)?;
    let report = report(&command, &machine, &sizes, &rows);
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(path) = &args.json {
        let rows: Vec<Value> = rows
            .iter()
            .map(|r| json!({"state": r.label, "rss_mib": r.rss, "hwm_mib": r.hwm, "seconds": r.seconds}))
            .collect();
        let sizes: Vec<Value> = sizes
            .iter()
            .map(|(label, bytes)| json!({"binary": label, "bytes": bytes}))
            .collect();
        crate::report::write_json(
            path,
            &json!({
                "bench": "footprint",
                "command": command,
                "machine": machine,
                "quick": args.quick,
                "items": items,
                "binaries": sizes,
                "rows": rows,
            }),
        )?;
    }
    Ok(())
}

async fn measure(bin: &AgentBinary, n: usize, dir: &Path) -> anyhow::Result<Vec<Row>> {
    let schema_path = dir.join("schema.json5");
    std::fs::write(&schema_path, SCHEMA)?;
    let schema = Arc::new(Schema::from_json5(SCHEMA)?);
    let mut config = crate::loopback_cloud(&dir.join("cloud"))?;
    config.sqlite_full_sync = false;
    let cloud = Cloud::start(config, schema).await?;
    let id = DeviceId::new("bench", "fp1")?;
    let secret = cloud.register_device(&id).await?;
    let config = dir.join("agent.json5");
    std::fs::write(
        &config,
        json!({
            "account": "bench", "device": "fp1", "secret": secret,
            "schema": schema_path, "db": "fp1.db", "broker": cloud.mqtt_addr,
        })
        .to_string(),
    )?;
    let started = Instant::now();
    let mut agent = AgentProc::start(bin, &config)?;
    let mut rows = Vec::new();

    // Idle: welcomed by the cloud, nothing in the outbox or the feed.
    let (agent_back, ready) = tokio::task::spawn_blocking(move || {
        let r = wait_ready(&mut agent);
        (agent, r)
    })
    .await?;
    agent = agent_back;
    ready?;
    let (rss, hwm) = agent.memory_mib();
    rows.push(Row {
        label: "idle: connected and ready, empty outbox".into(),
        rss,
        hwm,
        seconds: started.elapsed().as_secs_f64(),
    });

    // Up: N Faults written through --stdin, until the cloud acknowledged them all.
    let started = Instant::now();
    let (agent_back, up) = tokio::task::spawn_blocking(move || {
        let r = sync_up(&mut agent, n);
        (agent, r)
    })
    .await?;
    agent = agent_back;
    up?;
    let (rss, hwm) = agent.memory_mib();
    rows.push(Row {
        label: format!("after {n} items synced up (written through --stdin, all acknowledged)"),
        rss,
        hwm,
        seconds: started.elapsed().as_secs_f64(),
    });

    // Down: N Settings written in the cloud for the device, until its cursor reached the feed's
    // head.
    let started = Instant::now();
    for i in 0..n {
        cloud
            .write_item(
                Owner::Device(id.clone()),
                "Setting",
                item(json!({"name": format!("s{i:06}"), "value": "x"})),
                WriteKind::Create,
            )
            .await?;
    }
    let record = cloud
        .store
        .call({
            let id = id.clone();
            move |c| c.store.device(&id)
        })
        .await??
        .context("the device's record")?;
    let head = record.feed_head;
    let (agent_back, down) = tokio::task::spawn_blocking(move || {
        let r = agent.wait_status("the feed's head", |s| {
            s["cursor"].as_u64().is_some_and(|c| c >= head)
        });
        (agent, r)
    })
    .await?;
    agent = agent_back;
    down?;
    let (rss, hwm) = agent.memory_mib();
    rows.push(Row {
        label: format!("after {n} more items synced down (written in the cloud)"),
        rss,
        hwm,
        seconds: started.elapsed().as_secs_f64(),
    });
    tokio::task::spawn_blocking(move || agent.stop()).await??;
    cloud.shutdown().await;
    Ok(rows)
}

/// Waits for the agent's `ready` line on standard error, then for its status to agree.
fn wait_ready(agent: &mut AgentProc) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = agent
            .stderr
            .recv_timeout(left)
            .context("the agent never reported ready")?;
        if line.contains(" ready: ") {
            break;
        }
    }
    agent.wait_status("ready", |s| s["ready"] == true && s["pending"] == 0)
}

/// Writes `n` Faults through `--stdin` (answers read as they come, so neither pipe fills up),
/// then waits until none is pending.
fn sync_up(agent: &mut AgentProc, n: usize) -> anyhow::Result<()> {
    let mut stdin = agent.stdin.take().context("agent stdin")?;
    let writer = std::thread::spawn(move || -> std::io::Result<ChildStdin> {
        let mut out = std::io::BufWriter::new(&mut stdin);
        for i in 0..n {
            let op = json!({"op": "create", "model": "Fault",
                "item": {"deviceId": "fp1", "id": format!("f{i:06}"), "severity": "info",
                         "message": "measured"}});
            writeln!(out, "{op}")?;
        }
        out.flush()?;
        drop(out);
        Ok(stdin)
    });
    let mut failed = 0usize;
    for _ in 0..n {
        if agent.answer()?["ok"] != true {
            failed += 1;
        }
    }
    agent.stdin = Some(
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??,
    );
    if failed > 0 {
        bail!("{failed} of {n} creates failed");
    }
    agent.wait_status("every change acknowledged", |s| s["pending"] == 0)
}

/// The file sizes of the agent measured and, when given, the full binary, in bytes.
fn sizes(args: &FootprintArgs, bin: &AgentBinary) -> anyhow::Result<Vec<(String, u64)>> {
    let size = |p: &Path| -> anyhow::Result<u64> {
        Ok(std::fs::metadata(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .len())
    };
    let mut out = vec![(bin.label(), size(bin.path())?)];
    if let Some(full) = &args.full {
        out.push((format!("`{}`", full.display()), size(full)?));
    }
    Ok(out)
}

fn report(command: &str, machine: &str, sizes: &[(String, u64)], rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(&format!("Command: `{command}`  \n"));
    s.push_str(&format!("Machine: {machine}\n\n"));
    s.push_str("| binary | file size |\n|---|---|\n");
    for (label, bytes) in sizes {
        s.push_str(&format!(
            "| {label} | {:.2} MiB |\n",
            *bytes as f64 / (1024.0 * 1024.0)
        ));
    }
    s.push_str("\n| agent process | VmRSS | VmHWM (peak) | time |\n|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} s |\n",
            r.label, r.rss, r.hwm, r.seconds
        ));
    }
    s
}
