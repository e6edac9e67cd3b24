//! The fleet simulator against a real cloud (SQLite, embedded broker, HTTP API) started in
//! this process: every write accounted for, counted by the cloud too, churned devices back
//! (the long-away ones through a full resync), and the report's JSON fields present.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devtables_cloud::store::KeyScope;
use devtables_cloud::{BrokerMode, Cloud, CloudConfig};
use devtables_fleet::{FleetConfig, Target};
use devtables_sync::rate::RateLimit;

const ACCOUNT: &str = "sim";

async fn cloud(dir: &std::path::Path) -> Cloud {
    let schema = Arc::new(
        devtables_schema::Schema::from_json5(devtables_fleet::config::SCHEMA).expect("schema"),
    );
    let mut config = CloudConfig::new(dir);
    config.api_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.broker = BrokerMode::Embedded {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    config.sqlite_full_sync = false;
    config.api_rate = RateLimit {
        per_sec: 0,
        burst: 0,
    };
    config.retention.tombstone_ms = 2_000;
    config.purge_interval = Duration::from_millis(500);
    Cloud::start(config, schema)
        .await
        .expect("the cloud starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_churning_fleet_accounts_for_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = cloud(dir.path()).await;
    let key = cloud
        .create_api_key(ACCOUNT, KeyScope::Admin)
        .await
        .expect("an admin key")
        .key;
    let mut config = FleetConfig::new(Target::Running {
        url: format!("http://{}", cloud.api_addr),
        admin_key: key,
        mqtt: cloud.mqtt_addr.clone(),
        cloud_pid: None,
    });
    config.account = ACCOUNT.into();
    config.devices = 20;
    config.rate_per_device = 5.0;
    config.duration = Duration::from_secs(4);
    config.down_rate = 20.0;
    config.command_rate = 5.0;
    config.broadcast_every = Some(Duration::from_millis(1500));
    config.churn = 0.25;
    config.churn_long = 0.4;
    config.churn_pause = Duration::from_secs(1);
    config.retention = Duration::from_secs(2);
    config.purge_interval = Duration::from_millis(500);
    config.drain_timeout = Duration::from_secs(60);
    let ticks = Arc::new(AtomicUsize::new(0));
    let seen = ticks.clone();
    let report = devtables_fleet::run(
        config,
        Arc::new(move |_| {
            seen.fetch_add(1, Ordering::Relaxed);
        }),
    )
    .await
    .expect("the simulation runs");
    let table = report.table();
    println!("{table}");

    assert!(report.complete(), "writes unaccounted for:\n{table}");
    assert!(report.up_written >= 200, "{table}");
    assert_eq!(report.up_acked, report.up_written, "{table}");
    assert!(report.down_written >= 40, "{table}");
    assert_eq!(report.down_applied, report.down_written, "{table}");
    assert_eq!(report.duplicates, 0, "applied exactly once:\n{table}");
    assert!(report.broadcasts_written >= 2, "{table}");
    assert_eq!(
        report.broadcasts_applied,
        report.broadcasts_written * 20,
        "every broadcast on every device:\n{table}"
    );
    assert!(report.commands_sent >= 10, "{table}");
    assert_eq!(report.commands_done, report.commands_sent, "{table}");
    assert!(report.commands_run >= report.commands_sent, "{table}");
    // The cloud stored each pushed change once (its registry counts writes, not resends) ...
    assert_eq!(
        report.cloud_counts.device_changes_applied,
        Some(report.up_acked + report.commands_done),
        "{table}"
    );
    // ... and answered every one `applied` (a change resent after a restart is answered again).
    let pushed = report
        .cloud_counts
        .push_changes_applied
        .expect("the status");
    assert!(pushed >= report.up_acked + report.commands_done, "{table}");
    assert_eq!(cloud.status().push_changes_applied, pushed);
    assert_eq!((report.churned, report.churned_long), (5, 2), "{table}");
    assert_eq!(
        report.resyncs, 2,
        "the long-away devices resynced:\n{table}"
    );
    assert!(report.connect_s.is_some(), "{table}");
    assert!(report.up_lag_ms.count == report.up_acked, "{table}");
    assert!(
        ticks.load(Ordering::Relaxed) >= 4,
        "a progress tick every second"
    );

    let json = serde_json::to_value(&report).unwrap();
    for field in [
        "devices",
        "rate_per_device",
        "duration_s",
        "offered_up_per_s",
        "up_written",
        "up_acked",
        "up_per_s",
        "down_written",
        "down_applied",
        "down_per_s",
        "connect_s",
        "errors",
        "resyncs",
        "churned",
        "config",
    ] {
        assert!(json.get(field).is_some(), "the JSON has {field}");
    }
    for lag in ["up_lag_ms", "down_lag_ms"] {
        for p in ["p50", "p90", "p99", "max"] {
            assert!(json[lag][p].is_number(), "the JSON has {lag}.{p}");
        }
    }
    for field in [
        "cpu_pct_avg",
        "cpu_ms_per_acked_push",
        "rss_start_mib",
        "rss_peak_mib",
        "rss_per_device_kib",
    ] {
        assert!(
            json["cloud"].get(field).is_some(),
            "the JSON has cloud.{field}"
        );
    }
    let per_write = report
        .sim
        .cpu_ms_per_write
        .expect("the simulator reads its own CPU");
    assert!(per_write > 0.0, "{table}");
    assert!(json["config"].get("admin_key").is_none() && !json.to_string().contains("dt_"));
    cloud.shutdown().await;
}
