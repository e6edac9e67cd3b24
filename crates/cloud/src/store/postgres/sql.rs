//! The PostgreSQL store's connection: every statement goes through [`Conn`], which prepares each
//! SQL text once per connection, maps errors to [`StoreError`] naming the operation, and
//! remembers why the last statement failed (a lost connection, or a deadlock or serialization
//! failure the operation may be retried after); and the small row helpers every concern file
//! shares (it depends on none of them).
//!
//! It exists because the synchronous `postgres` client neither caches statements nor tells a
//! caller that only sees a [`StoreError`] (the replication rules' `CloudTxn` seam) whether a
//! failure is worth a retry: the connection keeps that, and the operation runner in `mod.rs`
//! reads it.

use std::collections::HashMap;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use super::super::StoreError;

/// Statement parameters, as the `postgres` client takes them.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Most distinct SQL texts kept prepared per connection; past it the cache starts over (item
/// queries build their text from the filters they are given).
const MAX_STATEMENTS: usize = 512;

/// Why the last statement failed, when that matters to the operation runner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// A deadlock (40P01) or a serialization failure (40001): the whole operation may be run
    /// again.
    Retry,
    /// The connection is gone: the operation fails and the next one reconnects.
    Closed,
}

/// One connection to the database, with its prepared statements.
pub(super) struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
    /// Why the last failed statement failed, if it is a [`Failure`]; taken by the runner.
    pub(super) failure: Option<Failure>,
}

impl Conn {
    pub(super) fn new(client: Client) -> Conn {
        Conn {
            client,
            statements: HashMap::new(),
            failure: None,
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Maps a client error, remembering a retryable or connection failure.
    fn fail(&mut self, what: &str, e: postgres::Error) -> StoreError {
        let code = e.code();
        if code == Some(&SqlState::T_R_DEADLOCK_DETECTED)
            || code == Some(&SqlState::T_R_SERIALIZATION_FAILURE)
        {
            self.failure = Some(Failure::Retry);
        } else if e.is_closed()
            || self.client.is_closed()
            // Connection exceptions, and the server ending the session (administrator command,
            // crash, shutdown): the connection is as good as gone even if not closed yet.
            || code.is_some_and(|c| c.code().starts_with("08") || c.code().starts_with("57P"))
        {
            self.failure = Some(Failure::Closed);
            return StoreError::Database(format!(
                "{what}: the connection to PostgreSQL was lost ({e}); the next operation reconnects"
            ));
        }
        // The server's message with its detail, not only "db error".
        match e.as_db_error() {
            Some(db) => StoreError::Database(format!(
                "{what}: {} ({}){}",
                db.message(),
                db.code().code(),
                db.detail().map(|d| format!(": {d}")).unwrap_or_default()
            )),
            None => StoreError::Database(format!("{what}: {e}")),
        }
    }

    fn statement(&mut self, what: &str, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = match self.client.prepare(sql) {
            Ok(s) => s,
            Err(e) => return Err(self.fail(what, e)),
        };
        if self.statements.len() >= MAX_STATEMENTS {
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Runs SQL text that takes no parameters and returns no rows (transaction control, DDL).
    pub(super) fn batch(&mut self, what: &str, sql: &str) -> Result<(), StoreError> {
        self.client
            .batch_execute(sql)
            .map_err(|e| self.fail(what, e))
    }

    pub(super) fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(what, sql)?;
        self.client
            .query(&s, params)
            .map_err(|e| self.fail(what, e))
    }

    pub(super) fn query_opt(
        &mut self,
        what: &str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        let s = self.statement(what, sql)?;
        self.client
            .query_opt(&s, params)
            .map_err(|e| self.fail(what, e))
    }

    pub(super) fn query_one(
        &mut self,
        what: &str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, StoreError> {
        let s = self.statement(what, sql)?;
        self.client
            .query_one(&s, params)
            .map_err(|e| self.fail(what, e))
    }

    pub(super) fn execute(
        &mut self,
        what: &str,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, StoreError> {
        let s = self.statement(what, sql)?;
        self.client
            .execute(&s, params)
            .map_err(|e| self.fail(what, e))
    }
}

/// A `u64` as a `bigint` parameter (counts, cursors, times): saturating, since no real value
/// reaches 2^63.
pub(super) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A `usize` (a limit) as a `bigint` parameter.
pub(super) fn limit(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A column of a row; a value of the wrong type is bad stored data.
pub(super) fn col<'a, T: postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
) -> Result<T, StoreError> {
    row.try_get(idx).map_err(|e| {
        StoreError::Corrupt(format!(
            "column {}: {e}",
            row.columns().get(idx).map_or("?", |c| c.name())
        ))
    })
}

/// A `bigint` column holding a count, cursor or time: negative is bad stored data.
pub(super) fn col_u64(row: &Row, idx: usize) -> Result<u64, StoreError> {
    let v: i64 = col(row, idx)?;
    u64::try_from(v).map_err(|_| {
        StoreError::Corrupt(format!(
            "column {} holds {v}, below 0",
            row.columns().get(idx).map_or("?", |c| c.name())
        ))
    })
}

/// A nullable `bigint` column holding a count, cursor or time.
pub(super) fn col_opt_u64(row: &Row, idx: usize) -> Result<Option<u64>, StoreError> {
    let v: Option<i64> = col(row, idx)?;
    v.map(|v| u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {idx} holds {v}"))))
        .transpose()
}

/// A stored JSONB item: an object, or the row is corrupt.
pub(super) fn json_item(value: serde_json::Value) -> Result<devtables_schema::Item, StoreError> {
    match value {
        serde_json::Value::Object(map) => Ok(map),
        other => Err(StoreError::Corrupt(format!(
            "stored item is JSON {}, not an object",
            match other {
                serde_json::Value::Array(_) => "array",
                serde_json::Value::String(_) => "string",
                serde_json::Value::Number(_) => "number",
                serde_json::Value::Bool(_) => "boolean",
                _ => "null",
            }
        ))),
    }
}

/// A nullable JSONB item column.
pub(super) fn col_item(
    row: &Row,
    idx: usize,
) -> Result<Option<devtables_schema::Item>, StoreError> {
    let v: Option<serde_json::Value> = col(row, idx)?;
    v.map(json_item).transpose()
}
