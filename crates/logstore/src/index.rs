//! One table's committed index in RAM: every key in order with where its value is, in a
//! compact form, because the index is most of the device database's RAM (issue 17: a
//! `BTreeMap` of boxed keys costs ~110 bytes an entry; keys of a table share long prefixes).
//!
//! # Layout
//! - The *run*: sorted pages of at most [`Limits::page_entries`] entries. A page is one byte
//!   arena of front-coded entries in blocks of at most [`Limits::block_entries`]: each entry
//!   is the length it shares with the key before it (always the whole common prefix: the
//!   in-block scan relies on it), its own suffix, and its slot (an inline value's bytes, or a
//!   file location's significant bytes, 1-13 in all). A block's first entry shares nothing;
//!   a lookup binary-searches the pages' first keys, then 8 bytes of each block's first key
//!   (after the prefix the whole page shares), then scans one block.
//! - The *delta*: a small `BTreeMap` of recent inserts and of removal markers over run
//!   entries. Lookups ask the delta, then the run; ranges merge the two. When the delta holds
//!   more than [`Limits::delta_entries`] entries it is merged into the run: only the pages it
//!   falls in are rewritten, blocks it does not touch are copied byte for byte, and only one
//!   stretch of pages is held twice at a time. Appending readings rewrites the last page.
//!
//! # Keys lent by iterators
//! Front-coded keys are not stored whole, yet [`crate::LogRange`] lends each key for as long
//! as its read view lives. A [`KeyArena`], owned by the read view, keeps every block an
//! iterator decodes until the view is dropped; a view is held for one operation, so that is
//! bounded by what the operation reads.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{btree_map, BTreeMap};
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::LogError;

/// Estimated RAM of one delta entry in its `BTreeMap` node beyond its key and value bytes: the
/// key's box and the slot (40 bytes) in nodes that are a little over half full after ordered
/// inserts and about 70% full after random ones, plus the nodes' links. Measured against RSS
/// at 100k random-order inserts (tests/it/bench.rs): 109 bytes an entry with 40-byte keys,
/// this estimate 112.
const NODE_BYTES_PER_ENTRY: u64 = 64;

/// RAM an allocation of `len` bytes takes with the allocator's header and rounding (glibc:
/// 8 bytes of header, 16-byte chunks); nothing for an empty box, which allocates nothing.
pub(crate) fn allocation_bytes(len: usize) -> u64 {
    if len == 0 {
        0
    } else {
        (len as u64 + 8).div_ceil(16) * 16
    }
}

/// Where a value is, owned: what a commit or replay hands the index.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Slot {
    /// In RAM (short values, and every value of an in-memory store).
    Inline(Box<[u8]>),
    /// In the file, read when asked for.
    File { at: u64, len: u32 },
}

impl Slot {
    pub(crate) fn value_len(&self) -> usize {
        self.as_ref().value_len()
    }

    pub(crate) fn as_ref(&self) -> SlotRef<'_> {
        match self {
            Slot::Inline(value) => SlotRef::Inline(value),
            Slot::File { at, len } => SlotRef::File { at: *at, len: *len },
        }
    }

    /// RAM of the value beyond the slot itself.
    fn value_memory(&self) -> u64 {
        match self {
            Slot::Inline(value) => allocation_bytes(value.len()),
            Slot::File { .. } => 0,
        }
    }

    /// Reads the value (see [`SlotRef::read`]).
    #[cfg(test)]
    pub(crate) fn read<'a>(&'a self, file: Option<&File>) -> Result<Cow<'a, [u8]>, LogError> {
        self.as_ref().read(file)
    }
}

/// Where a value is, borrowed from the index.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum SlotRef<'a> {
    Inline(&'a [u8]),
    File { at: u64, len: u32 },
}

impl<'a> SlotRef<'a> {
    pub(crate) fn value_len(&self) -> usize {
        match self {
            SlotRef::Inline(value) => value.len(),
            SlotRef::File { len, .. } => *len as usize,
        }
    }

    pub(crate) fn is_file(&self) -> bool {
        matches!(self, SlotRef::File { .. })
    }

    /// The value: borrowed when in RAM, read from `file` otherwise.
    pub(crate) fn read(self, file: Option<&File>) -> Result<Cow<'a, [u8]>, LogError> {
        match self {
            SlotRef::Inline(value) => Ok(Cow::Borrowed(value)),
            SlotRef::File { at, len } => {
                let file = file.ok_or(LogError::Closed)?;
                let mut value = vec![0; len as usize];
                match file.read_exact_at(&mut value, at) {
                    Ok(()) => Ok(Cow::Owned(value)),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(LogError::Damaged {
                        offset: at,
                        detail: format!("a value of {len} bytes runs past the end of the file"),
                    }),
                    Err(e) => Err(LogError::Io(e)),
                }
            }
        }
    }
}

/// What the caller knows of a key's committed value before it changes it: a write
/// transaction looked it up when it first touched the key, so its commit need not again.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Committed {
    Unknown,
    /// The committed value's length, or `None` for no committed value.
    Known(Option<usize>),
}

/// The sizes that shape an index; fixed in the store, small in tests so that every path runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Entries per front-coded block (a lookup scans at most this many).
    pub block_entries: usize,
    /// Entries per page (a merge rewrites whole pages).
    pub page_entries: usize,
    /// The delta is merged into the run once it holds more than the larger of this...
    pub delta_min_entries: usize,
    /// ...and the run's entries divided by this.
    pub delta_run_divisor: usize,
}

impl Limits {
    /// The store's sizes, chosen with `bench_db_tables` (tests/it/bench.rs, 100k items):
    /// pages of 1024 entries keep a rebuild's second copy and the heap's leftovers small; a
    /// delta of at most max(256, run/32) entries (tree nodes cost ~110 bytes an entry, pages
    /// ~25) peaked at 34 bytes an entry of RSS against 52 with run/8, and merged often enough
    /// to cost inserts ~10% (run/8: cheaper merges, but the bigger delta). The floor of 256
    /// (it was 2048) bounds what a small table's removals hold: a removal is a marker in the
    /// delta until a merge drops the entry from the pages, so a table of a few hundred items
    /// emptied by its removals kept its whole size in RAM, several times over.
    pub(crate) const STORE: Limits = Limits {
        block_entries: 16,
        page_entries: 1024,
        delta_min_entries: 256,
        delta_run_divisor: 32,
    };

    fn delta_entries(&self, run_len: usize) -> usize {
        self.delta_min_entries
            .max(run_len / self.delta_run_divisor.max(1))
    }
}

// ---------------------------------------------------------------------------------------------
// Varints and the entry encoding.

#[inline]
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[inline(always)]
fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    // Most varints here (shared lengths, suffix lengths) are one byte.
    let first = *bytes.get(*at)?;
    if first < 0x80 {
        *at += 1;
        return Some(u64::from(first));
    }
    get_long_varint(bytes, at)
}

#[inline(never)]
fn get_long_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// Appends one entry: shared prefix length, suffix length, suffix, then the slot. A slot in
/// the file is one byte (bit 0 set, bits 1-4 the offset's byte count, bits 5-7 the length's)
/// then the length and the offset, little-endian, significant bytes only; an inline slot is a
/// varint (value length << 1) then the bytes. Either way the first byte or two say how long
/// the slot is, so a scan skips it without decoding it. (Pages are written by [`PageBuilder`],
/// which writes the same parts; this whole-entry form is the format's reference in tests.)
#[cfg(test)]
fn encode_entry(out: &mut Vec<u8>, shared: usize, suffix: &[u8], slot: SlotRef<'_>) {
    put_varint(out, shared as u64);
    put_varint(out, suffix.len() as u64);
    out.extend_from_slice(suffix);
    encode_slot(out, slot);
}

fn encode_slot(out: &mut Vec<u8>, slot: SlotRef<'_>) {
    match slot {
        SlotRef::Inline(value) => {
            put_varint(out, (value.len() as u64) << 1);
            out.extend_from_slice(value);
        }
        SlotRef::File { at, len } => {
            let (encoded, used) = encode_file_slot(at, len);
            out.extend_from_slice(encoded.get(..used).unwrap_or_default());
        }
    }
}

/// A file slot's encoding on the stack, and how many of its bytes are used.
#[inline]
fn encode_file_slot(at: u64, len: u32) -> ([u8; 13], usize) {
    let offset_bytes = 8 - (at.leading_zeros() / 8) as usize;
    let len_bytes = 4 - (len.leading_zeros() / 8) as usize;
    let mut encoded = [0u8; 13];
    encoded[0] = 1 | ((offset_bytes as u8) << 1) | ((len_bytes as u8) << 5);
    encoded[1..1 + len_bytes].copy_from_slice(&len.to_le_bytes()[..len_bytes]);
    encoded[1 + len_bytes..1 + len_bytes + offset_bytes]
        .copy_from_slice(&at.to_le_bytes()[..offset_bytes]);
    (encoded, 1 + len_bytes + offset_bytes)
}

/// The byte counts of a file slot's offset and length, from its first byte.
#[inline]
fn file_slot_sizes(first: u8) -> (usize, usize) {
    (usize::from((first >> 1) & 0xf), usize::from(first >> 5))
}

/// An entry's key part as read back: shared length, suffix, and where its slot starts.
struct RawKey<'a> {
    shared: usize,
    suffix: &'a [u8],
    slot_at: usize,
}

/// Reads the key part of the entry at `at`; `None` only if the arena were not what
/// [`encode_entry`] wrote.
#[inline]
fn decode_key(bytes: &[u8], at: usize) -> Option<RawKey<'_>> {
    let mut at = at;
    let shared = usize::try_from(get_varint(bytes, &mut at)?).ok()?;
    let suffix_len = usize::try_from(get_varint(bytes, &mut at)?).ok()?;
    let end = at.checked_add(suffix_len)?;
    let suffix = bytes.get(at..end)?;
    Some(RawKey {
        shared,
        suffix,
        slot_at: end,
    })
}

/// The slot at `at` and where the next entry starts.
#[inline]
fn decode_slot(bytes: &[u8], at: usize) -> Option<(SlotRef<'_>, usize)> {
    let first = *bytes.get(at)?;
    if first & 1 == 1 {
        let (offset_bytes, len_bytes) = file_slot_sizes(first);
        if offset_bytes > 8 || len_bytes > 4 {
            return None;
        }
        let len_at = at + 1;
        let offset_at = len_at + len_bytes;
        let end = offset_at + offset_bytes;
        let mut len = [0u8; 4];
        len.get_mut(..len_bytes)?
            .copy_from_slice(bytes.get(len_at..offset_at)?);
        let mut offset = [0u8; 8];
        offset
            .get_mut(..offset_bytes)?
            .copy_from_slice(bytes.get(offset_at..end)?);
        let slot = SlotRef::File {
            at: u64::from_le_bytes(offset),
            len: u32::from_le_bytes(len),
        };
        Some((slot, end))
    } else {
        let mut at = at;
        let tag = get_varint(bytes, &mut at)?;
        let len = usize::try_from(tag >> 1).ok()?;
        let end = at.checked_add(len)?;
        Some((SlotRef::Inline(bytes.get(at..end)?), end))
    }
}

/// Where the entry after the slot at `at` starts, without decoding the slot.
#[inline]
fn skip_slot(bytes: &[u8], at: usize) -> Option<usize> {
    let first = *bytes.get(at)?;
    let next = if first & 1 == 1 {
        let (offset_bytes, len_bytes) = file_slot_sizes(first);
        at + 1 + offset_bytes + len_bytes
    } else {
        let mut at = at;
        let len = usize::try_from(get_varint(bytes, &mut at)? >> 1).ok()?;
        at.checked_add(len)?
    };
    (next <= bytes.len()).then_some(next)
}

/// One whole encoded entry as read back.
struct RawEntry<'a> {
    shared: usize,
    suffix: &'a [u8],
    slot: SlotRef<'a>,
    /// Where the next entry starts.
    next: usize,
}

fn decode_entry(bytes: &[u8], at: usize) -> Option<RawEntry<'_>> {
    let key = decode_key(bytes, at)?;
    let (slot, next) = decode_slot(bytes, key.slot_at)?;
    Some(RawEntry {
        shared: key.shared,
        suffix: key.suffix,
        slot,
        next,
    })
}

/// How many leading bytes `a` and `b` share (eight at a time: keys share long prefixes).
#[inline]
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let mut done = 0;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let (Ok(x), Ok(y)) = (<[u8; 8]>::try_from(x), <[u8; 8]>::try_from(y)) else {
            break;
        };
        let diff = u64::from_le_bytes(x) ^ u64::from_le_bytes(y);
        if diff != 0 {
            return done + (diff.trailing_zeros() / 8) as usize;
        }
        done += 8;
    }
    let rest_a = a.get(done..).unwrap_or_default();
    let rest_b = b.get(done..).unwrap_or_default();
    done + rest_a
        .iter()
        .zip(rest_b)
        .take_while(|(x, y)| x == y)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Pages.

/// A sorted, front-coded page of the run (never empty).
struct Page {
    /// The first key, whole, for the binary search over pages.
    first: Box<[u8]>,
    /// How many leading bytes every key of the page shares.
    prefix_len: usize,
    /// Per block, 8 bytes of its first key after the shared prefix (big-endian, zero-padded):
    /// a binary search over these finds a key's block without touching the arena.
    heads: Vec<u64>,
    bytes: Vec<u8>,
    /// Where each block's first entry starts in `bytes`.
    block_starts: Vec<usize>,
    /// The position of each block's first entry in the page. Blocks hold at most
    /// `Limits::block_entries` entries but may hold fewer: a merge copies the blocks it does
    /// not change byte for byte, whatever their position.
    block_firsts: Vec<u32>,
    len: usize,
}

impl Page {
    fn empty() -> Page {
        Page {
            first: Box::new([]),
            prefix_len: 0,
            heads: Vec::new(),
            bytes: Vec::new(),
            block_starts: Vec::new(),
            block_firsts: Vec::new(),
            len: 0,
        }
    }

    /// Positions of block `block`'s first entry and of the entry after its last.
    #[inline]
    fn block_span(&self, block: usize) -> (usize, usize) {
        let first = self
            .block_firsts
            .get(block)
            .map_or(self.len, |&f| f as usize);
        let end = self
            .block_firsts
            .get(block + 1)
            .map_or(self.len, |&f| f as usize);
        (first, end)
    }

    /// The block holding the entry at `position`.
    #[inline]
    fn block_of(&self, position: usize) -> usize {
        self.block_firsts
            .partition_point(|&first| first as usize <= position)
            .saturating_sub(1)
    }

    /// Byte range of block `block` in the arena.
    fn block_bytes(&self, block: usize) -> &[u8] {
        let start = self.block_starts.get(block).copied().unwrap_or(0);
        let end = self
            .block_starts
            .get(block + 1)
            .copied()
            .unwrap_or(self.bytes.len());
        self.bytes.get(start..end).unwrap_or_default()
    }

    fn memory_bytes(&self) -> u64 {
        (self.bytes.capacity()
            + self.block_starts.capacity() * size_of::<usize>()
            + self.block_firsts.capacity() * size_of::<u32>()) as u64
            + allocation_bytes(self.first.len())
            + (self.heads.capacity() * size_of::<u64>()) as u64
            + std::mem::size_of::<Page>() as u64
    }

    /// The whole first key of block `block` (a block's first entry shares nothing).
    fn block_first_key(&self, block: usize) -> &[u8] {
        self.block_starts
            .get(block)
            .and_then(|&at| decode_key(&self.bytes, at))
            .map_or(&[], |entry| entry.suffix)
    }

    fn first_key(&self) -> &[u8] {
        &self.first
    }

    /// How many blocks start with a key not above `key`.
    fn blocks_not_above(&self, key: &[u8]) -> usize {
        starts_not_above(
            &self.first,
            self.prefix_len,
            &self.heads,
            &self.block_starts,
            key,
            |&at| decode_key(&self.bytes, at).is_some_and(|e| e.suffix <= key),
        )
    }

    /// The position of the first entry not below `key`, and its slot when its key is `key`.
    fn search(&self, key: &[u8]) -> (usize, Option<SlotRef<'_>>) {
        let after = self.blocks_not_above(key);
        let Some(block) = after.checked_sub(1) else {
            return (0, None);
        };
        let (mut index, block_end) = self.block_span(block);
        let Some(first) = self
            .block_starts
            .get(block)
            .and_then(|&at| decode_key(&self.bytes, at))
        else {
            return (index, None);
        };
        let found = |slot_at: usize| decode_slot(&self.bytes, slot_at).map(|(slot, _)| slot);
        // `matched`: how long a prefix the entry before shares with `key`, which it is below.
        let mut matched = common_prefix(first.suffix, key);
        if matched == first.suffix.len() && matched == key.len() {
            return (index, found(first.slot_at));
        }
        let Some(mut at) = skip_slot(&self.bytes, first.slot_at) else {
            return (index, None);
        };
        index += 1;
        while index < block_end {
            let Some(entry) = decode_key(&self.bytes, at) else {
                break;
            };
            match entry.shared.cmp(&matched) {
                // It agrees with the previous key where that one was below `key`: below too.
                Ordering::Greater => {}
                // It leaves the previous key (equal to `key` there) upwards: above `key`.
                Ordering::Less => return (index, None),
                Ordering::Equal => {
                    let rest = key.get(matched..).unwrap_or_default();
                    let common = common_prefix(entry.suffix, rest);
                    let entry_byte = entry.suffix.get(common);
                    let key_byte = rest.get(common);
                    match (entry_byte, key_byte) {
                        (None, None) => return (index, found(entry.slot_at)),
                        // `key` is a prefix of the entry's key, so it is below that key.
                        (Some(_), None) => return (index, None),
                        (None, Some(_)) => matched += common,
                        (Some(e), Some(k)) if e < k => matched += common,
                        (Some(_), Some(_)) => return (index, None),
                    }
                }
            }
            let Some(next) = skip_slot(&self.bytes, entry.slot_at) else {
                break;
            };
            at = next;
            index += 1;
        }
        (index, None)
    }

    /// Decodes block `block`: its keys end to end into `keys`, and each entry's key end and
    /// slot into `entries`.
    fn decode_block<'a>(
        &'a self,
        block: usize,
        keys: &mut Vec<u8>,
        entries: &mut Vec<(usize, SlotRef<'a>)>,
    ) {
        keys.clear();
        entries.clear();
        let Some(&start) = self.block_starts.get(block) else {
            return;
        };
        let (first, end) = self.block_span(block);
        let count = end.saturating_sub(first);
        // Keys of a block are about as long as its first: one allocation, sized once.
        let first_len = decode_key(&self.bytes, start).map_or(0, |k| k.suffix.len());
        keys.reserve(first_len.saturating_mul(count) + count);
        let mut at = start;
        let mut previous = 0;
        for _ in 0..count {
            let Some(entry) = decode_entry(&self.bytes, at) else {
                return;
            };
            let key_start = keys.len();
            let shared = entry.shared.min(key_start - previous);
            keys.extend_from_within(previous..previous + shared);
            keys.extend_from_slice(entry.suffix);
            previous = key_start;
            entries.push((keys.len(), entry.slot));
            at = entry.next;
        }
    }

    /// Calls `f` with every entry in order.
    fn try_for_each<'a, E>(
        &'a self,
        mut f: impl FnMut(&[u8], SlotRef<'a>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut key = Vec::new();
        let mut at = 0;
        for _ in 0..self.len {
            let Some(entry) = decode_entry(&self.bytes, at) else {
                break;
            };
            key.truncate(entry.shared);
            key.extend_from_slice(entry.suffix);
            f(&key, entry.slot)?;
            at = entry.next;
        }
        Ok(())
    }
}

/// The 8 bytes of `key` after `prefix_len`, big-endian and zero-padded: ordered like the
/// keys themselves where they differ, equal where the rest must be compared.
#[inline]
fn head(key: &[u8], prefix_len: usize) -> u64 {
    let mut bytes = [0u8; 8];
    let rest = key.get(prefix_len..).unwrap_or_default();
    let take = rest.len().min(8);
    bytes[..take].copy_from_slice(&rest[..take]);
    u64::from_be_bytes(bytes)
}

/// How many of a sorted run of starts (blocks in a page, pages in a table) begin with a key
/// not above `key`. `first` is the first start's key, every start's key shares its first
/// `prefix_len` bytes, `heads[i]` holds the 8 bytes of start `i`'s key after that prefix
/// (`head`), and `not_above` tells it of a start whose head ties with `key`'s.
fn starts_not_above<T>(
    first: &[u8],
    prefix_len: usize,
    heads: &[u64],
    starts: &[T],
    key: &[u8],
    not_above: impl Fn(&T) -> bool,
) -> usize {
    let shared = common_prefix(first, key);
    if shared < prefix_len {
        // Every start has a prefix `key` leaves: all are above it or all below.
        return match (key.get(shared), first.get(shared)) {
            (Some(k), Some(f)) if k > f => starts.len(),
            _ => 0,
        };
    }
    let key_head = head(key, prefix_len);
    let below = heads.partition_point(|&h| h < key_head);
    let tied = heads
        .get(below..)
        .unwrap_or_default()
        .partition_point(|&h| h == key_head);
    let tied_not_above = starts
        .get(below..below + tied)
        .unwrap_or_default()
        .partition_point(not_above);
    below + tied_not_above
}

/// Builds pages from entries given in order.
struct PageBuilder {
    limits: Limits,
    /// A page is closed when it holds this many entries (at most `limits.page_entries`).
    close_at: usize,
    /// Expected encoded bytes per entry, to size a new page's arena once.
    bytes_per_entry: usize,
    /// Entries in the open block.
    in_block: usize,
    /// The open block is closed when it holds this many (at most `limits.block_entries`).
    block_close_at: usize,
    page: Page,
    previous: Vec<u8>,
    done: Vec<Page>,
}

impl PageBuilder {
    fn new(limits: Limits) -> PageBuilder {
        PageBuilder {
            limits,
            close_at: limits.page_entries,
            bytes_per_entry: 16,
            in_block: 0,
            block_close_at: limits.block_entries.max(1),
            page: Page::empty(),
            previous: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Whether the next entry starts a block (and so is written whole).
    #[inline]
    fn at_block_start(&self) -> bool {
        self.in_block == 0 || self.in_block >= self.block_close_at
    }

    /// Makes the next entry start a block, holding at most `close_at` entries.
    fn start_block(&mut self, close_at: usize) {
        if self.in_block > 0 {
            self.in_block = usize::MAX;
        }
        self.block_close_at = close_at.clamp(1, self.limits.block_entries.max(1));
    }

    /// Pushes the next key in order, measuring what it shares with the one before.
    fn push(&mut self, key: &[u8], slot: SlotRef<'_>) {
        let shared = if self.at_block_start() {
            0
        } else {
            common_prefix(&self.previous, key)
        };
        self.push_slot(key, shared, slot);
        self.previous.clear();
        self.previous.extend_from_slice(key);
    }

    /// Pushes `key`, which shares `shared` bytes with the key pushed last (0 at a block start).
    fn push_slot(&mut self, key: &[u8], shared: usize, slot: SlotRef<'_>) {
        match slot {
            SlotRef::File { at, len } => {
                // A file slot is a few bytes: encoded on the stack.
                let (encoded, used) = encode_file_slot(at, len);
                self.push_encoded(key, shared, encoded.get(..used).unwrap_or_default());
            }
            SlotRef::Inline(_) => {
                let mut bytes = Vec::new();
                encode_slot(&mut bytes, slot);
                self.push_encoded(key, shared, &bytes);
            }
        }
    }

    fn start_entry(&mut self) {
        let page = &mut self.page;
        if page.len == 0 {
            page.bytes
                .reserve(self.close_at.max(1) * self.bytes_per_entry + 64);
        }
        if self.at_block_start() {
            self.page.block_starts.push(self.page.bytes.len());
            self.page.block_firsts.push(self.page.len as u32);
            self.in_block = 0;
        }
    }

    fn end_entry(&mut self) {
        self.page.len += 1;
        self.in_block += 1;
        if self.page.len >= self.close_at.max(1) {
            self.close_page();
        }
    }

    /// Copies a whole block of another page as it is (its first entry is whole); the next
    /// entry continues it if it is not full.
    fn push_block(&mut self, encoded: &[u8], count: usize) {
        let page = &mut self.page;
        if page.len == 0 {
            page.bytes
                .reserve(self.close_at.max(1) * self.bytes_per_entry + 64);
        }
        page.block_starts.push(page.bytes.len());
        page.block_firsts.push(page.len as u32);
        page.bytes.extend_from_slice(encoded);
        page.len += count;
        self.in_block = count;
        self.block_close_at = self.limits.block_entries.max(1);
        if page.len >= self.close_at.max(1) {
            self.close_page();
        }
    }

    /// Pushes `key` with its slot already encoded; `shared` is what it shares with the key
    /// pushed last (ignored at a block start, where a key is written whole).
    fn push_encoded(&mut self, key: &[u8], shared: usize, encoded_slot: &[u8]) {
        let shared = if self.at_block_start() {
            0
        } else {
            shared.min(key.len())
        };
        self.start_entry();
        let bytes = &mut self.page.bytes;
        put_varint(bytes, shared as u64);
        let suffix = key.get(shared..).unwrap_or_default();
        put_varint(bytes, suffix.len() as u64);
        bytes.extend_from_slice(suffix);
        bytes.extend_from_slice(encoded_slot);
        self.end_entry();
    }

    /// The key pushed last into the open page (decoded again from its block: needed only
    /// when a merge resumes on a page it did not start).
    fn last_key(&self) -> Vec<u8> {
        let mut key = Vec::new();
        let Some(&start) = self.page.block_starts.last() else {
            return key;
        };
        let mut at = start;
        while let Some(raw) = decode_key(&self.page.bytes, at) {
            key.truncate(raw.shared);
            key.extend_from_slice(raw.suffix);
            match skip_slot(&self.page.bytes, raw.slot_at) {
                Some(next) => at = next,
                None => break,
            }
        }
        key
    }

    /// Pushes a run entry's encoding as it is: right when it follows its run predecessor and
    /// does not start a block (the caller checks both).
    #[inline]
    fn push_raw(&mut self, encoded: &[u8]) {
        self.start_entry();
        self.page.bytes.extend_from_slice(encoded);
        self.end_entry();
    }

    fn close_page(&mut self) {
        if self.page.len == 0 {
            return;
        }
        let last = self.last_key();
        let mut page = std::mem::replace(&mut self.page, Page::empty());
        page.first = page.block_first_key(0).into();
        page.prefix_len = common_prefix(&page.first, &last);
        page.heads = (0..page.block_starts.len())
            .map(|block| head(page.block_first_key(block), page.prefix_len))
            .collect();
        page.block_starts.shrink_to_fit();
        page.block_firsts.shrink_to_fit();
        self.in_block = 0;
        // The arena keeps its build-time capacity until `replace_pages` sizes it exactly.
        self.done.push(page);
    }

    fn finish(mut self) -> Vec<Page> {
        self.close_page();
        self.done
    }
}

/// Walks pages and a delta (both in key order) merged: a delta entry replaces the run entry of
/// its key, a removal marker hides it.
fn merged_walk<'a, E>(
    pages: &'a [Page],
    delta: impl Iterator<Item = (&'a [u8], Option<SlotRef<'a>>)>,
    mut f: impl FnMut(&[u8], SlotRef<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut delta = delta.peekable();
    for page in pages {
        page.try_for_each(|key, slot| {
            while let Some(&(delta_key, delta_slot)) = delta.peek() {
                match delta_key.cmp(key) {
                    Ordering::Less => {
                        delta.next();
                        if let Some(delta_slot) = delta_slot {
                            f(delta_key, delta_slot)?;
                        }
                    }
                    Ordering::Equal => {
                        delta.next();
                        return match delta_slot {
                            Some(delta_slot) => f(delta_key, delta_slot),
                            None => Ok(()),
                        };
                    }
                    Ordering::Greater => break,
                }
            }
            f(key, slot)
        })?;
    }
    for (key, slot) in delta {
        if let Some(slot) = slot {
            f(key, slot)?;
        }
    }
    Ok(())
}

/// The entry a merge pushed last, for measuring what the next one shares with it.
enum Last<'a> {
    /// Nothing in the open page: the next entry starts a block.
    Nothing,
    /// The run entry whose key is in the walk's key buffer.
    Run,
    /// A delta entry, or a run entry whose key the buffer no longer holds.
    Other(Cow<'a, [u8]>),
    /// The last entry of a block copied whole: decoded from the builder only if the next
    /// entry continues that block.
    Copied,
}

impl Last<'_> {
    /// Decodes a copied block's last key when the next entry continues that block.
    fn resolve(&mut self, builder: &PageBuilder) {
        if matches!(self, Last::Copied) && !builder.at_block_start() {
            *self = Last::Other(Cow::Owned(builder.last_key()));
        }
    }

    fn shared_with(&self, run_key: &[u8], key: &[u8]) -> usize {
        match self {
            Last::Nothing | Last::Copied => 0,
            Last::Run => common_prefix(run_key, key),
            Last::Other(last) => common_prefix(last, key),
        }
    }
}

impl<'a> Last<'a> {
    /// Pushes a delta entry into `builder` (`run_key`: the walk's key buffer) and becomes it.
    fn push_delta(
        &mut self,
        builder: &mut PageBuilder,
        run_key: &[u8],
        key: &'a [u8],
        slot: SlotRef<'_>,
    ) {
        self.resolve(builder);
        let shared = self.shared_with(run_key, key);
        builder.push_slot(key, shared, slot);
        *self = Last::Other(Cow::Borrowed(key));
    }
}

/// Merges pages and a delta (both in key order) into `builder`, like [`merged_walk`], but
/// cheaply where the delta changes nothing: a block no delta entry falls in is copied byte for
/// byte, and in a block that changes, an entry still following its run predecessor keeps its
/// encoding. A changed block is written in balanced blocks, and a small one takes the next
/// block in, so that blocks stay well filled.
fn merge_into<'a>(
    pages: &'a [Page],
    delta: impl Iterator<Item = (&'a [u8], Option<SlotRef<'a>>)>,
    limits: &Limits,
    builder: &mut PageBuilder,
) {
    let block_entries = limits.block_entries.max(1);
    let mut delta = delta.peekable();
    let mut key: Vec<u8> = Vec::new();
    // A stored shared length is always the whole common prefix (lookups rely on it), so a
    // merge that goes on filling an open block starts from that block's last key.
    let mut last = if builder.at_block_start() {
        Last::Nothing
    } else {
        Last::Other(Cow::Owned(builder.last_key()))
    };
    // The delta entries of one page, each with the position of the first run entry not
    // below it and whether that entry has its key.
    let mut placed: Vec<(usize, &'a [u8], Option<SlotRef<'a>>, bool)> = Vec::new();
    for (page_index, page) in pages.iter().enumerate() {
        if let Some(per_entry) = page.bytes.len().checked_div(page.len) {
            builder.bytes_per_entry = per_entry + 1;
        }
        placed.clear();
        let next_first = pages.get(page_index + 1).map(Page::first_key);
        while let Some(&(delta_key, slot)) = delta.peek() {
            if next_first.is_some_and(|next| delta_key >= next) {
                break;
            }
            delta.next();
            let (position, found) = page.search(delta_key);
            placed.push((position, delta_key, slot, found.is_some()));
        }
        let mut placed_at = 0;
        for block in 0..page.block_firsts.len() {
            let (first, end) = page.block_span(block);
            // Delta entries after the page's last entry go with its last block.
            let last_block = block + 1 == page.block_firsts.len();
            let changes = placed[placed_at..]
                .iter()
                .take_while(|(position, ..)| *position < end || last_block)
                .count();
            let open = if builder.at_block_start() {
                0
            } else {
                builder.in_block
            };
            if changes == 0 && (open == 0 || open >= block_entries / 2) {
                builder.push_block(page.block_bytes(block), end - first);
                last = Last::Copied;
                continue;
            }
            // Written again: after a small open block, as its continuation; else in blocks
            // of balanced sizes.
            let total = end - first + changes + open;
            let pieces = total.div_ceil(block_entries);
            let balanced = total.div_ceil(pieces.max(1));
            if open == 0 || open >= block_entries / 2 {
                builder.start_block(balanced);
            } else {
                builder.block_close_at = balanced.max(open + 1).min(block_entries);
            }
            let mut at = page.block_starts.get(block).copied().unwrap_or(0);
            for index in first..end {
                let mut replaced = false;
                while let Some(&(position, delta_key, slot, found)) = placed.get(placed_at) {
                    if position != index {
                        break;
                    }
                    placed_at += 1;
                    if let Some(slot) = slot {
                        last.push_delta(builder, &key, delta_key, slot);
                    }
                    replaced |= found;
                }
                let Some(raw) = decode_key(&page.bytes, at) else {
                    break;
                };
                let Some(next) = skip_slot(&page.bytes, raw.slot_at) else {
                    break;
                };
                let encoded = page.bytes.get(at..next).unwrap_or_default();
                let encoded_slot = page.bytes.get(raw.slot_at..next).unwrap_or_default();
                at = next;
                if replaced {
                    if let Last::Run = last {
                        // The buffer is about to move on from the key pushed last.
                        last = Last::Other(Cow::Owned(key.clone()));
                    }
                    key.truncate(raw.shared);
                    key.extend_from_slice(raw.suffix);
                    continue;
                }
                let follows = matches!(last, Last::Run) && raw.shared > 0;
                if follows && !builder.at_block_start() {
                    key.truncate(raw.shared);
                    key.extend_from_slice(raw.suffix);
                    builder.push_raw(encoded);
                } else {
                    last.resolve(builder);
                    // The buffer still holds the key pushed last when that was a run entry.
                    let shared_with_run = match last {
                        Last::Run if raw.shared == 0 => Some(common_prefix(&key, raw.suffix)),
                        _ => None,
                    };
                    key.truncate(raw.shared);
                    key.extend_from_slice(raw.suffix);
                    let shared = match shared_with_run {
                        Some(shared) => shared,
                        None if follows => raw.shared,
                        None => last.shared_with(&[], &key),
                    };
                    builder.push_encoded(&key, shared, encoded_slot);
                }
                last = Last::Run;
            }
        }
        // Delta entries after the page's last entry.
        while let Some(&(_, delta_key, slot, _)) = placed.get(placed_at) {
            placed_at += 1;
            if let Some(slot) = slot {
                last.push_delta(builder, &key, delta_key, slot);
            }
        }
    }
    // Delta entries after the last page (or with no pages at all).
    for (delta_key, slot) in delta {
        if let Some(slot) = slot {
            last.push_delta(builder, &key, delta_key, slot);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The index.

/// A table's committed entries: the run plus the delta (see the module docs).
pub(crate) struct Index {
    limits: Limits,
    pages: Vec<Page>,
    /// How many leading bytes the pages' first keys share, and 8 bytes of each page's first
    /// key after them: the binary search over pages reads these, not the keys.
    page_prefix_len: usize,
    page_heads: Vec<u64>,
    /// Entries in the pages, those the delta replaces or hides included.
    run_len: usize,
    /// Recent changes: a value, or `None` to hide the run's entry of that key.
    delta: BTreeMap<Box<[u8]>, Option<Slot>>,
    /// Estimated RAM of the delta.
    delta_memory: u64,
    /// Pages written since the index was made (merges and relocations): a merge's cost.
    pages_written: u64,
    /// Live entries.
    len: u64,
}

impl Default for Index {
    fn default() -> Self {
        Index::new(Limits::STORE)
    }
}

fn delta_entry_memory(key: &[u8], slot: Option<&Slot>) -> u64 {
    NODE_BYTES_PER_ENTRY + allocation_bytes(key.len()) + slot.map_or(0, Slot::value_memory)
}

impl Index {
    pub(crate) fn new(limits: Limits) -> Index {
        Index {
            limits,
            pages: Vec::new(),
            page_prefix_len: 0,
            page_heads: Vec::new(),
            run_len: 0,
            delta: BTreeMap::new(),
            delta_memory: 0,
            pages_written: 0,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Estimated RAM held: the pages' arenas as allocated, and the delta.
    pub(crate) fn memory_bytes(&self) -> u64 {
        let pages: u64 = self.pages.iter().map(Page::memory_bytes).sum();
        pages + (self.page_heads.capacity() * size_of::<u64>()) as u64 + self.delta_memory
    }

    /// How many pages start with a key not above `key`.
    fn pages_not_above(&self, key: &[u8]) -> usize {
        let Some(first_page) = self.pages.first() else {
            return 0;
        };
        starts_not_above(
            first_page.first_key(),
            self.page_prefix_len,
            &self.page_heads,
            &self.pages,
            key,
            |page| page.first_key() <= key,
        )
    }

    /// Recomputes what [`Index::pages_not_above`] reads, after the pages changed.
    fn index_pages(&mut self) {
        self.page_prefix_len = match (self.pages.first(), self.pages.last()) {
            (Some(first), Some(last)) => common_prefix(first.first_key(), last.first_key()),
            _ => 0,
        };
        let prefix_len = self.page_prefix_len;
        self.page_heads = self
            .pages
            .iter()
            .map(|page| head(page.first_key(), prefix_len))
            .collect();
    }

    fn run_get(&self, key: &[u8]) -> Option<SlotRef<'_>> {
        let after = self.pages_not_above(key);
        let page = self.pages.get(after.checked_sub(1)?)?;
        page.search(key).1
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<SlotRef<'_>> {
        match self.delta.get(key) {
            Some(slot) => slot.as_ref().map(Slot::as_ref),
            None => self.run_get(key),
        }
    }

    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    /// The committed value's length, from what the caller knows or from the run (the caller
    /// checked that the delta does not hold the key).
    fn run_value_len(&self, key: &[u8], committed: Committed) -> Option<usize> {
        match committed {
            Committed::Known(len) => {
                debug_assert_eq!(len, self.run_get(key).map(|s| s.value_len()));
                len
            }
            Committed::Unknown => self.run_get(key).map(|slot| slot.value_len()),
        }
    }

    /// Inserts or replaces; returns the replaced value's length.
    pub(crate) fn put(&mut self, key: &[u8], slot: Slot, committed: Committed) -> Option<usize> {
        let added = slot.value_memory();
        let entry_memory = delta_entry_memory(key, Some(&slot));
        // One search of the delta: the key's box is needed anyway when it is new there, the
        // common case.
        // The replaced value's length when the delta held the key.
        let delta_old = match self.delta.entry(key.into()) {
            btree_map::Entry::Occupied(mut entry) => {
                let old = entry.get_mut().replace(slot);
                let removed = old.as_ref().map_or(0, Slot::value_memory);
                self.delta_memory = self.delta_memory + added - removed;
                Some(old.map(|old| old.value_len()))
            }
            btree_map::Entry::Vacant(entry) => {
                entry.insert(Some(slot));
                self.delta_memory += entry_memory;
                None
            }
        };
        let old_len = match delta_old {
            Some(old_len) => old_len,
            None => self.run_value_len(key, committed),
        };
        if old_len.is_none() {
            self.len += 1;
        }
        self.merge_if_due();
        old_len
    }

    /// Removes; returns the removed value's length. A removal marker stays in the delta
    /// (hiding the run's entry, if any) until the next merge.
    pub(crate) fn remove(&mut self, key: &[u8], committed: Committed) -> Option<usize> {
        // One search of the delta (the key's box is needed anyway when the removed entry is
        // in the run, the common case).
        let in_run = match committed {
            Committed::Known(len) => {
                debug_assert!(
                    self.delta.contains_key(key)
                        || len == self.run_get(key).map(|slot| slot.value_len())
                );
                len
            }
            Committed::Unknown if self.delta.contains_key(key) => None,
            Committed::Unknown => self.run_get(key).map(|slot| slot.value_len()),
        };
        let old_len = match self.delta.entry(key.into()) {
            btree_map::Entry::Occupied(mut entry) => {
                let old = entry.get_mut().take()?;
                self.delta_memory -= old.value_memory();
                old.value_len()
            }
            btree_map::Entry::Vacant(entry) => {
                let old_len = in_run?;
                entry.insert(None);
                self.delta_memory += delta_entry_memory(key, None);
                old_len
            }
        };
        self.len -= 1;
        self.merge_if_due();
        Some(old_len)
    }

    fn merge_if_due(&mut self) {
        if self.delta.len() > self.limits.delta_entries(self.run_len) {
            self.merge();
        }
    }

    /// Merges the delta into the run, rewriting only the pages it falls in (a page too small
    /// afterwards takes its followers in, so removals do not leave a trail of tiny pages).
    pub(crate) fn merge(&mut self) {
        if self.delta.is_empty() {
            return;
        }
        let limits = self.limits;
        let mut index = 0;
        loop {
            // Pages `index..end` are rewritten with the delta entries below `pages[end]`.
            let lower = if index == 0 {
                Bound::Unbounded
            } else {
                match self.pages.get(index) {
                    Some(page) => Bound::Included(page.first_key().to_vec()),
                    None => break,
                }
            };
            let upper_of = |pages: &[Page], end: usize| match pages.get(end) {
                Some(page) => Bound::Excluded(page.first_key().to_vec()),
                None => Bound::Unbounded,
            };
            let mut end = (index + 1).min(self.pages.len());
            let touched = self
                .delta
                .range::<[u8], _>((
                    as_ref_bound(&lower),
                    as_ref_bound(&upper_of(&self.pages, end)),
                ))
                .next()
                .is_some();
            if !touched {
                if end >= self.pages.len() {
                    break;
                }
                index = end;
                continue;
            }
            // Walk the stretch into the builder; while what it holds past its last full page
            // is small, take the next page in too (balancing the two), so that removals do
            // not leave a trail of tiny pages.
            let mut builder = PageBuilder::new(limits);
            let mut start = index;
            let mut lower = lower;
            loop {
                let upper = upper_of(&self.pages, end);
                let delta = self
                    .delta
                    .range::<[u8], _>((as_ref_bound(&lower), as_ref_bound(&upper)))
                    .map(|(key, slot)| (&**key, slot.as_ref().map(Slot::as_ref)));
                merge_into(&self.pages[start..end], delta, &limits, &mut builder);
                let pending = builder.page.len;
                let Some(next) = self.pages.get(end) else {
                    break;
                };
                if pending == 0 || pending >= limits.page_entries / 2 {
                    break;
                }
                builder.close_at = if pending + next.len <= limits.page_entries {
                    limits.page_entries
                } else {
                    (pending + next.len).div_ceil(2)
                };
                lower = Bound::Included(next.first_key().to_vec());
                start = end;
                end += 1;
            }
            let written = self.replace_pages(index..end, builder.finish());
            index += written;
            if index >= self.pages.len() {
                break;
            }
        }
        self.delta = BTreeMap::new();
        self.delta_memory = 0;
        self.index_pages();
        self.run_len = self.pages.iter().map(|p| p.len).sum();
        debug_assert_eq!(self.run_len as u64, self.len);
    }

    /// Puts `new` in the place of the pages in `old`; returns how many came in. Only one
    /// stretch is ever held twice. The old pages are freed before the new arenas get their
    /// exact-size copies, so those can take the old ones' place in the heap: rebuilding pages
    /// over and over then does not scatter them (measured: RSS over the live bytes fell from
    /// ~25 to ~10 bytes an entry).
    fn replace_pages(&mut self, old: std::ops::Range<usize>, new: Vec<Page>) -> usize {
        let at = old.start;
        drop(self.pages.drain(old));
        let written = new.len();
        self.pages_written += written as u64;
        let exact = new.into_iter().map(|mut page| {
            page.bytes = page.bytes.as_slice().to_vec();
            page
        });
        self.pages.splice(at..at, exact);
        written
    }

    /// Calls `f` with every live entry in key order.
    pub(crate) fn try_for_each<E>(
        &self,
        f: impl FnMut(&[u8], SlotRef<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let delta = self
            .delta
            .iter()
            .map(|(key, slot)| (&**key, slot.as_ref().map(Slot::as_ref)));
        merged_walk(&self.pages, delta, f)
    }

    /// Gives every value kept in the file a new location, in key order (after a compaction
    /// rewrote them in that order); a value with no new location keeps its old one.
    pub(crate) fn relocate(&mut self, locations: &mut impl Iterator<Item = u64>) {
        self.merge();
        let limits = self.limits;
        let mut index = 0;
        while index < self.pages.len() {
            let mut builder = PageBuilder::new(limits);
            let built: Result<(), std::convert::Infallible> =
                self.pages[index].try_for_each(|key, slot| {
                    let slot = match slot {
                        SlotRef::File { at, len } => SlotRef::File {
                            at: locations.next().unwrap_or(at),
                            len,
                        },
                        inline => inline,
                    };
                    builder.push(key, slot);
                    Ok(())
                });
            let Ok(()) = built;
            let written = self.replace_pages(index..index + 1, builder.finish());
            index += written.max(1);
        }
        self.index_pages();
    }

    /// The entries in `range` (which must satisfy [`crate::state::range_is_valid`]), keys lent
    /// through `arena`.
    pub(crate) fn range<'r>(
        &'r self,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        arena: &'r KeyArena,
    ) -> IndexRange<'r> {
        let front = match range.0 {
            Bound::Unbounded => (0, 0),
            Bound::Included(key) => self.position(key, false),
            Bound::Excluded(key) => self.position(key, true),
        };
        let back = match range.1 {
            Bound::Unbounded => (self.pages.len(), 0),
            Bound::Included(key) => self.position(key, true),
            Bound::Excluded(key) => self.position(key, false),
        };
        IndexRange {
            delta: Sided::new(self.delta.range::<[u8], _>(range)),
            run: Sided::new(RunRange {
                pages: &self.pages,
                arena,
                arena_tail: None,
                front,
                back,
                front_block: DecodedBlock::default(),
                back_block: DecodedBlock::default(),
            }),
        }
    }

    /// The run position (page, entry) of the first entry above `key` (`after`) or not below.
    fn position(&self, key: &[u8], after: bool) -> (usize, usize) {
        let page_after = self.pages_not_above(key);
        let Some(page_index) = page_after.checked_sub(1) else {
            return (0, 0);
        };
        let Some(page) = self.pages.get(page_index) else {
            return (0, 0);
        };
        let (entry, found) = page.search(key);
        let entry = if after && found.is_some() {
            entry + 1
        } else {
            entry
        };
        normalize(&self.pages, (page_index, entry))
    }
}

fn as_ref_bound(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// Moves a position past the end of its page to the start of the next (pages are never
/// empty, so every position but the end then names an entry).
fn normalize(pages: &[Page], (mut page, mut entry): (usize, usize)) -> (usize, usize) {
    while let Some(p) = pages.get(page) {
        if entry < p.len {
            break;
        }
        page += 1;
        entry = 0;
    }
    if page >= pages.len() {
        (pages.len(), 0)
    } else {
        (page, entry)
    }
}

// ---------------------------------------------------------------------------------------------
// Iteration.

/// Decoded blocks kept for the life of a read view, so iterators can lend keys for as long.
/// An append-only chain of nodes, each set once (no lock, no `unsafe`); dropped iteratively.
#[derive(Default)]
pub(crate) struct KeyArena {
    head: OnceLock<Box<ArenaNode>>,
}

struct ArenaNode {
    bytes: Box<[u8]>,
    next: OnceLock<Box<ArenaNode>>,
}

impl KeyArena {
    /// Keeps `bytes` for the arena's life. `tail` is the caller's last node, where the search
    /// for the chain's end starts (so a long scan does not walk the chain again each time).
    fn keep<'a>(&'a self, tail: &mut Option<&'a ArenaNode>, bytes: Vec<u8>) -> &'a [u8] {
        let mut pending = Some(bytes.into_boxed_slice());
        let mut slot = match tail {
            Some(node) => &node.next,
            None => &self.head,
        };
        loop {
            let node = slot.get_or_init(|| {
                Box::new(ArenaNode {
                    bytes: pending.take().unwrap_or_default(),
                    next: OnceLock::new(),
                })
            });
            if pending.is_none() {
                *tail = Some(node);
                return &node.bytes;
            }
            slot = &node.next;
        }
    }
}

impl Drop for KeyArena {
    fn drop(&mut self) {
        // Unlinked one by one: a recursive drop of a long chain could overflow the stack.
        let mut next = self.head.take();
        while let Some(mut node) = next {
            next = node.next.take();
        }
    }
}

/// One block decoded for an iterator: its keys (kept in the arena) and slots.
#[derive(Default)]
struct DecodedBlock<'r> {
    /// The page and the positions of the first entry and one past the last of the block
    /// decoded, if any.
    at: Option<(usize, usize, usize)>,
    keys: &'r [u8],
    entries: Vec<(usize, SlotRef<'r>)>,
}

impl<'r> DecodedBlock<'r> {
    fn entry(&self, index: usize) -> Option<(&'r [u8], SlotRef<'r>)> {
        let (end, slot) = *self.entries.get(index)?;
        let start = match index.checked_sub(1) {
            Some(before) => self.entries.get(before)?.0,
            None => 0,
        };
        let keys: &'r [u8] = self.keys;
        Some((keys.get(start..end)?, slot))
    }
}

/// The run's entries between two positions, either direction.
pub(crate) struct RunRange<'r> {
    pages: &'r [Page],
    arena: &'r KeyArena,
    arena_tail: Option<&'r ArenaNode>,
    /// The next entry from the front.
    front: (usize, usize),
    /// One past the next entry from the back.
    back: (usize, usize),
    front_block: DecodedBlock<'r>,
    back_block: DecodedBlock<'r>,
}

impl<'r> RunRange<'r> {
    fn entry(
        &mut self,
        (page, entry): (usize, usize),
        from_back: bool,
    ) -> Option<(&'r [u8], SlotRef<'r>)> {
        let pages: &'r [Page] = self.pages;
        let page_ref = pages.get(page)?;
        let decoded = if from_back {
            &mut self.back_block
        } else {
            &mut self.front_block
        };
        let covered = decoded
            .at
            .is_some_and(|(p, first, end)| p == page && first <= entry && entry < end);
        if !covered {
            let block = page_ref.block_of(entry);
            let (first, end) = page_ref.block_span(block);
            let mut keys = Vec::new();
            page_ref.decode_block(block, &mut keys, &mut decoded.entries);
            decoded.keys = self.arena.keep(&mut self.arena_tail, keys);
            decoded.at = Some((page, first, end));
        }
        let first = decoded.at.map_or(0, |(_, first, _)| first);
        decoded.entry(entry - first)
    }
}

impl<'r> Iterator for RunRange<'r> {
    type Item = (&'r [u8], SlotRef<'r>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        let at = self.front;
        self.front = normalize(self.pages, (at.0, at.1 + 1));
        self.entry(at, false)
    }
}

impl DoubleEndedIterator for RunRange<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        if self.front >= self.back {
            return None;
        }
        let (page, entry) = self.back;
        let at = match entry.checked_sub(1) {
            Some(entry) => (page, entry),
            None => {
                let page = page.checked_sub(1)?;
                (page, self.pages.get(page)?.len.checked_sub(1)?)
            }
        };
        self.back = at;
        self.entry(at, true)
    }
}

/// A double-ended iterator with one item looked ahead at each end.
struct Sided<I: DoubleEndedIterator> {
    iter: I,
    front: Option<I::Item>,
    back: Option<I::Item>,
}

impl<I: DoubleEndedIterator> Sided<I> {
    fn new(iter: I) -> Sided<I> {
        Sided {
            iter,
            front: None,
            back: None,
        }
    }

    fn peek_front(&mut self) -> Option<&I::Item> {
        if self.front.is_none() {
            // Once the middle is used up, the other end's look-ahead is the last item.
            self.front = self.iter.next().or_else(|| self.back.take());
        }
        self.front.as_ref()
    }

    fn peek_back(&mut self) -> Option<&I::Item> {
        if self.back.is_none() {
            self.back = self.iter.next_back().or_else(|| self.front.take());
        }
        self.back.as_ref()
    }
}

/// The live entries of an index in a key range: delta and run merged, either direction.
pub(crate) struct IndexRange<'r> {
    delta: Sided<btree_map::Range<'r, Box<[u8]>, Option<Slot>>>,
    run: Sided<RunRange<'r>>,
}

impl<'r> IndexRange<'r> {
    /// The next entry from one end: the delta's when its key comes first or is the same
    /// (a removal marker yields nothing and hides the run's entry).
    fn step(&mut self, from_back: bool) -> Option<(&'r [u8], SlotRef<'r>)> {
        loop {
            let (delta_key, run_key) = if from_back {
                (
                    self.delta.peek_back().map(|&(k, _)| &**k),
                    self.run.peek_back().map(|&(k, _)| k),
                )
            } else {
                (
                    self.delta.peek_front().map(|&(k, _)| &**k),
                    self.run.peek_front().map(|&(k, _)| k),
                )
            };
            let take_delta = match (delta_key, run_key) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(d), Some(r)) => {
                    let order = d.cmp(r);
                    if order == Ordering::Equal {
                        // The delta replaces or hides this run entry.
                        if from_back {
                            self.run.back = None;
                        } else {
                            self.run.front = None;
                        }
                        true
                    } else {
                        (order == Ordering::Less) != from_back
                    }
                }
            };
            if take_delta {
                let taken = if from_back {
                    self.delta.back.take()
                } else {
                    self.delta.front.take()
                };
                match taken {
                    Some((key, Some(slot))) => return Some((&**key, slot.as_ref())),
                    Some((_, None)) => continue,
                    None => return None,
                }
            }
            return if from_back {
                self.run.back.take()
            } else {
                self.run.front.take()
            };
        }
    }
}

impl<'r> Iterator for IndexRange<'r> {
    type Item = (&'r [u8], SlotRef<'r>);
    fn next(&mut self) -> Option<Self::Item> {
        self.step(false)
    }
}

impl DoubleEndedIterator for IndexRange<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.step(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TINY: Limits = Limits {
        block_entries: 4,
        page_entries: 9,
        delta_min_entries: 4,
        delta_run_divisor: 4,
    };

    fn collect(
        index: &Index,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        reverse: bool,
    ) -> Vec<(Vec<u8>, Slot)> {
        let arena = KeyArena::default();
        let iter = index.range(range, &arena);
        let owned = |(key, slot): (&[u8], SlotRef<'_>)| (key.to_vec(), to_owned(slot));
        if reverse {
            iter.rev().map(owned).collect()
        } else {
            iter.map(owned).collect()
        }
    }

    fn to_owned(slot: SlotRef<'_>) -> Slot {
        match slot {
            SlotRef::Inline(value) => Slot::Inline(value.into()),
            SlotRef::File { at, len } => Slot::File { at, len },
        }
    }

    #[test]
    fn entries_round_trip_through_the_encoding() {
        let mut bytes = Vec::new();
        let file = SlotRef::File {
            at: u64::MAX,
            len: u32::MAX,
        };
        for at in [0, 1, 255, 256, 1 << 40, u64::MAX] {
            let mut one = Vec::new();
            let slot = SlotRef::File { at, len: 7 };
            encode_entry(&mut one, 0, b"", slot);
            assert_eq!(decode_slot(&one, 2), Some((slot, one.len())));
            assert_eq!(encode_file_slot(at, 7).1 + 2, one.len());
            assert_eq!(skip_slot(&one, 2), Some(one.len()));
        }
        encode_entry(&mut bytes, 3, b"suffix", SlotRef::Inline(b"value"));
        encode_entry(&mut bytes, 300, b"", file);
        encode_entry(&mut bytes, 0, b"k", SlotRef::Inline(b""));
        let first = decode_entry(&bytes, 0).unwrap();
        assert_eq!((first.shared, first.suffix), (3, &b"suffix"[..]));
        assert_eq!(first.slot, SlotRef::Inline(b"value"));
        let second = decode_entry(&bytes, first.next).unwrap();
        assert_eq!(
            (second.shared, second.suffix, second.slot),
            (300, &b""[..], file)
        );
        let third = decode_entry(&bytes, second.next).unwrap();
        assert_eq!(third.slot, SlotRef::Inline(b""));
        assert_eq!(third.next, bytes.len());
        // Cut short anywhere, an entry is refused, not misread.
        for cut in 0..bytes.len() - 1 {
            let _ = decode_entry(&bytes[..cut], 0);
        }
        assert!(decode_entry(&bytes[..first.next - 1], 0).is_none());
    }

    #[test]
    fn a_page_finds_every_key_and_the_gaps_between_at_block_boundaries() {
        let keys: Vec<Vec<u8>> = (0..20u32)
            .map(|i| format!("key{:03}", i * 2).into_bytes())
            .collect();
        let mut builder = PageBuilder::new(Limits {
            block_entries: 3,
            page_entries: 100,
            ..TINY
        });
        for (i, key) in keys.iter().enumerate() {
            builder.push(
                key,
                SlotRef::File {
                    at: i as u64,
                    len: 1,
                },
            );
        }
        let pages = builder.finish();
        assert_eq!(pages.len(), 1);
        let page = &pages[0];
        assert_eq!(page.block_starts.len(), 7);
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(
                page.search(key),
                (
                    i,
                    Some(SlotRef::File {
                        at: i as u64,
                        len: 1
                    })
                )
            );
            let between = format!("key{:03}", i * 2 + 1).into_bytes();
            assert_eq!(page.search(&between), (i + 1, None));
            // A prefix of a key sorts before it.
            assert_eq!(page.search(&key[..key.len() - 1]).0, i.min(i / 5 * 5));
        }
        assert_eq!(page.search(b"a"), (0, None));
        assert_eq!(page.search(b"z"), (20, None));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(Vec<u8>, Vec<u8>),
        Remove(Vec<u8>),
        Merge,
        Relocate,
    }

    fn small_key() -> impl Strategy<Value = Vec<u8>> {
        // Few distinct bytes: keys share prefixes, repeat, and are prefixes of each other.
        prop::collection::vec(prop::sample::select(vec![b'a', b'b', 0u8, 0xff]), 0..6)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (small_key(), prop::collection::vec(any::<u8>(), 0..4)).prop_map(|(k, v)| Op::Put(k, v)),
            3 => small_key().prop_map(Op::Remove),
            1 => Just(Op::Merge),
            1 => Just(Op::Relocate),
        ]
    }

    fn bound() -> impl Strategy<Value = Bound<Vec<u8>>> {
        prop_oneof![
            Just(Bound::Unbounded),
            small_key().prop_map(Bound::Included),
            small_key().prop_map(Bound::Excluded),
        ]
    }

    /// The slot a model value stands for: values of odd length go to "the file".
    fn slot_of(value: &[u8], at: u64) -> Slot {
        if value.len() % 2 == 1 {
            Slot::File {
                at,
                len: value.len() as u32,
            }
        } else {
            Slot::Inline(value.into())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The index against a `BTreeMap`: lookups, lengths, replaced lengths, and ranges in both
        /// directions (also from both ends at once) after any mix of puts, removes, merges and
        /// relocations.
        #[test]
        fn the_index_behaves_like_a_btreemap(
            ops in prop::collection::vec(op(), 0..120),
            ranges in prop::collection::vec((bound(), bound(), any::<bool>(), any::<u8>()), 1..6),
        ) {
            let mut index = Index::new(TINY);
            let mut model: BTreeMap<Vec<u8>, Slot> = BTreeMap::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Put(key, value) => {
                        let slot = slot_of(&value, n as u64);
                        let old = index.put(&key, slot.clone(), Committed::Unknown);
                        prop_assert_eq!(old, model.insert(key, slot).map(|s| s.value_len()));
                    }
                    Op::Remove(key) => {
                        prop_assert_eq!(index.remove(&key, Committed::Unknown), model.remove(&key).map(|s| s.value_len()));
                    }
                    Op::Merge => index.merge(),
                    Op::Relocate => {
                        let mut next = 1000 + n as u64 * 1000;
                        let mut locations = std::iter::from_fn(|| { next += 1; Some(next) });
                        index.relocate(&mut locations);
                        let mut next = 1000 + n as u64 * 1000;
                        for slot in model.values_mut() {
                            if let Slot::File { at, .. } = slot {
                                next += 1;
                                *at = next;
                            }
                        }
                    }
                }
                prop_assert_eq!(index.len(), model.len() as u64);
            }
            for key in model.keys() {
                prop_assert_eq!(index.get(key).map(to_owned), model.get(key).cloned());
            }
            // Blocks stay at least half full but for the last of a page.
            for page in &index.pages {
                let blocks = page.block_firsts.len();
                for block in 0..blocks.saturating_sub(1) {
                    let (first, end) = page.block_span(block);
                    prop_assert!(end - first >= TINY.block_entries / 2, "{:?}", page.block_firsts);
                    prop_assert!(end - first <= TINY.block_entries, "{:?}", page.block_firsts);
                }
            }
            for key in [&b""[..], b"a", b"b\0", b"\xff\xff\xff\xff\xff\xff"] {
                prop_assert_eq!(index.get(key).map(to_owned), model.get(key).cloned());
            }
            let mut walked = Vec::new();
            let walk: Result<(), ()> = index.try_for_each(|k, s| { walked.push((k.to_vec(), to_owned(s))); Ok(()) });
            prop_assert!(walk.is_ok());
            let all: Vec<(Vec<u8>, Slot)> = model.iter().map(|(k, s)| (k.clone(), s.clone())).collect();
            prop_assert_eq!(&walked, &all);
            for (lower, upper, reverse, split) in ranges {
                let range = (as_ref_bound(&lower), as_ref_bound(&upper));
                if !crate::state::range_is_valid(range) {
                    continue;
                }
                let mut expected: Vec<(Vec<u8>, Slot)> = model
                    .range::<[u8], _>(range)
                    .map(|(k, s)| (k.clone(), s.clone()))
                    .collect();
                if reverse {
                    expected.reverse();
                }
                prop_assert_eq!(collect(&index, range, reverse), expected.clone());
                // From both ends at once: `split` from the front, the rest from the back.
                if reverse {
                    expected.reverse();
                }
                let arena = KeyArena::default();
                let mut iter = index.range(range, &arena);
                let split = usize::from(split) % (expected.len() + 1);
                let mut front: Vec<(Vec<u8>, Slot)> = iter.by_ref().take(split).map(|(k, s)| (k.to_vec(), to_owned(s))).collect();
                let mut back: Vec<(Vec<u8>, Slot)> = iter.rev().map(|(k, s)| (k.to_vec(), to_owned(s))).collect();
                back.reverse();
                front.extend(back);
                prop_assert_eq!(front, expected.clone());
                // And `split` from the back first, the rest from the front.
                let mut iter = index.range(range, &arena);
                let mut back: Vec<(Vec<u8>, Slot)> = iter.by_ref().rev().take(split).map(|(k, s)| (k.to_vec(), to_owned(s))).collect();
                back.reverse();
                let mut front: Vec<(Vec<u8>, Slot)> = iter.map(|(k, s)| (k.to_vec(), to_owned(s))).collect();
                front.extend(back);
                prop_assert_eq!(front, expected);
            }
        }
    }

    #[test]
    fn a_merge_rewrites_only_the_pages_the_delta_falls_in() {
        let limits = Limits {
            block_entries: 4,
            page_entries: 8,
            delta_min_entries: 1000,
            delta_run_divisor: 1,
        };
        let mut index = Index::new(limits);
        for i in 0..64u32 {
            index.put(
                format!("k{i:04}").as_bytes(),
                Slot::File {
                    at: u64::from(i),
                    len: 9,
                },
                Committed::Unknown,
            );
        }
        index.merge();
        assert_eq!(index.pages.len(), 8);
        let before: Vec<*const u8> = index.pages.iter().map(|p| p.bytes.as_ptr()).collect();
        let written = index.pages_written;
        index.put(b"k9999", Slot::Inline(Box::new([])), Committed::Unknown);
        index.merge();
        let after: Vec<*const u8> = index.pages.iter().map(|p| p.bytes.as_ptr()).collect();
        // The first seven pages are the same allocations; only the last was rewritten (as two).
        assert_eq!(before[..7], after[..7]);
        assert_eq!(index.pages_written - written, 2);
        // Removing most of a page's keys makes it take its follower in.
        for i in 8..15u32 {
            index.remove(format!("k{i:04}").as_bytes(), Committed::Unknown);
        }
        index.merge();
        assert_eq!(index.len(), 58);
        let (last, others) = index.pages.split_last().unwrap();
        assert!(last.len > 0);
        let lens: Vec<usize> = others.iter().map(|p| p.len).collect();
        assert!(lens.iter().all(|&len| len >= 4), "{lens:?}");
        assert_eq!(lens[1..3], [5, 4]);
    }

    /// A merge that fills a page, closes it and goes on into the next page's entries must
    /// still store whole common prefixes (a lookup's scan relies on them): found by the
    /// property test as `b` then `b\xff` stored with nothing shared.
    #[test]
    fn a_merge_that_resumes_an_open_page_keeps_prefixes_whole() {
        let mut index = Index::new(TINY);
        let keys: [&[u8]; 15] = [
            b"b", b"b\xff", b"", b"a", b"\0", b"aa", b"", b"ab", b"aaa", b"a", b"b", b"\0", b"aa",
            b"a\0", b"aab",
        ];
        for (n, key) in keys.iter().enumerate() {
            index.put(key, Slot::Inline(Box::new([])), Committed::Unknown);
            if n == 8 {
                index.merge();
            }
            for seen in &keys[..=n] {
                assert!(
                    index.get(seen).is_some(),
                    "{seen:?} lost after putting {key:?}"
                );
            }
        }
    }

    #[test]
    fn memory_follows_the_delta_and_the_pages() {
        let mut index = Index::new(TINY);
        assert_eq!(index.memory_bytes(), 0);
        index.put(
            b"a",
            Slot::Inline(b"12345".to_vec().into()),
            Committed::Unknown,
        );
        let one = index.memory_bytes();
        assert_eq!(one, NODE_BYTES_PER_ENTRY + 16 + 16);
        index.put(b"a", Slot::Inline(b"1".to_vec().into()), Committed::Unknown);
        assert_eq!(index.memory_bytes(), one);
        index.merge();
        // One small page: its fields and a few bytes of arena.
        let page = index.memory_bytes();
        assert!(page > size_of::<Page>() as u64 && page < size_of::<Page>() as u64 + 128);
        index.remove(b"a", Committed::Unknown);
        index.merge();
        assert_eq!(index.memory_bytes(), 0);
    }

    #[test]
    fn a_long_arena_drops_without_recursion() {
        let arena = KeyArena::default();
        let mut tail = None;
        for i in 0..200_000u32 {
            let kept = arena.keep(&mut tail, i.to_le_bytes().to_vec());
            assert_eq!(kept, i.to_le_bytes());
        }
        drop(arena);
    }
}
