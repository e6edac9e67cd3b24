//! Write transactions: every change of an item, its index entries, its TTL entry and whatever the
//! layers above record about it (through [`SideTables`] and the [`WriteInterceptor`]) commits
//! together or not at all.

use std::ops::Bound;

use devtables_logstore::LogWrite;
use devtables_schema::{Item, ItemKey, Model, SyncDirection};

use crate::hooks::{ChangeOp, ItemChange, Origin};
use crate::tables;
use crate::{keys, unique, DbError, Inner};

/// Called inside every write transaction for each change, before commit. The replication agent
/// uses it to record the outbox entry of a local change in the same transaction as the change;
/// returning an error aborts the whole transaction (for example when the outbox is full).
pub trait WriteInterceptor: Send + Sync {
    fn on_change(&self, side: &mut SideTables<'_>, change: &ItemChange) -> Result<(), DbError>;
}

/// Byte-keyed tables beside the items, written in the same transaction (replication state).
/// Each is the log table `x:<name>`.
pub struct SideTables<'a> {
    tx: &'a mut (dyn SideAccess + 'a),
}

/// What [`SideTables`] does with its transaction; a trait object, so that `SideTables` needs no
/// second lifetime for the transaction's own.
trait SideAccess {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError>;
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), DbError>;
    fn remove(&mut self, table: &str, key: &[u8]) -> Result<bool, DbError>;
    fn len(&self, table: &str) -> Result<u64, DbError>;
    fn scan(&self, table: &str, start: &[u8], limit: usize) -> Result<crate::SideEntries, DbError>;
    fn clear(&mut self, table: &str) -> Result<(), DbError>;
}

impl SideAccess for LogWrite<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        Ok(LogWrite::get(self, &tables::side_table_name(table), key)?)
    }

    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        Ok(self.insert(&tables::side_table_name(table), key, value)?)
    }

    fn remove(&mut self, table: &str, key: &[u8]) -> Result<bool, DbError> {
        Ok(LogWrite::remove(
            self,
            &tables::side_table_name(table),
            key,
        )?)
    }

    fn len(&self, table: &str) -> Result<u64, DbError> {
        Ok(LogWrite::len(self, &tables::side_table_name(table))?)
    }

    fn scan(&self, table: &str, start: &[u8], limit: usize) -> Result<crate::SideEntries, DbError> {
        Ok(self.range(
            &tables::side_table_name(table),
            tables::from(start),
            false,
            limit,
        )?)
    }

    fn clear(&mut self, table: &str) -> Result<(), DbError> {
        self.delete_table(&tables::side_table_name(table))?;
        Ok(())
    }
}

impl SideTables<'_> {
    pub fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, DbError> {
        self.tx.get(table, key)
    }

    pub fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), DbError> {
        self.tx.put(table, key, value)
    }

    /// Removes a key; returns whether it was there.
    pub fn remove(&mut self, table: &str, key: &[u8]) -> Result<bool, DbError> {
        self.tx.remove(table, key)
    }

    pub fn len(&self, table: &str) -> Result<u64, DbError> {
        self.tx.len(table)
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
        self.tx.scan(table, start, limit)
    }

    /// Removes every entry of the table.
    pub fn clear(&mut self, table: &str) -> Result<(), DbError> {
        self.tx.clear(table)
    }
}

/// One write transaction. Obtained from [`crate::Db::write`]; commits when the closure returns Ok.
pub struct WriteTxn<'t> {
    pub(crate) inner: &'t Inner,
    /// The store's one write transaction: every change of this one, committed as one record.
    pub(crate) tx: LogWrite<'t>,
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
        SideTables { tx: &mut self.tx }
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

    /// The name of the items table of the model in `slot`.
    fn items_of(&self, slot: usize) -> &'t str {
        let inner: &'t Inner = self.inner;
        &inner.item_tables[slot]
    }

    /// The item stored (expired or not) at item key `raw` in the table of the model in `slot`.
    fn stored_in(&self, slot: usize, raw: &[u8]) -> Result<Option<Item>, DbError> {
        let Some(value) = self.tx.get(self.items_of(slot), raw)? else {
            return Ok(None);
        };
        Ok(Some(crate::codec::decode(&value, raw)?))
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
        let (_, mut shown) = self.store_new(model, item)?;
        model.strip_hidden(&mut shown);
        Ok(shown)
    }

    /// [`WriteTxn::create`] of an input the caller gives away, returning only the new item's
    /// key: the input's keys and values become the stored item's without a copy, and no item
    /// is handed back (the caller holds what it gave; the stored item adds the defaults, type,
    /// timestamps and key fields a get returns). The fastest create; the same stored item and
    /// the same errors as `create`.
    pub fn create_owned(&mut self, model: &str, input: Item) -> Result<ItemKey, DbError> {
        let model = self.model(model)?;
        self.check_local_write(model)?;
        let item = model.prepare_create_owned(input, self.now_ms)?;
        Ok(self.store_new(model, item)?.0)
    }

    /// Stores a prepared new item under its key unless a live item holds the key.
    fn store_new(&mut self, model: &'t Model, item: Item) -> Result<(ItemKey, Item), DbError> {
        // The joined key is the row key as it is (`pk`, NUL, `sk`, as `keys::item_key` spells
        // it): taken over, not built a second time.
        let joined = model.primary_key_joined(&item)?;
        let key = joined.to_item_key();
        let raw = joined.into_bytes();
        debug_assert_eq!(raw, keys::item_key(&key));
        // One lookup: a live item is a conflict, an expired one is replaced.
        let old = self.stored_at(&key, &raw, Some(model))?;
        if let Some((m, stored)) = &old {
            if !crate::read::expired(m, stored, self.now_ms) {
                return Err(exists(model, &key));
            }
        }
        let item = self.store(model, &key, raw, old, item, ChangeOp::Create)?;
        Ok((key, item))
    }

    /// Changes the fields given in `input` of the item they identify; with `upsert`, creates it
    /// when absent.
    pub fn update(&mut self, model: &str, input: &Item, upsert: bool) -> Result<Item, DbError> {
        let model_ref = self.model(model)?;
        self.check_local_write(model_ref)?;
        let key = model_ref.primary_key(input)?;
        let raw = keys::item_key(&key);
        let found = self
            .stored_at(&key, &raw, Some(model_ref))?
            .filter(|(m, item)| !crate::read::expired(m, item, self.now_ms));
        let existing = match found {
            Some((m, item)) if m.name() == model_ref.name() => item,
            Some(_) => return Err(exists(model_ref, &key)),
            None if upsert => return self.create(model, input),
            None => return Err(not_found(model_ref, &key)),
        };
        let item = model_ref.prepare_update(&existing, input, self.now_ms)?;
        let old = Some((model_ref, existing));
        let mut shown = self.store(model_ref, &key, raw, old, item, ChangeOp::Update)?;
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
        let raw = keys::item_key(&key);
        let old = self.stored_at(&key, &raw, Some(model))?;
        let op = if old.is_some() {
            ChangeOp::Update
        } else {
            ChangeOp::Create
        };
        self.store(model, &key, raw, old, item, op)?;
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
        self.tx.remove(self.items_of(slot), &raw)?;
        if let Some(expires) = model.expires_at_ms(&item) {
            self.tx.remove(tables::TTL, &keys::ttl_key(expires, key))?;
        }
        let inner: &'t Inner = self.inner;
        for (table, index) in inner
            .index_tables
            .iter()
            .zip(inner.schema.secondary_indexes())
        {
            if let Some((hash, sort)) = model.index_key_ref(&item, index) {
                self.tx.remove(table, &keys::index_key(&hash, &sort, key))?;
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
        self.stored_at(key, &keys::item_key(key), first)
    }

    /// [`WriteTxn::stored_even_if_expired`] with the row key `raw` of `key` already built (a
    /// write that goes on to store the item needs it again).
    fn stored_at(
        &self,
        key: &ItemKey,
        raw: &[u8],
        first: Option<&'t Model>,
    ) -> Result<Option<(&'t Model, Item)>, DbError> {
        if let Some(model) = first {
            if let Some(item) = self.stored_in(self.inner.slot(model.name())?, raw)? {
                return Ok(Some((model, item)));
            }
        }
        let inner: &'t Inner = self.inner;
        for (slot, model) in inner.holders_besides(key, first.map(Model::name)) {
            if let Some(item) = self.stored_in(slot, raw)? {
                return Ok(Some((model, item)));
            }
        }
        Ok(None)
    }

    /// Writes `item` at `key` (row key `raw`) with its index, TTL and unique entries. `old` is
    /// what `stored_at(key, raw, Some(model))` found in this transaction, so `None` means no
    /// table holds the key.
    fn store(
        &mut self,
        model: &'t Model,
        key: &ItemKey,
        raw: Vec<u8>,
        old: Option<(&'t Model, Item)>,
        item: Item,
        op: ChangeOp,
    ) -> Result<Item, DbError> {
        let primary = self.inner.schema.primary_index();
        let bytes = crate::codec::encode(&item, &primary.hash, primary.sort.as_deref(), key);
        let max = self.inner.options.max_item_bytes;
        // The limit is on the item as JSON: counted only when the encoding could be that large.
        if crate::codec::json_len_bound(bytes.len(), key) > max {
            let size = json_len(&item)?;
            if size > max {
                return Err(DbError::TooLarge {
                    model: model.name().to_string(),
                    key: display_key(key),
                    size,
                    max,
                });
            }
        }
        // Borrowed from `item` (no copies of the values); used up before `item` is returned.
        let index_keys = self.index_keys(model, &item)?;
        // Only entries that change are touched: an update of a plain field rewrites the item
        // alone, not its model, TTL and index entries.
        let (old_model, old_item) = match &old {
            Some((m, i)) => (Some(*m), Some(i)),
            None => (None, None),
        };
        let same_model = old_model.is_some_and(|m| m.name() == model.name());
        self.move_unique(&raw, old_model.zip(old_item), Some((model, &item)))?;
        if !same_model {
            // The key moves to this model: it leaves the other model's table.
            if let Some(m) = old_model {
                let slot = self.inner.slot(m.name())?;
                self.tx.remove(self.items_of(slot), &raw)?;
            }
        }
        let slot = self.inner.slot(model.name())?;
        if old.is_none() {
            // The caller's lookup (`stored_at`, this transaction) found no item at
            // the key: the store need not search its committed table for it again.
            self.tx.insert_absent(self.items_of(slot), raw, bytes)?;
        } else {
            self.tx.insert(self.items_of(slot), &raw, &bytes)?;
        }
        let old_expiry = old_model
            .zip(old_item)
            .and_then(|(m, i)| m.expires_at_ms(i));
        let new_expiry = model.expires_at_ms(&item);
        if old_expiry != new_expiry {
            if let Some(expires) = old_expiry {
                self.tx.remove(tables::TTL, &keys::ttl_key(expires, key))?;
            }
            if let Some(expires) = new_expiry {
                self.tx
                    .insert(tables::TTL, &keys::ttl_key(expires, key), &[])?;
            }
        }
        let inner: &'t Inner = self.inner;
        for ((table, index), entry) in inner
            .index_tables
            .iter()
            .zip(inner.schema.secondary_indexes())
            .zip(index_keys)
        {
            let old_entry = old_model
                .zip(old_item)
                .and_then(|(m, i)| m.index_key_ref(i, index));
            if old_entry == entry {
                continue;
            }
            if let Some((hash, sort)) = old_entry {
                self.tx.remove(table, &keys::index_key(&hash, &sort, key))?;
            }
            if let Some((hash, sort)) = entry {
                self.tx
                    .insert(table, &keys::index_key(&hash, &sort, key), &[])?;
            }
        }
        // The change record (copies of the items) is built only when someone reads it.
        let Some(interceptor) = self.listeners() else {
            return Ok(item);
        };
        let change = ItemChange {
            model: model.name().to_string(),
            key: key.clone(),
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
        if !self.inner.has_unique {
            return Ok(());
        }
        let (moves, conflicts) = unique::plan(&self.tx, raw, old, new, |holder, value_key| {
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
        unique::apply(&mut self.tx, raw, &moves)?;
        Ok(())
    }

    /// The (hash, sort) values of `item` in each secondary index, borrowed from the item where
    /// they are strings.
    fn index_keys<'i>(
        &self,
        model: &Model,
        item: &'i Item,
    ) -> Result<Vec<Option<IndexValues<'i>>>, DbError> {
        let mut out = Vec::with_capacity(self.inner.index_tables.len());
        for index in self.inner.schema.secondary_indexes() {
            let entry = model.index_key_ref(item, index);
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
            interceptor.on_change(&mut SideTables { tx: &mut self.tx }, &change)?;
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
        for k in self.tx.keys(self.items_of(slot), tables::ALL, usize::MAX)? {
            match keys::decode_item_key(&k) {
                Some(key) => out.push(key),
                None => return Err(DbError::Corrupt("malformed item key".into())),
            }
        }
        Ok(out)
    }

    /// Keys of the items whose TTL passed at `now_ms`, oldest first, at most `limit`.
    pub(crate) fn expired_keys(&self, now_ms: i64, limit: usize) -> Result<Vec<ItemKey>, DbError> {
        let end = (now_ms.max(0) as u64 + 1).to_be_bytes();
        let entries = self.tx.keys(
            tables::TTL,
            (Bound::Unbounded, Bound::Excluded(&end[..])),
            limit,
        )?;
        Ok(entries
            .iter()
            .filter_map(|k| keys::decode_ttl_key(k))
            .collect())
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

/// The (hash, sort) values of an item in one index (see `Model::index_key_ref`).
type IndexValues<'i> = (std::borrow::Cow<'i, str>, std::borrow::Cow<'i, str>);

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
