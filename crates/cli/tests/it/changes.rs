//! Reacting to changes, with real processes: a `devtables cloud`, a real agent writing from a
//! device, items written through the API, and the cloud itself killed (SIGKILL) and restarted.
//!
//! - An SSE reader (a raw HTTP/1.1 client over TCP) reads the account's changes, is killed
//!   mid-stream, and comes back with `Last-Event-ID` after the cloud was killed and restarted
//!   too: it sees every change once, in order, as the long-poll reads of the log list them.
//! - A webhook receiver (a small HTTP server on a std `TcpListener`) is down (nothing listens),
//!   then answers 503, then 200, with a cloud restart during the outage: once it answers 200 it
//!   receives every change exactly once per (key, version), in order, each delivery signed; a
//!   second webhook filtered to one model gets exactly that model's changes.
//!
//! Every wait is on a condition with a deadline (`eventually`).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{json, Value};

use super::harness::{
    eventually, free_port, unique_prefix, AgentProc, AgentSpec, BrokerChoice, CloudProc, WAIT,
};

const ACCOUNT: &str = "acme";
const DEVICE: &str = "gw1";

/// The cloud's settings of these tests: quick retries and reads, so the waits are short.
const FAST: &str = "webhook_retry_min_ms: 50, webhook_retry_max_ms: 400, \
                    changes_read_interval_ms: 10, changes_keepalive_secs: 1,";

struct Fleet {
    _dir: tempfile::TempDir,
    cloud: CloudProc,
    agent: AgentProc,
    /// (pk, sk, version) of every API write, as the API answered it.
    api_writes: Vec<(String, String, String)>,
    /// Faults the agent created.
    faults: usize,
    next_setting: usize,
}

impl Fleet {
    fn start() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let prefix = unique_prefix();
        let cloud = CloudProc::start_with(dir.path(), &prefix, BrokerChoice::Embedded(0), FAST);
        let secret = cloud.register(ACCOUNT, DEVICE);
        let mut agent = AgentProc::start(&AgentSpec {
            dir: dir.path(),
            name: DEVICE,
            account: ACCOUNT,
            device: DEVICE,
            secret: &secret,
            mqtt: &cloud.mqtt,
            prefix: &prefix,
            schema: None,
        });
        agent.wait_synced();
        Fleet {
            _dir: dir,
            cloud,
            agent,
            api_writes: Vec::new(),
            faults: 0,
            next_setting: 0,
        }
    }

    /// `n` settings written through the API (each a new item; every third one updated again,
    /// and every fifth removed), then `faults` faults raised on the device, synced up.
    fn write(&mut self, n: usize, faults: usize) {
        for _ in 0..n {
            let i = self.next_setting;
            self.next_setting += 1;
            let name = format!("s{i}");
            let path = format!("/v1/accounts/{ACCOUNT}/devices/{DEVICE}/items/Setting");
            let item = json!({"deviceId": DEVICE, "name": name, "value": "a"});
            self.api_write("POST", &path, item.clone(), 201);
            if i.is_multiple_of(3) {
                let update = json!({"deviceId": DEVICE, "name": name, "value": "b"});
                self.api_write("PATCH", &path, update, 200);
            }
            if i.is_multiple_of(5) {
                self.api_write("DELETE", &path, item, 200);
            }
        }
        for i in 0..faults {
            self.agent.op(json!({"op": "create", "model": "Fault",
                "item": {"deviceId": DEVICE, "severity": "warn", "message": format!("f{i}")}}));
            self.faults += 1;
        }
        self.agent.wait_synced();
    }

    fn api_write(&mut self, method: &str, path: &str, body: Value, expect: u16) {
        let (status, answer) = self.cloud.send(method, path, body);
        assert_eq!(status, expect, "{method} {path}: {answer}");
        let key = &answer["key"];
        self.api_writes.push((
            key["pk"].as_str().unwrap().into(),
            key["sk"].as_str().unwrap().into(),
            answer["version"].as_str().unwrap().into(),
        ));
    }

    /// The whole change log of the account after `after`, read by long poll (pages of 7).
    fn log(&self, after: u64) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = after;
        loop {
            let page = self
                .cloud
                .get(&format!(
                    "/v1/accounts/{ACCOUNT}/changes?after={cursor}&limit=7"
                ))
                .unwrap_or_else(|e| panic!("reading the change log: {e}"));
            out.extend(page["changes"].as_array().unwrap().iter().cloned());
            let (next, head) = (
                page["next"].as_u64().unwrap(),
                page["head"].as_u64().unwrap(),
            );
            if next >= head {
                return out;
            }
            cursor = next;
        }
    }

    /// Checks that `log` holds every API write and every fault, once each.
    fn assert_holds_every_write(&self, log: &[Value]) {
        let keys: Vec<(String, String, String)> = log.iter().map(key_version).collect();
        let unique: BTreeSet<_> = keys.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            keys.len(),
            "a (key, version) twice in the log"
        );
        for w in &self.api_writes {
            assert!(unique.contains(w), "the API write {w:?} is not in the log");
        }
        let faults = log.iter().filter(|c| c["model"] == "Fault").count();
        assert_eq!(faults, self.faults, "the device's faults in the log");
        assert_eq!(
            log.len(),
            self.api_writes.len() + self.faults,
            "nothing else in the log"
        );
    }
}

fn key_version(c: &Value) -> (String, String, String) {
    (
        c["key"]["pk"].as_str().unwrap().into(),
        c["key"]["sk"].as_str().unwrap().into(),
        c["version"].as_str().unwrap().into(),
    )
}

fn seqs(changes: &[Value]) -> Vec<u64> {
    changes.iter().map(|c| c["seq"].as_u64().unwrap()).collect()
}

/// One server-sent event.
#[derive(Debug)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// A raw SSE reader: HTTP/1.1 over TCP, the chunked body decoded, events parsed as they complete.
struct SseReader {
    stream: BufReader<TcpStream>,
    /// Bytes of the body not yet part of a complete event.
    pending: String,
}

impl SseReader {
    fn connect(api: &str, key: &str, path: &str, last_event_id: Option<&str>) -> SseReader {
        let mut tcp = TcpStream::connect(api).expect("connect to the API");
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let resume = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {key}\r\n\
             Accept: text/event-stream\r\n{resume}\r\n"
        )
        .unwrap();
        let mut stream = BufReader::new(tcp);
        let mut status = String::new();
        stream.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "SSE answer: {status}");
        let mut chunked = false;
        let mut content_type = String::new();
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            chunked |= lower == "transfer-encoding: chunked";
            if let Some(v) = lower.strip_prefix("content-type:") {
                content_type = v.trim().to_string();
            }
        }
        assert!(chunked, "a streamed body is chunked");
        assert_eq!(content_type, "text/event-stream");
        SseReader {
            stream,
            pending: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped).
    fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                let mut fields = 0;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        event.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event.event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        event.data.push_str(v.trim_start());
                    } else {
                        continue; // a comment (keep-alive)
                    }
                    fields += 1;
                }
                if fields > 0 {
                    return event;
                }
                continue;
            }
            // One chunk: its size in hex, the bytes, CRLF.
            let mut size = String::new();
            self.stream.read_line(&mut size).expect("a chunk size");
            let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
            assert!(size > 0, "the stream ended");
            let mut chunk = vec![0; size + 2];
            self.stream.read_exact(&mut chunk).expect("a chunk");
            self.pending
                .push_str(std::str::from_utf8(&chunk[..size]).expect("UTF-8 events"));
        }
    }

    /// The next change event, as JSON.
    fn next_change(&mut self) -> Value {
        let e = self.next();
        assert_eq!(e.event.as_deref(), Some("change"), "{e:?}");
        let change: Value = serde_json::from_str(&e.data).expect("JSON data");
        assert_eq!(
            e.id.as_deref(),
            Some(change["seq"].to_string().as_str()),
            "the event id is the change's seq"
        );
        change
    }
}

#[test]
fn changes_an_sse_reader_killed_and_restarted_misses_nothing() {
    let mut fleet = Fleet::start();
    let path = format!("/v1/accounts/{ACCOUNT}/changes?after=0");
    // The reader follows from the start while the first writes happen.
    let mut reader = SseReader::connect(&fleet.cloud.api, &fleet.cloud.key, &path, None);
    fleet.write(12, 4);
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(reader.next_change());
    }
    // The reader dies mid-stream: what it handled is all it keeps (its last event id).
    drop(reader);
    let last_id = seen.last().unwrap()["seq"].to_string();

    // Writes go on without it, the cloud is killed and restarted, and more writes follow.
    fleet.write(6, 2);
    fleet.cloud.kill_and_restart();
    fleet.agent.wait_synced();
    fleet.write(6, 3);
    let log = fleet.log(0);
    fleet.assert_holds_every_write(&log);
    let head = *seqs(&log).last().unwrap();

    let mut reader = SseReader::connect(&fleet.cloud.api, &fleet.cloud.key, &path, Some(&last_id));
    while seqs(&seen).last() != Some(&head) {
        seen.push(reader.next_change());
    }
    assert_eq!(
        seqs(&seen),
        seqs(&log),
        "the reader saw every change once, in order, across its death and the cloud's"
    );
    assert_eq!(
        seen.iter().map(key_version).collect::<Vec<_>>(),
        log.iter().map(key_version).collect::<Vec<_>>()
    );
    // A cursor from the future (a reader of another account's numbers) just waits; a stream
    // from now on gets the next write only.
    let mut live = SseReader::connect(
        &fleet.cloud.api,
        &fleet.cloud.key,
        &format!("/v1/accounts/{ACCOUNT}/changes?model=Setting"),
        None,
    );
    fleet.write(1, 1);
    let next = live.next_change();
    assert!(next["seq"].as_u64().unwrap() > head);
    assert_eq!(next["model"], "Setting", "the model filter");
    assert_eq!(
        next["key"]["sk"],
        format!("setting#s{}", fleet.next_setting - 1)
    );
}

/// What the receiver got: one request and how it answered.
#[derive(Clone, Debug)]
pub(super) struct Received {
    pub(super) path: String,
    headers: HashMap<String, String>,
    pub(super) body: Vec<u8>,
    pub(super) answered: u16,
}

/// A webhook receiver: a std `TcpListener` on a thread, HTTP/1.1 with keep-alive, answering
/// every request with the status in `answer`.
pub(super) struct Receiver {
    port: u16,
    answer: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    /// Listens on `port` (reserved beforehand: the webhook's URL names it while nothing listens).
    pub(super) fn start(port: u16, answer: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the receiver's port");
        let r = Receiver {
            port,
            answer: Arc::new(AtomicU16::new(answer)),
            got: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (answer, got, stop) = (r.answer.clone(), r.got.clone(), r.stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (answer, got) = (answer.clone(), got.clone());
                std::thread::spawn(move || serve(conn, &answer, &got));
            }
        });
        r
    }

    pub(super) fn received(&self) -> Vec<Received> {
        self.got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Serves one connection's requests until it closes.
fn serve(conn: TcpStream, answer: &AtomicU16, got: &Mutex<Vec<Received>>) {
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let status = answer.load(Ordering::SeqCst);
        got.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Received {
                path,
                headers,
                body,
                answered: status,
            });
        let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// The webhook's status as the API shows it.
fn hook(cloud: &CloudProc, id: &str) -> Value {
    cloud
        .get(&format!("/v1/accounts/{ACCOUNT}/webhooks/{id}"))
        .unwrap_or_else(|e| panic!("webhook {id}: {e}"))
}

/// The changes of the deliveries to `path` the receiver acknowledged, each checked: signed with
/// `secret` over its timestamp and body, recent, naming its webhook.
fn acknowledged(got: &[Received], path: &str, id: &str, secret: &str) -> Vec<Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut changes = Vec::new();
    for r in got.iter().filter(|r| r.path == path && r.answered == 200) {
        let ts: u64 = r.headers["x-devtables-timestamp"].parse().unwrap();
        assert!(now.abs_diff(ts) < 300, "a fresh timestamp: {ts}");
        assert_eq!(
            r.headers["x-devtables-signature"],
            devtables_cloud::webhooks::sign(secret, ts, &r.body),
            "the signature of a delivery to {path}"
        );
        assert_eq!(r.headers["x-devtables-webhook"], id);
        assert_eq!(r.headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&r.body).expect("a JSON body");
        assert_eq!(
            (body["webhook"].as_str(), body["account"].as_str()),
            (Some(id), Some(ACCOUNT))
        );
        assert!(body.get("gap").is_none(), "no gap: {body}");
        changes.extend(body["changes"].as_array().unwrap().iter().cloned());
    }
    changes
}

#[test]
fn changes_a_webhook_receiver_down_then_up_gets_every_change_exactly_once() {
    let mut fleet = Fleet::start();
    let port = free_port();
    let create = |path: &str, model: Option<&str>| {
        let (status, body) = fleet.cloud.send(
            "POST",
            &format!("/v1/accounts/{ACCOUNT}/webhooks"),
            json!({"url": format!("http://127.0.0.1:{port}{path}"), "model": model}),
        );
        assert_eq!(status, 201, "{body}");
        let id = body["webhook"]["id"].as_str().unwrap().to_string();
        let secret = body["secret"].as_str().unwrap().to_string();
        assert!(secret.starts_with("whsec_"), "{secret}");
        (id, secret, body["webhook"]["cursor"].as_u64().unwrap())
    };
    let (all_id, all_secret, start) = create("/all", None);
    let (fault_id, fault_secret, _) = create("/faults", Some("Fault"));

    // Down: nothing listens. Changes pile up; attempts fail and are counted.
    fleet.write(8, 3);
    eventually("failed attempts while the receiver is down", || {
        let h = hook(&fleet.cloud, &all_id);
        (h["failures"].as_u64() >= Some(2) && h["last_status"].is_null())
            .then_some(())
            .ok_or(h.to_string())
    });
    let h = hook(&fleet.cloud, &all_id);
    assert_eq!(h["cursor"].as_u64(), Some(start), "nothing delivered: {h}");
    assert!(h["lag_ms"].as_u64() > Some(0), "behind: {h}");
    let listed = fleet
        .cloud
        .get(&format!("/v1/accounts/{ACCOUNT}/webhooks"))
        .unwrap();
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 2);

    // The cloud dies during the outage: the cursors are durable; more writes after it restarts.
    fleet.cloud.kill_and_restart();
    fleet.agent.wait_synced();
    fleet.write(4, 2);

    // Up, but failing (503): received, not acknowledged.
    let receiver = Receiver::start(port, 503);
    eventually("attempts answered 503", || {
        let h = hook(&fleet.cloud, &all_id);
        let refused = receiver
            .received()
            .iter()
            .filter(|r| r.answered == 503)
            .count();
        (h["last_status"] == 503 && refused >= 2)
            .then_some(())
            .ok_or(format!("{h}; {refused} answered 503"))
    });
    assert_eq!(hook(&fleet.cloud, &all_id)["cursor"].as_u64(), Some(start));

    // Up for good: everything arrives; then writes while it is up arrive too.
    receiver.answer.store(200, Ordering::SeqCst);
    let caught_up = |fleet: &Fleet| {
        let head = fleet
            .log(start)
            .last()
            .map_or(start, |c| c["seq"].as_u64().unwrap());
        eventually("both webhooks caught up", || {
            let (all, faults) = (hook(&fleet.cloud, &all_id), hook(&fleet.cloud, &fault_id));
            (all["cursor"].as_u64() == Some(head)
                && all["failures"] == 0
                && all["lag_ms"] == 0
                && faults["failures"] == 0
                && faults["lag_ms"] == 0)
                .then_some(())
                .ok_or(format!("head {head}: {all} {faults}"))
        });
    };
    caught_up(&fleet);
    fleet.write(3, 2);
    caught_up(&fleet);
    let log = fleet.log(start);
    fleet.assert_holds_every_write(&log);

    let got = receiver.received();
    let delivered = acknowledged(&got, "/all", &all_id, &all_secret);
    assert_eq!(
        seqs(&delivered),
        seqs(&log),
        "every change exactly once, in order, once the receiver answered 200"
    );
    assert_eq!(
        delivered.iter().map(key_version).collect::<Vec<_>>(),
        log.iter().map(key_version).collect::<Vec<_>>()
    );
    let faults = acknowledged(&got, "/faults", &fault_id, &fault_secret);
    let log_faults: Vec<Value> = log.into_iter().filter(|c| c["model"] == "Fault").collect();
    assert_eq!(
        seqs(&faults),
        seqs(&log_faults),
        "the filtered webhook: its model only"
    );
    assert_eq!(faults.len(), fleet.faults);

    let h = hook(&fleet.cloud, &all_id);
    assert_eq!(h["last_status"], 200, "{h}");
    assert_eq!(h["last_error"], Value::Null, "{h}");
    assert_eq!(
        h["changes_delivered"].as_u64(),
        Some(delivered.len() as u64),
        "{h}"
    );
    let refused = got
        .iter()
        .filter(|r| r.path == "/all" && r.answered == 503)
        .count() as u64;
    assert!(
        h["failures_total"].as_u64().unwrap() >= refused + 2,
        "every failed attempt counted (refused connections and 503s): {h}"
    );
    // The service's metrics say the same.
    let status = fleet.cloud.get("/v1/status").unwrap();
    assert!(
        status["webhook_deliveries_ok"].as_u64() >= Some(2),
        "{status}"
    );
    assert!(
        status["webhook_deliveries_failed"].as_u64() >= Some(refused),
        "{status}"
    );
    assert_eq!(status["webhooks"], 2, "{status}");

    // Deleted: no more deliveries to it.
    let (code, body) = fleet.cloud.send(
        "DELETE",
        &format!("/v1/accounts/{ACCOUNT}/webhooks/{all_id}"),
        json!({}),
    );
    assert_eq!(code, 200, "{body}");
    let before = receiver
        .received()
        .iter()
        .filter(|r| r.path == "/all")
        .count();
    fleet.write(1, 1);
    caught_up_faults(&fleet, &fault_id);
    let after = receiver
        .received()
        .iter()
        .filter(|r| r.path == "/all")
        .count();
    assert_eq!(before, after, "a deleted webhook gets nothing more");
}

/// Waits until the fault webhook's cursor reaches the account's head of Fault changes.
fn caught_up_faults(fleet: &Fleet, id: &str) {
    let last_fault = fleet
        .log(0)
        .iter()
        .filter(|c| c["model"] == "Fault")
        .map(|c| c["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    eventually("the fault webhook caught up", || {
        let h = hook(&fleet.cloud, id);
        (h["cursor"].as_u64() >= Some(last_fault) && h["lag_ms"] == 0)
            .then_some(())
            .ok_or(h.to_string())
    });
}
