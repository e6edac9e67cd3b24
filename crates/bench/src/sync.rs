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
//!
//! - Full-outbox upload: a second device writes the same number of items while it cannot reach
//!   the broker, then connects; the clock runs from the cloud's welcome to the last
//!   acknowledgement: the sync path alone, without local writes competing for the CPU.
//!
//! Ceiling (`mqtt_raw`): after devtables' run, the same number of push messages of the same
//! items (built as the agent builds them, with the agent's measured items per message) are
//! published raw at QoS 1 through a fresh instance of the same embedded broker, with the
//! agent's in-flight window; the ratio is devtables' sustained items/s over the raw one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_agent::{Agent, AgentConfig};
use devtables_cloud::ops::WriteKind;
use devtables_cloud::Cloud;
use devtables_db::{ItemChange, Origin};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::identity::{DeviceId, Owner};
use serde_json::json;
use serde_json::Value;

const SCHEMA: &str = include_str!("../../../examples/schema.json5");

/// Fewest messages of the raw ceiling run: the pushes are sent again until there are this
/// many, so the raw rate is timed over seconds, not milliseconds.
const RAW_MIN_MESSAGES: usize = 2_000;

#[derive(clap::Args, Debug)]
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
    /// A run of seconds for CI: 20 samples 5 ms apart, 1,000 items; no timing claims.
    #[arg(long)]
    quick: bool,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the figures (with every latency sample) as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The sizes a run uses, after `--quick`.
struct Plan {
    samples: usize,
    gap_ms: u64,
    items: usize,
}

fn item(v: serde_json::Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

/// The reading the throughput run writes as item `i` (the ceiling publishes the same items).
fn throughput_reading(i: usize) -> Item {
    reading_of("dev1", i)
}

fn reading_of(device: &str, i: usize) -> Item {
    item(json!({"deviceId": device, "id": format!("tp{i:07}"), "name": "t", "value": i}))
}

/// What the drain run measured: the sync path alone, from a full outbox to all acknowledged.
struct Drain {
    /// From `Agent::start` to the cloud's welcome.
    ready: Duration,
    /// From the welcome until every change was acknowledged.
    acked: Duration,
    messages: u64,
    bytes: u64,
}

/// Writes `n` readings into a second device's outbox while it cannot reach the broker, then
/// starts it against the cloud and times the upload alone (no local writes competing).
async fn drain(
    cloud: &Cloud,
    schema: &Arc<Schema>,
    dir: &std::path::Path,
    n: usize,
) -> anyhow::Result<Drain> {
    let id = DeviceId::new("bench", "dev2")?;
    let secret = cloud.register_device(&id).await?;
    let (host, port) = devtables_agent::config::parse_broker(&cloud.mqtt_addr)?;
    let db_path = dir.join("dev2.db");
    let mut offline = AgentConfig::new("bench", "dev2", &secret, &db_path);
    offline.broker_host = "127.0.0.1".into();
    offline.broker_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    offline.outbox_limit = offline.outbox_limit.max(n as u64 + 1);
    let agent = Agent::start(offline.clone(), schema.clone())?;
    let db = agent.db().clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            db.write(Origin::Local, |t| {
                for i in chunk {
                    t.create("Reading", &reading_of("dev2", *i))?;
                }
                Ok(())
            })?;
        }
        Ok(())
    })
    .await??;
    let mut watch = agent.watch_status();
    let filled = tokio::time::timeout(Duration::from_secs(120), watch.wait_for(|s| s.pending == n))
        .await
        .map(|r| r.is_ok());
    if !matches!(filled, Ok(true)) {
        bail!("the outbox never held {n}: {:?}", agent.status());
    }
    agent.shutdown().await;

    let mut online = offline;
    online.broker_host = host;
    online.broker_port = port;
    let started = Instant::now();
    let agent = Agent::start(online, schema.clone())?;
    let mut watch = agent.watch_status();
    let limit = Duration::from_secs(600);
    let ready = tokio::time::timeout(limit, watch.wait_for(|s| s.ready))
        .await
        .map(|r| r.is_ok());
    if !matches!(ready, Ok(true)) {
        bail!("the second device was never welcomed: {:?}", agent.status());
    }
    let ready_at = started.elapsed();
    let done = tokio::time::timeout(
        limit,
        watch.wait_for(|s| s.ready && s.pending == 0 && s.in_flight == 0),
    )
    .await
    .map(|r| r.is_ok());
    if !matches!(done, Ok(true)) {
        bail!("the full outbox never drained: {:?}", agent.status());
    }
    let acked = started.elapsed() - ready_at;
    let status = agent.status();
    agent.shutdown().await;
    Ok(Drain {
        ready: ready_at,
        acked,
        messages: status.messages_up,
        bytes: status.bytes_up,
    })
}

pub fn run(args: &SyncArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("devtables-bench-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let plan = if args.quick {
        Plan {
            samples: 20,
            gap_ms: 5,
            items: 1_000,
        }
    } else {
        Plan {
            samples: args.samples.max(1),
            gap_ms: args.gap_ms,
            items: args.items.max(1),
        }
    };
    let result = rt.block_on(bench(args, &plan, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    let (report, figures) = result?;
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    }
    if let Some(path) = &args.json {
        crate::report::write_json(path, &figures)?;
    }
    Ok(())
}

async fn bench(
    args: &SyncArgs,
    plan: &Plan,
    dir: &std::path::Path,
) -> anyhow::Result<(String, Value)> {
    let schema = Arc::new(Schema::from_json5(SCHEMA)?);
    let config = crate::loopback_cloud(&dir.join("cloud"))?;
    let cloud = Cloud::start(config, schema.clone()).await?;
    let id = DeviceId::new("bench", "dev1")?;
    let secret = cloud.register_device(&id).await?;
    let (host, port) = devtables_agent::config::parse_broker(&cloud.mqtt_addr)?;
    let mut ac = AgentConfig::new("bench", "dev1", &secret, dir.join("dev1.db"));
    ac.broker_host = host;
    ac.broker_port = port;
    if let Some(ms) = args.batch_delay_ms {
        ac.sync.batch_delay_ms = ms;
    }
    let batch_delay = ac.sync.batch_delay_ms;
    // Batches the agent keeps unanswered: the raw run's window.
    let window = ac.sync.max_in_flight;
    let agent = Agent::start(ac, schema.clone())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.status().ready {
        if Instant::now() > deadline {
            bail!("the agent never became ready: {:?}", agent.status());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Up latency.
    eprintln!("up latency: {} samples", plan.samples);
    let owner = Owner::Device(id.clone());
    let mut up = Vec::with_capacity(plan.samples);
    for i in 0..plan.samples {
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
        tokio::time::sleep(Duration::from_millis(plan.gap_ms)).await;
    }

    // Down latency.
    eprintln!("down latency: {} samples", plan.samples);
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    agent.db().subscribe(Arc::new(move |c: &ItemChange| {
        if c.origin == Origin::Remote && c.model == "Setting" {
            let _ = seen_tx.send((c.key.sk.clone(), Instant::now()));
        }
    }));
    let mut down = Vec::with_capacity(plan.samples);
    for i in 0..plan.samples {
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
        tokio::time::sleep(Duration::from_millis(plan.gap_ms)).await;
    }

    // Throughput and bytes per item.
    eprintln!("throughput: {} items", args.items);
    let before = agent.status();
    let db = agent.db().clone();
    let n = plan.items;
    let started = Instant::now();
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            db.write(Origin::Local, |t| {
                for i in chunk {
                    t.create("Reading", &throughput_reading(*i))?;
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

    // The sync path alone: a full outbox drained.
    eprintln!("drain: {n} changes written offline, then uploaded");
    let drained = drain(&cloud, &schema, dir, n).await?;
    cloud.shutdown().await;

    // The ceiling: the same items in as many messages, raw, through the same broker.
    let per_message = (n as f64 / messages.max(1) as f64).round().max(1.0) as usize;
    eprintln!("ceiling: raw MQTT QoS 1, {per_message} items per message, window {window}");
    let stored = tokio::task::spawn_blocking({
        let schema = schema.clone();
        move || crate::wire::stored_items(&schema, "Reading", (0..n).map(throughput_reading))
    })
    .await??;
    let payloads = crate::wire::push_payloads(&schema, "Reading", stored, per_message)?;
    let max_packet = devtables_sync::wire::WireConfig::default().max_message_bytes + 4096;
    // The same messages over and over, so the raw run lasts long enough to be timed.
    let min_messages = if args.quick { 50 } else { RAW_MIN_MESSAGES };
    let rounds = min_messages.div_ceil(payloads.len().max(1));
    let raw = crate::mqtt_raw::publish_rate(&payloads, rounds, window, max_packet).await?;

    up.sort_by(|a, b| a.total_cmp(b));
    down.sort_by(|a, b| a.total_cmp(b));
    let rate = n as f64 / elapsed.as_secs_f64();
    let drain_rate = n as f64 / drained.acked.as_secs_f64();
    let raw_items_per_s = raw.messages_per_s() * (n * rounds) as f64 / raw.messages as f64;
    let machine = crate::sys::machine_line();
    let command = if args.quick {
        "devtables bench sync --quick".to_string()
    } else {
        format!(
            "devtables bench sync --samples {} --items {}",
            plan.samples, plan.items
        )
    };
    let figures = json!({
        "bench": "sync",
        "command": command,
        "machine": machine,
        "quick": args.quick,
        "batch_delay_ms": batch_delay,
        "samples": plan.samples,
        "up_ms": up,
        "down_ms": down,
        "up_lag_ms": crate::report::quantiles(&up),
        "down_lag_ms": crate::report::quantiles(&down),
        "throughput": {
            "items": n,
            "written_s": written_at.as_secs_f64(),
            "acked_s": elapsed.as_secs_f64(),
            "items_per_s": rate,
            "messages": messages,
            "payload_bytes": bytes,
            "bytes_per_item": bytes as f64 / n as f64,
        },
        "ceiling": {
            "what": "raw MQTT QoS 1 publish of the same items in the same number of messages, same embedded broker, same window",
            "messages": raw.messages,
            "rounds": rounds,
            "items": n * rounds,
            "items_per_message": per_message,
            "payload_bytes": raw.payload_bytes,
            "window": raw.window,
            "seconds": raw.elapsed.as_secs_f64(),
            "messages_per_s": raw.messages_per_s(),
            "items_per_s": raw_items_per_s,
        },
        "drain": {
            "items": n,
            "ready_s": drained.ready.as_secs_f64(),
            "acked_s": drained.acked.as_secs_f64(),
            "items_per_s": drain_rate,
            "messages": drained.messages,
            "payload_bytes": drained.bytes,
        },
        "ratio": crate::report::ratio(rate, raw_items_per_s),
        "drain_ratio": crate::report::ratio(drain_rate, raw_items_per_s),
    });

    let p = crate::report::percentile;
    let mut r = String::new();
    r.push_str(&format!("Command: `{command}`  \n"));
    r.push_str(&format!("Machine: {machine}  \n\n"));
    r.push_str("| Latency (loopback, embedded broker, default batch delay ");
    r.push_str(&format!(
        "{batch_delay} ms) | p50 | p90 | p99 | max |\n|---|---|---|---|---|\n"
    ));
    for (label, v) in [
        ("device write → visible in the cloud store", &up),
        ("cloud write → applied on the device", &down),
    ] {
        r.push_str(&format!(
            "| {label} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            p(v, 0.5),
            p(v, 0.9),
            p(v, 0.99),
            p(v, 1.0)
        ));
    }
    r.push_str(&format!(
        "\n| Throughput, one device | value |\n|---|---|\n| items written and acknowledged by the cloud | {n} |\n| local writes done after | {:.2} s |\n| all acknowledged after | {:.2} s |\n| sustained up throughput | {:.0} items/s |\n| MQTT messages published | {messages} ({:.1} items per message) |\n| payload bytes on the wire per synced item | {:.0} B |\n",
        written_at.as_secs_f64(),
        elapsed.as_secs_f64(),
        rate,
        n as f64 / messages.max(1) as f64,
        bytes as f64 / n as f64,
    ));
    r.push_str(&format!(
        "\n| Ceiling: the same items raw over MQTT QoS 1 (same embedded broker, device ACL, {} messages on their way) | devtables | raw MQTT | ratio |\n|---|---|---|---|\n",
        raw.window
    ));
    r.push_str(&format!(
        "| items per second: written and uploaded (the throughput run above) | {:.0} | {:.0} | {} |\n",
        rate,
        raw_items_per_s,
        crate::report::short(crate::report::ratio(rate, raw_items_per_s))
    ));
    r.push_str(&format!(
        "| items per second: a full outbox uploaded (written offline first; from the welcome, {:.2} s after start, to the last acknowledgement) | {:.0} | {:.0} | {} |\n",
        drained.ready.as_secs_f64(),
        drain_rate,
        raw_items_per_s,
        crate::report::short(crate::report::ratio(drain_rate, raw_items_per_s))
    ));
    r.push_str(&format!(
        "| messages, average payload | {messages}, {:.0} B | {} ({} × the same {}), {:.0} B | |\n",
        bytes as f64 / messages.max(1) as f64,
        raw.messages,
        rounds,
        payloads.len(),
        raw.payload_bytes as f64 / raw.messages.max(1) as f64
    ));
    r.push_str(&format!(
        "| messages of the full-outbox upload, average payload | {}, {:.0} B | | |\n",
        drained.messages,
        drained.bytes as f64 / drained.messages.max(1) as f64
    ));
    r.push_str(&format!(
        "| seconds for all | {:.2} s (full outbox: {:.2} s) | {:.2} s | |\n",
        elapsed.as_secs_f64(),
        drained.acked.as_secs_f64(),
        raw.elapsed.as_secs_f64()
    ));
    Ok((r, figures))
}
