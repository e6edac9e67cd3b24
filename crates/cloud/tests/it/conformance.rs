//! The store-conformance suite against the SQLite cloud store, in memory and in a file, and
//! against the PostgreSQL store (a fresh schema per check; a service test), so the stores the
//! service runs keep the same contract as the simulation's stores; and the change-log suite,
//! which only the stores that serve backends keep.

use devtables_cloud::store::postgres::PostgresStore;
use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::{
    ChangeOp, ChangeQuery, ChangeRead, ChangeRetention, CloudStore, Retention, StoreError,
};
use devtables_conformance::{
    run_change_log_suite, run_cloud_suite, ChangeLogUnderTest, CloudStoreUnderTest, LoggedChange,
};
use devtables_schema::ItemKey;
use devtables_schema::Schema;
use devtables_sync::apply::{CloudTxn, PushCounts};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage};
use devtables_sync::hlc::Hlc;
use devtables_sync::identity::{DeviceId, Owner};

use super::pg::TestSchema;
use super::services_gate::services_on;

/// What the suite needs of a store beyond [`CloudStore`]: its conformance hooks.
trait Hooks: CloudStore {
    fn txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError>;
    fn new_run(&mut self);
    fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError>;
    fn fanout_batch(&self) -> usize;
}

impl Hooks for SqliteStore {
    fn txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.conformance_txn(now_ms, commit, f)
    }
    fn new_run(&mut self) {
        self.conformance_new_run();
    }
    fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
        self.conformance_push_counts(id)
    }
    fn fanout_batch(&self) -> usize {
        SqliteStore::fanout_batch(self)
    }
}

impl Hooks for PostgresStore {
    fn txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.conformance_txn(now_ms, commit, f)
    }
    fn new_run(&mut self) {
        self.conformance_new_run();
    }
    fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
        self.conformance_push_counts(id)
    }
    fn fanout_batch(&self) -> usize {
        PostgresStore::fanout_batch(self)
    }
}

/// A store under the suite, with what must outlive it (a file store's directory, a PostgreSQL
/// store's schema); the store is dropped first.
struct Under<S> {
    store: S,
    _keep: Option<Box<dyn std::any::Any>>,
}

type Sqlite = Under<SqliteStore>;

impl<S: Hooks> CloudStoreUnderTest for Under<S> {
    type Error = StoreError;
    fn txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.store.txn(now_ms, commit, f)
    }
    fn register_device(&mut self, id: &DeviceId, now_ms: u64) -> Result<(), StoreError> {
        self.store
            .register_device(id, "not-a-secret-hash", None, now_ms)
    }
    fn read_feed(
        &mut self,
        id: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, StoreError> {
        self.store.read_feed(id, after, limit)
    }
    fn read_snapshot(
        &mut self,
        schema: &Schema,
        id: &DeviceId,
        resync: u64,
        from: Option<&SnapshotCursor>,
        limit: usize,
    ) -> Result<SnapshotPage, StoreError> {
        self.store.read_snapshot(schema, id, resync, from, limit)
    }
    fn purge(&mut self, now_ms: u64, retention_ms: u64) -> Result<u64, StoreError> {
        // Retention is a pass of bounded calls, as the service makes it (a small batch, so
        // the suite's purges take several).
        let retention = Retention {
            tombstone_ms: retention_ms,
            max_conflicts: 1_000_000,
            batch: 2,
        };
        let mut purged = 0;
        loop {
            let stats = self.store.purge(now_ms, &retention)?;
            purged += stats.tombstones;
            if !stats.more {
                return Ok(purged);
            }
        }
    }
    fn new_run(&mut self) -> Result<(), StoreError> {
        self.store.new_run();
        Ok(())
    }
    fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
        self.store.max_version()
    }
    fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
        let counts = self.store.push_counts(id)?;
        // The device record the API shows carries the same counters.
        let d = self
            .store
            .device(id)?
            .ok_or_else(|| StoreError::UnknownDevice(id.to_string()))?;
        assert_eq!(
            (d.changes_applied, d.changes_superseded, d.changes_rejected),
            (counts.applied, counts.superseded, counts.rejected),
            "the device record's counters"
        );
        Ok(counts)
    }
    fn conflicts(&mut self, account: &str) -> Result<u64, StoreError> {
        Ok(self.store.conflicts(account, None, 1_000_000)?.len() as u64)
    }
    fn fanout_batch(&self) -> usize {
        self.store.fanout_batch()
    }
    fn fanout_step(&mut self) -> Result<Option<Vec<DeviceId>>, StoreError> {
        Ok(self
            .store
            .fanout_step()?
            .map(|advanced| advanced.into_iter().map(|(d, _)| d).collect()))
    }
}

impl<S: Hooks> ChangeLogUnderTest for Under<S> {
    fn changes(
        &mut self,
        account: &str,
        after: u64,
    ) -> Result<Result<Vec<LoggedChange>, u64>, StoreError> {
        // Small pages, so the suite also walks the paging.
        let mut query = ChangeQuery {
            account: account.into(),
            after,
            model: None,
            device: None,
            limit: 2,
            scan: 3,
        };
        let mut out = Vec::new();
        loop {
            let page = match self.store.read_changes(&query)? {
                ChangeRead::Page(page) => page,
                ChangeRead::Expired { floor, .. } => return Ok(Err(floor)),
            };
            out.extend(page.changes.into_iter().map(|c| LoggedChange {
                seq: c.seq,
                owner: match c.device {
                    Some(d) => Owner::Device(DeviceId::new(c.account, d).expect("a device id")),
                    None => Owner::Account(c.account),
                },
                model: c.model,
                key: ItemKey {
                    pk: c.key.pk,
                    sk: c.key.sk,
                },
                version: c.version,
                deleted: c.op == ChangeOp::Delete,
                item: c.item,
                at_ms: c.at_ms,
            }));
            if page.next >= page.head {
                return Ok(Ok(out));
            }
            query.after = page.next;
        }
    }
    fn trim_changes(&mut self, max_per_account: u64) -> Result<(), StoreError> {
        let retention = ChangeRetention {
            max_age_ms: u64::MAX,
            max_per_account,
            batch: 2,
        };
        while self.store.purge_changes(0, &retention)?.more {}
        Ok(())
    }
}

/// The fan-out batch of the stores under the suite: small, so its checks reach a batch's end.
const SUITE_FANOUT_BATCH: usize = 3;

fn in_memory() -> Sqlite {
    let mut store = SqliteStore::open_in_memory().expect("in-memory store");
    store.set_fanout_batch(SUITE_FANOUT_BATCH);
    Sqlite { store, _keep: None }
}

fn in_a_file() -> Sqlite {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = SqliteOptions {
        fanout_batch: SUITE_FANOUT_BATCH,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&dir.path().join("cloud.db"), options).expect("file store");
    Sqlite {
        store,
        _keep: Some(Box::new(dir)),
    }
}

#[test]
fn sqlite_keeps_the_change_log_contract() {
    run_change_log_suite(in_memory);
    run_change_log_suite(in_a_file);
}

#[test]
fn sqlite_in_memory_conforms() {
    run_cloud_suite(in_memory);
}

#[test]
fn sqlite_file_conforms() {
    run_cloud_suite(in_a_file);
}

/// A PostgreSQL store on a fresh schema of its own.
fn on_postgres() -> Under<PostgresStore> {
    let schema = TestSchema::fresh().expect("the service tests are on");
    let mut store = schema.store();
    store.set_fanout_batch(SUITE_FANOUT_BATCH);
    Under {
        store,
        _keep: Some(Box::new(schema)),
    }
}

#[test]
fn postgres_conforms() {
    if !services_on() {
        return;
    }
    run_cloud_suite(on_postgres);
}

#[test]
fn postgres_keeps_the_change_log_contract() {
    if !services_on() {
        return;
    }
    run_change_log_suite(on_postgres);
}
