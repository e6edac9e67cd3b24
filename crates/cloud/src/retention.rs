//! The service's retention task: every `purge_interval` it purges old tombstones (with their
//! feed entries and the conflict log beyond its limit) and the change log beyond its retention.
//!
//! It exists apart from `service` because a pass is several store calls, not one: each call of
//! [`CloudStore::purge`] and [`CloudStore::purge_changes`] is one transaction bounded by its
//! `batch`, and the task calls again while a call says there is more, yielding in between. Each
//! call is its own job on the store thread, so the device work that queued meanwhile runs
//! between two batches instead of waiting for the whole backlog; on PostgreSQL, each batch holds
//! its owners' locks only for its own length. In a cluster only the leading node runs retention
//! ([`Serving::leads`]), and a node that stops leading stops between two batches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cluster::Serving;
use crate::status::SyncStatus;
use crate::store::{
    ChangePurgeStats, ChangeRetention, CloudStore, PurgeStats, Retention, StoreError,
};
use crate::store_thread::{wall_ms, StoreGone, StoreHandle};

/// What one pass did: the sums of its calls, and how many calls (transactions) each took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PassReport {
    pub tombstones: PurgeStats,
    pub tombstone_calls: u64,
    pub changes_removed: u64,
    /// The change log's size the last call counted, if one did.
    pub changes_kept: Option<u64>,
    pub change_calls: u64,
}

/// The retention task's parts.
pub(crate) struct RetentionTask {
    pub store: StoreHandle,
    pub retention: Retention,
    pub changes: ChangeRetention,
    pub interval: Duration,
    pub status: Arc<SyncStatus>,
    /// What this node serves: retention runs only while it [`Serving::leads`].
    pub leading: watch::Receiver<Serving>,
    pub shutdown: watch::Receiver<bool>,
}

impl RetentionTask {
    /// Runs a pass every interval until shutdown or the store thread is gone.
    pub(crate) async fn run(mut self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.shutdown.wait_for(|stop| *stop) => return,
            }
            if !self.may_run() {
                continue;
            }
            if self.pass(wall_ms()).await.is_err() {
                return;
            }
        }
    }

    /// Whether a batch may run now: this node leads and the service is not stopping.
    fn may_run(&self) -> bool {
        self.leading.borrow().leads() && !*self.shutdown.borrow()
    }

    /// One pass at `now_ms`: the tombstones, then the change log, each in batches until a call
    /// says there is no more (or this node stops leading, or a call fails: the next pass goes
    /// on from what this one left).
    pub(crate) async fn pass(&mut self, now_ms: u64) -> Result<PassReport, StoreGone> {
        let mut report = PassReport::default();
        let retention = self.retention;
        let mut failed = false;
        while self.may_run() {
            report.tombstone_calls += 1;
            match self
                .store
                .call(move |c| c.store.purge(now_ms, &retention))
                .await?
            {
                Ok(stats) => {
                    report.tombstones.add(stats);
                    if !stats.more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!("retention failed: {e}");
                    failed = true;
                    break;
                }
            }
            // Let the work that queued meanwhile reach the store before the next batch.
            tokio::task::yield_now().await;
        }
        if !failed && report.tombstone_calls > 0 {
            tracing::info!(
                stats = ?report.tombstones,
                transactions = report.tombstone_calls,
                "retention applied"
            );
        }
        let changes = self.changes;
        let mut failed = false;
        while self.may_run() {
            report.change_calls += 1;
            match self
                .store
                .call(move |c| c.store.purge_changes(now_ms, &changes))
                .await?
            {
                Ok(stats) => {
                    report.changes_removed += stats.removed;
                    if stats.kept.is_some() {
                        report.changes_kept = stats.kept;
                    }
                    if !stats.more {
                        break;
                    }
                }
                Err(e) => {
                    tracing::error!("change log retention failed: {e}");
                    failed = true;
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        if let Some(kept) = report.changes_kept {
            self.status.change_log_rows.store(kept, Ordering::Relaxed);
        }
        if !failed && report.change_calls > 0 {
            tracing::info!(
                removed = report.changes_removed,
                kept = ?report.changes_kept,
                transactions = report.change_calls,
                "change log retention applied"
            );
        }
        Ok(report)
    }
}

/// The change log's retention at start, before the service serves anything (blocking, on the
/// thread that opens the store): batches until none is left; returns the entries kept.
pub(crate) fn purge_changes_at_start(
    store: &mut dyn CloudStore,
    retention: &ChangeRetention,
) -> Result<u64, StoreError> {
    let now = wall_ms();
    loop {
        let ChangePurgeStats { kept, more, .. } = store.purge_changes(now, retention)?;
        if !more {
            return Ok(kept.unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use devtables_schema::Schema;
    use devtables_sync::apply::CloudOp;
    use devtables_sync::hlc::{node_id_for, HlcClock};
    use devtables_sync::identity::{DeviceId, Owner};

    use super::*;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};
    use crate::store_thread::StoreCtx;

    const NOW: u64 = 1_795_629_600_000;

    fn schema() -> Schema {
        Schema::from_json5(
            "{format: 'onetable:1.1.0', version: '1', \
             indexes: {primary: {hash: 'pk', sort: 'sk'}}, process: {N: {sync: 'down'}}, \
             models: {N: {pk: {type: 'string', value: 'd#${deviceId}'}, \
             sk: {type: 'string', value: 'n#${name}'}, deviceId: {type: 'string', required: true}, \
             name: {type: 'string', required: true}}}}",
        )
        .unwrap()
    }

    /// A store with one device, `n` items written and deleted at [`NOW`] (so `n` tombstones and
    /// `2n` change-log entries), on a store thread.
    fn store_with_tombstones(dir: &std::path::Path, n: usize) -> StoreHandle {
        let schema = schema();
        let mut store = SqliteStore::open(&dir.join("cloud.db"), SqliteOptions::default()).unwrap();
        let d = DeviceId::new("a", "d1").unwrap();
        store.register_device(&d, "hash", None, NOW).unwrap();
        let owner = Owner::Device(d);
        let mut clock = HlcClock::new(node_id_for("t"));
        for i in 0..n {
            let input = serde_json::json!({"deviceId": "d1", "name": format!("k{i}")});
            let item = schema
                .model("N")
                .unwrap()
                .prepare_create(input.as_object().unwrap(), NOW as i64)
                .unwrap();
            let (put, _) = store
                .write(
                    &schema,
                    &mut clock,
                    NOW,
                    1 << 20,
                    &owner,
                    "N",
                    CloudOp::Put(item),
                )
                .unwrap();
            store
                .write(
                    &schema,
                    &mut clock,
                    NOW,
                    1 << 20,
                    &owner,
                    "N",
                    CloudOp::Delete(put.key),
                )
                .unwrap();
        }
        let ctx = StoreCtx::new(Box::new(store), clock, Arc::new(schema));
        StoreHandle::spawn(ctx, 16, Box::new(|_| {})).unwrap()
    }

    fn task(store: StoreHandle, serving: Serving, batch: u64) -> RetentionTask {
        let (_, leading) = watch::channel(serving);
        let (_, shutdown) = watch::channel(false);
        RetentionTask {
            store,
            retention: Retention {
                tombstone_ms: 1000,
                max_conflicts: 100,
                batch,
            },
            changes: ChangeRetention {
                max_age_ms: 1000,
                max_per_account: 1_000_000,
                batch,
            },
            interval: Duration::from_secs(3600),
            status: Arc::new(SyncStatus::default()),
            leading,
            shutdown,
        }
    }

    #[tokio::test]
    async fn a_pass_purges_a_backlog_in_batches_until_none_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_tombstones(dir.path(), 7);
        let mut t = task(store.clone(), Serving::All, 3);
        let report = t.pass(NOW + 10_000).await.unwrap();
        // 7 tombstones at 3 a call: 3, 3, 1. 14 change-log entries at 3 a call: four full
        // calls, then one that removes the last 2 and counts what is left.
        assert_eq!(
            (report.tombstones.tombstones, report.tombstone_calls),
            (7, 3),
            "{report:?}"
        );
        assert!(!report.tombstones.more);
        assert_eq!(
            (
                report.changes_removed,
                report.changes_kept,
                report.change_calls
            ),
            (14, Some(0), 5),
            "{report:?}"
        );
        assert_eq!(t.status.change_log_rows.load(Ordering::Relaxed), 0);
        // Nothing is left for the next pass.
        let again = t.pass(NOW + 10_000).await.unwrap();
        assert_eq!(
            (
                again.tombstones.tombstones,
                again.tombstone_calls,
                again.change_calls
            ),
            (0, 1, 1)
        );
    }

    #[tokio::test]
    async fn a_node_that_does_not_lead_purges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_tombstones(dir.path(), 2);
        let mut t = task(store.clone(), Serving::nothing(4), 3);
        let report = t.pass(NOW + 10_000).await.unwrap();
        assert_eq!(report, PassReport::default());
        // The tombstones are still there for the node that leads.
        let retention = t.retention;
        let purged = store
            .call(move |c| c.store.purge(NOW + 10_000, &retention))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(purged.tombstones, 2);
    }
}
