//! The sync service's MQTT side: it is never deaf after a start (subscriptions held before any
//! prompt, retried, restored after a reconnect), `/ready` tells the truth about it, and every
//! publish it cannot queue is counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use devtables_cloud::auth::{self, Credentials, SERVICE_USERNAME};
use devtables_cloud::broker::{Broker, BrokerConfig};
use devtables_cloud::ops::WriteKind;
use devtables_cloud::{BrokerMode, Cloud};
use devtables_sync::identity::Owner;
use devtables_sync::wire::{DownMsg, UpMsg};
use serde_json::Value;

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

use crate::harness::{
    admin_key, config, device, eventually, free_port, get, get_as, put, put_of, schema,
    seed_behind_fleet, setting, started, RawDevice, ACCOUNT, WAIT,
};

/// The deaf start: many more devices are behind at start than the MQTT request queue holds.
/// Before the fix, their prompts filled the queue before the connection was up, the one
/// subscribe to the device topics could not be queued and was never retried, and the cloud
/// heard no device again while `/ready` said ready. (With a broker of its own the cloud
/// subscribes to nothing, so this runs against a broker of its own, as an external one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_more_devices_behind_than_the_request_queue_holds_still_hears_devices() {
    const BEHIND: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let secrets = seed_behind_fleet(dir.path(), BEHIND).await;
    let service_secret = auth::generate_secret();
    let creds = Arc::new(Credentials::new(&service_secret));
    creds.add_device(device(0), auth::hash_secret(&secrets[0]));
    let broker = Broker::start(
        BrokerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))),
        creds,
    )
    .await
    .expect("the broker starts");
    let mut config = config(dir.path());
    config.broker = BrokerMode::External {
        host: "127.0.0.1".into(),
        port: broker.local_addr().port(),
        username: Some(SERVICE_USERNAME.into()),
        password: Some(service_secret),
    };
    config.mqtt.request_queue = 64;
    config.startup_prompts.tick = Duration::from_millis(10);
    let cloud = Cloud::start(config, schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;

    // Readiness: every "not ready" answer says why; "ready" comes with the subscription held.
    let mut not_ready = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let ready = loop {
        let (code, body) = get(api, "/ready").await;
        if code == 200 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        not_ready.push((code, body));
        tokio::time::sleep(Duration::from_millis(5)).await;
    };

    // The device is one of the fleet (behind too). The cloud must hear its hello.
    let mut dev =
        RawDevice::connect(&broker.local_addr().to_string(), device(0), &secrets[0]).await;
    assert!(
        dev.hello(42, 0).await,
        "the cloud never answered a hello: it does not hear the devices"
    );

    assert_eq!(
        ready["subscribed"], true,
        "ready before subscribing: {ready}"
    );
    assert_eq!(ready["broker"], true, "{ready}");
    for (code, body) in &not_ready {
        assert_eq!(*code, 503, "{body}");
        assert_eq!(body["ready"], false, "{body}");
        assert!(body["reason"].is_string(), "a 503 without a reason: {body}");
        // Subscribed but not ready: only while the publishing connection is not up yet.
        if body["subscribed"] == true {
            assert_eq!(body["broker"], false, "503 although ready: {body}");
            assert!(
                body["reason"].as_str().unwrap_or("").contains("publishes"),
                "503 although subscribed, for another reason: {body}"
            );
        }
    }

    // Every start-up prompt went out, paced within the small queue: nothing was dropped.
    let key = admin_key(&cloud).await;
    let key = key.as_str();
    let status = eventually("every start-up prompt released", move || async move {
        let (_, s) = get_as(api, "/v1/status", key).await;
        if s["prompts_pending"] == 0 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    assert_eq!(status["subscribed"], true, "{status}");
    assert_eq!(status["subscriptions_held"], 1, "{status}");
    assert_eq!(status["mqtt_request_queue"], 64, "{status}");
    assert_eq!(
        status["publishes_dropped"], 0,
        "the prompts overflowed the request queue: {status}"
    );
    // One prompt per behind device (the one that said hello may have been spared its prompt)
    // and the welcome.
    let queued = status["publishes_queued"].as_u64().unwrap_or(0);
    assert!(queued >= BEHIND as u64, "{status}");
    cloud.shutdown().await;
    broker.shutdown().await;
}

/// The end of a resync records the device's cursor, so after a restart the device is not
/// counted as behind (and not prompted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_resync_is_recorded_and_not_prompted_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = seed_behind_fleet(dir.path(), 1).await;
    let started_ms = wall_ms();
    let cloud = Cloud::start(config(dir.path()), schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    eventually("ready", || async {
        let (code, body) = get(api, "/ready").await;
        (code == 200).then_some(()).ok_or(body.to_string())
    })
    .await;

    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secrets[0]).await;
    assert!(dev.hello(7, 0).await, "welcomed");
    // Cursor 0 is below the feed's floor: a full resync. Acknowledge every page.
    dev.finish_resync().await;
    dev.send(&UpMsg::Bye).await;
    let key = admin_key(&cloud).await;
    let key = key.as_str();
    let record = eventually(
        "the device offline with its cursor recorded",
        move || async move {
            let (_, d) = get_as(api, &format!("/v1/devices/{ACCOUNT}/dev0"), key).await;
            if d["online"] == false && d["cursor_lag"] == 0 && d["cursor_acked"] != 0 {
                Ok(d)
            } else {
                Err(d.to_string())
            }
        },
    )
    .await;
    // The engine's time of the last message, recorded as wall time.
    let seen = record["last_seen_ms"].as_u64().unwrap_or(0);
    assert!(
        seen >= started_ms && seen <= wall_ms() + 1000,
        "{started_ms} {record}"
    );
    cloud.shutdown().await;

    let cloud = Cloud::start(config(dir.path()), schema())
        .await
        .expect("the cloud starts again");
    // The key survives the restart (it is in the store).
    let (_, status) = get_as(cloud.api_addr, "/v1/status", key).await;
    assert_eq!(status["prompts_pending"], 0, "{status}");
    cloud.shutdown().await;
}

/// A publish that finds the egress request queue full waits for room (backpressure) instead of
/// being dropped: with no broker reachable the queue fills and the rest wait, counted in
/// `egress_waits`; once a broker is there every one of them goes out, and none was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_that_do_not_fit_the_request_queue_wait_and_none_is_dropped() {
    const DEVICES: usize = 40;
    const QUEUE: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let service_secret = auth::generate_secret();
    let creds = Arc::new(Credentials::new(&service_secret));
    let mut config = config(dir.path());
    config.broker = BrokerMode::External {
        host: "127.0.0.1".into(),
        port,
        username: Some(SERVICE_USERNAME.into()),
        password: Some(service_secret),
    };
    config.mqtt.request_queue = QUEUE as usize;
    config.mqtt.reconnect_min = Duration::from_millis(20);
    config.mqtt.reconnect_max = Duration::from_millis(100);
    let cloud = Cloud::start(config, schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;

    // Liveness stays liveness; readiness says what is missing.
    let (code, _) = get(api, "/health").await;
    assert_eq!(code, 200);
    let (code, body) = get(api, "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("broker"),
        "{body}"
    );

    // A burst: every write prompts its session-less device.
    for i in 0..DEVICES {
        let id = device(i);
        cloud.register_device(&id).await.expect("register");
        cloud
            .write_item(Owner::Device(id), "Setting", setting(i), WriteKind::Create)
            .await
            .expect("write");
    }
    let key = admin_key(&cloud).await;
    let key = key.as_str();
    // Publishes may take all of the queue but an eighth, kept for subscribing and disconnecting.
    let room = QUEUE - QUEUE / 8;
    let status = eventually(
        "the egress queue full and the rest waiting",
        move || async move {
            let (_, s) = get_as(api, "/v1/status", key).await;
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            if n("publishes_queued") == room && n("egress_waits") >= 1 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    assert_eq!(status["publishes_dropped"], 0, "{status}");
    assert_eq!(status["mqtt_requests_queued"], room, "{status}");
    assert_eq!(status["broker_connected"], false, "{status}");

    // The broker comes: the queue drains, the waiting publishes follow, none is lost.
    let broker = Broker::start(
        BrokerConfig::new(SocketAddr::from(([127, 0, 0, 1], port))),
        creds,
    )
    .await
    .expect("the broker starts");
    let status = eventually("every prompt published", move || async move {
        let (_, s) = get_as(api, "/v1/status", key).await;
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        if n("publishes_queued") == DEVICES as u64 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .await;
    assert_eq!(status["publishes_dropped"], 0, "{status}");
    cloud.shutdown().await;
    broker.shutdown().await;
}

/// `/ready` is 503 until a broker is there and the subscription holds; after the broker
/// restarts the cloud subscribes again and hears devices again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_comes_with_the_broker_and_returns_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let service_secret = auth::generate_secret();
    let creds = Arc::new(Credentials::new(&service_secret));
    let mut config = config(dir.path());
    config.broker = BrokerMode::External {
        host: "127.0.0.1".into(),
        port,
        username: Some(SERVICE_USERNAME.into()),
        password: Some(service_secret),
    };
    config.mqtt.reconnect_min = Duration::from_millis(20);
    config.mqtt.reconnect_max = Duration::from_millis(100);
    let cloud = Cloud::start(config, schema())
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    let id = device(1);
    let secret = cloud.register_device(&id).await.expect("register");
    creds.add_device(id.clone(), auth::hash_secret(&secret));

    let (code, body) = get(api, "/ready").await;
    assert_eq!(code, 503, "ready without a broker: {body}");
    assert_eq!(body["subscribed"], false, "{body}");

    let broker = Broker::start(BrokerConfig::new(listen), creds.clone())
        .await
        .expect("the broker starts");
    let wait_ready = |want: bool| async move {
        eventually(if want { "ready" } else { "not ready" }, || async {
            let (code, body) = get(api, "/ready").await;
            if (code == 200) == want {
                Ok(body)
            } else {
                Err(body.to_string())
            }
        })
        .await
    };
    let body = wait_ready(true).await;
    assert_eq!(body["subscribed"], true, "{body}");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id.clone(), &secret).await;
    assert!(dev.hello(1, 0).await, "heard before the broker restart");
    drop(dev);
    let key = admin_key(&cloud).await;
    let (_, before) = get_as(api, "/v1/status", &key).await;

    broker.shutdown().await;
    let body = wait_ready(false).await;
    assert_eq!(body["subscribed"], false, "{body}");
    let broker = Broker::start(BrokerConfig::new(listen), creds.clone())
        .await
        .expect("the broker starts again");
    wait_ready(true).await;
    let (_, after) = get_as(api, "/v1/status", &key).await;
    let attempts = |s: &Value| s["subscribe_attempts"].as_u64().unwrap_or(0);
    assert!(attempts(&after) > attempts(&before), "{before} {after}");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id, &secret).await;
    assert!(dev.hello(2, 0).await, "heard after the broker restart");

    cloud.shutdown().await;
    broker.shutdown().await;
}

/// The store held busy for several keep-alive intervals (a long query, a slow disk) never costs
/// the cloud its broker connection: the MQTT event loop is polled on its own task, so pings go
/// out while the sync loop's store jobs wait. A push made meanwhile is answered once the store
/// is free, on the same connection (no new subscription, no session restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_store_never_starves_the_broker_keep_alive() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.mqtt.keep_alive = Duration::from_secs(1);
    let cloud = started(c).await;
    let key = admin_key(&cloud).await;
    let secret = cloud.register_device(&device(0)).await.expect("register");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");
    let (_, before) = get_as(cloud.api_addr, "/v1/status", &key).await;

    // Five keep-alive intervals with the store thread taken (the broker drops a client silent
    // for one and a half).
    let (busy_tx, busy_rx) = tokio::sync::oneshot::channel();
    let store = cloud.store.clone();
    let blocker = tokio::spawn(async move {
        store
            .call(move |_| {
                let _ = busy_tx.send(());
                std::thread::sleep(Duration::from_secs(5));
            })
            .await
    });
    busy_rx
        .await
        .expect("the store thread took the blocking job");
    dev.send(&UpMsg::Push {
        batch: 1,
        changes: vec![put("Setting", "a", wall_ms())],
        session: None,
    })
    .await;
    let answered = dev.push_answered(1).await;
    assert_eq!(
        answered,
        Some(1),
        "the push made while the store was busy is answered"
    );
    blocker.await.unwrap().expect("the store is alive");

    let (_, after) = get_as(cloud.api_addr, "/v1/status", &key).await;
    assert_eq!(after["broker_connected"], true, "{after}");
    assert_eq!(
        after["subscribe_attempts"], before["subscribe_attempts"],
        "no reconnection: {before} -> {after}"
    );
    assert_eq!(after["sessions_restarted"], 0, "{after}");
    assert_eq!(after["push_changes_applied"], 1, "{after}");
    cloud.shutdown().await;
}

/// Under load, nothing on the cloud's path is dropped. Twenty devices each send 60 pushes at
/// once, without waiting for answers: 1,200 messages, more than a broker session's queue holds
/// (16 in flight + 1,000 queued), which is what the cloud's own session was before device
/// messages came in-process. Now the embedded broker hands them over in-process and stops
/// reading a device's socket while the sync loop is behind; the cloud's publishing side is
/// squeezed to one publish in flight and a four-slot queue, so answers back up and the sync loop
/// stops reading instead of dropping them; and the store gets two jobs out at a time, so the
/// sync loop also stops reading while store work waits for a slot (`store_waits`). Every push
/// is answered exactly once and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_pushes_is_answered_completely_with_backpressure_and_no_drop() {
    const DEVICES: usize = 20;
    const PUSHES: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.mqtt.request_queue = 4;
    c.mqtt.egress_inflight = 1;
    c.sync_store_jobs = 2;
    // Neither the per-device message rate nor the pushes-in-progress bound refuses any of them:
    // the test is about the path, not about those limits.
    c.sync.device_rate.per_sec = 0;
    c.sync.max_pushes_in_progress = PUSHES as usize;
    let cloud = started(c).await;
    let key = admin_key(&cloud).await;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let secret = cloud.register_device(&device(i)).await.expect("register");
        let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(i), &secret).await;
        assert!(dev.hello(1, 0).await, "welcomed");
        dev.finish_resync().await;
        devices.push((i, dev));
    }
    let now = wall_ms();
    let runs = devices.into_iter().map(|(i, mut dev)| {
        tokio::spawn(async move {
            for batch in 1..=PUSHES {
                let change = put_of(&device(i), "Setting", &format!("s{batch}"), now + batch);
                dev.send(&UpMsg::Push {
                    batch,
                    changes: vec![change],
                    session: None,
                })
                .await;
            }
            let mut answered = std::collections::BTreeSet::new();
            while answered.len() < PUSHES as usize {
                let ack = dev
                    .recv(|m| match m {
                        DownMsg::PushAck { batch, results, .. } => Some((*batch, results.len())),
                        _ => None,
                    })
                    .await;
                let Some((batch, results)) = ack else {
                    panic!("device {i}: {} of {PUSHES} pushes answered", answered.len());
                };
                assert_eq!(results, 1, "device {i} batch {batch}");
                assert!(
                    answered.insert(batch),
                    "device {i}: batch {batch} answered twice"
                );
            }
            answered.len()
        })
    });
    let mut answered = 0;
    for run in runs {
        answered += run.await.expect("a device run");
    }
    assert_eq!(answered, DEVICES * PUSHES as usize);
    let (_, status) = get_as(cloud.api_addr, "/v1/status", &key).await;
    let n = |k: &str| status[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        n("push_changes_applied"),
        DEVICES as u64 * PUSHES,
        "{status}"
    );
    assert_eq!(n("publishes_dropped"), 0, "{status}");
    assert_eq!(n("broker_drops"), 0, "{status}");
    assert_eq!(n("device_pushes_busy"), 0, "{status}");
    assert!(
        (1..u64::MAX).contains(&n("store_waits")),
        "the store was behind and the loop waited for it: {status}"
    );
    assert_eq!(
        n("subscriptions_held"),
        0,
        "in-process: nothing subscribed: {status}"
    );
    cloud.shutdown().await;
}

/// A device whose retransmit timer fires while the cloud still applies its push sends the
/// push's changes again in a new batch. Through the real service (embedded broker, SQLite), no
/// copy reaches the store: one read while its original is in progress is not answered (the
/// original's answer, which names key and version, answers it); one read after the original
/// was answered is answered `applied` again from the engine's memory. The status counts both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_pushes_are_answered_without_reaching_the_store_and_counted() {
    const PAIRS: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.sync.device_rate.per_sec = 0;
    c.sync.max_pushes_in_progress = 2 * PAIRS as usize;
    let cloud = started(c).await;
    let key = admin_key(&cloud).await;
    let secret = cloud.register_device(&device(0)).await.expect("register");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");
    dev.finish_resync().await;
    let now = wall_ms();
    // Each push followed at once by its copy.
    for i in 1..=PAIRS {
        let change = put_of(&device(0), "Setting", &format!("s{i}"), now + i);
        for batch in [2 * i, 2 * i + 1] {
            dev.send(&UpMsg::Push {
                batch,
                changes: vec![change.clone()],
                session: None,
            })
            .await;
        }
    }
    let status = eventually(
        "every push applied or answered without the store",
        || async {
            let (_, status) = get_as(cloud.api_addr, "/v1/status", &key).await;
            let n = |k: &str| status[k].as_u64().unwrap_or(0);
            let done = n("push_changes_applied")
                + n("device_push_changes_covered")
                + n("device_push_changes_reanswered");
            if done == 2 * PAIRS {
                Ok(status)
            } else {
                Err(format!("{done} of {}: {status}", 2 * PAIRS))
            }
        },
    )
    .await;
    let n = |k: &str| status[k].as_u64().unwrap_or(u64::MAX);
    assert_eq!(
        n("push_changes_applied"),
        PAIRS,
        "only the originals reached the store: {status}"
    );
    let (covered, again) = (
        n("device_push_changes_covered"),
        n("device_push_changes_reanswered"),
    );
    assert_eq!(covered + again, PAIRS, "{status}");
    assert_eq!(n("device_pushes_covered"), PAIRS, "{status}");
    // Every original answered, and every copy read after its original's answer.
    let mut answers = std::collections::BTreeSet::new();
    while answers.len() < (2 * PAIRS - covered) as usize {
        let batch = dev
            .recv(|m| match m {
                DownMsg::PushAck { batch, .. } => Some(*batch),
                _ => None,
            })
            .await
            .unwrap_or_else(|| panic!("answers: {answers:?}, {status}"));
        assert!(answers.insert(batch), "batch {batch} answered twice");
    }
    assert!(
        (1..=PAIRS).all(|i| answers.contains(&(2 * i))),
        "{answers:?}"
    );
    cloud.shutdown().await;
}

/// The embedded broker's limits come from the cloud's configuration: a packet over
/// `max_packet_bytes` is not taken (the broker closes the connection), one under it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_enforces_the_configured_packet_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.broker_limits.max_packet_bytes = 4096;
    let cloud = started(c).await;
    let secret = cloud.register_device(&device(0)).await.expect("register");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");
    dev.finish_resync().await;
    let now = wall_ms();
    let small = put_of(&device(0), "Setting", "small", now);
    dev.send(&UpMsg::Push {
        batch: 1,
        changes: vec![small],
        session: None,
    })
    .await;
    assert_eq!(dev.push_answered(1).await, Some(1), "under the limit");
    let mut large = put_of(&device(0), "Setting", "large", now + 1);
    if let Some(item) = &mut large.item {
        item.insert("value".into(), "x".repeat(8192).into());
    }
    dev.send(&UpMsg::Push {
        batch: 2,
        changes: vec![large],
        session: None,
    })
    .await;
    assert!(
        dev.closed().await,
        "a packet over the limit closes the connection"
    );
    cloud.shutdown().await;
}

/// Writes a `Firmware` item: a broadcast to every device of [`ACCOUNT`].
async fn write_firmware(cloud: &Cloud) {
    let mut firmware = devtables_schema::Item::new();
    firmware.insert("version".into(), "2.0.0".into());
    firmware.insert("url".into(), "https://example.com/fw".into());
    cloud
        .write_item(
            Owner::Account(ACCOUNT.into()),
            "Firmware",
            firmware,
            WriteKind::Create,
        )
        .await
        .expect("the broadcast is written");
}

/// A broadcast to an account of more devices than one pacing tick releases: its wake-ups (a
/// prompt to each device, none of them connected) go out through the paced queue, all of them,
/// instead of at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_to_a_large_account_wakes_its_devices_paced_and_all_of_them() {
    const DEVICES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.startup_prompts.per_tick = 8;
    config.startup_prompts.tick = Duration::from_millis(10);
    let cloud = started(config).await;
    for i in 0..DEVICES {
        cloud.register_device(&device(i)).await.expect("register");
    }
    // None of the devices is connected: the embedded broker delivers their prompts to nobody,
    // and says so (`publishes_undelivered`).
    let handed_over =
        |s: &devtables_cloud::status::StatusSnapshot| s.publishes_queued + s.publishes_undelivered;
    let before = handed_over(&cloud.status());
    write_firmware(&cloud).await;
    eventually("every device prompted, paced", || {
        let s = cloud.status();
        let prompted = handed_over(&s) - before;
        async move {
            (s.feed_wakeups_paced == DEVICES as u64
                && s.prompts_pending == 0
                && prompted >= DEVICES as u64)
                .then_some(())
                .ok_or(format!(
                    "{} paced, {prompted} prompted, {} waiting",
                    s.feed_wakeups_paced, s.prompts_pending
                ))
        }
    })
    .await;
    cloud.shutdown().await;
}

/// A broadcast to an account larger than `fanout_batch`: the write's transaction reaches the
/// first batch, the fan-out task the rest in bounded steps, and every device is prompted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_fans_out_in_bounded_steps_and_prompts_every_device() {
    const DEVICES: u64 = 60;
    const BATCH: u64 = 7;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fanout_batch = BATCH as usize;
    // Fewer per tick than a batch: every batch's wake-ups go through the paced queue, so
    // `feed_wakeups_paced` counts every device reached, by the write and by the steps.
    config.startup_prompts.per_tick = 3;
    config.startup_prompts.tick = Duration::from_millis(10);
    let cloud = started(config).await;
    for i in 0..DEVICES as usize {
        cloud.register_device(&device(i)).await.expect("register");
    }
    write_firmware(&cloud).await;
    // 60 devices: 7 in the write, then 8 steps (7 × 7 + 4).
    let steps = (DEVICES - BATCH).div_ceil(BATCH);
    eventually("the fan-out settled and every device was prompted", || {
        let s = cloud.status();
        async move {
            (s.fanout_steps >= steps
                && s.fanout_devices == DEVICES - BATCH
                && s.feed_wakeups_paced == DEVICES
                && s.prompts_pending == 0)
                .then_some(())
                .ok_or(format!(
                    "{} steps reached {} devices; {} wake-ups paced, {} waiting",
                    s.fanout_steps, s.fanout_devices, s.feed_wakeups_paced, s.prompts_pending
                ))
        }
    })
    .await;
    let s = cloud.status();
    assert_eq!(s.fanout_errors, 0);
    // At most one empty step (the batch that ended exactly at the account's last device).
    assert!(s.fanout_steps <= steps + 1, "{} steps", s.fanout_steps);
    cloud.shutdown().await;
}

/// With the embedded broker the service opens no MQTT connection of its own: while devices sync
/// both ways (pushes up and their acknowledgements down, a cloud write down in a feed page), the
/// broker's only sessions are the devices'. The loopback clients the service once published and
/// subscribed through would be sessions of their own (`devtables-cloud-...`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_embedded_broker_the_only_mqtt_sessions_are_the_devices() {
    const DEVICES: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let secret = cloud.register_device(&device(i)).await.expect("register");
        let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(i), &secret).await;
        assert!(dev.hello(1, 0).await, "device {i} welcomed");
        dev.finish_resync().await;
        devices.push(dev);
    }
    // Up, and the answers down.
    let now = wall_ms();
    for (i, dev) in devices.iter_mut().enumerate() {
        let change = put_of(&device(i), "Setting", "up", now);
        dev.send(&UpMsg::Push {
            batch: 1,
            changes: vec![change],
            session: None,
        })
        .await;
        let acked = dev
            .recv(|m| matches!(m, DownMsg::PushAck { batch: 1, .. }).then_some(()))
            .await;
        assert!(acked.is_some(), "device {i}: its push was not answered");
    }
    // A cloud write, down in a feed page.
    cloud
        .write_item(
            Owner::Device(device(0)),
            "Setting",
            setting(0),
            WriteKind::Create,
        )
        .await
        .expect("write");
    let mode = Value::from("mode");
    let fed = devices[0]
        .recv(|m| match m {
            DownMsg::Feed { changes, .. } => changes
                .iter()
                .any(|c| c.item.as_ref().and_then(|i| i.get("name")) == Some(&mode))
                .then_some(()),
            _ => None,
        })
        .await;
    assert!(fed.is_some(), "the cloud write never reached its device");

    let mut sessions = cloud
        .broker_client_ids()
        .await
        .expect("the embedded broker's sessions");
    sessions.sort();
    let mut want: Vec<String> = (0..DEVICES).map(|i| device(i).node_name()).collect();
    want.sort();
    assert_eq!(sessions, want, "a session that is not a device's");
    let s = cloud.status();
    assert!(s.broker_connected && s.egress_connected, "{s:?}");
    assert_eq!(s.subscriptions_held, 0, "nothing subscribed: {s:?}");
    assert_eq!(s.mqtt_requests_queued, 0, "no request queue: {s:?}");
    assert!(s.publishes_queued >= 2 * DEVICES as u64, "{s:?}");
    assert_eq!(s.publishes_undelivered, 0, "{s:?}");
    assert_eq!(s.publishes_dropped + s.publishes_lost, 0, "{s:?}");
    cloud.shutdown().await;
}

/// A publish the embedded broker cannot deliver is counted, not lost silently: a cloud write
/// prompts its device, which is offline (no session subscribed to its topic), so the prompt
/// reaches nobody and `publishes_undelivered` counts it (nothing was queued). The change itself
/// waits in the device's feed and reaches it once it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_an_offline_device_is_counted_as_undelivered() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let id = device(0);
    let secret = cloud.register_device(&id).await.expect("register");
    let before = cloud.status();
    cloud
        .write_item(
            Owner::Device(id.clone()),
            "Setting",
            setting(0),
            WriteKind::Create,
        )
        .await
        .expect("write");
    let after = eventually("the prompt counted as undelivered", || {
        let s = cloud.status();
        async move {
            if s.publishes_undelivered > before.publishes_undelivered {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        }
    })
    .await;
    assert_eq!(
        after.publishes_queued, before.publishes_queued,
        "a publish to nobody counted as sent: {after:?}"
    );
    // The metric says the same.
    let key = admin_key(&cloud).await;
    let (_, status) = get_as(cloud.api_addr, "/v1/status", &key).await;
    assert!(
        status["publishes_undelivered"].as_u64() >= Some(1),
        "{status}"
    );

    let mut dev = RawDevice::connect(&cloud.mqtt_addr, id, &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");
    let (items, _) = dev.finish_resync().await;
    assert_eq!(items.len(), 1, "the change waited for the device");
    cloud.shutdown().await;
}

/// The sync loop never blocks on a full store queue (the API's calls share it): its jobs wait in
/// the loop's own queue, in order, and go to the store as room comes. Meanwhile it reads no
/// device message (backpressure, `store_waits`: a store behind must not lose its CPU to the
/// reading of more), and loses none. The store thread is held and its queue filled with API
/// calls; a push then finds no room, and another device's message waits unread (its answer,
/// `no_session`, needs no store, but reading it is the work that is held back); once the store
/// is free the push is answered, and so is the other message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_queue_pauses_device_reads_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = started(config(dir.path())).await;
    let secret0 = cloud.register_device(&device(0)).await.expect("register");
    let secret1 = cloud.register_device(&device(1)).await.expect("register");
    let mut dev0 = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret0).await;
    assert!(dev0.hello(1, 0).await, "welcomed");
    dev0.finish_resync().await;
    let mut dev1 = RawDevice::connect(&cloud.mqtt_addr, device(1), &secret1).await;

    // The store thread held until released, and its queue filled behind it.
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let store = cloud.store.clone();
    let blocker = tokio::spawn(async move {
        store
            .call(move |_| {
                let _ = held_tx.send(());
                let _ = release_rx.recv();
            })
            .await
    });
    held_rx
        .await
        .expect("the store thread took the holding job");
    let room = cloud.store.queue_room();
    let fillers: Vec<_> = (0..room + 8)
        .map(|_| {
            let store = cloud.store.clone();
            tokio::spawn(async move { store.call(|_| ()).await })
        })
        .collect();
    eventually("the store's queue full", || {
        let room = cloud.store.queue_room();
        async move { (room == 0).then_some(()).ok_or(format!("{room} free")) }
    })
    .await;

    dev0.send(&UpMsg::Push {
        batch: 1,
        changes: vec![put("Setting", "a", wall_ms())],
        session: None,
    })
    .await;
    // The loop's store job for that push waits; the loop itself does not.
    eventually("the push handed to the engine", || {
        let s = cloud.status();
        async move {
            (s.store_jobs_in_flight >= 1)
                .then_some(())
                .ok_or(format!("{s:?}"))
        }
    })
    .await;
    dev1.send(&UpMsg::Push {
        batch: 1,
        changes: vec![put_of(&device(1), "Setting", "b", wall_ms())],
        session: None,
    })
    .await;
    let refused = |m: &DownMsg| match m {
        DownMsg::Error { code, .. } => Some(code.clone()),
        _ => None,
    };
    let early = tokio::time::timeout(Duration::from_millis(500), dev1.recv(refused)).await;
    assert!(
        early.is_err(),
        "a device message was read while store work waited: {early:?}"
    );
    assert_eq!(cloud.store.queue_room(), 0, "the queue emptied too early");
    assert!(cloud.status().store_waits >= 1, "{:?}", cloud.status());

    release_tx.send(()).expect("the holding job waits");
    let answered = dev0.push_answered(1).await;
    assert_eq!(
        answered,
        Some(1),
        "the push that waited for room is answered"
    );
    assert_eq!(
        dev1.recv(refused).await,
        Some(devtables_sync::wire::ErrorCode::NoSession),
        "the message that waited unread is answered"
    );
    blocker.await.unwrap().expect("the store is alive");
    for filler in fillers {
        filler.await.unwrap().expect("every API call ran");
    }
    let s = cloud.status();
    assert_eq!(s.push_changes_applied, 1, "{s:?}");
    assert_eq!(s.store_errors, 0, "{s:?}");
    cloud.shutdown().await;
}
