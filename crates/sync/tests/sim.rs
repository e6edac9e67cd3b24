//! Deterministic simulation of one cloud and several devices (quinn `Pair` style).
//!
//! A virtual clock, a seeded lossy network (loss, duplication, reordering, delay, partitions),
//! device and cloud crash-restarts, and per-device clock skew drive the real engines and the real
//! `apply` rules over in-memory stores. Stores are transactional by copy-on-begin and swap on
//! commit, so a crash keeps exactly the committed state. Every failure prints `SEED=<n>`; set
//! `DEVTABLES_SIM_SEED=<n>` to replay exactly one seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;

use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{self, CloudOp, CloudTxn, Conflict, DeviceTxn, StoredVersion};
use devtables_sync::cloud::{
    CloudAction, CloudConfig, CloudEngine, FeedPage, SnapshotCursor, SnapshotPage,
};
use devtables_sync::device::{
    DeviceAction, DeviceConfig, DeviceEngine, DeviceEvent, OutboxMeta, Restored,
};
use devtables_sync::hlc::{node_id_for, Hlc, HlcClock, CLOUD_NODE_NAME};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{
    self, Change, ChangeStatus, DownMsg, ErrorCode, Op, RejectReason, UpMsg, WireConfig,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {primary: {hash: 'pk', sort: 'sk'}},
    process: {
        U: {sync: 'up'},
        D: {sync: 'down'},
        B: {sync: 'both'},
        C: {sync: 'down', broadcast: true},
        L: {enable: 'device'},
    },
    models: {
        U: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'u#${name}'},
            deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        D: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'd#${name}'},
            deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        B: {pk: {type: 'string', value: 'd#${deviceId}'}, sk: {type: 'string', value: 'b#${name}'},
            deviceId: {type: 'string', required: true}, name: {type: 'string', required: true}, v: {type: 'number'}},
        C: {pk: {type: 'string', value: 'c#'}, sk: {type: 'string', value: 'c#${name}'},
            name: {type: 'string', required: true}, v: {type: 'number'}},
        L: {pk: {type: 'string', value: 'l#'}, sk: {type: 'string', value: 'l#${name}'},
            name: {type: 'string', required: true}, v: {type: 'number'}},
    },
}"#;

const ACCOUNT: &str = "acme";
const T0: u64 = 1_700_000_000_000;

fn schema() -> Schema {
    Schema::from_json5(SCHEMA).expect("sim schema")
}

/// A stored record: a live item or a tombstone (`item: None`).
#[derive(Clone, Debug, PartialEq)]
struct Rec {
    item: Option<Item>,
    version: Hlc,
}

type DKey = (String, ItemKey);

// ---------------------------------------------------------------------------------------------
// Device store

#[derive(Clone, Debug, Default)]
struct DevStore {
    items: BTreeMap<DKey, Rec>,
    /// Durable outbox: key -> (first-write order, newest change).
    outbox: BTreeMap<DKey, (u64, Change)>,
    next_seq: u64,
    cursor: u64,
    marks: BTreeSet<DKey>,
}

impl DevStore {
    fn restored(&self) -> Restored {
        let mut o: Vec<&(u64, Change)> = self.outbox.values().collect();
        o.sort_by_key(|(s, _)| *s);
        Restored {
            cursor: self.cursor,
            outbox: o.into_iter().map(|(_, c)| OutboxMeta::of(c)).collect(),
        }
    }
    fn max_version(&self) -> Hlc {
        self.items
            .values()
            .map(|r| r.version)
            .max()
            .unwrap_or(Hlc::ZERO)
    }
}

struct DevTxn<'a> {
    s: DevStore,
    schema: &'a Schema,
}

impl DeviceTxn for DevTxn<'_> {
    type Error = Infallible;
    fn stored_version(
        &mut self,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredVersion>, Infallible> {
        Ok(self
            .s
            .items
            .get(&(model.to_string(), key.clone()))
            .map(|r| StoredVersion {
                version: r.version,
                deleted: r.item.is_none(),
            }))
    }
    fn put_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        item: Item,
        version: Hlc,
    ) -> Result<(), Infallible> {
        self.s.items.insert(
            (model.to_string(), key.clone()),
            Rec {
                item: Some(item),
                version,
            },
        );
        Ok(())
    }
    fn delete_remote(
        &mut self,
        model: &str,
        key: &ItemKey,
        version: Hlc,
    ) -> Result<(), Infallible> {
        self.s.items.insert(
            (model.to_string(), key.clone()),
            Rec {
                item: None,
                version,
            },
        );
        Ok(())
    }
    fn has_pending(&mut self, model: &str, key: &ItemKey) -> Result<bool, Infallible> {
        Ok(self
            .s
            .outbox
            .contains_key(&(model.to_string(), key.clone())))
    }
    fn set_cursor(&mut self, cursor: u64) -> Result<(), Infallible> {
        self.s.cursor = cursor;
        Ok(())
    }
    fn resync_mark_seen(&mut self, model: &str, key: &ItemKey) -> Result<(), Infallible> {
        self.s.marks.insert((model.to_string(), key.clone()));
        Ok(())
    }
    fn resync_clear(&mut self) -> Result<(), Infallible> {
        self.s.marks.clear();
        Ok(())
    }
    fn resync_sweep(&mut self) -> Result<u64, Infallible> {
        let mut n = 0;
        for (k, rec) in self.s.items.iter_mut() {
            let Some(m) = self.schema.model(&k.0) else {
                continue;
            };
            let p = m.process();
            if rec.item.is_some()
                && p.syncs_down()
                && p.on_device()
                && !self.s.marks.contains(k)
                && !self.s.outbox.contains_key(k)
            {
                rec.item = None;
                n += 1;
            }
        }
        self.s.marks.clear();
        Ok(n)
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud store

type CKey = (Owner, String, ItemKey);

#[derive(Clone, Debug, Default)]
struct Feed {
    entries: BTreeMap<u64, CKey>,
    by_key: BTreeMap<CKey, u64>,
    head: u64,
    /// Entries with cursor <= floor were purged; reads after an older cursor need a resync.
    floor: u64,
}

#[derive(Clone, Debug)]
struct CloudStore {
    items: BTreeMap<CKey, Rec>,
    feeds: BTreeMap<DeviceId, Feed>,
    devices: BTreeSet<DeviceId>,
    conflicts: VecDeque<Conflict>,
    clock_last: Hlc,
    acked: BTreeMap<DeviceId, u64>,
}

struct CTxn {
    s: CloudStore,
    advanced: BTreeSet<DeviceId>,
}

impl CloudTxn for CTxn {
    type Error = Infallible;
    fn stored_version(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
    ) -> Result<Option<StoredVersion>, Infallible> {
        Ok(self
            .s
            .items
            .get(&(owner.clone(), model.to_string(), key.clone()))
            .map(|r| StoredVersion {
                version: r.version,
                deleted: r.item.is_none(),
            }))
    }
    fn put_item(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
        item: &Item,
        version: Hlc,
    ) -> Result<(), Infallible> {
        self.s.items.insert(
            (owner.clone(), model.to_string(), key.clone()),
            Rec {
                item: Some(item.clone()),
                version,
            },
        );
        Ok(())
    }
    fn tombstone(
        &mut self,
        owner: &Owner,
        model: &str,
        key: &ItemKey,
        version: Hlc,
    ) -> Result<(), Infallible> {
        self.s.items.insert(
            (owner.clone(), model.to_string(), key.clone()),
            Rec {
                item: None,
                version,
            },
        );
        Ok(())
    }
    fn append_feed(&mut self, owner: &Owner, model: &str, key: &ItemKey) -> Result<(), Infallible> {
        let targets: Vec<DeviceId> = match owner {
            Owner::Device(d) => vec![d.clone()],
            Owner::Account(a) => self
                .s
                .devices
                .iter()
                .filter(|d| &d.account == a)
                .cloned()
                .collect(),
        };
        let ck = (owner.clone(), model.to_string(), key.clone());
        for d in targets {
            let f = self.s.feeds.entry(d.clone()).or_default();
            if let Some(old) = f.by_key.remove(&ck) {
                f.entries.remove(&old);
            }
            f.head += 1;
            f.entries.insert(f.head, ck.clone());
            f.by_key.insert(ck.clone(), f.head);
            self.advanced.insert(d);
        }
        Ok(())
    }
    fn log_conflict(&mut self, conflict: &Conflict) -> Result<(), Infallible> {
        if self.s.conflicts.len() >= 64 {
            self.s.conflicts.pop_front();
        }
        self.s.conflicts.push_back(conflict.clone());
        Ok(())
    }
}

impl Default for CloudStore {
    fn default() -> CloudStore {
        CloudStore {
            items: BTreeMap::new(),
            feeds: BTreeMap::new(),
            devices: BTreeSet::new(),
            conflicts: VecDeque::new(),
            clock_last: Hlc::ZERO,
            acked: BTreeMap::new(),
        }
    }
}

impl CloudStore {
    fn read_feed(&self, d: &DeviceId, after: u64, limit: usize) -> FeedPage {
        let f = self.feeds.get(d).cloned().unwrap_or_default();
        if after < f.floor {
            return FeedPage {
                after,
                changes: vec![],
                head: f.head,
                resync_required: true,
            };
        }
        let changes = f
            .entries
            .range(after + 1..)
            .take(limit)
            .map(|(c, ck)| {
                let rec = &self.items[ck];
                (*c, rec_change(&ck.1, &ck.2, rec))
            })
            .collect();
        FeedPage {
            after,
            changes,
            head: f.head,
            resync_required: false,
        }
    }

    fn read_snapshot(
        &self,
        schema: &Schema,
        d: &DeviceId,
        resync: u64,
        from: Option<SnapshotCursor>,
        limit: usize,
    ) -> SnapshotPage {
        let mut all: Vec<(SnapshotCursor, Change)> = self
            .items
            .iter()
            .filter(|((owner, model, _), rec)| {
                let Some(m) = schema.model(model) else {
                    return false;
                };
                rec.item.is_some()
                    && m.process().syncs_down()
                    && match owner {
                        Owner::Device(o) => o == d,
                        Owner::Account(a) => a == &d.account && m.process().broadcast,
                    }
            })
            .map(|((_, model, key), rec)| {
                (
                    SnapshotCursor {
                        model: model.clone(),
                        key: key.clone(),
                    },
                    rec_change(model, key, rec),
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let rest: Vec<_> = all
            .into_iter()
            .filter(|(c, _)| from.as_ref().is_none_or(|f| c > f))
            .collect();
        let more = rest.len() > limit;
        let page: Vec<_> = rest.into_iter().take(limit).collect();
        let next = if more {
            page.last().map(|(c, _)| c.clone())
        } else {
            None
        };
        let head = self.feeds.get(d).map_or(0, |f| f.head);
        SnapshotPage {
            resync,
            items: page.into_iter().map(|(_, c)| c).collect(),
            next,
            cursor: head,
        }
    }
}

fn rec_change(model: &str, key: &ItemKey, rec: &Rec) -> Change {
    Change {
        model: model.to_string(),
        key: key.clone(),
        op: if rec.item.is_some() {
            Op::Put
        } else {
            Op::Delete
        },
        item: rec.item.clone(),
        version: rec.version,
        base: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The harness

#[derive(Clone, Copy, Debug)]
struct Faults {
    loss: f64,
    dup: f64,
    max_delay: u64,
    partition: f64,
    device_crash: f64,
    cloud_crash: f64,
    purge: f64,
}

const CALM: Faults = Faults {
    loss: 0.0,
    dup: 0.0,
    max_delay: 20,
    partition: 0.0,
    device_crash: 0.0,
    cloud_crash: 0.0,
    purge: 0.0,
};

#[derive(Clone, Copy)]
enum Dest {
    Cloud(usize),
    Device(usize),
}

struct Msg {
    at: u64,
    seq: u64,
    dest: Dest,
    bytes: Vec<u8>,
}

struct Dev {
    id: DeviceId,
    engine: DeviceEngine,
    store: DevStore,
    clock: HlcClock,
    skew: i64,
    connected: bool,
    /// Down until this time (partition or crash), then reconnects.
    down_until: Option<u64>,
    boots: u64,
    events: Vec<DeviceEvent>,
    /// Highest version ever held per key (never purged): versions must not go backwards.
    history: BTreeMap<DKey, Hlc>,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    schema: Schema,
    now: u64,
    faults: Faults,
    net: Vec<Msg>,
    net_seq: u64,
    cloud: CloudEngine,
    cloud_cfg: CloudConfig,
    cloud_store: CloudStore,
    cloud_clock: HlcClock,
    cloud_boots: u64,
    cloud_history: BTreeMap<CKey, Hlc>,
    devs: Vec<Dev>,
    dev_cfg: DeviceConfig,
    /// Writes the cloud said Applied: (owner, model, key, version).
    applied: Vec<CKey2>,
    log: Vec<String>,
    keep_log: bool,
    trace: bool,
}

type CKey2 = (Owner, String, ItemKey, Hlc);

fn wire_cfg() -> WireConfig {
    WireConfig {
        max_message_bytes: 4096,
        max_changes: 50,
    }
}

impl Sim {
    fn new(seed: u64, n_devices: usize) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let dev_cfg = DeviceConfig {
            wire: wire_cfg(),
            max_batch_bytes: 2048,
            max_batch_changes: 3,
            batch_delay_ms: 50,
            max_in_flight: 2,
            retransmit_base_ms: 1000,
            retransmit_max_ms: 30_000,
            max_buffered_pages: 2,
            max_queued_outputs: 64,
            outbox_high_water: 1000,
            seed: 0,
        };
        let cloud_cfg = CloudConfig {
            wire: wire_cfg(),
            schema_version: "1.0.0".into(),
            max_sessions: 100,
            feed_window: 2,
            feed_page_changes: 3,
            snapshot_page_items: 2,
            ack_timeout_ms: 2000,
            ack_timeout_max_ms: 20_000,
            max_page_retries: 8,
            max_pushes_in_progress: 4,
            prompt_interval_ms: 3000,
            seed: rng.gen(),
        };
        let mut cloud_store = CloudStore::default();
        let mut devs = Vec::new();
        for i in 0..n_devices {
            let id = DeviceId::new(ACCOUNT, format!("d{i}")).expect("device id");
            cloud_store.devices.insert(id.clone());
            let store = DevStore::default();
            let cfg = DeviceConfig {
                seed: rng.gen(),
                ..dev_cfg.clone()
            };
            let engine = DeviceEngine::new(cfg, "1.0.0".into(), store.restored());
            let hours = 3 * 3_600_000i64;
            devs.push(Dev {
                clock: HlcClock::new(node_id_for(&id.node_name())),
                id,
                engine,
                store,
                skew: rng.gen_range(-hours..=hours),
                connected: false,
                down_until: None,
                boots: 0,
                events: Vec::new(),
                history: BTreeMap::new(),
            });
        }
        Sim {
            seed,
            schema: schema(),
            now: T0,
            faults: CALM,
            net: Vec::new(),
            net_seq: 0,
            cloud: CloudEngine::new(cloud_cfg.clone()),
            cloud_cfg,
            cloud_store,
            cloud_clock: HlcClock::new(node_id_for(CLOUD_NODE_NAME)),
            cloud_boots: 0,
            cloud_history: BTreeMap::new(),
            devs,
            dev_cfg,
            applied: Vec::new(),
            log: Vec::new(),
            trace: std::env::var("DEVTABLES_SIM_TRACE").is_ok(),
            keep_log: std::env::var("DEVTABLES_SIM_SEED").is_ok()
                || std::env::var("DEVTABLES_SIM_TRACE").is_ok(),
            rng,
        }
    }

    /// Record a trace line. Formatting is skipped in bulk runs; a failing seed replayed with
    /// `DEVTABLES_SIM_SEED` keeps the log and prints its tail.
    fn note(&mut self, s: impl FnOnce() -> String) {
        if !self.keep_log {
            return;
        }
        let s = s();
        if self.trace {
            eprintln!("[{}] {s}", self.now - T0);
        }
        if self.log.len() < 4000 {
            self.log.push(format!("[{}] {s}", self.now - T0));
        }
    }

    fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self.log.iter().rev().take(40).collect();
        for l in tail.into_iter().rev() {
            eprintln!("{l}");
        }
        panic!(
            "SEED={} {what} (replay with DEVTABLES_SIM_SEED={} for the trace)",
            self.seed, self.seed
        );
    }

    fn phys(&self, i: usize) -> u64 {
        self.now.saturating_add_signed(self.devs[i].skew)
    }

    fn send(&mut self, dest: Dest, bytes: Vec<u8>) {
        if self.rng.gen_bool(self.faults.loss) {
            return;
        }
        let copies = if self.rng.gen_bool(self.faults.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.rng.gen_range(1..=self.faults.max_delay.max(1));
            self.net_seq += 1;
            self.net.push(Msg {
                at,
                seq: self.net_seq,
                dest,
                bytes: bytes.clone(),
            });
        }
    }

    fn connect(&mut self, i: usize) {
        self.devs[i].connected = true;
        self.devs[i].down_until = None;
        let now = self.now;
        self.devs[i].engine.handle_connected(now);
        self.note(|| format!("d{i} connected"));
        self.drain_device(i);
    }

    fn disconnect(&mut self, i: usize, until: u64) {
        if self.devs[i].connected {
            self.devs[i].connected = false;
            let now = self.now;
            self.devs[i].engine.handle_disconnected(now);
            let id = self.devs[i].id.clone();
            self.cloud.handle_disconnected(now, &id);
            self.drain_cloud();
        }
        self.net
            .retain(|m| !matches!(m.dest, Dest::Device(j) | Dest::Cloud(j) if j == i));
        self.devs[i].down_until = Some(until);
        self.note(|| format!("d{i} down until {}", until - T0));
    }

    fn crash_device(&mut self, i: usize) {
        let until = self.now + self.rng.gen_range(1..500);
        self.disconnect(i, until);
        let d = &mut self.devs[i];
        d.boots += 1;
        let cfg = DeviceConfig {
            seed: self.rng.gen(),
            ..self.dev_cfg.clone()
        };
        d.engine = DeviceEngine::new(cfg, "1.0.0".into(), d.store.restored());
        d.clock = HlcClock::restore(d.clock.node(), d.store.max_version());
        self.note(|| format!("d{i} crashed"));
    }

    fn crash_cloud(&mut self) {
        self.cloud_boots += 1;
        let cfg = CloudConfig {
            seed: self.rng.gen(),
            ..self.cloud_cfg.clone()
        };
        self.cloud = CloudEngine::new(cfg);
        self.cloud_clock = HlcClock::restore(self.cloud_clock.node(), self.cloud_store.clock_last);
        self.net.retain(|m| !matches!(m.dest, Dest::Cloud(_)));
        self.note(|| "cloud crashed".into());
        // The driver's restart duty: prompt devices whose feed holds unacknowledged entries.
        let now = self.now;
        let heads: Vec<(DeviceId, u64)> = self
            .cloud_store
            .feeds
            .iter()
            .map(|(d, f)| (d.clone(), f.head))
            .collect();
        for (d, head) in heads {
            if self.cloud_store.acked.get(&d).copied().unwrap_or(0) < head {
                self.cloud.handle_feed_advanced(now, &d, head);
            }
        }
        self.drain_cloud();
    }

    fn check_dev_history(&mut self, i: usize) {
        let mut bad = None;
        let d = &mut self.devs[i];
        for (k, rec) in &d.store.items {
            let h = d.history.entry(k.clone()).or_insert(rec.version);
            if rec.version < *h {
                bad = Some(format!(
                    "d{i} version of {k:?} went back from {h} to {}",
                    rec.version
                ));
            }
            *h = rec.version.max(*h);
        }
        if let Some(b) = bad {
            self.fail(b);
        }
    }

    fn check_cloud_history(&mut self) {
        let mut bad = None;
        for (k, rec) in &self.cloud_store.items {
            let h = self.cloud_history.entry(k.clone()).or_insert(rec.version);
            if rec.version < *h {
                bad = Some(format!(
                    "cloud version of {k:?} went back from {h} to {}",
                    rec.version
                ));
            }
            *h = rec.version.max(*h);
        }
        if let Some(b) = bad {
            self.fail(b);
        }
    }

    fn drain_device(&mut self, i: usize) {
        loop {
            let mut progress = false;
            while let Some(a) = self.devs[i].engine.poll_action() {
                progress = true;
                match a {
                    DeviceAction::Apply(page) => {
                        let phys = self.phys(i);
                        let d = &mut self.devs[i];
                        let mut txn = DevTxn {
                            s: d.store.clone(),
                            schema: &self.schema,
                        };
                        let out = match apply::device_apply(
                            &mut txn,
                            &self.schema,
                            &mut d.clock,
                            phys,
                            &page,
                        ) {
                            Ok(o) => o,
                            Err(e) => match e {},
                        };
                        d.store = txn.s;
                        self.check_dev_history(i);
                        self.note(|| format!("d{i} applied {page:?} -> {out:?}"));
                        if self.rng.gen_bool(self.faults.device_crash) {
                            self.crash_device(i);
                            return;
                        }
                        let now = self.now;
                        self.devs[i].engine.handle_applied(now, out);
                    }
                    DeviceAction::LoadBatch { batch, keys } => {
                        let d = &mut self.devs[i];
                        let changes = keys
                            .into_iter()
                            .filter_map(|k| d.store.outbox.get(&k).map(|(_, c)| c.clone()))
                            .collect();
                        let now = self.now;
                        d.engine.handle_batch_loaded(now, batch, changes);
                    }
                    DeviceAction::OutboxRemove(list) => {
                        let d = &mut self.devs[i];
                        for (m, k, v) in list {
                            let key = (m, k);
                            if d.store
                                .outbox
                                .get(&key)
                                .is_some_and(|(_, c)| c.version == v)
                            {
                                d.store.outbox.remove(&key);
                            }
                        }
                    }
                }
            }
            while let Some(bytes) = self.devs[i].engine.poll_transmit() {
                progress = true;
                if self.devs[i].connected {
                    self.send(Dest::Cloud(i), bytes);
                }
            }
            while let Some(e) = self.devs[i].engine.poll_event() {
                self.devs[i].events.push(e);
            }
            if !progress {
                break;
            }
        }
    }

    fn commit_cloud(&mut self, txn: CTxn) {
        self.cloud_store = txn.s;
        self.cloud_store.clock_last = self.cloud_store.clock_last.max(self.cloud_clock.last());
        self.check_cloud_history();
        let now = self.now;
        for d in txn.advanced {
            let head = self.cloud_store.feeds.get(&d).map_or(0, |f| f.head);
            self.cloud.handle_feed_advanced(now, &d, head);
        }
    }

    fn drain_cloud(&mut self) {
        while let Some(a) = self.cloud.poll_action() {
            let now = self.now;
            match a {
                CloudAction::ApplyPush {
                    device,
                    batch,
                    changes,
                } => {
                    let mut txn = CTxn {
                        s: self.cloud_store.clone(),
                        advanced: BTreeSet::new(),
                    };
                    let results = match apply::cloud_apply_push(
                        &mut txn,
                        &self.schema,
                        &mut self.cloud_clock,
                        now,
                        &device,
                        &changes,
                    ) {
                        Ok(r) => r,
                        Err(e) => match e {},
                    };
                    for r in &results {
                        if r.status == ChangeStatus::Applied {
                            self.applied.push((
                                Owner::Device(device.clone()),
                                r.model.clone(),
                                r.key.clone(),
                                r.version,
                            ));
                        }
                    }
                    self.commit_cloud(txn);
                    self.note(|| format!("cloud applied push {batch} from {device}: {results:?}"));
                    if self.rng.gen_bool(self.faults.cloud_crash) {
                        self.crash_cloud();
                        return;
                    }
                    self.cloud.handle_push_applied(now, &device, batch, results);
                }
                CloudAction::ReadFeed {
                    device,
                    after,
                    limit,
                } => {
                    let page = self.cloud_store.read_feed(&device, after, limit);
                    self.cloud.handle_feed_page(now, &device, page);
                }
                CloudAction::ReadSnapshot {
                    device,
                    resync,
                    from,
                    limit,
                } => {
                    let page =
                        self.cloud_store
                            .read_snapshot(&self.schema, &device, resync, from, limit);
                    self.cloud.handle_snapshot_page(now, &device, page);
                }
                CloudAction::Transmit { device, bytes } => {
                    let Some(i) = self.devs.iter().position(|d| d.id == device) else {
                        continue;
                    };
                    if self.devs[i].connected {
                        self.send(Dest::Device(i), bytes);
                    }
                }
                CloudAction::DeviceStatus {
                    device,
                    cursor_acked,
                    ..
                } => {
                    if let Some(c) = cursor_acked {
                        self.cloud_store.acked.insert(device, c);
                    }
                }
                CloudAction::Oversize { device, model, key } => {
                    self.fail(format!("oversize {device} {model} {key:?}"));
                }
            }
        }
    }

    /// A local write through the device-db interceptor: item, version and coalesced outbox entry
    /// commit together; then the engine is told.
    fn device_write(&mut self, i: usize, model: &str, name: &str, delete: bool) {
        let phys = self.phys(i);
        let v: u32 = self.rng.gen_range(0..1000);
        let d = &mut self.devs[i];
        let m = self.schema.model(model).expect("model");
        let mut input = Item::new();
        if m.field("deviceId").is_some() {
            input.insert("deviceId".into(), d.id.device.clone().into());
        }
        input.insert("name".into(), name.into());
        input.insert("v".into(), v.into());
        let item = m.prepare_create(&input, phys as i64).expect("valid item");
        let key = m.primary_key(&item).expect("key");
        let k = (model.to_string(), key.clone());
        let base = d.store.items.get(&k).map(|r| r.version);
        let live = d.store.items.get(&k).is_some_and(|r| r.item.is_some());
        if delete && !live {
            return;
        }
        let version = d.clock.tick(phys);
        if base.is_some_and(|b| b >= version) {
            self.fail(format!("clock issued {version} not above stored {base:?}"));
        }
        let change = Change {
            model: model.to_string(),
            key: key.clone(),
            op: if delete { Op::Delete } else { Op::Put },
            item: if delete { None } else { Some(item.clone()) },
            version,
            base,
        };
        d.store.items.insert(
            k.clone(),
            Rec {
                item: if delete { None } else { Some(item) },
                version,
            },
        );
        if m.process().syncs_up() {
            let seq = match d.store.outbox.get(&k) {
                Some((s, _)) => *s,
                None => {
                    d.store.next_seq += 1;
                    d.store.next_seq
                }
            };
            d.store.outbox.insert(k, (seq, change.clone()));
        }
        self.check_dev_history(i);
        self.note(|| {
            format!(
                "d{i} local {} {model}/{name} {version}",
                if delete { "delete" } else { "put" }
            )
        });
        if self
            .schema
            .model(model)
            .is_some_and(|m| m.process().syncs_up())
        {
            let now = self.now;
            self.devs[i].engine.handle_local_change(now, change);
            self.drain_device(i);
        }
    }

    fn cloud_write(&mut self, owner: Owner, model: &str, name: &str, delete: bool) {
        let m = self.schema.model(model).expect("model");
        let mut input = Item::new();
        if let Owner::Device(d) = &owner {
            input.insert("deviceId".into(), d.device.clone().into());
        }
        input.insert("name".into(), name.into());
        input.insert("v".into(), self.rng.gen_range(0..1000u32).into());
        let item = m.prepare_create(&input, self.now as i64).expect("valid");
        let op = if delete {
            CloudOp::Delete(m.primary_key(&item).expect("key"))
        } else {
            CloudOp::Put(item)
        };
        let mut txn = CTxn {
            s: self.cloud_store.clone(),
            advanced: BTreeSet::new(),
        };
        let now = self.now;
        let res = apply::cloud_write(
            &mut txn,
            &self.schema,
            &mut self.cloud_clock,
            now,
            4096,
            &owner,
            model,
            op,
        );
        match res {
            Ok(c) => {
                self.note(|| {
                    format!(
                        "cloud write {owner:?} {model}/{name} {:?} {}",
                        c.op, c.version
                    )
                });
                self.commit_cloud(txn);
                self.drain_cloud();
            }
            Err(e) => self.fail(format!("cloud write failed: {e}")),
        }
    }

    fn random_op(&mut self) {
        let n = self.devs.len();
        let name = ["a", "b", "c"][self.rng.gen_range(0..3)];
        let delete = self.rng.gen_bool(0.3);
        let r = self.rng.gen_range(0..100);
        let i = self.rng.gen_range(0..n);
        if r < 25 {
            self.device_write(i, "U", name, delete);
        } else if r < 50 {
            self.device_write(i, "B", name, delete);
        } else if r < 55 {
            self.device_write(i, "L", name, delete);
        } else {
            let (owner, model) = match self.rng.gen_range(0..3) {
                0 => (Owner::Device(self.devs[i].id.clone()), "D"),
                1 => (Owner::Device(self.devs[i].id.clone()), "B"),
                _ => (Owner::Account(ACCOUNT.into()), "C"),
            };
            self.cloud_write(owner, model, name, delete);
        }
    }

    fn random_fault(&mut self) {
        let n = self.devs.len();
        let i = self.rng.gen_range(0..n);
        if self.rng.gen_bool(self.faults.partition) && self.devs[i].connected {
            let until = self.now + self.rng.gen_range(100..3000);
            self.disconnect(i, until);
        }
        if self.rng.gen_bool(self.faults.device_crash) {
            self.crash_device(i);
        }
        if self.rng.gen_bool(self.faults.cloud_crash) {
            self.crash_cloud();
        }
        if self.rng.gen_bool(self.faults.purge) {
            // Feed retention: keep only the newest entry of each device's feed.
            for f in self.cloud_store.feeds.values_mut() {
                let floor = f.head.saturating_sub(1);
                let old: Vec<u64> = f.entries.range(..=floor).map(|(c, _)| *c).collect();
                for c in old {
                    if let Some(ck) = f.entries.remove(&c) {
                        f.by_key.remove(&ck);
                    }
                }
                f.floor = f.floor.max(floor);
            }
            self.note(|| "feeds purged".into());
        }
    }

    fn next_time(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut c = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        for m in &self.net {
            c(m.at);
        }
        for d in &self.devs {
            if let Some(x) = d.engine.poll_timeout() {
                c(x);
            }
            if let Some(x) = d.down_until {
                c(x);
            }
        }
        if let Some(x) = self.cloud.poll_timeout() {
            c(x);
        }
        t
    }

    /// Advance to `t` and process everything due then.
    fn step_to(&mut self, t: u64) {
        self.now = self.now.max(t);
        let now = self.now;
        for i in 0..self.devs.len() {
            if self.devs[i].down_until.is_some_and(|u| u <= now) {
                self.connect(i);
            }
        }
        let mut due: Vec<Msg> = Vec::new();
        let mut rest = Vec::new();
        for m in self.net.drain(..) {
            if m.at <= now {
                due.push(m);
            } else {
                rest.push(m);
            }
        }
        self.net = rest;
        due.sort_by_key(|m| (m.at, m.seq));
        for m in due {
            match m.dest {
                Dest::Cloud(i) => {
                    if !self.devs[i].connected {
                        continue;
                    }
                    let id = self.devs[i].id.clone();
                    if self.keep_log {
                        if let Ok(d) = wire::decode_up(&m.bytes, &wire_cfg()) {
                            self.note(|| format!("cloud <- d{i} {:?}", short_up(&d.msg)));
                        }
                    }
                    self.cloud.handle_message(now, &id, &m.bytes);
                    self.drain_cloud();
                }
                Dest::Device(i) => {
                    if !self.devs[i].connected {
                        continue;
                    }
                    if self.keep_log {
                        if let Ok(d) = wire::decode_down(&m.bytes, &wire_cfg()) {
                            self.note(|| format!("d{i} <- {:?}", short_down(&d.msg)));
                        }
                    }
                    self.devs[i].engine.handle_message(now, &m.bytes);
                    self.drain_device(i);
                }
            }
        }
        for i in 0..self.devs.len() {
            if self.devs[i].engine.poll_timeout().is_some_and(|x| x <= now) {
                self.devs[i].engine.handle_timeout(now);
                self.drain_device(i);
            }
        }
        if self.cloud.poll_timeout().is_some_and(|x| x <= now) {
            self.cloud.handle_timeout(now);
            self.drain_cloud();
        }
    }

    /// Run with faults for `ops` random operations spread over `span` ms, then heal and run to
    /// quiescence.
    fn run(&mut self, faults: Faults, ops: usize, span: u64) {
        for i in 0..self.devs.len() {
            self.connect(i);
        }
        self.faults = faults;
        let mut op_times: Vec<u64> = (0..ops).map(|_| T0 + self.rng.gen_range(0..span)).collect();
        op_times.sort();
        for at in op_times {
            while let Some(t) = self.next_time() {
                if t > at {
                    break;
                }
                self.step_to(t);
            }
            self.step_to(at);
            if self.rng.gen_bool(0.3) {
                self.random_fault();
            }
            self.random_op();
        }
        self.heal();
    }

    fn heal(&mut self) {
        self.faults = CALM;
        self.note(|| "heal".into());
        for i in 0..self.devs.len() {
            if !self.devs[i].connected {
                self.connect(i);
            }
        }
        let deadline = self.now + 30 * 60_000;
        while let Some(t) = self.next_time() {
            if t > deadline {
                self.fail("no quiescence within 30 virtual minutes after heal".into());
            }
            self.step_to(t);
        }
        self.check_converged();
    }

    fn check_converged(&mut self) {
        let live_dev = |d: &Dev, model: &str| -> BTreeMap<ItemKey, Rec> {
            d.store
                .items
                .iter()
                .filter(|((m, _), r)| m == model && r.item.is_some())
                .map(|((_, k), r)| (k.clone(), r.clone()))
                .collect()
        };
        let live_cloud = |owner: &Owner, model: &str| -> BTreeMap<ItemKey, Rec> {
            self.cloud_store
                .items
                .iter()
                .filter(|((o, m, _), r)| o == owner && m == model && r.item.is_some())
                .map(|((_, _, k), r)| (k.clone(), r.clone()))
                .collect()
        };
        for (i, d) in self.devs.iter().enumerate() {
            for model in ["U", "D", "B", "C"] {
                let owner = if model == "C" {
                    Owner::Account(ACCOUNT.into())
                } else {
                    Owner::Device(d.id.clone())
                };
                let a = live_dev(d, model);
                let b = live_cloud(&owner, model);
                if a != b {
                    self.fail(format!(
                        "d{i} model {model} diverged:\n device {a:?}\n cloud  {b:?}"
                    ));
                }
            }
            if !d.store.outbox.is_empty() || d.engine.pending() != 0 {
                self.fail(format!("d{i} outbox not empty: {:?}", d.store.outbox));
            }
            for e in &d.events {
                if let DeviceEvent::Rejected { .. } | DeviceEvent::ApplySkipped(_) = e {
                    self.fail(format!("d{i} unexpected event {e:?}"));
                }
            }
        }
        for (owner, model, key, v) in &self.applied {
            let stored = self
                .cloud_store
                .items
                .get(&(owner.clone(), model.clone(), key.clone()))
                .map(|r| r.version);
            if stored.is_none_or(|s| s < *v) {
                self.fail(format!(
                    "applied write {owner:?} {model} {key:?} {v} lost (cloud has {stored:?})"
                ));
            }
        }
    }
}

fn short_up(m: &UpMsg) -> String {
    match m {
        UpMsg::Push { batch, changes } => format!(
            "Push {batch} {:?}",
            changes
                .iter()
                .map(|c| format!("{}/{} {:?} {}", c.model, c.key.sk, c.op, c.version))
                .collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}

fn short_down(m: &DownMsg) -> String {
    match m {
        DownMsg::Feed { from, to, changes } => format!(
            "Feed ({from},{to}] {:?}",
            changes
                .iter()
                .map(|c| format!("{}/{} {:?} {}", c.model, c.key.sk, c.op, c.version))
                .collect::<Vec<_>>()
        ),
        DownMsg::Snapshot {
            resync,
            after,
            last,
            items,
            done,
            cursor,
        } => format!(
            "Snapshot {resync} after={:?} last={:?} n={} done={done} cursor={cursor}",
            after.as_ref().map(|c| &c.key.sk),
            last.as_ref().map(|c| &c.key.sk),
            items.len()
        ),
        DownMsg::PushAck { batch, results } => format!(
            "PushAck {batch} {:?}",
            results
                .iter()
                .map(|r| format!("{}/{} {} {:?}", r.model, r.key.sk, r.version, r.status))
                .collect::<Vec<_>>()
        ),
        other => format!("{other:?}"),
    }
}

const FAULTY: Faults = Faults {
    loss: 0.1,
    dup: 0.05,
    max_delay: 300,
    partition: 0.15,
    device_crash: 0.05,
    cloud_crash: 0.03,
    purge: 0.1,
};

fn run_seed(seed: u64) {
    let mut pick = StdRng::seed_from_u64(seed ^ 0x5eed);
    let n = pick.gen_range(2..=5);
    let ops = pick.gen_range(4..=14);
    let mut sim = Sim::new(seed, n);
    sim.run(FAULTY, ops, 4000);
}

fn run_range(range: std::ops::Range<u64>) {
    if let Ok(s) = std::env::var("DEVTABLES_SIM_SEED") {
        let seed: u64 = s.parse().expect("DEVTABLES_SIM_SEED must be a number");
        if range.contains(&seed) || range.start == 0 {
            run_seed(seed);
        }
        return;
    }
    for seed in range {
        run_seed(seed);
    }
}

// 10 000 seeds, split so the test threads use every core.
#[test]
fn sim_seeds_0() {
    run_range(0..2500);
}
#[test]
fn sim_seeds_1() {
    run_range(2500..5000);
}
#[test]
fn sim_seeds_2() {
    run_range(5000..7500);
}
#[test]
fn sim_seeds_3() {
    run_range(7500..10_000);
}

// ---------------------------------------------------------------------------------------------
// Focused deterministic tests

fn dev_id(n: &str) -> DeviceId {
    DeviceId::new(ACCOUNT, n).unwrap()
}

fn change(model: &str, dev: &str, name: &str, version: Hlc) -> Change {
    let s = schema();
    let m = s.model(model).unwrap();
    let mut input = Item::new();
    input.insert("deviceId".into(), dev.into());
    input.insert("name".into(), name.into());
    let item = m.prepare_create(&input, 0).unwrap();
    Change {
        model: model.into(),
        key: m.primary_key(&item).unwrap(),
        op: Op::Put,
        item: Some(item),
        version,
        base: None,
    }
}

fn hlc(w: u64) -> Hlc {
    Hlc {
        wall_ms: w,
        counter: 0,
        node: 1,
    }
}

fn down(msg: &DownMsg) -> Vec<u8> {
    wire::encode_down("1.0.0", msg, &WireConfig::default()).unwrap()
}

fn up_msgs(e: &mut DeviceEngine) -> Vec<UpMsg> {
    let mut v = Vec::new();
    while let Some(b) = e.poll_transmit() {
        v.push(wire::decode_up(&b, &WireConfig::default()).unwrap().msg);
    }
    v
}

fn down_msgs(c: &mut CloudEngine) -> (Vec<DownMsg>, Vec<CloudAction>) {
    let mut m = Vec::new();
    let mut a = Vec::new();
    while let Some(x) = c.poll_action() {
        match x {
            CloudAction::Transmit { bytes, .. } => m.push(
                wire::decode_down(&bytes, &WireConfig::default())
                    .unwrap()
                    .msg,
            ),
            other => a.push(other),
        }
    }
    (m, a)
}

/// Answers the engine's `LoadBatch` actions from `outbox` (the durable outbox of these tests);
/// returns the other actions.
fn load(e: &mut DeviceEngine, now: u64, outbox: &[Change]) -> Vec<DeviceAction> {
    let mut other = Vec::new();
    while let Some(a) = e.poll_action() {
        match a {
            DeviceAction::LoadBatch { batch, keys } => {
                let changes = outbox
                    .iter()
                    .filter(|c| keys.contains(&(c.model.clone(), c.key.clone())))
                    .cloned()
                    .collect();
                e.handle_batch_loaded(now, batch, changes);
            }
            a => other.push(a),
        }
    }
    other
}

/// A connected, welcomed device engine.
fn ready_device(outbox: Vec<Change>) -> DeviceEngine {
    let mut e = DeviceEngine::new(
        DeviceConfig::default(),
        "1.0.0".into(),
        Restored {
            cursor: 0,
            outbox: outbox.iter().map(OutboxMeta::of).collect(),
        },
    );
    e.handle_connected(0);
    let hello = up_msgs(&mut e);
    let UpMsg::Hello { session, .. } = hello[0] else {
        panic!("{hello:?}")
    };
    e.handle_message(1, &down(&DownMsg::Welcome { session }));
    assert!(e.is_ready());
    e
}

#[test]
fn coalescing_with_in_flight_older_version_keeps_the_newer() {
    let mut e = ready_device(vec![]);
    let c1 = change("B", "d0", "a", hlc(10));
    e.handle_local_change(10, c1.clone());
    e.handle_timeout(100);
    load(&mut e, 100, std::slice::from_ref(&c1));
    let sent = up_msgs(&mut e);
    let UpMsg::Push { batch, .. } = &sent[0] else {
        panic!("{sent:?}")
    };
    let c2 = change("B", "d0", "a", hlc(20));
    e.handle_local_change(110, c2.clone());
    // The ack for the old version must not remove the newer entry.
    let ack = DownMsg::PushAck {
        batch: *batch,
        results: vec![wire::ChangeResult {
            model: "B".into(),
            key: c1.key.clone(),
            version: c1.version,
            status: ChangeStatus::Applied,
        }],
    };
    e.handle_message(120, &down(&ack));
    assert_eq!(e.pending(), 1);
    // No removal; the newer change goes in the next batch.
    assert_eq!(load(&mut e, 120, std::slice::from_ref(&c2)), vec![]);
    e.handle_timeout(200);
    load(&mut e, 200, std::slice::from_ref(&c2));
    let sent = up_msgs(&mut e);
    let UpMsg::Push { changes, .. } = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(changes[0].version, c2.version);
}

#[test]
fn unacked_batch_is_resent_on_its_own_timer_with_backoff() {
    let c = change("U", "d0", "a", hlc(1));
    let mut e = ready_device(vec![c.clone()]);
    e.handle_timeout(60);
    load(&mut e, 60, std::slice::from_ref(&c));
    assert_eq!(up_msgs(&mut e).len(), 1);
    let mut times = Vec::new();
    for _ in 0..8 {
        let t = e
            .poll_timeout()
            .expect("a retransmit timer is armed without any other input");
        e.handle_timeout(t);
        load(&mut e, t, std::slice::from_ref(&c));
        let m = up_msgs(&mut e);
        assert!(matches!(m[0], UpMsg::Push { .. }));
        times.push(t);
    }
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= 2000 && gaps.iter().all(|g| *g <= 30_000),
        "{gaps:?}"
    );
    assert!(*gaps.last().unwrap() >= 20_000, "{gaps:?}");
}

#[test]
fn rejected_change_leaves_the_outbox_and_is_not_retried() {
    let c = change("U", "d0", "a", hlc(1));
    let mut e = ready_device(vec![c.clone()]);
    e.handle_timeout(60);
    load(&mut e, 60, std::slice::from_ref(&c));
    let m = up_msgs(&mut e);
    let UpMsg::Push { batch, .. } = m[0] else {
        panic!()
    };
    let ack = DownMsg::PushAck {
        batch,
        results: vec![wire::ChangeResult {
            model: "U".into(),
            key: c.key.clone(),
            version: c.version,
            status: ChangeStatus::Rejected {
                reason: RejectReason::Ownership,
            },
        }],
    };
    e.handle_message(70, &down(&ack));
    assert_eq!(e.pending(), 0);
    assert_eq!(
        e.poll_action(),
        Some(DeviceAction::OutboxRemove(vec![(
            "U".into(),
            c.key.clone(),
            c.version
        )]))
    );
    let evs: Vec<DeviceEvent> = std::iter::from_fn(|| e.poll_event()).collect();
    assert!(evs.contains(&DeviceEvent::Rejected {
        change: c,
        reason: RejectReason::Ownership
    }));
    assert_eq!(e.poll_timeout(), None);
}

#[test]
fn oversized_change_is_rejected_locally() {
    let mut c = change("U", "d0", "a", hlc(1));
    c.item
        .as_mut()
        .unwrap()
        .insert("v".into(), "x".repeat(200_000).into());
    let mut e = ready_device(vec![c.clone()]);
    e.handle_timeout(60);
    let actions = load(&mut e, 60, &[c]);
    assert!(up_msgs(&mut e).is_empty());
    assert_eq!(e.pending(), 0);
    assert!(matches!(
        actions.as_slice(),
        [DeviceAction::OutboxRemove(_)]
    ));
}

#[test]
fn feed_gap_is_ignored_and_duplicate_is_reacked() {
    let mut e = ready_device(vec![]);
    let feed = |from, to| {
        down(&DownMsg::Feed {
            from,
            to,
            changes: vec![change("D", "d0", "a", hlc(to))],
        })
    };
    e.handle_message(10, &feed(5, 6));
    assert_eq!(e.poll_action(), None, "a gap is not applied");
    e.handle_message(11, &feed(0, 3));
    let Some(DeviceAction::Apply(_)) = e.poll_action() else {
        panic!()
    };
    e.handle_applied(
        12,
        apply::ApplyOutcome {
            cursor: Some(3),
            ..Default::default()
        },
    );
    assert_eq!(e.cursor(), 3);
    assert_eq!(up_msgs(&mut e), vec![UpMsg::FeedAck { cursor: 3 }]);
    e.handle_message(13, &feed(0, 3));
    assert_eq!(e.poll_action(), None, "a duplicate is not applied twice");
    assert_eq!(up_msgs(&mut e), vec![UpMsg::FeedAck { cursor: 3 }]);
}

#[test]
fn unknown_protocol_version_gets_an_error_reply_and_the_cloud_keeps_running() {
    let mut c = CloudEngine::new(CloudConfig::default());
    let d = dev_id("d0");
    c.handle_message(0, &d, br#"{"v":9,"schema":"x","msg":{"type":"hello2"}}"#);
    let (m, _) = down_msgs(&mut c);
    assert_eq!(m.len(), 1);
    assert!(matches!(
        &m[0],
        DownMsg::Error {
            code: ErrorCode::UnsupportedVersion { supported: 1 },
            ..
        }
    ));
    c.handle_message(1, &d, b"not json");
    let (m, _) = down_msgs(&mut c);
    assert!(matches!(
        &m[0],
        DownMsg::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));
    let hello = wire::encode_up(
        "1",
        &UpMsg::Hello {
            session: 4,
            cursor: 0,
            pending: 0,
        },
        &WireConfig::default(),
    )
    .unwrap();
    c.handle_message(2, &d, &hello);
    let (m, _) = down_msgs(&mut c);
    assert_eq!(m, vec![DownMsg::Welcome { session: 4 }]);
}

#[test]
fn cursor_older_than_retention_triggers_one_paged_resync() {
    let mut c = CloudEngine::new(CloudConfig {
        snapshot_page_items: 1,
        ..CloudConfig::default()
    });
    let d = dev_id("d0");
    let hello = wire::encode_up(
        "1",
        &UpMsg::Hello {
            session: 4,
            cursor: 2,
            pending: 0,
        },
        &WireConfig::default(),
    )
    .unwrap();
    c.handle_message(0, &d, &hello);
    let (_, a) = down_msgs(&mut c);
    assert!(a
        .iter()
        .any(|a| matches!(a, CloudAction::ReadFeed { after: 2, .. })));
    c.handle_feed_page(
        1,
        &d,
        FeedPage {
            after: 2,
            changes: vec![],
            head: 50,
            resync_required: true,
        },
    );
    let (_, a) = down_msgs(&mut c);
    let Some(CloudAction::ReadSnapshot {
        resync, from: None, ..
    }) = a.into_iter().next()
    else {
        panic!()
    };
    let item = change("D", "d0", "a", hlc(1));
    let next = Some(SnapshotCursor {
        model: "D".into(),
        key: item.key.clone(),
    });
    c.handle_snapshot_page(
        2,
        &d,
        SnapshotPage {
            resync,
            items: vec![item.clone()],
            next: next.clone(),
            cursor: 50,
        },
    );
    let (m, a) = down_msgs(&mut c);
    assert!(matches!(
        &m[0],
        DownMsg::Snapshot {
            after: None,
            done: false,
            cursor: 50,
            ..
        }
    ));
    assert!(matches!(
        &a[0],
        CloudAction::ReadSnapshot { from: Some(_), .. }
    ));
    // The second page's read reports a newer head: the resync keeps the cursor of its start.
    c.handle_snapshot_page(
        3,
        &d,
        SnapshotPage {
            resync,
            items: vec![],
            next: None,
            cursor: 60,
        },
    );
    let (m, _) = down_msgs(&mut c);
    assert!(
        matches!(
            &m[0],
            DownMsg::Snapshot {
                after: Some(_),
                done: true,
                cursor: 50,
                ..
            }
        ),
        "{m:?}"
    );
    let ack = wire::encode_up(
        "1",
        &UpMsg::SnapshotAck {
            resync,
            pos: None,
            done: true,
        },
        &WireConfig::default(),
    )
    .unwrap();
    c.handle_message(4, &d, &ack);
    let (_, a) = down_msgs(&mut c);
    assert!(
        a.iter()
            .any(|a| matches!(a, CloudAction::ReadFeed { after: 50, .. })),
        "{a:?}"
    );
}

#[test]
fn silent_device_does_not_pin_the_cloud() {
    let mut c = CloudEngine::new(CloudConfig::default());
    let d = dev_id("d0");
    let hello = wire::encode_up(
        "1",
        &UpMsg::Hello {
            session: 4,
            cursor: 0,
            pending: 0,
        },
        &WireConfig::default(),
    )
    .unwrap();
    c.handle_message(0, &d, &hello);
    let mut sent_pages = 0;
    let mut now = 0;
    for _ in 0..100 {
        let (m, a) = down_msgs(&mut c);
        sent_pages += m
            .iter()
            .filter(|m| matches!(m, DownMsg::Feed { .. }))
            .count();
        for a in a {
            if let CloudAction::ReadFeed { after, .. } = a {
                let ch = change("D", "d0", "a", hlc(after + 1));
                c.handle_feed_page(
                    now,
                    &d,
                    FeedPage {
                        after,
                        changes: vec![(after + 1, ch)],
                        head: 1000,
                        resync_required: false,
                    },
                );
            }
        }
        match c.poll_timeout() {
            Some(t) => {
                now = t;
                c.handle_timeout(t);
            }
            None => break,
        }
    }
    assert_eq!(
        c.sessions(),
        0,
        "the silent session is dropped after its retries"
    );
    assert!(sent_pages <= 2 * 10, "bounded resends: {sent_pages}");
}

fn pair_sim(seed: u64) -> Sim {
    let mut s = Sim::new(seed, 2);
    for i in 0..2 {
        s.connect(i);
    }
    s
}

fn settle(s: &mut Sim) {
    while let Some(t) = s.next_time() {
        s.step_to(t);
    }
}

#[test]
fn offline_device_learns_deletes_after_feed_retention() {
    let mut s = pair_sim(1);
    let d0 = Owner::Device(s.devs[0].id.clone());
    s.cloud_write(d0.clone(), "D", "a", false);
    s.cloud_write(d0.clone(), "D", "b", false);
    settle(&mut s);
    assert_eq!(
        s.devs[0]
            .store
            .items
            .values()
            .filter(|r| r.item.is_some())
            .count(),
        2
    );
    let until = s.now + 10_000;
    s.disconnect(0, until);
    s.cloud_write(d0.clone(), "D", "a", true);
    s.cloud_write(d0.clone(), "D", "c", false);
    s.faults.purge = 1.0;
    s.faults.partition = 0.0;
    s.random_fault(); // purge only (other fault rates are zero)
    s.faults = CALM;
    settle(&mut s);
    let live: Vec<String> = s.devs[0]
        .store
        .items
        .iter()
        .filter(|(_, r)| r.item.is_some())
        .map(|((_, k), _)| k.sk.clone())
        .collect();
    assert_eq!(live, vec!["d#b".to_string(), "d#c".to_string()]);
    assert!(s.devs[0]
        .events
        .iter()
        .any(|e| matches!(e, DeviceEvent::Resynced { .. })));
    s.check_converged();
}

#[test]
fn ownership_is_enforced_by_the_cloud() {
    let s = schema();
    let mut txn = CTxn {
        s: CloudStore::default(),
        advanced: BTreeSet::new(),
    };
    let mut clock = HlcClock::new(9);
    let from = dev_id("d0");
    let theirs = change("U", "d1", "a", hlc(5));
    let mine = change("U", "d0", "a", hlc(5));
    let mut down_model = change("D", "d0", "a", hlc(5));
    down_model.model = "D".into();
    let mut unknown = mine.clone();
    unknown.model = "Nope".into();
    let r = apply::cloud_apply_push(
        &mut txn,
        &s,
        &mut clock,
        0,
        &from,
        &[theirs, mine.clone(), down_model, unknown],
    )
    .unwrap();
    let statuses: Vec<ChangeStatus> = r.into_iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        vec![
            ChangeStatus::Rejected {
                reason: RejectReason::Ownership
            },
            ChangeStatus::Applied,
            ChangeStatus::Rejected {
                reason: RejectReason::NotSyncedUp
            },
            ChangeStatus::Rejected {
                reason: RejectReason::UnknownModel
            },
        ]
    );
    // Stored under the sender, whatever the payload says.
    assert!(txn
        .s
        .items
        .contains_key(&(Owner::Device(from.clone()), "U".into(), mine.key.clone())));
    // A replay is idempotent; an older version is stale.
    let r = apply::cloud_apply_push(
        &mut txn,
        &s,
        &mut clock,
        0,
        &from,
        std::slice::from_ref(&mine),
    )
    .unwrap();
    assert_eq!(r[0].status, ChangeStatus::Applied);
    let mut old = mine.clone();
    old.version = hlc(4);
    let r = apply::cloud_apply_push(&mut txn, &s, &mut clock, 0, &from, &[old]).unwrap();
    assert_eq!(r[0].status, ChangeStatus::Stale);
    // The cloud API cannot write an up-only model.
    let e = apply::cloud_write(
        &mut txn,
        &s,
        &mut clock,
        0,
        4096,
        &Owner::Device(from),
        "U",
        CloudOp::Delete(mine.key),
    );
    assert!(matches!(e, Err(apply::CloudWriteError::UpOnly(_))));
}

#[test]
fn broadcast_items_reach_every_device_and_new_writes_win_over_skew() {
    let mut s = pair_sim(2);
    s.devs[0].skew = 5 * 3_600_000;
    s.cloud_write(Owner::Account(ACCOUNT.into()), "C", "fw", false);
    settle(&mut s);
    for d in &s.devs {
        assert_eq!(d.store.items.keys().filter(|(m, _)| m == "C").count(), 1);
    }
    // A device far ahead writes; a later cloud write to the same key still wins on both sides.
    s.device_write(0, "B", "x", false);
    settle(&mut s);
    let d0 = Owner::Device(s.devs[0].id.clone());
    s.cloud_write(d0, "B", "x", false);
    settle(&mut s);
    s.check_converged();
}
