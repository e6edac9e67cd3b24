//! `scale-out`'s broadcast figure: one write of an account-wide model (`Firmware`, delivered
//! to every device of the account) to an account of N registered devices, timed on the store
//! itself (`CloudStore::write`, the call behind `POST /v1/accounts/{a}/items/Firmware`, item
//! prepared as the API prepares it), then its fan-out: the write's transaction reaches the
//! first `fanout_batch` devices, and `CloudStore::fanout_step` the rest, a bounded transaction
//! each (what the service's fan-out task runs). The figure says how long the write holds the
//! store (it no longer grows with N), how long each step holds it, and how long until every
//! device's feed has the entry.
//!
//! The devices are registered through the trait first, grouped (untimed). Two broadcasts are
//! timed, the first and a second one: the second finds the store's caches warm. Between the
//! write and the last step every device must be reached exactly once, and the last device's
//! feed head must show both broadcasts.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use devtables_cloud::auth;
use devtables_schema::{Item, Schema};
use devtables_sync::apply::CloudOp;
use devtables_sync::hlc::{node_id_for, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::WireConfig;
use serde::Serialize;
use serde_json::json;

use super::scratch::{Scratch, StoreKind};
use crate::report::{short, thousands};

/// The account of the broadcasts.
const ACCOUNT: &str = "bcast";
/// Registrations per group while the devices are registered.
const REGISTER_GROUP: usize = 1000;

/// What one broadcast measurement found.
#[derive(Clone, Debug, Serialize)]
pub struct BroadcastFigure {
    pub store: &'static str,
    pub devices: usize,
    /// Seconds to register the devices (grouped, untimed in the figure).
    pub register_s: f64,
    /// The first broadcast's write transaction, in ms, and the second's.
    pub first_ms: f64,
    pub second_ms: f64,
    /// Fan-out steps after each write (the second broadcast's).
    pub steps: usize,
    /// The longest step of the second broadcast, in ms.
    pub max_step_ms: f64,
    /// From the second broadcast's write to its last step, in ms: every feed has the entry.
    pub settled_ms: f64,
    /// Feed entries each broadcast appended (one per device: the write's and the steps').
    pub feed_rows: usize,
}

fn now_ms() -> u64 {
    devtables_db::system_now_ms().max(0) as u64
}

/// Measures a broadcast to `devices` devices on a fresh store of `kind` (not on an async
/// runtime: the PostgreSQL client refuses one).
pub fn measure(
    kind: &StoreKind,
    devices: usize,
    schema: &Arc<Schema>,
) -> anyhow::Result<BroadcastFigure> {
    let scratch = Scratch::new(kind)?;
    let mut store = scratch.open()?;
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::new(ACCOUNT, format!("b{i:06}")))
        .collect::<Result<_, _>>()?;
    let hash = auth::hash_secret(&auth::generate_secret());
    let registering = Instant::now();
    for chunk in ids.chunks(REGISTER_GROUP) {
        store.begin_group()?;
        for id in chunk {
            store.register_device(id, &hash, None, now_ms())?;
        }
        store.commit_group()?;
    }
    let register_s = registering.elapsed().as_secs_f64();

    let head_before = match ids.last() {
        Some(last) => {
            store
                .device(last)?
                .with_context(|| format!("{last} is registered"))?
                .feed_head
        }
        None => 0,
    };
    let model = schema.model("Firmware").context("the Firmware model")?;
    let owner = Owner::Account(ACCOUNT.into());
    let max_message_bytes = WireConfig::default().max_message_bytes;
    let mut clock = HlcClock::new(node_id_for("devtables/bench/broadcast"));
    let mut times = Vec::new();
    let (mut feed_rows, mut steps, mut max_step_ms, mut settled_ms) = (0, 0, 0.0f64, 0.0);
    for version in ["2.0.0", "2.0.1"] {
        let input: Item =
            json!({"version": version, "url": format!("https://example.invalid/fw/{version}.bin")})
                .as_object()
                .cloned()
                .unwrap_or_default();
        let started = Instant::now();
        let now = now_ms();
        let item = model.prepare_create(&input, now as i64)?;
        let (_, advanced) = store
            .write(
                schema,
                &mut clock,
                now,
                max_message_bytes,
                &owner,
                "Firmware",
                CloudOp::Put(item),
            )
            .map_err(|e| anyhow::anyhow!("the broadcast write of {version}: {e}"))?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        let mut reached: std::collections::BTreeSet<DeviceId> =
            advanced.into_iter().map(|(d, _)| d).collect();
        let (written, mut rows) = (reached.len(), reached.len());
        (steps, max_step_ms) = (0, 0.0);
        loop {
            let step_started = Instant::now();
            let Some(step) = store.fanout_step()? else {
                break;
            };
            max_step_ms = max_step_ms.max(step_started.elapsed().as_secs_f64() * 1000.0);
            steps += usize::from(!step.is_empty());
            rows += step.len();
            reached.extend(step.into_iter().map(|(d, _)| d));
        }
        settled_ms = started.elapsed().as_secs_f64() * 1000.0;
        if reached.len() != devices || rows != devices {
            bail!(
                "the broadcast of {version} reached {} devices in {rows} feed entries ({written} \
                 in the write, {steps} steps), not the {devices} of the account once each",
                reached.len()
            );
        }
        feed_rows = rows;
    }
    // The last device's feed head moved by both broadcasts (a feed's first append may also
    // open a feed generation, so by at least two).
    if let Some(last) = ids.last() {
        let head = store
            .device(last)?
            .with_context(|| format!("{last} is registered"))?
            .feed_head;
        if head < head_before + 2 {
            bail!("the feed head of {last} went from {head_before} to {head} over two broadcasts");
        }
    }
    drop(store);
    Ok(BroadcastFigure {
        store: kind.label(),
        devices,
        register_s,
        first_ms: times[0],
        second_ms: times[1],
        steps,
        max_step_ms,
        settled_ms,
        feed_rows,
    })
}

/// The figures as a Markdown table.
pub fn table(figures: &[BroadcastFigure]) -> String {
    let mut r = String::from(
        "| Broadcast: one `Firmware` write to an account of N devices | store | the write's transaction: first / second | fan-out steps after it | longest step | write → every feed has it | feed rows written | registering the devices (untimed) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for b in figures {
        r.push_str(&format!(
            "| {} devices | {} | {} / {} ms | {} | {} ms | {} ms | {} | {} s |\n",
            thousands(b.devices as f64),
            b.store,
            short(b.first_ms),
            short(b.second_ms),
            b.steps,
            short(b.max_step_ms),
            short(b.settled_ms),
            thousands(b.feed_rows as f64),
            short(b.register_s)
        ));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../../../examples/schema.json5");

    #[test]
    fn a_broadcast_on_sqlite_reaches_every_feed() {
        let schema = Arc::new(Schema::from_json5(SCHEMA).unwrap());
        let devices = 2 * devtables_cloud::store::DEFAULT_FANOUT_BATCH + 30;
        let f = measure(&StoreKind::Sqlite, devices, &schema).unwrap();
        assert_eq!(f.devices, devices);
        assert_eq!(f.feed_rows, devices);
        assert_eq!(f.steps, 2, "two steps after the write's batch");
        assert!(f.first_ms > 0.0 && f.second_ms > 0.0 && f.settled_ms >= f.second_ms);
    }
}
