//! The redb tables that hold a device database, and how one item is laid out across them.
//!
//! - `items`: primary key (`pk \0 sk`) → the complete item, in the binary encoding of `codec`.
//! - `types`: `model \0 pk \0 sk` → (): walks one model without reading the others.
//! - `ttl`: `expiry \0 pk \0 sk` → (): the purge reads only what has expired.
//! - `idx:<name>`: one per secondary index, `hash \0 sort \0 pk \0 sk` → (): real index lookups.
//! - `unique`: the values of `unique` fields, (model, field, scope, value) → the key of the item
//!   holding it (see `unique`); only in files whose schema has unique fields.
//! - `meta`: the stored-item format (`format`, see `codec`), the index definitions the
//!   secondary tables were built for (rebuilt when they change), the unique fields the `unique`
//!   table holds values of (`unique:<model>\0<field>`), and the schema the file was written
//!   with (`schema`, its shape as JSON, and `schema_fingerprint`; see `schema_record`).
//! - `x:<name>`: side tables for the layers above (replication outbox, versions, cursors), written in
//!   the same transactions as the items they describe.

use redb::TableDefinition;

pub(crate) type Bytes = &'static [u8];

pub(crate) const ITEMS: TableDefinition<Bytes, Bytes> = TableDefinition::new("items");
pub(crate) const TYPES: TableDefinition<Bytes, ()> = TableDefinition::new("types");
pub(crate) const TTL: TableDefinition<Bytes, ()> = TableDefinition::new("ttl");
pub(crate) const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

/// `meta` key of the stored-item format number.
pub(crate) const FORMAT_KEY: &str = "format";

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
