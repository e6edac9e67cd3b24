//! The committed state in RAM: every table's keys in order, each with its value or the value's
//! place in the file, plus the counters [`crate::LogStats`] reports. Commits, replay and
//! compaction change it only through the methods here, so the counters stay true.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Bound;
use std::sync::Arc;

use crate::format::{define_op_bytes, insert_op_bytes, HEADER_BYTES, RECORD_HEADER_BYTES};
pub(crate) use crate::index::{allocation_bytes, Committed, Index, KeyArena, Slot, SlotRef};

/// Estimated RAM of one table beyond its entries: the map entry, the name's allocation and the
/// index's own fields.
const TABLE_BYTES: u64 = 128;

/// One table: its id in the file and its entries.
pub(crate) struct Table {
    pub id: u32,
    pub index: Index,
}

/// Everything a reader sees; behind the store's `RwLock`.
#[derive(Default)]
pub(crate) struct State {
    pub tables: HashMap<String, Table>,
    /// The log file (none in memory and after close). Here, under the same lock as the slots
    /// that point into it, so a compaction swaps both at once and a reader never reads a
    /// location in the wrong file.
    pub file: Option<Arc<File>>,
    pub closed: bool,
    /// Bytes of the file up to the end of the last committed record.
    pub file_bytes: u64,
    pub compactions: u64,
    entries: u64,
    /// Encoded bytes of every live definition and entry (what a compaction writes, without
    /// the header and record framing, added by [`State::live_bytes`]).
    live_op_bytes: u64,
}

impl State {
    pub(crate) fn entries(&self) -> u64 {
        self.entries
    }

    /// Estimated RAM of every table's index and the values it keeps (summed on demand: a
    /// merge inside an index changes its size without a commit knowing).
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.tables
            .iter()
            .map(|(name, table)| {
                TABLE_BYTES + allocation_bytes(name.len()) + table.index.memory_bytes()
            })
            .sum()
    }

    /// What a compaction would write: header, one record header per started megabyte, and the
    /// operations.
    pub(crate) fn live_bytes(&self) -> u64 {
        let records = self
            .live_op_bytes
            .div_ceil(crate::compact::RECORD_TARGET_BYTES as u64);
        HEADER_BYTES + records * RECORD_HEADER_BYTES + self.live_op_bytes
    }

    /// Adds an empty table (the caller checked that `name` is free).
    pub(crate) fn define_table(&mut self, name: &str, id: u32) {
        self.live_op_bytes += define_op_bytes(name.len());
        self.tables.insert(
            name.to_owned(),
            Table {
                id,
                index: Index::default(),
            },
        );
    }

    /// Removes a table and its entries; returns its id.
    pub(crate) fn delete_table(&mut self, name: &str) -> Option<u32> {
        let table = self.tables.remove(name)?;
        self.live_op_bytes -= define_op_bytes(name.len());
        self.entries -= table.index.len();
        let mut op_bytes = 0;
        let walked: Result<(), std::convert::Infallible> = table.index.try_for_each(|key, slot| {
            op_bytes += insert_op_bytes(key.len(), slot.value_len());
            Ok(())
        });
        let Ok(()) = walked;
        self.live_op_bytes -= op_bytes;
        Some(table.id)
    }

    /// Inserts or replaces an entry of an existing table (no-op for a missing table, which
    /// the callers rule out).
    pub(crate) fn put(&mut self, table: &str, key: &[u8], slot: Slot, committed: Committed) {
        let Some(table) = self.tables.get_mut(table) else {
            return;
        };
        self.live_op_bytes += insert_op_bytes(key.len(), slot.value_len());
        match table.index.put(key, slot, committed) {
            Some(old_len) => self.live_op_bytes -= insert_op_bytes(key.len(), old_len),
            None => self.entries += 1,
        }
    }

    /// Removes an entry; returns whether it was there.
    pub(crate) fn remove(&mut self, table: &str, key: &[u8], committed: Committed) -> bool {
        let Some(table) = self.tables.get_mut(table) else {
            return false;
        };
        let Some(old_len) = table.index.remove(key, committed) else {
            return false;
        };
        self.entries -= 1;
        self.live_op_bytes -= insert_op_bytes(key.len(), old_len);
        true
    }

    /// Merges every table's recent changes into its compact run (after a replay, so that a
    /// store starts compact).
    pub(crate) fn settle(&mut self) {
        for table in self.tables.values_mut() {
            table.index.merge();
        }
    }

    /// Forgets every table (close), keeping the file counters for stats.
    pub(crate) fn clear(&mut self) {
        self.tables = HashMap::new();
        self.entries = 0;
        self.live_op_bytes = 0;
    }
}

/// Whether `BTreeMap::range` accepts `range` (it panics on a start after the end, and on an
/// equal start and end both excluded); a range it refuses holds no key, so callers answer
/// nothing for it.
pub(crate) fn range_is_valid(range: (Bound<&[u8]>, Bound<&[u8]>)) -> bool {
    match range {
        (Bound::Included(start), Bound::Included(end))
        | (Bound::Included(start), Bound::Excluded(end))
        | (Bound::Excluded(start), Bound::Included(end)) => start <= end,
        (Bound::Excluded(start), Bound::Excluded(end)) => start < end,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LogError;

    #[test]
    fn counters_follow_puts_replacements_removes_and_deletes() {
        let mut state = State::default();
        assert_eq!(state.live_bytes(), HEADER_BYTES);
        state.define_table("t", 1);
        state.put(
            "t",
            b"a",
            Slot::Inline(b"12345".to_vec().into()),
            Committed::Unknown,
        );
        state.put(
            "t",
            b"b",
            Slot::File { at: 100, len: 300 },
            Committed::Unknown,
        );
        assert_eq!(state.entries(), 2);
        let ops = define_op_bytes(1) + insert_op_bytes(1, 5) + insert_op_bytes(1, 300);
        assert_eq!(state.live_bytes(), HEADER_BYTES + RECORD_HEADER_BYTES + ops);
        let memory = state.memory_bytes();
        // Replacing keeps the count and swaps the value's bytes.
        state.put(
            "t",
            b"a",
            Slot::Inline(b"1".to_vec().into()),
            Committed::Unknown,
        );
        assert_eq!(state.entries(), 2);
        assert_eq!(
            state.live_bytes(),
            HEADER_BYTES + RECORD_HEADER_BYTES + ops - 4
        );
        assert_eq!(state.memory_bytes(), memory);
        assert!(state.remove("t", b"a", Committed::Unknown));
        assert!(!state.remove("t", b"a", Committed::Unknown));
        assert!(!state.remove("missing", b"a", Committed::Unknown));
        assert_eq!(state.entries(), 1);
        assert_eq!(state.delete_table("t"), Some(1));
        assert_eq!(state.entries(), 0);
        assert_eq!(state.memory_bytes(), 0);
        assert_eq!(state.live_bytes(), HEADER_BYTES);
    }

    #[test]
    fn memory_counts_tables_and_their_indexes() {
        let mut state = State::default();
        assert_eq!(state.memory_bytes(), 0);
        state.define_table("t", 1);
        assert_eq!(state.memory_bytes(), TABLE_BYTES + 16);
        state.put(
            "t",
            b"a",
            Slot::Inline(b"12345".to_vec().into()),
            Committed::Unknown,
        );
        let with_entry = state.memory_bytes();
        assert!(with_entry > TABLE_BYTES + 16);
        state.settle();
        assert!(state.memory_bytes() > TABLE_BYTES + 16);
        state.delete_table("t");
        assert_eq!(state.memory_bytes(), 0);
    }

    #[test]
    fn a_file_value_outside_the_file_is_damage() {
        use std::os::unix::fs::FileExt;
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(b"0123456789", 0).unwrap();
        let inside = Slot::File { at: 2, len: 3 };
        assert_eq!(&*inside.read(Some(&file)).unwrap(), b"234");
        let outside = Slot::File { at: 8, len: 5 };
        assert!(matches!(
            outside.read(Some(&file)),
            Err(LogError::Damaged { offset: 8, .. })
        ));
        assert!(matches!(inside.read(None), Err(LogError::Closed)));
    }

    #[test]
    fn ranges_btreemap_would_panic_on_are_invalid() {
        use Bound::*;
        let (a, b): (&[u8], &[u8]) = (b"a", b"b");
        assert!(range_is_valid((Included(a), Included(a))));
        assert!(range_is_valid((Included(a), Excluded(a))));
        assert!(!range_is_valid((Excluded(a), Excluded(a))));
        assert!(!range_is_valid((Included(b), Included(a))));
        assert!(range_is_valid((Unbounded, Excluded(a))));
        let map: std::collections::BTreeMap<Box<[u8]>, ()> = std::collections::BTreeMap::new();
        // The valid ones do not panic.
        for range in [(Included(a), Excluded(a)), (Excluded(a), Included(b))] {
            assert!(range_is_valid(range));
            assert_eq!(map.range::<[u8], _>(range).count(), 0);
        }
    }
}
