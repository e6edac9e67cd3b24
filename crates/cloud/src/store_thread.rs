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
//!
//! The thread also tells the readers of the change log that it moved: after each job's work is
//! committed, a watch channel ([`StoreHandle::changes`]) carries the store's hint of the log's
//! head, so a waiting reader reads again instead of polling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devtables_schema::Schema;
use devtables_sync::hlc::HlcClock;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::store::{CloudStore, StoreError};

/// Everything the store thread owns.
pub struct StoreCtx {
    pub store: Box<dyn CloudStore>,
    /// The cloud's hybrid logical clock.
    pub clock: HlcClock,
    pub schema: Arc<Schema>,
    /// The schema's version tag ([`Schema::tag`]), named when a push is deferred.
    pub schema_tag: String,
    /// What the running jobs asked to run once their work is durable ([`StoreCtx::after_commit`]).
    completions: Vec<Completion>,
    /// Where the change log's head is told once committed ([`StoreHandle::changes`]); set when
    /// the thread starts.
    change_head: Option<Arc<watch::Sender<u64>>>,
    /// Woken after a job that left a broadcast fan-out pending (the service's fan-out task).
    fanout_wake: Option<Arc<Notify>>,
}

/// Runs once the work of the job that queued it is committed (`Ok`) or known lost (`Err`: the
/// group's commit failed).
pub(crate) type Completion = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

impl StoreCtx {
    pub fn new(store: Box<dyn CloudStore>, clock: HlcClock, schema: Arc<Schema>) -> StoreCtx {
        StoreCtx {
            store,
            clock,
            schema_tag: schema.tag().to_string(),
            schema,
            completions: Vec::new(),
            change_head: None,
            fanout_wake: None,
        }
    }

    /// Wakes `wake` after each job that leaves a broadcast fan-out pending
    /// ([`CloudStore::fanout_pending_hint`]).
    pub fn wake_fanout(mut self, wake: Arc<Notify>) -> StoreCtx {
        self.fanout_wake = Some(wake);
        self
    }

    /// Tells the fan-out task that a fan-out may be pending (its permit coalesces repeats).
    fn tell_fanout(&self) {
        if let Some(wake) = &self.fanout_wake {
            if self.store.fanout_pending_hint() {
                wake.notify_one();
            }
        }
    }

    /// Tells the change log's readers the head moved, once the work that moved it is committed
    /// (or rolled back: then they read again for nothing).
    fn tell_change_head(&self) {
        if let Some(tx) = &self.change_head {
            let head = self.store.change_head_hint();
            tx.send_if_modified(|told| {
                let moved = head > *told;
                if moved {
                    *told = head;
                }
                moved
            });
        }
    }

    /// Queues `f` to run when the current job's work is durable: a job of a group learns its
    /// fate only at the group's commit, so whatever tells the outside world of a result (an
    /// acknowledgement to a device above all) goes here.
    pub(crate) fn after_commit(&mut self, f: Completion) {
        self.completions.push(f);
    }

    fn complete(&mut self, committed: Result<(), &StoreError>) {
        for f in self.completions.drain(..) {
            f(committed);
        }
    }
}

/// One piece of work for the store thread.
pub(crate) type JobFn = Box<dyn FnOnce(&mut StoreCtx) + Send>;

/// A job, and whether it may share a commit with others.
pub(crate) enum Job {
    /// Runs inside a group and reports through [`StoreCtx::after_commit`] (the sync loop's
    /// jobs).
    Grouped(JobFn),
    /// Runs outside any group, its operations committing on their own, so it may hand its
    /// result back as soon as it has one (the API's and the broker's calls).
    Alone(JobFn),
}

/// One group commit, as the store thread reports it to its observer (the service's metrics).
#[derive(Clone, Debug)]
pub struct GroupCommitted {
    /// Jobs that shared the commit.
    pub jobs: usize,
    /// How long the commit itself took (the flush to disk, for SQLite).
    pub took: Duration,
    /// The commit's error, if it failed (every job of the group was answered as failed).
    pub error: Option<String>,
}

/// Receives a report of every group commit.
pub type CommitObserver = Box<dyn FnMut(GroupCommitted) + Send>;

/// The store thread went away (the service is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the cloud store has stopped")]
pub struct StoreGone;

/// Runs closures on the store thread, one at a time, in arrival order.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: mpsc::Sender<Job>,
    /// The change log's head as committed work moved it.
    change_head: watch::Receiver<u64>,
    /// Its sender, for heads other cloud nodes committed ([`StoreHandle::observe_change_head`]).
    head_tx: Arc<watch::Sender<u64>>,
}

impl StoreHandle {
    /// Most jobs waiting for the store; callers wait (asynchronously) beyond it.
    const QUEUE: usize = 1024;
    /// Starts the store thread. At most `group_max` jobs share one commit (the sync loop's own
    /// bound on the jobs it has out, `sync_store_jobs`, is often the smaller); 1 commits each
    /// job on its own.
    pub fn spawn(
        mut ctx: StoreCtx,
        group_max: usize,
        observer: CommitObserver,
    ) -> std::io::Result<StoreHandle> {
        let (jobs, rx) = mpsc::channel::<Job>(Self::QUEUE);
        let group_max = group_max.max(1);
        let (head_tx, change_head) = watch::channel(ctx.store.change_head_hint());
        let head_tx = Arc::new(head_tx);
        ctx.change_head = Some(head_tx.clone());
        std::thread::Builder::new()
            .name("devtables-store".into())
            .spawn(move || run(ctx, rx, group_max, observer))?;
        Ok(StoreHandle {
            jobs,
            change_head,
            head_tx,
        })
    }

    /// Another cloud node committed the change log up to `head` (a scaled-out cloud's wake-ups):
    /// this node's readers and webhooks read again (the head only grows).
    pub fn observe_change_head(&self, head: u64) {
        self.head_tx.send_if_modified(|told| {
            let moved = head > *told;
            if moved {
                *told = head;
            }
            moved
        });
    }

    /// The change log's head (the store's hint, [`CloudStore::change_head_hint`]) as committed
    /// work moves it: a reader marks the value seen before it reads the log, then waits for a
    /// change, so no append committed after its read goes unnoticed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.change_head.clone()
    }

    /// How many more jobs the store's queue takes now (the rest wait for room).
    pub fn queue_room(&self) -> usize {
        self.jobs.capacity()
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut StoreCtx) -> R + Send + 'static,
    ) -> Result<R, StoreGone> {
        let (tx, rx) = oneshot::channel();
        let job = Job::Alone(Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        }));
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
        let job = Job::Alone(Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        }));
        self.jobs.blocking_send(job).map_err(|_| StoreGone)?;
        rx.blocking_recv().map_err(|_| StoreGone)
    }

    /// Queues a job that may share a commit with others and reports its own completion through
    /// [`StoreCtx::after_commit`] (the sync loop's jobs send their results back over a channel,
    /// so the loop never waits for the store), if the queue has room now; a full queue (API
    /// calls share it) hands the job back. The sync loop never waits here: it keeps what does
    /// not fit, in order, until [`StoreHandle::room`] says there is room.
    pub(crate) fn try_submit(&self, job: JobFn) -> Result<(), NotSubmitted> {
        match self.jobs.try_reserve() {
            Ok(permit) => {
                permit.send(Job::Grouped(job));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(NotSubmitted::Full(job)),
            Err(mpsc::error::TrySendError::Closed(())) => Err(NotSubmitted::Gone),
        }
    }

    /// Waits for room in the queue for one job (cancel-safe: dropping it gives up its turn).
    /// The room it answers is owned, so it may outlive the borrow of the handle.
    pub(crate) async fn room(&self) -> Result<SubmitSlot, StoreGone> {
        self.jobs
            .clone()
            .reserve_owned()
            .await
            .map(|permit| SubmitSlot { permit })
            .map_err(|_| StoreGone)
    }
}

/// Why [`StoreHandle::try_submit`] did not queue a job.
pub(crate) enum NotSubmitted {
    /// The queue is full: the job, handed back.
    Full(JobFn),
    /// The store thread is gone (the service is stopping).
    Gone,
}

/// Room held in the store's queue for one job ([`StoreHandle::room`]).
pub(crate) struct SubmitSlot {
    permit: mpsc::OwnedPermit<Job>,
}

impl SubmitSlot {
    /// Queues a job that may share a commit with others (as [`StoreHandle::try_submit`]).
    pub(crate) fn submit(self, job: JobFn) {
        self.permit.send(Job::Grouped(job));
    }
}

/// The store thread: jobs in arrival order; the grouped jobs waiting together run in one group
/// and share its commit (group commit: while one commit flushes, the next group gathers, so the
/// flushes per second stay bounded whatever the pushes per second).
fn run(
    mut ctx: StoreCtx,
    mut rx: mpsc::Receiver<Job>,
    group_max: usize,
    mut observer: CommitObserver,
) {
    let mut next = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match rx.blocking_recv() {
                Some(job) => job,
                None => return,
            },
        };
        match job {
            Job::Alone(f) => {
                f(&mut ctx);
                ctx.complete(Ok(()));
                ctx.tell_change_head();
                ctx.tell_fanout();
            }
            Job::Grouped(f) => {
                let grouped = match ctx.store.begin_group() {
                    Ok(()) => true,
                    Err(e) => {
                        // Still correct without a group, only slower: each operation commits.
                        tracing::warn!(
                            "cannot open a group of store jobs; running them one by one: {e}"
                        );
                        false
                    }
                };
                f(&mut ctx);
                let mut jobs = 1;
                while jobs < group_max {
                    match rx.try_recv() {
                        Ok(Job::Grouped(f)) => {
                            f(&mut ctx);
                            jobs += 1;
                        }
                        Ok(alone) => {
                            next = Some(alone);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if !grouped {
                    ctx.complete(Ok(()));
                    ctx.tell_change_head();
                    ctx.tell_fanout();
                    continue;
                }
                let started = Instant::now();
                let committed = ctx.store.commit_group();
                let took = started.elapsed();
                if let Err(e) = &committed {
                    tracing::error!(
                        jobs,
                        "a group of store jobs was not committed; each is answered as failed: {e}"
                    );
                }
                ctx.complete(committed.as_ref().map(|_| ()));
                ctx.tell_change_head();
                ctx.tell_fanout();
                observer(GroupCommitted {
                    jobs,
                    took,
                    error: committed.err().map(|e| e.to_string()),
                });
            }
        }
    }
}

/// Wall-clock milliseconds (for HLC physical time and records).
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;

    use devtables_sync::hlc::node_id_for;
    use devtables_sync::identity::DeviceId;

    use super::*;
    use crate::store::sqlite::{SqliteOptions, SqliteStore};

    /// Rows of `device` in the registry, as another connection sees them: only committed work.
    fn committed_devices(path: &std::path::Path, device: &str) -> u64 {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.query_row(
            "SELECT count(*) FROM devices WHERE device = ?1",
            [device],
            |r| r.get(0),
        )
        .unwrap()
    }

    /// A store thread on a fresh database file with at most `group_max` jobs per commit, held
    /// busy until the returned sender is used (so the jobs queued meanwhile wait together);
    /// the receiver gets the commit reports.
    async fn held_store(
        path: &std::path::Path,
        group_max: usize,
    ) -> (
        StoreHandle,
        std_mpsc::Sender<()>,
        std_mpsc::Receiver<GroupCommitted>,
    ) {
        let store = SqliteStore::open(path, SqliteOptions::default()).unwrap();
        let schema = Arc::new(
            Schema::from_json5(
                "{format: 'onetable:1.1.0', version: '1', \
                 indexes: {primary: {hash: 'pk', sort: 'sk'}}, process: {N: {sync: 'down', broadcast: true}}, \
                 models: {N: {pk: {type: 'string', value: 'n#'}, \
                 sk: {type: 'string', value: 'n#${name}'}, name: {type: 'string', required: true}}}}",
            )
            .unwrap(),
        );
        let (reports, reported) = std_mpsc::channel();
        let handle = StoreHandle::spawn(
            StoreCtx::new(Box::new(store), HlcClock::new(node_id_for("t")), schema),
            group_max,
            Box::new(move |c| reports.send(c).unwrap()),
        )
        .unwrap();
        let (release, released) = std_mpsc::channel::<()>();
        handle
            .jobs
            .send(Job::Alone(Box::new(move |_| released.recv().unwrap())))
            .await
            .unwrap();
        (handle, release, reported)
    }

    #[tokio::test]
    async fn the_change_log_head_is_told_only_once_the_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, release, reported) = held_store(&dir.path().join("cloud.db"), 64).await;
        let mut heads = handle.changes();
        assert_eq!(*heads.borrow_and_update(), 0, "an empty log");
        let (heard, hear) = std_mpsc::channel();
        for name in ["a", "b"] {
            let (heard, seen) = (heard.clone(), handle.changes());
            let job: JobFn = Box::new(move |c: &mut StoreCtx| {
                let schema = c.schema.clone();
                let input = serde_json::json!({ "name": name });
                let item = schema
                    .model("N")
                    .unwrap()
                    .prepare_create(input.as_object().unwrap(), wall_ms() as i64)
                    .unwrap();
                let written = c.store.write(
                    &schema,
                    &mut c.clock,
                    wall_ms(),
                    1 << 17,
                    &devtables_sync::identity::Owner::Account("a".into()),
                    "N",
                    devtables_sync::apply::CloudOp::Put(item),
                );
                assert!(written.is_ok(), "{:?}", written.err());
                // Appended, not committed: nobody is told yet.
                let told_in_job = *seen.borrow();
                c.after_commit(Box::new(move |r| {
                    heard.send((r.is_ok(), told_in_job)).unwrap()
                }));
            });
            handle.room().await.unwrap().submit(job);
        }
        // Only the jobs hold senders now: a job that failed ends the wait.
        drop(heard);
        release.send(()).unwrap();
        for _ in 0..2 {
            assert_eq!(hear.recv().expect("both jobs completed"), (true, 0));
        }
        assert_eq!(reported.recv().unwrap().jobs, 2, "one group");
        tokio::time::timeout(std::time::Duration::from_secs(20), heads.changed())
            .await
            .expect("told after the commit")
            .unwrap();
        assert_eq!(*heads.borrow(), 2, "the head of the two appends");
    }

    #[tokio::test]
    async fn with_a_group_of_one_every_job_commits_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, release, reported) = held_store(&dir.path().join("cloud.db"), 1).await;
        let (heard, hear) = std_mpsc::channel();
        for i in 0..3 {
            let heard = heard.clone();
            let job: JobFn = Box::new(move |c: &mut StoreCtx| {
                let id = DeviceId::new("a", format!("d{i}")).unwrap();
                c.store.register_device(&id, "hash", None, 1).unwrap();
                c.after_commit(Box::new(move |r| heard.send(r.is_ok()).unwrap()));
            });
            handle.room().await.unwrap().submit(job);
        }
        release.send(()).unwrap();
        for _ in 0..3 {
            assert!(hear.recv().unwrap());
            assert_eq!(reported.recv().unwrap().jobs, 1);
        }
    }

    #[tokio::test]
    async fn jobs_waiting_together_share_one_commit_and_hear_of_it_only_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        // Held busy until every grouped job waits in the queue.
        let (handle, release, reported) = held_store(&path, 64).await;
        const JOBS: usize = 8;
        let (heard, hear) = std_mpsc::channel();
        for i in 0..JOBS {
            let (heard, path) = (heard.clone(), path.clone());
            let job: JobFn = Box::new(move |c: &mut StoreCtx| {
                let id = DeviceId::new("a", format!("d{i}")).unwrap();
                c.store.register_device(&id, "hash", None, 1).unwrap();
                // Not visible to anyone else yet: the group has not committed.
                let before = committed_devices(&path, &id.device);
                c.after_commit(Box::new(move |committed| {
                    let after = committed_devices(&path, &id.device);
                    heard.send((before, committed.is_ok(), after)).unwrap();
                }));
            });
            handle.room().await.unwrap().submit(job);
        }
        release.send(()).unwrap();

        for _ in 0..JOBS {
            let (before, ok, after) = hear.recv().unwrap();
            assert_eq!((before, ok, after), (0, true, 1));
        }
        let report = reported.recv().unwrap();
        assert_eq!(
            report.jobs, JOBS,
            "one commit for the jobs that waited together"
        );
        assert!(report.error.is_none());
        assert!(reported.try_recv().is_err(), "no second commit");

        // An alone job's operations commit on their own, visible as soon as it answers.
        let p = path.clone();
        let seen = handle
            .call(move |c| {
                let id = DeviceId::new("a", "alone").unwrap();
                c.store.register_device(&id, "hash", None, 1).unwrap();
                committed_devices(&p, "alone")
            })
            .await
            .unwrap();
        assert_eq!(seen, 1);
    }
}
