//! `GET /metrics` against a started cloud over real TCP and the embedded broker: a device's
//! session moves the counters by exactly what its traffic implies (messages and bytes in, the
//! answers to its changes, the store job latency of its pushes), its first resync shows, and
//! its unacknowledged feed shows as feed lag until it acknowledges; every field of `/v1/status` has a described metric;
//! and the endpoint needs an admin key unless `metrics_open` is set.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use devtables_cloud::store::KeyScope;
use devtables_sync::wire::{self, ChangeStatus, DownMsg, UpMsg, WireConfig};
use serde_json::Value;

use crate::harness::{
    admin_key, config, device, eventually, exchange, get, get_as, put, schema, started, Answer,
    RawDevice, ACCOUNT,
};

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The payload bytes a [`RawDevice`] publishes for `msg`.
fn encoded_len(msg: &UpMsg) -> u64 {
    wire::encode_up(schema().version(), msg, &WireConfig::default())
        .expect("encode")
        .len() as u64
}

async fn scrape(api: SocketAddr, key: Option<&str>) -> Answer {
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    exchange(api, "GET", "/metrics", &headers, None).await
}

/// The exposition's samples (`name{labels}` → value) and metric types (`name` → type).
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        assert!(
            text.ends_with("# EOF\n"),
            "not a complete exposition: {text}"
        );
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("# TYPE name kind");
                types.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (name, value) = line.rsplit_once(' ').expect("a sample line");
                let value = value.parse().unwrap_or_else(|_| panic!("a value: {line}"));
                samples.insert(name.to_string(), value);
            }
        }
        Exposition { samples, types }
    }

    fn get(&self, name: &str) -> f64 {
        *self
            .samples
            .get(name)
            .unwrap_or_else(|| panic!("no sample {name} in {:?}", self.samples.keys()))
    }
}

/// Scrapes with `key` and parses, asserting the answer is a 200 exposition.
async fn metrics(api: SocketAddr, key: &str) -> Exposition {
    let answer = scrape(api, Some(key)).await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    assert_eq!(
        answer.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    Exposition::parse(&answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_device_sessions_traffic_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    let secret = cloud.register_device(&device(0)).await.expect("register");
    let before = metrics(api, &key).await;

    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    let hello = UpMsg::Hello {
        session: 1,
        cursor: 0,
        pending: 0,
        mark: None,
    };
    assert!(dev.hello(1, 0).await, "welcomed");
    // A new device starts with a full resync: it shows while the device holds a page, then
    // the device acknowledges every page.
    let mut acks = Vec::new();
    loop {
        let (resync, pos, done) = dev
            .recv(|m| match m {
                DownMsg::Snapshot {
                    resync, last, done, ..
                } => Some((*resync, last.clone(), *done)),
                _ => None,
            })
            .await
            .expect("a resync page");
        if acks.is_empty() {
            let key = key.as_str();
            eventually("the resync in the metrics", move || async move {
                let m = metrics(api, key).await;
                let resyncing = m.get("devtables_sessions_resyncing");
                (resyncing == 1.0)
                    .then_some(())
                    .ok_or(format!("{resyncing} resyncing"))
            })
            .await;
        }
        let ack = UpMsg::SnapshotAck { resync, pos, done };
        dev.send(&ack).await;
        acks.push(ack);
        if done {
            break;
        }
    }
    let now = wall_ms();
    let first = UpMsg::Push {
        batch: 1,
        changes: vec![
            put("Setting", "a", now),
            put("Setting", "b", now),
            put("Setting", "c", now),
        ],
        session: None,
    };
    // An older version of `a` (superseded) and a change of a model the cloud does not have
    // (rejected).
    let second = UpMsg::Push {
        batch: 2,
        changes: vec![
            put("Setting", "a", now - 60_000),
            put("NoSuchModel", "d", now),
        ],
        session: None,
    };
    let mut answers = Vec::new();
    for (batch, msg) in [(1, &first), (2, &second)] {
        dev.send(msg).await;
        let results = dev
            .recv(|m| match m {
                DownMsg::PushAck {
                    batch: b, results, ..
                } if *b == batch => Some(results.clone()),
                _ => None,
            })
            .await
            .expect("the push is answered");
        answers.extend(results.into_iter().map(|r| r.status));
    }
    assert!(
        matches!(
            answers.as_slice(),
            [
                ChangeStatus::Applied,
                ChangeStatus::Applied,
                ChangeStatus::Applied,
                ChangeStatus::Stale { .. },
                ChangeStatus::Rejected { .. }
            ]
        ),
        "{answers:?}"
    );

    // The answers were sent after the counting: no waiting needed for these.
    let after = metrics(api, &key).await;
    let moved = |name: &str| after.get(name) - before.get(name);
    let messages = 3 + acks.len() as u64;
    assert_eq!(
        moved("devtables_messages_in_total"),
        messages as f64,
        "hello, resync acknowledgements and two pushes"
    );
    let sent = encoded_len(&hello)
        + acks.iter().map(encoded_len).sum::<u64>()
        + encoded_len(&first)
        + encoded_len(&second);
    assert_eq!(moved("devtables_bytes_in_total"), sent as f64);
    assert_eq!(moved("devtables_push_changes_applied_total"), 3.0);
    assert_eq!(moved("devtables_push_changes_superseded_total"), 1.0);
    assert_eq!(moved("devtables_push_changes_rejected_total"), 1.0);
    // A welcome and two acknowledgements at least (feed pages follow).
    assert!(moved("devtables_publishes_queued_total") >= 3.0);
    assert!(moved("devtables_bytes_out_total") > 0.0);
    // Each push ran one timed store job.
    let pushes = "devtables_store_job_seconds_count{job=\"apply_push\"}";
    assert_eq!(
        after.get(pushes) - before.samples.get(pushes).unwrap_or(&0.0),
        2.0
    );
    assert!(after.get("devtables_store_job_seconds_sum{job=\"apply_push\"}") > 0.0);
    assert_eq!(after.types["devtables_store_job_seconds"], "histogram");
    assert_eq!(after.get("devtables_sessions"), 1.0);

    // The device's pushes of a model that syncs down entered its own feed, and it has not
    // acknowledged them: the whole feed is its lag.
    let path = format!("/v1/devices/{ACCOUNT}/{}", device(0).device);
    let (code, record) = get_as(api, &path, &key).await;
    assert_eq!(code, 200, "{record}");
    let head = record["feed_head"].as_u64().expect("feed_head");
    let acked = record["cursor_acked"].as_u64().expect("cursor_acked");
    assert!(head >= acked + 3, "{record}");
    let behind = (head - acked) as f64;
    let key_ref = key.as_str();
    eventually(
        "the feed lag shows the unacknowledged feed",
        move || async move {
            let m = metrics(api, key_ref).await;
            let lag = (
                m.get("devtables_feed_lag_entries"),
                m.get("devtables_feed_lag_max"),
                m.get("devtables_sessions_behind"),
            );
            (lag == (behind, behind, 1.0))
                .then_some(())
                .ok_or(format!("lag {lag:?}, head {head}, acknowledged {acked}"))
        },
    )
    .await;
    // The device receives the feed up to the head and acknowledges it: no lag left.
    dev.recv(|m| matches!(m, DownMsg::Feed { to, .. } if *to == head).then_some(()))
        .await
        .expect("the feed up to the head");
    dev.send(&UpMsg::FeedAck { cursor: head }).await;
    eventually("no feed lag once acknowledged", move || async move {
        let m = metrics(api, key_ref).await;
        let lag = (
            m.get("devtables_feed_lag_entries"),
            m.get("devtables_sessions_behind"),
        );
        (lag == (0.0, 0.0))
            .then_some(())
            .ok_or(format!("lag {lag:?}"))
    })
    .await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_a_described_metric_for_every_status_field() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    let (code, status) = get_as(api, "/v1/status", &key).await;
    assert_eq!(code, 200, "{status}");
    let m = metrics(api, &key).await;
    let fields = status.as_object().expect("an object");
    // The embedded broker's part is there too.
    assert!(fields.contains_key("mqtt_refused_revoked"), "{status}");
    for (field, value) in fields {
        let name = format!("devtables_{field}");
        let kind = m
            .types
            .get(&name)
            .unwrap_or_else(|| panic!("/v1/status field {field} has no metric"));
        let sample = match kind.as_str() {
            "counter" => format!("{name}_total"),
            "gauge" => name.clone(),
            other => panic!("{field}: a metric of type {other} (undescribed in metrics.rs)"),
        };
        let shown = m.get(&sample);
        // Fields that cannot move on an idle service match exactly.
        if let Value::Bool(b) = value {
            assert_eq!(shown, f64::from(u8::from(*b)), "{field}");
        }
        if field == "mqtt_request_queue" || field == "sessions" {
            assert_eq!(Some(shown), value.as_f64(), "{field}");
        }
    }
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_an_admin_key_unless_metrics_open() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let api = cloud.api_addr;
    let admin = admin_key(&cloud).await;
    let read = cloud
        .create_api_key(ACCOUNT, KeyScope::Read)
        .await
        .expect("a read key")
        .key;
    let before = metrics(api, &admin).await;
    let no_key = scrape(api, None).await;
    assert_eq!(no_key.code, 401, "{}", no_key.body);
    assert_eq!(no_key.json()["kind"], "unauthorized", "{}", no_key.body);
    let reader = scrape(api, Some(&read)).await;
    assert_eq!(reader.code, 403, "{}", reader.body);
    assert_eq!(reader.json()["kind"], "forbidden", "{}", reader.body);
    // Both refusals are counted.
    let after = metrics(api, &admin).await;
    let moved = |n: &str| after.get(n) - before.get(n);
    assert_eq!(moved("devtables_api_unauthorized_total"), 1.0);
    assert_eq!(moved("devtables_api_forbidden_total"), 1.0);
    cloud.shutdown().await;

    // With `metrics_open`, a scraper needs no key; the rest of the API still does.
    let dir = tempfile::tempdir().unwrap();
    let mut open = config(dir.path());
    open.metrics_open = true;
    let cloud = started(open).await;
    let answer = scrape(cloud.api_addr, None).await;
    assert_eq!(answer.code, 200, "{}", answer.body);
    let m = Exposition::parse(&answer.body);
    assert_eq!(m.get("devtables_broker_connected"), 1.0);
    let (code, body) = get(cloud.api_addr, "/v1/status").await;
    assert_eq!(code, 401, "{body}");
    cloud.shutdown().await;
}
