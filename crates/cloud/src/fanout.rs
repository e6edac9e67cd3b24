//! The service's fan-out task: it works off the broadcast fan-outs the store holds pending
//! ([`CloudStore::fanout_step`](crate::store::CloudStore::fanout_step)), one bounded step per store job, and hands each step's devices
//! to the sync loop, which prompts them.
//!
//! It exists apart from the store thread because handing devices to the sync loop may wait
//! (its queue is bounded) and the store thread must never wait on the loop, which waits on the
//! store. Each step is its own job, so the pushes that queued meanwhile run between two steps:
//! a broadcast to 10,000 devices no longer holds the store for the whole fan-out.
//!
//! The store thread wakes the task when a job leaves a fan-out pending
//! ([`CloudStore::fanout_pending_hint`](crate::store::CloudStore::fanout_pending_hint)); the task also looks every [`SWEEP`], for fan-outs
//! another node of a scaled-out cloud queued and did not finish (a node killed mid-fan-out).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};

use crate::status::SyncStatus;
use crate::store_thread::StoreHandle;
use crate::sync_loop::SyncInput;

/// How often the task looks for pending fan-outs without being woken.
pub(crate) const SWEEP: Duration = Duration::from_secs(5);

/// The fan-out task's parts.
pub(crate) struct FanoutTask {
    pub store: StoreHandle,
    pub sync: mpsc::Sender<SyncInput>,
    /// Notified by the store thread when a job left a fan-out pending.
    pub wake: Arc<Notify>,
    pub status: Arc<SyncStatus>,
    pub shutdown: watch::Receiver<bool>,
}

impl FanoutTask {
    /// Steps pending fan-outs whenever woken (or every [`SWEEP`]) until shutdown.
    pub(crate) async fn run(mut self) {
        loop {
            match self.settle().await {
                Ok(()) => {}
                Err(Stop) => return,
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(SWEEP) => {}
                _ = self.shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Steps until no fan-out is pending (or a step fails: retried at the next wake or sweep).
    async fn settle(&mut self) -> Result<(), Stop> {
        loop {
            let step = self
                .store
                .call(|ctx| ctx.store.fanout_step())
                .await
                .map_err(|_| Stop)?;
            match step {
                Ok(None) => return Ok(()),
                Ok(Some(advanced)) => {
                    self.status.fanout_steps.fetch_add(1, Ordering::Relaxed);
                    self.status
                        .fanout_devices
                        .fetch_add(advanced.len() as u64, Ordering::Relaxed);
                    if !advanced.is_empty() {
                        self.sync
                            .send(SyncInput::FeedAdvanced(advanced))
                            .await
                            .map_err(|_| Stop)?;
                    }
                }
                Err(e) => {
                    self.status.fanout_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "a broadcast fan-out step failed; it is retried within {} s: {e}",
                        SWEEP.as_secs()
                    );
                    return Ok(());
                }
            }
        }
    }
}

/// The store thread or the sync loop is gone: the service is stopping.
struct Stop;
