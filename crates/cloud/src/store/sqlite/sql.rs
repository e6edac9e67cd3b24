//! Small helpers every part of the SQLite store shares: error mapping, the owner columns, and
//! the decoding of stored versions and items.
//!
//! It exists so the concern files (`layout`, `txn`, `feed`, `devices`, `queries`, `purge`) speak
//! about rows and errors the same way without depending on each other: this file depends on none
//! of them.

use rusqlite::{Connection, TransactionBehavior};

use super::super::StoreError;
pub(super) use crate::store::encoding::{item_json, owner_cols, parse_item, parse_version};

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

pub(super) fn sql_int(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One operation's transaction: a transaction of its own, or a savepoint inside the group the
/// store thread has open ([`super::SqliteStore`]'s `begin_group`). The operation code is the
/// same either way: it reads and writes through the connection this derefs to, and commits or
/// (by dropping) rolls back only its own work.
pub(super) enum OpTxn<'c> {
    Own(rusqlite::Transaction<'c>),
    /// Inside a group: releasing the savepoint keeps the work for the group's commit, which is
    /// what makes it durable.
    InGroup(rusqlite::Savepoint<'c>),
}

impl OpTxn<'_> {
    pub(super) fn commit(self) -> rusqlite::Result<()> {
        match self {
            OpTxn::Own(tx) => tx.commit(),
            OpTxn::InGroup(sp) => sp.commit(),
        }
    }
}

impl std::ops::Deref for OpTxn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            OpTxn::Own(tx) => tx,
            OpTxn::InGroup(sp) => sp,
        }
    }
}

/// Starts a write operation: outside a group, a transaction that takes the write lock at its
/// start (`BEGIN IMMEDIATE`) rather than at its first write; inside one (the group holds the
/// lock already), a savepoint.
pub(super) fn write_txn<'c>(
    conn: &'c mut Connection,
    what: &'static str,
) -> Result<OpTxn<'c>, StoreError> {
    op_txn(conn, TransactionBehavior::Immediate, what)
}

/// Starts a read operation that must see one snapshot: outside a group a deferred transaction,
/// inside one a savepoint (which also sees the group's earlier, uncommitted writes).
pub(super) fn read_txn<'c>(
    conn: &'c mut Connection,
    what: &'static str,
) -> Result<OpTxn<'c>, StoreError> {
    op_txn(conn, TransactionBehavior::Deferred, what)
}

fn op_txn<'c>(
    conn: &'c mut Connection,
    behavior: TransactionBehavior,
    what: &'static str,
) -> Result<OpTxn<'c>, StoreError> {
    if conn.is_autocommit() {
        conn.transaction_with_behavior(behavior)
            .map(OpTxn::Own)
            .map_err(db(what))
    } else {
        conn.savepoint().map(OpTxn::InGroup).map_err(db(what))
    }
}
