//! The workload shared by every engine: the schema, the items, the keys, the queries.
//!
//! It follows the original's benchmark (docs/benchmarks.md, ../shared/reference/baselines.md):
//! one model `Reading` (sk `reading#${id}`, pk `dev#${deviceId}`, fields id, deviceId, name,
//! value, status ok|warn|fault, timestamps on), 1% of the items in status `fault`, and a secondary
//! index `gs1` hashed on `status#${status}` so that `status == fault` is an index lookup.
//!
//! Items are generated from their number on the fly (never held in a vector) so the harness adds
//! almost nothing to the peak RSS of a run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use devtables_schema::Item;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

pub const MODEL: &str = "Reading";
pub const SEED: u64 = 0x5eed_0001;
/// Writes grouped per transaction in the grouped (periodic / synchronous=NORMAL) runs.
pub const GROUP: usize = 1_000;
/// Consecutive ids per device: a sort-key prefix of 6 or 7 id digits stays inside one device.
pub const PER_DEVICE: usize = 1_000;
pub const PREFIX_QUERIES: usize = 100;
pub const FILTER_QUERIES: usize = 20;

pub const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {
        primary: {hash: 'pk', sort: 'sk'},
        gs1: {hash: 'gs1pk', sort: 'gs1sk'},
    },
    params: {timestamps: true, isoDates: true},
    process: {Reading: {sync: 'up'}},
    models: {
        Reading: {
            pk: {type: 'string', value: 'dev#${deviceId}'},
            sk: {type: 'string', value: 'reading#${id}'},
            id: {type: 'string', required: true},
            deviceId: {type: 'string', required: true},
            name: {type: 'string', required: true},
            value: {type: 'number', required: true},
            status: {type: 'string', enum: ['ok', 'warn', 'fault'], default: 'ok'},
            gs1pk: {type: 'string', value: 'status#${status}'},
            gs1sk: {type: 'string', value: 'reading#${id}'},
        },
    },
}"#;

pub fn id(i: usize) -> String {
    format!("{i:08}")
}

pub fn device(i: usize) -> String {
    format!("d{:04}", i / PER_DEVICE)
}

/// 1% fault, 9% warn, 90% ok; fixed by the item number.
pub fn status(i: usize) -> &'static str {
    if i % 100 == 42 {
        "fault"
    } else if i % 10 == 3 {
        "warn"
    } else {
        "ok"
    }
}

pub fn faults(n: usize) -> usize {
    (0..n).filter(|i| i % 100 == 42).count()
}

fn obj(v: Value) -> Item {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("json! of an object"),
    }
}

/// The create input of item `i`.
pub fn input(i: usize) -> Item {
    obj(json!({
        "id": id(i),
        "deviceId": device(i),
        "name": format!("sensor-{}", i % 16),
        "value": 20.0 + (i % 1000) as f64 * 0.125,
        "status": status(i),
    }))
}

/// The key properties of item `i`.
pub fn key(i: usize) -> Item {
    obj(json!({"id": id(i), "deviceId": device(i)}))
}

/// The update input of item `i`: a new `value`.
pub fn change(i: usize) -> Item {
    obj(json!({"id": id(i), "deviceId": device(i), "value": 99.5 + (i % 7) as f64}))
}

/// The key properties of an item as text, rewritten in place for each item (no allocation per
/// key once grown): what a key given as `(name, text)` pairs is made from.
#[derive(Default)]
pub struct KeyText {
    id: String,
    device: String,
}

impl KeyText {
    /// Holds the key of item `i` (as [`id`] and [`device`] spell it).
    pub fn set(&mut self, i: usize) {
        use std::fmt::Write;
        self.id.clear();
        self.device.clear();
        // Writing into a String cannot fail.
        let _ = write!(self.id, "{i:08}");
        let _ = write!(self.device, "d{:04}", i / PER_DEVICE);
    }

    /// The key properties as (name, text) pairs.
    pub fn pairs(&self) -> [(&str, &str); 2] {
        [("id", &self.id), ("deviceId", &self.device)]
    }
}

/// A reading as an application's own type: what the typed reads (`Db::get_as`, `find_as`;
/// serde_json straight into the struct for SQLite) fill instead of a `serde_json::Map`.
#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)] // filled as an application would; the benchmark only checks `id`
pub struct Reading {
    pub id: String,
    #[serde(rename = "deviceId")]
    pub device_id: String,
    pub name: String,
    pub value: f64,
    pub status: String,
    pub created: String,
    pub updated: String,
}

/// A reading read in place: every field borrowed from the stored JSON text (SQLite's side of
/// the borrowed-view rows: `row.get_ref` lends the body, serde_json lends its strings).
#[derive(serde::Deserialize, Debug)]
pub struct ReadingRef<'a> {
    /// The type field (the model's name), which the JSON form shows too.
    #[serde(rename = "_type")]
    pub model: &'a str,
    pub id: &'a str,
    #[serde(rename = "deviceId")]
    pub device_id: &'a str,
    pub name: &'a str,
    pub value: f64,
    pub status: &'a str,
    pub created: &'a str,
    pub updated: &'a str,
}

impl ReadingRef<'_> {
    /// [`view_checksum`] of what was read.
    pub fn checksum(&self) -> u64 {
        let date = |d: &str| u64::from(d.len() == 24);
        (self.model.len()
            + self.id.len()
            + self.device_id.len()
            + self.name.len()
            + self.status.len()) as u64
            + (self.value * 8.0) as u64
            + date(self.created)
            + date(self.updated)
    }
}

/// What the borrowed-view rows sum over item `i`, every visible field read (the type field,
/// id, deviceId, name, value, status and the two timestamps): each string's
/// length, the value times 8 (a whole number: values are multiples of 1/8), 1 per date (its
/// instant, or its text, is there). The benchmark compares the sum it read with this, so no
/// field can be skipped or optimized away.
pub fn view_checksum(i: usize) -> u64 {
    let value = 20.0 + (i % 1000) as f64 * 0.125;
    (MODEL.len()
        + id(i).len()
        + device(i).len()
        + format!("sensor-{}", i % 16).len()
        + status(i).len()) as u64
        + (value * 8.0) as u64
        + 2
}

/// 0..n in a shuffled order (fixed seed).
pub fn shuffled(n: usize, rng: &mut SmallRng) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    v.shuffle(rng);
    v
}

pub fn rng() -> SmallRng {
    SmallRng::seed_from_u64(SEED)
}

/// A sort-key prefix query: (deviceId, sk prefix, expected item count). Even queries use 7 id
/// digits (10 items), odd ones 6 digits (100 items).
pub fn prefix_queries(n: usize, rng: &mut SmallRng) -> Vec<(String, String, usize)> {
    (0..PREFIX_QUERIES)
        .map(|q| {
            let (digits, width) = if q % 2 == 0 { (7, 10) } else { (6, 100) };
            let blocks = (n / width).max(1);
            let i = rng.gen_range(0..blocks) * width;
            let id = id(i);
            let expected = width.min(n - i);
            (device(i), format!("reading#{}", &id[..digits]), expected)
        })
        .collect()
}

/// Measured figures of one run, by name (sent from a child process to the parent as JSON).
pub type Metrics = BTreeMap<String, f64>;

/// Prints a status line to stderr about once a second during a long phase.
pub struct Progress {
    label: String,
    total: usize,
    last: Instant,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Progress {
            label: label.into(),
            total,
            last: Instant::now(),
        }
    }

    pub fn tick(&mut self, done: usize) {
        if done % 256 == 0 && self.last.elapsed() >= Duration::from_secs(1) {
            eprintln!("  .. {}: {done}/{}", self.label, self.total);
            self.last = Instant::now();
        }
    }
}

/// Operations per second.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// On-CPU and run-queue wait time of the calling thread, in ns (/proc/thread-self/schedstat).
fn schedstat() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let mut f = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// Times a phase by the wall clock and by the on-CPU time of the calling thread (which leaves
/// out the time spent waiting for a CPU while other processes ran).
pub struct WorkloadClock {
    wall: Instant,
    cpu: u64,
}

impl WorkloadClock {
    pub fn start() -> WorkloadClock {
        WorkloadClock {
            wall: Instant::now(),
            cpu: schedstat().0,
        }
    }

    pub fn wall(&self) -> Duration {
        self.wall.elapsed()
    }

    pub fn cpu(&self) -> Duration {
        Duration::from_nanos(schedstat().0.saturating_sub(self.cpu))
    }
}

/// Records `f(wall time)` as `key` and `f(on-CPU time)` as `key_cpu`.
pub fn put(m: &mut Metrics, key: &str, clock: &WorkloadClock, f: impl Fn(Duration) -> f64) {
    let (cpu, wall) = (clock.cpu(), clock.wall());
    m.insert(key.to_string(), f(wall));
    m.insert(format!("{key}_cpu"), f(cpu));
}
