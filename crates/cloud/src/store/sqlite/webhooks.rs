//! The webhooks of the SQLite store: create, list, delete, and record each delivery attempt.
//!
//! It exists so the `webhooks` table is read and written in one place. A webhook's cursor is
//! its delivery queue (the change log after it), so recording an attempt is all the durable
//! state delivery needs: the cursor moves only on a delivery the receiver acknowledged (or past
//! entries its filter leaves out), and never back.

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::super::changes::{NewWebhook, WebhookAttempt, WebhookRecord};
use super::super::StoreError;
use super::api_keys::new_id;
use super::changes::account_head;
use super::sql::{db, sql_int, write_txn};

const WEBHOOK_COLS: &str = "id, account, url, model, secret, created_ms, cursor, last_status, \
    last_error, last_attempt_ms, last_success_ms, failures, failures_total, deliveries, \
    changes_delivered, gaps";

/// Fresh ids tried before giving up (a collision of 64 random bits is not expected at all).
const ID_ATTEMPTS: usize = 4;

fn webhook_row(r: &Row<'_>) -> rusqlite::Result<WebhookRecord> {
    Ok(WebhookRecord {
        id: r.get(0)?,
        account: r.get(1)?,
        url: r.get(2)?,
        model: r.get(3)?,
        secret: r.get(4)?,
        created_ms: r.get(5)?,
        cursor: r.get(6)?,
        last_status: r.get(7)?,
        last_error: r.get(8)?,
        last_attempt_ms: r.get(9)?,
        last_success_ms: r.get(10)?,
        failures: r.get(11)?,
        failures_total: r.get(12)?,
        deliveries: r.get(13)?,
        changes_delivered: r.get(14)?,
        gaps: r.get(15)?,
    })
}

pub(super) fn create_webhook(
    conn: &mut Connection,
    new: &NewWebhook,
    now_ms: u64,
) -> Result<WebhookRecord, StoreError> {
    // The head and the insert in one transaction: no change falls between them.
    let tx = write_txn(conn, "starting to store a webhook")?;
    let cursor = match new.after {
        Some(after) => after,
        None => account_head(&tx, &new.account)?,
    };
    let mut stored = None;
    for _ in 0..ID_ATTEMPTS {
        let id = new_id();
        let n = tx
            .prepare_cached(
                "INSERT INTO webhooks (id, account, url, model, secret, created_ms, cursor)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    new.account,
                    new.url,
                    new.model,
                    new.secret,
                    now_ms,
                    cursor
                ])
            })
            .map_err(db("storing a webhook"))?;
        if n == 1 {
            stored = Some(id);
            break;
        }
    }
    let Some(id) = stored else {
        return Err(StoreError::Database(
            "storing a webhook: no free id after several random tries".into(),
        ));
    };
    let record = webhook(&tx, &id)?.ok_or_else(|| {
        StoreError::Database(format!("the webhook {id} just stored cannot be read"))
    })?;
    tx.commit().map_err(db("committing a webhook"))?;
    Ok(record)
}

pub(super) fn webhooks(
    conn: &Connection,
    account: Option<&str>,
) -> Result<Vec<WebhookRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {WEBHOOK_COLS} FROM webhooks WHERE ?1 IS NULL OR account = ?1
         ORDER BY account, created_ms, id"
    ))
    .and_then(|mut s| s.query_map(params![account], webhook_row)?.collect())
    .map_err(db("listing webhooks"))
}

pub(super) fn webhook(conn: &Connection, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?1"
    ))
    .and_then(|mut s| s.query_row(params![id], webhook_row).optional())
    .map_err(db("reading a webhook"))
}

pub(super) fn delete_webhook(
    conn: &Connection,
    account: &str,
    id: &str,
) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached("DELETE FROM webhooks WHERE account = ?1 AND id = ?2")
        .and_then(|mut s| s.execute(params![account, id]))
        .map_err(db("deleting a webhook"))?;
    Ok(n > 0)
}

pub(super) fn record_attempt(
    conn: &Connection,
    id: &str,
    attempt: &WebhookAttempt,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let n = match attempt {
        WebhookAttempt::Delivered {
            status,
            cursor,
            changes,
            gap,
        } => conn
            .prepare_cached(
                "UPDATE webhooks SET cursor = max(cursor, ?2), last_status = ?3, last_error = NULL,
                    last_attempt_ms = ?4, last_success_ms = ?4, failures = 0,
                    deliveries = deliveries + 1, changes_delivered = changes_delivered + ?5,
                    gaps = gaps + ?6
                 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, cursor, status, now_ms, changes, gap])),
        WebhookAttempt::Failed { status, error } => conn
            .prepare_cached(
                "UPDATE webhooks SET last_status = ?2, last_error = ?3, last_attempt_ms = ?4,
                    failures = failures + 1, failures_total = failures_total + 1
                 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, status, error, now_ms])),
        WebhookAttempt::Skipped { cursor } => conn
            .prepare_cached("UPDATE webhooks SET cursor = max(cursor, ?2) WHERE id = ?1")
            .and_then(|mut s| s.execute(params![id, cursor])),
    }
    .map_err(db("recording a webhook delivery"))?;
    Ok(n > 0)
}

pub(super) fn pending_since(
    conn: &Connection,
    hook: &WebhookRecord,
    scan: usize,
) -> Result<Option<u64>, StoreError> {
    conn.prepare_cached(
        "SELECT at_ms FROM (
            SELECT seq, model, at_ms FROM changes WHERE account = ?1 AND seq > ?2
            ORDER BY seq LIMIT ?3)
         WHERE ?4 IS NULL OR model = ?4 ORDER BY seq LIMIT 1",
    )
    .and_then(|mut s| {
        s.query_row(
            params![hook.account, hook.cursor, sql_int(scan.max(1)), hook.model],
            |r| r.get(0),
        )
        .optional()
    })
    .map_err(db("finding a webhook's oldest pending change"))
}
