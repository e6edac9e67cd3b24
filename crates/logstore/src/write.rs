//! The write transaction's private changes and their commit. Changes wait in an overlay (per
//! table, each changed key's new value or its removal) that the transaction's own reads merge
//! over the committed state; nothing touches the file or the shared state before commit, so
//! dropping a transaction is free. Commit encodes the overlay as one record, appends it with
//! one write, syncs when asked, and only then applies it to the state readers see: a reader
//! never sees a change that is not in the file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use crate::format::RecordWriter;
use crate::state::{range_is_valid, Committed, KeyArena, Slot, SlotRef, State};
use crate::{Inner, LogError};

/// Entries collected by a transaction's range read: keys and values, owned.
pub(crate) type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The writer's own state, behind the writer slot's mutex (one writer at a time).
pub(crate) struct Writer {
    /// Where the next record goes: the end of the last whole record.
    pub end: u64,
    /// The next table id to define (never reused within a file, so a record can never be read
    /// against the wrong table).
    pub next_table_id: u64,
    /// Set when a failed commit could not be cut off the file again: the file's tail is
    /// unknown, so no further record may go after it until the store is reopened.
    pub failed: Option<String>,
}

impl Writer {
    /// Refuses to write once a failed commit could not be undone.
    pub(crate) fn check_usable(&self) -> Result<(), LogError> {
        match &self.failed {
            None => Ok(()),
            Some(cause) => Err(LogError::Io(io::Error::other(format!(
                "the log refuses writes until it is reopened: {cause}"
            )))),
        }
    }
}

/// One table's changes in a transaction.
struct TableChange {
    /// The table's id in the committed state (which no one else changes while the writer slot
    /// is held), if it existed when the transaction first touched it.
    base_id: Option<u32>,
    /// The committed table was deleted: its keys are hidden, and commit writes the deletion.
    cleared: bool,
    /// Whether the table exists in the transaction's view.
    exists: bool,
    /// Each changed key's change.
    entries: BTreeMap<Vec<u8>, KeyChange>,
    /// Keys in the transaction's view minus keys in the committed table it still shows.
    len_delta: i64,
    /// The id commit assigned to a table it defines.
    new_id: Option<u32>,
}

impl TableChange {
    /// Whether the committed table's keys show through.
    fn sees_base(&self) -> bool {
        self.base_id.is_some() && !self.cleared
    }

    /// Whether commit must define the table.
    fn needs_definition(&self) -> bool {
        self.exists && (self.base_id.is_none() || self.cleared)
    }

    fn changes_anything(&self) -> bool {
        self.cleared || self.needs_definition() || !self.entries.is_empty()
    }
}

/// A key a transaction changed.
struct KeyChange {
    /// The new value, or `None` for a removal of a committed key.
    value: Option<Vec<u8>>,
    /// The committed value's length when the transaction first touched the key (`None`: no
    /// committed value shows through), so that commit need not look it up again.
    committed: Option<usize>,
}

/// A key's state in the transaction's view.
enum Seen<T> {
    /// The overlay decides.
    Overlay(Option<T>),
    /// The committed state decides.
    Base,
}

/// A transaction's changes.
#[derive(Default)]
pub(crate) struct Overlay {
    tables: BTreeMap<String, TableChange>,
}

impl Overlay {
    pub(crate) fn is_empty(&self) -> bool {
        !self.tables.values().any(TableChange::changes_anything)
    }

    fn seen<'a>(&'a self, table: &str, key: &[u8]) -> Seen<&'a Vec<u8>> {
        match self.tables.get(table) {
            None => Seen::Base,
            Some(change) => match change.entries.get(key) {
                Some(change) => Seen::Overlay(change.value.as_ref()),
                None if change.sees_base() => Seen::Base,
                None => Seen::Overlay(None),
            },
        }
    }

    pub(crate) fn get(
        &self,
        inner: &Inner,
        table: &str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, LogError> {
        match self.seen(table, key) {
            Seen::Overlay(value) => Ok(value.cloned()),
            Seen::Base => {
                let state = inner.read_state();
                let Some(slot) = state.tables.get(table).and_then(|t| t.index.get(key)) else {
                    return Ok(None);
                };
                Ok(Some(slot.read(state.file.as_deref())?.into_owned()))
            }
        }
    }

    pub(crate) fn contains(&self, inner: &Inner, table: &str, key: &[u8]) -> bool {
        match self.seen(table, key) {
            Seen::Overlay(value) => value.is_some(),
            Seen::Base => base_contains(&inner.read_state(), table, key),
        }
    }

    pub(crate) fn len(&self, inner: &Inner, table: &str) -> u64 {
        let state = inner.read_state();
        let base = state.tables.get(table).map_or(0, |t| t.index.len());
        match self.tables.get(table) {
            None => base,
            Some(change) => {
                let shown = if change.sees_base() { base } else { 0 };
                shown.saturating_add_signed(change.len_delta)
            }
        }
    }

    /// Names of the tables in the transaction's view, in byte order.
    pub(crate) fn table_names(&self, inner: &Inner) -> Vec<String> {
        let state = inner.read_state();
        let mut names: Vec<String> = state
            .tables
            .keys()
            .filter(|name| !self.tables.contains_key(name.as_str()))
            .cloned()
            .collect();
        names.extend(
            self.tables
                .iter()
                .filter(|(_, change)| change.exists)
                .map(|(name, _)| name.clone()),
        );
        names.sort_unstable();
        names
    }

    /// The change record of `table`, made on first touch with what the committed state holds.
    fn change_mut(&mut self, inner: &Inner, table: &str) -> &mut TableChange {
        if !self.tables.contains_key(table) {
            let base_id = inner.read_state().tables.get(table).map(|t| t.id);
            self.tables.insert(
                table.to_owned(),
                TableChange {
                    base_id,
                    cleared: false,
                    exists: base_id.is_some(),
                    entries: BTreeMap::new(),
                    len_delta: 0,
                    new_id: None,
                },
            );
        }
        // Inserted just above when it was missing.
        self.tables
            .get_mut(table)
            .unwrap_or_else(|| unreachable!("the change of {table:?} was just inserted"))
    }

    /// Whether `key` is in the transaction's view, and the committed value's length when the
    /// committed table shows through (one lookup in the committed state at most).
    fn lookup(&self, inner: &Inner, table: &str, key: &[u8]) -> (bool, Option<usize>) {
        let committed = || {
            let len = committed_len(&inner.read_state(), table, key);
            (len.is_some(), len)
        };
        match self.tables.get(table) {
            None => committed(),
            Some(change) => match change.entries.get(key) {
                Some(change) => (change.value.is_some(), change.committed),
                None if change.sees_base() => committed(),
                None => (false, None),
            },
        }
    }

    pub(crate) fn insert(&mut self, inner: &Inner, table: &str, key: &[u8], value: &[u8]) {
        // One search of the table's changes (not `lookup` and then an insert): a key changed
        // before keeps the committed length recorded at its first touch.
        let change = self.change_mut(inner, table);
        change.exists = true;
        let value = Some(value.to_vec());
        if let Some(entry) = change.entries.get_mut(key) {
            if entry.value.is_none() {
                change.len_delta += 1;
            }
            entry.value = value;
            return;
        }
        let committed = if change.sees_base() {
            committed_len(&inner.read_state(), table, key)
        } else {
            None
        };
        if committed.is_none() {
            change.len_delta += 1;
        }
        change
            .entries
            .insert(key.to_vec(), KeyChange { value, committed });
    }

    /// [`Overlay::insert`] of a key the caller found absent in this transaction: the
    /// committed state is not asked again (the committed length is "none"). A key the
    /// transaction's own changes show is refused (`false`, nothing changed), which costs
    /// nothing since the changes are searched anyway; a key only the committed state holds is
    /// the caller's mistake, caught by a debug assertion (release builds trust the caller:
    /// the table's length and live bytes would count the key twice).
    pub(crate) fn insert_absent(
        &mut self,
        inner: &Inner,
        table: &str,
        key: Vec<u8>,
        value: Vec<u8>,
    ) -> bool {
        let change = self.change_mut(inner, table);
        match change.entries.get_mut(&key) {
            Some(entry) if entry.value.is_some() => return false,
            Some(entry) => {
                // Removed earlier in this transaction: absent, its committed length stays.
                entry.value = Some(value);
                change.exists = true;
                change.len_delta += 1;
                return true;
            }
            None => {}
        }
        debug_assert!(
            !change.sees_base() || committed_len(&inner.read_state(), table, &key).is_none(),
            "insert_absent of a key the committed table {table:?} holds"
        );
        change.exists = true;
        change.len_delta += 1;
        let value = Some(value);
        change.entries.insert(
            key,
            KeyChange {
                value,
                committed: None,
            },
        );
        true
    }

    pub(crate) fn remove(&mut self, inner: &Inner, table: &str, key: &[u8]) -> bool {
        let (exists, committed) = self.lookup(inner, table, key);
        if !exists {
            return false;
        }
        let change = self.change_mut(inner, table);
        if committed.is_some() {
            let value = None;
            change
                .entries
                .insert(key.to_vec(), KeyChange { value, committed });
        } else {
            change.entries.remove(key);
        }
        change.len_delta -= 1;
        true
    }

    pub(crate) fn delete_table(&mut self, inner: &Inner, table: &str) -> bool {
        let exists = match self.tables.get(table) {
            Some(change) => change.exists,
            None => inner.read_state().tables.contains_key(table),
        };
        if !exists {
            return false;
        }
        let change = self.change_mut(inner, table);
        if change.base_id.is_none() {
            // Created by this transaction: forgetting it is deleting it.
            self.tables.remove(table);
            return true;
        }
        change.cleared = true;
        change.exists = false;
        change.entries.clear();
        change.len_delta = 0;
        true
    }

    /// Entries (or keys alone, values left empty) of `table` in `range`, merged, in order or
    /// reversed, at most `limit`.
    pub(crate) fn range(
        &self,
        inner: &Inner,
        table: &str,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        reverse: bool,
        limit: usize,
        with_values: bool,
    ) -> Result<Entries, LogError> {
        if limit == 0 || !range_is_valid(range) {
            return Ok(Vec::new());
        }
        let change = self.tables.get(table);
        let state = inner.read_state();
        let base_table = match change {
            Some(change) if !change.sees_base() => None,
            _ => state.tables.get(table),
        };
        let overlay = change
            .into_iter()
            .flat_map(|c| c.entries.range::<[u8], _>(range))
            .map(|(key, change)| (key.as_slice(), &change.value));
        // Keys the committed index lends live in this arena until the entries are copied out.
        let keys = KeyArena::default();
        let base = base_table
            .into_iter()
            .flat_map(|t| t.index.range(range, &keys));
        let merge = Merge {
            file: state.file.as_deref(),
            reverse,
            limit,
            with_values,
        };
        if reverse {
            merge.run(overlay.rev(), base.rev())
        } else {
            merge.run(overlay, base)
        }
    }

    /// Appends the changes as one record, syncs when `durable`, then applies them.
    pub(crate) fn commit(
        mut self,
        inner: &Inner,
        writer: &mut Writer,
        durable: bool,
    ) -> Result<(), LogError> {
        if self.is_empty() {
            return Ok(());
        }
        writer.check_usable()?;
        if inner.path.is_none() {
            for change in self.tables.values_mut().filter(|c| c.needs_definition()) {
                change.new_id = Some(take_table_id(writer)?);
            }
            self.apply(inner, writer, None);
            return Ok(());
        }
        let file = inner.read_state().file.clone().ok_or(LogError::Closed)?;
        let mut record = RecordWriter::new();
        // Deletions first, so that a name deleted and defined again in this transaction is
        // free again when replay reaches its new definition.
        for change in self.tables.values().filter(|c| c.cleared) {
            if let Some(id) = change.base_id {
                record.delete_table(id);
            }
        }
        for (name, change) in &mut self.tables {
            if change.needs_definition() {
                let id = take_table_id(writer)?;
                change.new_id = Some(id);
                record.define(id, name);
            }
        }
        let mut value_offsets = Vec::new();
        for change in self.tables.values().filter(|c| c.exists) {
            let Some(id) = change.new_id.or(change.base_id) else {
                continue;
            };
            for (key, change) in &change.entries {
                match &change.value {
                    Some(value) => value_offsets.push(record.insert(id, key, value)),
                    None => record.remove(id, key),
                }
            }
        }
        let max = u64::from(inner.options.max_record_bytes);
        if record.payload_len() > max {
            return Err(LogError::TooLarge {
                what: "the transaction's record",
                bytes: record.payload_len(),
                max,
            });
        }
        let bytes = record.finish(inner.synced_end.load(Ordering::SeqCst));
        let start = writer.end;
        if let Err(e) = file.write_all_at(&bytes, start) {
            return Err(undo(&file, writer, start, e));
        }
        if durable {
            if let Err(e) = file.sync_data() {
                return Err(undo(&file, writer, start, e));
            }
            // Every earlier commit went out with this one.
            inner.unsynced.store(false, Ordering::SeqCst);
            inner
                .synced_end
                .fetch_max(start + bytes.len() as u64, Ordering::SeqCst);
        } else {
            inner.unsynced.store(true, Ordering::SeqCst);
        }
        writer.end = start + bytes.len() as u64;
        self.apply(inner, writer, Some((start, value_offsets)));
        Ok(())
    }

    /// Makes the changes visible. `record` is where the record starts and where each insert's
    /// value sits in it (in the order the changes are walked); none in memory.
    fn apply(self, inner: &Inner, writer: &Writer, record: Option<(u64, Vec<u64>)>) {
        let inline_limit = inner.options.inline_value_bytes;
        let (start, offsets) = record.unwrap_or_default();
        let in_file = inner.path.is_some();
        let mut offsets = offsets.into_iter();
        let mut state = inner.write_state();
        for (name, change) in self.tables {
            if change.cleared {
                state.delete_table(&name);
            }
            if let Some(id) = change.new_id {
                state.define_table(&name, id);
            }
            if !change.exists {
                continue;
            }
            for (key, key_change) in change.entries {
                let committed = Committed::Known(key_change.committed);
                match key_change.value {
                    Some(value) => {
                        let offset = offsets.next();
                        let slot = match offset {
                            Some(offset) if in_file && value.len() > inline_limit => Slot::File {
                                at: start + offset,
                                // Under the record limit, a u32.
                                len: value.len() as u32,
                            },
                            _ => Slot::Inline(value.into_boxed_slice()),
                        };
                        state.put(&name, &key, slot, committed);
                    }
                    None => {
                        state.remove(&name, &key, committed);
                    }
                }
            }
        }
        if in_file {
            state.file_bytes = writer.end;
        }
    }
}

fn committed_len(state: &State, table: &str, key: &[u8]) -> Option<usize> {
    let table = state.tables.get(table)?;
    table.index.get(key).map(|slot| slot.value_len())
}

fn base_contains(state: &State, table: &str, key: &[u8]) -> bool {
    state
        .tables
        .get(table)
        .is_some_and(|t| t.index.contains(key))
}

fn take_table_id(writer: &mut Writer) -> Result<u32, LogError> {
    let id = u32::try_from(writer.next_table_id).map_err(|_| LogError::TooLarge {
        what: "the number of tables defined in this file",
        bytes: writer.next_table_id,
        max: u64::from(u32::MAX),
    })?;
    writer.next_table_id += 1;
    Ok(id)
}

/// Cuts a failed commit's bytes off again; when even that fails, the writer refuses further
/// commits (their records would follow bytes of unknown content).
fn undo(file: &File, writer: &mut Writer, start: u64, error: io::Error) -> LogError {
    if let Err(undo_error) = file.set_len(start) {
        tracing::error!(%error, %undo_error, start, "a failed commit could not be cut off the log");
        writer.failed = Some(format!(
            "a commit at byte {start} failed ({error}) and cutting it off failed too ({undo_error})"
        ));
    }
    LogError::Io(error)
}

/// How a merged range is collected.
struct Merge<'f> {
    file: Option<&'f File>,
    reverse: bool,
    limit: usize,
    with_values: bool,
}

impl Merge<'_> {
    fn run<'a>(
        &self,
        overlay: impl Iterator<Item = (&'a [u8], &'a Option<Vec<u8>>)>,
        base: impl Iterator<Item = (&'a [u8], SlotRef<'a>)>,
    ) -> Result<Entries, LogError> {
        let mut overlay = overlay.peekable();
        let mut base = base.peekable();
        let mut out = Vec::new();
        while out.len() < self.limit {
            let overlay_first = match (overlay.peek(), base.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((o, _)), Some((b, _))) => {
                    if o == b {
                        // The transaction's change hides the committed entry.
                        base.next();
                        true
                    } else {
                        (o < b) != self.reverse
                    }
                }
            };
            if overlay_first {
                if let Some((key, Some(value))) = overlay.next() {
                    let value = if self.with_values {
                        value.clone()
                    } else {
                        Vec::new()
                    };
                    out.push((key.to_vec(), value));
                }
            } else if let Some((key, slot)) = base.next() {
                let value = if self.with_values {
                    slot.read(self.file)?.into_owned()
                } else {
                    Vec::new()
                };
                out.push((key.to_vec(), value));
            }
        }
        Ok(out)
    }
}
