//! Real network faults against the real processes: one cloud and three agents, each agent
//! reaching the broker through its own fault-injecting proxy (`proxy.rs`) that plays a seeded
//! schedule of delays, blackholes longer than the MQTT keep-alive, resets and refusals, while
//! every agent writes and the cloud's API writes to the devices. Then the faults stop and the
//! test waits, on conditions and with a deadline, until everything converged: every agent's items
//! of synced models equal the cloud's, and every write an agent acknowledged is in the cloud,
//! applied exactly once.
//!
//! The seed decides the fault schedules, the operations and the delay jitter; it is printed on
//! failure and `DEVTABLES_FAULT_SEED=<n>` replays the same plan. The processes' timing is real,
//! so a replay repeats the plan, not every interleaving.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::harness::{
    eventually, unique_prefix, AgentProc, AgentSpec, ApiClient, BrokerChoice, CloudProc,
};
use super::proxy::{Fault, FaultProxy, Profile, Schedule};

const ACCOUNT: &str = "acme";
const AGENTS: usize = 3;
/// How long the faults and the writes go on; with setup and convergence the test stays well
/// under a minute.
const FAULT_SPAN: Duration = Duration::from_secs(20);
/// The agents' MQTT keep-alive: short, so a blackholed connection is noticed within the run
/// (after one to two keep-alives, as rumqttc pings every keep-alive and fails on the second
/// unanswered ping).
const KEEP_ALIVE_SECS: u64 = 2;

/// Faults on an agent's hop. A blackhole lasts well over two keep-alives, so the agent must
/// notice the dead connection through its keep-alive (nothing else tells it).
fn agent_profile() -> Profile {
    Profile {
        gap_ms: (300, 1500),
        delay_ms: (5, 150),
        delay_for_ms: (1000, 3000),
        blackhole_ms: (5500, 7500),
        down_ms: (500, 2500),
        weights: [3, 2, 3, 2],
    }
}

/// Faults on the cloud's own hop to an external broker. The cloud's MQTT keep-alive is fixed at
/// 30 s (not configurable), so a blackhole here stays short: a stall that heals, which the
/// protocol's own retransmits and ack timeouts must ride out.
fn cloud_profile() -> Profile {
    Profile {
        gap_ms: (800, 2500),
        delay_ms: (5, 100),
        delay_for_ms: (1000, 3000),
        blackhole_ms: (1000, 3000),
        down_ms: (500, 2000),
        weights: [3, 2, 2, 2],
    }
}

/// The seed of this run: `DEVTABLES_FAULT_SEED`, or a fresh one.
fn fault_seed() -> u64 {
    match std::env::var("DEVTABLES_FAULT_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("DEVTABLES_FAULT_SEED={s:?}: {e}")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

/// A schedule for one hop that holds at least one blackhole and one reset or down, so every run
/// exercises the keep-alive path and the reconnect path; derived from the seed alone.
fn schedule_for(seed: u64, hop: u64, profile: &Profile) -> Schedule {
    let mut last = None;
    for attempt in 0..100u64 {
        let s = Schedule::random(
            seed ^ hop.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ attempt,
            FAULT_SPAN,
            profile,
        );
        let blackholes = s.count(|f| matches!(f, Fault::Blackhole));
        let breaks = s.count(|f| matches!(f, Fault::Reset | Fault::Down));
        if blackholes >= 1 && breaks >= 1 {
            return s;
        }
        last = Some(s);
    }
    last.expect("at least one attempt")
}

/// Everything that must be reported if the run fails; prints it then (the test harness shows a
/// failed test's output).
struct Run {
    seed: u64,
    schedules: Vec<(String, Schedule)>,
    proxies: Vec<FaultProxy>,
    notes: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        eprintln!(
            "fault run failed: replay with DEVTABLES_FAULT_SEED={}",
            self.seed
        );
        for (name, s) in &self.schedules {
            eprintln!("  schedule {name}: {s}");
        }
        for p in &self.proxies {
            eprintln!("  proxy {}: {}", p.addr(), p.stats());
        }
        for n in &self.notes {
            eprintln!("  {n}");
        }
    }
}

/// One agent and what the test knows it wrote.
struct Device {
    name: String,
    agent: AgentProc,
    rng: SmallRng,
    /// Readings created (each a new key, written once).
    readings: u64,
    /// The device's own settings as it last wrote them (None: deleted).
    settings: BTreeMap<String, Option<String>>,
    /// Settings whose last write the cloud is known to hold: only these are written again, so
    /// no write is superseded on the device before it was sent, and each write of the device
    /// is one change the cloud must apply exactly once.
    confirmed: BTreeSet<String>,
    /// Local writes of synced-up models: readings and settings.
    writes: u64,
    next_key: u64,
}

impl Device {
    fn op(&mut self, request: Value) -> Value {
        let result = self.agent.op(request);
        self.writes += 1;
        result
    }

    fn write_reading(&mut self) {
        let n = self.readings;
        self.op(json!({"op": "create", "model": "Reading",
            "item": {"deviceId": self.name, "id": format!("r{n:05}"), "name": "t", "value": n}}));
        self.readings += 1;
    }

    fn value(&self) -> String {
        format!("{}-w{}", self.name, self.writes)
    }

    /// A new setting, or one the device deleted (and the cloud holds as deleted) created again.
    fn create_setting(&mut self) {
        let deleted: Vec<String> = self
            .confirmed
            .iter()
            .filter(|k| self.settings.get(*k) == Some(&None))
            .cloned()
            .collect();
        let name = if !deleted.is_empty() && self.rng.gen_bool(0.5) {
            deleted[self.rng.gen_range(0..deleted.len())].clone()
        } else {
            self.next_key += 1;
            format!("d{}", self.next_key)
        };
        let value = self.value();
        self.op(json!({"op": "upsert", "model": "Setting",
            "item": {"deviceId": self.name, "name": name, "value": value}}));
        self.confirmed.remove(&name);
        self.settings.insert(name, Some(value));
    }

    fn live_confirmed(&mut self) -> Option<String> {
        let live: Vec<&String> = self
            .confirmed
            .iter()
            .filter(|k| matches!(self.settings.get(*k), Some(Some(_))))
            .collect();
        if live.is_empty() {
            return None;
        }
        Some(live[self.rng.gen_range(0..live.len())].clone())
    }

    fn update_setting(&mut self) {
        let Some(name) = self.live_confirmed() else {
            return self.write_reading();
        };
        let value = self.value();
        self.op(json!({"op": "update", "model": "Setting",
            "item": {"deviceId": self.name, "name": name, "value": value}}));
        self.confirmed.remove(&name);
        self.settings.insert(name, Some(value));
    }

    fn delete_setting(&mut self) {
        let Some(name) = self.live_confirmed() else {
            return self.write_reading();
        };
        self.op(json!({"op": "remove", "model": "Setting",
            "item": {"deviceId": self.name, "name": name}}));
        self.confirmed.remove(&name);
        self.settings.insert(name, None);
    }

    /// Marks the settings whose last write the cloud holds (API calls go straight to the cloud,
    /// never through a proxy).
    fn refresh_confirmed(&mut self, api: &ApiClient) {
        let path = format!(
            "/v1/accounts/{ACCOUNT}/devices/{}/items/Setting?limit=1000",
            self.name
        );
        let Ok(page) = api.get(&path) else {
            return;
        };
        let in_cloud: BTreeMap<String, String> = page["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| {
                let item = &i["item"];
                Some((
                    item["name"].as_str()?.to_string(),
                    item["value"].as_str().unwrap_or_default().to_string(),
                ))
            })
            .collect();
        for (name, value) in &self.settings {
            if in_cloud.get(name) == value.as_ref() {
                self.confirmed.insert(name.clone());
            }
        }
    }

    /// Writes until `until`: mostly new readings, then new, updated, deleted and re-created
    /// settings.
    fn drive(mut self, api: ApiClient, until: Instant) -> Device {
        let mut ops = 0u64;
        while Instant::now() < until {
            match self.rng.gen_range(0..100) {
                0..=49 => self.write_reading(),
                50..=64 => self.create_setting(),
                65..=84 => self.update_setting(),
                85..=94 => self.delete_setting(),
                _ => self.refresh_confirmed(&api),
            }
            ops += 1;
            if ops.is_multiple_of(8) {
                self.refresh_confirmed(&api);
            }
            // Pacing, not synchronization: spreads the writes over the whole fault schedule.
            std::thread::sleep(Duration::from_millis(self.rng.gen_range(5..40)));
        }
        self
    }
}

/// The cloud's API writes, from the test thread: settings of the devices (created, changed,
/// deleted; keys the devices never write, so no write of a device can lose to them), commands
/// the devices must run and answer, and firmware broadcast to the account.
struct CloudWriter {
    rng: SmallRng,
    settings: Vec<BTreeMap<String, bool>>,
    commands: Vec<Vec<String>>,
    next: u64,
}

impl CloudWriter {
    fn step(&mut self, cloud: &CloudProc, devices: &[String]) {
        let d = self.rng.gen_range(0..devices.len());
        let device = &devices[d];
        let path = format!("/v1/accounts/{ACCOUNT}/devices/{device}/items");
        self.next += 1;
        let n = self.next;
        match self.rng.gen_range(0..100) {
            0..=39 => {
                let existing: Vec<String> = self.settings[d]
                    .iter()
                    .filter(|(_, live)| **live)
                    .map(|(k, _)| k.clone())
                    .collect();
                let value = format!("cloud-{n}");
                if !existing.is_empty() && self.rng.gen_bool(0.5) {
                    let name = &existing[self.rng.gen_range(0..existing.len())];
                    let (status, body) = cloud.send(
                        "PATCH",
                        &format!("{path}/Setting"),
                        json!({"name": name, "value": value}),
                    );
                    assert_eq!(status, 200, "{body}");
                } else {
                    let name = format!("c{n}");
                    let (status, body) = cloud.send(
                        "POST",
                        &format!("{path}/Setting"),
                        json!({"name": name, "value": value}),
                    );
                    assert_eq!(status, 201, "{body}");
                    self.settings[d].insert(name, true);
                }
            }
            40..=54 => {
                let live: Vec<String> = self.settings[d]
                    .iter()
                    .filter(|(_, live)| **live)
                    .map(|(k, _)| k.clone())
                    .collect();
                if let Some(name) = live.first() {
                    let (status, body) =
                        cloud.send("DELETE", &format!("{path}/Setting"), json!({"name": name}));
                    assert_eq!(status, 200, "{body}");
                    self.settings[d].insert(name.clone(), false);
                }
            }
            55..=89 => {
                let (status, body) = cloud.send(
                    "POST",
                    &format!("{path}/Command"),
                    json!({"command": "ping"}),
                );
                assert_eq!(status, 201, "{body}");
                let id = body["item"]["id"]
                    .as_str()
                    .expect("a command id")
                    .to_string();
                self.commands[d].push(id);
            }
            _ => {
                let (status, body) = cloud.send(
                    "POST",
                    &format!("/v1/accounts/{ACCOUNT}/items/Firmware"),
                    json!({"version": format!("fw{n}"), "url": format!("https://example.invalid/{n}")}),
                );
                assert_eq!(status, 201, "{body}");
            }
        }
    }
}

/// Fields that only place an item in the table (keys, index keys): compared through the
/// identity field instead.
const PLACEMENT: [&str; 4] = ["pk", "sk", "gs1pk", "gs1sk"];

fn by_identity<'a>(items: impl Iterator<Item = &'a Value>, id: &str) -> BTreeMap<String, Value> {
    items
        .map(|item| {
            let mut item = item.clone();
            if let Value::Object(m) = &mut item {
                for f in PLACEMENT {
                    m.remove(f);
                }
            }
            (item[id].as_str().unwrap_or_default().to_string(), item)
        })
        .collect()
}

/// The device's items of a model and the cloud's, or what differs.
fn same_items(
    agent: &mut AgentProc,
    cloud: &CloudProc,
    device: &str,
    model: &str,
    id: &str,
) -> Result<BTreeMap<String, Value>, String> {
    let filter = if model == "Firmware" {
        json!({})
    } else {
        json!({"deviceId": device})
    };
    let local = agent.op(json!({"op": "find", "model": model, "item": filter}));
    let local = by_identity(local.as_array().into_iter().flatten(), id);
    let remote = if model == "Firmware" {
        let page = cloud.get(&format!("/v1/accounts/{ACCOUNT}/items/Firmware?limit=1000"))?;
        page["items"].as_array().cloned().unwrap_or_default()
    } else {
        cloud.items(ACCOUNT, device, model)?
    };
    let remote = by_identity(remote.iter().map(|i| &i["item"]), id);
    if local == remote {
        return Ok(local);
    }
    let only_local: Vec<&String> = local
        .keys()
        .filter(|k| local.get(*k) != remote.get(*k))
        .collect();
    let only_remote: Vec<&String> = remote
        .keys()
        .filter(|k| local.get(*k) != remote.get(*k))
        .collect();
    Err(format!(
        "{device} {model}: {} on the device, {} in the cloud; differing on the device {only_local:?}, in the cloud {only_remote:?}",
        local.len(),
        remote.len()
    ))
}

/// Everything one device must show once the faults are over.
fn converged(cloud: &CloudProc, dev: &mut Device, commands: &[String]) -> Result<(), String> {
    let st = dev.agent.status();
    assert_eq!(
        st["rejected"], 0,
        "{}: nothing may be rejected: {st}",
        dev.name
    );
    assert_eq!(
        st["dropped"], 0,
        "{}: nothing may be dropped: {st}",
        dev.name
    );
    if !(st["ready"] == true && st["pending"] == 0 && st["in_flight"] == 0) {
        return Err(format!("{} not settled: {st}", dev.name));
    }
    let record = cloud.get(&format!("/v1/devices/{ACCOUNT}/{}", dev.name))?;
    if !(record["online"] == true && record["cursor_lag"] == 0) {
        return Err(format!("{} in the cloud: {record}", dev.name));
    }
    let settings = same_items(&mut dev.agent, cloud, &dev.name, "Setting", "name")?;
    for (name, value) in &dev.settings {
        let held = settings
            .get(name)
            .map(|i| i["value"].as_str().unwrap_or_default());
        if held != value.as_deref() {
            return Err(format!(
                "{} setting {name}: written {value:?}, held {held:?}",
                dev.name
            ));
        }
    }
    let readings = same_items(&mut dev.agent, cloud, &dev.name, "Reading", "id")?;
    if readings.len() as u64 != dev.readings {
        return Err(format!(
            "{}: {} readings written, {} held",
            dev.name,
            dev.readings,
            readings.len()
        ));
    }
    let held = same_items(&mut dev.agent, cloud, &dev.name, "Command", "id")?;
    for id in commands {
        let status = held.get(id).map(|c| c["status"].clone());
        if status != Some(json!("done")) {
            return Err(format!("{} command {id}: {status:?}", dev.name));
        }
    }
    same_items(&mut dev.agent, cloud, &dev.name, "Firmware", "version")?;
    Ok(())
}

/// One cloud, three agents each behind its own faulty proxy (and, with `cloud_hop`, the cloud's
/// own MQTT client behind one too), writes on every side during the faults, then convergence.
pub fn converge_through_faults(broker: BrokerChoice, cloud_hop: bool) {
    let seed = fault_seed();
    // Printed now as well as on failure, so even a hung run can be replayed.
    eprintln!("DEVTABLES_FAULT_SEED={seed}");
    let mut run = Run {
        seed,
        schedules: Vec::new(),
        proxies: Vec::new(),
        notes: Vec::new(),
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let (cloud, broker_addr) = match broker {
        BrokerChoice::External(addr) if cloud_hop => {
            let p = FaultProxy::start("cloud", &addr, seed);
            let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::External(p.addr()));
            run.schedules
                .push(("cloud".into(), schedule_for(seed, 99, &cloud_profile())));
            run.proxies.push(p);
            (cloud, addr)
        }
        BrokerChoice::External(addr) => {
            let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::External(addr.clone()));
            (cloud, addr)
        }
        embedded => {
            let cloud = CloudProc::start(dir.path(), &prefix, embedded);
            let mqtt = cloud.mqtt.clone();
            (cloud, mqtt)
        }
    };

    let names: Vec<String> = (0..AGENTS).map(|i| format!("f{i}")).collect();
    let mut devices = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let secret = cloud.register(ACCOUNT, name);
        let proxy = FaultProxy::start(name, &broker_addr, seed ^ (i as u64 + 1));
        let mut agent = AgentProc::start_with(
            &AgentSpec {
                dir: dir.path(),
                name,
                account: ACCOUNT,
                device: name,
                secret: &secret,
                mqtt: &proxy.addr(),
                prefix: &prefix,
                schema: None,
            },
            &format!("keep_alive_secs: {KEEP_ALIVE_SECS},"),
        );
        agent.wait_synced();
        run.schedules
            .push((name.clone(), schedule_for(seed, i as u64, &agent_profile())));
        run.proxies.push(proxy);
        devices.push(Device {
            name: name.clone(),
            agent,
            rng: SmallRng::seed_from_u64(seed ^ (0x1000 + i as u64)),
            readings: 0,
            settings: BTreeMap::new(),
            confirmed: BTreeSet::new(),
            writes: 0,
            next_key: 0,
        });
    }
    let hops = run.proxies.len();
    let (cloud_proxy, agent_proxies) = if cloud_hop { (1, hops - 1) } else { (0, hops) };
    assert_eq!(agent_proxies, AGENTS);

    // Faults and writes, for FAULT_SPAN.
    let until = Instant::now() + FAULT_SPAN;
    let schedules: Vec<Schedule> = run.schedules.iter().map(|(_, s)| s.clone()).collect();
    for (p, s) in run.proxies.iter_mut().zip(&schedules) {
        p.play(s);
    }
    let drivers: Vec<_> = devices
        .into_iter()
        .map(|d| {
            let api = cloud.client();
            std::thread::spawn(move || d.drive(api, until))
        })
        .collect();
    let mut writer = CloudWriter {
        rng: SmallRng::seed_from_u64(seed ^ 0x2000),
        settings: vec![BTreeMap::new(); AGENTS],
        commands: vec![Vec::new(); AGENTS],
        next: 0,
    };
    while Instant::now() < until {
        writer.step(&cloud, &names);
        // Pacing, not synchronization: API writes spread over the schedule.
        std::thread::sleep(Duration::from_millis(writer.rng.gen_range(30..150)));
    }
    let mut devices: Vec<Device> = drivers
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        .collect();
    for p in &mut run.proxies {
        p.stop_faults();
    }
    for d in &devices {
        run.notes.push(format!(
            "{}: {} readings, {} settings written, {} writes, {} commands",
            d.name,
            d.readings,
            d.settings.len(),
            d.writes,
            writer.commands[names.iter().position(|n| *n == d.name).unwrap()].len()
        ));
    }

    // Converged: every device against the cloud.
    for (i, dev) in devices.iter_mut().enumerate() {
        let commands = writer.commands[i].clone();
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually(&format!("{} converged with the cloud", dev.name), || {
                converged(&cloud, dev, &commands)
            })
        }));
        if let Err(panic) = waited {
            // What the two ends say about themselves, for the report of a run that did not settle.
            eprintln!("cloud status: {:?}", cloud.get("/v1/status"));
            eprintln!(
                "cloud log (last lines):\n{}",
                cloud.logs.tail(60).join("\n")
            );
            eprintln!(
                "{} log (last lines):\n{}",
                dev.name,
                dev.agent.logs.tail(60).join("\n")
            );
            std::panic::resume_unwind(panic);
        }
    }
    // Still converged once all are (a late page for one device must not undo another).
    for (i, dev) in devices.iter_mut().enumerate() {
        let commands = writer.commands[i].clone();
        if let Err(e) = converged(&cloud, dev, &commands) {
            panic!("diverged again after converging: {e}");
        }
    }

    // The faults were real. A blackhole that stalls an established connection lasts over two
    // keep-alives, and only the keep-alive can notice it: the agent must have reported each.
    // (A blackhole that starts while the agent is between connections stalls nothing live.)
    for (i, dev) in devices.iter().enumerate() {
        let stats = run.proxies[cloud_proxy + i].stats();
        run.notes.push(format!("{} proxy: {stats}", dev.name));
        let noticed = dev.agent.logs.matching("Last pingreq isn't acked").len() as u64;
        assert!(
            noticed >= stats.live_stalls,
            "{}: {} established connections blackholed, {noticed} noticed by the keep-alive: {stats}",
            dev.name,
            stats.live_stalls
        );
        assert!(
            stats.accepted >= 2,
            "{}: the agent reconnected: {stats}",
            dev.name
        );
    }
    let stalls: u64 = (0..AGENTS)
        .map(|i| run.proxies[cloud_proxy + i].stats().live_stalls)
        .sum();
    run.notes
        .push(format!("established connections blackholed: {stalls}"));
    let summary: Vec<String> = run.proxies.iter().map(|p| p.stats().to_string()).collect();
    let _ = writeln!(
        std::io::stderr(),
        "faults seed {seed}: converged; proxies: {}",
        summary.join(" | ")
    );

    // Exactly once: every write of a device was sent before it was superseded (a setting is
    // written again only once the cloud holds its last write), each is a distinct (key,
    // version), and no cloud write touches a device's keys, so the cloud wrote each exactly
    // once. Needs the device record's `changes_applied` (the lead's branch).
    let expected: Vec<(String, u64)> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.clone(), d.writes + writer.commands[i].len() as u64))
        .collect();
    for d in devices {
        d.agent.stop();
    }
    for (name, writes) in expected {
        assert_eq!(
            cloud.changes_applied(ACCOUNT, &name),
            writes,
            "{name}: each write of the device (and each command result) applied exactly once"
        );
    }
    drop(run);
}

#[test]
fn agents_converge_through_faulty_links() {
    converge_through_faults(BrokerChoice::Embedded(0), false);
}

/// A device that keeps writing must still connect over a slow link (every chunk delayed, so the
/// MQTT handshake takes longer than the time between two writes).
///
/// It failed while the agent's driver polled rumqttc's event loop inside a `select!` with its
/// other inputs: rumqttc's `poll` is not cancel-safe while it connects, so every local write
/// (and every engine timer) dropped the connect in progress and the next poll opened a new TCP
/// connection; a device writing faster than one MQTT handshake never connected (the proxy
/// counted one connection per write) and reported no error either. The event loop now runs on
/// its own task (`crates/agent/src/link.rs`).
#[test]
fn busy_device_connects_over_a_slow_link() {
    use super::harness::WAIT;
    use super::proxy::Delay;

    let seed = fault_seed();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let cloud = CloudProc::start(dir.path(), &prefix, BrokerChoice::Embedded(0));
    let secret = cloud.register(ACCOUNT, "slow");
    let proxy = FaultProxy::start("slow", &cloud.mqtt, seed);
    proxy.delay(Some(Delay {
        base: Duration::from_millis(300),
        jitter: Duration::ZERO,
    }));
    let mut agent = AgentProc::start(&AgentSpec {
        dir: dir.path(),
        name: "slow",
        account: ACCOUNT,
        device: "slow",
        secret: &secret,
        mqtt: &proxy.addr(),
        prefix: &prefix,
        schema: None,
    });
    let deadline = Instant::now() + WAIT;
    let mut n = 0u64;
    loop {
        agent.op(json!({"op": "create", "model": "Reading",
            "item": {"deviceId": "slow", "id": format!("r{n:05}"), "name": "t", "value": n}}));
        n += 1;
        let st = agent.status();
        if st["ready"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready over a 300 ms-per-chunk link while writing: {n} writes, {st}, proxy {}",
            proxy.stats()
        );
        // Pacing, not synchronization: a write every ~20 ms, as a busy device does.
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.wait_synced();
    agent.stop();
}
