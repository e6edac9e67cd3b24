//! The change log's routes and the webhooks against a started cloud over real TCP: a long poll
//! that waits and is woken by a write, a cursor retention passed (410, and a webhook's `gap`),
//! the reader limit, scopes, the webhook limits, and SSE streams ending at shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use devtables_cloud::ops::WriteKind;
use devtables_cloud::store::{ChangeRetention, KeyScope};
use devtables_cloud::{Cloud, CloudConfig};
use devtables_sync::identity::Owner;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::harness::{
    admin_key, config, device, eventually, exchange, get_as, request, started, ACCOUNT, WAIT,
};

fn changes_config(dir: &std::path::Path) -> CloudConfig {
    let mut c = config(dir);
    c.changes.read_interval = Duration::from_millis(5);
    c.changes.webhook_retry_min = Duration::from_millis(20);
    c.changes.webhook_retry_max = Duration::from_millis(200);
    c
}

/// Writes setting `name` of dev0 through the service; returns its version as text.
async fn write_setting(cloud: &Cloud, name: &str) -> String {
    let item = json!({"deviceId": "dev0", "name": name, "value": "v"});
    let change = cloud
        .write_item(
            Owner::Device(device(0)),
            "Setting",
            item.as_object().unwrap().clone(),
            WriteKind::Create,
        )
        .await
        .expect("an API write");
    devtables_sync::wire::hlc_to_string(change.version)
}

async fn with_device(config: CloudConfig) -> (Cloud, String) {
    let cloud = started(config).await;
    cloud.register_device(&device(0)).await.expect("register");
    let key = admin_key(&cloud).await;
    (cloud, key)
}

fn changes_path(query: &str) -> String {
    format!("/v1/accounts/{ACCOUNT}/changes{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_a_long_poll_waits_and_a_write_wakes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, key) = with_device(changes_config(dir.path())).await;
    let api = cloud.api_addr;
    // Without `after`: from now on; the answer's `next` is the head.
    let (code, now) = get_as(api, &changes_path(""), &key).await;
    assert_eq!(code, 200, "{now}");
    assert_eq!(
        (now["changes"].clone(), now["next"].clone()),
        (json!([]), now["head"].clone())
    );

    let cursor = now["next"].as_u64().unwrap();
    let poll = {
        let key = key.clone();
        tokio::spawn(async move {
            get_as(
                api,
                &changes_path(&format!("?after={cursor}&wait=20")),
                &key,
            )
            .await
        })
    };
    eventually("the long poll waiting", || async {
        let waiting = cloud.status().change_readers;
        (waiting == 1)
            .then_some(())
            .ok_or(format!("{waiting} readers"))
    })
    .await;
    let version = write_setting(&cloud, "mode").await;
    let (code, page) = tokio::time::timeout(WAIT, poll)
        .await
        .expect("the poll answers")
        .unwrap();
    assert_eq!(code, 200, "{page}");
    let changes = page["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "the write woke the poll: {page}");
    let c = &changes[0];
    assert_eq!(
        (
            &c["model"],
            &c["device"],
            &c["op"],
            &c["version"],
            &c["account"]
        ),
        (
            &json!("Setting"),
            &json!("dev0"),
            &json!("put"),
            &json!(version),
            &json!(ACCOUNT)
        )
    );
    assert_eq!(c["key"], json!({"pk": "device#dev0", "sk": "setting#mode"}));
    assert_eq!(c["item"]["value"], "v");
    assert_eq!(page["next"], c["seq"]);
    let status = cloud.status();
    assert_eq!((status.change_readers, status.changes_served), (0, 1));
    // The head in the status is copied from the store's by a task of its own, which may run
    // after the reader it woke answered.
    let seq = c["seq"].as_u64().unwrap();
    eventually("the status shows the change log's head", || {
        let head = cloud.status().change_log_head;
        async move { (head == seq).then_some(()).ok_or(format!("head {head}")) }
    })
    .await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_a_cursor_retention_passed_is_told_and_the_reader_starts_over_from_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, key) = with_device(changes_config(dir.path())).await;
    let api = cloud.api_addr;
    for name in ["a", "b", "c"] {
        write_setting(&cloud, name).await;
    }
    let (_, all) = get_as(api, &changes_path("?after=0"), &key).await;
    let seqs: Vec<u64> = all["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 3, "{all}");
    let keep_one = ChangeRetention {
        max_age_ms: u64::MAX,
        max_per_account: 1,
        batch: 1000,
    };
    cloud
        .store
        .call(move |c| c.store.purge_changes(0, &keep_one))
        .await
        .unwrap()
        .unwrap();

    let auth = format!("Authorization: Bearer {key}");
    for (what, headers) in [
        ("long poll", vec![auth.as_str()]),
        ("SSE", vec![auth.as_str(), "Accept: text/event-stream"]),
    ] {
        let answer = exchange(api, "GET", &changes_path("?after=0"), &headers, None).await;
        assert_eq!(answer.code, 410, "{what}: {}", answer.body);
        let body = answer.json();
        assert_eq!(body["kind"], "cursor_expired", "{what}: {body}");
        assert_eq!(
            body.as_object().unwrap().len(),
            2,
            "the one error shape: {body}"
        );
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("re-read the items"),
            "{body}"
        );
    }
    // From the floor on, nothing is missing; from the head on, nothing is pending.
    let (code, rest) = get_as(api, &changes_path(&format!("?after={}", seqs[1])), &key).await;
    assert_eq!(code, 200, "{rest}");
    assert_eq!(rest["changes"][0]["seq"].as_u64(), Some(seqs[2]));
    let (_, now) = get_as(api, &changes_path(""), &key).await;
    assert_eq!(now["next"].as_u64(), Some(seqs[2]), "{now}");
    assert_eq!(cloud.status().changes_expired, 2);
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_readers_beyond_the_limit_are_told_to_retry_and_may_still_read_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = changes_config(dir.path());
    config.changes.max_readers = 1;
    let (cloud, key) = with_device(config).await;
    let api = cloud.api_addr;
    let first = {
        let key = key.clone();
        tokio::spawn(async move { get_as(api, &changes_path("?wait=20"), &key).await })
    };
    eventually("the first reader waiting", || async {
        (cloud.status().change_readers == 1)
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    let auth = format!("Authorization: Bearer {key}");
    let busy = exchange(api, "GET", &changes_path("?wait=20"), &[&auth], None).await;
    assert_eq!(busy.code, 503, "{}", busy.body);
    assert_eq!(busy.json()["kind"], "busy");
    assert_eq!(busy.header("retry-after"), Some("1"));
    let sse = exchange(
        api,
        "GET",
        &changes_path(""),
        &[&auth, "Accept: text/event-stream"],
        None,
    )
    .await;
    assert_eq!(sse.code, 503, "an SSE stream waits too: {}", sse.body);
    let (code, _) = get_as(api, &changes_path("?after=0"), &key).await;
    assert_eq!(code, 200, "a read that does not wait needs no slot");
    write_setting(&cloud, "x").await;
    let (code, page) = first.await.unwrap();
    assert_eq!(
        (code, page["changes"].as_array().map(Vec::len)),
        (200, Some(1))
    );
    assert_eq!(cloud.status().change_readers_refused, 2);
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_need_a_key_of_the_account_and_webhooks_need_admin() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, admin) = with_device(changes_config(dir.path())).await;
    let api = cloud.api_addr;
    let read = cloud
        .create_api_key(ACCOUNT, KeyScope::Read)
        .await
        .unwrap()
        .key;
    let other = cloud
        .create_api_key("globex", KeyScope::Admin)
        .await
        .unwrap()
        .key;
    assert_eq!(get_as(api, &changes_path(""), &read).await.0, 200);
    assert_eq!(get_as(api, &changes_path(""), &other).await.0, 403);
    let webhooks = format!("/v1/accounts/{ACCOUNT}/webhooks");
    assert_eq!(get_as(api, &webhooks, &read).await.0, 200);
    let new = json!({"url": "https://hooks.example.com/x"});
    let (code, body) = request(api, "POST", &webhooks, Some(&read), Some(&new)).await;
    assert_eq!((code, &body["kind"]), (403, &json!("forbidden")), "{body}");
    for (query, code, kind) in [
        ("?model=NoSuchModel", 404, "not_found"),
        ("?device=a%20b", 400, "invalid"),
        ("?limit=0", 400, "invalid"),
        ("?after=-1", 400, "bad_request"),
    ] {
        let (got, body) = get_as(api, &changes_path(query), &admin).await;
        assert_eq!(
            (got, body["kind"].as_str()),
            (code, Some(kind)),
            "{query}: {body}"
        );
    }
    let bad_id = exchange(
        api,
        "GET",
        &changes_path(""),
        &[
            &format!("Authorization: Bearer {admin}"),
            "Accept: text/event-stream",
            "Last-Event-ID: not-a-number",
        ],
        None,
    )
    .await;
    assert_eq!(bad_id.code, 400, "{}", bad_id.body);
    cloud.shutdown().await;
}

/// An SSE request's answer head, read on a connection kept open.
async fn open_stream(api: SocketAddr, key: &str) -> BufReader<tokio::net::TcpStream> {
    let mut tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {key}\r\n\
         Accept: text/event-stream\r\n\r\n",
        changes_path("?after=0")
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut stream = BufReader::new(tcp);
    let mut line = String::new();
    stream.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    loop {
        line.clear();
        stream.read_line(&mut line).await.unwrap();
        if line.trim().is_empty() {
            return stream;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_sse_streams_carry_each_change_and_end_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (cloud, key) = with_device(changes_config(dir.path())).await;
    let mut stream = open_stream(cloud.api_addr, &key).await;
    let version = write_setting(&cloud, "s").await;
    // The event arrives in one chunk: size line, `id:`, `event:`, `data:`.
    let mut seen = String::new();
    while !seen.contains("\n\n") || !seen.contains("data:") {
        let mut line = String::new();
        tokio::time::timeout(WAIT, stream.read_line(&mut line))
            .await
            .expect("an event")
            .unwrap();
        seen.push_str(&line.replace('\r', ""));
    }
    assert!(seen.contains("event: change"), "{seen}");
    assert!(seen.contains(&version), "{seen}");
    assert_eq!(cloud.status().change_readers, 1);
    // Shutdown does not wait for the reader to leave: the stream ends.
    tokio::time::timeout(WAIT, cloud.shutdown())
        .await
        .expect("the shutdown ends the open stream");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the stream is closed");
}

/// A webhook receiver: answers every request 200 and hands each body over.
async fn receiver() -> (u16, mpsc::UnboundedReceiver<Value>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line.trim().is_empty() {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    conn.read_exact(&mut body).await.unwrap();
                    let _ = tx.send(serde_json::from_slice(&body).unwrap());
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                    if conn.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

async fn next_delivery(bodies: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(WAIT, bodies.recv())
        .await
        .expect("a delivery")
        .expect("the receiver runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_checked_limited_and_tell_of_a_gap_retention_made() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = changes_config(dir.path());
    config.changes.webhooks_per_account = 1;
    let (cloud, key) = with_device(config).await;
    let api = cloud.api_addr;
    let webhooks = format!("/v1/accounts/{ACCOUNT}/webhooks");
    for (body, code, kind) in [
        (json!({"url": "ftp://x/y"}), 400, "invalid"),
        (json!({"url": "http://u:p@x/y"}), 400, "invalid"),
        (
            json!({"url": "https://x/y", "model": "Nope"}),
            404,
            "not_found",
        ),
    ] {
        let (got, answer) = request(api, "POST", &webhooks, Some(&key), Some(&body)).await;
        assert_eq!(
            (got, answer["kind"].as_str()),
            (code, Some(kind)),
            "{body}: {answer}"
        );
    }

    // Three changes, two removed by retention before the webhook (from 0) delivers them.
    for name in ["a", "b", "c"] {
        write_setting(&cloud, name).await;
    }
    let keep_one = ChangeRetention {
        max_age_ms: u64::MAX,
        max_per_account: 1,
        batch: 1000,
    };
    cloud
        .store
        .call(move |c| c.store.purge_changes(0, &keep_one))
        .await
        .unwrap()
        .unwrap();
    let (port, mut bodies) = receiver().await;
    let new = json!({"url": format!("http://127.0.0.1:{port}/hook"), "after": 0});
    let (code, created) = request(api, "POST", &webhooks, Some(&key), Some(&new)).await;
    assert_eq!(code, 201, "{created}");
    let id = created["webhook"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["webhook"]["cursor"], 0);
    let (code, again) = request(api, "POST", &webhooks, Some(&key), Some(&new)).await;
    assert_eq!(
        (code, again["kind"].as_str()),
        (409, Some("limit_reached")),
        "{again}"
    );

    let gap = next_delivery(&mut bodies).await;
    let floor = gap["gap"]["through"].as_u64().unwrap();
    assert_eq!(gap["gap"]["after"], 0, "{gap}");
    assert_eq!(gap["changes"], json!([]), "{gap}");
    let rest = next_delivery(&mut bodies).await;
    assert!(rest.get("gap").is_none(), "{rest}");
    let kept = rest["changes"].as_array().unwrap();
    assert_eq!(kept.len(), 1, "{rest}");
    assert!(kept[0]["seq"].as_u64().unwrap() > floor);
    assert_eq!(kept[0]["key"]["sk"], "setting#c");
    let status = eventually("the webhook caught up", || async {
        let (_, h) = get_as(api, &format!("{webhooks}/{id}"), &key).await;
        (h["cursor"] == kept[0]["seq"])
            .then_some(h.clone())
            .ok_or(h.to_string())
    })
    .await;
    assert_eq!(
        (
            &status["gaps"],
            &status["deliveries"],
            &status["changes_delivered"]
        ),
        (&json!(1), &json!(2), &json!(1)),
        "{status}"
    );
    assert_eq!(cloud.status().webhook_gaps, 1);
    let (code, _) = request(api, "DELETE", &format!("{webhooks}/{id}"), Some(&key), None).await;
    assert_eq!(code, 200);
    let (code, _) = get_as(api, &format!("{webhooks}/{id}"), &key).await;
    assert_eq!(code, 404);
    eventually("the delivery task gone", || async {
        let n = cloud.status().webhooks;
        (n == 0).then_some(()).ok_or(format!("{n} webhooks"))
    })
    .await;
    cloud.shutdown().await;
}
