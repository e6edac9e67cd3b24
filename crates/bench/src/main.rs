//! Benchmarks of devtables.
//!
//! `devtables-bench db` runs the device-database benchmark: the original's workload (see
//! `workload`) on devtables and on SQLite, each size and engine in a fresh child process (the
//! binary re-executed with the hidden `child` subcommand) so the peak RSS is per configuration,
//! plus the durable (`immediate`) write rates against the raw disk sync rate. It prints a Markdown
//! report and writes it to `--out` when given. Every database file lives in a temporary
//! directory under /tmp that the parent removes at the end.
//!
//! `devtables-bench sync` measures replication end to end (`sync`); `devtables-bench memory`
//! the agent's resident memory with many changes pending (`memory`); `devtables-bench footprint`
//! the device-only `devtables-agent` binary's size and memory (`footprint`).

// `DbError` is what `Db::write` closures return (large, not ours to change); `is_multiple_of`
// is newer than the workspace's rust-version.
#![allow(clippy::result_large_err, clippy::manual_is_multiple_of)]

mod dt;
mod footprint;
mod memory;
mod sq;
mod sync;
mod sys;
mod wire;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use workload::Metrics;

#[derive(Parser)]
#[command(name = "devtables-bench", about = "Benchmarks of devtables")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Device database: devtables (redb) against SQLite on the original's workload.
    Db(DbArgs),
    /// Replication end to end on loopback: latency up and down, throughput, bytes per item.
    Sync(sync::SyncArgs),
    /// The agent's resident memory with 0, 10k, 100k changes pending (no broker reachable).
    Memory(memory::MemoryArgs),
    /// Bytes per synced item: the wire's JSON against CBOR, MessagePack and JSON + DEFLATE.
    Wire(wire::WireArgs),
    /// The device-only agent binary: its size, and its RSS idle and after syncing items.
    Footprint(footprint::FootprintArgs),
    /// One agent measurement, run by `memory` in a fresh process; prints JSON.
    #[command(hide = true)]
    MemoryProbe(memory::ProbeArgs),
    /// One configuration, run by `db` in a fresh process; prints its metrics as JSON.
    #[command(hide = true)]
    Child {
        #[arg(long)]
        engine: String,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 8)]
        writers: usize,
    },
}

#[derive(clap::Args)]
struct DbArgs {
    /// Item counts of the grouped-write runs.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000usize, 100_000])]
    sizes: Vec<usize>,
    /// Items created in the immediate-durability runs.
    #[arg(long, default_value_t = 3_000)]
    immediate_items: usize,
    /// Concurrent writer threads of the group-commit run.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Also run devtables with this redb page cache (MiB) instead of the default
    /// `DbOptions::cache_bytes`, as an extra column.
    #[arg(long)]
    dt_cache_mib: Option<usize>,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Db(args) => run_db(&args),
        Cmd::Sync(args) => sync::run(&args),
        Cmd::Memory(args) => memory::run(&args),
        Cmd::Wire(args) => wire::run(&args),
        Cmd::MemoryProbe(args) => memory::probe(&args),
        Cmd::Footprint(args) => footprint::run(&args),
        Cmd::Child {
            engine,
            n,
            dir,
            writers,
        } => {
            let m = child(&engine, n, &dir, writers)?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
    }
}

/// Raw disk rate measured for this long before and after the durable runs.
const RAW_SPAN: Duration = Duration::from_secs(2);

fn child(engine: &str, n: usize, dir: &Path, writers: usize) -> anyhow::Result<Metrics> {
    let (wall, cpu, load) = (Instant::now(), sys::cpu_seconds(), sys::load1());
    let mut m = run_engine(engine, n, dir, writers)?;
    m.insert(
        "cpu_share".into(),
        (sys::cpu_seconds() - cpu) / wall.elapsed().as_secs_f64(),
    );
    m.insert("load1_start".into(), load);
    m.insert("load1_end".into(), sys::load1());
    Ok(m)
}

fn run_engine(engine: &str, n: usize, dir: &Path, writers: usize) -> anyhow::Result<Metrics> {
    if let Some(mib) = engine.strip_prefix("devtables-cache") {
        return dt::grouped(dir, n, Some(mib.parse().context("cache MiB")?));
    }
    match engine {
        "devtables" => dt::grouped(dir, n, None),
        "sqlite" => sq::grouped(dir, n),
        "immediate" => {
            // The disk rate drifts on a shared machine: every durable run is bracketed by a
            // raw measurement and compared with the mean of the two around it.
            let mut m = Metrics::new();
            let raw = |m: &mut Metrics, k: usize| -> anyhow::Result<()> {
                eprintln!("  .. raw append 200 B + fdatasync for {RAW_SPAN:?}");
                m.insert(
                    format!("raw{k}_per_s"),
                    sys::raw_fdatasync_rate(dir, RAW_SPAN)?,
                );
                Ok(())
            };
            raw(&mut m, 0)?;
            dt::immediate_one(dir, n, &mut m)?;
            raw(&mut m, 1)?;
            dt::immediate_many(dir, n, writers, &mut m)?;
            raw(&mut m, 2)?;
            sq::immediate(dir, n, &mut m)?;
            raw(&mut m, 3)?;
            m.insert("writers".into(), writers as f64);
            Ok(m)
        }
        other => bail!("unknown engine {other}"),
    }
}

/// Runs one configuration in a fresh process (so VmHWM is its own) in its own directory.
fn spawn(tmp: &Path, engine: &str, n: usize, writers: usize) -> anyhow::Result<Metrics> {
    let dir = tmp.join(format!("{engine}-{n}"));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe().context("own executable")?;
    eprintln!("== {engine}, N={n}");
    let start = Instant::now();
    let out = Command::new(exe)
        .args(["child", "--engine", engine, "--n", &n.to_string()])
        .arg("--dir")
        .arg(&dir)
        .args(["--writers", &writers.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("run child")?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!("{engine} N={n} failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let m: Metrics =
        serde_json::from_str(line).with_context(|| format!("child output {line:?}"))?;
    eprintln!("   done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(m)
}

fn run_db(args: &DbArgs) -> anyhow::Result<()> {
    if args.sizes.is_empty() || args.sizes.contains(&0) {
        bail!("--sizes needs positive item counts");
    }
    let started = Instant::now();
    let machine = sys::machine_line();
    let tmp = sys::TempDir::new("devtables-bench")?;
    let mut grouped = BTreeMap::new();
    for &n in &args.sizes {
        for engine in configs(args) {
            let m = spawn(tmp.path(), &engine, n, args.writers)?;
            grouped.insert((n, engine), m);
        }
    }
    let imm = spawn(tmp.path(), "immediate", args.immediate_items, args.writers)?;
    drop(tmp);
    let report = report(args, &machine, &grouped, &imm, started.elapsed());
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("write {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    Ok(())
}

/// The engine configurations of the grouped runs, in column order.
fn configs(args: &DbArgs) -> Vec<String> {
    let mut v = vec!["devtables".to_string(), "sqlite".to_string()];
    if let Some(mib) = args.dt_cache_mib {
        v.push(format!("devtables-cache{mib}"));
    }
    v
}

fn config_label(engine: &str) -> String {
    match engine {
        "devtables" => "devtables".into(),
        "sqlite" => "SQLite".into(),
        other => match other.strip_prefix("devtables-cache") {
            Some(mib) => format!("devtables, {mib} MiB cache"),
            None => other.into(),
        },
    }
}

// ---- report ----

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "?".into();
    }
    let s = format!("{:.0}", v.round());
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// Three significant digits, at most two decimals.
fn short(v: f64) -> String {
    if !v.is_finite() {
        "?".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn size_label(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        thousands(n as f64)
    }
}

enum Unit {
    Rate,
    Ms,
    Us,
    Mib,
    Ratio,
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
                        "index_find_ms" | "scan_find_ms" => {
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
    machine: &str,
    grouped: &BTreeMap<(usize, String), Metrics>,
    imm: &Metrics,
    took: Duration,
) -> String {
    let sizes_arg = args
        .sizes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut s = String::new();
    s.push_str(&format!(
        "Command: `cargo run --release -p devtables-bench -- db --sizes {sizes_arg} --immediate-items {}{}{}`  \n",
        args.immediate_items,
        if args.writers != 8 { format!(" --writers {}", args.writers) } else { String::new() },
        args.dt_cache_mib.map(|c| format!(" --dt-cache-mib {c}")).unwrap_or_default()
    ));
    s.push_str(&format!("Machine: {machine}  \n"));
    s.push_str(&format!(
        "Whole run: {:.0} s; single runs (no repetition); each column is a fresh process; files in a temporary directory under {}.\n\n",
        took.as_secs_f64(),
        std::env::temp_dir().display()
    ));

    let rows: [(&str, &str, Unit, &str); 18] = [
        (
            "create, 1,000 per transaction",
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
    s.push_str(&table(&args.sizes, &main, &rows, "", true, grouped));
    let key_ns: Vec<String> = args
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
        table(&args.sizes, &main, &rows[..11], "_cpu", true, grouped)
    ));
    if let Some(mib) = args.dt_cache_mib {
        let cfgs = ["devtables".to_string(), format!("devtables-cache{mib}")];
        s.push_str(&format!(
            "\ndevtables with the default redb page cache (`DbOptions::cache_bytes`, 8 MiB) and with {mib} MiB (wall clock):\n\n{}",
            table(&args.sizes, &cfgs, &rows[..15], "", false, grouped)
        ));
    }

    let get = |k: &str| imm.get(k).copied().unwrap_or(f64::NAN);
    let raws: Vec<f64> = (0..4).map(|k| get(&format!("raw{k}_per_s"))).collect();
    let writers = get("writers");
    s.push_str(&format!(
        "\n| Durable writes (N={} creates, one durable commit per write) | rate | raw fdatasync rate before / after it | ratio to the mean of those raw rates | Original C, journaled (N=100k) |\n|---|---|---|---|---|\n",
        thousands(args.immediate_items as f64)
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
    s.push_str("\nRaw rate: append 200 bytes + fdatasync in a loop for 2 s on a file in the same directory.\n");
    s.push_str(&format!(
        "\nRun conditions of the durable runs: process CPU time / wall time {:.2}, 1-min load average {:.2} at start, {:.2} at end.\n",
        imm.get("cpu_share").copied().unwrap_or(f64::NAN),
        imm.get("load1_start").copied().unwrap_or(f64::NAN),
        imm.get("load1_end").copied().unwrap_or(f64::NAN)
    ));
    s
}
