//! The file's format number, and the conversion of older files when they are opened.
//!
//! The format (`meta` key `format`) names the layout of the tables and the stored form of the
//! items; every open reads it before anything else:
//! - none recorded and no items: a new file, which gets the current format;
//! - 1 (items as JSON text, in one `items` table with a `types` model index beside it) and 2
//!   (the binary encoding of `codec`, same two tables): converted to the current format in one
//!   transaction, committed durably, so a conversion cut short (a crash, a kill, a full disk)
//!   leaves the file as it was, to be converted again at the next open;
//! - 3 (this version): items in one table per model (`items:<model>`, see `tables`), no model
//!   index;
//! - anything else (a newer version wrote the file) is refused with
//!   [`OpenError::UnsupportedFormat`]: nothing is written.
//!
//! A read-only open converts too, but its writes stay in memory (`storage`): the file is not
//! touched, and the converted tables cost about the items' size in RAM until it closes.

use std::collections::BTreeMap;

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};

use crate::tables::{self, Bytes};
use crate::{codec, keys, tables_error, DbError, Inner, OpenError};

/// The format this version writes and reads.
pub(crate) const FORMAT: u32 = 3;
/// Items in one table with a model index beside it, stored in `codec`'s binary encoding.
pub(crate) const FORMAT_ONE_TABLE: u32 = 2;
/// Files written before the format was recorded: the format-2 layout with items as JSON text.
pub(crate) const FORMAT_JSON: u32 = 1;

/// The one items table of formats 1 and 2: `pk \0 sk` → the item.
const LEGACY_ITEMS: TableDefinition<Bytes, Bytes> = TableDefinition::new("items");
/// The model index of formats 1 and 2: `model \0 pk \0 sk` → ().
const LEGACY_TYPES: TableDefinition<Bytes, ()> = TableDefinition::new("types");

/// What the conversion found, for the open to act on.
#[derive(Default)]
pub(crate) struct Converted {
    /// Some converted item's key is one its model's key templates cannot produce (or its model
    /// is not in the schema): lookups by key alone must ask every model's table.
    pub(crate) stray_keys: bool,
}

/// Reads the file's format and converts an older file (see the module doc).
pub(crate) fn check_format(inner: &Inner) -> Result<Converted, OpenError> {
    let tables_err = |e: DbError| tables_error(&inner.path, e);
    let (found, has_legacy_items) = {
        let tx = inner.db.begin_read().map_err(|e| tables_err(e.into()))?;
        let found = match tx.open_table(tables::META) {
            Ok(meta) => meta
                .get(tables::FORMAT_KEY)
                .map_err(|e| tables_err(e.into()))?
                .map(|v| v.value().to_string()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(tables_err(e.into())),
        };
        let has_legacy_items = match tx.open_table(LEGACY_ITEMS) {
            Ok(_) => true,
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(tables_err(e.into())),
        };
        (found, has_legacy_items)
    };
    let from = match found.as_deref() {
        Some(f) if f == FORMAT.to_string() => return Ok(Converted::default()),
        Some(f) if f == FORMAT_ONE_TABLE.to_string() => FORMAT_ONE_TABLE,
        Some(f) => {
            return Err(OpenError::UnsupportedFormat {
                path: inner.path.clone(),
                found: f.to_string(),
                supported: FORMAT,
            })
        }
        None if has_legacy_items => FORMAT_JSON,
        None => {
            record_format(inner).map_err(tables_err)?;
            return Ok(Converted::default());
        }
    };
    convert(inner, from).map_err(tables_err)
}

/// Records the current format in a new file.
fn record_format(inner: &Inner) -> Result<(), DbError> {
    let mut tx = inner.db.begin_write()?;
    tx.set_durability(redb::Durability::Immediate);
    tx.open_table(tables::META)?
        .insert(tables::FORMAT_KEY, FORMAT.to_string().as_str())?;
    tx.commit()?;
    Ok(())
}

/// Converts a format-1 or format-2 file to the current format, in one durable transaction.
fn convert(inner: &Inner, from: u32) -> Result<Converted, DbError> {
    let mut tx = inner.db.begin_write()?;
    tx.set_durability(redb::Durability::Immediate);
    let (moved, converted) = split_by_model(&tx, inner, from == FORMAT_JSON)?;
    {
        let mut meta = tx.open_table(tables::META)?;
        meta.insert(tables::FORMAT_KEY, FORMAT.to_string().as_str())?;
        if converted.stray_keys {
            meta.insert(tables::STRAY_KEYS_KEY, "1")?;
        }
    }
    tx.commit()?;
    tracing::info!(
        path = %inner.path.display(),
        items = moved,
        stray_keys = converted.stray_keys,
        "converted the file from format {from} to format {FORMAT}{}",
        if inner.read_only {
            " in memory only (read-only open): open it writable once to convert the file itself"
        } else {
            ""
        }
    );
    Ok(converted)
}

/// Moves every item of the legacy `items` table into its model's table, as the legacy model
/// index (`types`) files it, then drops both legacy tables; with `from_json`, turns each item
/// from JSON text into the binary encoding on the way. Returns the count moved.
fn split_by_model(
    tx: &WriteTransaction,
    inner: &Inner,
    from_json: bool,
) -> Result<(u64, Converted), DbError> {
    let primary = inner.schema.primary_index();
    let (hash, sort) = (primary.hash.as_str(), primary.sort.as_deref());
    let mut converted = Converted::default();
    let mut moved = 0u64;
    {
        let items = tx.open_table(LEGACY_ITEMS)?;
        let types = tx.open_table(LEGACY_TYPES)?;
        // The model index is in model order: one target table is open at a time.
        let mut target: Option<(String, Table<'_, Bytes, Bytes>)> = None;
        let mut models_seen = BTreeMap::new();
        for entry in types.iter()? {
            let (k, _) = entry?;
            let entry_key = k.value();
            let Some(sep) = entry_key.iter().position(|b| *b == keys::SEP) else {
                return Err(DbError::Corrupt("malformed model index entry".into()));
            };
            let model = std::str::from_utf8(&entry_key[..sep])
                .map_err(|_| DbError::Corrupt("model index entry is not UTF-8".into()))?;
            let raw = &entry_key[sep + 1..];
            let Some(key) = keys::decode_item_key(raw) else {
                return Err(DbError::Corrupt("malformed model index entry".into()));
            };
            let Some(value) = items.get(raw)? else {
                return Err(DbError::Corrupt(format!(
                    "the model index names {model} item {} which the items table lacks",
                    crate::txn::display_key(&key)
                )));
            };
            let bytes = if from_json {
                codec::from_json(value.value(), raw, hash, sort)?
            } else {
                value.value().to_vec()
            };
            if target.as_ref().is_none_or(|(name, _)| name != model) {
                drop(target.take());
                let name = tables::items_table_name(model);
                let table = tx.open_table(tables::items_def(&name))?;
                target = Some((model.to_string(), table));
            }
            if let Some((_, table)) = target.as_mut() {
                table.insert(raw, bytes.as_slice())?;
            }
            let fits = models_seen
                .entry(model.to_string())
                .or_insert_with(|| inner.schema.model(model));
            if !fits.is_some_and(|m| m.key_fits(&key)) {
                converted.stray_keys = true;
            }
            moved += 1;
        }
        drop(target);
        let held = items.len()?;
        if held != moved {
            return Err(DbError::Corrupt(format!(
                "the items table holds {held} items and the model index names {moved}: \
                 the file's model index is damaged"
            )));
        }
    }
    tx.delete_table(LEGACY_TYPES)?;
    tx.delete_table(LEGACY_ITEMS)?;
    Ok((moved, converted))
}
