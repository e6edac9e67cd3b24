//! What the status says of the durable outbox (`pending`, `dropped`), kept true with as few
//! database reads as the event loop can afford.
//!
//! The durable outbox is the truth for both figures, but reading it after every turn of the
//! event loop cost a device one to three read transactions per application write (the count
//! after each local change, again after each acknowledgement, and the dropped counter after
//! every event). Here each figure is read only when it may have changed:
//!
//! - `pending` changes by application writes, which always reach the event loop as
//!   notifications (or as a missed notification, which reloads the outbox): after a turn that
//!   handled any, it is read once. The event loop's own transactions that shrink the outbox
//!   (an acknowledgement's trim, a page that superseded entries) say how many entries they
//!   removed, which is subtracted: they cost no read (a read inside them would cost each a
//!   table opened and flushed again).
//! - `dropped` grows only when an application write finds the outbox full (it then drops the
//!   oldest lossy entry, keeping the outbox at its limit). Between two reads of `pending` only
//!   the event loop's own transactions shrink the outbox, and it counts what they remove; so if
//!   the outbox size read now plus what the event loop removed since the previous read is below
//!   the limit, no write since then found it full and the counter cannot have moved. Only
//!   otherwise is it read.

use devtables_db::DbError;

use crate::counted::DbAccess;
use crate::state;

/// The status's view of the durable outbox, and what makes it stale.
#[derive(Debug)]
pub(crate) struct OutboxStatus {
    /// The outbox limit (`AgentConfig::outbox_limit`): a write that finds this many entries
    /// drops a lossy one, or is refused.
    limit: u64,
    /// Entries in the durable outbox, as last read, less what the event loop removed since
    /// (the writes it has not handled yet are counted when it reads again after them).
    pending: u64,
    /// Changes of lossy models a full outbox dropped (the durable counter, as last read).
    dropped: u64,
    /// Application writes were notified (or the outbox changed otherwise) since `pending` was
    /// last read: read it again, and check `dropped`.
    stale: bool,
    /// Entries the event loop's own transactions removed since `pending` was last read.
    removed_since_read: u64,
}

impl OutboxStatus {
    /// Starts from figures read when the agent started (the outbox's size, the dropped counter).
    pub(crate) fn new(limit: u64, pending: u64, dropped: u64) -> OutboxStatus {
        OutboxStatus {
            limit,
            pending,
            dropped,
            stale: false,
            removed_since_read: 0,
        }
    }

    pub(crate) fn pending(&self) -> u64 {
        self.pending
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Application writes committed (their notifications arrived, or some were missed): the
    /// next [`OutboxStatus::refresh`] reads the outbox.
    pub(crate) fn local_writes(&mut self) {
        self.stale = true;
    }

    /// One of the event loop's own transactions added entries (a re-push after a cloud
    /// restore): the next [`OutboxStatus::refresh`] reads the outbox.
    pub(crate) fn recount(&mut self) {
        self.stale = true;
    }

    /// One of the event loop's own transactions removed `removed` entries. They are entries of
    /// writes it handled (it only removes what it loaded, by version), so the count stays that
    /// of the outbox less the writes not handled yet; a count that would go below zero says
    /// otherwise, and is read again.
    pub(crate) fn removed(&mut self, removed: u64) {
        self.removed_since_read = self.removed_since_read.saturating_add(removed);
        match self.pending.checked_sub(removed) {
            Some(left) => self.pending = left,
            None => self.stale = true,
        }
    }

    /// Brings the figures up to date after a turn: reads the outbox's size if application
    /// writes were notified, and the dropped counter only if one of those writes may have
    /// found the outbox full. Returns whether a figure may have changed. On a failed read the
    /// figures stay stale and the next turn tries again.
    pub(crate) fn refresh(&mut self, db: &impl DbAccess) -> Result<bool, DbError> {
        if !self.stale {
            return Ok(false);
        }
        let len = state::outbox_len(db)?;
        if len.saturating_add(self.removed_since_read) >= self.limit {
            self.dropped = state::dropped(db)?;
        }
        self.pending = len;
        self.removed_since_read = 0;
        self.stale = false;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counted::CountedDb;
    use devtables_db::{Db, DbOptions, Origin};
    use std::sync::Arc;

    fn db() -> CountedDb {
        let schema = Arc::new(
            devtables_schema::Schema::load(std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../examples/schema.json5"
            )))
            .unwrap(),
        );
        CountedDb::new(Db::open_in_memory(schema, DbOptions::default()).unwrap())
    }

    /// Puts `n` entries in the outbox table and sets the dropped counter, as writes would.
    fn fill(db: &CountedDb, n: u64, dropped: u64) {
        db.write(Origin::Remote, |t| {
            let mut side = t.side();
            for i in 0..n {
                side.put(state::OUTBOX, &i.to_be_bytes(), b"{}")?;
            }
            side.put(state::META, b"dropped", &dropped.to_be_bytes())
        })
        .unwrap();
    }

    #[test]
    fn nothing_is_read_without_local_writes() {
        let db = db();
        let mut status = OutboxStatus::new(10, 3, 0);
        fill(&db, 3, 0);
        status.removed(1);
        assert!(!status.refresh(&db).unwrap());
        assert_eq!(db.reads(), 0);
        assert_eq!(
            status.pending(),
            2,
            "the event loop's removals are subtracted"
        );
        status.removed(5);
        assert!(
            status.refresh(&db).unwrap(),
            "a count below zero is read again"
        );
        assert_eq!((status.pending(), db.reads()), (3, 1));
    }

    #[test]
    fn local_writes_far_from_the_limit_read_the_size_only() {
        let db = db();
        let mut status = OutboxStatus::new(10, 0, 0);
        fill(&db, 3, 0);
        status.local_writes();
        assert!(status.refresh(&db).unwrap());
        assert_eq!((status.pending(), db.reads()), (3, 1));
        assert!(
            !status.refresh(&db).unwrap(),
            "read once per notified writes"
        );
        assert_eq!(db.reads(), 1);
    }

    #[test]
    fn a_full_outbox_reads_the_dropped_counter() {
        let db = db();
        let mut status = OutboxStatus::new(3, 0, 0);
        fill(&db, 3, 2);
        status.local_writes();
        status.refresh(&db).unwrap();
        assert_eq!((status.pending(), status.dropped()), (3, 2));
    }

    #[test]
    fn the_event_loops_removals_since_the_last_read_count_towards_the_limit() {
        // The outbox was full (a write dropped an entry), then the event loop trimmed two
        // entries: the size alone (1) would say no write could have found it full.
        let db = db();
        let mut status = OutboxStatus::new(3, 3, 0);
        fill(&db, 1, 1);
        status.removed(2);
        status.local_writes();
        status.refresh(&db).unwrap();
        assert_eq!(status.dropped(), 1);
        // The removals were accounted for by that read: the next window starts empty.
        status.local_writes();
        status.refresh(&db).unwrap();
        assert_eq!(db.reads(), 3, "size and counter, then the size alone");
    }
}
