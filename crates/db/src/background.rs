//! Where a database's background work runs: the periodic flush (`periodic` durability), the
//! log's compaction and the TTL purge.
//!
//! By default every open database has a thread of its own, which is what a device wants (one
//! database, work never delayed by another's). A process that holds thousands of small
//! databases (the fleet simulator runs one per simulated device) cannot afford a thread each:
//! with [`Background::Shared`] they all share one thread, which runs each database's work when
//! it is due, earliest first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crate::Inner;

/// Where a database's background work (periodic flush, TTL purge) runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Background {
    /// A thread of its own (the default).
    #[default]
    OwnThread,
    /// One thread shared by every database of the process opened with this setting. A slow
    /// flush of one delays the work of the others; a flush still never waits for more than one
    /// database's work.
    Shared,
}

/// The running background work of one database; [`Worker::stop`] ends it.
pub(crate) enum Worker {
    Thread {
        /// Dropping it ends the thread.
        stop: mpsc::Sender<()>,
        handle: JoinHandle<()>,
    },
    Shared {
        /// This database's entry in the shared thread's table.
        id: u64,
    },
}

impl Worker {
    pub(crate) fn start(inner: &Arc<Inner>) -> std::io::Result<Worker> {
        let tick = tick(inner);
        match inner.options.background {
            Background::OwnThread => {
                let (stop, stop_rx) = mpsc::channel();
                let weak = Arc::downgrade(inner);
                let handle = std::thread::Builder::new()
                    .name("devtables-db".into())
                    .spawn(move || own_thread(weak, stop_rx, tick))?;
                Ok(Worker::Thread { stop, handle })
            }
            Background::Shared => {
                let id = shared().register(Arc::downgrade(inner), tick)?;
                Ok(Worker::Shared { id })
            }
        }
    }

    /// Ends the work: when this returns, no background work of this database runs (unless it
    /// is called from that work itself).
    pub(crate) fn stop(self) {
        match self {
            Worker::Thread { stop, handle } => {
                drop(stop);
                if handle.thread().id() != std::thread::current().id() {
                    let _ = handle.join();
                }
            }
            Worker::Shared { id } => shared().deregister(id),
        }
    }
}

/// How often the work of `inner` is looked at.
fn tick(inner: &Inner) -> Duration {
    let options = &inner.options;
    let mut tick = options.ttl_purge_interval;
    if let crate::Durability::Periodic { interval } = options.durability {
        tick = tick.min(interval);
    }
    tick.max(Duration::from_millis(1))
}

/// One tick of work: the periodic flush if anything waits for it, a compaction of the log
/// when its garbage outweighs its live data, the TTL purge when due.
fn maintain(inner: &Arc<Inner>, since_purge: &mut Duration, tick: Duration) {
    if matches!(inner.options.durability, crate::Durability::Periodic { .. })
        && inner.committer.has_unflushed()
    {
        if let Err(e) = inner.committer.flush_all(|| inner.flush()) {
            tracing::error!(path = %inner.path.display(), "periodic flush failed: {e}");
        }
    }
    // Cheap when not worth it (a look at two sizes); when it is, it takes the store's writer
    // slot for the rewrite, so writers wait that long. A failure leaves the old file whole.
    match inner.store.compact_if_worth() {
        Ok(true) => {
            let stats = inner.store.stats();
            tracing::debug!(
                path = %inner.path.display(),
                file_bytes = stats.file_bytes,
                "compacted the database log"
            );
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(path = %inner.path.display(), "compacting the database log failed (it stays as it was; tried again later): {e}")
        }
    }
    *since_purge += tick;
    if *since_purge >= inner.options.ttl_purge_interval {
        *since_purge = Duration::ZERO;
        if let Err(e) = crate::purge_expired(inner) {
            tracing::error!(path = %inner.path.display(), "TTL purge failed: {e}");
        }
    }
}

/// A database's own thread. Holds only a weak reference: the database closes when the last
/// `Db` is dropped, which also ends this thread.
fn own_thread(inner: Weak<Inner>, stop: mpsc::Receiver<()>, tick: Duration) {
    let mut since_purge = Duration::ZERO;
    loop {
        match stop.recv_timeout(tick) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        maintain(&inner, &mut since_purge, tick);
    }
}

/// The thread shared by the databases opened with [`Background::Shared`].
struct Shared {
    state: Mutex<SharedState>,
    /// Signalled when an entry is added or a piece of work ends.
    changed: Condvar,
    /// The shared thread, once started (work that closes its own database must not wait for
    /// itself).
    thread: OnceLock<ThreadId>,
}

#[derive(Default)]
struct SharedState {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    /// (due, id), earliest first; entries removed since stay here until popped.
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The entry whose work runs now.
    busy: Option<u64>,
    started: bool,
}

struct Entry {
    db: Weak<Inner>,
    tick: Duration,
    since_purge: Duration,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        state: Mutex::new(SharedState::default()),
        changed: Condvar::new(),
        thread: OnceLock::new(),
    })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&'static self, db: Weak<Inner>, tick: Duration) -> std::io::Result<u64> {
        let mut s = self.lock();
        if !s.started {
            let handle = std::thread::Builder::new()
                .name("devtables-db-shared".into())
                .spawn(move || self.run())?;
            let _ = self.thread.set(handle.thread().id());
            s.started = true;
        }
        s.next_id += 1;
        let id = s.next_id;
        s.entries.insert(
            id,
            Entry {
                db,
                tick,
                since_purge: Duration::ZERO,
            },
        );
        s.queue.push(Reverse((Instant::now() + tick, id)));
        self.changed.notify_all();
        Ok(id)
    }

    fn deregister(&self, id: u64) {
        let on_shared_thread = self.thread.get() == Some(&std::thread::current().id());
        let mut s = self.lock();
        s.entries.remove(&id);
        while s.busy == Some(id) && !on_shared_thread {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn run(&self) {
        let mut s = self.lock();
        loop {
            let Some(&Reverse((due, id))) = s.queue.peek() else {
                s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let now = Instant::now();
            if due > now {
                s = self
                    .changed
                    .wait_timeout(s, due - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            s.queue.pop();
            let Some(entry) = s.entries.get(&id) else {
                continue; // closed since it was queued
            };
            let (db, tick, mut since_purge) = (entry.db.clone(), entry.tick, entry.since_purge);
            s.busy = Some(id);
            drop(s);
            let alive = match db.upgrade() {
                Some(inner) => {
                    maintain(&inner, &mut since_purge, tick);
                    true
                }
                None => false,
            };
            s = self.lock();
            s.busy = None;
            match s.entries.get_mut(&id) {
                Some(entry) if alive => {
                    entry.since_purge = since_purge;
                    s.queue.push(Reverse((Instant::now() + tick, id)));
                }
                _ => {
                    s.entries.remove(&id);
                }
            }
            self.changed.notify_all();
        }
    }
}

/// Databases registered with the shared thread (for tests: a closed or dropped database leaves).
pub(crate) fn shared_entries() -> usize {
    shared().lock().entries.len()
}
