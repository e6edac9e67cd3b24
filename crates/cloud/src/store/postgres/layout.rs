//! The table layout of the PostgreSQL store: the DDL, its version, and how a connection brings
//! a schema up to it.
//!
//! It exists so that everything that decides what the database looks like is in one place: a
//! change to a table is a change here, with a new [`LAYOUT_VERSION`] and a migration step in
//! [`MIGRATIONS`]. The layout is applied at connect in one transaction under a transaction-level
//! advisory lock named after the schema, so two processes starting at once against a fresh
//! schema serialize: the first creates it, the second finds it at the current version.
//!
//! Text the engine compares byte-wise (keys, versions, ids, model names) is `COLLATE "C"`, so
//! `ORDER BY` and keyset pagination follow the same order as SQLite's and the engine's.

use super::super::StoreError;
use super::sql::{col, Conn};

/// The version of the table layout this build writes; a newer schema is refused untouched.
pub const LAYOUT_VERSION: u32 = 2;

/// What moves a schema from layout `n` to `n + 1` is `MIGRATIONS[n]`; layout 0 is an empty
/// schema, so the first step creates everything.
const MIGRATIONS: &[&str] = &[LAYOUT_1, super::fanout::LAYOUT_2];

/// Layout 1. The change log's sequence has `CACHE 1` (PostgreSQL's default, said explicitly):
/// a cache would hand each session its own block of numbers, and sequence order would no longer
/// follow the per-account lock that makes commit order the order of sequence numbers.
const LAYOUT_1: &str = r#"
CREATE TABLE devices (
    account text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    secret_hash text NOT NULL,
    broker_hash text,
    registered_ms bigint NOT NULL,
    online boolean NOT NULL DEFAULT false,
    last_seen_ms bigint,
    schema_version text,
    cursor_acked bigint NOT NULL DEFAULT 0,
    feed_head bigint NOT NULL DEFAULT 0,
    feed_floor bigint NOT NULL DEFAULT 0,
    pending bigint NOT NULL DEFAULT 0,
    last_error text,
    changes_applied bigint NOT NULL DEFAULT 0,
    changes_superseded bigint NOT NULL DEFAULT 0,
    changes_rejected bigint NOT NULL DEFAULT 0,
    changes_duplicate bigint NOT NULL DEFAULT 0,
    changes_answered bigint NOT NULL DEFAULT 0,
    rows_stored bigint NOT NULL DEFAULT 0,
    bytes_stored bigint NOT NULL DEFAULT 0,
    changes_over_quota bigint NOT NULL DEFAULT 0,
    messages_rate_limited bigint NOT NULL DEFAULT 0,
    pushes_busy bigint NOT NULL DEFAULT 0,
    conflicts_dropped bigint NOT NULL DEFAULT 0,
    feed_gen text NOT NULL DEFAULT '0',
    feed_generations text NOT NULL DEFAULT '0:0',
    PRIMARY KEY (account, device)
);
CREATE TABLE items (
    account text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    model text COLLATE "C" NOT NULL,
    pk text COLLATE "C" NOT NULL,
    sk text COLLATE "C" NOT NULL,
    item jsonb,
    item_bytes bigint NOT NULL DEFAULT 0,
    version text COLLATE "C" NOT NULL,
    deleted boolean NOT NULL,
    updated_ms bigint NOT NULL,
    base text COLLATE "C",
    PRIMARY KEY (account, device, pk, sk)
);
CREATE INDEX items_by_model ON items (account, model, device, pk, sk);
CREATE INDEX items_tombstones ON items (updated_ms) WHERE deleted;
CREATE INDEX items_fields ON items USING gin (item jsonb_path_ops);
CREATE TABLE watermarks (
    account text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    purged_below text COLLATE "C" NOT NULL,
    PRIMARY KEY (account, device)
);
CREATE TABLE feed (
    account text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    owner text COLLATE "C" NOT NULL,
    model text COLLATE "C" NOT NULL,
    pk text COLLATE "C" NOT NULL,
    sk text COLLATE "C" NOT NULL,
    PRIMARY KEY (account, device, seq)
);
CREATE UNIQUE INDEX feed_by_key ON feed (account, device, owner, pk, sk);
CREATE TABLE conflicts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms bigint NOT NULL,
    account text COLLATE "C" NOT NULL,
    device text COLLATE "C",
    owner text COLLATE "C" NOT NULL,
    model text COLLATE "C" NOT NULL,
    pk text COLLATE "C" NOT NULL,
    sk text COLLATE "C" NOT NULL,
    winner text COLLATE "C" NOT NULL,
    loser text COLLATE "C" NOT NULL,
    lost text NOT NULL CHECK (lost IN ('stored', 'incoming')),
    loser_item jsonb
);
CREATE INDEX conflicts_by_account ON conflicts (account, id);
CREATE INDEX conflicts_by_device ON conflicts (account, device, id);
CREATE SEQUENCE change_seq AS bigint CACHE 1;
CREATE TABLE changes (
    seq bigint PRIMARY KEY,
    account text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    model text COLLATE "C" NOT NULL,
    pk text COLLATE "C" NOT NULL,
    sk text COLLATE "C" NOT NULL,
    version text COLLATE "C" NOT NULL,
    deleted boolean NOT NULL,
    item jsonb,
    at_ms bigint NOT NULL
);
CREATE INDEX changes_by_account ON changes (account, seq);
CREATE INDEX changes_by_age ON changes (at_ms);
CREATE TABLE change_floors (
    account text COLLATE "C" PRIMARY KEY,
    floor bigint NOT NULL DEFAULT 0
);
CREATE TABLE webhooks (
    id text COLLATE "C" PRIMARY KEY,
    account text COLLATE "C" NOT NULL,
    url text NOT NULL,
    model text COLLATE "C",
    secret text NOT NULL,
    created_ms bigint NOT NULL,
    cursor bigint NOT NULL,
    last_status integer,
    last_error text,
    last_attempt_ms bigint,
    last_success_ms bigint,
    failures bigint NOT NULL DEFAULT 0,
    failures_total bigint NOT NULL DEFAULT 0,
    deliveries bigint NOT NULL DEFAULT 0,
    changes_delivered bigint NOT NULL DEFAULT 0,
    gaps bigint NOT NULL DEFAULT 0
);
CREATE INDEX webhooks_by_account ON webhooks (account, created_ms, id);
CREATE TABLE api_keys (
    id text COLLATE "C" PRIMARY KEY,
    account text COLLATE "C" NOT NULL,
    scope text NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    secret_hash text NOT NULL,
    created_ms bigint NOT NULL,
    revoked_ms bigint
);
CREATE INDEX api_keys_by_account ON api_keys (account, created_ms, id);
"#;

/// `name` quoted as an SQL identifier, after checking it is a plain one: letters, digits and `_`,
/// not starting with a digit, at most 63 bytes (PostgreSQL's limit, past which it would cut the
/// name silently).
pub(super) fn schema_ident(name: &str) -> Result<String, StoreError> {
    let plain = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !plain {
        return Err(StoreError::Database(format!(
            "PostgreSQL schema name {name:?}: use 1 to 63 letters, digits and '_', not starting \
             with a digit"
        )));
    }
    Ok(format!("\"{name}\""))
}

/// Creates the schema when missing and brings its layout to [`LAYOUT_VERSION`], in one
/// transaction under an advisory lock keyed by the schema's name; then makes it the
/// connection's `search_path`. A layout newer than this build's is refused with nothing changed.
pub(super) fn init(conn: &mut Conn, schema: &str) -> Result<(), StoreError> {
    let ident = schema_ident(schema)?;
    conn.batch("starting the layout transaction", "BEGIN")?;
    let r = migrate(conn, schema, &ident);
    match r {
        Ok(()) => conn.batch("committing the layout", "COMMIT")?,
        Err(e) => {
            let _ = conn.batch("rolling back the layout", "ROLLBACK");
            return Err(e);
        }
    }
    conn.batch(
        "selecting the store's schema",
        &format!("SET search_path TO {ident}"),
    )
}

fn migrate(conn: &mut Conn, schema: &str, ident: &str) -> Result<(), StoreError> {
    let lock_name = format!("devtables layout {schema}");
    conn.execute(
        "waiting for the layout lock",
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&lock_name],
    )?;
    // Created only when missing: CREATE SCHEMA needs the CREATE privilege on the database even
    // with IF NOT EXISTS, which a user given an existing schema need not have.
    let exists = conn
        .query_opt(
            "looking up the store's schema",
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )?
        .is_some();
    if !exists {
        conn.batch(
            "creating the store's schema",
            &format!("CREATE SCHEMA {ident}"),
        )?;
    }
    conn.batch(
        "selecting the store's schema",
        &format!("SET LOCAL search_path TO {ident}"),
    )?;
    conn.batch(
        "creating the meta table",
        "CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL)",
    )?;
    let stored = conn.query_opt(
        "reading the store's layout version",
        "SELECT value FROM meta WHERE key = 'layout_version'",
        &[],
    )?;
    let version: u32 = match stored {
        None => 0,
        Some(row) => {
            let text: String = col(&row, 0)?;
            text.parse().map_err(|_| {
                StoreError::Corrupt(format!("meta.layout_version is {text:?}, not a number"))
            })?
        }
    };
    if version > LAYOUT_VERSION {
        return Err(StoreError::Database(format!(
            "the PostgreSQL schema {schema} has table layout version {version}, newer than the \
             {LAYOUT_VERSION} this build supports: upgrade devtables (or use another schema)"
        )));
    }
    for (from, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        conn.batch(
            &format!(
                "upgrading the store's tables from layout {from} to {}",
                from + 1
            ),
            step,
        )?;
    }
    if version < LAYOUT_VERSION {
        conn.execute(
            "recording the store's layout version",
            "INSERT INTO meta (key, value) VALUES ('layout_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&LAYOUT_VERSION.to_string()],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_schema_names_are_taken() {
        assert_eq!(schema_ident("devtables").unwrap(), "\"devtables\"");
        assert_eq!(schema_ident("dt_test_0a").unwrap(), "\"dt_test_0a\"");
        for bad in ["", "1x", "a-b", "a\"b", "a;b", "é", &"x".repeat(64)] {
            assert!(schema_ident(bad).is_err(), "{bad:?}");
        }
        assert_eq!(MIGRATIONS.len(), LAYOUT_VERSION as usize);
    }
}
