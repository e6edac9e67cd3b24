//! A stored row that cannot be read (corrupt in the database) never stalls a device's resync or
//! feed: it is skipped, and the skip is never silent: the device's `last_error` names the row,
//! `/v1/status` counts it in `rows_skipped`, and the rest of the page flows.

use devtables_cloud::ops::WriteKind;
use devtables_cloud::Cloud;
use devtables_sync::identity::Owner;
use devtables_sync::wire::{Change, DownMsg, UpMsg};
use serde_json::json;

use crate::harness::{admin_key, config, device, eventually, get_as, started, RawDevice, ACCOUNT};

/// Writes a `Setting` of device 0 through the service (it lands in the device's feed).
async fn write_setting(cloud: &Cloud, name: &str) {
    let item = json!({"name": name, "value": "x"})
        .as_object()
        .cloned()
        .unwrap();
    cloud
        .write_item(Owner::Device(device(0)), "Setting", item, WriteKind::Create)
        .await
        .expect("write");
}

/// Makes the stored JSON of one setting unreadable, behind the service's back (as a damaged
/// disk or a careless SQL user would).
fn corrupt(db: &std::path::Path, name: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    let n = conn
        .execute(
            "UPDATE items SET item = '{not json' WHERE sk = ?1",
            [format!("setting#{name}")],
        )
        .unwrap();
    assert_eq!(n, 1, "the row of {name}");
}

fn names(changes: &[Change]) -> Vec<String> {
    let mut n: Vec<String> = changes.iter().map(|c| c.key.sk.clone()).collect();
    n.sort();
    n
}

async fn rows_skipped(cloud: &Cloud, key: &str) -> u64 {
    let (_, status) = get_as(cloud.api_addr, "/v1/status", key).await;
    status["rows_skipped"]
        .as_u64()
        .expect("rows_skipped in /v1/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_row_is_skipped_recorded_and_the_rest_flows() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let key = admin_key(&cloud).await;
    let key = key.as_str();
    let secret = cloud.register_device(&device(0)).await.expect("register");
    for name in ["a", "b", "c"] {
        write_setting(&cloud, name).await;
    }
    let db = dir.path().join("cloud.db");
    corrupt(&db, "b");
    assert_eq!(rows_skipped(&cloud, key).await, 0);

    // A new device starts with a full resync: the snapshot holds a and c, and says done.
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");
    let (got, cursor) = dev.finish_resync().await;
    assert_eq!(names(&got), ["setting#a", "setting#c"]);
    let path = format!("/v1/devices/{ACCOUNT}/dev0");
    let api = cloud.api_addr;
    eventually("the snapshot's skip on the device's record", || async {
        let (_, d) = get_as(api, &path, key).await;
        let error = d["last_error"].as_str().unwrap_or_default();
        (error.contains("setting#b") && error.contains("skipped"))
            .then_some(())
            .ok_or(d.to_string())
    })
    .await;
    assert_eq!(rows_skipped(&cloud, key).await, 1);
    let (_, status) = get_as(cloud.api_addr, "/v1/status", key).await;
    assert_eq!(
        status["resyncs_started"], 1,
        "the new device's resync: {status}"
    );

    // The feed: two new settings written while the device is away (or the live session would
    // stream them at once), one of them made unreadable; the page carries the other.
    dev.send(&UpMsg::Bye).await;
    eventually("the device offline", || async {
        let (_, d) = get_as(api, &path, key).await;
        (d["online"] == false).then_some(()).ok_or(d.to_string())
    })
    .await;
    write_setting(&cloud, "d").await;
    write_setting(&cloud, "e").await;
    corrupt(&db, "d");
    dev.send(&UpMsg::Hello {
        session: 2,
        cursor,
        pending: 0,
        mark: None,
    })
    .await;
    let page = dev
        .recv(|m| match m {
            DownMsg::Feed { changes, .. } if !changes.is_empty() => Some(changes.clone()),
            _ => None,
        })
        .await
        .expect("the feed stalled on the unreadable row");
    assert_eq!(names(&page), ["setting#e"]);
    eventually("the feed's skip on the device's record", || async {
        let (_, d) = get_as(api, &path, key).await;
        let error = d["last_error"].as_str().unwrap_or_default();
        error
            .contains("setting#d")
            .then_some(())
            .ok_or(d.to_string())
    })
    .await;
    assert_eq!(rows_skipped(&cloud, key).await, 2);
    cloud.shutdown().await;
}

/// A row too large for any message (the message limit was lowered after it was stored) is
/// skipped with its reason on the device's record; the rest of the resync flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_too_large_for_any_message_is_skipped_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let secret = cloud.register_device(&device(0)).await.expect("register");
    write_setting(&cloud, "small").await;
    let big = json!({"name": "big", "value": "x".repeat(6000)})
        .as_object()
        .cloned()
        .unwrap();
    cloud
        .write_item(Owner::Device(device(0)), "Setting", big, WriteKind::Create)
        .await
        .expect("write the big setting under the default limit");
    cloud.shutdown().await;

    let mut small_messages = config(dir.path());
    small_messages.sync.wire.max_message_bytes = 4096;
    small_messages.quotas.max_item_bytes = 2048;
    let cloud = started(small_messages).await;
    let key = admin_key(&cloud).await;
    let key = key.as_str();
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");
    let (got, _) = dev.finish_resync().await;
    assert_eq!(names(&got), ["setting#small"]);
    let path = format!("/v1/devices/{ACCOUNT}/dev0");
    let api = cloud.api_addr;
    eventually("the skip on the device's record", || async {
        let (_, d) = get_as(api, &path, key).await;
        let error = d["last_error"].as_str().unwrap_or_default();
        (error.contains("setting#big") && error.contains("4096"))
            .then_some(())
            .ok_or(d.to_string())
    })
    .await;
    assert_eq!(rows_skipped(&cloud, key).await, 1);
    cloud.shutdown().await;
}
