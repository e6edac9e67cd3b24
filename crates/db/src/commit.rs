//! Durability: group commit for `immediate` mode, a bounded flush delay for `periodic` mode.
//!
//! A write transaction appends its record to the log without `fdatasync` (atomic, in the
//! operating system's cache) unless it is a lone writer in `immediate` mode, which commits
//! durably at once (see `Db::write`). Otherwise durability is reached by a *flush*: one
//! `LogStore::sync`, which makes every earlier commit durable. In `immediate` mode each writer
//! waits until a flush (or a later durable commit) covers its commit; concurrent writers share
//! one flush (the first to arrive leads, the rest wait for it), so N writers pay for about one
//! fsync, not N. In `periodic` mode the background thread flushes every interval, so a crash
//! loses at most that window and, each commit being one checksummed record, never leaves a
//! torn state.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::DbError;

#[derive(Default)]
struct FlushState {
    /// Sequence number of the last committed (possibly not yet durable) transaction.
    committed: u64,
    /// Every transaction with a sequence number up to this one is on disk.
    durable: u64,
    /// A flush is running; waiters sleep on the condvar instead of starting another.
    flushing: bool,
}

pub(crate) struct Committer {
    state: Mutex<FlushState>,
    done: Condvar,
}

impl Committer {
    pub(crate) fn new() -> Self {
        Committer {
            state: Mutex::new(FlushState::default()),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a commit; the caller holds the write lock, so sequence numbers follow commit order.
    pub(crate) fn committed(&self) -> u64 {
        let mut s = self.lock();
        s.committed += 1;
        s.committed
    }

    /// A commit made with `Durability::Immediate` persisted itself and everything before it.
    pub(crate) fn mark_durable(&self, seq: u64) {
        let mut s = self.lock();
        s.durable = s.durable.max(seq);
        self.done.notify_all();
    }

    pub(crate) fn durable(&self) -> u64 {
        self.lock().durable
    }

    pub(crate) fn has_unflushed(&self) -> bool {
        let s = self.lock();
        s.committed > s.durable
    }

    /// Blocks until the commit `seq` is durable, leading a flush when none is running.
    pub(crate) fn wait_durable(
        &self,
        seq: u64,
        flush: impl Fn() -> Result<(), DbError>,
    ) -> Result<(), DbError> {
        let mut s = self.lock();
        loop {
            if s.durable >= seq {
                return Ok(());
            }
            if !s.flushing {
                s.flushing = true;
                let target = s.committed;
                drop(s);
                let result = flush();
                s = self.lock();
                s.flushing = false;
                if result.is_ok() {
                    s.durable = s.durable.max(target);
                }
                self.done.notify_all();
                result?;
                continue;
            }
            s = self.done.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Flushes whatever is committed now (the periodic flusher and `Db::flush`).
    pub(crate) fn flush_all(&self, flush: impl Fn() -> Result<(), DbError>) -> Result<(), DbError> {
        let target = self.lock().committed;
        self.wait_durable(target, flush)
    }
}
