//! Change hooks: subscribers see every committed change, in commit order, after commit.
//!
//! Changes wait in a queue tagged with their commit's sequence number and are delivered only once
//! that commit is visible (and, in `immediate` mode, durable), so a subscriber never sees a change
//! that was rolled back (nor, in `immediate` mode, one that a crash could still undo). One thread delivers at a time, in order;
//! a hook may write to the database (its own changes are delivered after it returns).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devtables_schema::{Item, ItemKey};

/// Where a change came from, so replication can tell local writes from applied remote ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A write by the device application (or the `devtables db` tool).
    Local,
    /// A change received from the cloud and applied by the sync agent.
    Remote,
    /// An item removed because its TTL passed.
    Expired,
    /// Items loaded by [`crate::Db::import`].
    Import,
}

/// What a committed change did to one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeOp {
    Create,
    Update,
    Remove,
}

/// One committed change of one item. Items are complete (hidden fields included).
#[derive(Clone, Debug, PartialEq)]
pub struct ItemChange {
    pub model: String,
    pub key: ItemKey,
    pub op: ChangeOp,
    pub old: Option<Item>,
    pub new: Option<Item>,
    pub origin: Origin,
}

/// A subscriber to committed changes.
pub type Hook = Arc<dyn Fn(&ItemChange) + Send + Sync>;

/// Handle returned by [`crate::Db::subscribe`], to unsubscribe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookId(u64);

#[derive(Default)]
struct State {
    hooks: Vec<(HookId, Hook)>,
    next_id: u64,
    pending: VecDeque<(u64, Vec<ItemChange>)>,
    delivering: bool,
}

#[derive(Default)]
pub(crate) struct Hooks {
    state: Mutex<State>,
}

impl Hooks {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn subscribe(&self, hook: Hook) -> HookId {
        let mut s = self.lock();
        s.next_id += 1;
        let id = HookId(s.next_id);
        s.hooks.push((id, hook));
        id
    }

    pub(crate) fn unsubscribe(&self, id: HookId) {
        self.lock().hooks.retain(|(h, _)| *h != id);
    }

    /// Whether any hook is subscribed (change records are built only then, or for an
    /// interceptor).
    pub(crate) fn active(&self) -> bool {
        !self.lock().hooks.is_empty()
    }

    /// Queues the changes of commit `seq` (called under the write lock: queue order = commit order).
    pub(crate) fn enqueue(&self, seq: u64, changes: Vec<ItemChange>) {
        if changes.is_empty() {
            return;
        }
        let mut s = self.lock();
        if s.hooks.is_empty() {
            return;
        }
        s.pending.push_back((seq, changes));
    }

    /// Delivers every queued change whose commit is `<= visible()`, in order.
    pub(crate) fn deliver(&self, visible: impl Fn() -> u64) {
        let mut s = self.lock();
        if s.delivering {
            return;
        }
        s.delivering = true;
        loop {
            let ready = matches!(s.pending.front(), Some((seq, _)) if *seq <= visible());
            if !ready {
                s.delivering = false;
                return;
            }
            let Some((_, changes)) = s.pending.pop_front() else {
                s.delivering = false;
                return;
            };
            let hooks: Vec<Hook> = s.hooks.iter().map(|(_, h)| h.clone()).collect();
            drop(s);
            for change in &changes {
                for hook in &hooks {
                    hook(change);
                }
            }
            s = self.lock();
        }
    }
}
