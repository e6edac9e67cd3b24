//! One simulated device: its database (kept for the whole run, so a device that stops and
//! starts again keeps its cursor and outbox, as a real one keeps its file), its agent while it
//! is on, and what it still owes: up writes the cloud has not acknowledged, down writes and
//! broadcasts not applied yet, commands whose result is not acknowledged.
//!
//! Each of those is met from two sides (the write returning, the delivery being seen), in
//! whichever order they come: a delivery can be seen before the write that caused it has
//! returned to its caller, and then counts with a lag of zero.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use devtables_agent::{Agent, AgentConfig, AgentStatus};
use devtables_db::{Db, ItemChange, Origin};
use devtables_schema::ItemKey;
use serde_json::json;
use tokio::sync::{watch, RwLock};

use crate::stats::{Counters, Stats};

/// The model of up writes (sync up, one new item per write).
pub(crate) const UP_MODEL: &str = "Reading";
/// The model of down writes (a new item of the device per write).
pub(crate) const DOWN_MODEL: &str = "Setting";
/// The model of broadcasts.
pub(crate) const BROADCAST_MODEL: &str = "Firmware";
/// The command model, and the command every device answers.
pub(crate) const COMMAND_MODEL: &str = "Command";
pub(crate) const COMMAND_NAME: &str = "sim_ping";

/// Names and ids the simulator gives its items, with the sequence number they carry.
pub(crate) fn down_name(seq: u64) -> String {
    format!("dw{seq}")
}
pub(crate) fn broadcast_version(seq: u64) -> String {
    format!("b{seq}")
}
pub(crate) fn command_id(seq: u64) -> String {
    format!("c{seq}")
}
fn up_id(seq: u64) -> String {
    format!("u{seq}")
}

/// One side of a delivery seen before the other.
enum Mark {
    /// The write returned at this time; the delivery is awaited.
    Written(Instant),
    /// The delivery was seen at this time, before the write returned.
    Delivered,
}

/// What a device still owes, keyed by sequence number.
#[derive(Default)]
struct Owed {
    ups: HashMap<u64, Mark>,
    /// Up writes answered so far: delivery is at least once, so an entry sent again (after a
    /// reconnect or a restart) can be answered twice; the second answer must not count as
    /// another write acknowledged (it is counted in `up_acks_repeated`).
    ups_acked: HashSet<u64>,
    downs: HashMap<u64, Mark>,
    downs_applied: HashSet<u64>,
    commands: HashMap<u64, Mark>,
    broadcasts_applied: HashSet<u64>,
}

/// Meets one side of a delivery; returns the lag once both sides met.
fn meet(map: &mut HashMap<u64, Mark>, seq: u64, written: Option<Instant>) -> Option<Duration> {
    match (map.remove(&seq), written) {
        (Some(Mark::Written(at)), None) => Some(at.elapsed()),
        (Some(Mark::Delivered), Some(_)) => Some(Duration::ZERO),
        (None, Some(at)) => {
            map.insert(seq, Mark::Written(at));
            None
        }
        (None, None) => {
            map.insert(seq, Mark::Delivered);
            None
        }
        // The same side twice: keep the first, report nothing.
        (Some(first), _) => {
            map.insert(seq, first);
            None
        }
    }
}

fn pending(map: &HashMap<u64, Mark>) -> u64 {
    map.values()
        .filter(|m| matches!(m, Mark::Written(_)))
        .count() as u64
}

/// Counters of an agent's status that are summed over the agents a device ran (a new agent's
/// status starts at zero).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AgentCounts {
    pub(crate) rejected: u64,
    pub(crate) superseded: u64,
    pub(crate) throttled: u64,
    /// Pushes not answered within their retransmit timeout, sent again: not an error (nothing
    /// is lost), the device side of the cloud's copies.
    pub(crate) push_timeouts: u64,
    pub(crate) dropped: u64,
    pub(crate) publish_dropped: u64,
    pub(crate) inputs_missed: u64,
    pub(crate) disconnects: u64,
    pub(crate) resyncs: u64,
    pub(crate) command_results_abandoned: u64,
}

impl AgentCounts {
    fn of(s: &AgentStatus) -> AgentCounts {
        AgentCounts {
            rejected: s.rejected,
            superseded: s.superseded,
            throttled: s.throttled,
            push_timeouts: s.push_timeouts,
            dropped: s.dropped,
            publish_dropped: s.publish_dropped,
            inputs_missed: s.inputs_missed,
            disconnects: s.disconnects,
            resyncs: s.resyncs,
            command_results_abandoned: s.command_results_abandoned,
        }
    }

    pub(crate) fn add(&mut self, o: &AgentCounts) {
        self.rejected += o.rejected;
        self.superseded += o.superseded;
        self.throttled += o.throttled;
        self.push_timeouts += o.push_timeouts;
        self.dropped += o.dropped;
        self.publish_dropped += o.publish_dropped;
        self.inputs_missed += o.inputs_missed;
        self.disconnects += o.disconnects;
        self.resyncs += o.resyncs;
        self.command_results_abandoned += o.command_results_abandoned;
    }

    /// The errors by kind, as the report names them.
    pub(crate) fn kinds(&self) -> [(&'static str, u64); 8] {
        [
            ("device_rejected", self.rejected),
            ("device_superseded", self.superseded),
            ("device_throttled", self.throttled),
            ("device_dropped", self.dropped),
            ("device_publish_dropped", self.publish_dropped),
            ("device_inputs_missed", self.inputs_missed),
            ("connections_lost", self.disconnects),
            ("command_results_abandoned", self.command_results_abandoned),
        ]
    }
}

/// A device at one moment, for the progress line.
pub(crate) struct DeviceView {
    /// The cloud welcomed its current session.
    pub(crate) ready: bool,
    /// Its outbox, as its agent last reported it (0 while it is off).
    pub(crate) pending: u64,
    pub(crate) counts: AgentCounts,
}

/// What a device still owes, for the drain and the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Outstanding {
    pub(crate) ups: u64,
    pub(crate) downs: u64,
    pub(crate) commands: u64,
    pub(crate) broadcasts: u64,
    /// Its durable outbox (read from the database).
    pub(crate) outbox: u64,
}

impl Outstanding {
    pub(crate) fn add(&mut self, o: &Outstanding) {
        self.ups += o.ups;
        self.downs += o.downs;
        self.commands += o.commands;
        self.broadcasts += o.broadcasts;
        self.outbox += o.outbox;
    }

    pub(crate) fn is_zero(&self) -> bool {
        *self == Outstanding::default()
    }
}

pub(crate) struct SimDevice {
    pub(crate) name: String,
    db: Db,
    /// The agent while the device is on. Writers hold the read side for the length of a
    /// write, so a device never stops in the middle of one (a write after its agent stopped
    /// would bypass the outbox).
    agent: RwLock<Option<Agent>>,
    /// The running agent's status.
    status: Mutex<Option<watch::Receiver<AgentStatus>>>,
    /// Counts of the agents that ran before the current one.
    past: Mutex<AgentCounts>,
    owed: Mutex<Owed>,
    next_up: AtomicU64,
    stats: Arc<Stats>,
}

impl SimDevice {
    /// A device on `db`; its database hook (down writes and broadcasts applied) is installed
    /// now, for the whole run.
    pub(crate) fn new(name: String, db: Db, stats: Arc<Stats>) -> Arc<SimDevice> {
        let device = Arc::new(SimDevice {
            name,
            db,
            agent: RwLock::new(None),
            status: Mutex::new(None),
            past: Mutex::new(AgentCounts::default()),
            owed: Mutex::new(Owed::default()),
            next_up: AtomicU64::new(0),
            stats,
        });
        let weak = Arc::downgrade(&device);
        device.db.subscribe(Arc::new(move |change: &ItemChange| {
            if let Some(device) = weak.upgrade() {
                device.on_change(change);
            }
        }));
        device
    }

    fn owed(&self) -> std::sync::MutexGuard<'_, Owed> {
        self.owed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the device's agent (nothing if it runs already).
    pub(crate) async fn start(
        self: &Arc<Self>,
        config: AgentConfig,
    ) -> Result<(), devtables_agent::AgentError> {
        let mut slot = self.agent.write().await;
        if slot.is_some() {
            return Ok(());
        }
        let agent = Agent::start_with_db(config, self.db.clone())?;
        let weak = Arc::downgrade(self);
        agent.on_acked(Arc::new(move |entries| {
            if let Some(device) = weak.upgrade() {
                device.on_acked(entries);
            }
        }));
        let stats = Arc::downgrade(&self.stats);
        agent.on_rejected(Arc::new(move |model, _key, _reason| {
            if model == UP_MODEL {
                if let Some(stats) = stats.upgrade() {
                    Counters::inc(&stats.counters.up_rejected);
                }
            }
        }));
        let stats: Weak<Stats> = Arc::downgrade(&self.stats);
        agent.on_command(
            COMMAND_NAME,
            Arc::new(move |_item| {
                if let Some(stats) = stats.upgrade() {
                    Counters::inc(&stats.counters.commands_run);
                }
                Ok(json!({"pong": true}))
            }),
        );
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(agent.watch_status());
        *slot = Some(agent);
        Ok(())
    }

    /// Stops the device's agent (a clean stop: it says goodbye); its counts are kept.
    pub(crate) async fn stop(&self) {
        let mut slot = self.agent.write().await;
        let Some(agent) = slot.take() else {
            return;
        };
        let status = agent.watch_status();
        agent.shutdown().await;
        let last = AgentCounts::of(&status.borrow());
        self.past
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(&last);
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// One up write, if the device is on. Returns whether it was written.
    pub(crate) async fn write_up(&self) -> bool {
        let counters = &self.stats.counters;
        let on = self.agent.read().await;
        if on.is_none() {
            Counters::inc(&counters.up_skipped_offline);
            return false;
        }
        let seq = self.next_up.fetch_add(1, Ordering::Relaxed);
        let item = json!({"deviceId": self.name, "id": up_id(seq), "name": "temp", "value": (seq % 100) as f64})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let db = self.db.clone();
        let written = tokio::task::spawn_blocking(move || db.create(UP_MODEL, &item)).await;
        let now = Instant::now();
        drop(on);
        match written {
            Ok(Ok(_)) => {
                Counters::inc(&counters.up_written);
                let lag = meet(&mut self.owed().ups, seq, Some(now));
                if let Some(lag) = lag {
                    self.stats.up_lag.record(lag);
                }
                true
            }
            Ok(Err(e)) => {
                self.stats.errors.add("device_write_failed", 1);
                tracing::debug!(device = %self.name, "up write failed: {e}");
                false
            }
            Err(e) => {
                self.stats.errors.add("device_write_failed", 1);
                tracing::debug!(device = %self.name, "up write task failed: {e}");
                false
            }
        }
    }

    /// The API accepted down write `seq` for this device.
    pub(crate) fn down_written(&self, seq: u64, at: Instant) {
        if let Some(lag) = meet(&mut self.owed().downs, seq, Some(at)) {
            self.stats.down_lag.record(lag);
        }
    }

    /// The API accepted command `seq` for this device.
    pub(crate) fn command_written(&self, seq: u64, at: Instant) {
        if let Some(lag) = meet(&mut self.owed().commands, seq, Some(at)) {
            self.stats.command_lag.record(lag);
            Counters::inc(&self.stats.counters.commands_done);
        }
    }

    /// The cloud answered for outbox entries of this device.
    fn on_acked(&self, entries: &[(String, ItemKey, devtables_sync::hlc::Hlc)]) {
        let mut up_lags = Vec::new();
        let mut command_lags = Vec::new();
        {
            let mut owed = self.owed();
            for (model, key, _) in entries {
                if model == UP_MODEL {
                    let Some(seq) = seq_after(&key.sk, "reading#u") else {
                        continue;
                    };
                    if !owed.ups_acked.insert(seq) {
                        Counters::inc(&self.stats.counters.up_acks_repeated);
                        continue;
                    }
                    Counters::inc(&self.stats.counters.up_acked);
                    if let Some(lag) = meet(&mut owed.ups, seq, None) {
                        up_lags.push(lag);
                    }
                } else if model == COMMAND_MODEL {
                    let Some(seq) = seq_after(&key.sk, "command#c") else {
                        continue;
                    };
                    if let Some(lag) = meet(&mut owed.commands, seq, None) {
                        command_lags.push(lag);
                    }
                }
            }
        }
        for lag in up_lags {
            self.stats.up_lag.record(lag);
        }
        for lag in command_lags {
            self.stats.command_lag.record(lag);
            Counters::inc(&self.stats.counters.commands_done);
        }
    }

    /// A committed change of the device's database: down writes and broadcasts applied.
    fn on_change(&self, change: &ItemChange) {
        if change.origin != Origin::Remote {
            return;
        }
        let Some(item) = &change.new else { return };
        let counters = &self.stats.counters;
        if change.model == DOWN_MODEL {
            let Some(seq) = item
                .get("name")
                .and_then(|n| n.as_str())
                .and_then(|n| seq_after(n, "dw"))
            else {
                return;
            };
            let lag = {
                let mut owed = self.owed();
                if !owed.downs_applied.insert(seq) {
                    Counters::inc(&counters.down_duplicates);
                    return;
                }
                meet(&mut owed.downs, seq, None)
            };
            Counters::inc(&counters.down_applied);
            if let Some(lag) = lag {
                self.stats.down_lag.record(lag);
            }
        } else if change.model == BROADCAST_MODEL {
            let Some(seq) = item
                .get("version")
                .and_then(|n| n.as_str())
                .and_then(|n| seq_after(n, "b"))
            else {
                return;
            };
            if !self.owed().broadcasts_applied.insert(seq) {
                Counters::inc(&counters.broadcast_duplicates);
                return;
            }
            Counters::inc(&counters.broadcasts_applied);
            if let Some(sent) = self.stats.broadcast_sent(seq) {
                self.stats.broadcast_lag.record(sent.elapsed());
            } else {
                // Applied before the API's answer reached the simulator.
                self.stats.broadcast_lag.record(Duration::ZERO);
            }
        }
    }

    pub(crate) fn view(&self) -> DeviceView {
        let mut counts = *self.past.lock().unwrap_or_else(PoisonError::into_inner);
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        let (ready, pending) = match status.as_ref() {
            Some(rx) => {
                let s = rx.borrow();
                counts.add(&AgentCounts::of(&s));
                (s.ready, s.pending as u64)
            }
            None => (false, 0),
        };
        DeviceView {
            ready,
            pending,
            counts,
        }
    }

    /// Full resyncs the running agent finished (0 while the device is off).
    pub(crate) fn current_resyncs(&self) -> u64 {
        let status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        status.as_ref().map_or(0, |rx| rx.borrow().resyncs)
    }

    /// Whether the device's agent runs and the cloud welcomed it.
    pub(crate) fn is_ready(&self) -> bool {
        self.view().ready
    }

    /// What the device still owes; `broadcasts` are the broadcasts written so far.
    pub(crate) fn outstanding(&self, broadcasts: &[u64]) -> Outstanding {
        let outbox = match devtables_agent::outbox_len(&self.db) {
            Ok(n) => n,
            Err(e) => {
                self.stats.errors.add("device_read_failed", 1);
                tracing::debug!(device = %self.name, "cannot read the outbox: {e}");
                0
            }
        };
        let owed = self.owed();
        Outstanding {
            ups: pending(&owed.ups),
            downs: pending(&owed.downs),
            commands: pending(&owed.commands),
            broadcasts: broadcasts
                .iter()
                .filter(|b| !owed.broadcasts_applied.contains(b))
                .count() as u64,
            outbox,
        }
    }
}

/// The number after `prefix` in `s`, if `s` is `prefix` and digits.
fn seq_after(s: &str, prefix: &str) -> Option<u64> {
    s.strip_prefix(prefix)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_is_met_from_either_side_once() {
        let mut map = HashMap::new();
        let t = Instant::now();
        assert_eq!(meet(&mut map, 1, Some(t)), None);
        assert!(meet(&mut map, 1, None).is_some());
        assert!(map.is_empty());
        // Delivered before the write returned: a lag of zero.
        assert_eq!(meet(&mut map, 2, None), None);
        assert_eq!(pending(&map), 0, "a delivery alone owes nothing");
        assert_eq!(meet(&mut map, 2, Some(t)), Some(Duration::ZERO));
        // A write not delivered is owed.
        meet(&mut map, 3, Some(t));
        meet(&mut map, 3, Some(t));
        assert_eq!(pending(&map), 1);
    }

    #[test]
    fn sequence_numbers_come_back_from_keys_and_names() {
        assert_eq!(seq_after("reading#u42", "reading#u"), Some(42));
        assert_eq!(seq_after(&down_name(7), "dw"), Some(7));
        assert_eq!(seq_after("rm3", "dw"), None);
        assert_eq!(seq_after("dwx", "dw"), None);
    }
}
