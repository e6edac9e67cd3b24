//! Commands run at least once.
//!
//! A command item (the `command_model`, status `pending`) is applied from the cloud in one
//! transaction, and its handler runs after the commit; a crash between the two, a missed
//! notification, or a handler registered only after the item arrived would otherwise leave the
//! command `pending` forever. So the agent also finds pending commands in the database (when a
//! handler is registered, and after a missed notification) and runs those the cloud wrote. A
//! handler may therefore run more than once for one command (after a crash in the handler or
//! before its result was stored): handlers must tolerate that.
//!
//! The handler's result is written back to the item (it replicates up). A failed write (for
//! example a full outbox) is retried with backoff a bounded number of times; after that the
//! command stays `pending` and runs again after the next restart.

use std::time::{Duration, Instant};

use devtables_db::{DbError, FindOptions};
use devtables_schema::{Item, ItemKey, Schema};

use crate::counted::DbAccess;
use crate::{state, CommandHandler};

/// Commands read per page when the database is searched for pending ones.
const SCAN_PAGE: usize = 200;

/// Longest wait between two attempts to write a result.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The status value of a command waiting for its handler.
pub(crate) const PENDING: &str = "pending";

/// Pending commands (complete items, hidden fields included) that the cloud wrote: their
/// stored version was issued by another node than this device's. A command the device wrote
/// itself is not the agent's to run.
pub(crate) fn pending_commands(
    db: &impl DbAccess,
    schema: &Schema,
    model: &str,
    own_node: u64,
) -> Result<Vec<Item>, DbError> {
    let Some(m) = schema.model(model) else {
        return Ok(Vec::new());
    };
    let mut props = Item::new();
    props.insert("status".into(), PENDING.into());
    let mut found = Vec::new();
    let mut next = None;
    loop {
        let page = db.find(
            model,
            &props,
            &FindOptions {
                limit: Some(SCAN_PAGE),
                next: next.take(),
                hidden: true,
                ..FindOptions::default()
            },
        )?;
        for item in page.items {
            let Ok(key) = m.primary_key(&item) else {
                continue;
            };
            match state::stored_version(db, &key)? {
                Some(v) if v.node == own_node => {}
                _ => found.push(item),
            }
        }
        match page.next {
            Some(n) => next = Some(n),
            None => break,
        }
    }
    Ok(found)
}

/// Whether a command item is still waiting for its handler.
pub(crate) fn is_pending(item: &Item) -> bool {
    item.get("status").and_then(|s| s.as_str()) == Some(PENDING)
}

/// The command's name (its `command` field).
pub(crate) fn name_of(item: &Item) -> String {
    item.get("command")
        .and_then(|c| c.as_str())
        .unwrap_or_default()
        .to_string()
}

/// Runs `handler` (or reports that there is none) and builds the patch that records the outcome
/// on the command item: its key fields, `status` (`done` or `failed`) and `result`.
pub(crate) fn outcome(
    schema: &Schema,
    handler: Option<&CommandHandler>,
    name: &str,
    item: &Item,
) -> Item {
    let (done, result) = match handler {
        Some(h) => match h(item) {
            Ok(value) => (true, value),
            Err(message) => (false, serde_json::json!({ "error": message })),
        },
        None => (
            false,
            serde_json::json!({ "error": format!("no handler for command {name:?} on this device") }),
        ),
    };
    result_patch(schema, item, done, result)
}

/// The patch that records a command's outcome: the item's primary key fields, `status` (`done`
/// or `failed`) and `result` (an object; any other value is wrapped as `{"value": ...}`).
pub(crate) fn result_patch(
    schema: &Schema,
    item: &Item,
    done: bool,
    result: serde_json::Value,
) -> Item {
    let result = match result {
        serde_json::Value::Object(_) => result,
        other => serde_json::json!({ "value": other }),
    };
    let primary = schema.primary_index();
    let mut patch = Item::new();
    for field in [Some(primary.hash.as_str()), primary.sort.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Some(v) = item.get(field) {
            patch.insert(field.into(), v.clone());
        }
    }
    patch.insert("status".into(), if done { "done" } else { "failed" }.into());
    patch.insert("result".into(), result);
    patch
}

/// Whether a failed result write may succeed later: a full outbox drains once the cloud
/// acknowledges, storage errors may pass. Anything else (the item is gone, the result does not
/// validate) fails the same way every time.
pub(crate) fn retryable(e: &DbError) -> bool {
    matches!(
        e,
        DbError::Refused(_) | DbError::Storage(_) | DbError::Io(_)
    )
}

/// A result whose write failed, waiting for its next attempt.
pub(crate) struct ResultRetry {
    pub(crate) name: String,
    pub(crate) key: ItemKey,
    pub(crate) patch: Item,
    /// Attempts made so far.
    pub(crate) attempts: u32,
    pub(crate) due: Instant,
}

/// The wait after `attempts` failed attempts: `base · 2^(attempts-1)`, at most 30 s.
pub(crate) fn backoff(base: Duration, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = Duration::from_millis(200);
        assert_eq!(backoff(base, 1), Duration::from_millis(200));
        assert_eq!(backoff(base, 2), Duration::from_millis(400));
        assert_eq!(backoff(base, 4), Duration::from_millis(1600));
        assert_eq!(backoff(base, 40), MAX_BACKOFF);
    }
}
