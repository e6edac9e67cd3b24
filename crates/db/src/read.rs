//! Reads: point gets and `find` queries over the primary key, a secondary index or a model scan.
//!
//! A query becomes one key range (sort-key conditions are range bounds, never filters), walked
//! forward or backward; filters and TTL apply to the items the range yields. The `next` token is
//! the last raw key returned, so a following page starts strictly after it: pages stay stable while
//! items are added or removed elsewhere in the range.

use std::ops::Bound;
use std::sync::Arc;

use devtables_logstore::{LogRead, LogTable};
use devtables_schema::{Index, Item, ItemKey, Model, SortCondition};
use serde::de::DeserializeOwned;

use crate::codec_de::{self, DeError};
use crate::tables;
use crate::view::ItemView;
use crate::{codec, keys, DbError, Inner};

/// Options of [`crate::Db::find`].
#[derive(Clone, Debug, Default)]
pub struct FindOptions {
    /// Query a secondary index by name instead of the primary key.
    pub index: Option<String>,
    /// Return at most this many items (after filters).
    pub limit: Option<usize>,
    /// The `next` token of the previous page.
    pub next: Option<String>,
    /// Walk the range in descending key order.
    pub reverse: bool,
    /// Include hidden fields (keys, index attributes).
    pub hidden: bool,
}

/// One page of a find.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub items: Vec<Item>,
    /// Pass back as [`FindOptions::next`] for the following page; `None` at the end.
    pub next: Option<String>,
}

/// One page of a typed find ([`ReadTxn::find_as`]): the items as the caller's type.
#[derive(Clone, Debug, PartialEq)]
pub struct TypedPage<T> {
    pub items: Vec<T>,
    /// Pass back as [`FindOptions::next`] for the following page; `None` at the end.
    pub next: Option<String>,
}

/// Turns a live stored item (its bytes, its item key) into what a read returns: the JSON form
/// or the caller's type.
type Decode<'f, O> = dyn Fn(&[u8], &[u8]) -> Result<O, DbError> + 'f;

/// The JSON form of a stored item of `model`, hidden fields only with `hidden`.
fn json_form(model: &Model, hidden: bool) -> impl Fn(&[u8], &[u8]) -> Result<Item, DbError> + '_ {
    move |bytes, raw| {
        if hidden {
            codec::decode(bytes, raw)
        } else {
            codec::decode_with(bytes, raw, &|k| !model.is_hidden(k))
        }
    }
}

/// A stored item of `model` deserialized into `T`, hidden fields only with `hidden`.
fn typed_form<T: DeserializeOwned>(
    model: &Model,
    hidden: bool,
) -> impl Fn(&[u8], &[u8]) -> Result<T, DbError> + '_ {
    move |bytes, raw| {
        let keep = |k: &str| hidden || !model.is_hidden(k);
        codec_de::from_stored(bytes, raw, &keep).map_err(|e| match e {
            DeError::Corrupt(_) => DbError::Corrupt(e.to_string()),
            DeError::Shape(why) => {
                let key = keys::decode_item_key(raw)
                    .map(|k| crate::txn::display_key(&k))
                    .unwrap_or_default();
                DbError::Json(serde::de::Error::custom(format!(
                    "{} item {} does not fit the requested type: {why}",
                    model.name(),
                    crate::error::cut(&key)
                )))
            }
        })
    }
}

/// The item stored as `raw` under the item key `raw_key`.
pub(crate) fn decode_item(raw: &[u8], raw_key: &[u8]) -> Result<Item, DbError> {
    codec::decode(raw, raw_key)
}

pub(crate) fn expired(model: &Model, item: &Item, now_ms: i64) -> bool {
    matches!(model.expires_at_ms(item), Some(at) if at <= now_ms)
}

/// Conditions a stored item must meet, checked on the named fields alone (decoded without the
/// rest of the item).
struct Probe<'a> {
    active: bool,
    fields: Vec<&'a str>,
    check: Box<dyn Fn(&Item) -> bool + 'a>,
}

impl Default for Probe<'_> {
    fn default() -> Self {
        Probe {
            active: false,
            fields: Vec::new(),
            check: Box::new(|_| true),
        }
    }
}

/// Reads of the last committed state, for several calls (cheaper than a handle per read).
///
/// Not a snapshot: each call locks the store for its own length and sees what the last commit
/// left, so a write committed between two calls is seen by the second (a find reads its index
/// entries and their items in one view). Holding one never blocks a writer.
pub struct ReadTxn {
    pub(crate) inner: Arc<Inner>,
    /// The time expiry is judged at, read once when the handle was made.
    pub(crate) now_ms: i64,
}

impl ReadTxn {
    fn model(&self, name: &str) -> Result<&Model, DbError> {
        self.inner
            .schema
            .model(name)
            .ok_or_else(|| DbError::UnknownModel(name.to_string()))
    }

    /// The items table of `model`, if the store has one.
    fn items_of_model<'r>(
        &self,
        read: &'r LogRead<'_>,
        model: &Model,
    ) -> Result<Option<LogTable<'r>>, DbError> {
        let slot = self.inner.slot(model.name())?;
        Ok(read.table(&self.inner.item_tables[slot]))
    }

    /// The live stored item of `model` at item key `raw` if it passes `probe` (checked on the
    /// fields `probe` names before the item is decoded), turned into the result by `decode`.
    fn load_raw<O>(
        &self,
        read: &LogRead<'_>,
        model: &Model,
        raw: &[u8],
        probe: &Probe<'_>,
        decode: &Decode<'_, O>,
    ) -> Result<Option<O>, DbError> {
        let Some(table) = self.items_of_model(read, model)? else {
            return Ok(None);
        };
        let Some(value) = table.get(raw)? else {
            return Ok(None);
        };
        self.load_found(model, raw, &value, probe, decode)
    }

    /// [`ReadTxn::load_raw`] of an item already read (`bytes`, from `model`'s table).
    fn load_found<O>(
        &self,
        model: &Model,
        raw: &[u8],
        bytes: &[u8],
        probe: &Probe<'_>,
        decode: &Decode<'_, O>,
    ) -> Result<Option<O>, DbError> {
        if model.ttl_field().is_some() || probe.active {
            let ttl = model.ttl_field();
            let fields =
                codec::decode_with(bytes, raw, &|k| ttl == Some(k) || probe.fields.contains(&k))?;
            if expired(model, &fields, self.now_ms) || !(probe.check)(&fields) {
                return Ok(None);
            }
        }
        decode(bytes, raw).map(Some)
    }

    /// Reads one item by its key properties (without hidden fields unless `hidden`).
    pub fn get(&self, model: &str, props: &Item, hidden: bool) -> Result<Option<Item>, DbError> {
        self.get_decoded(model, props, |m| json_form(m, hidden))
    }

    /// [`ReadTxn::get`] into the caller's type, deserialized straight from the stored bytes: no
    /// `serde_json::Map` is built, fields `T` does not name are skipped unread. `T` sees the
    /// item's JSON form (dates as ISO text, numbers as stored); an item that does not fit `T`
    /// is [`DbError::Json`] naming the model and key.
    pub fn get_as<T: DeserializeOwned>(
        &self,
        model: &str,
        props: &Item,
        hidden: bool,
    ) -> Result<Option<T>, DbError> {
        self.get_decoded(model, props, |m| typed_form(m, hidden))
    }

    /// [`ReadTxn::get`] as an [`ItemView`]: the stored record copied once with its key (the
    /// get's one allocation: the key is rendered on the stack), its fields decoded as they are
    /// read, strings lent. The view
    /// shows what [`ReadTxn::get`] would return ([`ItemView::to_item`] equals it), hidden
    /// fields only with `hidden`; a damaged record is [`DbError::Damaged`] here, never later.
    pub fn get_view(
        &self,
        model: &str,
        props: &Item,
        hidden: bool,
    ) -> Result<Option<ItemView<'_>>, DbError> {
        view_at(
            &self.inner,
            self.now_ms,
            model,
            KeyProps::Item(props),
            hidden,
        )
    }

    /// [`ReadTxn::get_view`] with the key properties given as `(name, text)` pairs (each read
    /// as the JSON string `text`), so the caller builds no item to name the key: the key is
    /// rendered on the stack ([`devtables_schema::Model::primary_key_buf_of`]).
    pub fn get_view_by(
        &self,
        model: &str,
        key: &[(&str, &str)],
        hidden: bool,
    ) -> Result<Option<ItemView<'_>>, DbError> {
        view_at(&self.inner, self.now_ms, model, KeyProps::Strs(key), hidden)
    }

    /// One item by its key properties, decoded by the form `form` makes for its model.
    fn get_decoded<'m, O, F>(
        &'m self,
        model: &str,
        props: &Item,
        form: impl FnOnce(&'m Model) -> F,
    ) -> Result<Option<O>, DbError>
    where
        F: Fn(&[u8], &[u8]) -> Result<O, DbError> + 'm,
    {
        self.inner.engine(|| {
            let model = self.model(model)?;
            // `pk \0 sk`, the items table's key, rendered in one string.
            let raw = model.primary_key_joined(props)?;
            let read = self.inner.store.read()?;
            self.load_raw(
                &read,
                model,
                raw.as_bytes(),
                &Probe::default(),
                &form(model),
            )
        })
    }

    /// The complete stored item at `key`, whatever its model (replication, export).
    pub fn get_stored(&self, key: &ItemKey) -> Result<Option<(String, Item)>, DbError> {
        self.inner.engine(|| {
            let raw = keys::item_key(key);
            let read = self.inner.store.read()?;
            // A key holds one item across all models: the first table that has it answers.
            for (slot, model) in self.inner.holders(key) {
                let Some(table) = read.table(&self.inner.item_tables[slot]) else {
                    continue;
                };
                let Some(value) = table.get(&raw)? else {
                    continue;
                };
                let item = codec::decode(&value, &raw)?;
                if expired(model, &item, self.now_ms) {
                    return Ok(None);
                }
                return Ok(Some((model.name().to_string(), item)));
            }
            Ok(None)
        })
    }

    /// Finds items of `model` matching `props` (see [`crate::Db::find`]).
    pub fn find(&self, model: &str, props: &Item, options: &FindOptions) -> Result<Page, DbError> {
        let model = self.model(model)?;
        let (items, next) =
            self.find_with(model, props, options, &json_form(model, options.hidden))?;
        Ok(Page { items, next })
    }

    /// [`ReadTxn::find`] into the caller's type (see [`ReadTxn::get_as`]).
    pub fn find_as<T: DeserializeOwned>(
        &self,
        model: &str,
        props: &Item,
        options: &FindOptions,
    ) -> Result<TypedPage<T>, DbError> {
        let model = self.model(model)?;
        let (items, next) =
            self.find_with(model, props, options, &typed_form(model, options.hidden))?;
        Ok(TypedPage { items, next })
    }

    fn find_with<O>(
        &self,
        model: &Model,
        props: &Item,
        options: &FindOptions,
        decode: &Decode<'_, O>,
    ) -> Result<(Vec<O>, Option<String>), DbError> {
        self.inner.engine(|| {
            let schema = &self.inner.schema;
            let index = match &options.index {
                Some(name) => Some(
                    schema
                        .index(name)
                        .ok_or_else(|| DbError::UnknownIndex(name.clone()))?,
                ),
                None => None,
            };
            let mut query = model.query(props, index)?;
            let mut index = index.unwrap_or_else(|| schema.primary_index());
            if options.index.is_none() && query.hash.is_none() {
                // No key given: rather than scan the model, use a secondary index whose hash the
                // properties resolve (results then come in that index's order).
                for candidate in schema.secondary_indexes() {
                    let q = model.query(props, Some(candidate))?;
                    if q.hash.is_some() {
                        query = q;
                        index = candidate;
                        break;
                    }
                }
            }
            let after = match &options.next {
                Some(token) => Some(
                    hex::decode(token)
                        .map_err(|_| DbError::BadCursor("not a hexadecimal token".into()))?,
                ),
                None => None,
            };
            let limit = options.limit.unwrap_or(usize::MAX);
            let mut items = Vec::new();
            let mut next = None;
            if limit == 0 {
                return Ok((items, next));
            }
            let is_primary = index.name == schema.primary_index().name;
            let mut sort_filter = None;
            let (table, bounds) = match &query.hash {
                Some(hash) if is_primary => (Walk::Items, sort_bounds(hash, &query.sort)),
                Some(hash) => (Walk::Index, sort_bounds(hash, &query.sort)),
                None => {
                    // A model scan: the model's table, whole.
                    sort_filter = Some((index, &query.sort));
                    (Walk::Items, (Bound::Unbounded, Bound::Unbounded))
                }
            };
            let bounds = continue_after(bounds, after, options.reverse);
            // Conditions on the stored item are checked on the few fields they read, decoded alone,
            // before the item itself is decoded.
            let sort_filter = sort_filter.filter(|(_, sort)| !matches!(sort, SortCondition::Any));
            let mut fields: Vec<&str> = query.filters.iter().map(|f| f.field.as_str()).collect();
            if let Some((index, _)) = sort_filter {
                fields.push(index.hash.as_str());
                fields.extend(index.sort.as_deref());
            }
            let probe = Probe {
                active: !fields.is_empty(),
                fields,
                check: Box::new(|item: &Item| {
                    if let Some((index, sort)) = sort_filter {
                        if !sort_matches(model, item, index, sort) {
                            return false;
                        }
                    }
                    query.filters.iter().all(|f| f.matches(item))
                }),
            };
            // One view of the store for the walk and the items it reads.
            let read = self.inner.store.read()?;
            // `stored` is the item when the walk is over the model's own table; an index entry
            // names the item's key, looked up in the model's table (an item of another model
            // is not there).
            let mut visit = |raw: &[u8], stored: Option<&[u8]>| -> Result<bool, DbError> {
                let item = match stored {
                    Some(bytes) => self.load_found(model, raw, bytes, &probe, decode)?,
                    None => match keys::trailing_item_key_raw(raw) {
                        Some(key) => self.load_raw(&read, model, key, &probe, decode)?,
                        None => return Err(DbError::Corrupt("malformed index entry".into())),
                    },
                };
                let Some(item) = item else {
                    return Ok(true);
                };
                items.push(item);
                if items.len() >= limit {
                    next = Some(hex::encode(raw));
                    return Ok(false);
                }
                Ok(true)
            };
            match table {
                Walk::Items => {
                    if let Some(t) = self.items_of_model(&read, model)? {
                        walk_entries(&t, &bounds, options.reverse, |k, v| visit(k, Some(v)))?
                    }
                }
                Walk::Index => {
                    let name = tables::index_table_name(&index.name);
                    if let Some(t) = read.table(&name) {
                        walk_keys(&t, &bounds, options.reverse, |k| visit(k, None))?
                    }
                }
            }
            Ok((items, next))
        })
    }

    /// Every live item of `model` (complete), in key order: export and resync.
    pub fn scan_model(&self, model: &str) -> Result<Vec<Item>, DbError> {
        self.inner.engine(|| {
            let options = FindOptions {
                hidden: true,
                ..FindOptions::default()
            };
            Ok(self.find(model, &Item::new(), &options)?.items)
        })
    }
}

/// How a get names its item: key properties as an item, or as `(name, text)` pairs.
#[derive(Clone, Copy)]
pub(crate) enum KeyProps<'a> {
    Item(&'a Item),
    Strs(&'a [(&'a str, &'a str)]),
}

/// [`ReadTxn::get_view`] on `inner`, expiry judged at `now_ms` (also behind
/// [`crate::Db::get_view`], whose view borrows the `Db`).
pub(crate) fn view_at<'i>(
    inner: &'i Inner,
    now_ms: i64,
    model: &str,
    props: KeyProps<'_>,
    hidden: bool,
) -> Result<Option<ItemView<'i>>, DbError> {
    inner.engine(|| {
        let model = inner
            .schema
            .model(model)
            .ok_or_else(|| DbError::UnknownModel(model.to_string()))?;
        // On the stack (a key of up to `KEY_INLINE` bytes).
        let key = match props {
            KeyProps::Item(props) => model.primary_key_buf(props)?,
            KeyProps::Strs(props) => model.primary_key_buf_of(props)?,
        };
        let raw = key.as_bytes();
        let view = {
            let read = inner.store.read()?;
            let slot = inner.slot(model.name())?;
            let Some(table) = read.table(&inner.item_tables[slot]) else {
                return Ok(None);
            };
            let Some(stored) = table.get(raw)? else {
                return Ok(None);
            };
            // The one allocation: the record and its key copied out together (and checked).
            ItemView::new(model, &stored, raw, key.pk_len(), hidden)?
        };
        // Expiry read from the view's own bytes, outside the store's lock.
        if let Some(ttl) = model.ttl_field() {
            if matches!(view.expires_at_ms(ttl)?, Some(at) if at <= now_ms) {
                return Ok(None);
            }
        }
        Ok(Some(view))
    })
}

#[derive(Clone, Copy)]
enum Walk {
    /// The model's items table: its key range, or the whole table for a model scan.
    Items,
    /// A secondary index's table.
    Index,
}

type Bounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Walks the entries of `table` in `bounds`, in either direction, until `visit` says stop.
fn walk_entries(
    table: &LogTable<'_>,
    bounds: &Bounds,
    reverse: bool,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, DbError>,
) -> Result<(), DbError> {
    if empty_range(bounds) {
        return Ok(());
    }
    let range = table.range((as_slice(&bounds.0), as_slice(&bounds.1)));
    visit_until(range, reverse, |entry| {
        let (k, v) = entry.map_err(DbError::from)?;
        visit(k, &v)
    })
}

/// Walks the keys of `table` in `bounds` (an index: its entries hold nothing else), in either
/// direction, until `visit` says stop.
fn walk_keys(
    table: &LogTable<'_>,
    bounds: &Bounds,
    reverse: bool,
    visit: impl FnMut(&[u8]) -> Result<bool, DbError>,
) -> Result<(), DbError> {
    if empty_range(bounds) {
        return Ok(());
    }
    let keys = table.keys((as_slice(&bounds.0), as_slice(&bounds.1)));
    visit_until(keys, reverse, visit)
}

/// Hands `visit` the items of `iter`, from the back when `reverse`, until it says stop.
fn visit_until<I: DoubleEndedIterator>(
    iter: I,
    reverse: bool,
    mut visit: impl FnMut(I::Item) -> Result<bool, DbError>,
) -> Result<(), DbError> {
    if reverse {
        for item in iter.rev() {
            if !visit(item)? {
                break;
            }
        }
    } else {
        for item in iter {
            if !visit(item)? {
                break;
            }
        }
    }
    Ok(())
}

fn as_slice(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// An ordered map's range panics when its start is after its end: never ask for one.
fn empty_range(bounds: &Bounds) -> bool {
    match (&bounds.0, &bounds.1) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e))
        | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        _ => false,
    }
}

/// Key range of a sort-key condition under hash `hash`. Keys under a hash are `hash \0 sort`
/// (items) or `hash \0 sort \0 pk \0 sk` (index entries); the bounds below hold for both.
fn sort_bounds(hash: &str, sort: &SortCondition) -> Bounds {
    let base = keys::prefix(&[hash]);
    let at = |s: &str| {
        let mut v = base.clone();
        v.extend_from_slice(s.as_bytes());
        v
    };
    // Just past every key whose sort value is exactly `s`.
    let after_eq = |s: &str| {
        let mut v = at(s);
        v.push(keys::SEP);
        v.push(keys::TOP);
        v
    };
    let start = Bound::Included(base.clone());
    let end = Bound::Excluded(keys::prefix_end(&base));
    match sort {
        SortCondition::Any => (start, end),
        SortCondition::Eq(s) => (Bound::Included(at(s)), Bound::Excluded(after_eq(s))),
        SortCondition::BeginsWith(s) => (
            Bound::Included(at(s)),
            Bound::Excluded(keys::prefix_end(&at(s))),
        ),
        SortCondition::Between(a, b) => (Bound::Included(at(a)), Bound::Excluded(after_eq(b))),
        SortCondition::Lt(s) => (start, Bound::Excluded(at(s))),
        SortCondition::Le(s) => (start, Bound::Excluded(after_eq(s))),
        SortCondition::Gt(s) => (Bound::Included(after_eq(s)), end),
        SortCondition::Ge(s) => (Bound::Included(at(s)), end),
    }
}

fn continue_after(bounds: Bounds, after: Option<Vec<u8>>, reverse: bool) -> Bounds {
    let Some(after) = after else {
        return bounds;
    };
    if reverse {
        let end = match &bounds.1 {
            Bound::Included(e) | Bound::Excluded(e) if *e < after => bounds.1,
            _ => Bound::Excluded(after),
        };
        (bounds.0, end)
    } else {
        let start = match &bounds.0 {
            Bound::Included(s) | Bound::Excluded(s) if *s > after => bounds.0,
            _ => Bound::Excluded(after),
        };
        (start, bounds.1)
    }
}

/// A sort condition checked on an item (model scans, where it cannot be a range).
fn sort_matches(model: &Model, item: &Item, index: &Index, sort: &SortCondition) -> bool {
    if matches!(sort, SortCondition::Any) {
        return true;
    }
    let value = match model.index_key(item, index) {
        Some((_, s)) => s,
        None => return false,
    };
    let v = value.as_str();
    match sort {
        SortCondition::Any => true,
        SortCondition::Eq(s) => v == s,
        SortCondition::BeginsWith(s) => v.starts_with(s.as_str()),
        SortCondition::Between(a, b) => v >= a.as_str() && v <= b.as_str(),
        SortCondition::Lt(s) => v < s.as_str(),
        SortCondition::Le(s) => v <= s.as_str(),
        SortCondition::Gt(s) => v > s.as_str(),
        SortCondition::Ge(s) => v >= s.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(b: &Bounds, key: &[u8]) -> bool {
        let lo = match &b.0 {
            Bound::Included(s) => key >= s.as_slice(),
            Bound::Excluded(s) => key > s.as_slice(),
            Bound::Unbounded => true,
        };
        let hi = match &b.1 {
            Bound::Included(e) => key <= e.as_slice(),
            Bound::Excluded(e) => key < e.as_slice(),
            Bound::Unbounded => true,
        };
        lo && hi
    }

    fn item(sk: &str) -> Vec<u8> {
        keys::item_key(&ItemKey {
            pk: "h".into(),
            sk: sk.into(),
        })
    }

    fn entry(sort: &str) -> Vec<u8> {
        keys::index_key(
            "h",
            sort,
            &ItemKey {
                pk: "p".into(),
                sk: "s".into(),
            },
        )
    }

    #[test]
    fn sort_bounds_match_the_conditions_for_items_and_index_entries() {
        let cases: Vec<(SortCondition, &[&str], &[&str])> = vec![
            (SortCondition::Eq("b".into()), &["b"], &["a", "b1", "ba"]),
            (
                SortCondition::BeginsWith("b".into()),
                &["b", "b1", "bz"],
                &["a", "c"],
            ),
            (
                SortCondition::Between("b".into(), "c".into()),
                &["b", "b9", "c"],
                &["a", "c0"],
            ),
            (
                SortCondition::Lt("b".into()),
                &["a", "az", ""],
                &["b", "b0"],
            ),
            (SortCondition::Le("b".into()), &["a", "b"], &["b0", "c"]),
            (SortCondition::Gt("b".into()), &["b0", "c"], &["a", "b"]),
            (SortCondition::Ge("b".into()), &["b", "b0", "c"], &["a"]),
        ];
        for (cond, inside, outside) in cases {
            let b = sort_bounds("h", &cond);
            for s in inside {
                assert!(
                    contains(&b, &item(s)),
                    "{cond:?} should hold item sort {s:?}"
                );
                assert!(
                    contains(&b, &entry(s)),
                    "{cond:?} should hold index sort {s:?}"
                );
            }
            for s in outside {
                assert!(
                    !contains(&b, &item(s)),
                    "{cond:?} should not hold item sort {s:?}"
                );
                assert!(
                    !contains(&b, &entry(s)),
                    "{cond:?} should not hold index sort {s:?}"
                );
            }
        }
    }

    #[test]
    fn other_hashes_are_outside_every_range() {
        let b = sort_bounds("h", &SortCondition::Any);
        let other = keys::item_key(&ItemKey {
            pk: "h2".into(),
            sk: "".into(),
        });
        assert!(!contains(&b, &other));
    }
}
