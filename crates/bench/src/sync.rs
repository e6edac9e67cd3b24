//! `devtables-bench sync`: replication end to end on loopback, with the real cloud (SQLite,
//! embedded broker) and a real agent (its own database file and MQTT connection) in one process.
//!
//! - Up latency: a device write returns → the item is committed in the cloud store (polled).
//! - Down latency: a cloud write returns → the device's change hook sees the applied item.
//! - Throughput: one device writes N items as fast as it can (transactions of 100); the clock
//!   stops when the cloud has acknowledged every one (the outbox is empty).
//! - Bytes on the wire: MQTT payload bytes the agent published, per synced item.
//!
//! Low-load latency samples are spaced out (default 20 ms apart) so each measures one write
//! going through the default batching delay, not a queue.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_agent::{Agent, AgentConfig};
use devtables_cloud::ops::WriteKind;
use devtables_cloud::{BrokerMode, Cloud, CloudConfig};
use devtables_db::{ItemChange, Origin};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::identity::{DeviceId, Owner};
use serde_json::json;

const SCHEMA: &str = include_str!("../../../examples/schema.json5");

#[derive(clap::Args)]
pub struct SyncArgs {
    /// Latency samples in each direction.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Pause between latency samples, in ms.
    #[arg(long, default_value_t = 20)]
    gap_ms: u64,
    /// Items of the throughput run.
    #[arg(long, default_value_t = 20_000)]
    items: usize,
    /// The agent's batch delay, in ms (default: the agent's default).
    #[arg(long)]
    batch_delay_ms: Option<u64>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn item(v: serde_json::Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(args: &SyncArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("devtables-bench-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = rt.block_on(bench(args, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    let report = result?;
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

async fn bench(args: &SyncArgs, dir: &std::path::Path) -> anyhow::Result<String> {
    let schema = Arc::new(Schema::from_json5(SCHEMA)?);
    let mut config = CloudConfig::new(dir.join("cloud"));
    config.api_listen = "127.0.0.1:0".parse()?;
    config.broker = BrokerMode::Embedded {
        listen: "127.0.0.1:0".parse()?,
    };
    let cloud = Cloud::start(config, schema.clone()).await?;
    let id = DeviceId::new("bench", "dev1")?;
    let secret = cloud.register_device(&id).await?;
    let (host, port) = devtables_agent::config::parse_broker(&cloud.mqtt_addr)?;
    let mut ac = AgentConfig::new("bench", "dev1", &secret, dir.join("dev1.redb"));
    ac.broker_host = host;
    ac.broker_port = port;
    if let Some(ms) = args.batch_delay_ms {
        ac.sync.batch_delay_ms = ms;
    }
    let batch_delay = ac.sync.batch_delay_ms;
    let agent = Agent::start(ac, schema.clone())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.status().ready {
        if Instant::now() > deadline {
            bail!("the agent never became ready: {:?}", agent.status());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Up latency.
    eprintln!("up latency: {} samples", args.samples);
    let owner = Owner::Device(id.clone());
    let mut up = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let db = agent.db().clone();
        let reading =
            item(json!({"deviceId": "dev1", "id": format!("lat{i:06}"), "name": "t", "value": i}));
        let started = Instant::now();
        tokio::task::spawn_blocking(move || db.create("Reading", &reading)).await??;
        let key = ItemKey {
            pk: "device#dev1".into(),
            sk: format!("reading#lat{i:06}"),
        };
        loop {
            let (o, k) = (owner.clone(), key.clone());
            let found = cloud
                .store
                .call(move |c| c.store.get_item(&o, "Reading", &k))
                .await??;
            if found.is_some_and(|f| f.item.is_some()) {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("reading {i} never reached the cloud");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        up.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }

    // Down latency.
    eprintln!("down latency: {} samples", args.samples);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    agent.db().subscribe(Arc::new(move |c: &ItemChange| {
        if c.origin == Origin::Remote && c.model == "Setting" {
            let _ = seen_tx.send((c.key.sk.clone(), Instant::now()));
        }
    }));
    let mut down = Vec::with_capacity(args.samples);
    for i in 0..args.samples {
        let name = format!("s{i:06}");
        let started = Instant::now();
        cloud
            .write_item(
                owner.clone(),
                "Setting",
                item(json!({"name": name, "value": "v"})),
                WriteKind::Create,
            )
            .await?;
        let want = format!("setting#{name}");
        loop {
            let Ok(Some((sk, at))) =
                tokio::time::timeout(Duration::from_secs(10), seen.recv()).await
            else {
                bail!("setting {i} never reached the device");
            };
            if sk == want {
                down.push(at.duration_since(started).as_secs_f64() * 1000.0);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }

    // Throughput and bytes per item.
    eprintln!("throughput: {} items", args.items);
    let before = agent.status();
    let db = agent.db().clone();
    let n = args.items;
    let started = Instant::now();
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            db.write(Origin::Local, |t| {
                for i in chunk {
                    let r = item(json!({"deviceId": "dev1", "id": format!("tp{i:07}"), "name": "t", "value": i}));
                    t.create("Reading", &r)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    });
    let mut last_report = Instant::now();
    let written_at = loop {
        if writer.is_finished() {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    writer.await??;
    loop {
        let s = agent.status();
        if s.pending == 0 && s.in_flight == 0 {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(1) {
            eprintln!("  .. {} pending", s.pending);
            last_report = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("throughput run did not drain: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let after = agent.status();
    let bytes = after.bytes_up - before.bytes_up;
    let messages = after.messages_up - before.messages_up;

    agent.shutdown().await;
    cloud.shutdown().await;

    up.sort_by(|a, b| a.total_cmp(b));
    down.sort_by(|a, b| a.total_cmp(b));
    let mut r = String::new();
    r.push_str(&format!(
        "Command: `cargo run --release -p devtables-bench -- sync --samples {} --items {}`  \n",
        args.samples, args.items
    ));
    r.push_str(&format!("Machine: {}  \n\n", crate::sys::machine_line()));
    r.push_str("| Latency (loopback, embedded broker, default batch delay ");
    r.push_str(&format!(
        "{batch_delay} ms) | p50 | p99 | max |\n|---|---|---|---|\n"
    ));
    for (label, v) in [
        ("device write → visible in the cloud store", &up),
        ("cloud write → applied on the device", &down),
    ] {
        r.push_str(&format!(
            "| {label} | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0)
        ));
    }
    r.push_str(&format!(
        "\n| Throughput, one device | value |\n|---|---|\n| items written and acknowledged by the cloud | {n} |\n| local writes done after | {:.2} s |\n| all acknowledged after | {:.2} s |\n| sustained up throughput | {:.0} items/s |\n| MQTT messages published | {messages} ({:.1} items per message) |\n| payload bytes on the wire per synced item | {:.0} B |\n",
        written_at.as_secs_f64(),
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        n as f64 / messages.max(1) as f64,
        bytes as f64 / n as f64,
    ));
    Ok(r)
}
