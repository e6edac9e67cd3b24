//! Storage-design spike for the device database (issue 17): the benchmark's key-value work,
//! with the database's own item bytes, on candidate layouts and engines, so a design is chosen
//! on numbers. Not the product: no schema work, no hooks, no crash handling beyond what each
//! engine does itself. `devtables bench db --spike` runs each design in its own child process
//! (`spike-<design>`) and prints the spike table.
//!
//! Every design does the same work per item as the product does for the workload's model:
//! - create: the item under `pk \0 sk` plus its `gs1` index entry (and, where the design has
//!   one, the model-index entry), 1,000 per atomic batch, not durable per batch, made durable
//!   each second (periodic mode);
//! - get: a point read of the item by key, each in its own snapshot where the engine has them;
//! - update: read the item (as the product does, to validate and to find changed index
//!   entries), write the new bytes (same index entries: only `value` changes);
//! - remove: read the item (for its index entries), delete it and its index entries.
//!
//! Designs:
//! - `redb3`: the format-2 layout on redb 2.6: `items`, `types` (`model \0 pk \0 sk`), `idx:gs1`.
//! - `redb2`: redb tuned: one items table per model (`items:Reading`, so a model scan needs no
//!   `types` table) and `idx:gs1`: two B-trees per item instead of three (the database's own
//!   layout since format 3).
//! - `fjall`: an LSM tree (fjall 3), keyspaces `items:Reading` and `idx:gs1`, cross-keyspace
//!   atomic batches, journal persisted each second; cache and memtables sized for a device.
//! - `log`: an in-memory index over an append-only log: every change is appended to one file
//!   (a batch is one `write`), the item index (key → file offset) and the `gs1` set live in
//!   RAM (rebuilt from the log at open in a real design), gets are one `pread`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::dt::PERIODIC_INTERVAL;
use crate::store_raw::{rows, Row};

/// The page cache the device database gave redb while it stored on redb (formats 1 to 3): the
/// redb designs keep it, so their figures stay comparable with the earlier runs.
const REDB_CACHE_BYTES: usize = 8 * 1024 * 1024;
use crate::report::thousands;
use crate::sys;
use crate::workload::{self as w, Metrics};

/// The designs, in column order.
#[cfg(feature = "spike-fjall")]
pub const DESIGNS: &[&str] = &["redb3", "redb2", "fjall", "log"];
/// Without the `spike-fjall` feature the LSM design is left out (the `devtables` binary does not
/// carry fjall).
#[cfg(not(feature = "spike-fjall"))]
pub const DESIGNS: &[&str] = &["redb3", "redb2", "log"];

/// The operations every design provides.
trait Store {
    /// Writes the items and their index entries as one atomic batch, not durable.
    fn create(&mut self, rows: &[&Row]) -> anyhow::Result<()>;
    /// Length of the stored item (0 when absent).
    fn get(&self, key: &[u8]) -> anyhow::Result<usize>;
    /// Reads each item, then writes its new bytes, as one atomic batch.
    fn update(&mut self, rows: &[&Row]) -> anyhow::Result<()>;
    /// Reads each item, then deletes it and its index entries, as one atomic batch.
    fn remove(&mut self, rows: &[&Row]) -> anyhow::Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> anyhow::Result<()>;
    /// Bytes of the store's files.
    fn file_bytes(&self) -> u64;
}

const ITEMS3: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
const TYPES: TableDefinition<&[u8], ()> = TableDefinition::new("types");
const ITEMS_MODEL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items:Reading");
const GS1: TableDefinition<&[u8], ()> = TableDefinition::new("idx:gs1");

struct Redb {
    db: Database,
    path: std::path::PathBuf,
    /// `types` table too (the format-2 layout).
    types: bool,
}

impl Redb {
    fn open(path: &Path, types: bool) -> anyhow::Result<Redb> {
        let db = Database::builder()
            .set_cache_size(REDB_CACHE_BYTES)
            .create(path)?;
        Ok(Redb {
            db,
            path: path.to_path_buf(),
            types,
        })
    }

    fn items(&self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        if self.types {
            ITEMS3
        } else {
            ITEMS_MODEL
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None);
        f(&tx)?;
        tx.commit()?;
        Ok(())
    }
}

impl Store for Redb {
    fn create(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        self.write(|tx| {
            let mut items = tx.open_table(self.items())?;
            let mut gs1 = tx.open_table(GS1)?;
            for r in rows {
                if items
                    .insert(r.key.as_slice(), r.value.as_slice())?
                    .is_some()
                {
                    bail!("exists");
                }
                gs1.insert(r.index_key.as_slice(), ())?;
            }
            if self.types {
                let mut types = tx.open_table(TYPES)?;
                for r in rows {
                    types.insert(r.type_key.as_slice(), ())?;
                }
            }
            Ok(())
        })
    }

    fn get(&self, key: &[u8]) -> anyhow::Result<usize> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(self.items())?;
        Ok(t.get(key)?.map_or(0, |v| v.value().len()))
    }

    fn update(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        self.write(|tx| {
            let mut items = tx.open_table(self.items())?;
            for r in rows {
                let old = items.get(r.key.as_slice())?.map(|v| v.value().len());
                if old.is_none() {
                    bail!("missing");
                }
                items.insert(r.key.as_slice(), r.updated.as_slice())?;
            }
            Ok(())
        })
    }

    fn remove(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        self.write(|tx| {
            let mut items = tx.open_table(self.items())?;
            let mut gs1 = tx.open_table(GS1)?;
            for r in rows {
                // The product reads the removed item to find its index entries.
                if items.remove(r.key.as_slice())?.is_none() {
                    bail!("missing");
                }
                gs1.remove(r.index_key.as_slice())?;
            }
            if self.types {
                let mut types = tx.open_table(TYPES)?;
                for r in rows {
                    types.remove(r.type_key.as_slice())?;
                }
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate);
        tx.commit()?;
        Ok(())
    }

    fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

/// The append-only log with its index in RAM. Record: `op u8, key len u32, value len u32,
/// key, value` (op 1 = put, 2 = delete); a real design adds a checksum per batch and replays
/// the log at open.
struct Log {
    file: File,
    path: std::path::PathBuf,
    end: u64,
    buf: Vec<u8>,
    /// item key → (offset of the value, length).
    items: BTreeMap<Box<[u8]>, (u64, u32)>,
    gs1: BTreeSet<Box<[u8]>>,
}

impl Log {
    fn open(path: &Path) -> anyhow::Result<Log> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Log {
            file,
            path: path.to_path_buf(),
            end: 0,
            buf: Vec::with_capacity(256 << 10),
            items: BTreeMap::new(),
            gs1: BTreeSet::new(),
        })
    }

    /// Appends a record to the batch buffer; returns the file offset of its value.
    fn record(&mut self, op: u8, key: &[u8], value: &[u8]) -> u64 {
        self.buf.push(op);
        self.buf
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(key);
        let at = self.end + self.buf.len() as u64;
        self.buf.extend_from_slice(value);
        at
    }

    fn read(&self, key: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(&(at, len)) = self.items.get(key) else {
            return Ok(None);
        };
        let mut v = vec![0u8; len as usize];
        self.file.read_exact_at(&mut v, at)?;
        Ok(Some(v))
    }

    /// Writes the batch with one `write` (the batch is atomic once a real design checksums it).
    fn commit(&mut self) -> anyhow::Result<()> {
        self.file.write_all(&self.buf)?;
        self.end += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl Store for Log {
    fn create(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        for r in rows {
            if self.items.contains_key(r.key.as_slice()) {
                bail!("exists");
            }
            let at = self.record(1, &r.key, &r.value);
            self.items
                .insert(r.key.clone().into_boxed_slice(), (at, r.value.len() as u32));
            self.record(1, &r.index_key, &[]);
            self.gs1.insert(r.index_key.clone().into_boxed_slice());
        }
        self.commit()
    }

    fn get(&self, key: &[u8]) -> anyhow::Result<usize> {
        Ok(self.read(key)?.map_or(0, |v| v.len()))
    }

    fn update(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        for r in rows {
            if self.read(&r.key)?.is_none() {
                bail!("missing");
            }
            let at = self.record(1, &r.key, &r.updated);
            if let Some(slot) = self.items.get_mut(r.key.as_slice()) {
                *slot = (at, r.updated.len() as u32);
            }
        }
        self.commit()
    }

    fn remove(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        for r in rows {
            if self.read(&r.key)?.is_none() {
                bail!("missing");
            }
            self.record(2, &r.key, &[]);
            self.items.remove(r.key.as_slice());
            self.record(2, &r.index_key, &[]);
            self.gs1.remove(r.index_key.as_slice());
        }
        self.commit()
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

#[cfg(feature = "spike-fjall")]
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
            Ok(m) => total += m.len(),
            Err(_) => {}
        }
    }
    total
}

#[cfg(feature = "spike-fjall")]
struct Fjall {
    db: fjall::Database,
    items: fjall::Keyspace,
    gs1: fjall::Keyspace,
    dir: std::path::PathBuf,
}

#[cfg(feature = "spike-fjall")]
impl Fjall {
    fn open(dir: &Path) -> anyhow::Result<Fjall> {
        let db = fjall::Database::builder(dir)
            .cache_size(REDB_CACHE_BYTES as u64)
            .open()?;
        let opts = || fjall::KeyspaceCreateOptions::default().max_memtable_size(2 << 20);
        let items = db.keyspace("items_Reading", opts)?;
        let gs1 = db.keyspace("idx_gs1", opts)?;
        Ok(Fjall {
            db,
            items,
            gs1,
            dir: dir.to_path_buf(),
        })
    }
}

#[cfg(feature = "spike-fjall")]
impl Store for Fjall {
    fn create(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        let mut b = self.db.batch();
        for r in rows {
            if self.items.contains_key(&r.key)? {
                bail!("exists");
            }
            b.insert(&self.items, r.key.as_slice(), r.value.as_slice());
            b.insert(&self.gs1, r.index_key.as_slice(), &[] as &[u8]);
        }
        b.commit()?;
        Ok(())
    }

    fn get(&self, key: &[u8]) -> anyhow::Result<usize> {
        Ok(self.items.get(key)?.map_or(0, |v| v.len()))
    }

    fn update(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        let mut b = self.db.batch();
        for r in rows {
            if self.items.get(&r.key)?.is_none() {
                bail!("missing");
            }
            b.insert(&self.items, r.key.as_slice(), r.updated.as_slice());
        }
        b.commit()?;
        Ok(())
    }

    fn remove(&mut self, rows: &[&Row]) -> anyhow::Result<()> {
        let mut b = self.db.batch();
        for r in rows {
            if self.items.get(&r.key)?.is_none() {
                bail!("missing");
            }
            b.remove(&self.items, r.key.as_slice());
            b.remove(&self.gs1, r.index_key.as_slice());
        }
        b.commit()?;
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.db.persist(fjall::PersistMode::SyncData)?;
        Ok(())
    }

    fn file_bytes(&self) -> u64 {
        dir_bytes(&self.dir)
    }
}

/// One design on `n` items in `dir`: rates (wall and on-CPU), file size, bytes written per
/// item, and the RSS the store added (peak minus the harness's RSS with the rows built).
pub fn run(design: &str, dir: &Path, n: usize) -> anyhow::Result<Metrics> {
    let rows = rows(n)?;
    let mut rng = w::rng();
    let get_order = w::shuffled(n, &mut rng);
    let update_order = w::shuffled(n, &mut rng);
    let remove_order = w::shuffled(n, &mut rng);
    let mut m = Metrics::new();
    let base_rss = sys::vm_mib("VmRSS");
    m.insert("rss_harness_mib".into(), base_rss);
    let mut store: Box<dyn Store> = match design {
        "redb3" => Box::new(Redb::open(&dir.join("spike.redb"), true)?),
        "redb2" => Box::new(Redb::open(&dir.join("spike.redb"), false)?),
        #[cfg(feature = "spike-fjall")]
        "fjall" => Box::new(Fjall::open(&dir.join("spike.fjall"))?),
        "log" => Box::new(Log::open(&dir.join("spike.log"))?),
        other => bail!("unknown spike design {other}"),
    };
    let in_order: Vec<&Row> = rows.iter().collect();
    let shuffled =
        |order: &[u32]| -> Vec<&Row> { order.iter().map(|&i| &rows[i as usize]).collect() };

    // Grouped writes with a durable flush each PERIODIC_INTERVAL, as periodic mode does.
    let grouped = |store: &mut Box<dyn Store>,
                   batch: &[&Row],
                   op: fn(&mut dyn Store, &[&Row]) -> anyhow::Result<()>|
     -> anyhow::Result<()> {
        let mut last = Instant::now();
        for chunk in batch.chunks(w::GROUP) {
            op(store.as_mut(), chunk)?;
            if last.elapsed() >= PERIODIC_INTERVAL {
                store.flush()?;
                last = Instant::now();
            }
        }
        store.flush()
    };

    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    grouped(&mut store, &in_order, |s, c| s.create(c))?;
    w::put(&mut m, "create_per_s", &t, |d| w::rate(n, d));
    m.insert("write_b_create".into(), written.per_item(n));
    m.insert(
        "file_mib".into(),
        store.file_bytes() as f64 / (1024.0 * 1024.0),
    );

    let t = w::WorkloadClock::start();
    let mut total = 0usize;
    for &i in &get_order {
        total += store.get(&rows[i as usize].key)?;
    }
    w::put(&mut m, "get_per_s", &t, |d| w::rate(n, d));
    let expected: usize = rows.iter().map(|r| r.value.len()).sum();
    anyhow::ensure!(
        total == expected,
        "gets read {total} bytes, {expected} stored"
    );

    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    grouped(&mut store, &shuffled(&update_order), |s, c| s.update(c))?;
    w::put(&mut m, "update_per_s", &t, |d| w::rate(n, d));
    m.insert("write_b_update".into(), written.per_item(n));
    m.insert(
        "file_after_update_mib".into(),
        store.file_bytes() as f64 / (1024.0 * 1024.0),
    );

    let written = sys::WriteMeter::start();
    let t = w::WorkloadClock::start();
    grouped(&mut store, &shuffled(&remove_order), |s, c| s.remove(c))?;
    w::put(&mut m, "remove_per_s", &t, |d| w::rate(n, d));
    m.insert("write_b_remove".into(), written.per_item(n));
    anyhow::ensure!(store.get(&rows[0].key)? == 0, "item 0 still there");
    drop(store);
    m.insert("rss_store_mib".into(), sys::vm_mib("VmHWM") - base_rss);
    Ok(m)
}

/// The spike table: a row per figure, a column per design.
pub fn table(n: usize, runs: &BTreeMap<String, Metrics>) -> String {
    let mut s = format!(
        "\n| Spike, N={}: the workload's key-value work alone (database's item bytes, 1,000 per batch, durable each second) |",
        thousands(n as f64)
    );
    let mut rule = String::from("|---|");
    for d in DESIGNS {
        s.push_str(&format!(" {d} |"));
        rule.push_str("---|");
    }
    s.push('\n');
    s.push_str(&rule);
    s.push('\n');
    let rows: [(&str, &str, &str); 13] = [
        ("create", "create_per_s", "/s"),
        ("create (on-CPU)", "create_per_s_cpu", "/s"),
        ("get, shuffled", "get_per_s", "/s"),
        ("get (on-CPU)", "get_per_s_cpu", "/s"),
        ("update (read + write), shuffled", "update_per_s", "/s"),
        ("update (on-CPU)", "update_per_s_cpu", "/s"),
        ("remove (read + delete), shuffled", "remove_per_s", "/s"),
        ("remove (on-CPU)", "remove_per_s_cpu", "/s"),
        ("file after the creates", "file_mib", " MiB"),
        ("file after the updates", "file_after_update_mib", " MiB"),
        (
            "bytes written per create / update / remove",
            "write_b",
            " B",
        ),
        ("peak RSS added by the store", "rss_store_mib", " MiB"),
        ("harness RSS (rows built)", "rss_harness_mib", " MiB"),
    ];
    for (label, key, unit) in rows {
        s.push_str(&format!("| {label} |"));
        for d in DESIGNS {
            let m = runs.get(*d);
            let get = |k: &str| m.and_then(|m| m.get(k).copied()).unwrap_or(f64::NAN);
            let cell = match (key, unit) {
                ("write_b", _) => format!(
                    "{} / {} / {} B",
                    thousands(get("write_b_create")),
                    thousands(get("write_b_update")),
                    thousands(get("write_b_remove"))
                ),
                (_, "/s") => format!("{}/s", thousands(get(key))),
                (_, " MiB") => format!("{:.1} MiB", get(key)),
                _ => format!("{}{unit}", get(key)),
            };
            s.push_str(&format!(" {cell} |"));
        }
        s.push('\n');
    }
    s
}
