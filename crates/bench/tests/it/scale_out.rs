//! `devtables bench scale-out --quick` against the real PostgreSQL and Mosquitto: every part
//! runs, its JSON holds each figure, and the counts agree (every write acknowledged once, every
//! partition and device taken over, every feed reached by a broadcast, the ratios computed from
//! the figures beside them). No timing is asserted. Needs DEVTABLES_SERVICES=1 and the
//! `devtables` binary beside `devtables-bench` (it runs the cloud nodes), else skipped.

use std::path::PathBuf;

use serde_json::Value;

use super::services_gate::services_on;
use super::{bench, common, count, num, BIN};

/// The `devtables` binary of the same build.
fn devtables() -> PathBuf {
    let path = PathBuf::from(BIN).with_file_name("devtables");
    assert!(
        path.is_file(),
        "DEVTABLES_SERVICES is set but {} is missing: build it first (cargo build -p devtables)",
        path.display()
    );
    path
}

fn rows<'a>(v: &'a Value, field: &str) -> &'a Vec<Value> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} rows in {v:#}"))
}

#[test]
fn scale_out_quick_measures_every_variant_its_ceilings_the_takeover_and_broadcasts() {
    if !services_on() {
        return;
    }
    let program = devtables();
    let (v, table) = bench(&[
        "scale-out",
        "--quick",
        "--program",
        program.to_str().expect("a UTF-8 path"),
    ]);
    common(&v, "scale-out");

    // The store ceilings: 400 changes per writer in pushes of 10, 4 pushes per commit or one.
    let store = rows(&v, "store_ceiling");
    let expected = [
        ("SQLite", 1, 4, 10),
        ("SQLite", 1, 1, 40),
        ("PostgreSQL", 1, 4, 10),
        ("PostgreSQL", 1, 1, 40),
        ("PostgreSQL", 3, 4, 30),
    ];
    assert_eq!(store.len(), expected.len());
    for (row, (name, writers, group, commits)) in store.iter().zip(expected) {
        assert_eq!(row["store"], name, "{row}");
        assert_eq!(count(row, "/writers"), writers);
        assert_eq!(count(row, "/group"), group);
        assert_eq!(count(row, "/items"), 400 * writers);
        assert_eq!(count(row, "/commits"), commits);
        assert!(num(row, "/items_per_s") > 0.0);
    }

    // The MQTT ceilings: every subscriber got every message.
    let mqtt = rows(&v, "mqtt_ceiling");
    assert_eq!(mqtt.len(), 3);
    for (row, (broker, subscribers)) in
        mqtt.iter()
            .zip([("embedded (rmqtt)", 1), ("Mosquitto", 1), ("Mosquitto", 3)])
    {
        assert_eq!(row["broker"], broker);
        assert_eq!(count(row, "/subscribers"), subscribers);
        assert_eq!(count(row, "/messages"), 300);
        assert!(num(row, "/messages_per_s") > 0.0);
    }

    // Up-sync: the same workload on each variant, every write acknowledged once, the ratios
    // those of the figures beside them.
    let up = rows(&v, "up_sync");
    assert_eq!(up.len(), 3);
    for (row, (nodes, store_ceiling, mqtt_ceiling)) in
        up.iter().zip([(1, 0, 0), (1, 2, 1), (3, 4, 2)])
    {
        assert_eq!(count(row, "/nodes"), nodes, "{row}");
        assert_eq!(count(row, "/devices"), 20);
        let written = count(row, "/up_written");
        assert!(written > 0);
        assert_eq!(count(row, "/up_acked"), written, "{row}");
        assert_eq!(count(row, "/unacknowledged"), 0, "{row}");
        assert_eq!(row["complete"], true, "{row}");
        assert_eq!(count(row, "/store_ceiling"), store_ceiling);
        assert_eq!(count(row, "/mqtt_ceiling"), mqtt_ceiling);
        let ceiling = num(row, "/store_ceiling_items_per_s");
        assert_eq!(
            ceiling,
            num(&store[store_ceiling as usize], "/items_per_s"),
            "{row}"
        );
        let ratio = num(row, "/store_ratio");
        let expected = num(row, "/up_per_s") / ceiling;
        assert!(
            (ratio - expected).abs() <= 1e-9 * expected.max(1.0),
            "{row}"
        );
        // The nodes' own counters over the writes: messages handled, changes per message,
        // and the nodes' CPU.
        assert!(num(row, "/messages_per_s") > 0.0, "{row}");
        assert!(num(row, "/items_per_message") > 0.0, "{row}");
        assert!(row["cloud_cpu_pct"].as_f64().is_some(), "{row}");
    }
    assert!(up[0]["postgres_cpu_pct"].is_null());
    assert!(up[2]["postgres_cpu_pct"].as_f64().is_some(), "{:#}", up[2]);

    // Takeover: the killed node held a share; the survivors took every partition and device.
    let t = &v["takeover"];
    let held = count(t, "/killed_partitions");
    assert!(0 < held && held < count(t, "/partitions"), "{t}");
    assert!(num(t, "/partitions_s") > 0.0, "{t}");
    assert!(num(t, "/sessions_s") > 0.0, "{t}");
    assert_eq!(count(t, "/up_acked"), count(t, "/up_written"), "{t}");
    assert_eq!(count(t, "/unacknowledged"), 0, "{t}");
    assert_eq!(t["complete"], true, "{t}");

    // Broadcasts: one feed row per device of the account, on both stores.
    let b = rows(&v, "broadcast");
    assert_eq!(b.len(), 4);
    for (row, (devices, store)) in b.iter().zip([
        (50, "SQLite"),
        (50, "PostgreSQL"),
        (200, "SQLite"),
        (200, "PostgreSQL"),
    ]) {
        assert_eq!(count(row, "/devices"), devices);
        assert_eq!(count(row, "/feed_rows"), devices);
        assert_eq!(row["store"], store);
        assert!(num(row, "/first_ms") > 0.0);
    }

    for heading in [
        "| Up-sync, the same fleet workload |",
        "| Ceiling: raw batch inserts",
        "| Ceiling: raw MQTT QoS 1 publish",
        "| Takeover: 3 nodes",
        "| Broadcast: one `Firmware` write",
    ] {
        assert!(table.contains(heading), "{heading} missing:\n{table}");
    }
}
