//! `devtables bench scale-out`: the figures of a scaled-out cloud (docs/scale-out.md), side by
//! side in one run against the real services (PostgreSQL at `DEVTABLES_POSTGRES`, Mosquitto at
//! `DEVTABLES_MOSQUITTO`; a missing one fails the run, it never skips):
//!
//! 1. **Up-sync items/s**: the same fleet workload (`devtables_fleet::run`, devices writing up
//!    faster than the cloud answers) against one node on SQLite with the embedded broker, one
//!    node on PostgreSQL + Mosquitto, and three such nodes (the devices spread over the nodes'
//!    partitions; the simulator talks to node 1's API). Each against its ceilings, measured in
//!    the same run: the raw batch insert rate of its store (`store_rate`: `apply_push` called
//!    directly, one writer per node) and the raw MQTT QoS 1 publish rate through its broker
//!    (`mqtt_raw`, one subscriber per node, since every node reads every device message).
//! 2. **Takeover after a node kill** (`takeover`): three nodes, one SIGKILLed under load, the
//!    time until the others hold every partition and serve every device.
//! 3. **Broadcast** (`broadcast`): one write of an account-wide model to 1,000 and 10,000
//!    registered devices, on SQLite and on PostgreSQL.
//!
//! The cloud nodes are `devtables cloud` processes (`nodes`, `deployment`), so a node can be
//! killed and its CPU read from `/proc` (`cpu`); every PostgreSQL variant works in a schema of
//! its own, dropped after it (`services`, `scratch`). `--quick` runs every part at tiny sizes
//! (seconds), as `.ci/run` does, and fails on any write not accounted for, a takeover that does
//! not complete, or a broadcast that misses a feed; no timing is asserted.

mod broadcast;
mod cpu;
mod deployment;
mod http;
mod nodes;
mod scratch;
mod services;
mod store_rate;
mod takeover;
mod up_sync;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use devtables_schema::Schema;
use serde::Serialize;
use serde_json::json;

use crate::mqtt_raw::{self, RawBroker};
use crate::report::{ratio, short, thousands, write_json};
use crate::ChildCommand;
use broadcast::BroadcastFigure;
use deployment::{Deployment, Variant};
use scratch::StoreKind;
use services::{PgSchema, Services};
use store_rate::{RateFigure, RateSpec};
use takeover::TakeoverFigure;
use up_sync::{Load, UpSyncFigure};

const SCHEMA: &str = include_str!("../../../examples/schema.json5");
/// Nodes of the scaled-out variants.
const CLUSTER_NODES: usize = 3;
/// Distinct push messages the raw MQTT runs cycle through.
const RAW_PAYLOADS: usize = 100;

#[derive(clap::Args, Debug)]
pub struct ScaleOutArgs {
    /// Simulated devices of the up-sync runs.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Up writes per device per second in the up-sync runs (offered: devices × rate, meant to
    /// be more than the cloud acknowledges).
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Length of each up-sync run's write phase, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Longest wait after the writes for every write to be acknowledged, in seconds.
    #[arg(long, default_value_t = 120)]
    drain_secs: u64,
    /// Simulated devices of the takeover run.
    #[arg(long, default_value_t = 300)]
    takeover_devices: usize,
    /// Up writes per device per second in the takeover run (below capacity, so the takeover
    /// is what the lag shows).
    #[arg(long, default_value_t = 1.0)]
    takeover_rate: f64,
    /// Length of the takeover run's write phase, in seconds (it must outlast a few leases).
    #[arg(long, default_value_t = 20)]
    takeover_duration_secs: u64,
    /// The cluster's lease (`cluster_lease_ms`) in every cluster run.
    #[arg(long, default_value_t = 5000)]
    lease_ms: u64,
    /// Account sizes of the broadcast figure.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000usize, 10_000])]
    broadcast_devices: Vec<usize>,
    /// Changes each writer of the raw store ceiling applies.
    #[arg(long, default_value_t = 10_000)]
    store_items: usize,
    /// Changes per push in the raw store ceiling.
    #[arg(long, default_value_t = 20)]
    store_batch: usize,
    /// Pushes per commit in the raw store ceiling's grouped runs (the service's group commit).
    #[arg(long, default_value_t = 16)]
    store_group: usize,
    /// Messages of each raw MQTT ceiling run.
    #[arg(long, default_value_t = 20_000)]
    mqtt_messages: usize,
    /// Raw MQTT messages on their way at once (published, not yet received by every
    /// subscriber): many devices' pushes in flight.
    #[arg(long, default_value_t = 64)]
    mqtt_window: usize,
    /// The `devtables` binary that runs the cloud nodes (default: this program when it is
    /// `devtables`, else the `devtables` beside it).
    #[arg(long)]
    program: Option<PathBuf>,
    /// Tiny sizes (seconds in all), for CI: fails on anything not accounted for.
    #[arg(long)]
    quick: bool,
    /// Only the broadcast figure (the stores alone: no cloud nodes, no broker), printed as its
    /// table.
    #[arg(long)]
    broadcast_only: bool,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The sizes of a run, after `--quick`.
#[derive(Clone, Debug)]
struct Plan {
    up: Load,
    takeover: Load,
    lease_ms: u64,
    broadcast_devices: Vec<usize>,
    store_items: usize,
    store_batch: usize,
    store_group: usize,
    mqtt_messages: usize,
    mqtt_window: usize,
}

impl Plan {
    fn of(args: &ScaleOutArgs) -> anyhow::Result<Plan> {
        let plan = if args.quick {
            Plan {
                up: Load {
                    devices: 20,
                    rate: 2.0,
                    duration: Duration::from_secs(3),
                    drain: Duration::from_secs(30),
                },
                takeover: Load {
                    devices: 20,
                    rate: 2.0,
                    duration: Duration::from_secs(8),
                    drain: Duration::from_secs(30),
                },
                lease_ms: 1500,
                broadcast_devices: vec![50, 200],
                store_items: 400,
                store_batch: 10,
                store_group: 4,
                mqtt_messages: 300,
                mqtt_window: 16,
            }
        } else {
            Plan {
                up: Load {
                    devices: args.devices,
                    rate: args.rate,
                    duration: Duration::from_secs(args.duration_secs),
                    drain: Duration::from_secs(args.drain_secs),
                },
                takeover: Load {
                    devices: args.takeover_devices,
                    rate: args.takeover_rate,
                    duration: Duration::from_secs(args.takeover_duration_secs),
                    drain: Duration::from_secs(args.drain_secs),
                },
                lease_ms: args.lease_ms,
                broadcast_devices: args.broadcast_devices.clone(),
                store_items: args.store_items,
                store_batch: args.store_batch,
                store_group: args.store_group,
                mqtt_messages: args.mqtt_messages,
                mqtt_window: args.mqtt_window,
            }
        };
        // The kill comes once every device is served; the writes must go on for the lease to
        // run out, a lease round to claim, and the devices to push again.
        if plan.takeover.duration < Duration::from_millis(plan.lease_ms * 3) {
            bail!(
                "the takeover's write phase ({:?}) must last at least three leases ({} ms each)",
                plan.takeover.duration,
                plan.lease_ms
            );
        }
        for (what, n) in [
            ("devices", plan.up.devices),
            ("takeover-devices", plan.takeover.devices),
            ("store-items", plan.store_items),
            ("store-batch", plan.store_batch),
            ("store-group", plan.store_group),
            ("mqtt-messages", plan.mqtt_messages),
            ("mqtt-window", plan.mqtt_window),
        ] {
            if n == 0 {
                bail!("--{what} must be at least 1");
            }
        }
        for (what, r) in [
            ("rate", plan.up.rate),
            ("takeover-rate", plan.takeover.rate),
        ] {
            if !(r.is_finite() && r > 0.0) {
                bail!("--{what} must be a rate above 0, not {r}");
            }
        }
        Ok(plan)
    }
}

/// The `devtables` binary: given, or this program if it is `devtables`, or its sibling.
fn cloud_program(args: &ScaleOutArgs, child: &ChildCommand) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.program {
        return Ok(p.clone());
    }
    let this = child.program();
    let name = this.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let program = if name == "devtables" {
        this.to_path_buf()
    } else {
        this.with_file_name("devtables")
    };
    anyhow::ensure!(
        program.is_file(),
        "no devtables binary at {} (build it, or pass --program)",
        program.display()
    );
    Ok(program)
}

/// A raw MQTT ceiling run.
#[derive(Clone, Debug, Serialize)]
struct MqttFigure {
    broker: &'static str,
    subscribers: usize,
    messages: usize,
    window: usize,
    payload_bytes_avg: f64,
    seconds: f64,
    messages_per_s: f64,
}

/// An up-sync variant with its ceilings and ratios.
#[derive(Clone, Debug, Serialize)]
struct UpSyncRow {
    #[serde(flatten)]
    figure: UpSyncFigure,
    /// The store ceiling it is compared with (index into `store_ceiling`), its rate, the ratio.
    store_ceiling: usize,
    store_ceiling_items_per_s: f64,
    store_ratio: f64,
    /// The MQTT ceiling (index into `mqtt_ceiling`), its rate, the ratio of device messages
    /// handled per second to it.
    mqtt_ceiling: usize,
    mqtt_ceiling_messages_per_s: f64,
    mqtt_ratio: f64,
}

pub fn run(args: &ScaleOutArgs, child: &ChildCommand) -> anyhow::Result<()> {
    let plan = Plan::of(args)?;
    let program = cloud_program(args, child)?;
    let services = Services::find()?;
    let schema = Arc::new(Schema::from_json5(SCHEMA).context("the example schema")?);
    if let Err(e) = devtables_fleet::procfs::raise_open_files_limit() {
        eprintln!("open files: cannot raise the limit: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(64)
        .build()
        .context("cannot start the async runtime")?;
    let pg = StoreKind::Postgres {
        url: services.postgres.clone(),
    };

    // Broadcasts.
    let mut broadcasts = Vec::new();
    for &n in &plan.broadcast_devices {
        for kind in [StoreKind::Sqlite, pg.clone()] {
            eprintln!("== scale-out broadcast: {} devices on {}", n, kind.label());
            broadcasts.push(broadcast::measure(&kind, n, &schema)?);
        }
    }
    if args.broadcast_only {
        println!("{}", broadcast::table(&broadcasts));
        return Ok(());
    }

    // Ceilings: the stores alone (off the runtime: the PostgreSQL client runs its own).
    let store_specs = [
        (StoreKind::Sqlite, 1, plan.store_group),
        (StoreKind::Sqlite, 1, 1),
        (pg.clone(), 1, plan.store_group),
        (pg.clone(), 1, 1),
        (pg.clone(), CLUSTER_NODES, plan.store_group),
    ];
    let mut store_ceiling = Vec::new();
    for (store, writers, group) in store_specs {
        eprintln!(
            "== scale-out store ceiling: {} × {writers} writer(s), {} changes per push, {group} per commit",
            store.label(),
            plan.store_batch
        );
        let spec = RateSpec {
            store,
            writers,
            items_per_writer: plan.store_items,
            batch: plan.store_batch,
            group,
        };
        store_ceiling.push(store_rate::measure(&spec, &schema)?);
    }

    // Ceilings: the brokers alone.
    let payloads = {
        let items = crate::wire::stored_items(
            &schema,
            "Reading",
            (0..RAW_PAYLOADS).map(|i| {
                json!({"deviceId": "raw1", "name": "temperature", "value": i})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            }),
        )?;
        crate::wire::push_payloads(&schema, "Reading", items, 1)?
    };
    let max_packet = devtables_sync::wire::WireConfig::default().max_message_bytes + 4096;
    let rounds = plan.mqtt_messages.div_ceil(RAW_PAYLOADS);
    let mut mqtt_ceiling = Vec::new();
    for (broker, subscribers) in [
        (RawBroker::Embedded, 1),
        (RawBroker::External(&services.mosquitto), 1),
        (RawBroker::External(&services.mosquitto), CLUSTER_NODES),
    ] {
        let name = match broker {
            RawBroker::Embedded => "embedded (rmqtt)",
            RawBroker::External(_) => "Mosquitto",
        };
        eprintln!("== scale-out MQTT ceiling: {name}, {subscribers} subscriber(s)");
        let raw = runtime.block_on(mqtt_raw::publish_rate_via(
            broker,
            subscribers,
            &payloads,
            rounds,
            plan.mqtt_window,
            max_packet,
        ))?;
        mqtt_ceiling.push(MqttFigure {
            broker: name,
            subscribers: raw.subscribers,
            messages: raw.messages,
            window: raw.window,
            payload_bytes_avg: raw.payload_bytes as f64 / raw.messages.max(1) as f64,
            seconds: raw.elapsed.as_secs_f64(),
            messages_per_s: raw.messages_per_s(),
        });
    }

    // Up-sync, the three variants, each on fresh nodes and a fresh schema.
    let mut up_rows = Vec::new();
    let mut incomplete = Vec::new();
    for nodes in [0, 1, CLUSTER_NODES] {
        let schema_of_run = (nodes > 0)
            .then(|| PgSchema::fresh(&services.postgres))
            .transpose()?;
        let variant = match &schema_of_run {
            None => Variant::SqliteEmbedded,
            Some(s) => Variant::Postgres {
                url: services.postgres.clone(),
                schema: s.name.clone(),
                mosquitto: services.mosquitto.clone(),
                nodes,
            },
        };
        let (store_index, mqtt_index) = match nodes {
            0 => (0, 0),
            1 => (2, 1),
            _ => (4, 2),
        };
        let figure = runtime.block_on(async {
            let d = Deployment::start(&program, variant, Some(plan.lease_ms)).await?;
            let measured = up_sync::measure(&d, plan.up).await;
            d.stop().await;
            measured
        });
        // The nodes are stopped: the schema can go.
        drop(schema_of_run);
        let (figure, _report) = figure?;
        if !figure.complete {
            incomplete.push(format!(
                "{}: {} writes unacknowledged after the drain (see the simulator's report)",
                figure.variant, figure.unacknowledged
            ));
        }
        let store = store_ceiling[store_index].items_per_s;
        let mqtt = mqtt_ceiling[mqtt_index].messages_per_s;
        up_rows.push(UpSyncRow {
            store_ratio: ratio(figure.up_per_s, store),
            mqtt_ratio: figure.messages_per_s.map_or(f64::NAN, |m| ratio(m, mqtt)),
            figure,
            store_ceiling: store_index,
            store_ceiling_items_per_s: store,
            mqtt_ceiling: mqtt_index,
            mqtt_ceiling_messages_per_s: mqtt,
        });
    }

    // Takeover.
    let schema_of_run = PgSchema::fresh(&services.postgres)?;
    let variant = Variant::Postgres {
        url: services.postgres.clone(),
        schema: schema_of_run.name.clone(),
        mosquitto: services.mosquitto.clone(),
        nodes: CLUSTER_NODES,
    };
    let taken = runtime.block_on(async {
        let mut d = Deployment::start(&program, variant, Some(plan.lease_ms)).await?;
        let measured = takeover::measure(&mut d, plan.takeover, plan.lease_ms).await;
        d.stop().await;
        measured
    });
    drop(schema_of_run);
    let (takeover, _report) = taken?;
    drop(runtime);

    let command = if args.quick {
        "devtables bench scale-out --quick".to_string()
    } else {
        format!(
            "devtables bench scale-out --devices {} --rate {} --duration-secs {} --drain-secs {} --takeover-devices {} --takeover-rate {} --lease-ms {} --broadcast-devices {} --store-items {} --store-batch {} --store-group {} --mqtt-messages {} --mqtt-window {}",
            plan.up.devices,
            plan.up.rate,
            plan.up.duration.as_secs(),
            plan.up.drain.as_secs(),
            plan.takeover.devices,
            plan.takeover.rate,
            plan.lease_ms,
            plan.broadcast_devices
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
            plan.store_items,
            plan.store_batch,
            plan.store_group,
            plan.mqtt_messages,
            plan.mqtt_window,
        )
    };
    let machine = crate::sys::machine_line();
    let report = Report {
        command: &command,
        machine: &machine,
        up: &up_rows,
        store: &store_ceiling,
        mqtt: &mqtt_ceiling,
        takeover: &takeover,
        broadcasts: &broadcasts,
    };
    let text = report.markdown();
    print!("{text}");
    if let Some(path) = &args.out {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        write_json(
            path,
            &json!({
                "bench": "scale-out",
                "command": command,
                "machine": machine,
                "quick": args.quick,
                "postgres": services.postgres,
                "mosquitto": services.mosquitto,
                "up_sync": up_rows,
                "store_ceiling": store_ceiling,
                "mqtt_ceiling": mqtt_ceiling,
                "takeover": takeover,
                "broadcast": broadcasts,
            }),
        )?;
    }
    // A run whose writes are not all accounted for, or whose takeover did not complete, is
    // reported; with --quick (CI) it fails.
    if !takeover.complete {
        incomplete.push(format!(
            "takeover: {} writes unacknowledged after the drain",
            takeover.unacknowledged
        ));
    }
    if takeover.partitions_s.is_none() || takeover.sessions_s.is_none() {
        incomplete
            .push("takeover: the survivors did not take over every partition and device".into());
    }
    if !incomplete.is_empty() {
        let what = incomplete.join("; ");
        if args.quick {
            bail!("{what}");
        }
        eprintln!("warning: {what}");
    }
    Ok(())
}

/// Everything measured, for the Markdown report.
struct Report<'a> {
    command: &'a str,
    machine: &'a str,
    up: &'a [UpSyncRow],
    store: &'a [RateFigure],
    mqtt: &'a [MqttFigure],
    takeover: &'a TakeoverFigure,
    broadcasts: &'a [BroadcastFigure],
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("–".into(), |v| format!("{}{unit}", short(v)))
}

fn store_label(f: &RateFigure) -> String {
    format!(
        "{}, {} writer{}, {} changes per push, {} per commit",
        f.store,
        f.writers,
        if f.writers == 1 { "" } else { "s" },
        f.batch,
        if f.group == 1 {
            "each push".to_string()
        } else {
            format!("{} pushes", f.group)
        }
    )
}

fn mqtt_label(f: &MqttFigure) -> String {
    format!(
        "{}, {} subscriber{}",
        f.broker,
        f.subscribers,
        if f.subscribers == 1 { "" } else { "s" }
    )
}

impl Report<'_> {
    fn markdown(&self) -> String {
        let mut r = String::new();
        r.push_str(&format!("Command: `{}`  \n", self.command));
        r.push_str(&format!("Machine: {}  \n\n", self.machine));
        r.push_str(&self.up_table());
        r.push('\n');
        r.push_str(&self.store_table());
        r.push('\n');
        r.push_str(&self.mqtt_table());
        r.push('\n');
        r.push_str(&self.takeover_table());
        r.push('\n');
        r.push_str(&self.broadcast_table());
        r
    }

    fn up_table(&self) -> String {
        let mut r = String::from("| Up-sync, the same fleet workload |");
        for row in self.up {
            r.push_str(&format!(" {} |", row.figure.variant));
        }
        r.push_str("\n|---|");
        r.push_str(&"---|".repeat(self.up.len()));
        r.push('\n');
        let mut line = |label: &str, cell: &dyn Fn(&UpSyncRow) -> String| {
            r.push_str(&format!("| {label} |"));
            for row in self.up {
                r.push_str(&format!(" {} |", cell(row)));
            }
            r.push('\n');
        };
        line("devices × writes/s each (offered/s)", &|u| {
            format!(
                "{} × {} ({})",
                thousands(u.figure.devices as f64),
                u.figure.rate_per_device,
                thousands(u.figure.offered_up_per_s)
            )
        });
        line("**acknowledged items/s** during the writes", &|u| {
            format!("**{}**", thousands(u.figure.up_per_s))
        });
        line("up lag p50 / p99 / max", &|u| {
            format!(
                "{} / {} / {} ms",
                short(u.figure.up_lag_p50_ms),
                short(u.figure.up_lag_p99_ms),
                short(u.figure.up_lag_max_ms)
            )
        });
        line("device messages handled/s (items per message)", &|u| {
            format!(
                "{} ({})",
                u.figure.messages_per_s.map_or("–".into(), thousands),
                opt(u.figure.items_per_message, "")
            )
        });
        line(
            "CPU, % of one core: cloud nodes / PostgreSQL / Mosquitto",
            &|u| {
                format!(
                    "{} / {} / {}",
                    opt(u.figure.cloud_cpu_pct, ""),
                    opt(u.figure.postgres_cpu_pct, ""),
                    opt(u.figure.broker_cpu_pct, "")
                )
            },
        );
        line("CPU of the simulator (same machine)", &|u| {
            opt(u.figure.sim_cpu_pct, " %")
        });
        line("ceiling: raw store inserts, items/s", &|u| {
            format!(
                "{} ({})",
                thousands(u.store_ceiling_items_per_s),
                store_label(&self.store[u.store_ceiling])
            )
        });
        line("**ratio** acknowledged / store ceiling", &|u| {
            format!("**{}**", short(u.store_ratio))
        });
        line("ceiling: raw MQTT QoS 1, messages/s", &|u| {
            format!(
                "{} ({})",
                thousands(u.mqtt_ceiling_messages_per_s),
                mqtt_label(&self.mqtt[u.mqtt_ceiling])
            )
        });
        line("ratio messages handled / MQTT ceiling", &|u| {
            short(u.mqtt_ratio)
        });
        line("writes acknowledged / written by the drain's end", &|u| {
            format!(
                "{} / {}{}",
                thousands(u.figure.up_acked as f64),
                thousands(u.figure.up_written as f64),
                if u.figure.complete {
                    ""
                } else {
                    " (incomplete)"
                }
            )
        });
        r
    }

    fn store_table(&self) -> String {
        let mut r = String::from(
            "| Ceiling: raw batch inserts (`CloudStore::apply_push` directly) | items | commits | seconds | items/s |\n|---|---|---|---|---|\n",
        );
        for f in self.store {
            r.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                store_label(f),
                thousands(f.items as f64),
                thousands(f.commits as f64),
                short(f.seconds),
                thousands(f.items_per_s)
            ));
        }
        r
    }

    fn mqtt_table(&self) -> String {
        let mut r = String::from(
            "| Ceiling: raw MQTT QoS 1 publish (one change per push, as the fleet's) | messages | window | payload | seconds | messages/s |\n|---|---|---|---|---|---|\n",
        );
        for f in self.mqtt {
            r.push_str(&format!(
                "| {} | {} | {} | {:.0} B | {} | {} |\n",
                mqtt_label(f),
                thousands(f.messages as f64),
                f.window,
                f.payload_bytes_avg,
                short(f.seconds),
                thousands(f.messages_per_s)
            ));
        }
        r
    }

    fn takeover_table(&self) -> String {
        let t = self.takeover;
        let mut r = String::from(
            "| Takeover: 3 nodes, one killed with SIGKILL under load | value |\n|---|---|\n",
        );
        r.push_str(&format!(
            "| devices × writes/s each | {} × {} |\n",
            thousands(t.devices as f64),
            t.rate_per_device
        ));
        r.push_str(&format!(
            "| lease (`cluster_lease_ms`) | {} ms |\n",
            t.lease_ms
        ));
        r.push_str(&format!(
            "| the killed node held / served | {} of {} partitions / {} devices |\n",
            t.killed_partitions, t.partitions, t.killed_sessions
        ));
        r.push_str(&format!(
            "| **kill → the survivors hold every partition** | **{}** |\n",
            opt(t.partitions_s, " s")
        ));
        r.push_str(&format!(
            "| kill → the survivors serve every device (welcomed again) | {} |\n",
            opt(t.sessions_s, " s")
        ));
        r.push_str(&format!(
            "| up lag over the run p50 / p99 / max | {} / {} / {} ms |\n",
            short(t.up_lag_p50_ms),
            short(t.up_lag_p99_ms),
            short(t.up_lag_max_ms)
        ));
        r.push_str(&format!(
            "| writes acknowledged / written by the drain's end | {} / {}{} |\n",
            thousands(t.up_acked as f64),
            thousands(t.up_written as f64),
            if t.complete { "" } else { " (incomplete)" }
        ));
        r
    }

    fn broadcast_table(&self) -> String {
        broadcast::table(self.broadcasts)
    }
}
