//! `wire`: bytes per synced item in the wire's JSON and in the binary encodings
//! a compact mode could use (CBOR, MessagePack), and with a generic compressor, measured on the
//! same pushes.
//!
//! The issue behind it: a compact encoding is worth negotiating in `hello` only if it at least
//! halves the bytes of a synced item. The pushes are built as the agent builds them: items
//! stored by the real device database on the example schema and taken as the agent takes them,
//! from the write transaction's change records (so they carry the fields the database adds:
//! the pk/sk key fields, `_type`, `created`, `updated`), one change per item with a version
//! from the real clock, wrapped in the real envelope by `wire::encode_up`. Every encoding
//! serializes the same serde value, so the difference is the encoding alone. `sync`'s ceiling
//! publishes pushes built the same way (`push_payloads`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context;
use devtables_db::{Db, DbError, DbOptions, ItemChange, Origin, SideTables, WriteInterceptor};
use devtables_schema::{Item, Schema};
use devtables_sync::hlc::HlcClock;
use devtables_sync::wire::{self, Change, Op, UpMsg, WireConfig};
use serde_json::json;

const SCHEMA: &str = include_str!("../../../examples/schema.json5");

#[derive(clap::Args, Debug)]
pub struct WireArgs {
    /// Pushes per batch size measured (their sizes are averaged).
    #[arg(long, default_value_t = 50)]
    pushes: usize,
    /// Batch sizes: changes per push.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 10, 185])]
    batch: Vec<usize>,
    /// A short run for CI: few pushes, no timing claims.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One encoding of a message: its name and the bytes of the message.
type Encoder = fn(&serde_json::Value) -> anyhow::Result<Vec<u8>>;

fn json_bytes(v: &serde_json::Value) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

fn cbor_bytes(v: &serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out)?;
    Ok(out)
}

fn msgpack_bytes(v: &serde_json::Value) -> anyhow::Result<Vec<u8>> {
    Ok(rmp_serde::to_vec_named(v)?)
}

fn deflate_json_bytes(v: &serde_json::Value) -> anyhow::Result<Vec<u8>> {
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&serde_json::to_vec(v)?)?;
    Ok(z.finish()?)
}

const ENCODERS: [(&str, Encoder); 4] = [
    ("JSON (the wire today)", json_bytes),
    ("CBOR", cbor_bytes),
    ("MessagePack (named fields)", msgpack_bytes),
    ("JSON + DEFLATE", deflate_json_bytes),
];

/// Readings stored by the real device database, as a device writes them.
fn stored_readings(schema: &Arc<Schema>, n: usize) -> anyhow::Result<Vec<Item>> {
    stored_items(
        schema,
        "Reading",
        (0..n).map(|i| {
            item(json!({"deviceId": "gw-0001", "name": "temperature", "value": 20.0 + (i % 97) as f64 / 10.0}))
        }),
    )
}

fn item(v: serde_json::Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

/// Collects the items of every change in the write transaction, as the agent's interceptor
/// sees them (the whole stored item, hidden key fields included: what a push carries).
#[derive(Default)]
struct Capture(Mutex<Vec<Item>>);

impl WriteInterceptor for Capture {
    fn on_change(&self, _side: &mut SideTables<'_>, change: &ItemChange) -> Result<(), DbError> {
        if let Some(item) = &change.new {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(item.clone());
        }
        Ok(())
    }
}

/// `inputs` created in `model` by the real device database (in a scratch file), as a push
/// carries them: with the keys, timestamps and generated fields the database adds.
pub fn stored_items(
    schema: &Arc<Schema>,
    model: &str,
    inputs: impl Iterator<Item = Item>,
) -> anyhow::Result<Vec<Item>> {
    let dir = tempfile::tempdir()?;
    let db = Db::open(
        dir.path().join("wire.db"),
        schema.clone(),
        DbOptions::default(),
    )?;
    let capture = Arc::new(Capture::default());
    db.set_interceptor(Some(capture.clone()));
    db.write(Origin::Local, |t| {
        for input in inputs {
            t.create(model, &input)?;
        }
        Ok(())
    })?;
    db.set_interceptor(None);
    let items = std::mem::take(&mut *capture.0.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(items)
}

/// One change per stored item, as the agent sends it: the key, the item, a version from the
/// real clock.
pub(crate) fn changes_of(
    schema: &Schema,
    model_name: &str,
    items: Vec<Item>,
) -> anyhow::Result<Vec<Change>> {
    let model = schema
        .model(model_name)
        .with_context(|| format!("the {model_name} model"))?;
    let mut clock = HlcClock::new(0x79fd_066c_7f20_d19a);
    let now = devtables_db::system_now_ms().max(0) as u64;
    items
        .into_iter()
        .map(|item| -> anyhow::Result<Change> {
            let key = model.primary_key(&item)?;
            Ok(Change {
                model: model_name.into(),
                key,
                op: Op::Put,
                item: Some(item),
                version: clock.tick(now)?,
                base: None,
            })
        })
        .collect()
}

/// The push messages (the wire's JSON, real envelope) an agent sends for `items` of `model`,
/// `per_push` changes per message.
pub fn push_payloads(
    schema: &Schema,
    model: &str,
    items: Vec<Item>,
    per_push: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let cfg = WireConfig::default();
    changes_of(schema, model, items)?
        .chunks(per_push.max(1))
        .enumerate()
        .map(|(i, c)| {
            let msg = UpMsg::Push {
                batch: i as u64,
                changes: c.to_vec(),
                // The agent sends its session with every push.
                session: Some(1),
            };
            Ok(wire::encode_up(schema.version(), &msg, &cfg)?)
        })
        .collect()
}

struct Row {
    encoding: &'static str,
    batch: usize,
    bytes_per_item: f64,
    ratio: f64,
    encode_us_per_item: f64,
}

pub fn run(args: &WireArgs) -> anyhow::Result<()> {
    let pushes = if args.quick { 3 } else { args.pushes.max(1) };
    let largest = args.batch.iter().copied().max().unwrap_or(1).max(1);
    let schema = Arc::new(Schema::from_json5(SCHEMA).context("the example schema")?);
    let items = stored_readings(&schema, largest * pushes)?;
    let changes = changes_of(&schema, "Reading", items)?;

    let cfg = WireConfig::default();
    let mut rows = Vec::new();
    for &batch in &args.batch {
        let batch = batch.max(1);
        // Each push as the wire envelope, parsed back to a serde value every encoding takes.
        let messages: Vec<serde_json::Value> = changes
            .chunks(batch)
            .take(pushes)
            .enumerate()
            .map(|(i, c)| -> anyhow::Result<serde_json::Value> {
                let msg = UpMsg::Push {
                    batch: i as u64,
                    changes: c.to_vec(),
                    session: None,
                };
                Ok(serde_json::from_slice(&wire::encode_up(
                    "1.0.0", &msg, &cfg,
                )?)?)
            })
            .collect::<anyhow::Result<_>>()?;
        let n_items: usize = changes
            .chunks(batch)
            .take(pushes)
            .map(<[Change]>::len)
            .sum();
        let mut json_per_item = f64::NAN;
        for (name, encode) in ENCODERS {
            let started = Instant::now();
            let mut total = 0usize;
            for m in &messages {
                total += encode(m)?.len();
            }
            let per_item = total as f64 / n_items as f64;
            if json_per_item.is_nan() {
                json_per_item = per_item;
            }
            rows.push(Row {
                encoding: name,
                batch,
                bytes_per_item: per_item,
                ratio: per_item / json_per_item,
                encode_us_per_item: started.elapsed().as_secs_f64() * 1e6 / n_items as f64,
            });
        }
    }

    println!("| changes per push | encoding | bytes per item | vs JSON | encode µs/item |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} |",
            r.batch, r.encoding, r.bytes_per_item, r.ratio, r.encode_us_per_item
        );
    }
    if let Some(path) = &args.json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "batch": r.batch,
                    "encoding": r.encoding,
                    "bytes_per_item": r.bytes_per_item,
                    "ratio_to_json": r.ratio,
                    "encode_us_per_item": r.encode_us_per_item,
                })
            })
            .collect();
        crate::report::write_json(
            path,
            &json!({
                "bench": "wire",
                "command": if args.quick { "devtables bench wire --quick".to_string() } else {
                    format!("devtables bench wire --pushes {pushes} --batch {}",
                        args.batch.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","))
                },
                "machine": crate::sys::machine_line(),
                "quick": args.quick,
                "rows": out,
            }),
        )?;
    }
    Ok(())
}
