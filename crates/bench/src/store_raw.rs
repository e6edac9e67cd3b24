//! The ceiling of `db`'s grouped creates: the store the database is built on (the log engine,
//! `devtables-logstore`) written directly with the bytes devtables writes, in transactions of the
//! same size and durability.
//!
//! The item bytes are the database's own encoding of each workload item (prepared by the
//! schema, encoded by `devtables_db::fuzzing::encode_item`, the codec the database stores with),
//! under the database's key layout (`pk \0 sk`); they are built before the clock starts, so the
//! rate is the store's alone. Two variants: the model's items table only (the floor of any
//! database on this store), and the two tables devtables fills for this workload (the model's
//! items table and the secondary index `idx:gs1`). Commits are not durable, like devtables'
//! `periodic` mode, with a sync each [`crate::dt::PERIODIC_INTERVAL`] as its flusher does.
//! The spike (`spike.rs`) builds its rows here too.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use devtables_logstore::{LogOptions, LogStore};
use devtables_schema::Schema;

use crate::dt::PERIODIC_INTERVAL;
use crate::workload::{self as w, Metrics};

/// The tables the database fills for the workload's model and its index.
const ITEMS: &str = "items:Reading";
const GS1: &str = "idx:gs1";

/// One workload item as the database stores it (its key in each table, the format-2 model index
/// `types` included, for the spike), with its updated bytes.
pub(crate) struct Row {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The item after the workload's update (the spike's updates write it).
    pub updated: Vec<u8>,
    pub type_key: Vec<u8>,
    pub index_key: Vec<u8>,
}

fn join(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// The workload's first `n` items as the database stores them (prepared by the schema, encoded
/// by the database's own codec, keyed by its key layout), for the stores written directly here
/// and in the spike.
pub(crate) fn rows(n: usize) -> anyhow::Result<Vec<Row>> {
    let schema = Schema::from_json5(w::SCHEMA).context("bench schema")?;
    let model = schema.model(w::MODEL).context("model")?;
    let now = devtables_db::system_now_ms();
    (0..n)
        .map(|i| {
            let item = model.prepare_create(&w::input(i), now)?;
            let key = model.primary_key(&item)?;
            let updated = model.prepare_update(&item, &w::change(i), now + 1)?;
            let field = |f: &str| item.get(f).and_then(|v| v.as_str()).unwrap_or_default();
            Ok(Row {
                key: join(&[&key.pk, &key.sk]),
                value: devtables_db::fuzzing::encode_item(&item, &key),
                updated: devtables_db::fuzzing::encode_item(&updated, &key),
                type_key: join(&[w::MODEL, &key.pk, &key.sk]),
                index_key: join(&[field("gs1pk"), field("gs1sk"), &key.pk, &key.sk]),
            })
        })
        .collect()
}

/// Inserts `rows` grouped `w::GROUP` per transaction into a fresh file; returns items per
/// second (wall clock) and the on-CPU rate.
fn insert(path: &Path, rows: &[Row], with_indexes: bool) -> anyhow::Result<(f64, f64)> {
    let store = LogStore::open(path, LogOptions::default())
        .with_context(|| format!("create {}", path.display()))?;
    let clock = w::WorkloadClock::start();
    let mut last_flush = Instant::now();
    for chunk in rows.chunks(w::GROUP) {
        let mut tx = store.write()?;
        for r in chunk {
            tx.insert(ITEMS, &r.key, &r.value)?;
        }
        if with_indexes {
            for r in chunk {
                tx.insert(GS1, &r.index_key, &[])?;
            }
        }
        tx.commit(false)?;
        if last_flush.elapsed() >= PERIODIC_INTERVAL {
            // What devtables' periodic flusher does.
            store.sync()?;
            last_flush = Instant::now();
        }
    }
    let (wall, cpu) = (clock.wall(), clock.cpu());
    store.close()?;
    Ok((w::rate(rows.len(), wall), w::rate(rows.len(), cpu)))
}

/// Both variants on fresh files in `dir`, as metrics of the `store-raw` configuration.
pub fn grouped(dir: &Path, n: usize) -> anyhow::Result<Metrics> {
    let rows = rows(n)?;
    let mut m = Metrics::new();
    m.insert(
        "item_bytes".into(),
        rows.iter().map(|r| r.value.len()).sum::<usize>() as f64 / n.max(1) as f64,
    );
    let (wall, cpu) = insert(&dir.join("raw-items.log"), &rows, false)?;
    m.insert("raw_items_per_s".into(), wall);
    m.insert("raw_items_per_s_cpu".into(), cpu);
    let (wall, cpu) = insert(&dir.join("raw-two-tables.log"), &rows, true)?;
    m.insert("raw_tables_per_s".into(), wall);
    m.insert("raw_tables_per_s_cpu".into(), cpu);
    Ok(m)
}
