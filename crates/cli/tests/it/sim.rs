//! `devtables sim` end to end: with no target it starts its own `devtables cloud` child, runs
//! a small fleet with churn, writes the JSON report and exits 0 when every write is accounted
//! for.

use super::bin;

/// Runs `devtables sim ARGS --json FILE` in a temporary folder; it must succeed. Returns its
/// stdout, its stderr and the JSON report.
fn run_sim(args: &[&str]) -> (String, String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fleet.json");
    let out = bin()
        .arg("sim")
        .args(args)
        .arg("--json")
        .arg(&json)
        .current_dir(dir.path())
        .output()
        .expect("devtables sim runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "devtables sim failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let report = serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).unwrap();
    (stdout, stderr, report)
}

#[test]
fn sim_spawns_a_cloud_runs_a_small_fleet_and_writes_its_report() {
    let (stdout, stderr, report) =
        run_sim(&["--devices", "5", "--duration", "2s", "--churn", "0.4"]);
    assert!(
        stderr.contains("open files:"),
        "the limit is reported:\n{stderr}"
    );
    assert!(
        stdout.contains("missing") && stdout.contains("none"),
        "{stdout}"
    );
    assert_eq!(report["devices"], 5);
    assert_eq!(report["duration_s"], 2.0);
    let written = report["up_written"].as_u64().unwrap();
    assert!(written > 0, "{report}");
    assert_eq!(report["up_acked"].as_u64(), Some(written), "{report}");
    assert_eq!(report["down_applied"], report["down_written"], "{report}");
    assert_eq!(report["churned"], 2, "{report}");
    assert_eq!(report["missing"]["up"], 0);
    assert!(report["connect_s"].is_number(), "{report}");
    // The spawned cloud is a separate process whose footprint was read from /proc.
    assert!(report["cloud"]["pid"].is_u64(), "{report}");
    assert!(
        report["cloud"]["rss_peak_mib"].as_f64().unwrap() > 1.0,
        "{report}"
    );
    assert!(report["cloud"]["cpu_pct_avg"].is_number(), "{report}");
    for lag in ["up_lag_ms", "down_lag_ms"] {
        for p in ["p50", "p90", "p99", "max"] {
            assert!(report[lag][p].is_number(), "{lag}.{p} in {report}");
        }
    }
    assert_eq!(report["config"]["target"]["kind"], "spawn");
}

/// A reconnect storm: the spawned cloud is restarted (SIGTERM, started again on the same data
/// and ports) in the middle of the writes; every device loses its connection, comes back and is
/// welcomed again, every write is still accounted for, and the cloud's counters are summed over
/// its two processes.
#[test]
fn sim_restarts_its_cloud_and_every_device_comes_back_with_every_write() {
    let (stdout, _, report) = run_sim(&[
        "--devices",
        "8",
        "--duration",
        "4s",
        "--rate",
        "4",
        "--restart-cloud-after",
        "1500ms",
    ]);
    assert!(stdout.contains("restart storm"), "{stdout}");
    let storm = &report["storm"];
    assert_eq!(storm["devices"], 8, "every device was connected: {report}");
    assert_eq!(storm["served"], 8, "{report}");
    assert!(storm["all_served_s"].is_number(), "{report}");
    assert!(storm["restart_s"].as_f64().unwrap() > 0.0, "{report}");
    // Each device lost its connection to the restart (and the agents counted it).
    assert!(
        report["errors"]["connections_lost"].as_u64().unwrap_or(0) >= 8,
        "{report}"
    );
    let written = report["up_written"].as_u64().unwrap();
    assert!(
        written >= 8 * 4 * 3,
        "writes went on through the restart: {report}"
    );
    assert_eq!(report["up_acked"].as_u64(), Some(written), "{report}");
    assert_eq!(report["missing"]["up"], 0, "{report}");
    // The counters of both cloud processes: every acknowledged write was answered `applied`
    // at least once (a second process counting from 0 would otherwise show fewer).
    let pushed = report["cloud_counts"]["push_changes_applied"]
        .as_u64()
        .expect("counted");
    assert!(pushed >= written, "{report}");
    assert_eq!(
        report["cloud_counts"]["device_changes_applied"].as_u64(),
        Some(written + report["commands_done"].as_u64().unwrap()),
        "each write stored once: {report}"
    );
}
