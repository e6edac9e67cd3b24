//! Write transactions: every change of an item, its index entries, its TTL entry and whatever the
//! layers above record about it (through [`SideTables`] and the [`WriteInterceptor`]) commits
//! together or not at all.

use std::cell::RefCell;
use std::ops::Bound;
use std::rc::Rc;

use devtables_schema::{Item, ItemKey, Model, SyncDirection};
use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use crate::hooks::{ChangeOp, ItemChange, Origin};
use crate::tables::{self, Bytes};
use crate::{keys, unique, DbError, Inner};

/// Called inside every write transaction for each change, before commit. The replication agent
/// uses it to record the outbox entry of a local change in the same transaction as the change;
/// returning an error aborts the whole transaction (for example when the outbox is full).
pub trait WriteInterceptor: Send + Sync {
    fn on_change(&self, side: &mut SideTables<'_>, change: &ItemChange) -> Result<(), DbError>;
}

/// Byte-keyed tables beside the items, written in the same transaction (replication state).
///
/// A table opened here stays open until the transaction ends ([`OpenedSide`]): redb's
/// `open_table` looks the name up and a table's drop writes its root back, and the agent makes
/// about ten side-table calls per application write.
pub struct SideTables<'a> {
    opened: &'a (dyn SideAccess + 'a),
}

/// What [`SideTables`] does with its transaction's open tables; a trait object, so that
/// `SideTables` needs no second lifetime for the tables' own.
trait SideAccess {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;
    fn put(&self, table: &str, key: &[u8], value: &[u8]) -> Result<(), DbError>;
    fn remove(&self, table: &str, key: &[u8]) -> Result<bool, DbError>;
    fn len(&self, table: &str) -> Result<u64, DbError>;
    fn scan(&self, table: &str, start: &[u8], limit: usize) -> Result<crate::SideEntries, DbError>;
    fn clear(&self, table: &str) -> Result<(), DbError>;
}

/// The side tables one write transaction has opened, by the caller's table name.
pub(crate) struct OpenedSide<'t> {
    tx: &'t WriteTransaction,
    tables: RefCell<Vec<(String, Table<'t, Bytes, Bytes>)>>,
}

impl<'t> OpenedSide<'t> {
    pub(crate) fn new(tx: &'t WriteTransaction) -> OpenedSide<'t> {
        OpenedSide {
            tx,
            tables: RefCell::new(Vec::new()),
        }
    }

    /// Runs `f` on the table, opening it on first use. A transaction touches a handful of side
    /// tables, so a linear search beats hashing the name.
    fn with<R>(
        &self,
        table: &str,
        f: impl FnOnce(&mut Table<'t, Bytes, Bytes>) -> Result<R, DbError>,
    ) -> Result<R, DbError> {
        let mut tables = self.tables.borrow_mut();
        let at = match tables.iter().position(|(name, _)| name == table) {
            Some(at) => at,
            None => {
                let name = tables::side_table_name(table);
                tables.push((
                    table.to_string(),
                    self.tx.open_table(tables::side_def(&name))?,
                ));
                tables.len() - 1
            }
        };
        f(&mut tables[at].1)
    }
}

impl SideAccess for OpenedSide<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.with(table, |t| Ok(t.get(key)?.map(|v| v.value().to_vec())))
    }

    fn put(&self, table: &str, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        self.with(table, |t| {
            t.insert(key, value)?;
            Ok(())
        })
    }

    fn remove(&self, table: &str, key: &[u8]) -> Result<bool, DbError> {
        self.with(table, |t| Ok(t.remove(key)?.is_some()))
    }

    fn len(&self, table: &str) -> Result<u64, DbError> {
        self.with(table, |t| Ok(t.len()?))
    }

    fn scan(&self, table: &str, start: &[u8], limit: usize) -> Result<crate::SideEntries, DbError> {
        self.with(table, |t| crate::tables::side_entries(t, start, limit))
    }

    fn clear(&self, table: &str) -> Result<(), DbError> {
        // redb refuses to delete an open table: close it here first.
        self.tables.borrow_mut().retain(|(name, _)| name != table);
        let name = tables::side_table_name(table);
        self.tx.delete_table(tables::side_def(&name))?;
        Ok(())
    }
}

impl SideTables<'_> {
    pub fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.opened.get(table, key)
    }

    pub fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        self.opened.put(table, key, value)
    }

    /// Removes a key; returns whether it was there.
    pub fn remove(&mut self, table: &str, key: &[u8]) -> Result<bool, DbError> {
        self.opened.remove(table, key)
    }

    pub fn len(&self, table: &str) -> Result<u64, DbError> {
        self.opened.len(table)
    }

    pub fn is_empty(&self, table: &str) -> Result<bool, DbError> {
        Ok(self.len(table)? == 0)
    }

    /// Up to `limit` entries with keys `>= start`, in key order.
    pub fn scan(
        &self,
        table: &str,
        start: &[u8],
        limit: usize,
    ) -> Result<crate::SideEntries, DbError> {
        self.opened.scan(table, start, limit)
    }

    /// Removes every entry of the table.
    pub fn clear(&mut self, table: &str) -> Result<(), DbError> {
        self.opened.clear(table)
    }
}

/// The items tables a write transaction opened, with their model slots.
pub(crate) type OpenedItems<'t> = RefCell<Vec<(usize, Rc<Table<'t, Bytes, Bytes>>)>>;

/// One write transaction. Obtained from [`crate::Db::write`]; commits when the closure returns Ok.
pub struct WriteTxn<'t> {
    pub(crate) inner: &'t Inner,
    pub(crate) tx: &'t WriteTransaction,
    /// The items tables opened so far, by model slot (`Inner::slot`): a write opens the one or
    /// two it touches, however many models the schema has. Shared (`Rc`) only for the length
    /// of one read, so a write finds its table unshared.
    pub(crate) items: OpenedItems<'t>,
    pub(crate) ttl: Table<'t, Bytes, ()>,
    /// One per secondary index, in `Schema::secondary_indexes` order.
    pub(crate) indexes: Vec<Table<'t, Bytes, ()>>,
    /// The values of `unique` fields (see `unique`); opened only when the schema has some.
    pub(crate) unique: Option<Table<'t, Bytes, Bytes>>,
    /// The side tables opened so far (see [`SideTables`]).
    pub(crate) side: OpenedSide<'t>,
    pub(crate) origin: Origin,
    pub(crate) now_ms: i64,
    pub(crate) changes: Vec<ItemChange>,
}

impl<'t> WriteTxn<'t> {
    /// Milliseconds since the epoch, read once when the transaction began.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The side tables, in this transaction.
    pub fn side(&mut self) -> SideTables<'_> {
        SideTables { opened: &self.side }
    }

    fn model(&self, name: &str) -> Result<&'t Model, DbError> {
        self.inner
            .schema
            .model(name)
            .ok_or_else(|| DbError::UnknownModel(name.to_string()))
    }

    /// The schema's policy for writes by the device application.
    fn check_local_write(&self, model: &Model) -> Result<(), DbError> {
        if self.origin != Origin::Local {
            return Ok(());
        }
        let process = model.process();
        if !process.on_device() {
            return Err(DbError::NotOnDevice(model.name().to_string()));
        }
        if process.sync == SyncDirection::Down {
            return Err(DbError::DownOnly(model.name().to_string()));
        }
        Ok(())
    }

    /// The items table of the model in `slot`, opened on first use.
    fn items_of(&self, slot: usize) -> Result<Rc<Table<'t, Bytes, Bytes>>, DbError> {
        let mut opened = self.items.borrow_mut();
        if let Some((_, table)) = opened.iter().find(|(s, _)| *s == slot) {
            return Ok(table.clone());
        }
        let table = Rc::new(
            self.tx
                .open_table(tables::items_def(&self.inner.item_tables[slot]))?,
        );
        opened.push((slot, table.clone()));
        Ok(table)
    }

    fn items_of_mut(&mut self, slot: usize) -> Result<&mut Table<'t, Bytes, Bytes>, DbError> {
        drop(self.items_of(slot)?);
        self.items
            .get_mut()
            .iter_mut()
            .find(|(s, _)| *s == slot)
            .and_then(|(_, table)| Rc::get_mut(table))
            .ok_or_else(|| DbError::Corrupt("items table still lent to a read".into()))
    }

    /// The item stored (expired or not) at item key `raw` in the table of the model in `slot`.
    fn stored_in(&self, slot: usize, raw: &[u8]) -> Result<Option<Item>, DbError> {
        let table = self.items_of(slot)?;
        let Some(value) = table.get(raw)? else {
            return Ok(None);
        };
        Ok(Some(crate::codec::decode(value.value(), raw)?))
    }

    /// The live (not expired) stored item at `key`, with its model.
    pub fn get_stored(&self, key: &ItemKey) -> Result<Option<(&'t Model, Item)>, DbError> {
        Ok(self
            .stored_even_if_expired(key, None)?
            .filter(|(m, item)| !crate::read::expired(m, item, self.now_ms)))
    }

    /// The live stored item of `model` at `key` (its table alone).
    fn get_of(&self, model: &'t Model, key: &ItemKey) -> Result<Option<Item>, DbError> {
        let raw = keys::item_key(key);
        Ok(self
            .stored_in(self.inner.slot(model.name())?, &raw)?
            .filter(|item| !crate::read::expired(model, item, self.now_ms)))
    }

    /// Reads an item of `model` by its key properties, without hidden fields.
    pub fn get(&self, model: &str, props: &Item) -> Result<Option<Item>, DbError> {
        let model = self.model(model)?;
        let key = model.primary_key(props)?;
        Ok(self
            .get_of(model, &key)?
            .map(|item| model.project(&item, false)))
    }

    /// Creates an item; fails with [`DbError::Exists`] when its key is taken.
    pub fn create(&mut self, model: &str, input: &Item) -> Result<Item, DbError> {
        let model = self.model(model)?;
        self.check_local_write(model)?;
        let item = model.prepare_create(input, self.now_ms)?;
        let key = model.primary_key(&item)?;
        // One lookup: a live item is a conflict, an expired one is replaced.
        let old = self.stored_even_if_expired(&key, Some(model))?;
        if let Some((m, stored)) = &old {
            if !crate::read::expired(m, stored, self.now_ms) {
                return Err(exists(model, &key));
            }
        }
        let mut shown = self.store(model, key, old, item, ChangeOp::Create)?;
        model.strip_hidden(&mut shown);
        Ok(shown)
    }

    /// Changes the fields given in `input` of the item they identify; with `upsert`, creates it
    /// when absent.
    pub fn update(&mut self, model: &str, input: &Item, upsert: bool) -> Result<Item, DbError> {
        let model_ref = self.model(model)?;
        self.check_local_write(model_ref)?;
        let key = model_ref.primary_key(input)?;
        let found = self
            .stored_even_if_expired(&key, Some(model_ref))?
            .filter(|(m, item)| !crate::read::expired(m, item, self.now_ms));
        let existing = match found {
            Some((m, item)) if m.name() == model_ref.name() => item,
            Some(_) => return Err(exists(model_ref, &key)),
            None if upsert => return self.create(model, input),
            None => return Err(not_found(model_ref, &key)),
        };
        let item = model_ref.prepare_update(&existing, input, self.now_ms)?;
        let old = Some((model_ref, existing));
        let mut shown = self.store(model_ref, key, old, item, ChangeOp::Update)?;
        model_ref.strip_hidden(&mut shown);
        Ok(shown)
    }

    /// Removes the item its key properties identify; returns it (without hidden fields).
    pub fn remove(&mut self, model: &str, props: &Item) -> Result<Option<Item>, DbError> {
        let model = self.model(model)?;
        self.check_local_write(model)?;
        let key = model.primary_key(props)?;
        // An item of another model at the key is not this model's to remove: its own table
        // alone is asked.
        match self.get_of(model, &key)? {
            Some(item) => {
                let mut shown = self.remove_found(model, &key, item)?;
                model.strip_hidden(&mut shown);
                Ok(Some(shown))
            }
            None => Ok(None),
        }
    }

    /// Writes a complete item as given (validated by `normalize_stored`): how replication applies
    /// a remote item and import loads one. Returns its key.
    pub fn put_stored(&mut self, model: &str, item: Item) -> Result<ItemKey, DbError> {
        let model = self.model(model)?;
        match self.origin {
            Origin::Local => self.check_local_write(model)?,
            Origin::Import if !model.process().on_device() => {
                return Err(DbError::NotOnDevice(model.name().to_string()))
            }
            _ => {}
        }
        let item = match self.origin {
            // Replication: the cloud may run a neighbouring (newer, compatible) schema version;
            // what this schema does not define is kept (see `Model::normalize_from_neighbour`).
            Origin::Remote => model.normalize_from_neighbour(item)?.0,
            _ => model.normalize_stored(item)?,
        };
        let key = model.primary_key(&item)?;
        let old = self.stored_even_if_expired(&key, Some(model))?;
        let op = if old.is_some() {
            ChangeOp::Update
        } else {
            ChangeOp::Create
        };
        self.store(model, key.clone(), old, item, op)?;
        Ok(key)
    }

    /// Removes the item stored at `key` whatever its model; returns the complete item.
    pub fn remove_stored(&mut self, key: &ItemKey) -> Result<Option<Item>, DbError> {
        let Some((model, item)) = self.stored_even_if_expired(key, None)? else {
            return Ok(None);
        };
        Ok(Some(self.remove_found(model, key, item)?))
    }

    /// Removes a stored item and its entries; returns the item.
    fn remove_found(
        &mut self,
        model: &'t Model,
        key: &ItemKey,
        item: Item,
    ) -> Result<Item, DbError> {
        let raw = keys::item_key(key);
        self.move_unique(&raw, Some((model, &item)), None)?;
        let slot = self.inner.slot(model.name())?;
        self.items_of_mut(slot)?.remove(raw.as_slice())?;
        if let Some(expires) = model.expires_at_ms(&item) {
            self.ttl.remove(keys::ttl_key(expires, key).as_slice())?;
        }
        let inner = self.inner;
        for (table, index) in self
            .indexes
            .iter_mut()
            .zip(inner.schema.secondary_indexes())
        {
            if let Some((hash, sort)) = model.index_key(&item, index) {
                table.remove(keys::index_key(&hash, &sort, key).as_slice())?;
            }
        }
        let Some(interceptor) = self.listeners() else {
            return Ok(item);
        };
        let change = ItemChange {
            model: model.name().to_string(),
            key: key.clone(),
            op: ChangeOp::Remove,
            old: Some(item.clone()),
            new: None,
            origin: self.origin,
        };
        self.record(interceptor, change)?;
        Ok(item)
    }

    /// The item stored at `key` (expired or not) whatever its model: `first`'s table is asked
    /// first (the model a write names, where the key is most likely), then the tables of the
    /// other models that may hold the key (`Inner::holders`).
    fn stored_even_if_expired(
        &self,
        key: &ItemKey,
        first: Option<&'t Model>,
    ) -> Result<Option<(&'t Model, Item)>, DbError> {
        let raw = keys::item_key(key);
        if let Some(model) = first {
            if let Some(item) = self.stored_in(self.inner.slot(model.name())?, &raw)? {
                return Ok(Some((model, item)));
            }
        }
        let inner: &'t Inner = self.inner;
        for (slot, model) in inner.holders(key) {
            if first.is_some_and(|f| f.name() == model.name()) {
                continue;
            }
            if let Some(item) = self.stored_in(slot, &raw)? {
                return Ok(Some((model, item)));
            }
        }
        Ok(None)
    }

    fn store(
        &mut self,
        model: &'t Model,
        key: ItemKey,
        old: Option<(&'t Model, Item)>,
        item: Item,
        op: ChangeOp,
    ) -> Result<Item, DbError> {
        let primary = self.inner.schema.primary_index();
        let bytes = crate::codec::encode(&item, &primary.hash, primary.sort.as_deref(), &key);
        let max = self.inner.options.max_item_bytes;
        // The limit is on the item as JSON: counted only when the encoding could be that large.
        if crate::codec::json_len_bound(bytes.len(), &key) > max {
            let size = json_len(&item)?;
            if size > max {
                return Err(DbError::TooLarge {
                    model: model.name().to_string(),
                    key: display_key(&key),
                    size,
                    max,
                });
            }
        }
        let index_keys = self.index_keys(model, &item)?;
        // Only entries that change are touched: an update of a plain field rewrites the item
        // alone, not its model, TTL and index entries.
        let (old_model, old_item) = match &old {
            Some((m, i)) => (Some(*m), Some(i)),
            None => (None, None),
        };
        let same_model = old_model.is_some_and(|m| m.name() == model.name());
        let raw = keys::item_key(&key);
        self.move_unique(&raw, old_model.zip(old_item), Some((model, &item)))?;
        if !same_model {
            // The key moves to this model: it leaves the other model's table.
            if let Some(m) = old_model {
                let slot = self.inner.slot(m.name())?;
                self.items_of_mut(slot)?.remove(raw.as_slice())?;
            }
        }
        let slot = self.inner.slot(model.name())?;
        self.items_of_mut(slot)?
            .insert(raw.as_slice(), bytes.as_slice())?;
        let old_expiry = old_model
            .zip(old_item)
            .and_then(|(m, i)| m.expires_at_ms(i));
        let new_expiry = model.expires_at_ms(&item);
        if old_expiry != new_expiry {
            if let Some(expires) = old_expiry {
                self.ttl.remove(keys::ttl_key(expires, &key).as_slice())?;
            }
            if let Some(expires) = new_expiry {
                self.ttl
                    .insert(keys::ttl_key(expires, &key).as_slice(), ())?;
            }
        }
        let inner = self.inner;
        for ((table, index), entry) in self
            .indexes
            .iter_mut()
            .zip(inner.schema.secondary_indexes())
            .zip(index_keys)
        {
            let old_entry = old_model
                .zip(old_item)
                .and_then(|(m, i)| m.index_key(i, index));
            if old_entry == entry {
                continue;
            }
            if let Some((hash, sort)) = old_entry {
                table.remove(keys::index_key(&hash, &sort, &key).as_slice())?;
            }
            if let Some((hash, sort)) = entry {
                table.insert(keys::index_key(&hash, &sort, &key).as_slice(), ())?;
            }
        }
        // The change record (copies of the items) is built only when someone reads it.
        let Some(interceptor) = self.listeners() else {
            return Ok(item);
        };
        let change = ItemChange {
            model: model.name().to_string(),
            key,
            op,
            old: old.map(|(_, item)| item),
            new: Some(item.clone()),
            origin: self.origin,
        };
        self.record(interceptor, change)?;
        Ok(item)
    }

    /// Moves the unique values of the item at `raw` from `old` to `new` (see `unique`).
    /// Refuses a value another live item holds, for local writes and imports; a replicated
    /// write takes it over, since refusing would stop replication (the cloud does not enforce
    /// `unique`).
    fn move_unique(
        &mut self,
        raw: &[u8],
        old: Option<(&Model, &Item)>,
        new: Option<(&Model, &Item)>,
    ) -> Result<(), DbError> {
        let Some(table) = &self.unique else {
            return Ok(());
        };
        let (moves, conflicts) = unique::plan(table, raw, old, new, |holder, value_key| {
            // The entry counts only while its item is live and still holds the value.
            Ok(self.get_stored(holder)?.is_some_and(|(m, item)| {
                unique::keyed(m, &item)
                    .iter()
                    .any(|(k, _)| k.as_slice() == value_key)
            }))
        })?;
        if let (Some(conflict), Some((model, _))) = (conflicts.first(), new) {
            if matches!(self.origin, Origin::Local | Origin::Import) {
                return Err(DbError::NotUnique {
                    model: model.name().to_string(),
                    field: conflict.value.field.clone(),
                    value: conflict.value.value.clone(),
                    scope: unique::scope_text(&conflict.value.scope),
                    holder: display_key(&conflict.holder),
                });
            }
            for conflict in &conflicts {
                tracing::warn!(
                    model = %model.name(),
                    field = %conflict.value.field,
                    value = %crate::error::cut(&conflict.value.value),
                    holder = %display_key(&conflict.holder),
                    item = %unique::shown_key(raw),
                    "a replicated item takes over a unique value another item holds (the cloud does not enforce unique)"
                );
            }
        }
        if let Some(table) = &mut self.unique {
            unique::apply(table, raw, &moves)?;
        }
        Ok(())
    }

    fn index_keys(
        &self,
        model: &Model,
        item: &Item,
    ) -> Result<Vec<Option<(String, String)>>, DbError> {
        let mut out = Vec::with_capacity(self.indexes.len());
        for index in self.inner.schema.secondary_indexes() {
            let entry = model.index_key(item, index);
            if let Some((hash, sort)) = &entry {
                if keys::has_nul(hash) || keys::has_nul(sort) {
                    return Err(DbError::BadIndexValue {
                        model: model.name().to_string(),
                        field: index.hash.clone(),
                    });
                }
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// `None` when no interceptor is installed and no hook subscribed: nobody would read a change
    /// record, so none is built. Otherwise `Some(the interceptor, if any)`.
    #[allow(clippy::option_option)]
    fn listeners(&self) -> Option<Option<std::sync::Arc<dyn WriteInterceptor>>> {
        let interceptor = self.inner.interceptor();
        if interceptor.is_none() && !self.inner.hooks.active() {
            return None;
        }
        Some(interceptor)
    }

    fn record(
        &mut self,
        interceptor: Option<std::sync::Arc<dyn WriteInterceptor>>,
        change: ItemChange,
    ) -> Result<(), DbError> {
        if let Some(interceptor) = interceptor {
            interceptor.on_change(&mut SideTables { opened: &self.side }, &change)?;
        }
        self.changes.push(change);
        Ok(())
    }

    /// Keys of every stored item of `model`, in key order (replication's resync sweep).
    pub fn model_keys(&self, model: &str) -> Result<Vec<ItemKey>, DbError> {
        // A model the schema lacks holds nothing here.
        let Ok(slot) = self.inner.slot(model) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in self.items_of(slot)?.iter()? {
            let (k, _) = entry?;
            match keys::decode_item_key(k.value()) {
                Some(key) => out.push(key),
                None => return Err(DbError::Corrupt("malformed item key".into())),
            }
        }
        Ok(out)
    }

    /// Keys of the items whose TTL passed at `now_ms`, oldest first, at most `limit`.
    pub(crate) fn expired_keys(&self, now_ms: i64, limit: usize) -> Result<Vec<ItemKey>, DbError> {
        let end = (now_ms.max(0) as u64 + 1).to_be_bytes();
        let mut out = Vec::new();
        for entry in self
            .ttl
            .range::<&[u8]>((Bound::Unbounded, Bound::Excluded(&end[..])))?
        {
            if out.len() >= limit {
                break;
            }
            let (k, _) = entry?;
            if let Some(key) = keys::decode_ttl_key(k.value()) {
                out.push(key);
            }
        }
        Ok(out)
    }

    pub(crate) fn take_changes(&mut self) -> Vec<ItemChange> {
        std::mem::take(&mut self.changes)
    }
}

/// Length of the item as JSON text, without building the text.
fn json_len(item: &Item) -> Result<usize, DbError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, item)?;
    Ok(count.0)
}

pub(crate) fn display_key(key: &ItemKey) -> String {
    if key.pk.is_empty() {
        format!("{:?}", key.sk)
    } else {
        format!("{:?}/{:?}", key.pk, key.sk)
    }
}

fn exists(model: &Model, key: &ItemKey) -> DbError {
    DbError::Exists {
        model: model.name().to_string(),
        key: display_key(key),
    }
}

fn not_found(model: &Model, key: &ItemKey) -> DbError {
    DbError::NotFound {
        model: model.name().to_string(),
        key: display_key(key),
    }
}
