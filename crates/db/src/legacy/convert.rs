//! Formats 1 and 2 of the redb files brought to format 3, in the redb file's in-memory overlay
//! (`storage`), before `legacy` copies the tables of format 3 into the log.
//!
//! - none recorded and no items: a redb file that never held a database (nothing to convert);
//! - 1 (items as JSON text, in one `items` table with a `types` model index beside it) and 2
//!   (the binary encoding of `codec`, same two tables): every item moved to its model's table
//!   (`items:<model>`), the two legacy tables dropped;
//! - 3: the layout `tables` describes, copied as it is;
//! - anything else is refused with [`OpenError::UnsupportedFormat`]: nothing is written.

use std::collections::BTreeMap;

use std::path::Path;

use devtables_schema::Schema;
use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};

use super::{Bytes, Converted, LegacyError, META};
use crate::tables;
use crate::{codec, keys, DbError, OpenError};

/// The last redb format: the tables of `tables`, which the log keeps.
pub(crate) const FORMAT: u32 = 3;
/// Items in one table with a model index beside it, stored in `codec`'s binary encoding.
pub(crate) const FORMAT_ONE_TABLE: u32 = 2;
/// Files written before the format was recorded: the format-2 layout with items as JSON text.
pub(crate) const FORMAT_JSON: u32 = 1;

/// The one items table of formats 1 and 2: `pk \0 sk` → the item.
const LEGACY_ITEMS: TableDefinition<Bytes, Bytes> = TableDefinition::new("items");
/// The model index of formats 1 and 2: `model \0 pk \0 sk` → ().
const LEGACY_TYPES: TableDefinition<Bytes, ()> = TableDefinition::new("types");

/// Reads the redb file's format and brings an older one to format 3 (see the module doc);
/// returns the format found.
pub(super) fn to_format_3(
    db: &redb::Database,
    path: &Path,
    schema: &Schema,
) -> Result<(u32, Converted), LegacyError> {
    let (found, has_legacy_items) = {
        let tx = db.begin_read()?;
        let found = match tx.open_table(META) {
            Ok(meta) => meta.get(tables::FORMAT_KEY)?.map(|v| v.value().to_string()),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let has_legacy_items = match tx.open_table(LEGACY_ITEMS) {
            Ok(_) => true,
            Err(redb::TableError::TableDoesNotExist(_)) => false,
            Err(e) => return Err(e.into()),
        };
        (found, has_legacy_items)
    };
    let from = match found.as_deref() {
        Some(f) if f == FORMAT.to_string() => return Ok((FORMAT, Converted::default())),
        Some(f) if f == FORMAT_ONE_TABLE.to_string() => FORMAT_ONE_TABLE,
        Some(f) => {
            return Err(LegacyError::Open(Box::new(OpenError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: f.to_string(),
                supported: crate::format::FORMAT,
            })))
        }
        None if has_legacy_items => FORMAT_JSON,
        None => return Ok((FORMAT, Converted::default())),
    };
    let tx = db.begin_write()?;
    let (moved, converted) = split_by_model(&tx, schema, from == FORMAT_JSON)?;
    {
        let mut meta = tx.open_table(META)?;
        meta.insert(tables::FORMAT_KEY, FORMAT.to_string().as_str())?;
        if converted.stray_keys {
            meta.insert(tables::STRAY_KEYS_KEY, "1")?;
        }
    }
    tx.commit()?;
    tracing::info!(
        path = %path.display(),
        items = moved,
        stray_keys = converted.stray_keys,
        "converted the redb file from format {from} to format {FORMAT}, in memory, on the way to the log"
    );
    Ok((from, converted))
}

/// Moves every item of the legacy `items` table into its model's table, as the legacy model
/// index (`types`) files it, then drops both legacy tables; with `from_json`, turns each item
/// from JSON text into the binary encoding on the way. Returns the count moved.
fn split_by_model(
    tx: &WriteTransaction,
    schema: &Schema,
    from_json: bool,
) -> Result<(u64, Converted), LegacyError> {
    let primary = schema.primary_index();
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
                return Err(DbError::Corrupt("malformed model index entry".into()).into());
            };
            let model = std::str::from_utf8(&entry_key[..sep]).map_err(|_| {
                LegacyError::from(DbError::Corrupt("model index entry is not UTF-8".into()))
            })?;
            let raw = &entry_key[sep + 1..];
            let Some(key) = keys::decode_item_key(raw) else {
                return Err(DbError::Corrupt("malformed model index entry".into()).into());
            };
            let Some(value) = items.get(raw)? else {
                return Err(DbError::Corrupt(format!(
                    "the model index names {model} item {} which the items table lacks",
                    crate::txn::display_key(&key)
                ))
                .into());
            };
            let bytes = if from_json {
                codec::from_json(value.value(), raw, hash, sort)?
            } else {
                value.value().to_vec()
            };
            if target.as_ref().is_none_or(|(name, _)| name != model) {
                drop(target.take());
                let name = tables::items_table_name(model);
                let table = tx.open_table(TableDefinition::<Bytes, Bytes>::new(&name))?;
                target = Some((model.to_string(), table));
            }
            if let Some((_, table)) = target.as_mut() {
                table.insert(raw, bytes.as_slice())?;
            }
            let fits = models_seen
                .entry(model.to_string())
                .or_insert_with(|| schema.model(model));
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
            ))
            .into());
        }
    }
    tx.delete_table(LEGACY_TYPES)?;
    tx.delete_table(LEGACY_ITEMS)?;
    Ok((moved, converted))
}
