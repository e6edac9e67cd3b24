//! `catch-up`: a device offline while N changes accumulate for it in the cloud, then connecting:
//! the time until it holds them all, and its peak memory against its idle memory.
//!
//! Why: a device that comes back after a long outage (or is installed into a busy account) must
//! pull everything it missed without being killed for memory on the way (what happens to
//! couchbase-lite devices on a large initial pull). The figure that matters is the device's own,
//! so the device runs in a process of its own: this program re-executed with the hidden
//! `catch-up-probe` subcommand, which starts a real agent (`Agent::start`, default
//! configuration: `immediate` durability, the default page and batch limits) and reads its own
//! /proc/self/status (`VmRSS`, and `VmHWM`, the peak).
//!
//! For each N, on a fresh cloud (SQLite with `synchronous=NORMAL` so the preparation is quick,
//! the embedded broker, loopback) in this process:
//! 1. the device connects once (probe `idle`): welcomed, nothing to pull; its RSS then is the
//!    idle figure; it disconnects cleanly;
//! 2. N `Setting` items (`sync: both`, so they flow down) are written for it through the cloud
//!    store, each in its own transaction as an API write is, while it is offline;
//! 3. the device starts again on the same database (probe `catch-up`): the clock runs from
//!    `Agent::start` until its applied feed cursor reaches the feed's head; then it counts the
//!    `Setting` items it holds, which must be N.
//!
//! The cloud's side (cheap, so reported): this process's RSS before and at most during the
//! catch-up (sampled every 20 ms) and its CPU time over the catch-up; the process is the cloud
//! plus this small harness.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use devtables_agent::{Agent, AgentConfig};
use devtables_cloud::Cloud;
use devtables_db::FindOptions;
use devtables_schema::{Item, Schema};
use devtables_sync::apply::CloudOp;
use devtables_sync::identity::{DeviceId, Owner};
use serde_json::{json, Value};

use crate::report::{short, thousands, write_json};
use crate::{sys, ChildCommand};

const SCHEMA: &str = include_str!("../../../examples/schema.json5");

/// The model the changes are written in: synced both ways, so every cloud write flows down.
const MODEL: &str = "Setting";
const ACCOUNT: &str = "bench";
const DEVICE: &str = "cu1";
/// The device's secret reaches the probe through its environment, not its command line.
const SECRET_ENV: &str = "DEVTABLES_BENCH_SECRET";
/// Cloud writes per store-thread call while preparing (each is still its own transaction).
const WRITES_PER_CALL: usize = 500;
/// Longest wait for the device to be welcomed, and for the whole catch-up.
const READY_LIMIT: Duration = Duration::from_secs(60);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(1800);

#[derive(clap::Args, Debug)]
pub struct CatchUpArgs {
    /// Changes accumulated while the device is offline, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 100_000])]
    changes: Vec<usize>,
    /// A run of seconds for CI: 1,000 changes (overrides `--changes`); no timing claims.
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The device side, in its own process.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// `idle` (connect once, measure, leave) or `catch-up` (connect, pull everything, measure).
    #[arg(long)]
    phase: String,
    /// The device's folder (its database file).
    #[arg(long)]
    dir: PathBuf,
    /// The broker, `host:port`.
    #[arg(long)]
    broker: String,
    /// `catch-up`: the feed head the cursor must reach.
    #[arg(long, default_value_t = 0)]
    head: u64,
}

fn item(v: Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

/// The setting written as change `i`: about 100 bytes of JSON with the fields the cloud adds.
fn setting(i: usize) -> Item {
    item(json!({
        "deviceId": DEVICE,
        "name": format!("s{i:08}"),
        "value": format!("catch-up value {i:08} of the offline device"),
    }))
}

fn probe_config(args: &ProbeArgs) -> anyhow::Result<AgentConfig> {
    let secret = std::env::var(SECRET_ENV).with_context(|| format!("{SECRET_ENV} is not set"))?;
    let (host, port) = devtables_agent::config::parse_broker(&args.broker)?;
    let mut c = AgentConfig::new(ACCOUNT, DEVICE, &secret, args.dir.join("device.db"));
    c.broker_host = host;
    c.broker_port = port;
    Ok(c)
}

/// Counts the device's `MODEL` items a page at a time (so the count itself holds little).
fn count_items(agent: &Agent) -> anyhow::Result<usize> {
    let mut count = 0;
    let mut next = None;
    loop {
        let page = agent.db().find(
            MODEL,
            &item(json!({"deviceId": DEVICE})),
            &FindOptions {
                limit: Some(1000),
                next: next.take(),
                ..FindOptions::default()
            },
        )?;
        count += page.items.len();
        match page.next {
            Some(n) if !page.items.is_empty() => next = Some(n),
            _ => return Ok(count),
        }
    }
}

/// The child: one agent, one phase, its figures printed as one JSON line.
pub fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let schema = Arc::new(Schema::from_json5(SCHEMA)?);
    let config = probe_config(args)?;
    let mut out = json!({"phase": args.phase, "rss_before_mib": sys::vm_mib("VmRSS")});
    rt.block_on(async {
        let started = Instant::now();
        let agent = Agent::start(config, schema)?;
        let mut watch = agent.watch_status();
        let ready = tokio::time::timeout(READY_LIMIT, watch.wait_for(|s| s.ready))
            .await
            .map(|r| r.is_ok());
        if !matches!(ready, Ok(true)) {
            bail!("the device was never welcomed: {:?}", agent.status());
        }
        out["ready_s"] = json!(started.elapsed().as_secs_f64());
        match args.phase.as_str() {
            "idle" => {}
            "catch-up" => {
                let head = args.head;
                let done =
                    tokio::time::timeout(CATCH_UP_LIMIT, watch.wait_for(|s| s.cursor >= head))
                        .await
                        .map(|r| r.is_ok());
                if !matches!(done, Ok(true)) {
                    bail!(
                        "the device never reached feed head {head}: {:?}",
                        agent.status()
                    );
                }
                out["caught_up_s"] = json!(started.elapsed().as_secs_f64());
            }
            other => bail!("unknown phase {other}"),
        }
        // Measured before counting, so the count's own pages do not show in the figures.
        out["rss_mib"] = json!(sys::vm_mib("VmRSS"));
        out["hwm_mib"] = json!(sys::vm_mib("VmHWM"));
        let status = agent.status();
        out["cursor"] = json!(status.cursor);
        out["items_held"] = json!(count_items(&agent)?);
        agent.shutdown().await;
        Ok(())
    })?;
    out["db_mib"] = json!(sys::file_mib(&args.dir.join("device.db")));
    println!("{out}");
    Ok(())
}

/// Runs the probe and reads its JSON line.
fn run_probe(
    child: &ChildCommand,
    args: &[&str],
    dir: &Path,
    secret: &str,
) -> anyhow::Result<Value> {
    let mut command = child.command("catch-up-probe");
    command
        .args(args)
        .arg("--dir")
        .arg(dir)
        .env(SECRET_ENV, secret);
    child.output_json(command, &format!("the device probe {args:?}"))
}

/// Samples this process's RSS every 20 ms until dropped; the largest sample is the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<f64>>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut peak = sys::vm_mib("VmRSS");
                while !stop.load(Ordering::Relaxed) {
                    peak = peak.max(sys::vm_mib("VmRSS"));
                    std::thread::sleep(Duration::from_millis(20));
                }
                peak.max(sys::vm_mib("VmRSS"))
            }
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or(f64::NAN)
    }
}

/// One run: N changes for an offline device, then its catch-up.
async fn measure(n: usize, child: &ChildCommand, dir: &Path) -> anyhow::Result<Value> {
    let schema = Arc::new(Schema::from_json5(SCHEMA)?);
    let mut config = crate::loopback_cloud(&dir.join("cloud"))?;
    config.sqlite_full_sync = false;
    let max_message_bytes = config.sync.wire.max_message_bytes;
    let cloud = Cloud::start(config, schema).await?;
    let id = DeviceId::new(ACCOUNT, DEVICE)?;
    let secret = cloud.register_device(&id).await?;
    let broker = cloud.mqtt_addr.clone();
    let device_dir = dir.join("device");
    std::fs::create_dir_all(&device_dir)?;

    eprintln!("== catch-up of {n} changes: the device connects once (idle)");
    let idle = tokio::task::spawn_blocking({
        let (child, dir, secret, broker) = (
            child.clone(),
            device_dir.clone(),
            secret.clone(),
            broker.clone(),
        );
        move || {
            run_probe(
                &child,
                &["--phase", "idle", "--broker", &broker],
                &dir,
                &secret,
            )
        }
    })
    .await??;

    eprintln!("   {n} cloud writes while it is offline");
    let written = Instant::now();
    let owner = Owner::Device(id.clone());
    for start in (0..n).step_by(WRITES_PER_CALL) {
        let end = (start + WRITES_PER_CALL).min(n);
        let owner = owner.clone();
        cloud
            .store
            .call(move |c| -> anyhow::Result<()> {
                let schema = c.schema.clone();
                let model = schema.model(MODEL).context("the Setting model")?;
                for i in start..end {
                    let now = devtables_db::system_now_ms().max(0) as u64;
                    let item = model.prepare_create(&setting(i), now as i64)?;
                    c.store.write(
                        &schema,
                        &mut c.clock,
                        now,
                        max_message_bytes,
                        &owner,
                        MODEL,
                        CloudOp::Put(item),
                    )?;
                }
                Ok(())
            })
            .await??;
    }
    let write_s = written.elapsed().as_secs_f64();
    let head = cloud
        .store
        .call({
            let id = id.clone();
            move |c| c.store.device(&id)
        })
        .await??
        .context("the device's record")?
        .feed_head;

    eprintln!("   the device connects again and catches up (feed head {head})");
    let cloud_rss_before = sys::vm_mib("VmRSS");
    let cloud_cpu_before = sys::cpu_seconds();
    let sampler = RssSampler::start();
    let caught_up = Instant::now();
    let catch = tokio::task::spawn_blocking({
        let (child, dir, secret, broker) = (child.clone(), device_dir, secret, broker);
        let head = head.to_string();
        move || {
            run_probe(
                &child,
                &["--phase", "catch-up", "--broker", &broker, "--head", &head],
                &dir,
                &secret,
            )
        }
    })
    .await??;
    let probe_wall_s = caught_up.elapsed().as_secs_f64();
    let cloud_peak = sampler.peak();
    let cloud_cpu_s = sys::cpu_seconds() - cloud_cpu_before;
    cloud.shutdown().await;

    let held = catch["items_held"].as_u64().unwrap_or(0) as usize;
    ensure!(
        held == n,
        "the device holds {held} of the {n} items written for it"
    );
    let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let seconds = num(&catch, "caught_up_s");
    Ok(json!({
        "changes": n,
        "items_written": n,
        "items_held": held,
        "feed_head": head,
        "cloud_write_s": write_s,
        "device": {
            "idle_rss_mib": num(&idle, "rss_mib"),
            "idle_hwm_mib": num(&idle, "hwm_mib"),
            "rss_before_start_mib": num(&catch, "rss_before_mib"),
            "ready_s": num(&catch, "ready_s"),
            "caught_up_s": seconds,
            "items_per_s": n as f64 / seconds,
            "rss_after_mib": num(&catch, "rss_mib"),
            "peak_rss_mib": num(&catch, "hwm_mib"),
            "peak_over_idle_mib": num(&catch, "hwm_mib") - num(&idle, "rss_mib"),
            "db_mib": num(&catch, "db_mib"),
        },
        "cloud": {
            "rss_before_mib": cloud_rss_before,
            "rss_peak_mib": cloud_peak,
            "cpu_s": cloud_cpu_s,
            "cpu_pct_avg": 100.0 * cloud_cpu_s / probe_wall_s,
        },
    }))
}

pub fn run(args: &CatchUpArgs, child: &ChildCommand) -> anyhow::Result<()> {
    let counts = if args.quick {
        vec![1_000]
    } else {
        args.changes.clone()
    };
    if counts.is_empty() || counts.contains(&0) {
        bail!("--changes needs positive counts");
    }
    let machine = sys::machine_line();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for &n in &counts {
        let tmp = sys::TempDir::new("devtables-bench-catch-up")?;
        runs.push(rt.block_on(measure(n, child, tmp.path()))?);
    }
    let command = if args.quick {
        "devtables bench catch-up --quick".to_string()
    } else {
        format!(
            "devtables bench catch-up --changes {}",
            counts
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    println!("{}", report(&command, &machine, &runs));
    if let Some(path) = &args.json {
        write_json(
            path,
            &json!({
                "bench": "catch-up",
                "command": command,
                "machine": machine,
                "quick": args.quick,
                "runs": runs,
            }),
        )?;
    }
    Ok(())
}

fn report(command: &str, machine: &str, runs: &[Value]) -> String {
    let mut s = format!("Command: `{command}`  \nMachine: {machine}\n\n");
    s.push_str("| changes while offline | items held | device: ready after | device: all held after | items/s | device: idle RSS | device: peak RSS (VmHWM) | peak over idle | RSS after | device database | cloud: RSS before / peak | cloud: CPU |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let d = &r["device"];
        let c = &r["cloud"];
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        s.push_str(&format!(
            "| {} | {} | {} s | {} s | {} | {} MiB | {} MiB | +{} MiB | {} MiB | {} MiB | {} / {} MiB | {} s ({:.0}% of a core) |\n",
            thousands(f(r, "changes")),
            thousands(f(r, "items_held")),
            short(f(d, "ready_s")),
            short(f(d, "caught_up_s")),
            thousands(f(d, "items_per_s")),
            short(f(d, "idle_rss_mib")),
            short(f(d, "peak_rss_mib")),
            short(f(d, "peak_over_idle_mib")),
            short(f(d, "rss_after_mib")),
            short(f(d, "db_mib")),
            short(f(c, "rss_before_mib")),
            short(f(c, "rss_peak_mib")),
            short(f(c, "cpu_s")),
            f(c, "cpu_pct_avg"),
        ));
    }
    s
}
