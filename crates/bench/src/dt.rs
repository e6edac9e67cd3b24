//! The workload on devtables (`devtables-db` on redb).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use devtables_db::{Db, DbOptions, Durability, FindOptions, Origin};
use devtables_schema::{Item, Schema};
use serde_json::json;

use crate::sys;
use crate::workload::{self as w, Metrics, Progress};

/// How often the background thread makes periodic-mode commits durable.
pub const PERIODIC_INTERVAL: Duration = Duration::from_secs(1);

fn schema() -> anyhow::Result<Arc<Schema>> {
    Ok(Arc::new(Schema::from_json5(w::SCHEMA).context("bench schema")?))
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
    let path = dir.join("devtables.redb");
    let db = open(
        &path,
        Durability::Periodic {
            interval: PERIODIC_INTERVAL,
        },
    )?;
    let label = |step: &str| format!("devtables N={n} {step}");

    // 1. creates
    let mut p = Progress::new(label("create"), n);
    let t = Instant::now();
    for start in (0..n).step_by(w::GROUP) {
        let end = (start + w::GROUP).min(n);
        db.write(Origin::Local, |tx| {
            for i in start..end {
                tx.create(w::MODEL, &w::input(i))?;
            }
            Ok(())
        })?;
        p.tick(end);
    }
    m.insert("create_per_s".into(), w::rate(n, t.elapsed()));
    let t = Instant::now();
    db.flush()?;
    m.insert("flush_ms".into(), w::ms(t.elapsed()));
    m.insert("file_mib".into(), sys::file_mib(&path));
    m.insert("rss_after_create_mib".into(), sys::vm_mib("VmRSS"));

    // 2. gets in a shuffled order; the key properties are built per get (its cost is measured
    // on its own below).
    let mut rng = w::rng();
    let order = w::shuffled(n, &mut rng);
    let t = Instant::now();
    let mut sink = 0usize;
    for &i in &order {
        sink += w::key(i as usize).len();
    }
    m.insert("key_build_ns".into(), t.elapsed().as_nanos() as f64 / n as f64);
    ensure!(sink == 2 * n);

    let mut p = Progress::new(label("get (snapshot each)"), n);
    let t = Instant::now();
    for (k, &i) in order.iter().enumerate() {
        let got = db.get(w::MODEL, &w::key(i as usize))?;
        ensure!(got.is_some(), "item {i} missing");
        p.tick(k + 1);
    }
    m.insert("get_each_per_s".into(), w::rate(n, t.elapsed()));

    let mut p = Progress::new(label("get (one ReadTxn)"), n);
    let t = Instant::now();
    {
        let r = db.read()?;
        for (k, &i) in order.iter().enumerate() {
            let got = r.get(w::MODEL, &w::key(i as usize), false)?;
            ensure!(got.is_some(), "item {i} missing");
            p.tick(k + 1);
        }
    }
    m.insert("get_txn_per_s".into(), w::rate(n, t.elapsed()));

    // 3. sort-key prefix finds
    let queries = w::prefix_queries(n, &mut rng);
    let mut items = 0usize;
    let t = Instant::now();
    for (device, prefix, expected) in &queries {
        let page = db.find(
            w::MODEL,
            &props(json!({"deviceId": device, "sk": {"begins": prefix}})),
            &FindOptions::default(),
        )?;
        ensure!(page.items.len() == *expected, "prefix {prefix}: {} items", page.items.len());
        items += page.items.len();
    }
    m.insert("prefix_find_us".into(), t.elapsed().as_secs_f64() * 1e6 / queries.len() as f64);
    m.insert("prefix_items".into(), items as f64 / queries.len() as f64);

    // 4. status == fault: through gs1, then as a filter over a model scan
    let fault = props(json!({"status": "fault"}));
    let by_index = FindOptions {
        index: Some("gs1".into()),
        ..FindOptions::default()
    };
    let expected = w::faults(n);
    let t = Instant::now();
    for _ in 0..w::FILTER_QUERIES {
        let page = db.find(w::MODEL, &fault, &by_index)?;
        ensure!(page.items.len() == expected, "gs1 find: {} items", page.items.len());
    }
    m.insert("index_find_ms".into(), w::ms(t.elapsed()) / w::FILTER_QUERIES as f64);
    m.insert("filter_items".into(), expected as f64);

    let mut p = Progress::new(label("filter scan"), w::FILTER_QUERIES);
    let t = Instant::now();
    for q in 0..w::FILTER_QUERIES {
        let page = db.find(w::MODEL, &fault, &FindOptions::default())?;
        ensure!(page.items.len() == expected, "scan find: {} items", page.items.len());
        p.tick((q + 1) * 256);
    }
    m.insert("scan_find_ms".into(), w::ms(t.elapsed()) / w::FILTER_QUERIES as f64);

    // 5. updates in a shuffled order
    let order = w::shuffled(n, &mut rng);
    let mut p = Progress::new(label("update"), n);
    let t = Instant::now();
    for (c, chunk) in order.chunks(w::GROUP).enumerate() {
        db.write(Origin::Local, |tx| {
            for &i in chunk {
                tx.update(w::MODEL, &w::change(i as usize), false)?;
            }
            Ok(())
        })?;
        p.tick((c + 1) * w::GROUP);
    }
    m.insert("update_per_s".into(), w::rate(n, t.elapsed()));

    // 6. removes in a shuffled order
    let order = w::shuffled(n, &mut rng);
    let mut p = Progress::new(label("remove"), n);
    let t = Instant::now();
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
    m.insert("remove_per_s".into(), w::rate(n, t.elapsed()));
    db.close()?;

    // 7. peak RSS of this process
    m.insert("peak_rss_mib".into(), sys::vm_mib("VmHWM"));
    Ok(m)
}

/// Immediate mode: one durable commit per create, from one writer, then from `writers`
/// concurrent writers (group commit); each on a fresh file.
pub fn immediate(dir: &Path, n: usize, writers: usize, m: &mut Metrics) -> anyhow::Result<()> {
    let db = open(&dir.join("devtables-imm1.redb"), Durability::Immediate)?;
    let mut p = Progress::new("devtables immediate, 1 writer", n);
    let t = Instant::now();
    for i in 0..n {
        db.create(w::MODEL, &w::input(i))?;
        p.tick(i + 1);
    }
    m.insert("dt_imm_1w_per_s".into(), w::rate(n, t.elapsed()));
    db.close()?;

    let db = open(&dir.join("devtables-imm8.redb"), Durability::Immediate)?;
    eprintln!("  .. devtables immediate, {writers} writers");
    let t = Instant::now();
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
            h.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        }
        Ok(())
    })?;
    m.insert("dt_imm_nw_per_s".into(), w::rate(n, t.elapsed()));
    let count = db.read()?.scan_model(w::MODEL)?.len();
    ensure!(count == n, "{count} items after concurrent creates");
    db.close()?;
    Ok(())
}
