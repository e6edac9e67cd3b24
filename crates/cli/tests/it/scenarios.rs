//! End-to-end scenarios with real processes over real TCP MQTT. Each runs against the embedded
//! broker on SQLite (`e2e`) and, in CI, against Mosquitto on SQLite and on PostgreSQL
//! (`services`): each takes the [`Backend`] it runs on (a bare `BrokerChoice` means SQLite).

use serde_json::{json, Value};

use super::harness::{eventually, unique_prefix, AgentProc, AgentSpec, Backend, CloudProc};

const ACCOUNT: &str = "acme";

fn field(items: &[Value], f: &str) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|i| i["item"][f].as_str().unwrap_or_default().to_string())
        .collect();
    v.sort();
    v
}

struct Setup {
    _dir: tempfile::TempDir,
    cloud: CloudProc,
    prefix: String,
}

fn setup(backend: impl Into<Backend>) -> Setup {
    setup_with(backend, "")
}

fn setup_with(backend: impl Into<Backend>, extra: &str) -> Setup {
    let backend = backend.into();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    // A cluster node (PostgreSQL and an external broker) started again after SIGKILL waits for
    // its predecessor's leases to run out before it serves: a short lease keeps the restarts
    // of these scenarios short (the default is 5 s).
    let extra = if backend.is_cluster_node() {
        format!("cluster_lease_ms: 1000, {extra}")
    } else {
        extra.to_string()
    };
    let cloud = CloudProc::start_with(dir.path(), &prefix, backend, &extra);
    Setup {
        _dir: dir,
        cloud,
        prefix,
    }
}

impl Setup {
    fn agent(&self, name: &str, device: &str, secret: &str) -> AgentProc {
        self.agent_on(name, device, secret, &self.cloud.mqtt.clone())
    }

    fn agent_on(&self, name: &str, device: &str, secret: &str, mqtt: &str) -> AgentProc {
        AgentProc::start(&AgentSpec {
            dir: &self.cloud.dir,
            name,
            account: ACCOUNT,
            device,
            secret,
            mqtt,
            prefix: &self.prefix,
            schema: None,
        })
    }
}

/// Up, down, both, broadcast, commands, and every refusal the schema's process block implies.
pub fn up_down_both_and_commands(backend: impl Into<Backend>) {
    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw1");
    let mut a = s.agent("gw1", "gw1", &secret);
    a.wait_synced();

    // Up: a fault raised on the device appears in the cloud.
    let fault = a.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": "gw1", "severity": "warn", "message": "fan"}}));
    let id = fault["id"].as_str().unwrap().to_string();
    eventually("the fault in the cloud", || {
        let items = s.cloud.items(ACCOUNT, "gw1", "Fault")?;
        (field(&items, "id") == [id.clone()])
            .then_some(())
            .ok_or(format!("{items:?}"))
    });

    // Down + command: the cloud sends a ping; the device's handler answers; the result comes up.
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw1/items/Command",
        json!({"command": "ping"}),
    );
    assert_eq!(status, 201, "{body}");
    let done = eventually("the command result in the cloud", || {
        let items = s.cloud.items(ACCOUNT, "gw1", "Command")?;
        items
            .iter()
            .find(|i| i["item"]["status"] == "done")
            .cloned()
            .ok_or(format!("{items:?}"))
    });
    assert_eq!(done["item"]["result"]["pong"], "acme/gw1");

    // Both: a setting written on the device goes up; one changed in the cloud comes down.
    a.op(json!({"op": "upsert", "model": "Setting", "item": {"deviceId": "gw1", "name": "mode", "value": "eco"}}));
    eventually("the device's setting in the cloud", || {
        let items = s.cloud.items(ACCOUNT, "gw1", "Setting")?;
        (field(&items, "value") == ["eco"])
            .then_some(())
            .ok_or(format!("{items:?}"))
    });
    let (status, body) = s.cloud.send(
        "PATCH",
        "/v1/accounts/acme/devices/gw1/items/Setting",
        json!({"name": "mode", "value": "boost"}),
    );
    assert_eq!(status, 200, "{body}");
    eventually("the cloud's setting on the device", || {
        let got = a.op(
            json!({"op": "get", "model": "Setting", "item": {"deviceId": "gw1", "name": "mode"}}),
        );
        (got["value"] == "boost")
            .then_some(())
            .ok_or(got.to_string())
    });

    // Broadcast: firmware announced to the account reaches the device.
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/items/Firmware",
        json!({"version": "2.0.0", "url": "https://example.invalid/fw.bin"}),
    );
    assert_eq!(status, 201, "{body}");
    eventually("the firmware on the device", || {
        let got = a.op(json!({"op": "find", "model": "Firmware", "item": {}}));
        (got.as_array().map(Vec::len) == Some(1))
            .then_some(())
            .ok_or(got.to_string())
    });

    // Both processes log to a pipe here: plain text, no terminal colour codes.
    assert!(!s.cloud.logs.matching("").is_empty(), "the cloud logged");
    assert_eq!(
        (s.cloud.logs.coloured_lines(), a.logs.coloured_lines()),
        (0, 0)
    );

    // Refusals: down-only and cloud-only models on the device; up-only models in the cloud.
    let err = a
        .op_err(json!({"op": "create", "model": "Firmware", "item": {"version": "9", "url": "x"}}));
    assert!(err.contains("synced down"), "{err}");
    let err = a.op_err(json!({"op": "create", "model": "Status", "item": {"deviceId": "gw1"}}));
    assert!(err.contains("only in the cloud"), "{err}");
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw1/items/Fault",
        json!({"severity": "warn"}),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("owned by the device"),
        "{body}"
    );

    // Hostile input to the API: a clear JSON error, and the service keeps running.
    let bad = ureq::post(&s.cloud.url("/v1/accounts/acme/devices/gw1/items/Setting"))
        .set("authorization", &s.cloud.client().bearer())
        .set("content-type", "application/json")
        .send_string("{not json");
    match bad {
        Err(ureq::Error::Status(400, r)) => {
            let body: Value = r.into_json().unwrap();
            assert_eq!(body["kind"], "bad_request", "{body}");
        }
        other => panic!("expected a 400 with a JSON error, got {other:?}"),
    }
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw1/items/Setting",
        json!({"name": "Bad Name!", "value": "x"}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Setting.name"),
        "{body}"
    );

    // Status: online, schema version, no lag.
    let device = eventually("device status", || {
        let d = s.cloud.get("/v1/devices/acme/gw1")?;
        (d["online"] == true && d["cursor_lag"] == 0)
            .then_some(d.clone())
            .ok_or(d.to_string())
    });
    let tag = device["schema_version"].as_str().unwrap_or_default();
    assert!(tag.starts_with("1.0.0+"), "version+fingerprint: {device}");
    a.stop();
    eventually("the device offline after it stopped", || {
        let d = s.cloud.get("/v1/devices/acme/gw1")?;
        (d["online"] == false).then_some(()).ok_or(d.to_string())
    });
}

/// A device whose process dies (no goodbye) is marked offline through its MQTT last will.
pub fn killed_device_goes_offline(backend: impl Into<Backend>) {
    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw6");
    let mut a = s.agent("gw6", "gw6", &secret);
    a.wait_synced();
    eventually("the device online", || {
        let d = s.cloud.get("/v1/devices/acme/gw6")?;
        (d["online"] == true).then_some(()).ok_or(d.to_string())
    });
    a.kill();
    eventually("the device offline after SIGKILL", || {
        let d = s.cloud.get("/v1/devices/acme/gw6")?;
        (d["online"] == false).then_some(()).ok_or(d.to_string())
    });
}

/// A device offline while the cloud creates and deletes its items catches up, deletes included;
/// a reboot keeps the cursor and re-applies nothing.
pub fn offline_catch_up_with_deletes(backend: impl Into<Backend>) {
    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw2");
    let mut a = s.agent("gw2", "gw2", &secret);
    a.wait_synced();
    for v in ["1", "2"] {
        let (status, body) = s.cloud.send(
            "POST",
            "/v1/accounts/acme/items/Firmware",
            json!({"version": v, "url": format!("u{v}")}),
        );
        assert_eq!(status, 201, "{body}");
    }
    a.op(json!({"op": "upsert", "model": "Setting", "item": {"deviceId": "gw2", "name": "keep", "value": "x"}}));
    a.op(json!({"op": "upsert", "model": "Setting", "item": {"deviceId": "gw2", "name": "drop", "value": "x"}}));
    eventually("both firmware items on the device", || {
        let got = a.op(json!({"op": "find", "model": "Firmware", "item": {}}));
        (got.as_array().map(Vec::len) == Some(2))
            .then_some(())
            .ok_or(got.to_string())
    });
    a.wait_synced();
    let cursor_before = a.status()["cursor"].as_u64().unwrap();
    a.stop();

    // Offline: the cloud deletes one firmware item and one setting, creates another firmware.
    let (status, body) = s.cloud.send(
        "DELETE",
        "/v1/accounts/acme/items/Firmware",
        json!({"version": "1"}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.cloud.send(
        "DELETE",
        "/v1/accounts/acme/devices/gw2/items/Setting",
        json!({"name": "drop"}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/items/Firmware",
        json!({"version": "3", "url": "u3"}),
    );
    assert_eq!(status, 201, "{body}");

    let mut a = s.agent("gw2", "gw2", &secret);
    let restored = a.status()["cursor"].as_u64().unwrap();
    // At least what the status showed before the stop: the agent may apply one more page while
    // the end of its input waits for its outbox to drain.
    assert!(
        restored >= cursor_before && restored > 0,
        "the cursor survives a restart: {restored} after, {cursor_before} before"
    );
    eventually("the device caught up, deletes included", || {
        let fw = a.op(json!({"op": "find", "model": "Firmware", "item": {}}));
        let mut versions: Vec<String> = fw
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["version"].as_str().unwrap_or_default().to_string())
            .collect();
        versions.sort();
        let settings = a.op(json!({"op": "find", "model": "Setting", "item": {"deviceId": "gw2"}}));
        let names: Vec<String> = settings
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap_or_default().to_string())
            .collect();
        (versions == ["2", "3"] && names == ["keep"])
            .then_some(())
            .ok_or(format!("{versions:?} {names:?}"))
    });
    a.stop();
}

/// The cloud and an offline device change the same `both` item: after reconnecting both hold the
/// same item (the higher version) and the loser is in the conflict log.
pub fn conflict_converges_and_is_logged(backend: impl Into<Backend>) {
    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw3");
    let mut a = s.agent("gw3", "gw3", &secret);
    a.op(json!({"op": "upsert", "model": "Setting", "item": {"deviceId": "gw3", "name": "color", "value": "red"}}));
    a.wait_synced();
    eventually("the setting in the cloud", || {
        let items = s.cloud.items(ACCOUNT, "gw3", "Setting")?;
        (field(&items, "value") == ["red"])
            .then_some(())
            .ok_or(format!("{items:?}"))
    });
    a.stop();

    // The cloud changes it first, then the device (offline: pointed at a dead broker) changes it.
    let (status, body) = s.cloud.send(
        "PATCH",
        "/v1/accounts/acme/devices/gw3/items/Setting",
        json!({"name": "color", "value": "green"}),
    );
    assert_eq!(status, 200, "{body}");
    let dead = format!("127.0.0.1:{}", super::harness::free_port());
    let mut offline = s.agent_on("gw3", "gw3", &secret, &dead);
    std::thread::sleep(std::time::Duration::from_millis(5)); // a later wall-clock write
    offline.op(json!({"op": "update", "model": "Setting", "item": {"deviceId": "gw3", "name": "color", "value": "blue"}}));
    offline.terminate();

    let mut a = s.agent("gw3", "gw3", &secret);
    a.wait_synced();
    let (device_value, cloud_value) = eventually("both sides agree", || {
        let d = a.op(
            json!({"op": "get", "model": "Setting", "item": {"deviceId": "gw3", "name": "color"}}),
        );
        let items = s.cloud.items(ACCOUNT, "gw3", "Setting")?;
        let c = field(&items, "value");
        let dv = d["value"].as_str().unwrap_or_default().to_string();
        (c == [dv.clone()])
            .then_some((dv, c[0].clone()))
            .ok_or(format!("device {d} cloud {c:?}"))
    });
    assert_eq!(device_value, cloud_value);
    assert_eq!(
        device_value, "blue",
        "the later write (higher HLC) wins on both sides"
    );
    let log = s.cloud.get("/v1/accounts/acme/conflicts").unwrap();
    let conflicts = log["conflicts"].as_array().cloned().unwrap_or_default();
    assert!(
        conflicts.iter().any(|c| c["sk"] == "setting#color"),
        "conflict logged: {log}"
    );
    a.stop();
}

/// The agent is killed with SIGKILL while it writes and sends; after a restart every write it
/// acknowledged is in the cloud exactly once.
pub fn agent_killed_mid_batch(backend: impl Into<Backend>) {
    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw4");
    let mut a = s.agent("gw4", "gw4", &secret);
    a.wait_synced();
    let total = 400;
    for i in 0..total {
        a.send(&json!({"op": "create", "model": "Reading",
            "item": {"deviceId": "gw4", "id": format!("r{i:04}"), "name": "t", "value": i}}));
    }
    let mut acked = Vec::new();
    for i in 0..total / 2 {
        if a.answer()["ok"] == true {
            acked.push(format!("r{i:04}"));
        }
    }
    a.kill(); // SIGKILL, mid-stream
    let mut a = s.agent("gw4", "gw4", &secret);
    a.wait_synced();
    // The device kept every write it committed, acknowledged or not; the cloud must end with
    // exactly those.
    let local = a.op(json!({"op": "find", "model": "Reading", "item": {"deviceId": "gw4"}}));
    let mut written: Vec<String> = local
        .as_array()
        .expect("a list of readings")
        .iter()
        .map(|i| i["id"].as_str().unwrap_or_default().to_string())
        .collect();
    written.sort();
    assert!(
        acked.iter().all(|id| written.binary_search(id).is_ok()),
        "every acknowledged write survived the kill on the device"
    );
    assert!(written.len() <= total);
    eventually("the device's readings in the cloud", || {
        let ids = field(&s.cloud.items(ACCOUNT, "gw4", "Reading")?, "id");
        (ids == written).then_some(()).ok_or(format!(
            "{} in the cloud, {} written",
            ids.len(),
            written.len()
        ))
    });
    a.stop();
    // Each reading is one key written once: the cloud wrote each exactly once, however many
    // times the kill made the device resend it.
    assert_eq!(
        s.cloud.changes_applied(ACCOUNT, "gw4"),
        written.len() as u64,
        "each written reading applied exactly once"
    );
}

/// The cloud is killed with SIGKILL while a device pushes; after it restarts (same data, same
/// ports) every write the device acknowledged is in the cloud exactly once.
pub fn cloud_killed_mid_apply(backend: impl Into<Backend>) {
    let mut s = setup(backend);
    let secret = s.cloud.register("acme", "gw5");
    let mut a = s.agent("gw5", "gw5", &secret);
    a.wait_synced();
    let total = 300;
    for i in 0..total {
        a.send(&json!({"op": "create", "model": "Reading",
            "item": {"deviceId": "gw5", "id": format!("r{i:04}"), "name": "t", "value": i}}));
        if i == total / 3 {
            s.cloud.kill_and_restart();
        }
    }
    let mut acked = Vec::new();
    for i in 0..total {
        if a.answer()["ok"] == true {
            acked.push(format!("r{i:04}"));
        }
    }
    assert_eq!(
        acked.len(),
        total,
        "local writes do not depend on the cloud"
    );
    s.cloud.kill_and_restart();
    a.wait_synced();
    let items = eventually("every reading in the cloud", || {
        let items = s.cloud.items(ACCOUNT, "gw5", "Reading")?;
        (items.len() == total)
            .then_some(items.clone())
            .ok_or(format!("{} of {total}", items.len()))
    });
    let ids = field(&items, "id");
    assert_eq!(ids, acked, "every acknowledged reading in the cloud");
    a.stop();
    // A push the killed cloud committed but never acknowledged is resent and answered as a
    // duplicate: the cloud wrote each reading exactly once.
    assert_eq!(
        s.cloud.changes_applied(ACCOUNT, "gw5"),
        total as u64,
        "each acknowledged reading applied exactly once"
    );
}

/// A device on a newer schema (an optional field added) next to a cloud on the older one: the
/// cloud keeps the field it does not define, and both sides say so (docs/schema.md, "Changing a
/// schema in a live fleet").
pub fn newer_device_schema_is_kept_whole_and_said(backend: impl Into<Backend>) {
    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw8");
    let text = std::fs::read_to_string(super::example_schema()).unwrap();
    let newer = text
        .replace("version: '1.0.0'", "version: '1.1.0'")
        .replace(
            "source: {type: 'string'},",
            "source: {type: 'string'},\n            code: {type: 'number'},",
        );
    assert_ne!(newer, text, "the example schema changed: update this test");
    let schema_path = s.cloud.dir.join("newer.json5");
    std::fs::write(&schema_path, newer).unwrap();
    let mut a = AgentProc::start(&AgentSpec {
        dir: &s.cloud.dir,
        name: "gw8",
        account: ACCOUNT,
        device: "gw8",
        secret: &secret,
        mqtt: &s.cloud.mqtt,
        prefix: &s.prefix,
        schema: Some(&schema_path),
    });
    a.op(json!({"op": "create", "model": "Fault", "item": {"deviceId": "gw8", "severity": "warn", "code": 7}}));
    let status = eventually("the item acknowledged, kept by the cloud", || {
        let st = a.status();
        (st["kept_from_neighbour_schema"] == 1 && st["pending"] == 0)
            .then_some(st.clone())
            .ok_or(st.to_string())
    });
    assert_eq!(status["rejected"], 0, "{status}");
    assert!(
        status["cloud_schema"]
            .as_str()
            .is_some_and(|t| t.starts_with("1.0.0+")),
        "the device shows the cloud's schema: {status}"
    );
    let device = eventually("the device's schema version in its status", || {
        let d = s.cloud.get("/v1/devices/acme/gw8")?;
        d["schema_version"]
            .as_str()
            .is_some_and(|t| t.starts_with("1.1.0+"))
            .then_some(d.clone())
            .ok_or(d.to_string())
    });
    assert_eq!(device["online"], true);
    assert!(device["last_error"].is_null(), "{device}");
    let faults = s.cloud.items(ACCOUNT, "gw8", "Fault").unwrap();
    assert_eq!(faults.len(), 1);
    assert_eq!(
        faults[0]["item"]["code"], 7,
        "the field kept whole: {faults:?}"
    );
    a.stop();
}

/// Garbage and an unknown protocol version on a device's own topic get error replies; the cloud
/// keeps serving (a real agent still syncs afterwards).
/// A raw MQTT client with a device's credentials (no agent): the client, and its events, polled
/// on their own thread (rumqttc's poll is not cancel-safe, so no timeouts around it; a test waits
/// on the channel instead).
fn raw_device(
    s: &Setup,
    device: &str,
    secret: &str,
) -> (
    rumqttc::Client,
    std::sync::mpsc::Receiver<Result<rumqttc::Event, rumqttc::ConnectionError>>,
) {
    let (host, port) = s.cloud.mqtt.rsplit_once(':').unwrap();
    let id = format!("{ACCOUNT}/{device}");
    let mut options = rumqttc::MqttOptions::new(&id, host, port.parse().unwrap());
    options.set_credentials(&id, secret);
    let (client, mut connection) = rumqttc::Client::new(options, 16);
    let (events_tx, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in connection.iter() {
            let stop = event.is_err();
            if events_tx.send(event).is_err() || stop {
                break;
            }
        }
    });
    (client, events)
}

pub fn hostile_messages_get_error_replies(backend: impl Into<Backend>) {
    use rumqttc::{Event, Packet, QoS};
    use std::time::Duration;

    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw9");
    let (client, events) = raw_device(&s, "gw9", &secret);
    let down = format!("{}/acme/gw9/down", s.prefix);
    let up = format!("{}/acme/gw9/up", s.prefix);
    client.subscribe(&down, QoS::AtLeastOnce).unwrap();
    let mut errors = Vec::new();
    let mut sent = false;
    let deadline = std::time::Instant::now() + super::harness::WAIT;
    while errors.len() < 2 && std::time::Instant::now() < deadline {
        match events.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if !sent => {
                client
                    .publish(&up, QoS::AtLeastOnce, false, b"\x00not json".to_vec())
                    .unwrap();
                let future = json!({"v": 99, "schema": "9", "msg": {"type": "hello", "session": 1, "cursor": 0, "pending": 0}});
                client
                    .publish(
                        &up,
                        QoS::AtLeastOnce,
                        false,
                        future.to_string().into_bytes(),
                    )
                    .unwrap();
                sent = true;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: Value =
                    serde_json::from_slice(&p.payload).expect("the cloud answers in JSON");
                // A `no_session` prompt (the cloud waking a device it holds news for) may
                // come at any time; it answers neither message.
                if v["msg"]["type"] == "error" && v["msg"]["code"] != "no_session" {
                    errors.push(v["msg"]["code"].clone());
                }
            }
            _ => {}
        }
    }
    assert_eq!(errors.len(), 2, "two error replies: {errors:?}");
    assert!(errors.iter().any(|c| c == "malformed"), "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|c| c["unsupported_version"]["supported"] == 1),
        "{errors:?}"
    );
    drop(client);

    let mut a = s.agent("gw9", "gw9", &secret);
    a.op(
        json!({"op": "create", "model": "Fault", "item": {"deviceId": "gw9", "severity": "info"}}),
    );
    a.wait_synced();
    eventually("the fault in the cloud", || {
        let items = s.cloud.items(ACCOUNT, "gw9", "Fault")?;
        (items.len() == 1).then_some(()).ok_or(format!("{items:?}"))
    });
    a.stop();
}

/// A device offline for longer than the cloud keeps tombstones cannot learn deletes from the
/// feed: it gets a full resync instead, which removes what the cloud deleted (and nothing it still
/// holds), and then follows the feed again. Retention purges one row per transaction here, so
/// its passes go through the batches the service makes of a backlog.
pub fn offline_past_retention_resyncs(backend: impl Into<Backend>) {
    let s = setup_with(
        backend,
        "tombstone_retention_secs: 0, purge_interval_secs: 1, retention_batch: 1,",
    );
    let secret = s.cloud.register("acme", "gw10");
    let mut a = s.agent("gw10", "gw10", &secret);
    // A new device starts with a full resync: the agent's report of it is the signal this test
    // looks for again after the restart, so first make sure the signal exists at all.
    a.logs.wait_for("the first start's resync", |l| {
        l.contains("full resync finished")
    });
    for name in ["a", "b", "c"] {
        let (status, body) = s.cloud.send(
            "POST",
            "/v1/accounts/acme/devices/gw10/items/Setting",
            json!({"name": name, "value": "1"}),
        );
        assert_eq!(status, 201, "{body}");
    }
    eventually("three settings on the device", || {
        let got = a.op(json!({"op": "find", "model": "Setting", "item": {"deviceId": "gw10"}}));
        (got.as_array().map(Vec::len) == Some(3))
            .then_some(())
            .ok_or(got.to_string())
    });
    a.wait_synced();
    a.stop();

    // Offline: the cloud deletes one; retention then purges the tombstone (and its feed entry).
    let (status, body) = s.cloud.send(
        "DELETE",
        "/v1/accounts/acme/devices/gw10/items/Setting",
        json!({"name": "b"}),
    );
    assert_eq!(status, 200, "{body}");
    // No tombstone existed before this delete, so a retention pass that purged one purged it
    // (and raised the device's feed floor above its cursor).
    s.cloud
        .logs
        .wait_for("retention purging the tombstone", |l| {
            l.contains("retention applied") && !l.contains("tombstones: 0")
        });

    let mut a = s.agent("gw10", "gw10", &secret);
    eventually("the resync removed the deleted setting", || {
        let got = a.op(json!({"op": "find", "model": "Setting", "item": {"deviceId": "gw10"}}));
        let mut names: Vec<String> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap_or_default().to_string())
            .collect();
        names.sort();
        (names == ["a", "c"])
            .then_some(())
            .ok_or(format!("{names:?}"))
    });
    // The feed continues after the resync.
    let (status, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw10/items/Setting",
        json!({"name": "d", "value": "1"}),
    );
    assert_eq!(status, 201, "{body}");
    eventually("a later change through the feed", || {
        let got = a.op(
            json!({"op": "get", "model": "Setting", "item": {"deviceId": "gw10", "name": "d"}}),
        );
        (!got.is_null()).then_some(()).ok_or(got.to_string())
    });
    // The deleted setting went away through a resync (the agent reports it), not through the
    // feed: its entry was purged. Without the purge the device would have caught up from its
    // cursor and logged no resync.
    a.logs.wait_for("the agent's report of the resync", |l| {
        l.contains("full resync finished")
    });
    a.stop();
}

/// A device with valid credentials, speaking the protocol well but with hostile intent: it tries
/// to delete its cloud-only `Status` row by pushing a delete under the model `Fault`, to push a
/// version ten hours ahead, and announces the largest cursor there is. The rows stay, the version
/// is refused for re-stamping, the cursor gets a full resync instead of silence.
pub fn hostile_pushes_cannot_touch_other_models_or_the_clock(backend: impl Into<Backend>) {
    use rumqttc::{Event, Packet, QoS};
    use std::time::Duration;

    let s = setup(backend);
    let secret = s.cloud.register("acme", "gw8");
    let (code, body) = s.cloud.send(
        "POST",
        "/v1/accounts/acme/devices/gw8/items/Status",
        json!({"state": "online"}),
    );
    assert_eq!(code, 201, "{body}");
    let (client, events) = raw_device(&s, "gw8", &secret);
    let down = format!("{}/acme/gw8/down", s.prefix);
    let up = format!("{}/acme/gw8/up", s.prefix);
    client.subscribe(&down, QoS::AtLeastOnce).unwrap();
    let publish = |msg: Value| {
        let env = json!({"v": 1, "schema": "1.0.0", "msg": msg});
        client
            .publish(&up, QoS::AtLeastOnce, false, env.to_string().into_bytes())
            .unwrap();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let version = |wall: u64| format!("{wall:012x}-00000000-{:016x}", 42u64);
    let mut results: Vec<Value> = Vec::new();
    let mut snapshot = false;
    let deadline = std::time::Instant::now() + super::harness::WAIT;
    while (results.len() < 2 || !snapshot) && std::time::Instant::now() < deadline {
        match events.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                publish(json!({"type": "hello", "session": 7, "cursor": u64::MAX, "pending": 2}));
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let v: Value = serde_json::from_slice(&p.payload).expect("JSON");
                match v["msg"]["type"].as_str() {
                    Some("welcome") => publish(json!({"type": "push", "batch": 1, "changes": [
                        {"model": "Fault", "key": ["status#gw8", "status#"], "op": "delete",
                         "version": version(now)},
                        {"model": "Setting", "key": ["device#gw8", "setting#color"], "op": "put",
                         "item": {"_type": "Setting", "pk": "device#gw8", "sk": "setting#color", "deviceId": "gw8",
                                  "name": "color", "value": "x"},
                         "version": version(now + 10 * 3_600_000)},
                    ]})),
                    Some("push_ack") => {
                        results.extend(v["msg"]["results"].as_array().cloned().unwrap_or_default())
                    }
                    Some("snapshot") => snapshot = true,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    assert_eq!(results.len(), 2, "every change answered: {results:?}");
    assert_eq!(
        results[0]["status"]["rejected"]["reason"], "key_not_of_model",
        "{results:?}"
    );
    assert!(
        results[1]["status"]["rejected"]["reason"]["version_ahead"]["max_drift_ms"].is_u64(),
        "{results:?}"
    );
    assert!(snapshot, "a cursor beyond the feed head gets a full resync");
    let status = s.cloud.items(ACCOUNT, "gw8", "Status").unwrap();
    assert_eq!(status.len(), 1, "the Status row survived: {status:?}");
    let settings = s.cloud.items(ACCOUNT, "gw8", "Setting").unwrap();
    assert!(settings.is_empty(), "{settings:?}");
    let record = s.cloud.get("/v1/devices/acme/gw8").unwrap();
    assert_eq!(record["changes_rejected"], 2, "{record}");
    assert_eq!(record["changes_applied"], 0, "{record}");
}
