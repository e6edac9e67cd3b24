//! Devices with wrong clocks, as real processes: libfaketime gives an agent a clock hours ahead
//! or behind, and the fleet's versions must stay on the cloud's time while causally later edits
//! still win in both directions.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use super::harness::{
    eventually, free_port, unique_prefix, AgentProc, AgentSpec, BrokerChoice, CloudProc,
};

const ACCOUNT: &str = "acme";
/// The cloud's default drift bound.
const DRIFT_MS: u64 = 60_000;
const TEN_HOURS_MS: i64 = 10 * 3_600_000;

/// libfaketime's preload library (Debian package `faketime`). Without it the test is skipped
/// with a visible line on the real stderr (libtest captures `println!` and `eprintln!` of a
/// passing test, which would make the skip look like a pass), or fails when the service suites
/// are on (`DEVTABLES_SERVICES`), as in CI.
fn faketime_lib() -> Option<&'static str> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists());
    if found.is_none() {
        if std::env::var_os("DEVTABLES_SERVICES").is_some() {
            panic!("libfaketime is missing: apt-get install faketime");
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("clocks::<unnamed test>");
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {name}: libfaketime is not installed (apt-get install faketime)"
        );
    }
    found
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The wall time of a version in its text form (`wwwwwwwwwwww-cccccccc-nnnn...`).
fn version_wall(v: &Value) -> u64 {
    let text = v.as_str().unwrap_or_else(|| panic!("a version, got {v}"));
    u64::from_str_radix(&text[..12], 16).expect("hex wall time")
}

struct Fleet {
    _dir: tempfile::TempDir,
    cloud: CloudProc,
    prefix: String,
    lib: &'static str,
}

impl Fleet {
    /// An agent whose clock is `offset` off (libfaketime syntax: "+10h", "-10h", "" for none).
    fn agent(&self, device: &str, secret: &str, mqtt: &str, offset: &str) -> AgentProc {
        let spec = AgentSpec {
            dir: &self.cloud.dir,
            name: device,
            account: ACCOUNT,
            device,
            secret,
            mqtt,
            prefix: &self.prefix,
            schema: None,
        };
        let env = [
            ("LD_PRELOAD", self.lib),
            ("FAKETIME", offset),
            // Timers run on the real monotonic clock; only the wall clock is wrong.
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_NO_CACHE", "1"),
        ];
        AgentProc::start_with_env(&spec, "", &env)
    }

    fn setting(&self, device: &str) -> Option<Value> {
        let items = self.cloud.items(ACCOUNT, device, "Setting").ok()?;
        items.into_iter().find(|i| i["sk"] == "setting#color")
    }
}

fn get_color(a: &mut AgentProc, device: &str) -> String {
    let d = a.op(
        json!({"op": "get", "model": "Setting", "item": {"deviceId": device, "name": "color"}}),
    );
    d["value"].as_str().unwrap_or_default().to_string()
}

/// A device 10 h ahead and one 10 h behind. Neither moves the cloud's versions past its own
/// time plus the drift bound; on each, an edit made after seeing the cloud's edit wins, and a
/// cloud edit made after seeing the device's wins; a write stamped offline with the wrong clock is
/// re-stamped, not lost.
#[test]
fn wrong_device_clocks_never_move_the_fleet() {
    let Some(lib) = faketime_lib() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::Embedded(0));
    let fleet = Fleet {
        _dir: dir,
        cloud,
        prefix,
        lib,
    };
    let mqtt = fleet.cloud.mqtt.clone();

    for (device, offset, sign) in [("ahead", "+10h", 1i64), ("behind", "-10h", -1)] {
        let secret = fleet.cloud.register(ACCOUNT, device);

        // Offline first (a dead broker): the write is stamped with the wrong clock.
        let dead = format!("127.0.0.1:{}", free_port());
        let mut offline = fleet.agent(device, &secret, &dead, offset);
        offline.op(json!({"op": "upsert", "model": "Setting", "item": {"deviceId": device, "name": "color", "value": "red"}}));
        offline.terminate();

        let mut a = fleet.agent(device, &secret, &mqtt, offset);
        a.wait_synced();
        let status = a.status();
        let offset_ms = status["clock_offset_ms"].as_i64().unwrap_or_default();
        assert!(
            (offset_ms + sign * TEN_HOURS_MS).abs() < 300_000,
            "{device}: the agent learnt the cloud's time (offset {offset_ms} ms): {status}"
        );
        let red = eventually("the offline write in the cloud", || {
            fleet
                .setting(device)
                .filter(|s| s["item"]["value"] == "red")
                .ok_or_else(|| format!("{:?}", fleet.setting(device)))
        });
        assert!(
            version_wall(&red["version"]) <= now_ms() + DRIFT_MS,
            "{device}: the stored version {} is beyond the cloud's time",
            red["version"]
        );
        if sign > 0 {
            assert!(
                status["restamped"].as_u64().unwrap_or_default() >= 1,
                "{device}: the write stamped 10 h ahead was re-stamped, not lost: {status}"
            );
        }

        // The cloud edits after seeing red; the device sees it, then edits again: each later
        // edit wins on both sides, whatever the device's clock says.
        let (code, body) = fleet.cloud.send(
            "PATCH",
            &format!("/v1/accounts/{ACCOUNT}/devices/{device}/items/Setting"),
            json!({"name": "color", "value": "green"}),
        );
        assert_eq!(code, 200, "{body}");
        assert!(
            version_wall(&body["version"]) <= now_ms() + DRIFT_MS,
            "{device}: an API write after the device's is stamped on the cloud's time: {body}"
        );
        eventually("the device sees the cloud's edit", || {
            let c = get_color(&mut a, device);
            (c == "green").then_some(()).ok_or(c)
        });
        a.op(json!({"op": "update", "model": "Setting", "item": {"deviceId": device, "name": "color", "value": "blue"}}));
        a.wait_synced();
        eventually("the device's later edit wins in the cloud", || {
            let s = fleet.setting(device);
            s.as_ref()
                .filter(|s| s["item"]["value"] == "blue")
                .map(|_| ())
                .ok_or(format!("{s:?}"))
        });
        assert_eq!(get_color(&mut a, device), "blue");
        let status = a.status();
        assert_eq!(status["superseded"], 0, "{device}: no edit lost: {status}");
        a.stop();
    }

    // Nothing the skewed devices did moved the cloud clock: a write to a third device now is
    // stamped on the cloud's own time.
    fleet.cloud.register(ACCOUNT, "plain");
    let (code, body) = fleet.cloud.send(
        "POST",
        &format!("/v1/accounts/{ACCOUNT}/devices/plain/items/Setting"),
        json!({"name": "color", "value": "white"}),
    );
    assert_eq!(code, 201, "{body}");
    let wall = version_wall(&body["version"]);
    let now = now_ms();
    assert!(
        wall <= now + 1_000 && wall + 60_000 >= now,
        "a fresh cloud write is stamped at the cloud's time ({wall} vs {now})"
    );
}

/// A device clock that jumps ten hours ahead while the agent is connected (libfaketime reads
/// the offset from a file on every call): its next write is stamped on a stale offset, refused
/// by the cloud, and re-stamped on the time the refusal carries, not refused forever.
#[test]
fn a_clock_jump_while_connected_is_corrected_by_the_refusal() {
    let Some(lib) = faketime_lib() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::Embedded(0));
    let offset_file = dir.path().join("faketime");
    std::fs::write(&offset_file, "+0").unwrap();
    let secret = cloud.register(ACCOUNT, "jumpy");
    let spec = AgentSpec {
        dir: &cloud.dir,
        name: "jumpy",
        account: ACCOUNT,
        device: "jumpy",
        secret: &secret,
        mqtt: &cloud.mqtt,
        prefix: &prefix,
        schema: None,
    };
    let file = offset_file.to_string_lossy().to_string();
    let env = [
        ("LD_PRELOAD", lib),
        ("FAKETIME_TIMESTAMP_FILE", file.as_str()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("FAKETIME_NO_CACHE", "1"),
    ];
    let mut a = AgentProc::start_with_env(&spec, "", &env);
    a.wait_synced();
    assert!(
        a.status()["clock_offset_ms"]
            .as_i64()
            .unwrap_or_default()
            .abs()
            < 60_000,
        "starts on time"
    );
    // The clock jumps while connected; the offset learnt at the welcome is now ten hours off.
    std::fs::write(&offset_file, "+10h").unwrap();
    a.op(json!({"op": "upsert", "model": "Setting", "item": {"deviceId": "jumpy", "name": "color", "value": "teal"}}));
    a.wait_synced();
    let status = a.status();
    assert!(
        status["restamped"].as_u64().unwrap_or_default() >= 1,
        "the write stamped ten hours ahead was refused and re-stamped: {status}"
    );
    let setting = eventually("the write in the cloud", || {
        let items = cloud.items(ACCOUNT, "jumpy", "Setting")?;
        items
            .into_iter()
            .find(|i| i["item"]["value"] == "teal")
            .ok_or_else(|| "not yet".to_string())
    });
    assert!(
        version_wall(&setting["version"]) <= now_ms() + DRIFT_MS,
        "stored on the cloud's time: {setting}"
    );
    let offset = status["clock_offset_ms"].as_i64().unwrap_or_default();
    assert!(
        (offset + TEN_HOURS_MS).abs() < 300_000,
        "the refusal corrected the offset: {status}"
    );
    a.stop();
}
