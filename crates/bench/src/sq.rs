//! The same workload on SQLite (rusqlite, bundled), as a reference.
//!
//! Table `items(pk, sk, type, status, body)` WITHOUT ROWID, primary key (pk, sk), an index on
//! status; body is the item's JSON. To compare storage and not schema work, the SQLite runs do
//! the same devtables-schema work as devtables (`prepare_create` / `prepare_update` cast,
//! validate, render the key templates and stamp the timestamps; `primary_key` renders a key)
//! and every read parses the stored JSON with serde_json and projects it like devtables does.

use std::path::Path;

use anyhow::{ensure, Context};
use devtables_db::system_now_ms;
use devtables_schema::{Item, Model, Schema};
use rusqlite::{params, Connection, OptionalExtension};

use crate::sys;
use crate::workload::{self as w, Metrics, Progress};

const GET: &str = "SELECT body FROM items WHERE pk = ?1 AND sk = ?2";
const INSERT: &str = "INSERT INTO items (pk, sk, type, status, body) VALUES (?1, ?2, ?3, ?4, ?5)";

fn open(path: &Path, synchronous: &str) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.execute_batch(
        "CREATE TABLE items (pk TEXT NOT NULL, sk TEXT NOT NULL, type TEXT, status TEXT, body TEXT,
                             PRIMARY KEY (pk, sk)) WITHOUT ROWID;
         CREATE INDEX items_status ON items (status);",
    )?;
    Ok(conn)
}

/// Copies the WAL into the database file and empties it: SQLite's "make durable and tidy".
fn checkpoint(conn: &Connection) -> anyhow::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

fn parse(body: &str) -> rusqlite::Result<Item> {
    serde_json::from_str(body).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn insert(conn: &Connection, model: &Model, i: usize, now: i64) -> anyhow::Result<()> {
    let item = model.prepare_create(&w::input(i), now)?;
    let key = model.primary_key(&item)?;
    let body = serde_json::to_string(&item)?;
    let status = item.get("status").and_then(|v| v.as_str());
    conn.prepare_cached(INSERT)?
        .execute(params![key.pk, key.sk, model.name(), status, body])?;
    Ok(())
}

fn get(conn: &Connection, model: &Model, i: usize) -> anyhow::Result<Option<Item>> {
    let key = model.primary_key(&w::key(i))?;
    let mut st = conn.prepare_cached(GET)?;
    let item = st
        .query_row(params![key.pk, key.sk], |r| parse(r.get_ref(0)?.as_str()?))
        .optional()?;
    Ok(item.map(|item| model.project(&item, false)))
}

/// Item `i` read in place ([`w::ReadingRef`]), its fields summed ([`w::view_checksum`]).
fn borrowed_checksum(conn: &Connection, model: &Model, i: usize) -> anyhow::Result<u64> {
    let key = model.primary_key(&w::key(i))?;
    borrowed_checksum_at(conn, key.pk.as_bytes(), key.sk.as_bytes())?
        .with_context(|| format!("item {i} missing"))
}

/// The item at (pk, sk) read in place, its fields summed; `None` when absent.
fn borrowed_checksum_at(conn: &Connection, pk: &[u8], sk: &[u8]) -> anyhow::Result<Option<u64>> {
    // Bound as text, as the other reads bind their keys.
    let (pk, sk) = (std::str::from_utf8(pk)?, std::str::from_utf8(sk)?);
    let sum = conn
        .prepare_cached(GET)?
        .query_row(params![pk, sk], |r| {
            let body = r.get_ref(0)?.as_str()?;
            serde_json::from_str::<w::ReadingRef<'_>>(body)
                .map(|reading| reading.checksum())
                .map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })
        })
        .optional()?;
    Ok(sum)
}

fn bodies(
    st: &mut rusqlite::CachedStatement<'_>,
    p: impl rusqlite::Params,
    model: &Model,
) -> anyhow::Result<Vec<Item>> {
    let rows = st.query_map(p, |r| parse(r.get_ref(0)?.as_str()?))?;
    let mut out = Vec::new();
    for row in rows {
        out.push(model.project(&row?, false));
    }
    Ok(out)
}

/// Steps 1-7, writes grouped `w::GROUP` per transaction, WAL with synchronous=NORMAL.
pub fn grouped(dir: &Path, n: usize) -> anyhow::Result<Metrics> {
    let mut m = Metrics::new();
    m.insert("rss_start_mib".into(), sys::vm_mib("VmHWM"));
    let schema = Schema::from_json5(w::SCHEMA).context("bench schema")?;
    let model = schema.model(w::MODEL).context("model")?;
    let path = dir.join("sqlite.db");
    let mut conn = open(&path, "NORMAL")?;
    let label = |step: &str| format!("SQLite N={n} {step}");

    // 1. creates
    let mut p = Progress::new(label("create"), n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for start in (0..n).step_by(w::GROUP) {
        let end = (start + w::GROUP).min(n);
        let tx = conn.transaction()?;
        let now = system_now_ms();
        for i in start..end {
            insert(&tx, model, i, now)?;
        }
        tx.commit()?;
        p.tick(end);
    }
    w::put(&mut m, "create_per_s", &t, |d| w::rate(n, d));
    let t = w::WorkloadClock::start();
    checkpoint(&conn)?;
    w::put(&mut m, "flush_ms", &t, w::ms);
    m.insert("write_b_create".into(), written.per_item(n));
    m.insert("file_mib".into(), sys::file_mib(&path));
    m.insert("rss_after_create_mib".into(), sys::vm_mib("VmRSS"));

    // 2. gets
    let mut rng = w::rng();
    let order = w::shuffled(n, &mut rng);
    let mut p = Progress::new(label("get (autocommit each)"), n);
    let t = w::WorkloadClock::start();
    for (k, &i) in order.iter().enumerate() {
        ensure!(get(&conn, model, i as usize)?.is_some(), "item {i} missing");
        p.tick(k + 1);
    }
    w::put(&mut m, "get_each_per_s", &t, |d| w::rate(n, d));

    let mut p = Progress::new(label("get (one transaction)"), n);
    let t = w::WorkloadClock::start();
    {
        let tx = conn.transaction()?;
        for (k, &i) in order.iter().enumerate() {
            ensure!(get(&tx, model, i as usize)?.is_some(), "item {i} missing");
            p.tick(k + 1);
        }
        tx.commit()?;
    }
    w::put(&mut m, "get_txn_per_s", &t, |d| w::rate(n, d));

    // Typed: serde_json straight into the struct (no Map), as devtables' `get_as`.
    let t = w::WorkloadClock::start();
    for &i in &order {
        let key = model.primary_key(&w::key(i as usize))?;
        let got = conn
            .prepare_cached(GET)?
            .query_row(params![key.pk, key.sk], |r| {
                serde_json::from_str::<w::Reading>(r.get_ref(0)?.as_str()?).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })
            })
            .optional()?;
        ensure!(got.is_some(), "item {i} missing");
    }
    w::put(&mut m, "get_as_each_per_s", &t, |d| w::rate(n, d));

    // Borrowed: the body lent by `get_ref`, its fields lent by serde_json, every one read into
    // a checksum (as devtables' `get_view` rows).
    let expected: u64 = order.iter().map(|&i| w::view_checksum(i as usize)).sum();
    let t = w::WorkloadClock::start();
    let mut sum = 0u64;
    for &i in &order {
        sum += borrowed_checksum(&conn, model, i as usize)?;
    }
    w::put(&mut m, "get_view_each_per_s", &t, |d| w::rate(n, d));
    ensure!(
        sum == expected,
        "borrowed checksum {sum}, expected {expected}"
    );
    let t = w::WorkloadClock::start();
    let mut sum = 0u64;
    {
        let tx = conn.transaction()?;
        for &i in &order {
            sum += borrowed_checksum(&tx, model, i as usize)?;
        }
        tx.commit()?;
    }
    w::put(&mut m, "get_view_txn_per_s", &t, |d| w::rate(n, d));
    ensure!(
        sum == expected,
        "borrowed checksum {sum}, expected {expected}"
    );
    // The key from text pairs, rendered on the stack (as devtables' `get_view_by`).
    let mut key = w::KeyText::default();
    let t = w::WorkloadClock::start();
    let mut sum = 0u64;
    for &i in &order {
        key.set(i as usize);
        let key = model.primary_key_buf_of(&key.pairs())?;
        sum += borrowed_checksum_at(&conn, key.pk_bytes(), key.sk_bytes())?
            .with_context(|| format!("item {i} missing"))?;
    }
    w::put(&mut m, "get_view_by_each_per_s", &t, |d| w::rate(n, d));
    ensure!(
        sum == expected,
        "borrowed checksum {sum}, expected {expected}"
    );

    // 3. sort-key prefix finds (a range on the primary key)
    let queries = w::prefix_queries(n, &mut rng);
    let mut items = 0usize;
    let t = w::WorkloadClock::start();
    for (device, prefix, expected) in &queries {
        let pk = format!("dev#{device}");
        let end = format!("{prefix}\u{10FFFF}");
        let mut st =
            conn.prepare_cached("SELECT body FROM items WHERE pk = ?1 AND sk >= ?2 AND sk < ?3")?;
        let found = bodies(&mut st, params![pk, prefix, end], model)?;
        ensure!(
            found.len() == *expected,
            "prefix {prefix}: {} items",
            found.len()
        );
        items += found.len();
    }
    w::put(&mut m, "prefix_find_us", &t, |d| {
        d.as_secs_f64() * 1e6 / queries.len() as f64
    });
    m.insert("prefix_items".into(), items as f64 / queries.len() as f64);

    // 4. status == fault: through the status index, then as a full scan
    let expected = w::faults(n);
    let t = w::WorkloadClock::start();
    for _ in 0..w::FILTER_QUERIES {
        let mut st =
            conn.prepare_cached("SELECT body FROM items WHERE status = ?1 AND type = ?2")?;
        let found = bodies(&mut st, params!["fault", w::MODEL], model)?;
        ensure!(found.len() == expected, "index find: {} items", found.len());
    }
    w::put(&mut m, "index_find_ms", &t, |d| {
        w::ms(d) / w::FILTER_QUERIES as f64
    });
    m.insert("filter_items".into(), expected as f64);

    let t = w::WorkloadClock::start();
    for _ in 0..w::FILTER_QUERIES {
        let mut st = conn
            .prepare_cached("SELECT body FROM items NOT INDEXED WHERE status = ?1 AND type = ?2")?;
        let found = bodies(&mut st, params!["fault", w::MODEL], model)?;
        ensure!(found.len() == expected, "scan find: {} items", found.len());
    }
    w::put(&mut m, "scan_find_ms", &t, |d| {
        w::ms(d) / w::FILTER_QUERIES as f64
    });

    // 5. updates: read, parse, prepare_update, write back
    let order = w::shuffled(n, &mut rng);
    let mut p = Progress::new(label("update"), n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for (c, chunk) in order.chunks(w::GROUP).enumerate() {
        let tx = conn.transaction()?;
        let now = system_now_ms();
        for &i in chunk {
            let input = w::change(i as usize);
            let key = model.primary_key(&input)?;
            let existing = tx
                .prepare_cached(GET)?
                .query_row(params![key.pk, key.sk], |r| parse(r.get_ref(0)?.as_str()?))?;
            let item = model.prepare_update(&existing, &input, now)?;
            let body = serde_json::to_string(&item)?;
            let status = item.get("status").and_then(|v| v.as_str());
            let changed = tx
                .prepare_cached(
                    "UPDATE items SET status = ?3, body = ?4 WHERE pk = ?1 AND sk = ?2",
                )?
                .execute(params![key.pk, key.sk, status, body])?;
            ensure!(changed == 1);
        }
        tx.commit()?;
        p.tick((c + 1) * w::GROUP);
    }
    w::put(&mut m, "update_per_s", &t, |d| w::rate(n, d));
    checkpoint(&conn)?; // untimed: what reaches the disk for the updates
    m.insert("write_b_update".into(), written.per_item(n));

    // 6. removes
    let order = w::shuffled(n, &mut rng);
    let mut p = Progress::new(label("remove"), n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for (c, chunk) in order.chunks(w::GROUP).enumerate() {
        let tx = conn.transaction()?;
        for &i in chunk {
            let key = model.primary_key(&w::key(i as usize))?;
            let gone = tx
                .prepare_cached("DELETE FROM items WHERE pk = ?1 AND sk = ?2")?
                .execute(params![key.pk, key.sk])?;
            ensure!(gone == 1);
        }
        tx.commit()?;
        p.tick((c + 1) * w::GROUP);
    }
    w::put(&mut m, "remove_per_s", &t, |d| w::rate(n, d));
    checkpoint(&conn)?;
    drop(conn);
    m.insert("write_b_remove".into(), written.per_item(n));

    m.insert("peak_rss_mib".into(), sys::vm_mib("VmHWM"));
    Ok(m)
}

/// One commit per create, one writer, on a fresh file, then a checkpoint; synchronous `FULL`
/// (a durable commit per create: `sq_imm_1w_*`) or `NORMAL` (`sq_normal_1w_*`). Also the bytes
/// written to disk per item (`*_write_b`).
pub fn one_by_one(dir: &Path, n: usize, synchronous: &str, m: &mut Metrics) -> anyhow::Result<()> {
    let schema = Schema::from_json5(w::SCHEMA).context("bench schema")?;
    let model = schema.model(w::MODEL).context("model")?;
    let prefix = if synchronous == "FULL" {
        "sq_imm_1w"
    } else {
        "sq_normal_1w"
    };
    let conn = open(&dir.join(format!("{prefix}.db")), synchronous)?;
    let mut p = Progress::new(format!("SQLite synchronous={synchronous}, 1 writer"), n);
    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    for i in 0..n {
        insert(&conn, model, i, system_now_ms())?;
        p.tick(i + 1);
    }
    w::put(m, &format!("{prefix}_per_s"), &t, |d| w::rate(n, d));
    checkpoint(&conn)?;
    drop(conn);
    m.insert(format!("{prefix}_write_b"), written.per_item(n));
    Ok(())
}
