//! Limits and quotas through the real service: a device flooding messages over the embedded
//! broker is refused with `rate_limited` replies and counted, and its later pushes still apply;
//! a device over its row quota gets `quota_exceeded` per change with its counters moving; an
//! API key over its request rate gets 429 with `Retry-After`, then succeeds.

use std::net::SocketAddr;
use std::time::Duration;

use devtables_cloud::store::KeyScope;
use devtables_sync::hlc::Hlc;
use devtables_sync::rate::RateLimit;
use devtables_sync::wire::{
    Change, ChangeStatus, DownMsg, ErrorCode, Op, Quota, RejectReason, UpMsg,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{config, device, eventually, get_as, schema, started, RawDevice, ACCOUNT};

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A put of the `Setting` named `name` of device 0, as a device would push it.
fn setting_put(name: &str, counter: u32) -> Change {
    let schema = schema();
    let model = schema.model("Setting").expect("the Setting model");
    let input = json!({"deviceId": device(0).device, "name": name, "value": "on"});
    let item = model
        .prepare_create(input.as_object().expect("an object"), wall_ms() as i64)
        .expect("a valid Setting");
    Change {
        model: "Setting".into(),
        key: model.primary_key(&item).expect("its key"),
        op: Op::Put,
        item: Some(item),
        version: Hlc {
            wall_ms: wall_ms(),
            counter,
            node: 7,
        },
        base: None,
    }
}

/// The device's record, as the API shows it.
async fn device_record(api: SocketAddr, key: &str) -> Value {
    let (code, body) = get_as(
        api,
        &format!("/v1/devices/{ACCOUNT}/{}", device(0).device),
        key,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_is_refused_and_counted_and_its_later_pushes_apply() {
    const FLOOD: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.sync.device_rate = RateLimit {
        per_sec: 5,
        burst: 10,
    };
    let cloud = started(config).await;
    let api = cloud.api_addr;
    let key = cloud
        .create_api_key(ACCOUNT, KeyScope::Admin)
        .await
        .expect("a key")
        .key;
    let secret = cloud.register_device(&device(0)).await.expect("register");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");

    // The flood: many more pushes at once than the burst allows, each of its own item.
    for i in 0..FLOOD {
        let msg = UpMsg::Push {
            batch: i,
            changes: vec![setting_put(&format!("s{i}"), 0)],
            session: None,
        };
        dev.send(&msg).await;
    }
    let mut seen: Vec<DownMsg> = Vec::new();
    let retry = dev
        .recv(|m| {
            seen.push(m.clone());
            match m {
                DownMsg::Error {
                    code: ErrorCode::RateLimited { retry_after_ms },
                    ..
                } => Some(*retry_after_ms),
                _ => None,
            }
        })
        .await
        .expect("a rate_limited reply to the flood");
    assert_eq!(
        retry, 1000,
        "the time to refill half the burst of 10 at 5/s"
    );

    // As a device does: nothing before the time the cloud said; then the next push applies.
    // (Should the tail of the flood still be arriving then, the push is refused with a new
    // reply, since a retry interval has passed, and the device waits again.)
    let later = UpMsg::Push {
        batch: 1000,
        changes: vec![setting_put("later", 0)],
        session: None,
    };
    let mut wait = retry;
    let mut later_refused = 0;
    let results = loop {
        assert!(later_refused < 5, "the later push is never taken: {seen:?}");
        tokio::time::sleep(Duration::from_millis(wait)).await;
        dev.send(&later).await;
        let answer = dev
            .recv(|m| {
                seen.push(m.clone());
                match m {
                    DownMsg::PushAck {
                        batch: 1000,
                        results,
                        ..
                    } => Some(Ok(results.clone())),
                    DownMsg::Error {
                        code: ErrorCode::RateLimited { retry_after_ms },
                        ..
                    } => Some(Err(*retry_after_ms)),
                    _ => None,
                }
            })
            .await
            .expect("the later push is answered");
        match answer {
            Ok(results) => break results,
            Err(again) => {
                later_refused += 1;
                wait = again;
            }
        }
    };
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, ChangeStatus::Applied);

    // Every flood push is either applied (answered), or refused for the rate or as busy, and
    // counted: nothing is half-done and nothing is silent.
    let acked = seen
        .iter()
        .filter(|m| matches!(m, DownMsg::PushAck { batch, .. } if *batch < FLOOD))
        .count() as u64;
    let rate_replies = seen
        .iter()
        .filter(|m| {
            matches!(
                m,
                DownMsg::Error {
                    code: ErrorCode::RateLimited { .. },
                    ..
                }
            )
        })
        .count();
    assert!(acked < FLOOD, "the flood was not limited: {acked} applied");
    assert_eq!(
        rate_replies,
        1 + later_refused,
        "one refusal per retry interval: {seen:?}"
    );
    let refusals = FLOOD - acked + later_refused as u64;
    let key = key.as_str();
    let record = eventually("the refusals recorded on the device", move || async move {
        let r = device_record(api, key).await;
        let refused = r["messages_rate_limited"].as_u64().unwrap_or(0)
            + r["pushes_busy"].as_u64().unwrap_or(0);
        if refused == refusals {
            Ok(r)
        } else {
            Err(format!(
                "{refused} refusals recorded, {refusals} expected: {r}"
            ))
        }
    })
    .await;
    assert_eq!(record["changes_applied"], acked + 1, "{record}");
    assert_eq!(record["rows_stored"], acked + 1, "{record}");
    let (_, status) = get_as(api, "/v1/status", key).await;
    assert_eq!(
        status["device_messages_rate_limited"], record["messages_rate_limited"],
        "{status}"
    );
    assert_eq!(
        status["device_pushes_busy"], record["pushes_busy"],
        "{status}"
    );
    assert!(
        status["device_messages_rate_limited"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_row_quota_is_refused_per_change_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.quotas.max_rows = 2;
    let cloud = started(config).await;
    let api = cloud.api_addr;
    let key = cloud
        .create_api_key(ACCOUNT, KeyScope::Admin)
        .await
        .expect("a key")
        .key;
    let secret = cloud.register_device(&device(0)).await.expect("register");
    let mut dev = RawDevice::connect(&cloud.mqtt_addr, device(0), &secret).await;
    assert!(dev.hello(1, 0).await, "welcomed");

    let (a, b, c) = (
        setting_put("a", 0),
        setting_put("b", 0),
        setting_put("c", 0),
    );
    dev.send(&UpMsg::Push {
        batch: 1,
        changes: vec![a.clone(), b, c.clone()],
        session: None,
    })
    .await;
    let results = dev
        .recv(|m| match m {
            DownMsg::PushAck {
                batch: 1, results, ..
            } => Some(results.clone()),
            _ => None,
        })
        .await
        .expect("the push is answered");
    let statuses: Vec<ChangeStatus> = results.into_iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![
            ChangeStatus::Applied,
            ChangeStatus::Applied,
            ChangeStatus::Rejected {
                reason: RejectReason::QuotaExceeded {
                    what: Quota::Rows,
                    limit: 2
                }
            }
        ]
    );
    let record = device_record(api, &key).await;
    assert_eq!(record["rows_stored"], 2, "{record}");
    assert_eq!(record["changes_over_quota"], 1, "{record}");
    assert_eq!(record["changes_rejected"], 1, "{record}");
    let last_error = record["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("quota"), "{record}");
    let (_, status) = get_as(api, "/v1/status", &key).await;
    assert_eq!(status["changes_over_quota"], 1, "{status}");

    // A delete makes room for the refused item, in the same push.
    let mut delete = a;
    delete.op = Op::Delete;
    delete.item = None;
    delete.version.counter = 1;
    let mut again = c;
    again.version.counter = 1;
    dev.send(&UpMsg::Push {
        batch: 2,
        changes: vec![delete, again],
        session: None,
    })
    .await;
    let results = dev
        .recv(|m| match m {
            DownMsg::PushAck {
                batch: 2, results, ..
            } => Some(results.clone()),
            _ => None,
        })
        .await
        .expect("the second push is answered");
    assert!(
        results.iter().all(|r| r.status == ChangeStatus::Applied),
        "{results:?}"
    );
    let record = device_record(api, &key).await;
    assert_eq!(record["rows_stored"], 2, "{record}");
    assert_eq!(record["changes_over_quota"], 1, "{record}");
    cloud.shutdown().await;
}

/// `GET path` with a bearer key: (status code, `Retry-After` if any, JSON body).
async fn get_with_retry_after(api: SocketAddr, path: &str, key: &str) -> (u16, Option<u64>, Value) {
    let mut stream = tokio::net::TcpStream::connect(api)
        .await
        .expect("connect to the API");
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read the answer");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let retry_after = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("retry-after")
            .then(|| value.trim().parse().ok())
            .flatten()
    });
    (
        code,
        retry_after,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_over_its_rate_gets_429_then_succeeds_after_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.api_rate = RateLimit {
        per_sec: 2,
        burst: 2,
    };
    let cloud = started(config).await;
    let api = cloud.api_addr;
    let new_key = || async {
        cloud
            .create_api_key(ACCOUNT, KeyScope::Admin)
            .await
            .expect("a key")
            .key
    };
    let (busy, other) = (new_key().await, new_key().await);
    let path = format!("/v1/devices?account={ACCOUNT}");
    for _ in 0..2 {
        let (code, _, body) = get_with_retry_after(api, &path, &busy).await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, retry_after, body) = get_with_retry_after(api, &path, &busy).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(retry_after, Some(1), "a token is back within a second");
    assert_eq!(body["kind"], "rate_limited", "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("retry")),
        "{body}"
    );
    // Another key is not held back.
    let (code, _, body) = get_with_retry_after(api, &path, &other).await;
    assert_eq!(code, 200, "{body}");

    // Refused requests take no token: polling until the answer is 200 is waiting for one.
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    let (busy_key, counter) = (busy.as_str(), refused.clone());
    let path = path.as_str();
    eventually("the busy key is served again", move || {
        let counter = counter.clone();
        async move {
            let (code, _, body) = get_with_retry_after(api, path, busy_key).await;
            match code {
                200 => Ok(()),
                429 => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Err(body.to_string())
                }
                other => panic!("unexpected {other}: {body}"),
            }
        }
    })
    .await;
    let (code, _, status) = get_with_retry_after(api, "/v1/status", &other).await;
    assert_eq!(code, 200, "{status}");
    assert_eq!(
        status["api_rate_limited"],
        refused.load(std::sync::atomic::Ordering::Relaxed),
        "every 429 is counted: {status}"
    );
    cloud.shutdown().await;
}
