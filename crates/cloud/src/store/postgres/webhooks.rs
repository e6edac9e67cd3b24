//! The webhooks of the PostgreSQL store: create, list, delete, and record each delivery attempt.
//!
//! It exists so the `webhooks` table is read and written in one place. A webhook's cursor is
//! its delivery queue (the change log after it), so recording an attempt is all the durable
//! state delivery needs: the cursor moves only on a delivery the receiver acknowledged (or past
//! entries its filter leaves out), and never back.

use postgres::Row;

use super::super::changes::{NewWebhook, WebhookAttempt, WebhookRecord};
use super::super::StoreError;
use super::api_keys::new_id;
use super::changes::account_head;
use super::sql::{col, col_opt_u64, col_u64, int, limit, Conn};

const WEBHOOK_COLS: &str = "id, account, url, model, secret, created_ms, cursor, last_status, \
    last_error, last_attempt_ms, last_success_ms, failures, failures_total, deliveries, \
    changes_delivered, gaps";

/// Fresh ids tried before giving up (a collision of 64 random bits is not expected at all).
const ID_ATTEMPTS: usize = 4;

fn webhook_row(r: &Row) -> Result<WebhookRecord, StoreError> {
    let status: Option<i32> = col(r, 7)?;
    Ok(WebhookRecord {
        id: col(r, 0)?,
        account: col(r, 1)?,
        url: col(r, 2)?,
        model: col(r, 3)?,
        secret: col(r, 4)?,
        created_ms: col_u64(r, 5)?,
        cursor: col_u64(r, 6)?,
        last_status: status
            .map(|s| {
                u16::try_from(s)
                    .map_err(|_| StoreError::Corrupt(format!("webhook last_status {s}")))
            })
            .transpose()?,
        last_error: col(r, 8)?,
        last_attempt_ms: col_opt_u64(r, 9)?,
        last_success_ms: col_opt_u64(r, 10)?,
        failures: col_u64(r, 11)?,
        failures_total: col_u64(r, 12)?,
        deliveries: col_u64(r, 13)?,
        changes_delivered: col_u64(r, 14)?,
        gaps: col_u64(r, 15)?,
    })
}

pub(super) fn create_webhook(
    conn: &mut Conn,
    new: &NewWebhook,
    now_ms: u64,
) -> Result<WebhookRecord, StoreError> {
    // A change committed between the head's read and the insert has a higher sequence number
    // than that head: it is delivered, never skipped.
    let cursor = match new.after {
        Some(after) => after,
        None => account_head(conn, &new.account)?,
    };
    for _ in 0..ID_ATTEMPTS {
        let id = new_id();
        let row = conn.query_opt(
            "storing a webhook",
            &format!(
                "INSERT INTO webhooks (id, account, url, model, secret, created_ms, cursor)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING
                 RETURNING {WEBHOOK_COLS}"
            ),
            &[
                &id,
                &new.account,
                &new.url,
                &new.model,
                &new.secret,
                &int(now_ms),
                &int(cursor),
            ],
        )?;
        if let Some(row) = row {
            return webhook_row(&row);
        }
    }
    Err(StoreError::Database(
        "storing a webhook: no free id after several random tries".into(),
    ))
}

pub(super) fn webhooks(
    conn: &mut Conn,
    account: Option<&str>,
) -> Result<Vec<WebhookRecord>, StoreError> {
    conn.query(
        "listing webhooks",
        &format!(
            "SELECT {WEBHOOK_COLS} FROM webhooks WHERE $1::text IS NULL OR account = $1
             ORDER BY account, created_ms, id"
        ),
        &[&account],
    )?
    .iter()
    .map(webhook_row)
    .collect()
}

pub(super) fn webhook(conn: &mut Conn, id: &str) -> Result<Option<WebhookRecord>, StoreError> {
    conn.query_opt(
        "reading a webhook",
        &format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = $1"),
        &[&id],
    )?
    .as_ref()
    .map(webhook_row)
    .transpose()
}

pub(super) fn delete_webhook(conn: &mut Conn, account: &str, id: &str) -> Result<bool, StoreError> {
    let n = conn.execute(
        "deleting a webhook",
        "DELETE FROM webhooks WHERE account = $1 AND id = $2",
        &[&account, &id],
    )?;
    Ok(n > 0)
}

pub(super) fn record_attempt(
    conn: &mut Conn,
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
        } => conn.execute(
            "recording a webhook delivery",
            "UPDATE webhooks SET cursor = greatest(cursor, $2), last_status = $3,
                last_error = NULL, last_attempt_ms = $4, last_success_ms = $4, failures = 0,
                deliveries = deliveries + 1, changes_delivered = changes_delivered + $5,
                gaps = gaps + $6
             WHERE id = $1",
            &[
                &id,
                &int(*cursor),
                &i32::from(*status),
                &int(now_ms),
                &int(*changes),
                &i64::from(*gap),
            ],
        )?,
        WebhookAttempt::Failed { status, error } => conn.execute(
            "recording a failed webhook delivery",
            "UPDATE webhooks SET last_status = $2, last_error = $3, last_attempt_ms = $4,
                failures = failures + 1, failures_total = failures_total + 1
             WHERE id = $1",
            &[&id, &status.map(i32::from), &error, &int(now_ms)],
        )?,
        WebhookAttempt::Skipped { cursor } => conn.execute(
            "moving a webhook's cursor",
            "UPDATE webhooks SET cursor = greatest(cursor, $2) WHERE id = $1",
            &[&id, &int(*cursor)],
        )?,
    };
    Ok(n > 0)
}

pub(super) fn pending_since(
    conn: &mut Conn,
    hook: &WebhookRecord,
    scan: usize,
) -> Result<Option<u64>, StoreError> {
    let row = conn.query_opt(
        "finding a webhook's oldest pending change",
        "SELECT at_ms FROM (
            SELECT seq, model, at_ms FROM changes WHERE account = $1 AND seq > $2
            ORDER BY seq LIMIT $3) AS scanned
         WHERE $4::text IS NULL OR model = $4 ORDER BY seq LIMIT 1",
        &[
            &hook.account,
            &int(hook.cursor),
            &limit(scan.max(1)),
            &hook.model,
        ],
    )?;
    row.map(|r| col_u64(&r, 0)).transpose()
}
