//! The benchmarks' quick variants, run as CI runs them (the `devtables-bench` binary, which is
//! `devtables bench`'s library behind a thin main): each must finish, print its table and write
//! JSON whose fields exist and whose counts agree. No timing is asserted. And `plot` must turn
//! sync and fleet reports into valid PNGs without any system font.
//!
//! `scale-out` needs PostgreSQL and Mosquitto: its test (`scale_out.rs`) runs with
//! `DEVTABLES_SERVICES` set, as the other crates' service tests do.
//!
//! The benchmarks run one at a time (they share two cores; a benchmark that waits on another's
//! CPU only gets slower, but one at a time keeps each run's own limits far away).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::{json, Value};

mod scale_out;
#[path = "../../../cli/tests/it/services_gate.rs"]
mod services_gate;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const BIN: &str = env!("CARGO_BIN_EXE_devtables-bench");

/// Runs `devtables-bench <args> --json FILE`; returns the JSON and the printed table.
fn bench(args: &[&str]) -> (Value, String) {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let json_path = dir.path().join("out.json");
    let out = Command::new(BIN)
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run devtables-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "devtables-bench {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read(&json_path).expect("the JSON file");
    let v: Value = serde_json::from_slice(&text).expect("valid JSON");
    (v, stdout)
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v:#}"))
}

fn count(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no count at {pointer} in {v:#}"))
}

/// The fields every report has.
fn common(v: &Value, bench: &str) {
    assert_eq!(v["bench"], bench);
    assert_eq!(v["quick"], true);
    assert!(v["machine"].as_str().is_some_and(|m| m.contains("nproc")));
    assert!(v["command"]
        .as_str()
        .is_some_and(|c| c.starts_with(&format!("devtables bench {bench}"))));
}

#[test]
fn db_quick_measures_every_engine_and_the_store_ceiling() {
    let (v, table) = bench(&["db", "--quick"]);
    common(&v, "db");
    assert_eq!(v["sizes"], json!([1000]));
    for engine in ["devtables", "sqlite"] {
        assert!(num(&v, &format!("/runs/{engine}/1000/create_per_s")) > 0.0);
        assert!(num(&v, &format!("/runs/{engine}/1000/peak_rss_mib")) > 0.0);
    }
    assert!(num(&v, "/runs/store-raw/1000/raw_items_per_s") > 0.0);
    assert!(num(&v, "/runs/store-raw/1000/raw_tables_per_s") > 0.0);
    assert!(num(&v, "/runs/store-raw/1000/item_bytes") > 0.0);
    let ceiling = v["ceiling"].as_array().expect("ceiling rows");
    assert_eq!(ceiling.len(), 1);
    assert_eq!(count(&v, "/ceiling/0/n"), 1000);
    let ratio = num(&v, "/ceiling/0/ratio_to_raw_items");
    let expected = num(&v, "/runs/devtables/1000/create_per_s")
        / num(&v, "/runs/store-raw/1000/raw_items_per_s");
    assert!((ratio - expected).abs() < 1e-9 * expected.max(1.0));
    assert_eq!(count(&v, "/immediate_items"), 20);
    assert!(num(&v, "/immediate/dt_imm_1w_per_s") > 0.0);
    assert!(table.contains("| Ceiling: grouped creates"), "{table}");
}

#[test]
fn sync_quick_measures_latency_throughput_and_the_mqtt_ceiling() {
    let (v, table) = bench(&["sync", "--quick"]);
    common(&v, "sync");
    assert_eq!(v["up_ms"].as_array().map(Vec::len), Some(20));
    assert_eq!(v["down_ms"].as_array().map(Vec::len), Some(20));
    for dir in ["up_lag_ms", "down_lag_ms"] {
        let p50 = num(&v, &format!("/{dir}/p50"));
        let p99 = num(&v, &format!("/{dir}/p99"));
        let max = num(&v, &format!("/{dir}/max"));
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{dir}: {v:#}");
    }
    let items = count(&v, "/throughput/items");
    assert_eq!(items, 1000);
    let messages = count(&v, "/throughput/messages");
    assert!(messages >= 1);
    assert!(num(&v, "/throughput/bytes_per_item") > 0.0);
    // The ceiling published the same items in about as many messages, some rounds over.
    let rounds = count(&v, "/ceiling/rounds");
    let raw_messages = count(&v, "/ceiling/messages");
    assert!(raw_messages >= 50);
    assert_eq!(raw_messages / rounds * rounds, raw_messages);
    let per_round = raw_messages / rounds;
    let per = count(&v, "/ceiling/items_per_message");
    assert!(per * (per_round - 1) < items && items <= per * per_round);
    assert_eq!(count(&v, "/ceiling/items"), items * rounds);
    assert_eq!(count(&v, "/ceiling/window"), 4);
    assert!(num(&v, "/ceiling/items_per_s") > 0.0);
    assert_eq!(count(&v, "/drain/items"), items);
    assert!(count(&v, "/drain/messages") >= 1);
    assert!(num(&v, "/drain/items_per_s") > 0.0);
    assert!(num(&v, "/drain_ratio") > 0.0);
    let ratio = num(&v, "/ratio");
    let expected = num(&v, "/throughput/items_per_s") / num(&v, "/ceiling/items_per_s");
    assert!((ratio - expected).abs() < 1e-9 * expected.max(1.0));
    assert!(
        table.contains("| Ceiling: the same items raw over MQTT QoS 1"),
        "{table}"
    );
}

#[test]
fn catch_up_quick_device_holds_every_item_written_while_offline() {
    let (v, table) = bench(&["catch-up", "--quick"]);
    common(&v, "catch-up");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(count(&v, "/runs/0/changes"), 1000);
    assert_eq!(count(&v, "/runs/0/items_written"), 1000);
    assert_eq!(count(&v, "/runs/0/items_held"), 1000);
    assert!(count(&v, "/runs/0/feed_head") >= 1000);
    for field in [
        "idle_rss_mib",
        "peak_rss_mib",
        "rss_after_mib",
        "caught_up_s",
    ] {
        assert!(num(&v, &format!("/runs/0/device/{field}")) > 0.0, "{field}");
    }
    assert!(num(&v, "/runs/0/device/ready_s") <= num(&v, "/runs/0/device/caught_up_s"));
    assert!(num(&v, "/runs/0/cloud/rss_peak_mib") >= num(&v, "/runs/0/cloud/rss_before_mib"));
    assert!(table.contains("| 1,000 | 1,000 |"), "{table}");
}

#[test]
fn wire_quick_compares_every_encoding_per_batch_size() {
    let (v, _) = bench(&["wire", "--quick"]);
    common(&v, "wire");
    let rows = v["rows"].as_array().expect("rows");
    // Three batch sizes, four encodings each; JSON is the reference of its batch size.
    assert_eq!(rows.len(), 12);
    for r in rows
        .iter()
        .filter(|r| r["encoding"] == "JSON (the wire today)")
    {
        assert_eq!(r["ratio_to_json"], 1.0);
        assert!(num(r, "/bytes_per_item") > 0.0);
    }
}

#[test]
fn memory_quick_measures_each_pending_count_both_ways() {
    let (v, _) = bench(&["memory", "--quick"]);
    common(&v, "memory");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2);
    for (k, n) in [0u64, 1000].into_iter().enumerate() {
        assert_eq!(count(&v, &format!("/rows/{k}/pending")), n);
        assert_eq!(num(&v, &format!("/rows/{k}/restart/n")), n as f64);
        assert_eq!(num(&v, &format!("/rows/{k}/offline/n")), n as f64);
        assert!(num(&v, &format!("/rows/{k}/restart/hwm_mib")) > 0.0);
    }
}

#[test]
fn footprint_quick_measures_an_agent_process_idle_and_after_syncing() {
    let (v, table) = bench(&["footprint", "--quick"]);
    common(&v, "footprint");
    assert_eq!(count(&v, "/items"), 200);
    assert_eq!(v["binaries"].as_array().map(Vec::len), Some(1));
    assert!(count(&v, "/binaries/0/bytes") > 0);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3, "idle, after up, after down");
    for k in 0..3 {
        assert!(num(&v, &format!("/rows/{k}/rss_mib")) > 0.0);
    }
    assert!(table.contains("after 200 items synced up"), "{table}");
}

/// A fleet report as the simulator writes it.
fn fleet_report(devices: u64, rate: f64, p99: f64, rss: f64) -> Value {
    json!({
        "devices": devices, "rate_per_device": rate, "up_per_s": devices as f64 * rate,
        "up_lag_ms": {"p50": p99 / 10.0, "p90": p99 / 2.0, "p99": p99, "max": p99 * 2.0},
        "down_lag_ms": {"p50": 2.0, "p90": 4.0, "p99": 9.0, "max": 30.0},
        "cloud": {"cpu_pct_avg": 40.0, "rss_peak_mib": rss, "rss_per_device_kib": 20.5},
        "errors": {"connect": 0, "unacked": 0},
    })
}

fn write(dir: &Path, name: &str, v: &Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_vec(v).expect("json")).expect("write fixture");
    p
}

/// The PNG signature, then the IHDR chunk's width and height.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).expect("the PNG");
    assert!(bytes.len() > 33, "{} is too short", path.display());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&bytes[12..16], b"IHDR");
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    (be(16), be(20))
}

#[test]
fn plot_draws_the_latency_cdf_and_the_fleet_curve_as_pngs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sync = write(
        dir.path(),
        "sync.json",
        &json!({"bench": "sync", "up_ms": [1.2, 2.3, 2.0, 4.1, 9.9], "down_ms": [0.9, 1.8, 3.3, 80.0, 2.2]}),
    );
    let fleets: Vec<PathBuf> = [
        (1000, 0.1, 3.0, 80.0),
        (5000, 0.1, 12.0, 190.0),
        (10000, 0.1, 40.0, 320.0),
        (10000, 1.0, 900.0, 400.0),
    ]
    .iter()
    .enumerate()
    .map(|(k, &(d, r, p, m))| {
        write(
            dir.path(),
            &format!("fleet-{k}.json"),
            &fleet_report(d, r, p, m),
        )
    })
    .collect();
    let out = dir.path().join("img");
    let plotted = Command::new(BIN)
        .arg("plot")
        .arg("--sync")
        .arg(&sync)
        .arg("--fleet")
        .args(&fleets)
        .arg("--out-dir")
        .arg(&out)
        .output()
        .expect("run plot");
    assert!(
        plotted.status.success(),
        "{}",
        String::from_utf8_lossy(&plotted.stderr)
    );
    assert_eq!(png_size(&out.join("sync-latency.png")), (960, 600));
    let (w, h) = png_size(&out.join("fleet-curve.png"));
    assert_eq!(w, 960);
    assert!(h > 600);
}

#[test]
fn plot_refuses_a_fleet_report_without_the_fields_it_draws() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write(
        dir.path(),
        "fleet.json",
        &json!({"devices": 10, "rate_per_device": 1.0, "up_lag_ms": {"p50": 1.0}}),
    );
    let out = Command::new(BIN)
        .arg("plot")
        .arg("--fleet")
        .arg(&bad)
        .arg("--out-dir")
        .arg(dir.path().join("img"))
        .output()
        .expect("run plot");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/up_lag_ms/p99"), "{stderr}");
    assert!(!dir.path().join("img/fleet-curve.png").exists());
}
