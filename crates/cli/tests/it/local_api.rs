//! The agent's local API with real processes: a `devtables agent` serving its Unix socket
//! against a real `devtables cloud`, and clients that speak HTTP over the socket (a small one
//! here; the Python and Node examples in `examples/`).
//!
//! Items written through the socket reach the cloud and page back; a change stream gets local
//! and cloud changes, is dropped, and resumes with `Last-Event-ID` missing nothing; a command
//! written through the cloud's API is taken by a long-polling client, answered, and the result
//! reaches the cloud; an unanswered command is offered again after its lease; a killed agent's
//! stale socket is replaced and its readers are told to read again; a clean stop ends open
//! streams and removes the socket; the optional TCP listener answers loopback names only.
//!
//! The examples need `python3` and `node`: without them their tests print a `SKIPPED` line
//! (with `DEVTABLES_SERVICES` set, as `.ci/run` does, a missing one fails the test).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::harness::{
    eventually, unique_prefix, AgentProc, AgentSpec, BrokerChoice, CloudProc, WAIT,
};

/// A client of the local API over its Unix socket: HTTP/1.1, one connection per request.
#[derive(Clone)]
struct Local {
    socket: PathBuf,
}

/// Percent-encodes a query value.
fn enc(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A `where=` query value.
fn where_(props: Value) -> String {
    enc(&props.to_string())
}

/// A body of `Transfer-Encoding: chunked`, decoded.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            // The CRLF that ends the previous chunk, then the size line.
            while line.trim().is_empty() {
                line.clear();
                if self.inner.read_line(&mut line)? == 0 {
                    return Ok(0);
                }
            }
            let size = line.trim().split(';').next().unwrap_or_default();
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("chunk {line:?}"))
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let take = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..take])?;
        self.left -= n;
        Ok(n)
    }
}

/// One server-sent event.
#[derive(Debug, Default)]
struct SseEvent {
    id: Option<String>,
    event: String,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }
}

/// An open change stream.
struct Sse {
    lines: Box<dyn BufRead>,
}

impl Sse {
    /// The next event (comments skipped); panics at the end of the stream or after [`WAIT`].
    fn next(&mut self) -> SseEvent {
        let mut event = SseEvent::default();
        let mut any = false;
        loop {
            let mut line = String::new();
            let n = self
                .lines
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("reading the stream: {e}"));
            assert!(n > 0, "the stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if any {
                    return event;
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            any = true;
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "id" => event.id = Some(value),
                "event" => event.event = value,
                "data" => event.data.push_str(&value),
                _ => {}
            }
        }
    }

    /// Whether the stream ends (the server closed it) before another event.
    fn ends(&mut self) -> bool {
        let mut rest = String::new();
        loop {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) => return true,
                Ok(_) if line.starts_with(':') || line.trim().is_empty() => continue,
                Ok(_) => rest.push_str(&line),
                Err(e) => panic!("the stream neither ended nor went on: {e}; read {rest:?}"),
            }
            if rest.contains("event:") {
                return false;
            }
        }
    }

    /// The next `change` event's entry.
    fn change(&mut self) -> Value {
        let e = self.next();
        assert_eq!(e.event, "change", "{e:?}");
        let entry = e.json();
        assert_eq!(
            e.id.as_deref(),
            Some(entry["seq"].to_string().as_str()),
            "the event id is the sequence number"
        );
        entry
    }
}

impl Local {
    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket.display()));
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
    }

    /// Writes a request; returns the reader positioned at the body, the status and headers.
    fn start(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (BufReader<UnixStream>, u16, Vec<(String, String)>) {
        let mut stream = self.connect();
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        if !body.is_empty() {
            if !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            {
                head.push_str("Content-Type: application/json\r\n");
            }
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        (reader, status, headers)
    }

    fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let (mut reader, status, head) = self.start(method, path, body, headers);
        let header = |name: &str| head.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let mut raw = Vec::new();
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            Chunked {
                inner: reader,
                left: 0,
                done: false,
            }
            .read_to_end(&mut raw)
            .unwrap();
        } else if let Some(len) = header("content-length").and_then(|v| v.parse().ok()) {
            raw.resize(len, 0);
            reader.read_exact(&mut raw).unwrap();
        } else {
            reader.read_to_end(&mut raw).unwrap();
        }
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()))
        };
        (status, body)
    }

    fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.request_with(method, path, body.as_ref(), &[])
    }

    /// A request that must answer `expect`; returns the body.
    fn expect(&self, expect: u16, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.request(method, path, body);
        assert_eq!(status, expect, "{method} {path}: {answer}");
        answer
    }

    /// Opens `GET path` as a server-sent event stream.
    fn stream(&self, path: &str, last_event_id: Option<&str>) -> Sse {
        let mut headers = vec![("Accept", "text/event-stream")];
        if let Some(id) = last_event_id {
            headers.push(("Last-Event-ID", id));
        }
        let (reader, status, head) = self.start("GET", path, None, &headers);
        assert_eq!(status, 200, "stream {path}: {head:?}");
        let chunked = head
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
        let lines: Box<dyn BufRead> = if chunked {
            Box::new(BufReader::new(Chunked {
                inner: reader,
                left: 0,
                done: false,
            }))
        } else {
            Box::new(reader)
        };
        Sse { lines }
    }

    fn status(&self) -> Value {
        self.expect(200, "GET", "/v1/status", None)
    }
}

struct Setup {
    dir: tempfile::TempDir,
    cloud: CloudProc,
    prefix: String,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::Embedded(0));
    Setup { dir, cloud, prefix }
}

impl Setup {
    /// An agent for `device` (registered here) with the local API on its default socket,
    /// `DIR/<device>.sock`; waits until it serves and is synced.
    fn agent(&self, device: &str, extra: &str) -> (AgentProc, Local) {
        let secret = self.cloud.register("acme", device);
        self.agent_with_secret(device, &secret, extra)
    }

    fn agent_with_secret(&self, device: &str, secret: &str, extra: &str) -> (AgentProc, Local) {
        let mut agent = AgentProc::start_with(
            &AgentSpec {
                dir: self.dir.path(),
                name: device,
                account: "acme",
                device,
                secret,
                mqtt: &self.cloud.mqtt,
                prefix: &self.prefix,
                schema: None,
            },
            extra,
        );
        let socket = self.dir.path().join(format!("{device}.sock"));
        agent.logs.wait_for("the local API serving", |l| {
            l.contains("local API on unix:")
        });
        agent.wait_synced();
        (agent, Local { socket })
    }

    /// The cloud's items of `model` for `device`.
    fn cloud_items(&self, device: &str, model: &str) -> Vec<Value> {
        self.cloud
            .items("acme", device, model)
            .unwrap_or_else(|e| panic!("cloud items: {e}"))
    }
}

#[test]
fn items_through_the_socket_reach_the_cloud_and_page_back_and_bad_requests_are_typed() {
    let s = setup();
    let (agent, local) = s.agent("gw1", "");
    // The socket is the agent's user's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&local.socket).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");

    let status = local.status();
    assert_eq!(status["device"], "acme/gw1");
    assert_eq!(status["ready"], true);

    // Create: durable on the device, then in the cloud.
    let created = local.expect(
        201,
        "POST",
        "/v1/items/Fault",
        Some(json!({"deviceId": "gw1", "severity": "warn", "message": "from the socket"})),
    );
    let id = created["item"]["id"]
        .as_str()
        .expect("a generated id")
        .to_string();
    eventually("the fault in the cloud", || {
        let items = s.cloud.items("acme", "gw1", "Fault")?;
        items
            .iter()
            .any(|i| i["item"]["id"] == id.as_str() && i["item"]["message"] == "from the socket")
            .then_some(())
            .ok_or(format!("{items:?}"))
    });

    // Get it back by its key fields.
    let got = local.expect(
        200,
        "GET",
        &format!(
            "/v1/items/Fault/one?where={}",
            where_(json!({"deviceId": "gw1", "id": id}))
        ),
        None,
    );
    assert_eq!(got["item"]["message"], "from the socket");

    // A batch: four more in one transaction.
    let ops: Vec<Value> = (0..4)
        .map(|i| {
            json!({"op": "create", "model": "Fault",
                   "item": {"deviceId": "gw1", "severity": "info", "message": format!("batch {i}")}})
        })
        .collect();
    let batch = local.expect(200, "POST", "/v1/batch", Some(json!({ "ops": ops })));
    assert_eq!(
        batch["results"].as_array().map(Vec::len),
        Some(4),
        "{batch}"
    );

    // Find in pages of two: 2, 2, 1, each id once, the last page without `next`.
    let mut ids = Vec::new();
    let mut sizes = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let mut path = format!(
            "/v1/items/Fault?where={}&limit=2",
            where_(json!({"deviceId": "gw1"}))
        );
        if let Some(token) = &next {
            path.push_str(&format!("&next={}", enc(token)));
        }
        let page = local.expect(200, "GET", &path, None);
        let items = page["items"].as_array().unwrap().clone();
        sizes.push(items.len());
        ids.extend(items.iter().map(|i| i["id"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(token) => next = Some(token.to_string()),
            None => break,
        }
    }
    assert_eq!(sizes, [2, 2, 1]);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "{ids:?}");
    assert!(ids.contains(&id));
    eventually("all five faults in the cloud", || {
        let n = s.cloud.items("acme", "gw1", "Fault")?.len();
        (n == 5).then_some(()).ok_or(format!("{n} faults"))
    });

    // Update, upsert and remove answer the item.
    let key = json!({"deviceId": "gw1", "id": id});
    let mut patch = key.clone();
    patch["message"] = json!("patched");
    let updated = local.expect(200, "PATCH", "/v1/items/Fault", Some(patch));
    assert_eq!(updated["item"]["message"], "patched");
    local.expect(
        200,
        "PUT",
        "/v1/items/Setting",
        Some(json!({"deviceId": "gw1", "name": "mode", "value": "eco"})),
    );
    let removed = local.expect(
        200,
        "DELETE",
        &format!("/v1/items/Fault?where={}", where_(key.clone())),
        None,
    );
    assert_eq!(removed["item"]["message"], "patched");
    let gone = local.expect(
        404,
        "GET",
        &format!("/v1/items/Fault/one?where={}", where_(key)),
        None,
    );
    assert_eq!(gone["kind"], "not_found", "{gone}");

    // What a program can tell apart: the kind, with a sentence for people.
    let cases: Vec<(u16, &str, Value)> = vec![
        (
            400,
            "invalid",
            local.request("GET", "/v1/items/Fault?limit=5000", None).1,
        ),
        (
            404,
            "not_found",
            local.request("POST", "/v1/items/Nope", Some(json!({}))).1,
        ),
        (
            403,
            "not_writable",
            local
                .request(
                    "POST",
                    "/v1/items/Firmware",
                    Some(json!({"version": "1", "url": "x"})),
                )
                .1,
        ),
        (
            400,
            "invalid",
            local
                .request(
                    "POST",
                    "/v1/items/Fault",
                    Some(json!({"deviceId": "gw1", "severity": "apocalyptic"})),
                )
                .1,
        ),
        (404, "no_route", local.request("GET", "/v2/nothing", None).1),
        (
            405,
            "method_not_allowed",
            local.request("DELETE", "/v1/status", None).1,
        ),
    ];
    for (status, kind, body) in &cases {
        assert_eq!(body["kind"], *kind, "expected {status} {kind}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let (status, body) = local.request_with(
        "POST",
        "/v1/items/Fault",
        Some(&json!({"deviceId": "gw1", "severity": "warn"})),
        &[("Content-Type", "text/plain")],
    );
    assert_eq!(
        (status, body["kind"].as_str()),
        (415, Some("bad_request")),
        "{body}"
    );
    let (status, body) = local.request("GET", "/v1/items/Fault?limit=5000", None);
    assert_eq!(status, 400, "{body}");

    // --stdin pages the same way and echoes request ids.
    let mut agent = agent;
    agent.send(
        &json!({"op": "find", "model": "Fault", "item": {"deviceId": "gw1"}, "limit": 3, "id": 7}),
    );
    let answer = agent.answer();
    assert_eq!(answer["id"], 7, "{answer}");
    assert_eq!(
        answer["result"].as_array().map(Vec::len),
        Some(3),
        "{answer}"
    );
    let token = answer["next"].as_str().expect("a next token").to_string();
    agent.send(&json!({"op": "find", "model": "Fault", "item": {"deviceId": "gw1"}, "limit": 3, "next": token, "id": "b"}));
    let answer = agent.answer();
    assert_eq!(answer["id"], "b", "{answer}");
    assert_eq!(
        answer["result"].as_array().map(Vec::len),
        Some(1),
        "{answer}"
    );
    assert_eq!(answer["next"], Value::Null, "{answer}");
    // Without a limit, every match, as --stdin always answered.
    agent.send(&json!({"op": "find", "model": "Fault", "item": {"deviceId": "gw1"}}));
    let answer = agent.answer();
    assert_eq!(
        answer["result"].as_array().map(Vec::len),
        Some(4),
        "{answer}"
    );
    assert_eq!(answer["next"], Value::Null, "{answer}");
    assert!(
        answer.get("id").is_none(),
        "no id asked, none echoed: {answer}"
    );
    let answer = agent.op_err(json!({"op": "find", "model": "Fault", "item": {}, "limit": 5000}));
    assert!(answer.contains("largest page"), "{answer}");
    // A batch through --stdin: one transaction, one result per operation; a failing one writes
    // nothing.
    let results = agent.op(json!({"op": "batch", "ops": [
        {"op": "upsert", "model": "Setting", "item": {"deviceId": "gw1", "name": "fan", "value": "on"}},
        {"op": "remove", "model": "Setting", "item": {"deviceId": "gw1", "name": "mode"}},
    ]}));
    assert_eq!(results[0]["value"], "on", "{results}");
    assert_eq!(results[1]["value"], "eco", "the removed item: {results}");
    let refused = agent.op_err(json!({"op": "batch", "ops": [
        {"op": "upsert", "model": "Setting", "item": {"deviceId": "gw1", "name": "light", "value": "on"}},
        {"op": "create", "model": "Setting", "item": {"deviceId": "gw1", "name": "fan", "value": "off"}},
    ]}));
    assert!(refused.contains("already exists"), "{refused}");
    let light = where_(json!({"deviceId": "gw1", "name": "light"}));
    local.expect(
        404,
        "GET",
        &format!("/v1/items/Setting/one?where={light}"),
        None,
    );

    // A clean stop removes the socket.
    agent.stop();
    assert!(
        !local.socket.exists(),
        "the socket is removed at a clean stop"
    );
}

#[test]
fn a_change_stream_gets_local_and_cloud_changes_and_resumes_missing_nothing() {
    let s = setup();
    let secret = s.cloud.register("acme", "gw2");
    let (agent, local) = s.agent_with_secret("gw2", &secret, "");
    let start = local.status()["local_api"]["changes"]["latest"]
        .as_u64()
        .unwrap();

    let mut stream = local.stream(&format!("/v1/changes?from={start}"), None);
    let ready = stream.next();
    assert_eq!(ready.event, "ready", "{ready:?}");
    assert_eq!(ready.json()["from"], start);

    // A local write, then a cloud write: both arrive, in order, said where they came from.
    local.expect(
        201,
        "POST",
        "/v1/items/Fault",
        Some(json!({"deviceId": "gw2", "severity": "critical", "message": "overheat"})),
    );
    let first = stream.change();
    assert_eq!(first["seq"], start + 1);
    assert_eq!(
        (&first["model"], &first["op"], &first["origin"]),
        (&json!("Fault"), &json!("create"), &json!("local"))
    );
    assert_eq!(first["item"]["message"], "overheat");
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw2/items/Setting",
        json!({"name": "mode", "value": "eco"}),
    );
    assert_eq!(status, 201, "{body}");
    let second = stream.change();
    assert_eq!(second["seq"], start + 2);
    assert_eq!(
        (&second["model"], &second["op"], &second["origin"]),
        (&json!("Setting"), &json!("create"), &json!("cloud"))
    );
    assert_eq!(second["item"]["value"], "eco");
    let last_seen = second["seq"].to_string();

    // The reader goes away; meanwhile the cloud changes the setting and the device raises a
    // fault.
    drop(stream);
    let (status, body) = s.cloud.send(
        "PATCH",
        "/v1/accounts/acme/devices/gw2/items/Setting",
        json!({"name": "mode", "value": "boost"}),
    );
    assert_eq!(status, 200, "{body}");
    let setting = where_(json!({"deviceId": "gw2", "name": "mode"}));
    eventually("the cloud's setting on the device", || {
        let (status, got) = local.request(
            "GET",
            &format!("/v1/items/Setting/one?where={setting}"),
            None,
        );
        (status == 200 && got["item"]["value"] == "boost")
            .then_some(())
            .ok_or(got.to_string())
    });
    local.expect(
        201,
        "POST",
        "/v1/items/Fault",
        Some(json!({"deviceId": "gw2", "severity": "info", "message": "while nobody read"})),
    );

    // It comes back with the last id it saw: exactly what it missed, in order, then live.
    let mut resumed = local.stream("/v1/changes?from=now", Some(&last_seen));
    let ready = resumed.next();
    assert_eq!(
        ready.json()["from"],
        start + 2,
        "Last-Event-ID wins over from"
    );
    let missed_1 = resumed.change();
    let missed_2 = resumed.change();
    assert_eq!(
        (missed_1["seq"].as_u64(), missed_2["seq"].as_u64()),
        (Some(start + 3), Some(start + 4))
    );
    assert_eq!(
        (
            &missed_1["model"],
            &missed_1["op"],
            &missed_1["origin"],
            &missed_1["item"]["value"]
        ),
        (
            &json!("Setting"),
            &json!("update"),
            &json!("cloud"),
            &json!("boost")
        )
    );
    assert_eq!(missed_2["item"]["message"], "while nobody read");
    local.expect(
        201,
        "POST",
        "/v1/items/Reading",
        Some(json!({"deviceId": "gw2", "name": "temp", "value": 71.5})),
    );
    let live = resumed.change();
    assert_eq!(live["seq"], start + 5);
    assert_eq!(live["item"]["value"], 71.5);

    // The JSON page with a model filter: only the settings, and `next` passes the rest.
    let page = local.expect(
        200,
        "GET",
        &format!("/v1/changes?from={start}&model=Setting"),
        None,
    );
    let seqs: Vec<u64> = page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [start + 2, start + 3], "{page}");
    assert_eq!(page["latest"], start + 5);
    assert_eq!(
        page["next"],
        start + 5,
        "the cursor passes what the filter left out"
    );
    // A long-poll with nothing new waits and answers an empty page at its end...
    let waited = Instant::now();
    let empty = local.expect(
        200,
        "GET",
        &format!("/v1/changes?from={}&wait=1", start + 5),
        None,
    );
    assert!(waited.elapsed() >= Duration::from_millis(900));
    assert_eq!(empty["changes"], json!([]), "{empty}");
    // ...and a cursor the log does not cover is refused with what to do.
    let gone = local.expect(410, "GET", "/v1/changes?from=99999999999", None);
    assert_eq!(gone["kind"], "gone", "{gone}");
    assert_eq!(gone["latest"], start + 5);

    // A killed agent leaves its socket behind: the next start replaces it, and since the log
    // may have lost what a reader saw, old cursors are told to read again.
    agent.kill();
    assert!(local.socket.exists(), "a killed agent leaves its socket");
    let (_agent, local) = s.agent_with_secret("gw2", &secret, "");
    let stale = local.expect(410, "GET", &format!("/v1/changes?from={}", start + 5), None);
    assert_eq!(stale["kind"], "gone", "{stale}");
    let latest = stale["latest"].as_u64().unwrap();
    assert!(latest > start + 5, "a new era: {stale}");
    let fresh = local.expect(200, "GET", &format!("/v1/changes?from={latest}"), None);
    assert_eq!(fresh["changes"], json!([]), "{fresh}");
}

#[test]
fn commands_are_taken_by_long_poll_answered_into_the_cloud_and_redelivered_after_their_lease() {
    let s = setup();
    let (agent, local) = s.agent("gw3", "local_api: {command_lease_secs: 1},");

    // A long-polling taker waits; the cloud writes a command; the taker gets it.
    let taker = local.clone();
    let poll = std::thread::spawn(move || {
        taker.request("GET", "/v1/commands/next?wait=25&command=reboot", None)
    });
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw3/items/Command",
        json!({"command": "reboot", "args": {"delay": 3}}),
    );
    assert_eq!(status, 201, "{body}");
    let (status, command) = poll.join().unwrap();
    assert_eq!(status, 200, "{command}");
    assert_eq!(command["command"], "reboot");
    assert_eq!(command["args"]["delay"], 3);
    assert_eq!(command["delivery"], 1);
    assert_eq!(command["item"]["status"], "pending");
    let id = command["id"].as_str().unwrap().to_string();

    // The answer is written to the command item and reaches the cloud.
    let answered = local.expect(
        200,
        "POST",
        &format!("/v1/commands/{id}/result"),
        Some(json!({"result": {"rebooted": true}})),
    );
    assert_eq!(answered["item"]["status"], "done");
    let done = eventually("the command's result in the cloud", || {
        let items = s.cloud.items("acme", "gw3", "Command")?;
        items
            .iter()
            .find(|i| i["item"]["command"] == "reboot" && i["item"]["status"] == "done")
            .cloned()
            .ok_or(format!("{items:?}"))
    });
    assert_eq!(done["item"]["result"]["rebooted"], true);
    // A second answer does not overwrite the first.
    let again = local.expect(
        409,
        "POST",
        &format!("/v1/commands/{id}/result"),
        Some(json!({"error": "late"})),
    );
    assert_eq!(again["kind"], "answered", "{again}");

    // A command nobody takes waits, pending (not failed for want of a handler), and says so.
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw3/items/Command",
        json!({"command": "update", "args": {"to": "2.0"}}),
    );
    assert_eq!(status, 201, "{body}");
    eventually("the update command waiting on the device", || {
        let counts = local.status()["local_api"]["commands"].clone();
        (counts["waiting"] == 1)
            .then_some(())
            .ok_or(counts.to_string())
    });
    let listed = local.expect(200, "GET", "/v1/commands", None);
    assert_eq!(listed["commands"][0]["command"], "update", "{listed}");
    let pending = s.cloud_items("gw3", "Command");
    assert!(
        pending
            .iter()
            .any(|i| i["item"]["command"] == "update" && i["item"]["status"] == "pending"),
        "{pending:?}"
    );

    // Taken and not answered: held for its lease, then offered again.
    let first = local.expect(200, "GET", "/v1/commands/next?wait=5", None);
    assert_eq!(
        (first["command"].as_str(), first["delivery"].as_u64()),
        (Some("update"), Some(1))
    );
    let (status, _) = local.request("GET", "/v1/commands/next", None);
    assert_eq!(
        status, 204,
        "a leased command is not offered to another taker"
    );
    assert_eq!(local.status()["local_api"]["commands"]["leased"], 1);
    let taken_at = Instant::now();
    let second = local.expect(200, "GET", "/v1/commands/next?wait=10", None);
    assert!(
        taken_at.elapsed() >= Duration::from_millis(500),
        "offered again only once the lease ran out"
    );
    assert_eq!(second["id"], first["id"]);
    assert_eq!(second["delivery"], 2);
    assert_eq!(local.status()["local_api"]["commands"]["redelivered"], 1);
    local.expect(
        200,
        "POST",
        &format!("/v1/commands/{}/result", second["id"].as_str().unwrap()),
        Some(json!({"error": "no firmware 2.0 here"})),
    );
    let failed = eventually("the failed update in the cloud", || {
        let items = s.cloud.items("acme", "gw3", "Command")?;
        items
            .iter()
            .find(|i| i["item"]["command"] == "update" && i["item"]["status"] == "failed")
            .cloned()
            .ok_or(format!("{items:?}"))
    });
    assert_eq!(failed["item"]["result"]["error"], "no firmware 2.0 here");

    // A command the agent has a handler for (the built-in ping) is not offered: the agent runs it.
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw3/items/Command",
        json!({"command": "ping"}),
    );
    assert_eq!(status, 201, "{body}");
    let pong = eventually("the ping answered by the agent", || {
        let items = s.cloud.items("acme", "gw3", "Command")?;
        items
            .iter()
            .find(|i| i["item"]["command"] == "ping" && i["item"]["status"] == "done")
            .cloned()
            .ok_or(format!("{items:?}"))
    });
    assert_eq!(pong["item"]["result"]["pong"], "acme/gw3");
    let (status, body) = local.request("GET", "/v1/commands/next", None);
    assert_eq!(status, 204, "nothing for applications: {body}");

    // The same as server-sent events: each command taken is an event.
    let mut commands = local.stream("/v1/commands/stream?command=reboot", None);
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw3/items/Command",
        json!({"command": "reboot", "args": {"delay": 0}}),
    );
    assert_eq!(status, 201, "{body}");
    let event = commands.next();
    assert_eq!(event.event, "command", "{event:?}");
    let offered = event.json();
    assert_eq!(
        (offered["command"].as_str(), offered["delivery"].as_u64()),
        (Some("reboot"), Some(1))
    );
    local.expect(
        200,
        "POST",
        &format!("/v1/commands/{}/result", offered["id"].as_str().unwrap()),
        Some(json!({"result": {"rebooted": "again"}})),
    );

    // A clean stop ends the open streams and removes the socket.
    let mut changes = local.stream("/v1/changes", None);
    assert_eq!(changes.next().event, "ready");
    agent.stop();
    assert!(
        changes.ends(),
        "the change stream ends when the agent stops"
    );
    assert!(
        commands.ends(),
        "the command stream ends when the agent stops"
    );
    assert!(!local.socket.exists());
}

#[test]
fn the_tcp_listener_serves_loopback_names_only() {
    let s = setup();
    let (agent, _local) = s.agent("gw4", "local_api: {tcp: '127.0.0.1:0'},");
    let line = agent
        .logs
        .wait_for("the TCP address", |l| l.contains(" and http://"));
    let addr = line
        .split(" and http://")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .to_string();
    let status: Value = ureq::get(&format!("http://{addr}/v1/status"))
        .call()
        .unwrap_or_else(|e| panic!("GET http://{addr}/v1/status: {e}"))
        .into_json()
        .unwrap();
    assert_eq!(status["device"], "acme/gw4");
    // A request for another name (a web page's DNS rebinding) is refused.
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(
        format!(
            "GET /v1/status HTTP/1.1\r\nHost: evil.example:{}\r\nConnection: close\r\n\r\n",
            addr.rsplit(':').next().unwrap()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("\"kind\":\"forbidden\""), "{answer}");
}

/// Whether `program` runs; when it does not, prints a `SKIPPED` line (or, with
/// `DEVTABLES_SERVICES` set, fails).
fn tool(program: &str, test: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var_os("DEVTABLES_SERVICES").is_some() {
        panic!("DEVTABLES_SERVICES is set but {program} is not installed: {test} needs it");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED local_api::{test}: {program} is not installed"
    );
    false
}

/// Runs an example device application against a real agent and cloud: its fault reaches the
/// cloud, then the cloud's `reboot` command is answered by it and the result comes back.
fn run_example(program: &str, script: &str, device: &str, by: &str) {
    let s = setup();
    let (_agent, local) = s.agent(device, "");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(script);
    let mut child = Command::new(program)
        .arg(&script)
        .arg("--socket")
        .arg(&local.socket)
        .args(["--commands", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} {}: {e}", script.display()));
    let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut all = output.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
    }
    let said = || output.lock().unwrap().clone();

    let message = format!("raised by the {by} example");
    eventually("the example's fault in the cloud", || {
        let items = s.cloud.items("acme", device, "Fault")?;
        items
            .iter()
            .any(|i| i["item"]["message"] == message.as_str())
            .then_some(())
            .ok_or(format!("{items:?}; the example said:\n{}", said()))
    });
    let (status, body) = s.cloud.send(
        "POST",
        &format!("/v1/accounts/acme/devices/{device}/items/Command"),
        json!({"command": "reboot"}),
    );
    assert_eq!(status, 201, "{body}");
    let done = eventually("the example's answer in the cloud", || {
        let items = s.cloud.items("acme", device, "Command")?;
        items
            .iter()
            .find(|i| i["item"]["status"] == "done")
            .cloned()
            .ok_or(format!("{items:?}; the example said:\n{}", said()))
    });
    assert_eq!(done["item"]["result"]["rebooted"], true);
    assert_eq!(done["item"]["result"]["by"], by);

    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the example did not exit:\n{}",
            said()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The pipes close with the process; what it wrote is read by then, or very soon.
    let finished = eventually("the example's last line", || {
        let text = said();
        text.contains("done\n").then_some(text.clone()).ok_or(text)
    });
    assert!(exit.success(), "{program} exited with {exit}:\n{finished}");
    for line in [
        "raised fault ",
        "faults in ",
        "create Fault from local",
        "command reboot",
    ] {
        assert!(finished.contains(line), "no {line:?} in:\n{finished}");
    }
}

#[test]
fn the_python_example_raises_a_fault_follows_changes_and_answers_a_command() {
    if tool("python3", "the_python_example") {
        run_example("python3", "python/device_app.py", "py1", "python");
    }
}

#[test]
fn the_node_example_raises_a_fault_follows_changes_and_answers_a_command() {
    if tool("node", "the_node_example") {
        run_example("node", "node/device_app.js", "node1", "node");
    }
}
