//! `db`: the device database benchmark. The original's workload (see `workload`) on devtables
//! and on SQLite, each size and engine in a fresh child process (the program re-executed with
//! the hidden `child` subcommand) so the peak RSS is per configuration; the durable
//! (`immediate`) write rates against the raw disk sync rate; and the ceiling of the grouped
//! creates, the log store written directly with the same bytes (`store_raw`), with the ratio. It prints a
//! Markdown report (also to `--out`), and its figures as JSON with `--json`. Every database file
//! lives in a temporary directory under /tmp that the parent removes at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::report::{ratio, short, size_label, thousands, write_json};
use crate::workload::Metrics;
use crate::{dt, spike, sq, store_raw, sys, ChildCommand};

#[derive(clap::Args, Debug)]
pub struct DbArgs {
    /// Item counts of the grouped-write runs.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 100_000])]
    sizes: Vec<usize>,
    /// Items created in the immediate-durability runs.
    #[arg(long, default_value_t = 3_000)]
    immediate_items: usize,
    /// Concurrent writer threads of the group-commit run.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Also run the storage-design spike (`spike.rs`) at the largest size, one child per
    /// design, and print its table.
    #[arg(long)]
    spike: bool,
    /// A run of seconds for CI: 1,000 items, 20 durable writes, 0.2 s raw disk spans (overrides
    /// the sizes); no timing claims.
    #[arg(long)]
    quick: bool,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One configuration, run in a fresh process.
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    #[arg(long)]
    engine: String,
    #[arg(long)]
    n: usize,
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Length of each raw disk sync measurement, in ms.
    #[arg(long, default_value_t = 2000)]
    raw_ms: u64,
}

/// The sizes and spans a run uses, after `--quick`.
struct Plan {
    sizes: Vec<usize>,
    immediate_items: usize,
    raw_span: Duration,
}

impl Plan {
    fn of(args: &DbArgs) -> Plan {
        if args.quick {
            Plan {
                sizes: vec![1_000],
                immediate_items: 20,
                raw_span: Duration::from_millis(200),
            }
        } else {
            Plan {
                sizes: args.sizes.clone(),
                immediate_items: args.immediate_items,
                raw_span: RAW_SPAN,
            }
        }
    }
}

/// The child: one configuration, its metrics printed as one JSON line.
pub fn child_main(args: &ChildArgs) -> anyhow::Result<()> {
    let m = child(
        &args.engine,
        args.n,
        &args.dir,
        args.writers,
        Duration::from_millis(args.raw_ms),
    )?;
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

const RAW_SPAN: Duration = Duration::from_secs(2);

fn child(
    engine: &str,
    n: usize,
    dir: &Path,
    writers: usize,
    raw_span: Duration,
) -> anyhow::Result<Metrics> {
    let (wall, cpu, load) = (Instant::now(), sys::cpu_seconds(), sys::load1());
    let mut m = run_engine(engine, n, dir, writers, raw_span)?;
    m.insert(
        "cpu_share".into(),
        (sys::cpu_seconds() - cpu) / wall.elapsed().as_secs_f64(),
    );
    m.insert("load1_start".into(), load);
    m.insert("load1_end".into(), sys::load1());
    Ok(m)
}

fn run_engine(
    engine: &str,
    n: usize,
    dir: &Path,
    writers: usize,
    raw_span: Duration,
) -> anyhow::Result<Metrics> {
    if let Some(design) = engine.strip_prefix("spike-") {
        return spike::run(design, dir, n);
    }
    match engine {
        "devtables" => dt::grouped(dir, n),
        "sqlite" => sq::grouped(dir, n),
        "store-raw" => store_raw::grouped(dir, n),
        "immediate" => {
            // The disk rate drifts on a shared machine: every durable run is bracketed by a
            // raw measurement and compared with the mean of the two around it.
            let mut m = Metrics::new();
            let raw = |m: &mut Metrics, k: usize| -> anyhow::Result<()> {
                eprintln!("  .. raw append 200 B + fdatasync for {raw_span:?}");
                m.insert(
                    format!("raw{k}_per_s"),
                    sys::raw_fdatasync_rate(dir, raw_span)?,
                );
                Ok(())
            };
            raw(&mut m, 0)?;
            dt::immediate_one(dir, n, &mut m)?;
            raw(&mut m, 1)?;
            dt::immediate_many(dir, n, writers, &mut m)?;
            raw(&mut m, 2)?;
            sq::one_by_one(dir, n, "FULL", &mut m)?;
            raw(&mut m, 3)?;
            // Not durable per write: only for the bytes each item costs the disk.
            dt::periodic_one(dir, n, &mut m)?;
            sq::one_by_one(dir, n, "NORMAL", &mut m)?;
            m.insert("writers".into(), writers as f64);
            Ok(m)
        }
        other => bail!("unknown engine {other}"),
    }
}

/// Runs one configuration in a fresh process (so VmHWM is its own) in its own directory.
fn spawn(
    child: &ChildCommand,
    tmp: &Path,
    engine: &str,
    n: usize,
    writers: usize,
    raw_span: Duration,
) -> anyhow::Result<Metrics> {
    let dir = tmp.join(format!("{engine}-{n}"));
    std::fs::create_dir_all(&dir)?;
    eprintln!("== {engine}, N={n}");
    let start = Instant::now();
    let mut command = child.command("child");
    command
        .args(["--engine", engine, "--n", &n.to_string()])
        .arg("--dir")
        .arg(&dir)
        .args(["--writers", &writers.to_string()])
        .args(["--raw-ms", &raw_span.as_millis().to_string()]);
    let m: anyhow::Result<Metrics> = child.output_json(command, &format!("{engine} N={n}"));
    let _ = std::fs::remove_dir_all(&dir);
    let m = m?;
    eprintln!("   done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(m)
}

/// The ceiling row of one size: devtables' grouped creates against its store written directly.
struct Ceiling {
    n: usize,
    devtables: f64,
    devtables_cpu: f64,
    raw_items: f64,
    raw_items_cpu: f64,
    raw_tables: f64,
    raw_tables_cpu: f64,
    item_bytes: f64,
}

impl Ceiling {
    fn of(n: usize, grouped: &BTreeMap<(usize, String), Metrics>) -> Ceiling {
        let get = |engine: &str, k: &str| {
            grouped
                .get(&(n, engine.to_string()))
                .and_then(|m| m.get(k).copied())
                .unwrap_or(f64::NAN)
        };
        Ceiling {
            n,
            devtables: get("devtables", "create_per_s"),
            devtables_cpu: get("devtables", "create_per_s_cpu"),
            raw_items: get("store-raw", "raw_items_per_s"),
            raw_items_cpu: get("store-raw", "raw_items_per_s_cpu"),
            raw_tables: get("store-raw", "raw_tables_per_s"),
            raw_tables_cpu: get("store-raw", "raw_tables_per_s_cpu"),
            item_bytes: get("store-raw", "item_bytes"),
        }
    }

    fn json(&self) -> Value {
        json!({
            "n": self.n,
            "devtables_create_per_s": self.devtables,
            "devtables_create_per_s_cpu": self.devtables_cpu,
            "raw_items_per_s": self.raw_items,
            "raw_items_per_s_cpu": self.raw_items_cpu,
            "raw_tables_per_s": self.raw_tables,
            "raw_tables_per_s_cpu": self.raw_tables_cpu,
            "item_bytes": self.item_bytes,
            "ratio_to_raw_items": ratio(self.devtables, self.raw_items),
            "ratio_to_raw_tables": ratio(self.devtables, self.raw_tables),
            "ratio_to_raw_items_cpu": ratio(self.devtables_cpu, self.raw_items_cpu),
            "ratio_to_raw_tables_cpu": ratio(self.devtables_cpu, self.raw_tables_cpu),
        })
    }
}

pub fn run(args: &DbArgs, child: &ChildCommand) -> anyhow::Result<()> {
    let plan = Plan::of(args);
    if plan.sizes.is_empty() || plan.sizes.contains(&0) {
        bail!("--sizes needs positive item counts");
    }
    let started = Instant::now();
    let machine = sys::machine_line();
    let tmp = sys::TempDir::new("devtables-bench")?;
    let mut grouped = BTreeMap::new();
    for &n in &plan.sizes {
        for engine in configs() {
            let m = spawn(child, tmp.path(), &engine, n, args.writers, plan.raw_span)?;
            grouped.insert((n, engine), m);
        }
    }
    let imm = spawn(
        child,
        tmp.path(),
        "immediate",
        plan.immediate_items,
        args.writers,
        plan.raw_span,
    )?;
    let spike_n = plan.sizes.iter().copied().max().unwrap_or(0);
    let mut spikes = BTreeMap::new();
    if args.spike {
        for design in spike::DESIGNS {
            let engine = format!("spike-{design}");
            let m = spawn(
                child,
                tmp.path(),
                &engine,
                spike_n,
                args.writers,
                plan.raw_span,
            )?;
            spikes.insert(design.to_string(), m);
        }
    }
    drop(tmp);
    let ceilings: Vec<Ceiling> = plan
        .sizes
        .iter()
        .map(|&n| Ceiling::of(n, &grouped))
        .collect();
    let report = report(
        args,
        &plan,
        &machine,
        &grouped,
        &imm,
        &ceilings,
        started.elapsed(),
    );
    let report = if args.spike {
        format!("{report}{}", spike::table(spike_n, &spikes))
    } else {
        report
    };
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("write {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    if let Some(path) = &args.json {
        let mut runs = serde_json::Map::new();
        for ((n, engine), m) in &grouped {
            let entry = runs
                .entry(engine.clone())
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
            entry[n.to_string()] = json!(m);
        }
        write_json(
            path,
            &json!({
                "bench": "db",
                "command": command_line(args, &plan),
                "machine": machine,
                "quick": args.quick,
                "sizes": plan.sizes,
                "writers": args.writers,
                "runs": runs,
                "immediate": imm,
                "immediate_items": plan.immediate_items,
                "ceiling": ceilings.iter().map(Ceiling::json).collect::<Vec<_>>(),
                "spike": spikes,
                "spike_n": spike_n,
                "seconds": started.elapsed().as_secs_f64(),
            }),
        )?;
    }
    Ok(())
}

fn command_line(args: &DbArgs, plan: &Plan) -> String {
    if args.quick {
        return "devtables bench db --quick".into();
    }
    let sizes_arg = plan
        .sizes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "devtables bench db --sizes {sizes_arg} --immediate-items {}{}{}",
        plan.immediate_items,
        if args.spike { " --spike" } else { "" },
        if args.writers != 8 {
            format!(" --writers {}", args.writers)
        } else {
            String::new()
        },
    )
}

/// The engine configurations of the grouped runs, in column order.
fn configs() -> Vec<String> {
    vec![
        "devtables".to_string(),
        "sqlite".to_string(),
        "store-raw".to_string(),
    ]
}

fn config_label(engine: &str) -> String {
    match engine {
        "devtables" => "devtables".into(),
        "sqlite" => "SQLite".into(),
        "store-raw" => "log store directly".into(),
        other => other.into(),
    }
}

// ---- report ----

enum Unit {
    Rate,
    Ms,
    Us,
    Mib,
    Ratio,
    Bytes,
}

fn cell(m: &Metrics, key: &str, unit: &Unit) -> String {
    let Some(&v) = m.get(key) else {
        return "-".into();
    };
    match unit {
        Unit::Rate => format!("{}/s", thousands(v)),
        Unit::Ms => format!("{} ms", short(v)),
        Unit::Us => format!("{} µs", short(v)),
        Unit::Mib => format!("{} MiB", short(v)),
        Unit::Ratio => format!("{v:.2}"),
        Unit::Bytes => format!("{} B", thousands(v)),
    }
}

type Row<'a> = (&'a str, &'a str, Unit, &'a str);

/// One Markdown table: a row per operation, a column per (size, engine), plus the original's.
fn table(
    sizes: &[usize],
    engines: &[String],
    rows: &[Row<'_>],
    suffix: &str,
    with_original: bool,
    grouped: &BTreeMap<(usize, String), Metrics>,
) -> String {
    let mut s = String::from("| Operation |");
    let mut rule = String::from("|---|");
    for &n in sizes {
        for engine in engines {
            s.push_str(&format!(" N={} {} |", size_label(n), config_label(engine)));
            rule.push_str("---|");
        }
    }
    if with_original {
        s.push_str(" Original C, in memory (N=10k / 100k) |");
        rule.push_str("---|");
    }
    s.push('\n');
    s.push_str(&rule);
    s.push('\n');
    let empty = Metrics::new();
    for (label, key, unit, original) in rows {
        let mut line = format!("| {label} |");
        for &n in sizes {
            for engine in engines {
                let m = grouped.get(&(n, engine.clone())).unwrap_or(&empty);
                let mut c = cell(m, &format!("{key}{suffix}"), unit);
                let extra = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
                if suffix.is_empty() && c != "-" {
                    match *key {
                        "prefix_find_us" => {
                            c.push_str(&format!(" ({} items avg)", short(extra("prefix_items"))))
                        }
                        "index_find_ms" | "index_find_as_ms" | "scan_find_ms" => {
                            c.push_str(&format!(" ({} items)", thousands(extra("filter_items"))))
                        }
                        _ => {}
                    }
                }
                line.push_str(&format!(" {c} |"));
            }
        }
        if with_original {
            line.push_str(&format!(" {original} |"));
        }
        line.push('\n');
        s.push_str(&line);
    }
    s
}

fn report(
    args: &DbArgs,
    plan: &Plan,
    machine: &str,
    grouped: &BTreeMap<(usize, String), Metrics>,
    imm: &Metrics,
    ceilings: &[Ceiling],
    took: Duration,
) -> String {
    let mut s = String::new();
    s.push_str(&format!("Command: `{}`  \n", command_line(args, plan)));
    s.push_str(&format!("Machine: {machine}  \n"));
    s.push_str(&format!(
        "Whole run: {:.0} s; single runs (no repetition); each column is a fresh process; files in a temporary directory under {}.\n\n",
        took.as_secs_f64(),
        std::env::temp_dir().display()
    ));

    let rows: [(&str, &str, Unit, &str); 27] = [
        (
            "create, 1,000 per transaction (devtables: `create_owned`, the input by value, the key returned)",
            "create_per_s",
            Unit::Rate,
            "~295,000 / ~280,000",
        ),
        (
            "(floor) schema + JSON work of a create alone: prepare_create, primary_key, to_vec",
            "floor_create_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "make durable after the creates (flush / WAL checkpoint)",
            "flush_ms",
            Unit::Ms,
            "full save ~9 / ~95 ms",
        ),
        (
            "get by key, shuffled, one snapshot per get",
            "get_each_per_s",
            Unit::Rate,
            "~515,000 / ~370,000",
        ),
        (
            "get by key, shuffled, all in one read transaction",
            "get_txn_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "get into the caller's struct (`get_as`; SQLite: serde_json into the struct), one snapshot per get",
            "get_as_each_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "get into the caller's struct, all in one read transaction",
            "get_as_txn_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "get into a borrowed view, every field read (`get_view`; SQLite: `get_ref` + serde_json borrowing), one snapshot per get",
            "get_view_each_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "get into a borrowed view, every field read, all in one read transaction",
            "get_view_txn_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "get into a borrowed view, the key as text pairs (`get_view_by`; SQLite: the same key rendering), one snapshot per get",
            "get_view_by_each_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "(floor) work of a get without storage: key map, primary_key, JSON parse, project",
            "floor_get_per_s",
            Unit::Rate,
            "-",
        ),
        (
            "find by pk + sort-key prefix (per query)",
            "prefix_find_us",
            Unit::Us,
            "-",
        ),
        (
            "find status == fault via index gs1 / status (per query)",
            "index_find_ms",
            Unit::Ms,
            "- (no secondary index)",
        ),
        (
            "find status == fault via gs1 into the caller's struct (`find_as`, per query)",
            "index_find_as_ms",
            Unit::Ms,
            "-",
        ),
        (
            "find status == fault, filter over a model scan (per query)",
            "scan_find_ms",
            Unit::Ms,
            "~2 / ~33 ms",
        ),
        (
            "update `value`, shuffled, 1,000 per transaction",
            "update_per_s",
            Unit::Rate,
            "~465,000 / ~318,000",
        ),
        (
            "remove, shuffled, 1,000 per transaction",
            "remove_per_s",
            Unit::Rate,
            "~408,000 / ~266,000",
        ),
        (
            "file size after the creates",
            "file_mib",
            Unit::Mib,
            "- (in memory)",
        ),
        (
            "RSS at process start (harness only)",
            "rss_start_mib",
            Unit::Mib,
            "-",
        ),
        (
            "RSS after the creates",
            "rss_after_create_mib",
            Unit::Mib,
            "-",
        ),
        (
            "peak RSS of the process (VmHWM)",
            "peak_rss_mib",
            Unit::Mib,
            "- / ~224 MB",
        ),
        (
            "bytes written to disk per create (/proc/self/io write_bytes, creates + flush)",
            "write_b_create",
            Unit::Bytes,
            "-",
        ),
        (
            "bytes written to disk per update (updates + flush, flush untimed)",
            "write_b_update",
            Unit::Bytes,
            "-",
        ),
        (
            "bytes written to disk per remove (removes + flush, flush untimed)",
            "write_b_remove",
            Unit::Bytes,
            "-",
        ),
        (
            "run conditions: process CPU time / wall time",
            "cpu_share",
            Unit::Ratio,
            "-",
        ),
        (
            "run conditions: 1-min load average at start",
            "load1_start",
            Unit::Ratio,
            "-",
        ),
        (
            "run conditions: 1-min load average at end",
            "load1_end",
            Unit::Ratio,
            "-",
        ),
    ];
    let main = ["devtables".to_string(), "sqlite".to_string()];
    s.push_str(&table(&plan.sizes, &main, &rows, "", true, grouped));
    let key_ns: Vec<String> = plan
        .sizes
        .iter()
        .filter_map(|&n| {
            grouped
                .get(&(n, "devtables".to_string()))?
                .get("key_build_ns")
                .map(|v| format!("N={}: {:.0} ns", size_label(n), v))
        })
        .collect();
    s.push_str(&format!(
        "\nGets include building the key properties (a serde_json map of id and deviceId) for every get: {} per get in the harness alone.\n",
        key_ns.join(", ")
    ));
    s.push_str(&format!(
        "\nThe same timed steps, by the on-CPU time of the benchmark thread (/proc/thread-self/schedstat) instead of the wall clock: \
         this leaves out the time the thread waited for a CPU while other processes ran on this shared 2-core machine \
         (but also any time it slept on I/O or locks).\n\n{}",
        table(&plan.sizes, &main, &rows[..17], "_cpu", true, grouped)
    ));

    let get = |k: &str| imm.get(k).copied().unwrap_or(f64::NAN);
    let raws: Vec<f64> = (0..4).map(|k| get(&format!("raw{k}_per_s"))).collect();
    let writers = get("writers");
    s.push_str(&format!(
        "\n| Durable writes (N={} creates, one durable commit per write) | rate | raw fdatasync rate before / after it | ratio to the mean of those raw rates | Original C, journaled (N=100k) |\n|---|---|---|---|---|\n",
        thousands(plan.immediate_items as f64)
    ));
    let imm_rows = [
        (
            "devtables `immediate`, 1 writer thread".to_string(),
            "dt_imm_1w_per_s",
            "~7,200 creates/s",
        ),
        (
            format!("devtables `immediate`, {writers:.0} writer threads (group commit)"),
            "dt_imm_nw_per_s",
            "-",
        ),
        (
            "SQLite WAL synchronous=FULL, 1 writer".to_string(),
            "sq_imm_1w_per_s",
            "-",
        ),
    ];
    for (k, (label, key, original)) in imm_rows.iter().enumerate() {
        let v = get(key);
        let (before, after) = (raws[k], raws[k + 1]);
        s.push_str(&format!(
            "| {label} | {}/s | {}/s / {}/s | {:.2} | {original} |\n",
            thousands(v),
            thousands(before),
            thousands(after),
            v / ((before + after) / 2.0)
        ));
    }
    s.push_str(&format!(
        "\n| Bytes written to disk per item (/proc/self/io `write_bytes`), N={} creates one per transaction, then made durable | devtables | SQLite WAL |\n|---|---|---|\n",
        thousands(plan.immediate_items as f64)
    ));
    let bytes = |k: &str| format!("{} B", thousands(get(k)));
    s.push_str(&format!(
        "| durable per write: devtables `immediate` / SQLite synchronous=FULL | {} | {} |\n",
        bytes("dt_imm_1w_write_b"),
        bytes("sq_imm_1w_write_b")
    ));
    s.push_str(&format!(
        "| durable per write, {writers:.0} writer threads (group commit) | {} | - |\n",
        bytes("dt_imm_nw_write_b")
    ));
    s.push_str(&format!(
        "| not durable per write: devtables `periodic` (1 s) / SQLite synchronous=NORMAL | {} | {} |\n",
        bytes("dt_per_1w_write_b"),
        bytes("sq_normal_1w_write_b")
    ));
    s.push_str(&format!(
        "| (rate of those non-durable runs, wall clock, final flush included) | {}/s | {}/s |\n",
        thousands(get("dt_per_1w_per_s")),
        thousands(get("sq_normal_1w_per_s"))
    ));
    s.push_str(
        "\nThe grouped runs (1,000 writes per transaction) give their bytes per item in the first table. \
         `write_bytes` counts a page of the page cache when it is dirtied: a page dirtied again before it reached the disk counts once, \
         one cleaned by a sync and dirtied again counts again, so it is what the flash receives (before the file system's own journal).\n",
    );
    s.push_str(&format!(
        "\nRaw rate: append 200 bytes + fdatasync in a loop for {:.1} s on a file in the same directory.\n",
        plan.raw_span.as_secs_f64()
    ));
    s.push_str(&format!(
        "\nRun conditions of the durable runs: process CPU time / wall time {:.2}, 1-min load average {:.2} at start, {:.2} at end.\n",
        imm.get("cpu_share").copied().unwrap_or(f64::NAN),
        imm.get("load1_start").copied().unwrap_or(f64::NAN),
        imm.get("load1_end").copied().unwrap_or(f64::NAN)
    ));
    s.push_str(&ceiling_table(ceilings));
    s
}

/// The wall-clock and on-CPU cells of one row of the ceiling table.
type CeilingCells<'a> = dyn Fn(&Ceiling) -> (String, String) + 'a;

/// devtables' grouped creates against the log store written directly with the same bytes, same
/// transaction size and durability (`store_raw`), wall clock and on-CPU.
fn ceiling_table(ceilings: &[Ceiling]) -> String {
    let mut s = String::from(
        "\n| Ceiling: grouped creates, 1,000 per transaction, not durable + a sync each second |",
    );
    let mut rule = String::from("|---|");
    for c in ceilings {
        s.push_str(&format!(
            " N={} | N={} on-CPU |",
            size_label(c.n),
            size_label(c.n)
        ));
        rule.push_str("---|---|");
    }
    s.push('\n');
    s.push_str(&rule);
    s.push('\n');
    let rate = |v: f64| format!("{}/s", thousands(v));
    let rows: [(&str, &CeilingCells<'_>); 6] = [
        (
            "devtables create (schema, encoding, items and index tables)",
            &|c| (rate(c.devtables), rate(c.devtables_cpu)),
        ),
        (
            "log store directly: the same item bytes into `items:Reading` only",
            &|c| (rate(c.raw_items), rate(c.raw_items_cpu)),
        ),
        (
            "log store directly: the same bytes into `items:Reading` and `idx:gs1` (the two tables devtables fills)",
            &|c| (rate(c.raw_tables), rate(c.raw_tables_cpu)),
        ),
        ("ratio devtables / log store items only", &|c| {
            (
                format!("{:.2}", ratio(c.devtables, c.raw_items)),
                format!("{:.2}", ratio(c.devtables_cpu, c.raw_items_cpu)),
            )
        }),
        ("ratio devtables / log store two tables", &|c| {
            (
                format!("{:.2}", ratio(c.devtables, c.raw_tables)),
                format!("{:.2}", ratio(c.devtables_cpu, c.raw_tables_cpu)),
            )
        }),
        ("stored item bytes (average)", &|c| {
            (format!("{:.0} B", c.item_bytes), "-".into())
        }),
    ];
    for (label, f) in rows {
        s.push_str(&format!("| {label} |"));
        for c in ceilings {
            let (wall, cpu) = f(c);
            s.push_str(&format!(" {wall} | {cpu} |"));
        }
        s.push('\n');
    }
    s
}
