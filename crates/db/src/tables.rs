//! The tables of the log store that hold a device database, and how one item is laid out across
//! them. Names and key/value layouts are those of format 3 (the last redb format), so the redb
//! conversion (`legacy`) copies tables as they are; format 4 is the same tables in the log.
//!
//! - `items:<model>`: one per model, primary key (`pk \0 sk`) → the complete item, in the binary
//!   encoding of `codec`. The table is the model: a get names its model's table, a model scan
//!   walks it, and no model index is written beside each item (format 2 kept every item in one
//!   `items` table with a `types` table, `model \0 pk \0 sk` → (), beside it). A key holds one
//!   item across all models: a write looks for the key in the tables of the other models that
//!   could hold it (`Inner::holders`). The table of a model the schema no longer has stays in
//!   the file, unread (warned at every open with its item count).
//! - `ttl`: `expiry \0 pk \0 sk` → empty: the purge reads only what has expired.
//! - `idx:<name>`: one per secondary index, `hash \0 sort \0 pk \0 sk` → empty: real index
//!   lookups.
//! - `unique`: the values of `unique` fields, (model, field, scope, value) → the key of the item
//!   holding it (see `unique`); only in files whose schema has unique fields.
//! - `meta`: UTF-8 keys → UTF-8 values: the file's format (`format`, see `convert`), the index
//!   definitions the secondary tables were built for (rebuilt when they change), the unique
//!   fields the `unique` table holds values of (`unique:<model>\0<field>`), the schema the file
//!   was written with (`schema`, its shape as JSON, and `schema_fingerprint`; see
//!   `schema_record`), and `stray_keys` once stored keys may not fit their model's key
//!   templates (see `Inner::holders`).
//! - `x:<name>`: side tables for the layers above (replication outbox, versions, cursors),
//!   written in the same transactions as the items they describe.

use std::ops::Bound;

use devtables_logstore::{LogRead, LogWrite};

use crate::DbError;

pub(crate) const TTL: &str = "ttl";
pub(crate) const META: &str = "meta";
pub(crate) const UNIQUE: &str = "unique";

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

pub(crate) fn index_table_name(index: &str) -> String {
    format!("idx:{index}")
}

pub(crate) fn side_table_name(table: &str) -> String {
    format!("x:{table}")
}

/// A `meta` value as text: written by this crate as UTF-8, so anything else is damage.
fn meta_text(bytes: &[u8], key: &str) -> Result<String, DbError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| DbError::Corrupt(format!("meta value of {key:?} is not UTF-8")))
}

/// The `meta` value at `key`, read from the committed state.
pub(crate) fn meta_get(read: &LogRead<'_>, key: &str) -> Result<Option<String>, DbError> {
    let Some(meta) = read.table(META) else {
        return Ok(None);
    };
    match meta.get(key.as_bytes())? {
        Some(bytes) => Ok(Some(meta_text(&bytes, key)?)),
        None => Ok(None),
    }
}

/// The `meta` value at `key`, inside a write transaction.
pub(crate) fn meta_get_in(tx: &LogWrite<'_>, key: &str) -> Result<Option<String>, DbError> {
    match tx.get(META, key.as_bytes())? {
        Some(bytes) => Ok(Some(meta_text(&bytes, key)?)),
        None => Ok(None),
    }
}

pub(crate) fn meta_put(tx: &mut LogWrite<'_>, key: &str, value: &str) -> Result<(), DbError> {
    tx.insert(META, key.as_bytes(), value.as_bytes())?;
    Ok(())
}

/// The range of keys `>= start`.
pub(crate) fn from(start: &[u8]) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (Bound::Included(start), Bound::Unbounded)
}

/// Every key.
pub(crate) const ALL: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Unbounded, Bound::Unbounded);
