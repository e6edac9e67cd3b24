//! Change callbacks: a C function called with every committed change of a database.
//!
//! The database runs its hooks after commit, one at a time, in commit order, on the thread of a
//! writer (the application's, or the agent's for changes from the cloud). A C callback may be
//! running on another thread when `dt_unsubscribe` is called, and its `user` pointer may be freed
//! right after: so each subscription has a lock held while its callback runs, and
//! `dt_unsubscribe` takes it, returning only once no call is running and none will start. A
//! callback that unsubscribes itself would wait for its own lock; that case is known from a
//! per-thread record of the callbacks running, and only the flag is cleared.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devtables_db::{ChangeOp, Db, HookId, ItemChange, Origin};
use serde_json::json;

use crate::db::{handle, DtDb};
use crate::error::{guard, panic_text, CapiError, DtCode};

/// A change callback: `user` is the pointer given to `dt_subscribe`; `change_json` is
/// `{"model": "...", "op": "create" | "update" | "remove", "origin": "local" | "remote" |
/// "expired" | "import", "key": {"pk": "...", "sk": "..."}, "old": {...} | null, "new": {...} |
/// null}`, with complete items (hidden fields included), valid only during the call.
pub type DtChangeFn =
    Option<unsafe extern "C-unwind" fn(user: *mut c_void, change_json: *const c_char)>;

/// The caller's `user` pointer, handed to the callback on whichever thread commits. The caller
/// promised (in `dt_subscribe`'s contract) that it may be used from any thread.
#[derive(Clone, Copy)]
pub(crate) struct UserPtr(pub(crate) *mut c_void);
// SAFETY: the C caller takes responsibility for the pointer's use from other threads; this crate
// only passes it back.
unsafe impl Send for UserPtr {}
// SAFETY: as above.
unsafe impl Sync for UserPtr {}

/// Subscription ids, unique in the process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The subscriptions whose callback runs on this thread now (nested when a callback writes).
    static RUNNING_HERE: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Whether a change callback is running on this thread (it may not close the database).
pub(crate) fn in_callback() -> bool {
    RUNNING_HERE.with(|r| !r.borrow().is_empty())
}

struct State {
    id: u64,
    /// Cleared by `dt_unsubscribe`: no call starts afterwards.
    active: AtomicBool,
    /// Held while the callback runs.
    running: Mutex<()>,
}

/// One registered change callback.
pub(crate) struct Subscription {
    hook: HookId,
    state: Arc<State>,
}

impl Subscription {
    /// Unsubscribes, and waits for a call running on another thread to return.
    pub(crate) fn remove(self, db: &Db) {
        self.state.active.store(false, Ordering::SeqCst);
        db.unsubscribe(self.hook);
        let own = RUNNING_HERE.with(|r| r.borrow().contains(&self.state.id));
        if !own {
            drop(
                self.state
                    .running
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
        }
    }
}

/// The change as the callback's JSON.
fn change_json(change: &ItemChange) -> String {
    let op = match change.op {
        ChangeOp::Create => "create",
        ChangeOp::Update => "update",
        ChangeOp::Remove => "remove",
    };
    let origin = match change.origin {
        Origin::Local => "local",
        Origin::Remote => "remote",
        Origin::Expired => "expired",
        Origin::Import => "import",
    };
    json!({
        "model": change.model,
        "op": op,
        "origin": origin,
        "key": {"pk": change.key.pk, "sk": change.key.sk},
        "old": change.old,
        "new": change.new,
    })
    .to_string()
}

/// Calls `callback(user, change_json)` after every committed change of `db`, until
/// `dt_unsubscribe`; `*out_id` (when not NULL) is the subscription's id.
///
/// Thread rules: the callback runs after the commit (in `immediate` durability, once the change
/// is on disk), one call at a time, in commit order, on the thread of a writer: yours, or the
/// agent's runtime thread for changes from the cloud. It may read and write the database (its own
/// writes are delivered after it returns); it must not block for long (the writer waits), must
/// not close the database, stop the agent or wait on it, and must not unwind (a C++ exception;
/// a Rust panic is caught: the change stays committed, later ones are still delivered). `user`
/// must be usable from any thread until `dt_unsubscribe` returns (or the database is closed).
///
/// # Safety
/// `db` is a live handle; `callback` is a function safe to call with `user` from any thread;
/// `out_id` is NULL or points to writable storage for one `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn dt_subscribe(
    db: *mut DtDb,
    callback: DtChangeFn,
    user: *mut c_void,
    out_id: *mut u64,
) -> DtCode {
    guard("dt_subscribe", || {
        // SAFETY: as the caller promised.
        let dt = unsafe { handle(db) }?;
        let callback = callback.ok_or(CapiError::Null("callback"))?;
        let user = UserPtr(user);
        let state = Arc::new(State {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            active: AtomicBool::new(true),
            running: Mutex::new(()),
        });
        let hook_state = state.clone();
        let hook = dt.db.subscribe(Arc::new(move |change: &ItemChange| {
            let state = &hook_state;
            let _running = state.running.lock().unwrap_or_else(PoisonError::into_inner);
            if !state.active.load(Ordering::SeqCst) {
                return;
            }
            // JSON text holds no NUL.
            let Ok(text) = CString::new(change_json(change)) else {
                return;
            };
            RUNNING_HERE.with(|r| r.borrow_mut().push(state.id));
            let user = user;
            // SAFETY: the caller of dt_subscribe promised the callback is safe to call with
            // `user` from any thread; the text lives until the call returns.
            let outcome = catch_unwind(AssertUnwindSafe(|| unsafe {
                callback(user.0, text.as_ptr())
            }));
            RUNNING_HERE.with(|r| {
                r.borrow_mut().pop();
            });
            if let Err(payload) = outcome {
                tracing::error!(
                    subscription = state.id,
                    "a change callback panicked (caught; later changes are still delivered): {}",
                    panic_text(&*payload)
                );
            }
        }));
        let id = state.id;
        dt.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Subscription { hook, state });
        if !out_id.is_null() {
            // SAFETY: non-NULL and writable, as the caller promised.
            unsafe { *out_id = id };
        }
        Ok(())
    })
}

/// Removes the change callback `id` from `db`. When it returns, the callback is not running on
/// another thread and will not be called again, so its `user` data may be freed. A callback may
/// unsubscribe itself (then it returns at once). `DT_NOT_FOUND` for an unknown id.
///
/// # Safety
/// `db` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn dt_unsubscribe(db: *mut DtDb, id: u64) -> DtCode {
    guard("dt_unsubscribe", || {
        // SAFETY: as the caller promised.
        let dt = unsafe { handle(db) }?;
        let subscription = dt
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        match subscription {
            Some(s) => {
                s.remove(&dt.db);
                Ok(())
            }
            None => Err(CapiError::UnknownSubscription(id)),
        }
    })
}
