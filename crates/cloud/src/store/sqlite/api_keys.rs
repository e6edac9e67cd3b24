//! The API keys of the SQLite store: create, list, revoke and look up the keys the HTTP API
//! accepts.
//!
//! It exists so the `api_keys` table is read and written in one place. Only the hash of a key's
//! secret is stored; the id is random, so a key's id says nothing about its account or its age.

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::super::{ApiKeyRecord, KeyScope, StoreError};
use super::sql::db;

const KEY_COLS: &str = "id, account, scope, secret_hash, created_ms, revoked_ms";

/// Fresh ids tried before giving up (a collision of 64 random bits is not expected at all).
const ID_ATTEMPTS: usize = 4;

/// A fresh random key id: 16 lowercase hex characters (64 bits).
pub(super) fn new_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn key_row(r: &Row<'_>) -> rusqlite::Result<(ApiKeyRecord, String)> {
    let scope: String = r.get(2)?;
    Ok((
        ApiKeyRecord {
            id: r.get(0)?,
            account: r.get(1)?,
            // Replaced below; the CHECK constraint keeps other values out of the table.
            scope: KeyScope::Read,
            secret_hash: r.get(3)?,
            created_ms: r.get(4)?,
            revoked_ms: r.get(5)?,
        },
        scope,
    ))
}

fn decode((mut record, scope): (ApiKeyRecord, String)) -> Result<ApiKeyRecord, StoreError> {
    record.scope = KeyScope::parse(&scope).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "API key {} has an unknown scope {scope:?}",
            record.id
        ))
    })?;
    Ok(record)
}

pub(super) fn create_api_key(
    conn: &Connection,
    account: &str,
    scope: KeyScope,
    secret_hash: &str,
    now_ms: u64,
) -> Result<String, StoreError> {
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO api_keys (id, account, scope, secret_hash, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
        )
        .map_err(db("preparing to store an API key"))?;
    for _ in 0..ID_ATTEMPTS {
        let id = new_id();
        let n = insert
            .execute(params![id, account, scope.as_str(), secret_hash, now_ms])
            .map_err(db("storing an API key"))?;
        if n == 1 {
            return Ok(id);
        }
    }
    Err(StoreError::Database(format!(
        "no free API key id after {ID_ATTEMPTS} random attempts"
    )))
}

pub(super) fn api_keys(conn: &Connection, account: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
    let rows: Vec<(ApiKeyRecord, String)> = conn
        .prepare_cached(&format!(
            "SELECT {KEY_COLS} FROM api_keys WHERE account = ?1 ORDER BY created_ms, id"
        ))
        .and_then(|mut s| s.query_map(params![account], key_row)?.collect())
        .map_err(db("listing API keys"))?;
    rows.into_iter().map(decode).collect()
}

pub(super) fn revoke_api_key(
    conn: &Connection,
    account: &str,
    id: &str,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE api_keys SET revoked_ms = coalesce(revoked_ms, ?3)
             WHERE account = ?1 AND id = ?2",
        )
        .and_then(|mut s| s.execute(params![account, id, now_ms]))
        .map_err(db("revoking an API key"))?;
    Ok(n > 0)
}

pub(super) fn api_key(conn: &Connection, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
    conn.prepare_cached(&format!("SELECT {KEY_COLS} FROM api_keys WHERE id = ?1"))
        .and_then(|mut s| s.query_row(params![id], key_row).optional())
        .map_err(db("looking up an API key"))?
        .map(decode)
        .transpose()
}

pub(super) fn live_api_keys(conn: &Connection) -> Result<u64, StoreError> {
    conn.query_row(
        "SELECT count(*) FROM api_keys WHERE revoked_ms IS NULL",
        [],
        |r| r.get(0),
    )
    .map_err(db("counting API keys"))
}
