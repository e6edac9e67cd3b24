//! `devtables sim` end to end: with no target it starts its own `devtables cloud` child, runs
//! a small fleet with churn, writes the JSON report and exits 0 when every write is accounted
//! for.

use super::bin;

#[test]
fn sim_spawns_a_cloud_runs_a_small_fleet_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fleet.json");
    let out = bin()
        .args([
            "sim",
            "--devices",
            "5",
            "--duration",
            "2s",
            "--churn",
            "0.4",
        ])
        .arg("--json")
        .arg(&json)
        .current_dir(dir.path())
        .output()
        .expect("devtables sim runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "devtables sim failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("open files:"),
        "the limit is reported:\n{stderr}"
    );
    assert!(
        stdout.contains("missing") && stdout.contains("none"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report")).unwrap();
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
