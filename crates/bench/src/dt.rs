//! The workload on devtables (`devtables-db` on its log store).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use devtables_db::{Db, DbOptions, Durability, FieldRef, FindOptions, ItemView, Origin};
use devtables_schema::{Item, Schema};
use serde_json::json;

use crate::sys;
use crate::workload::{self as w, Metrics, Progress};

/// How often the background thread makes periodic-mode commits durable.
pub const PERIODIC_INTERVAL: Duration = Duration::from_secs(1);

/// [`w::view_checksum`] of a view, read field by field (all eight visible fields).
fn view_checksum(view: &ItemView<'_>) -> anyhow::Result<u64> {
    let mut sum = 0;
    let mut fields = 0;
    for (name, value) in view.fields() {
        fields += 1;
        sum += match value {
            FieldRef::Str(s) => s.len() as u64,
            FieldRef::F64(f) => (f * 8.0) as u64,
            FieldRef::U64(n) => n * 8,
            FieldRef::Date(d) => u64::from(d.epoch_ms() > 0),
            other => anyhow::bail!("field {name}: unexpected {other:?}"),
        };
    }
    ensure!(fields == 8, "{fields} fields");
    Ok(sum)
}

fn schema() -> anyhow::Result<Arc<Schema>> {
    Ok(Arc::new(
        Schema::from_json5(w::SCHEMA).context("bench schema")?,
    ))
}

fn open(path: &Path, durability: Durability) -> anyhow::Result<Db> {
    let options = DbOptions {
        durability,
        ..DbOptions::default()
    };
    Ok(Db::open(path, schema()?, options)?)
}

fn props(v: serde_json::Value) -> Item {
    v.as_object().cloned().unwrap_or_default()
}

/// Steps 1-7 in periodic mode, writes grouped `w::GROUP` per transaction.
pub fn grouped(dir: &Path, n: usize) -> anyhow::Result<Metrics> {
    let mut m = Metrics::new();
    m.insert("rss_start_mib".into(), sys::vm_mib("VmHWM"));
    let path = dir.join("devtables.db");
    let db = open(
        &path,
        Durability::Periodic {
            interval: PERIODIC_INTERVAL,
        },
    )?;
    let label = |step: &str| format!("devtables N={n} {step}");

    // 1. creates, in the fastest form a user has: the input given away, only the key returned
    // (`create_owned`; `create` copies the input and returns the stored item).
    let mut p = Progress::new(label("create"), n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for start in (0..n).step_by(w::GROUP) {
        let end = (start + w::GROUP).min(n);
        db.write(Origin::Local, |tx| {
            for i in start..end {
                tx.create_owned(w::MODEL, w::input(i))?;
            }
            Ok(())
        })?;
        p.tick(end);
    }
    w::put(&mut m, "create_per_s", &t, |d| w::rate(n, d));
    let t = w::WorkloadClock::start();
    db.flush()?;
    w::put(&mut m, "flush_ms", &t, w::ms);
    m.insert("write_b_create".into(), written.per_item(n));
    m.insert("file_mib".into(), sys::file_mib(&path));
    m.insert("rss_after_create_mib".into(), sys::vm_mib("VmRSS"));

    // 2. gets in a shuffled order; the key properties are built per get (its cost is measured
    // on its own below).
    let mut rng = w::rng();
    let order = w::shuffled(n, &mut rng);
    let t = w::WorkloadClock::start();
    let mut sink = 0usize;
    for &i in &order {
        sink += w::key(i as usize).len();
    }
    w::put(&mut m, "key_build_ns", &t, |d| {
        d.as_nanos() as f64 / n as f64
    });
    ensure!(sink == 2 * n);

    // The CPU work of the schema and JSON alone, without storage (both engines do it): a
    // floor under the create and get rates.
    let model = db.schema().model(w::MODEL).context("model")?;
    let t = w::WorkloadClock::start();
    let mut bytes = Vec::new();
    for &i in &order {
        let item = model.prepare_create(&w::input(i as usize), 0)?;
        let key = model.primary_key(&item)?;
        bytes = serde_json::to_vec(&item)?;
        sink += key.sk.len();
    }
    w::put(&mut m, "floor_create_per_s", &t, |d| w::rate(n, d));
    let t = w::WorkloadClock::start();
    for &i in &order {
        let key = model.primary_key(&w::key(i as usize))?;
        let item: Item = serde_json::from_slice(&bytes)?;
        sink += key.sk.len() + model.project(&item, false).len();
    }
    w::put(&mut m, "floor_get_per_s", &t, |d| w::rate(n, d));
    ensure!(sink > 0);

    let mut p = Progress::new(label("get (snapshot each)"), n);
    let t = w::WorkloadClock::start();
    for (k, &i) in order.iter().enumerate() {
        let got = db.get(w::MODEL, &w::key(i as usize))?;
        ensure!(got.is_some(), "item {i} missing");
        p.tick(k + 1);
    }
    w::put(&mut m, "get_each_per_s", &t, |d| w::rate(n, d));

    let mut p = Progress::new(label("get (one ReadTxn)"), n);
    let t = w::WorkloadClock::start();
    {
        let r = db.read()?;
        for (k, &i) in order.iter().enumerate() {
            let got = r.get(w::MODEL, &w::key(i as usize), false)?;
            ensure!(got.is_some(), "item {i} missing");
            p.tick(k + 1);
        }
    }
    w::put(&mut m, "get_txn_per_s", &t, |d| w::rate(n, d));

    // The same gets into the caller's struct (`get_as`: no serde_json::Map per item).
    let mut p = Progress::new(label("get_as (snapshot each)"), n);
    let t = w::WorkloadClock::start();
    for (k, &i) in order.iter().enumerate() {
        let got: Option<w::Reading> = db.get_as(w::MODEL, &w::key(i as usize))?;
        ensure!(got.is_some_and(|r| r.id.len() == 8), "item {i} missing");
        p.tick(k + 1);
    }
    w::put(&mut m, "get_as_each_per_s", &t, |d| w::rate(n, d));
    let t = w::WorkloadClock::start();
    {
        let r = db.read()?;
        for &i in &order {
            let got: Option<w::Reading> = r.get_as(w::MODEL, &w::key(i as usize), false)?;
            ensure!(got.is_some(), "item {i} missing");
        }
    }
    w::put(&mut m, "get_as_txn_per_s", &t, |d| w::rate(n, d));

    // The same gets as borrowed views (`get_view`: the record copied once, no map), every
    // visible field read into a checksum.
    let expected: u64 = order.iter().map(|&i| w::view_checksum(i as usize)).sum();
    let mut sum = 0u64;
    let t = w::WorkloadClock::start();
    for &i in &order {
        let view = db.get_view(w::MODEL, &w::key(i as usize))?;
        sum += view_checksum(&view.with_context(|| format!("item {i} missing"))?)?;
    }
    w::put(&mut m, "get_view_each_per_s", &t, |d| w::rate(n, d));
    ensure!(sum == expected, "view checksum {sum}, expected {expected}");
    let mut sum = 0u64;
    let t = w::WorkloadClock::start();
    {
        let r = db.read()?;
        for &i in &order {
            let view = r.get_view(w::MODEL, &w::key(i as usize), false)?;
            sum += view_checksum(&view.with_context(|| format!("item {i} missing"))?)?;
        }
    }
    w::put(&mut m, "get_view_txn_per_s", &t, |d| w::rate(n, d));
    ensure!(sum == expected, "view checksum {sum}, expected {expected}");
    // The key as text pairs (`get_view_by`): no item built per get, the key rendered on the
    // stack.
    let mut key = w::KeyText::default();
    let mut sum = 0u64;
    let t = w::WorkloadClock::start();
    for &i in &order {
        key.set(i as usize);
        let view = db.get_view_by(w::MODEL, &key.pairs())?;
        sum += view_checksum(&view.with_context(|| format!("item {i} missing"))?)?;
    }
    w::put(&mut m, "get_view_by_each_per_s", &t, |d| w::rate(n, d));
    ensure!(sum == expected, "view checksum {sum}, expected {expected}");

    // 3. sort-key prefix finds
    let queries = w::prefix_queries(n, &mut rng);
    let mut items = 0usize;
    let t = w::WorkloadClock::start();
    for (device, prefix, expected) in &queries {
        let page = db.find(
            w::MODEL,
            &props(json!({"deviceId": device, "sk": {"begins": prefix}})),
            &FindOptions::default(),
        )?;
        ensure!(
            page.items.len() == *expected,
            "prefix {prefix}: {} items",
            page.items.len()
        );
        items += page.items.len();
    }
    w::put(&mut m, "prefix_find_us", &t, |d| {
        d.as_secs_f64() * 1e6 / queries.len() as f64
    });
    m.insert("prefix_items".into(), items as f64 / queries.len() as f64);

    // 4. status == fault: through gs1, then as a filter over a model scan
    let fault = props(json!({"status": "fault"}));
    let by_index = FindOptions {
        index: Some("gs1".into()),
        ..FindOptions::default()
    };
    let expected = w::faults(n);
    let t = w::WorkloadClock::start();
    for _ in 0..w::FILTER_QUERIES {
        let page = db.find(w::MODEL, &fault, &by_index)?;
        ensure!(
            page.items.len() == expected,
            "gs1 find: {} items",
            page.items.len()
        );
    }
    w::put(&mut m, "index_find_ms", &t, |d| {
        w::ms(d) / w::FILTER_QUERIES as f64
    });
    m.insert("filter_items".into(), expected as f64);
    let t = w::WorkloadClock::start();
    for _ in 0..w::FILTER_QUERIES {
        let page = db.find_as::<w::Reading>(w::MODEL, &fault, &by_index)?;
        ensure!(
            page.items.len() == expected,
            "gs1 find_as: {} items",
            page.items.len()
        );
    }
    w::put(&mut m, "index_find_as_ms", &t, |d| {
        w::ms(d) / w::FILTER_QUERIES as f64
    });

    let mut p = Progress::new(label("filter scan"), w::FILTER_QUERIES);
    let t = w::WorkloadClock::start();
    for q in 0..w::FILTER_QUERIES {
        let page = db.find(w::MODEL, &fault, &FindOptions::default())?;
        ensure!(
            page.items.len() == expected,
            "scan find: {} items",
            page.items.len()
        );
        p.tick((q + 1) * 256);
    }
    w::put(&mut m, "scan_find_ms", &t, |d| {
        w::ms(d) / w::FILTER_QUERIES as f64
    });

    // 5. updates in a shuffled order
    let order = w::shuffled(n, &mut rng);
    let mut p = Progress::new(label("update"), n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for (c, chunk) in order.chunks(w::GROUP).enumerate() {
        db.write(Origin::Local, |tx| {
            for &i in chunk {
                tx.update(w::MODEL, &w::change(i as usize), false)?;
            }
            Ok(())
        })?;
        p.tick((c + 1) * w::GROUP);
    }
    w::put(&mut m, "update_per_s", &t, |d| w::rate(n, d));
    db.flush()?; // untimed: what reaches the disk for the updates
    m.insert("write_b_update".into(), written.per_item(n));

    // 6. removes in a shuffled order
    let order = w::shuffled(n, &mut rng);
    let mut p = Progress::new(label("remove"), n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for (c, chunk) in order.chunks(w::GROUP).enumerate() {
        db.write(Origin::Local, |tx| {
            for &i in chunk {
                let gone = tx.remove(w::MODEL, &w::key(i as usize))?;
                if gone.is_none() {
                    return Err(devtables_db::DbError::NotFound {
                        model: w::MODEL.into(),
                        key: w::id(i as usize),
                    });
                }
            }
            Ok(())
        })?;
        p.tick((c + 1) * w::GROUP);
    }
    w::put(&mut m, "remove_per_s", &t, |d| w::rate(n, d));
    db.close()?;
    m.insert("write_b_remove".into(), written.per_item(n));

    // 7. peak RSS of this process
    m.insert("peak_rss_mib".into(), sys::vm_mib("VmHWM"));
    Ok(m)
}

/// Immediate mode: one durable commit per create from one writer, on a fresh file.
pub fn immediate_one(dir: &Path, n: usize, m: &mut Metrics) -> anyhow::Result<()> {
    let db = open(&dir.join("devtables-imm1.db"), Durability::Immediate)?;
    let mut p = Progress::new("devtables immediate, 1 writer", n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for i in 0..n {
        db.create(w::MODEL, &w::input(i))?;
        p.tick(i + 1);
    }
    w::put(m, "dt_imm_1w_per_s", &t, |d| w::rate(n, d));
    db.close()?;
    m.insert("dt_imm_1w_write_b".into(), written.per_item(n));
    Ok(())
}

/// Periodic mode, one create per transaction (a device writing readings one at a time), then
/// made durable: the bytes written to disk per item (`write_b`), beside `immediate`'s.
pub fn periodic_one(dir: &Path, n: usize, m: &mut Metrics) -> anyhow::Result<()> {
    let db = open(
        &dir.join("devtables-per1.db"),
        Durability::Periodic {
            interval: PERIODIC_INTERVAL,
        },
    )?;
    let mut p = Progress::new("devtables periodic, 1 writer", n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for i in 0..n {
        db.create(w::MODEL, &w::input(i))?;
        p.tick(i + 1);
    }
    db.flush()?;
    w::put(m, "dt_per_1w_per_s", &t, |d| w::rate(n, d));
    db.close()?;
    m.insert("dt_per_1w_write_b".into(), written.per_item(n));
    Ok(())
}

/// Immediate mode: one durable commit per create from `writers` concurrent writer threads
/// (group commit), on a fresh file.
pub fn immediate_many(dir: &Path, n: usize, writers: usize, m: &mut Metrics) -> anyhow::Result<()> {
    let db = open(&dir.join("devtables-imm8.db"), Durability::Immediate)?;
    eprintln!("  .. devtables immediate, {writers} writers");
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..writers)
            .map(|k| {
                let db = &db;
                s.spawn(move || -> anyhow::Result<()> {
                    for i in (k..n).step_by(writers) {
                        db.create(w::MODEL, &w::input(i))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        }
        Ok(())
    })?;
    w::put(m, "dt_imm_nw_per_s", &t, |d| w::rate(n, d));
    let count = db.read()?.scan_model(w::MODEL)?.len();
    ensure!(count == n, "{count} items after concurrent creates");
    db.close()?;
    m.insert("dt_imm_nw_write_b".into(), written.per_item(n));
    Ok(())
}
