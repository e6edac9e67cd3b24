//! The ceiling of `scale-out`'s up-sync figures: the raw batch insert rate of each store, the
//! `CloudStore` trait called directly with no MQTT, engine or service around it.
//!
//! Each writer (a thread with its own connection; several only on PostgreSQL, SQLite has one
//! writer) registers its devices, then applies pushes of `batch` new `Reading` changes from
//! them (`apply_push`, the call the sync loop's store job makes, with the service's push
//! rules), `group` pushes per commit as the store thread's group commit does under load
//! (`begin_group` … `commit_group`; 1: every push commits alone). The changes are built before
//! the clock starts, as a device builds them: items stored by the real device database, one
//! version each. The clock runs from the writers' common start to the last commit, and every
//! change must be answered `applied`.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devtables_cloud::auth;
use devtables_cloud::store::CloudStore;
use devtables_schema::{Item, Schema};
use devtables_sync::apply::PushRules;
use devtables_sync::hlc::{node_id_for, HlcClock};
use devtables_sync::identity::DeviceId;
use devtables_sync::wire::{Change, ChangeStatus};
use serde::Serialize;
use serde_json::json;

use super::scratch::{Scratch, StoreKind};

/// Devices each writer pushes from (their pushes alternate).
const DEVICES_PER_WRITER: usize = 8;

/// One measurement.
#[derive(Clone, Debug)]
pub struct RateSpec {
    pub store: StoreKind,
    /// Concurrent writers (1 for SQLite).
    pub writers: usize,
    /// Changes each writer applies.
    pub items_per_writer: usize,
    /// Changes per push.
    pub batch: usize,
    /// Pushes per commit.
    pub group: usize,
}

/// What it measured.
#[derive(Clone, Debug, Serialize)]
pub struct RateFigure {
    pub store: &'static str,
    pub writers: usize,
    pub batch: usize,
    pub group: usize,
    pub items: usize,
    pub commits: usize,
    pub seconds: f64,
    pub items_per_s: f64,
}

/// The pushes of one writer: per push, its device and changes.
type Pushes = Vec<(DeviceId, Vec<Change>)>;

/// `n` readings of `device` as it stores and pushes them.
fn readings(schema: &Arc<Schema>, device: &DeviceId, n: usize) -> anyhow::Result<Vec<Change>> {
    let name = device.device.clone();
    let items = crate::wire::stored_items(
        schema,
        "Reading",
        (0..n).map(|i| -> Item {
            json!({"deviceId": name, "name": "temperature", "value": 20.0 + (i % 97) as f64 / 10.0})
                .as_object()
                .cloned()
                .unwrap_or_default()
        }),
    )?;
    crate::wire::changes_of(schema, "Reading", items)
}

/// Writer `w`'s devices and pushes: `items` changes in pushes of `batch`, the devices taking
/// turns.
fn pushes_of(
    schema: &Arc<Schema>,
    w: usize,
    items: usize,
    batch: usize,
) -> anyhow::Result<(Vec<DeviceId>, Pushes)> {
    let devices: Vec<DeviceId> = (0..DEVICES_PER_WRITER)
        .map(|d| DeviceId::new("rawbench", format!("w{w}-d{d}")))
        .collect::<Result<_, _>>()?;
    let per_device = items.div_ceil(DEVICES_PER_WRITER);
    let mut chunks: Vec<Vec<Vec<Change>>> = Vec::with_capacity(devices.len());
    let mut left = items;
    for device in &devices {
        let n = per_device.min(left);
        left -= n;
        chunks.push(
            readings(schema, device, n)?
                .chunks(batch.max(1))
                .map(<[Change]>::to_vec)
                .collect(),
        );
    }
    // Round robin over the devices, as many devices pushing at once do.
    let mut pushes = Pushes::new();
    let most = chunks.iter().map(Vec::len).max().unwrap_or(0);
    for k in 0..most {
        for (device, c) in devices.iter().zip(&chunks) {
            if let Some(changes) = c.get(k) {
                pushes.push((device.clone(), changes.clone()));
            }
        }
    }
    Ok((devices, pushes))
}

fn now_ms() -> u64 {
    devtables_db::system_now_ms().max(0) as u64
}

/// One writer's timed part: `(started, ended, commits)`.
fn write_all(
    store: &mut dyn CloudStore,
    schema: &Schema,
    rules: &PushRules,
    clock: &mut HlcClock,
    pushes: &Pushes,
    group: usize,
    start: &Barrier,
) -> anyhow::Result<(Instant, Instant, usize)> {
    start.wait();
    let started = Instant::now();
    let mut commits = 0;
    for chunk in pushes.chunks(group.max(1)) {
        if group > 1 {
            store.begin_group()?;
        }
        for (device, changes) in chunk {
            let (results, _) = store
                .apply_push(schema, clock, now_ms(), rules, device, changes)
                .with_context(|| format!("apply_push from {device}"))?;
            if results.len() != changes.len()
                || results
                    .iter()
                    .any(|r| !matches!(r.status, ChangeStatus::Applied))
            {
                bail!("a push from {device} was not applied whole: {results:?}");
            }
        }
        if group > 1 {
            store.commit_group()?;
        }
        commits += if group > 1 { 1 } else { chunk.len() };
    }
    Ok((started, Instant::now(), commits))
}

/// Runs one measurement on a fresh store (not on an async runtime: the PostgreSQL client
/// refuses one).
pub fn measure(spec: &RateSpec, schema: &Arc<Schema>) -> anyhow::Result<RateFigure> {
    if matches!(spec.store, StoreKind::Sqlite) && spec.writers != 1 {
        bail!("SQLite has one writer");
    }
    let writers = spec.writers.max(1);
    let scratch = Scratch::new(&spec.store)?;
    let rules = PushRules {
        max_drift_ms: scratch.max_drift_ms(),
        from_neighbour: false,
        cloud_schema: schema.tag().to_string(),
    };
    let mut work = Vec::with_capacity(writers);
    for w in 0..writers {
        work.push(pushes_of(schema, w, spec.items_per_writer, spec.batch)?);
    }
    let start = Barrier::new(writers);
    let outcomes: Vec<anyhow::Result<(Instant, Instant, usize)>> = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .enumerate()
            .map(|(w, (devices, pushes))| {
                let (scratch, rules, start) = (&scratch, &rules, &start);
                s.spawn(move || {
                    let prepared = (|| {
                        let mut store = scratch.open()?;
                        let hash = auth::hash_secret(&auth::generate_secret());
                        for d in devices {
                            store.register_device(d, &hash, None, now_ms())?;
                        }
                        anyhow::Ok(store)
                    })();
                    // Every writer reaches the barrier, ready or not, so none waits forever.
                    let mut store = match prepared {
                        Ok(store) => store,
                        Err(e) => {
                            start.wait();
                            return Err(e);
                        }
                    };
                    let mut clock = HlcClock::new(node_id_for(&format!("devtables/bench/raw-{w}")));
                    write_all(
                        store.as_mut(),
                        schema,
                        rules,
                        &mut clock,
                        pushes,
                        spec.group,
                        start,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a writer thread panicked")))
            })
            .collect()
    });
    let mut first = None::<Instant>;
    let mut last = None::<Instant>;
    let mut commits = 0;
    for outcome in outcomes {
        let (s, e, c) = outcome?;
        first = Some(first.map_or(s, |f| f.min(s)));
        last = Some(last.map_or(e, |l| l.max(e)));
        commits += c;
    }
    let seconds = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f),
        _ => Duration::ZERO,
    }
    .as_secs_f64();
    let items: usize = work
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, c)| c.len()))
        .sum();
    Ok(RateFigure {
        store: spec.store.label(),
        writers,
        batch: spec.batch,
        group: spec.group,
        items,
        commits,
        seconds,
        items_per_s: crate::report::ratio(items as f64, seconds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../../../examples/schema.json5");

    #[test]
    fn pushes_cover_every_item_once_in_batches_taking_turns() {
        let schema = Arc::new(Schema::from_json5(SCHEMA).unwrap());
        let (devices, pushes) = pushes_of(&schema, 1, 50, 4).unwrap();
        assert_eq!(devices.len(), DEVICES_PER_WRITER);
        let total: usize = pushes.iter().map(|(_, c)| c.len()).sum();
        assert_eq!(total, 50);
        assert!(pushes.iter().all(|(_, c)| (1..=4).contains(&c.len())));
        // The first pushes come from different devices.
        assert_ne!(pushes[0].0, pushes[1].0);
        // Every change is of its pushing device.
        for (device, changes) in &pushes {
            for c in changes {
                let item = c.item.as_ref().unwrap();
                assert_eq!(item["deviceId"], device.device.as_str());
            }
        }
    }

    #[test]
    fn sqlite_pushes_are_all_applied_and_counted() {
        let schema = Arc::new(Schema::from_json5(SCHEMA).unwrap());
        let spec = RateSpec {
            store: StoreKind::Sqlite,
            writers: 1,
            items_per_writer: 40,
            batch: 5,
            group: 4,
        };
        let f = measure(&spec, &schema).unwrap();
        assert_eq!(f.items, 40);
        // 8 pushes of 5 changes, 4 per commit.
        assert_eq!(f.commits, 2);
        assert!(f.items_per_s > 0.0);
        let alone = measure(&RateSpec { group: 1, ..spec }, &schema).unwrap();
        assert_eq!(alone.commits, 8);
    }

    #[test]
    fn sqlite_refuses_a_second_writer() {
        let schema = Arc::new(Schema::from_json5(SCHEMA).unwrap());
        let spec = RateSpec {
            store: StoreKind::Sqlite,
            writers: 2,
            items_per_writer: 4,
            batch: 1,
            group: 1,
        };
        assert!(measure(&spec, &schema).is_err());
    }
}
