//! Small helpers every part of the SQLite store shares: error mapping, the owner columns, and
//! the decoding of stored versions and items.
//!
//! It exists so the concern files (`layout`, `txn`, `feed`, `devices`, `queries`, `purge`) speak
//! about rows and errors the same way without depending on each other: this file depends on none
//! of them.

use devtables_schema::Item;
use devtables_sync::hlc::Hlc;
use devtables_sync::identity::Owner;
use devtables_sync::wire::hlc_from_str;
use rusqlite::{Connection, TransactionBehavior};

use super::super::StoreError;

/// Maps a rusqlite error, saying which operation failed. Decoding failures mean bad stored data.
pub(super) fn map_err(what: &str, e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => {
            StoreError::Corrupt(format!("{what}: {e}"))
        }
        _ => StoreError::Database(format!("{what}: {e}")),
    }
}

pub(super) fn db(what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| map_err(what, e)
}

/// The (account, device) columns of an owner's rows.
pub(super) fn owner_cols(owner: &Owner) -> (&str, &str) {
    match owner {
        Owner::Device(d) => (&d.account, &d.device),
        Owner::Account(a) => (a, ""),
    }
}

pub(super) fn sql_int(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn parse_version(s: &str) -> Result<Hlc, StoreError> {
    hlc_from_str(s).map_err(|e| StoreError::Corrupt(format!("stored version: {e}")))
}

pub(super) fn parse_item(s: &str) -> Result<Item, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("stored item JSON: {e}")))
}

pub(super) fn item_json(item: &Item) -> Result<String, StoreError> {
    serde_json::to_string(item)
        .map_err(|e| StoreError::Database(format!("encoding an item as JSON: {e}")))
}

/// Starts a write transaction, taking the write lock at its start (`BEGIN IMMEDIATE`) rather
/// than at its first write.
pub(super) fn write_txn<'c>(
    conn: &'c mut Connection,
    what: &'static str,
) -> Result<rusqlite::Transaction<'c>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db(what))
}
