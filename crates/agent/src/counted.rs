//! The event loop's database transactions, counted.
//!
//! Every transaction costs a small device CPU time and, on flash, page writes: what syncing
//! costs per application write is a figure to keep down, and a figure needs a count. The event
//! loop reaches the database only through [`CountedDb`], which counts each read and write
//! transaction it runs; the counts show in [`crate::AgentStatus`] (`db_reads`, `db_writes`), so
//! an operator (and a test) sees how many transactions the agent adds to the application's own.
//!
//! The replication state's functions (`state`, `commands`) take any [`DbAccess`]: the event
//! loop passes its `CountedDb`; the start of the agent and the conformance suite pass the bare
//! [`Db`], whose transactions are not the event loop's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devtables_db::{Db, DbError, FindOptions, Origin, Page, ReadTxn, SideEntries, WriteTxn};
use devtables_schema::Item;

/// The database calls the replication state makes; each one is one transaction.
pub(crate) trait DbAccess {
    fn side_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;
    fn side_len(&self, table: &str) -> Result<u64, DbError>;
    fn side_scan(&self, table: &str, start: &[u8], limit: usize) -> Result<SideEntries, DbError>;
    fn find(&self, model: &str, props: &Item, options: &FindOptions) -> Result<Page, DbError>;
    fn write<T>(
        &self,
        origin: Origin,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError>;
}

impl DbAccess for Db {
    fn side_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        Db::side_get(self, table, key)
    }

    fn side_len(&self, table: &str) -> Result<u64, DbError> {
        Db::side_len(self, table)
    }

    fn side_scan(&self, table: &str, start: &[u8], limit: usize) -> Result<SideEntries, DbError> {
        Db::side_scan(self, table, start, limit)
    }

    fn find(&self, model: &str, props: &Item, options: &FindOptions) -> Result<Page, DbError> {
        Db::find(self, model, props, options)
    }

    fn write<T>(
        &self,
        origin: Origin,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        Db::write(self, origin, f)
    }
}

/// Transactions run so far, shared by the clones of one [`CountedDb`].
#[derive(Debug, Default)]
struct Counts {
    reads: AtomicU64,
    writes: AtomicU64,
}

/// The device database as the event loop uses it: every transaction counted. Cheap to clone
/// (the clones share the database and the counts), so blocking tasks take one along.
#[derive(Clone)]
pub(crate) struct CountedDb {
    db: Db,
    counts: Arc<Counts>,
}

impl CountedDb {
    pub(crate) fn new(db: Db) -> CountedDb {
        CountedDb {
            db,
            counts: Arc::default(),
        }
    }

    /// Read transactions run so far.
    pub(crate) fn reads(&self) -> u64 {
        self.counts.reads.load(Ordering::Relaxed)
    }

    /// Write transactions run so far (committed or not).
    pub(crate) fn writes(&self) -> u64 {
        self.counts.writes.load(Ordering::Relaxed)
    }

    fn read_counted(&self) {
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
    }

    fn write_counted(&self) {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// A read snapshot (one transaction, however many reads it serves).
    pub(crate) fn read(&self) -> Result<ReadTxn, DbError> {
        self.read_counted();
        self.db.read()
    }

    /// Changes the given fields of an item, as [`Db::update`] (one write transaction).
    pub(crate) fn update(&self, model: &str, item: &Item) -> Result<Item, DbError> {
        self.write_counted();
        self.db.update(model, item)
    }

    /// Makes every committed write durable (not a transaction).
    pub(crate) fn flush(&self) -> Result<(), DbError> {
        self.db.flush()
    }
}

impl DbAccess for CountedDb {
    fn side_get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.read_counted();
        self.db.side_get(table, key)
    }

    fn side_len(&self, table: &str) -> Result<u64, DbError> {
        self.read_counted();
        self.db.side_len(table)
    }

    fn side_scan(&self, table: &str, start: &[u8], limit: usize) -> Result<SideEntries, DbError> {
        self.read_counted();
        self.db.side_scan(table, start, limit)
    }

    fn find(&self, model: &str, props: &Item, options: &FindOptions) -> Result<Page, DbError> {
        self.read_counted();
        self.db.find(model, props, options)
    }

    fn write<T>(
        &self,
        origin: Origin,
        f: impl FnOnce(&mut WriteTxn<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.write_counted();
        self.db.write(origin, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transaction_is_counted_once_and_clones_share_the_counts() {
        let schema = std::sync::Arc::new(
            devtables_schema::Schema::load(std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../examples/schema.json5"
            )))
            .unwrap(),
        );
        let db = Db::open_in_memory(schema, devtables_db::DbOptions::default()).unwrap();
        let counted = CountedDb::new(db);
        let clone = counted.clone();
        counted.side_get("outbox", b"k").unwrap();
        clone.side_len("outbox").unwrap();
        counted.side_scan("outbox", b"", 10).unwrap();
        drop(clone.read().unwrap());
        counted
            .write(Origin::Remote, |t| t.side().put("meta", b"k", b"v"))
            .unwrap();
        assert_eq!((counted.reads(), counted.writes()), (4, 1));
        assert_eq!((clone.reads(), clone.writes()), (4, 1));
    }
}
