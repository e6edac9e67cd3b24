//! The redb tables that hold a device database, and how one item is laid out across them.
//!
//! - `items:<model>`: one per model, primary key (`pk \0 sk`) → the complete item, in the binary
//!   encoding of `codec`. The table is the model: a get names its model's table, a model scan
//!   walks it, and no model index is written beside each item (format 3; format 2 kept every
//!   item in one `items` table with a `types` table, `model \0 pk \0 sk` → (), beside it: a
//!   third B-tree insert and delete per item). A key holds one item across all models: a write
//!   looks for the key in the tables of the other models that could hold it (`Inner::holders`).
//!   The table of a model the schema no longer has stays in the file, unread (warned at every
//!   open with its item count).
//! - `ttl`: `expiry \0 pk \0 sk` → (): the purge reads only what has expired.
//! - `idx:<name>`: one per secondary index, `hash \0 sort \0 pk \0 sk` → (): real index lookups.
//! - `unique`: the values of `unique` fields, (model, field, scope, value) → the key of the item
//!   holding it (see `unique`); only in files whose schema has unique fields.
//! - `meta`: the file's format (`format`, see `convert`), the index definitions the
//!   secondary tables were built for (rebuilt when they change), the unique fields the `unique`
//!   table holds values of (`unique:<model>\0<field>`), and the schema the file was written
//!   with (`schema`, its shape as JSON, and `schema_fingerprint`; see `schema_record`), and
//!   `stray_keys` once stored keys may not fit their model's key templates (see `Inner::holders`).
//! - `x:<name>`: side tables for the layers above (replication outbox, versions, cursors), written in
//!   the same transactions as the items they describe.

use redb::TableDefinition;

pub(crate) type Bytes = &'static [u8];

pub(crate) const TTL: TableDefinition<Bytes, ()> = TableDefinition::new("ttl");
pub(crate) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// `meta` key of the file's format number.
pub(crate) const FORMAT_KEY: &str = "format";

/// `meta` key set (to `1`) once the file may hold items whose key their model's key templates
/// cannot produce (an incompatible schema change was accepted, or a converted file held such
/// items): from then on a lookup by key alone asks every model's table, not only those whose
/// templates fit the key.
pub(crate) const STRAY_KEYS_KEY: &str = "stray_keys";

/// Prefix of the items tables' names: `items:<model>`.
pub(crate) const ITEMS_PREFIX: &str = "items:";

pub(crate) fn items_table_name(model: &str) -> String {
    format!("{ITEMS_PREFIX}{model}")
}

pub(crate) fn items_def(name: &str) -> TableDefinition<'_, Bytes, Bytes> {
    TableDefinition::new(name)
}

pub(crate) fn index_table_name(index: &str) -> String {
    format!("idx:{index}")
}

pub(crate) fn side_table_name(table: &str) -> String {
    format!("x:{table}")
}

pub(crate) fn index_def(name: &str) -> TableDefinition<'_, Bytes, ()> {
    TableDefinition::new(name)
}

pub(crate) fn side_def(name: &str) -> TableDefinition<'_, Bytes, Bytes> {
    TableDefinition::new(name)
}

/// Up to `limit` entries of a side table with keys `>= start`, in key order: the one scan of a
/// side table, over a read or a write transaction alike.
pub(crate) fn side_entries(
    t: &impl redb::ReadableTable<Bytes, Bytes>,
    start: &[u8],
    limit: usize,
) -> Result<crate::SideEntries, crate::DbError> {
    let mut out = Vec::new();
    for entry in t.range::<&[u8]>(start..)? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry?;
        out.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(out)
}
