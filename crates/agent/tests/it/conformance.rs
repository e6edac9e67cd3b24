//! The store-conformance suite against the agent's device state (the redb device database with
//! the replication side tables), so the device store the agent runs keeps the same contract as
//! the simulation's device store.

use std::sync::{Arc, Mutex};

use devtables_agent::testing;
use devtables_conformance::{run_device_suite, DeviceRestore, DeviceStoreUnderTest, RepushDone};
use devtables_db::{Db, DbError, DbOptions};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{DeviceTxn, StoredVersion};
use devtables_sync::hlc::{Hlc, HlcClock};

struct AgentState {
    db: Db,
    schema: Arc<Schema>,
    /// The clock the outbox recorder stamps with (a re-push ticks it for a collected version).
    clock: Arc<Mutex<HlcClock>>,
    _dir: tempfile::TempDir,
}

impl DeviceStoreUnderTest for AgentState {
    type Error = DbError;
    fn txn<R>(
        &mut self,
        commit: bool,
        f: impl FnOnce(&mut dyn DeviceTxn<Error = DbError>) -> Result<R, DbError>,
    ) -> Result<R, DbError> {
        testing::device_txn(&self.db, &self.schema, commit, f)
    }
    fn item(&mut self, key: &ItemKey) -> Result<Option<(String, Item)>, DbError> {
        self.db.read()?.get_stored(key)
    }
    fn version(&mut self, key: &ItemKey) -> Result<Option<StoredVersion>, DbError> {
        testing::stored_version(&self.db, &self.schema, key)
    }
    fn local_write(
        &mut self,
        model: &str,
        fields: &Item,
        delete: bool,
        _now_ms: u64,
    ) -> Result<(), DbError> {
        if delete {
            self.db.remove(model, fields).map(|_| ())
        } else {
            self.db.upsert(model, fields).map(|_| ())
        }
    }
    fn outbox_remove(
        &mut self,
        acked: &[(String, ItemKey, Hlc)],
        answered: Option<u64>,
    ) -> Result<(), DbError> {
        testing::outbox_remove(&self.db, acked, answered).map(|_| ())
    }
    fn store_answered(&mut self, answered: u64) -> Result<(), DbError> {
        testing::store_answered(&self.db, answered)
    }
    fn repush(&mut self, slice: usize) -> Result<RepushDone, DbError> {
        let (requeued, slices) = testing::repush(&self.db, &self.schema, &self.clock, slice)?;
        Ok(RepushDone { requeued, slices })
    }
    fn restore(&mut self) -> Result<DeviceRestore, DbError> {
        let r = testing::restore(&self.db)?;
        Ok(DeviceRestore {
            cursor: r.cursor,
            outbox: r.outbox,
            last_hlc: r.last_hlc,
            mark: r.mark,
            answered: r.answered,
        })
    }
}

#[test]
fn agent_device_state_conforms() {
    run_device_suite(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let schema = Arc::new(devtables_conformance::schema());
        let db = Db::open(
            dir.path().join("device.db"),
            schema.clone(),
            DbOptions::default(),
        )
        .expect("device db");
        let clock = testing::install_recorder(&db, schema.clone(), 7).expect("outbox recorder");
        AgentState {
            db,
            schema,
            clock,
            _dir: dir,
        }
    });
}
