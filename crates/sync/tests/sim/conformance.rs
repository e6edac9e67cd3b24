//! The store-conformance suite against the simulation's stores, so the simulation runs over
//! stores that keep the same contract as the SQLite store and the agent's device state.

use devtables_conformance::{
    run_cloud_suite, run_device_suite, CloudStoreUnderTest, DeviceRestore, DeviceStoreUnderTest,
    RepushDone,
};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::{CloudTxn, DeviceTxn, PushCounts, StoredVersion};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::DeviceId;

use crate::stores::{CTxn, CloudStore, DevStore, DevTxn, StoreError};

struct SimCloud {
    store: CloudStore,
    /// The fan-out batch the store claims to keep (what the suite is told): its own
    /// `fanout_batch`, except in the check that the suite fails a store that does not keep it.
    claimed_batch: usize,
}

impl CloudStoreUnderTest for SimCloud {
    type Error = StoreError;
    fn txn<R>(
        &mut self,
        now_ms: u64,
        commit: bool,
        f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut t = CTxn::begin(&self.store, now_ms, None);
        let r = f(&mut t)?;
        if commit {
            self.store = t.s;
        }
        Ok(r)
    }
    fn register_device(&mut self, id: &DeviceId, _now_ms: u64) -> Result<(), StoreError> {
        self.store.register_device(id);
        Ok(())
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
        Ok(self.store.purge(now_ms, retention_ms))
    }
    fn new_run(&mut self) -> Result<(), StoreError> {
        let next = self.store.run + 1;
        self.store.new_run(next);
        Ok(())
    }
    fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
        Ok(self.store.max_version())
    }
    fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
        Ok(self.store.counts.get(id).copied().unwrap_or_default())
    }
    fn conflicts(&mut self, account: &str) -> Result<u64, StoreError> {
        Ok(self
            .store
            .conflicts
            .iter()
            .filter(|c| c.owner.account() == account)
            .count() as u64)
    }
    fn fanout_batch(&self) -> usize {
        self.claimed_batch
    }
    fn fanout_step(&mut self) -> Result<Option<Vec<DeviceId>>, StoreError> {
        Ok(self.store.fanout_step())
    }
}

struct SimDevice {
    store: DevStore,
    schema: Schema,
    clock: HlcClock,
}

impl DeviceStoreUnderTest for SimDevice {
    type Error = StoreError;
    fn txn<R>(
        &mut self,
        commit: bool,
        f: impl FnOnce(&mut dyn DeviceTxn<Error = StoreError>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut t = DevTxn::begin(&self.store, &self.schema, None);
        let r = f(&mut t)?;
        if commit {
            self.store = t.s;
        }
        Ok(r)
    }
    fn item(&mut self, key: &ItemKey) -> Result<Option<(String, Item)>, StoreError> {
        Ok(self
            .store
            .items
            .get(key)
            .and_then(|r| r.item.clone().map(|i| (r.model.clone(), i))))
    }
    fn version(&mut self, key: &ItemKey) -> Result<Option<StoredVersion>, StoreError> {
        Ok(self.store.items.get(key).map(|r| StoredVersion {
            version: r.version,
            deleted: r.item.is_none(),
        }))
    }
    fn local_write(
        &mut self,
        model: &str,
        fields: &Item,
        delete: bool,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut s = self.store.clone();
        s.local_write(&self.schema, &mut self.clock, now_ms, model, fields, delete)?;
        self.store = s;
        Ok(())
    }
    fn outbox_remove(
        &mut self,
        acked: &[(String, ItemKey, Hlc)],
        answered: Option<u64>,
    ) -> Result<(), StoreError> {
        self.store.outbox_remove(acked, answered);
        Ok(())
    }
    fn store_answered(&mut self, answered: u64) -> Result<(), StoreError> {
        self.store.answered = answered;
        Ok(())
    }
    fn repush(&mut self, slice: usize) -> Result<RepushDone, StoreError> {
        let mut done = RepushDone::default();
        let mut after = None;
        loop {
            let (added, next) = self.store.repush_slice(&self.schema, after.as_ref(), slice);
            done.requeued += added.len() as u64;
            done.slices += 1;
            match next {
                Some(k) => after = Some(k),
                None => return Ok(done),
            }
        }
    }
    fn restore(&mut self) -> Result<DeviceRestore, StoreError> {
        let r = self.store.restored();
        Ok(DeviceRestore {
            cursor: r.cursor,
            outbox: self.store.outbox_changes(),
            last_hlc: self.store.hlc,
            mark: r.mark,
            answered: r.answered,
        })
    }
}

/// The fan-out batch of the simulation's cloud store under the suite.
const SUITE_FANOUT_BATCH: usize = 3;

fn sim_cloud() -> SimCloud {
    let mut store = CloudStore::default();
    store.new_run(1);
    store.fanout_batch = SUITE_FANOUT_BATCH;
    SimCloud {
        store,
        claimed_batch: SUITE_FANOUT_BATCH,
    }
}

#[test]
fn sim_cloud_store_conforms() {
    run_cloud_suite(sim_cloud);
}

#[test]
fn sim_device_store_conforms() {
    run_device_suite(|| SimDevice {
        store: DevStore::default(),
        schema: devtables_conformance::schema(),
        clock: HlcClock::new(42),
    });
}

#[test]
fn the_suite_fails_a_cloud_store_that_fans_a_broadcast_out_in_one_transaction() {
    let msg = failure_of(|| {
        run_cloud_suite(|| {
            let mut s = sim_cloud();
            // Every device at once, whatever batch it claims.
            s.store.fanout_batch = 0;
            s
        })
    });
    for check in [
        "a_broadcast_to_a_large_account_fans_out_in_bounded_steps",
        "a_rewrite_restarts_a_fan_out_and_a_purge_ends_it",
    ] {
        assert!(msg.contains(check), "{check} not reported in: {msg}");
    }
    assert!(
        !msg.contains("broadcast_rows_fan_out_to_every_device_of_the_account"),
        "{msg}"
    );
}

/// Runs a suite expected to fail and returns its panic message.
fn failure_of(run: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let err = std::panic::catch_unwind(run).expect_err("the suite passed a broken store");
    err.downcast_ref::<String>().cloned().unwrap_or_default()
}

#[test]
fn the_suite_fails_a_cloud_store_whose_purge_forgets_the_watermark() {
    struct Forgetful(SimCloud);
    impl CloudStoreUnderTest for Forgetful {
        type Error = StoreError;
        fn txn<R>(
            &mut self,
            now_ms: u64,
            commit: bool,
            f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
        ) -> Result<R, StoreError> {
            self.0.txn(now_ms, commit, f)
        }
        fn register_device(&mut self, id: &DeviceId, now_ms: u64) -> Result<(), StoreError> {
            self.0.register_device(id, now_ms)
        }
        fn read_feed(
            &mut self,
            id: &DeviceId,
            after: u64,
            limit: usize,
        ) -> Result<FeedPage, StoreError> {
            self.0.read_feed(id, after, limit)
        }
        fn read_snapshot(
            &mut self,
            schema: &Schema,
            id: &DeviceId,
            resync: u64,
            from: Option<&SnapshotCursor>,
            limit: usize,
        ) -> Result<SnapshotPage, StoreError> {
            self.0.read_snapshot(schema, id, resync, from, limit)
        }
        fn purge(&mut self, now_ms: u64, retention_ms: u64) -> Result<u64, StoreError> {
            let n = self.0.purge(now_ms, retention_ms)?;
            self.0.store.watermarks.clear();
            Ok(n)
        }
        fn new_run(&mut self) -> Result<(), StoreError> {
            self.0.new_run()
        }
        fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
            self.0.max_version()
        }
        fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
            self.0.push_counts(id)
        }
        fn conflicts(&mut self, account: &str) -> Result<u64, StoreError> {
            self.0.conflicts(account)
        }
        fn fanout_batch(&self) -> usize {
            self.0.fanout_batch()
        }
        fn fanout_step(&mut self) -> Result<Option<Vec<DeviceId>>, StoreError> {
            self.0.fanout_step()
        }
    }
    let msg = failure_of(|| run_cloud_suite(|| Forgetful(sim_cloud())));
    for check in [
        "purge_removes_old_tombstones_with_their_feed_entries",
        "purge_watermark_only_rises_and_is_per_owner",
        "max_version_covers_items_tombstones_and_watermarks",
        "every_write_meets_the_watermark_of_a_purged_key",
    ] {
        assert!(msg.contains(check), "{check} not reported in: {msg}");
    }
    assert!(!msg.contains("count_push_adds_up"), "{msg}");
}

#[test]
fn the_suite_fails_a_device_store_that_loses_outbox_entries() {
    struct Lossy(SimDevice);
    impl DeviceStoreUnderTest for Lossy {
        type Error = StoreError;
        fn txn<R>(
            &mut self,
            commit: bool,
            f: impl FnOnce(&mut dyn DeviceTxn<Error = StoreError>) -> Result<R, StoreError>,
        ) -> Result<R, StoreError> {
            self.0.txn(commit, f)
        }
        fn item(&mut self, key: &ItemKey) -> Result<Option<(String, Item)>, StoreError> {
            self.0.item(key)
        }
        fn version(&mut self, key: &ItemKey) -> Result<Option<StoredVersion>, StoreError> {
            self.0.version(key)
        }
        fn local_write(
            &mut self,
            model: &str,
            fields: &Item,
            delete: bool,
            now_ms: u64,
        ) -> Result<(), StoreError> {
            self.0.local_write(model, fields, delete, now_ms)?;
            // The bug: the item commits without its outbox entry.
            self.0.store.outbox.clear();
            Ok(())
        }
        fn outbox_remove(
            &mut self,
            acked: &[(String, ItemKey, Hlc)],
            answered: Option<u64>,
        ) -> Result<(), StoreError> {
            self.0.outbox_remove(acked, answered)
        }
        fn store_answered(&mut self, answered: u64) -> Result<(), StoreError> {
            self.0.store_answered(answered)
        }
        fn repush(&mut self, slice: usize) -> Result<RepushDone, StoreError> {
            self.0.repush(slice)
        }
        fn restore(&mut self) -> Result<DeviceRestore, StoreError> {
            self.0.restore()
        }
    }
    let msg = failure_of(|| {
        run_device_suite(|| {
            Lossy(SimDevice {
                store: DevStore::default(),
                schema: devtables_conformance::schema(),
                clock: HlcClock::new(42),
            })
        })
    });
    assert!(
        msg.contains("local_writes_record_one_pending_entry_per_key"),
        "{msg}"
    );
    assert!(
        msg.contains("sweep_deletes_only_unseen_unpending_down_items"),
        "{msg}"
    );
    assert!(!msg.contains("apply_keeps_the_highest_version"), "{msg}");
}

#[test]
fn the_suite_fails_stores_that_keep_no_restore_marks() {
    // A cloud store whose runs never start a feed generation: a restored cloud could not tell a
    // device's cursor from one it handed out again.
    struct NoGenerations(SimCloud);
    impl CloudStoreUnderTest for NoGenerations {
        type Error = StoreError;
        fn txn<R>(
            &mut self,
            now_ms: u64,
            commit: bool,
            f: impl FnOnce(&mut dyn CloudTxn<Error = StoreError>) -> Result<R, StoreError>,
        ) -> Result<R, StoreError> {
            self.0.txn(now_ms, commit, f)
        }
        fn register_device(&mut self, id: &DeviceId, now_ms: u64) -> Result<(), StoreError> {
            self.0.register_device(id, now_ms)
        }
        fn read_feed(
            &mut self,
            id: &DeviceId,
            after: u64,
            limit: usize,
        ) -> Result<FeedPage, StoreError> {
            self.0.read_feed(id, after, limit)
        }
        fn read_snapshot(
            &mut self,
            schema: &Schema,
            id: &DeviceId,
            resync: u64,
            from: Option<&SnapshotCursor>,
            limit: usize,
        ) -> Result<SnapshotPage, StoreError> {
            self.0.read_snapshot(schema, id, resync, from, limit)
        }
        fn purge(&mut self, now_ms: u64, retention_ms: u64) -> Result<u64, StoreError> {
            self.0.purge(now_ms, retention_ms)
        }
        fn new_run(&mut self) -> Result<(), StoreError> {
            // The bug: the process keeps the run of the store it opened first.
            Ok(())
        }
        fn max_version(&mut self) -> Result<Option<Hlc>, StoreError> {
            self.0.max_version()
        }
        fn push_counts(&mut self, id: &DeviceId) -> Result<PushCounts, StoreError> {
            self.0.push_counts(id)
        }
        fn conflicts(&mut self, account: &str) -> Result<u64, StoreError> {
            self.0.conflicts(account)
        }
        fn fanout_batch(&self) -> usize {
            self.0.fanout_batch()
        }
        fn fanout_step(&mut self) -> Result<Option<Vec<DeviceId>>, StoreError> {
            self.0.fanout_step()
        }
    }
    let msg = failure_of(|| run_cloud_suite(|| NoGenerations(sim_cloud())));
    assert!(
        msg.contains("a_feed_starts_a_new_generation_once_per_run"),
        "{msg}"
    );
    assert!(!msg.contains("count_push_adds_up"), "{msg}");

    // A device store whose re-push forgets tombstones: an acknowledged delete a restored cloud
    // lost would never come back.
    struct NoTombstones(SimDevice);
    impl DeviceStoreUnderTest for NoTombstones {
        type Error = StoreError;
        fn txn<R>(
            &mut self,
            commit: bool,
            f: impl FnOnce(&mut dyn DeviceTxn<Error = StoreError>) -> Result<R, StoreError>,
        ) -> Result<R, StoreError> {
            self.0.txn(commit, f)
        }
        fn item(&mut self, key: &ItemKey) -> Result<Option<(String, Item)>, StoreError> {
            self.0.item(key)
        }
        fn version(&mut self, key: &ItemKey) -> Result<Option<StoredVersion>, StoreError> {
            self.0.version(key)
        }
        fn local_write(
            &mut self,
            model: &str,
            fields: &Item,
            delete: bool,
            now_ms: u64,
        ) -> Result<(), StoreError> {
            self.0.local_write(model, fields, delete, now_ms)
        }
        fn outbox_remove(
            &mut self,
            acked: &[(String, ItemKey, Hlc)],
            answered: Option<u64>,
        ) -> Result<(), StoreError> {
            self.0.outbox_remove(acked, answered)
        }
        fn store_answered(&mut self, answered: u64) -> Result<(), StoreError> {
            self.0.store_answered(answered)
        }
        fn repush(&mut self, slice: usize) -> Result<RepushDone, StoreError> {
            let done = self.0.repush(slice)?;
            let deletes: Vec<ItemKey> = self
                .0
                .store
                .outbox
                .iter()
                .filter(|(_, (_, c))| c.item.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            for k in &deletes {
                self.0.store.outbox.remove(k);
            }
            Ok(RepushDone {
                requeued: done.requeued - deletes.len() as u64,
                ..done
            })
        }
        fn restore(&mut self) -> Result<DeviceRestore, StoreError> {
            self.0.restore()
        }
    }
    let msg = failure_of(|| {
        run_device_suite(|| {
            NoTombstones(SimDevice {
                store: DevStore::default(),
                schema: devtables_conformance::schema(),
                clock: HlcClock::new(42),
            })
        })
    });
    assert!(
        msg.contains("repush_requeues_every_held_write_of_up_syncing_models"),
        "{msg}"
    );
    assert!(!msg.contains("apply_keeps_the_highest_version"), "{msg}");
}
