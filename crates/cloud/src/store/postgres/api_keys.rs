//! The API keys of the PostgreSQL store: create, list, revoke and look up the keys the HTTP API
//! accepts.
//!
//! It exists so the `api_keys` table is read and written in one place. Only the hash of a key's
//! secret is stored; the id is random, so a key's id says nothing about its account or its age.

use postgres::Row;
use rand::RngCore;

use super::super::{ApiKeyRecord, KeyScope, StoreError};
use super::sql::{col, col_opt_u64, col_u64, int, Conn};

const KEY_COLS: &str = "id, account, scope, secret_hash, created_ms, revoked_ms";

/// Fresh ids tried before giving up (a collision of 64 random bits is not expected at all).
const ID_ATTEMPTS: usize = 4;

/// A fresh random id: 16 lowercase hex characters (64 bits).
pub(super) fn new_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn key_row(r: &Row) -> Result<ApiKeyRecord, StoreError> {
    let id: String = col(r, 0)?;
    let scope: String = col(r, 2)?;
    Ok(ApiKeyRecord {
        scope: KeyScope::parse(&scope).ok_or_else(|| {
            StoreError::Corrupt(format!("API key {id} has an unknown scope {scope:?}"))
        })?,
        id,
        account: col(r, 1)?,
        secret_hash: col(r, 3)?,
        created_ms: col_u64(r, 4)?,
        revoked_ms: col_opt_u64(r, 5)?,
    })
}

pub(super) fn create_api_key(
    conn: &mut Conn,
    account: &str,
    scope: KeyScope,
    secret_hash: &str,
    now_ms: u64,
) -> Result<String, StoreError> {
    for _ in 0..ID_ATTEMPTS {
        let id = new_id();
        let n = conn.execute(
            "storing an API key",
            "INSERT INTO api_keys (id, account, scope, secret_hash, created_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
            &[&id, &account, &scope.as_str(), &secret_hash, &int(now_ms)],
        )?;
        if n == 1 {
            return Ok(id);
        }
    }
    Err(StoreError::Database(format!(
        "no free API key id after {ID_ATTEMPTS} random attempts"
    )))
}

pub(super) fn api_keys(conn: &mut Conn, account: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
    conn.query(
        "listing API keys",
        &format!("SELECT {KEY_COLS} FROM api_keys WHERE account = $1 ORDER BY created_ms, id"),
        &[&account],
    )?
    .iter()
    .map(key_row)
    .collect()
}

pub(super) fn revoke_api_key(
    conn: &mut Conn,
    account: &str,
    id: &str,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let n = conn.execute(
        "revoking an API key",
        "UPDATE api_keys SET revoked_ms = coalesce(revoked_ms, $3) WHERE account = $1 AND id = $2",
        &[&account, &id, &int(now_ms)],
    )?;
    Ok(n > 0)
}

pub(super) fn api_key(conn: &mut Conn, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
    conn.query_opt(
        "looking up an API key",
        &format!("SELECT {KEY_COLS} FROM api_keys WHERE id = $1"),
        &[&id],
    )?
    .as_ref()
    .map(key_row)
    .transpose()
}

pub(super) fn live_api_keys(conn: &mut Conn) -> Result<u64, StoreError> {
    let row = conn.query_one(
        "counting API keys",
        "SELECT count(*) FROM api_keys WHERE revoked_ms IS NULL",
        &[],
    )?;
    col_u64(&row, 0)
}
