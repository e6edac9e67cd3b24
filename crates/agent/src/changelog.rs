//! The local change log: every committed change of the device database (local writes, items the
//! cloud sent, TTL expiries, imports) under a dense local sequence number, so a local reader (the
//! local API's `GET /v1/changes`) that reconnects with the last number it saw misses nothing.
//!
//! Why a durable log rather than the database's commit hooks alone: a hook sees a change once, in
//! the process that subscribed; a reader that was away (its own restart, the agent's) would
//! miss what happened meanwhile. The entries are written by [`ChangeLogRecorder`], a
//! [`WriteInterceptor`], in the transaction of the change itself, so an entry exists exactly
//! when its change committed, and sequence order is commit order (the database serializes
//! writers).
//!
//! Tables (side tables of the device database):
//! - `local_changes`: sequence (u64, big-endian) → [`StoredEntry`] as JSON.
//! - `local_changes_meta`: `state` → [`LogState`] (the next sequence, the oldest kept, the bytes
//!   kept); `clean_stop` → the next sequence when the last agent that logged stopped cleanly.
//!
//! Bounds: the log keeps the newest [`ChangeLogLimits::kept`] entries and at most
//! [`ChangeLogLimits::max_bytes`] of them (the oldest go first, in the transaction that adds a
//! new one). A reader whose cursor is older than the oldest entry kept is told so
//! ([`ReadError::Gone`]) and must read the items again: nothing is skipped silently.
//!
//! Gaps the log cannot see. A run that did not log (an agent without the change log, a crash
//! that lost the last commits a reader may already have seen in periodic durability) would
//! leave a reader's cursor pointing into a history that is not the database's any more. So an
//! agent that stops cleanly with the log on records `clean_stop`, every agent start removes it,
//! and a start that does not find it (a crash, or an agent run without the log since) begins a
//! new era: the old entries are dropped and the sequence jumps by [`ERA_GAP`], past any number a
//! reader can have seen; every older cursor is then answered [`ReadError::Gone`]. Writes made
//! while no agent runs (the `devtables db` tool on the stopped agent's file) are not logged and
//! not detected: they are outside the agent's view, as they are outside its outbox.

use std::sync::Arc;

use devtables_db::{ChangeOp, Db, DbError, ItemChange, Origin, SideTables, WriteInterceptor};
use devtables_schema::{Item, Schema};
use serde::{Deserialize, Serialize};

pub(crate) const LOG: &str = "local_changes";
pub(crate) const LOG_META: &str = "local_changes_meta";
const META_STATE: &[u8] = b"state";
const META_CLEAN_STOP: &[u8] = b"clean_stop";

/// How far the sequence jumps when a new era begins (see the module doc): more than any number
/// of commits a crash can take back, so no cursor a reader kept from before is mistaken for one
/// of the new era. 2^32 leaves room for two million eras within the integers JavaScript holds
/// exactly (2^53).
pub const ERA_GAP: u64 = 1 << 32;

/// How much of its history the change log keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeLogLimits {
    /// Most entries kept. Default 10,000.
    pub kept: u64,
    /// Most bytes of entries kept (their JSON). Default 16 MiB. The newest entry is kept
    /// whatever its size.
    pub max_bytes: u64,
}

impl Default for ChangeLogLimits {
    fn default() -> Self {
        ChangeLogLimits {
            kept: 10_000,
            max_bytes: 16 << 20,
        }
    }
}

/// Where the log stands: entries `first..next` are kept (none when `first == next`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogState {
    /// The sequence number the next change gets.
    pub next: u64,
    /// The oldest sequence number kept.
    pub first: u64,
    /// Bytes of the entries kept.
    pub bytes: u64,
}

impl LogState {
    /// The sequence number of the newest change (0 before the first).
    pub fn latest(&self) -> u64 {
        self.next.saturating_sub(1)
    }

    /// The oldest cursor a reader may resume from: it has seen everything before `first`.
    pub fn oldest_cursor(&self) -> u64 {
        self.first.saturating_sub(1)
    }

    fn fresh() -> LogState {
        LogState {
            next: 1,
            first: 1,
            bytes: 0,
        }
    }
}

/// One change as stored (its sequence number is its key).
#[derive(Serialize, Deserialize)]
struct StoredEntry {
    model: String,
    op: String,
    origin: String,
    pk: String,
    sk: String,
    /// The item after the change; for a remove, the item removed. Hidden fields left out.
    item: Item,
    /// Wall time of the commit's transaction, ms since the epoch.
    at: i64,
}

/// One change of the log, as readers get it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChangeEntry {
    /// The local sequence number: a reader resumes after the last one it saw.
    pub seq: u64,
    pub model: String,
    /// `create`, `update` or `remove`.
    pub op: String,
    /// Who made it: `local` (this device), `cloud` (sent down by the cloud), `expired` (its TTL
    /// passed) or `import` (`devtables db import`).
    pub origin: String,
    /// The item's key.
    pub key: EntryKey,
    /// The item after the change; for a remove, the item as it was. Hidden fields left out.
    pub item: Item,
    /// When the change committed, ms since the epoch (the device clock).
    pub at: i64,
}

/// The primary key of a changed item.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntryKey {
    pub pk: String,
    pub sk: String,
}

/// Why a read of the log gave no entries to continue with.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The cursor is older than what the log keeps, from before a new era, or ahead of the log:
    /// the changes right after it cannot be given. Read the items again, then follow from
    /// `latest`.
    #[error(
        "the change log no longer holds the changes right after {cursor} (a reader may resume \
         from {oldest} up to {latest}): read the items you follow again, then follow the changes \
         from {latest}"
    )]
    Gone {
        /// The cursor asked for.
        cursor: u64,
        /// The oldest cursor the log can resume from now.
        oldest: u64,
        /// The newest change's sequence number.
        latest: u64,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

fn origin_name(origin: Origin) -> &'static str {
    match origin {
        Origin::Local => "local",
        Origin::Remote => "cloud",
        Origin::Expired => "expired",
        Origin::Import => "import",
    }
}

fn op_name(op: ChangeOp) -> &'static str {
    match op {
        ChangeOp::Create => "create",
        ChangeOp::Update => "update",
        ChangeOp::Remove => "remove",
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> DbError {
    DbError::Corrupt(format!("local change log ({what}): {e}"))
}

fn read_state(side: &SideTables<'_>) -> Result<Option<LogState>, DbError> {
    match side.get(LOG_META, META_STATE)? {
        Some(raw) => Ok(Some(
            serde_json::from_slice(&raw).map_err(|e| corrupt("state", e))?,
        )),
        None => Ok(None),
    }
}

fn write_state(side: &mut SideTables<'_>, state: &LogState) -> Result<(), DbError> {
    side.put(LOG_META, META_STATE, &serde_json::to_vec(state)?)
}

/// Records every change in the log, inside the write's transaction (see the module doc).
pub(crate) struct ChangeLogRecorder {
    pub(crate) schema: Arc<Schema>,
    pub(crate) limits: ChangeLogLimits,
}

impl ChangeLogRecorder {
    pub(crate) fn record(
        &self,
        side: &mut SideTables<'_>,
        change: &ItemChange,
        at: i64,
    ) -> Result<(), DbError> {
        let mut item = match (&change.new, &change.old) {
            (Some(item), _) | (None, Some(item)) => item.clone(),
            (None, None) => Item::new(),
        };
        if let Some(model) = self.schema.model(&change.model) {
            model.strip_hidden(&mut item);
        }
        let entry = StoredEntry {
            model: change.model.clone(),
            op: op_name(change.op).into(),
            origin: origin_name(change.origin).into(),
            pk: change.key.pk.clone(),
            sk: change.key.sk.clone(),
            item,
            at,
        };
        let bytes = serde_json::to_vec(&entry)?;
        let mut state = read_state(side)?.unwrap_or_else(LogState::fresh);
        side.put(LOG, &state.next.to_be_bytes(), &bytes)?;
        state.next += 1;
        state.bytes += bytes.len() as u64;
        // Trim from the oldest end. Each entry is trimmed once, so the work is amortized to a
        // constant per change; the newest entry stays whatever its size.
        while state.first + 1 < state.next
            && (state.next - state.first > self.limits.kept.max(1)
                || state.bytes > self.limits.max_bytes)
        {
            let key = state.first.to_be_bytes();
            if let Some(old) = side.get(LOG, &key)? {
                state.bytes = state.bytes.saturating_sub(old.len() as u64);
                side.remove(LOG, &key)?;
            }
            state.first += 1;
        }
        write_state(side, &state)
    }
}

/// The agent's interceptor when it keeps the change log: the outbox recorder first (it may
/// refuse the write, and then nothing is logged), then the log.
pub(crate) struct WithChangeLog {
    pub(crate) outbox: crate::state::OutboxRecorder,
    pub(crate) log: ChangeLogRecorder,
}

impl WriteInterceptor for WithChangeLog {
    fn on_change(&self, side: &mut SideTables<'_>, change: &ItemChange) -> Result<(), DbError> {
        self.outbox.on_change(side, change)?;
        self.log.record(side, change, devtables_db::system_now_ms())
    }
}

/// At every agent start, in one transaction: with the log on, keep it when the last run
/// stopped cleanly with it and nothing ran since, or else begin a new era; with it off, forget
/// the clean stop (this run's writes are not logged, so the next logging run must begin a new
/// era). Returns the log's state when it is on.
pub(crate) fn on_start(db: &Db, logging: bool) -> Result<Option<LogState>, DbError> {
    if !logging && db.side_get(LOG_META, META_CLEAN_STOP)?.is_none() {
        // Nothing to forget: no write (agents without the log, the fleet simulator's thousands
        // among them, pay nothing at start).
        return Ok(None);
    }
    db.write(Origin::Remote, |txn| {
        let mut side = txn.side();
        let clean_stop = side.get(LOG_META, META_CLEAN_STOP)?;
        side.remove(LOG_META, META_CLEAN_STOP)?;
        if !logging {
            return Ok(None);
        }
        let state = match read_state(&side)? {
            None => LogState::fresh(),
            Some(state) if clean_stop.as_deref() == Some(&state.next.to_be_bytes()[..]) => state,
            Some(old) => {
                side.clear(LOG)?;
                let next = old.next.saturating_add(ERA_GAP);
                tracing::info!(
                    from = old.latest(),
                    to = next,
                    "the local change log begins a new era (the last run did not stop cleanly \
                     with it): readers with an older cursor are told to read the items again"
                );
                LogState {
                    next,
                    first: next,
                    bytes: 0,
                }
            }
        };
        write_state(&mut side, &state)?;
        Ok(Some(state))
    })
}

/// Records that the log is complete up to now, just before the agent closes the database.
pub(crate) fn mark_clean_stop(db: &Db) -> Result<(), DbError> {
    db.write(Origin::Remote, |txn| {
        let mut side = txn.side();
        let state = read_state(&side)?.unwrap_or_else(LogState::fresh);
        side.put(LOG_META, META_CLEAN_STOP, &state.next.to_be_bytes())
    })
}

/// Where the log stands now.
pub fn state(db: &Db) -> Result<LogState, DbError> {
    match db.side_get(LOG_META, META_STATE)? {
        Some(raw) => serde_json::from_slice(&raw).map_err(|e| corrupt("state", e)),
        None => Ok(LogState::fresh()),
    }
}

/// Up to `limit` changes after `cursor` (the last sequence number the reader saw), oldest
/// first, and the log's state. [`ReadError::Gone`] when the changes right after `cursor` are no
/// longer kept (or `cursor` is ahead of the log).
pub fn read_after(
    db: &Db,
    cursor: u64,
    limit: usize,
) -> Result<(Vec<ChangeEntry>, LogState), ReadError> {
    let raw = db.side_scan(LOG, &cursor.saturating_add(1).to_be_bytes(), limit)?;
    // The state is read after the entries: `first` and `next` only grow, so what it says about
    // the cursor holds for the entries read before it.
    let state = state(db)?;
    let gone = || ReadError::Gone {
        cursor,
        oldest: state.oldest_cursor(),
        latest: state.latest(),
    };
    if cursor > state.latest() {
        return Err(gone());
    }
    let mut entries = Vec::with_capacity(raw.len());
    for (key, value) in raw {
        let seq = u64::from_be_bytes(
            key.as_slice()
                .try_into()
                .map_err(|_| corrupt("key", "not 8 bytes"))?,
        );
        let e: StoredEntry = serde_json::from_slice(&value).map_err(|e| corrupt("entry", e))?;
        entries.push(ChangeEntry {
            seq,
            model: e.model,
            op: e.op,
            origin: e.origin,
            key: EntryKey { pk: e.pk, sk: e.sk },
            item: e.item,
            at: e.at,
        });
    }
    match entries.first() {
        // The entry right after the cursor was trimmed (or belongs to an older era).
        Some(first) if first.seq != cursor + 1 => Err(gone()),
        None if cursor < state.oldest_cursor() => Err(gone()),
        _ => Ok((entries, state)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devtables_db::DbOptions;
    use serde_json::json;

    fn schema() -> Arc<Schema> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/schema.json5");
        Arc::new(Schema::load(std::path::Path::new(path)).unwrap())
    }

    fn item(v: serde_json::Value) -> Item {
        v.as_object().cloned().unwrap()
    }

    /// A database whose every write is logged with `limits` (no outbox: these tests are about
    /// the log alone).
    fn logged_db(dir: &std::path::Path, limits: ChangeLogLimits) -> Db {
        let schema = schema();
        let db = Db::open(dir.join("log.db"), schema.clone(), DbOptions::default()).unwrap();
        install(&db, schema, limits);
        db
    }

    struct LogOnly(ChangeLogRecorder);

    impl WriteInterceptor for LogOnly {
        fn on_change(&self, side: &mut SideTables<'_>, change: &ItemChange) -> Result<(), DbError> {
            self.0.record(side, change, 7)
        }
    }

    fn install(db: &Db, schema: Arc<Schema>, limits: ChangeLogLimits) {
        db.set_interceptor(Some(Arc::new(LogOnly(ChangeLogRecorder {
            schema,
            limits,
        }))));
    }

    fn setting(name: &str, value: &str) -> Item {
        item(json!({"deviceId": "d1", "name": name, "value": value}))
    }

    fn seqs(entries: &[ChangeEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn every_origin_is_logged_in_commit_order_with_the_item_and_without_hidden_fields() {
        let dir = tempfile::tempdir().unwrap();
        let db = logged_db(dir.path(), ChangeLogLimits::default());
        db.create("Setting", &setting("mode", "eco")).unwrap();
        db.update("Setting", &setting("mode", "boost")).unwrap();
        // An item the cloud sent, applied as the driver applies it.
        db.write(Origin::Remote, |t| {
            t.put_stored(
                "Firmware",
                item(
                    json!({"pk": "firmware#", "sk": "firmware#2.0", "version": "2.0",
                            "url": "https://x", "_type": "Firmware"}),
                ),
            )
        })
        .unwrap();
        db.remove("Setting", &item(json!({"deviceId": "d1", "name": "mode"})))
            .unwrap();

        let (entries, state) = read_after(&db, 0, 100).unwrap();
        assert_eq!(seqs(&entries), [1, 2, 3, 4]);
        assert_eq!(state.latest(), 4);
        let ops: Vec<(&str, &str, &str)> = entries
            .iter()
            .map(|e| (e.model.as_str(), e.op.as_str(), e.origin.as_str()))
            .collect();
        assert_eq!(
            ops,
            [
                ("Setting", "create", "local"),
                ("Setting", "update", "local"),
                ("Firmware", "create", "cloud"),
                ("Setting", "remove", "local"),
            ]
        );
        assert_eq!(entries[1].item["value"], "boost");
        // A remove carries the item as it was.
        assert_eq!(entries[3].item["value"], "boost");
        assert_eq!(entries[0].key.pk, "device#d1");
        assert_eq!(entries[0].key.sk, "setting#mode");
        assert!(
            !entries[0].item.contains_key("pk") && !entries[2].item.contains_key("sk"),
            "hidden fields are left out: {:?}",
            entries[0].item
        );
        // Reading after a cursor gives what follows it, and a page limit holds.
        let (after, _) = read_after(&db, 2, 1).unwrap();
        assert_eq!(seqs(&after), [3]);
        let (none, _) = read_after(&db, 4, 10).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn a_rolled_back_write_takes_no_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let db = logged_db(dir.path(), ChangeLogLimits::default());
        db.create("Setting", &setting("a", "1")).unwrap();
        // A transaction that fails after its first change: neither change nor entry stays.
        let refused = db.write(Origin::Local, |t| {
            t.create("Setting", &setting("b", "2"))?;
            t.create("Setting", &setting("a", "again"))
        });
        assert!(
            matches!(refused, Err(DbError::Exists { .. })),
            "{refused:?}"
        );
        db.create("Setting", &setting("c", "3")).unwrap();
        let (entries, _) = read_after(&db, 0, 10).unwrap();
        assert_eq!(seqs(&entries), [1, 2]);
        assert_eq!(entries[1].item["name"], "c");
    }

    #[test]
    fn the_oldest_entries_go_past_the_count_and_the_bytes_and_an_old_cursor_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let db = logged_db(
            dir.path(),
            ChangeLogLimits {
                kept: 3,
                max_bytes: 1 << 20,
            },
        );
        for i in 0..5 {
            db.upsert("Setting", &setting("n", &i.to_string())).unwrap();
        }
        let state = state(&db).unwrap();
        assert_eq!((state.first, state.next), (3, 6));
        assert_eq!(db.side_len(LOG).unwrap(), 3);
        // Cursor 2 saw everything before the oldest kept: it may go on.
        let (entries, _) = read_after(&db, 2, 10).unwrap();
        assert_eq!(seqs(&entries), [3, 4, 5]);
        // Cursor 1 missed entry 2, which is gone: said, not skipped.
        match read_after(&db, 1, 10) {
            Err(ReadError::Gone { oldest, latest, .. }) => assert_eq!((oldest, latest), (2, 5)),
            other => panic!("expected Gone, got {other:?}"),
        }
        // A cursor ahead of the log is refused too.
        assert!(matches!(
            read_after(&db, 9, 10),
            Err(ReadError::Gone { .. })
        ));

        // The byte bound: entries of ~1 KB under a 2.5 KB bound keep two.
        let dir = tempfile::tempdir().unwrap();
        let db = logged_db(
            dir.path(),
            ChangeLogLimits {
                kept: 1000,
                max_bytes: 2500,
            },
        );
        let big = "x".repeat(1000);
        for i in 0..4 {
            db.upsert("Setting", &setting(&format!("s{i}"), &big))
                .unwrap();
        }
        let state = super::state(&db).unwrap();
        assert_eq!(db.side_len(LOG).unwrap(), 2, "{state:?}");
        assert!(state.bytes <= 2500 && state.bytes > 2000, "{state:?}");
        // One entry larger than the whole bound is still kept (the newest always is).
        let huge = "y".repeat(3000);
        db.upsert("Setting", &setting("huge", &huge)).unwrap();
        assert_eq!(db.side_len(LOG).unwrap(), 1);
        let (entries, _) = read_after(&db, super::state(&db).unwrap().oldest_cursor(), 10).unwrap();
        assert_eq!(entries[0].item["value"], huge.as_str());
    }

    #[test]
    fn a_clean_stop_keeps_the_log_and_anything_else_begins_a_new_era() {
        let dir = tempfile::tempdir().unwrap();
        let schema = schema();
        let path = dir.path().join("log.db");
        let open = || {
            let db = Db::open(&path, schema.clone(), DbOptions::default()).unwrap();
            install(&db, schema.clone(), ChangeLogLimits::default());
            db
        };

        // First run: a fresh log.
        let db = open();
        assert_eq!(on_start(&db, true).unwrap().unwrap().next, 1);
        db.create("Setting", &setting("a", "1")).unwrap();
        mark_clean_stop(&db).unwrap();
        db.close().unwrap();

        // After a clean stop the log goes on: cursor 1 is still good.
        let db = open();
        let state = on_start(&db, true).unwrap().unwrap();
        assert_eq!((state.first, state.next), (1, 2));
        db.create("Setting", &setting("b", "2")).unwrap();
        assert_eq!(seqs(&read_after(&db, 1, 10).unwrap().0), [2]);
        // No clean stop this time (a crash).
        db.close().unwrap();

        // After a crash: a new era; every older cursor, even the newest one, is gone.
        let db = open();
        let state = on_start(&db, true).unwrap().unwrap();
        assert_eq!(state.next, 3 + ERA_GAP);
        assert_eq!(state.first, state.next);
        assert_eq!(db.side_len(LOG).unwrap(), 0);
        for cursor in [0, 1, 2, 3, 100] {
            assert!(
                matches!(read_after(&db, cursor, 10), Err(ReadError::Gone { .. })),
                "cursor {cursor}"
            );
        }
        db.create("Setting", &setting("c", "3")).unwrap();
        let (entries, _) = read_after(&db, state.oldest_cursor(), 10).unwrap();
        assert_eq!(seqs(&entries), [3 + ERA_GAP]);
        mark_clean_stop(&db).unwrap();
        db.close().unwrap();

        // A run without the log after a clean stop: its writes are not logged, so the next
        // logging run must not take the old cursor as complete.
        let db = Db::open(&path, schema.clone(), DbOptions::default()).unwrap();
        assert_eq!(on_start(&db, false).unwrap(), None);
        db.create("Setting", &setting("unlogged", "4")).unwrap();
        db.close().unwrap();
        let db = open();
        let after = on_start(&db, true).unwrap().unwrap();
        assert_eq!(after.next, 4 + 2 * ERA_GAP);
        assert!(matches!(
            read_after(&db, 3 + ERA_GAP, 10),
            Err(ReadError::Gone { .. })
        ));
    }
}
