//! The thread that owns the cloud store, and the handle every other part of the service uses to
//! run work on it.
//!
//! This module exists as a leaf: the HTTP API, the application operations and the sync loop all
//! need the store, and none of them may depend on the others for it (they used to reach it
//! through `service`, which depends on them: an import circle).
//!
//! The store runs on one thread of its own: the store is synchronous, and one writer is what the
//! per-device feed sequence needs. The cloud's HLC lives there too, so every versioned write
//! (device pushes and API writes alike) ticks the same clock in store order.

use std::sync::Arc;

use devtables_schema::Schema;
use devtables_sync::hlc::HlcClock;
use tokio::sync::{mpsc, oneshot};

use crate::store::CloudStore;

/// Everything the store thread owns.
pub struct StoreCtx {
    pub store: Box<dyn CloudStore>,
    /// The cloud's hybrid logical clock.
    pub clock: HlcClock,
    pub schema: Arc<Schema>,
}

/// One piece of work for the store thread.
pub(crate) type Job = Box<dyn FnOnce(&mut StoreCtx) + Send>;

/// The store thread went away (the service is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the cloud store has stopped")]
pub struct StoreGone;

/// Runs closures on the store thread, one at a time, in arrival order.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: mpsc::Sender<Job>,
}

impl StoreHandle {
    /// Most jobs waiting for the store; callers wait (asynchronously) beyond it.
    const QUEUE: usize = 1024;

    pub fn spawn(mut ctx: StoreCtx) -> std::io::Result<StoreHandle> {
        let (jobs, mut rx) = mpsc::channel::<Job>(Self::QUEUE);
        std::thread::Builder::new()
            .name("devtables-store".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut ctx);
                }
            })?;
        Ok(StoreHandle { jobs })
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut StoreCtx) -> R + Send + 'static,
    ) -> Result<R, StoreGone> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        self.jobs.send(job).await.map_err(|_| StoreGone)?;
        rx.await.map_err(|_| StoreGone)
    }

    /// Runs `f` on the store thread and waits for its result, blocking this thread: for code
    /// that runs outside the async runtime's workers (the broker's authenticator runs on a
    /// `spawn_blocking` thread).
    pub fn call_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut StoreCtx) -> R + Send + 'static,
    ) -> Result<R, StoreGone> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        self.jobs.blocking_send(job).map_err(|_| StoreGone)?;
        rx.blocking_recv().map_err(|_| StoreGone)
    }

    /// Queues a job that reports its own completion (the sync loop's jobs send their results
    /// back over a channel, so the loop never waits for the store).
    pub(crate) async fn submit(&self, job: Job) -> Result<(), StoreGone> {
        self.jobs.send(job).await.map_err(|_| StoreGone)
    }
}

/// Wall-clock milliseconds (for HLC physical time and records).
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
