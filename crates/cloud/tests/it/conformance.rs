//! The store-conformance suite against the SQLite cloud store, in memory and in a file, so the
//! store the service runs keeps the same contract as the simulation's stores.

use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::{CloudStore, Retention, StoreError};
use devtables_conformance::{run_cloud_suite, CloudStoreUnderTest};
use devtables_schema::Schema;
use devtables_sync::apply::{CloudTxn, PushCounts};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage};
use devtables_sync::hlc::Hlc;
use devtables_sync::identity::DeviceId;

struct Sqlite {
    store: SqliteStore,
    /// Keeps the file store's directory alive.
    _dir: Option<tempfile::TempDir>,
}

impl CloudStoreUnderTest for Sqlite {
    type Error = StoreError;
    fn txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.store.conformance_txn(now_ms, commit, f)
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
        let retention = Retention {
            tombstone_ms: retention_ms,
            max_conflicts: 1_000_000,
        };
        Ok(self.store.purge(now_ms, &retention)?.tombstones)
    }
    fn new_run(&mut self) -> Result<(), StoreError> {
        self.store.conformance_new_run();
        Ok(())
    }
    fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
        self.store.max_version()
    }
    fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
        let counts = self.store.conformance_push_counts(id)?;
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
}

#[test]
fn sqlite_in_memory_conforms() {
    run_cloud_suite(|| Sqlite {
        store: SqliteStore::open_in_memory().expect("in-memory store"),
        _dir: None,
    });
}

#[test]
fn sqlite_file_conforms() {
    run_cloud_suite(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("cloud.db"), SqliteOptions::default())
            .expect("file store");
        Sqlite {
            store,
            _dir: Some(dir),
        }
    });
}
