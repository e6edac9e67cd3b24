//! The device registry of the PostgreSQL store: registration, the sync status each device
//! reports, the feed cursor it acknowledged, revocation and secret rotation.
//!
//! It exists so the `devices` table is read and written in one place (its columns are listed
//! once, in [`DEVICE_COLS`] and [`device_row`]).

use devtables_sync::apply::PushCounts;
use devtables_sync::identity::{DeviceId, Owner};
use postgres::Row;

use super::super::{DeviceRecord, StatusUpdate, StoreError, REVOKED_SECRET_HASH};
use super::sql::{col, col_opt_u64, col_u64, int, limit, Conn};
use super::txn::lock_owner;
use super::State;

const DEVICE_COLS: &str = "account, device, secret_hash, registered_ms, online, last_seen_ms, \
    schema_version, cursor_acked, feed_head, pending, last_error, changes_applied, \
    changes_superseded, changes_rejected, broker_hash, rows_stored, bytes_stored, \
    changes_over_quota, messages_rate_limited, pushes_busy, conflicts_dropped";

fn device_row(r: &Row) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        account: col(r, 0)?,
        device: col(r, 1)?,
        secret_hash: col(r, 2)?,
        registered_ms: col_u64(r, 3)?,
        online: col(r, 4)?,
        last_seen_ms: col_opt_u64(r, 5)?,
        schema_version: col(r, 6)?,
        cursor_acked: col_u64(r, 7)?,
        feed_head: col_u64(r, 8)?,
        pending: col_u64(r, 9)?,
        last_error: col(r, 10)?,
        changes_applied: col_u64(r, 11)?,
        changes_superseded: col_u64(r, 12)?,
        changes_rejected: col_u64(r, 13)?,
        broker_hash: col(r, 14)?,
        rows_stored: col_u64(r, 15)?,
        bytes_stored: col_u64(r, 16)?,
        changes_over_quota: col_u64(r, 17)?,
        messages_rate_limited: col_u64(r, 18)?,
        pushes_busy: col_u64(r, 19)?,
        conflicts_dropped: col_u64(r, 20)?,
    })
}

pub(super) fn register_device(
    conn: &mut Conn,
    id: &DeviceId,
    secret_hash: &str,
    broker_hash: Option<&str>,
    now_ms: u64,
) -> Result<(), StoreError> {
    // feed_head = feed_floor = 1: a first read from cursor 0 requires a full resync.
    let n = conn.execute(
        "registering a device",
        "INSERT INTO devices (account, device, secret_hash, broker_hash, registered_ms,
                              feed_head, feed_floor)
         VALUES ($1, $2, $3, $4, $5, 1, 1) ON CONFLICT (account, device) DO NOTHING",
        &[
            &id.account,
            &id.device,
            &secret_hash,
            &broker_hash,
            &int(now_ms),
        ],
    )?;
    if n == 0 {
        return Err(StoreError::DeviceExists(id.to_string()));
    }
    Ok(())
}

pub(super) fn revoke_device(
    conn: &mut Conn,
    state: &State,
    id: &DeviceId,
    delete_items: bool,
) -> Result<bool, StoreError> {
    // The owner's lock first, as every writer of its rows takes it: a push is either applied
    // before the revocation or refused after it.
    lock_owner(conn, &state.lock_prefix, &Owner::Device(id.clone()))?;
    let n = conn.execute(
        "revoking a device",
        "UPDATE devices SET secret_hash = $3, broker_hash = NULL, online = false
         WHERE account = $1 AND device = $2",
        &[&id.account, &id.device, &REVOKED_SECRET_HASH],
    )?;
    if n == 0 {
        return Ok(false);
    }
    if delete_items {
        for table in ["items", "feed", "watermarks"] {
            conn.execute(
                "deleting a revoked device's data",
                &format!("DELETE FROM {table} WHERE account = $1 AND device = $2"),
                &[&id.account, &id.device],
            )?;
        }
        // Its usage goes with its rows.
        conn.execute(
            "clearing a revoked device's usage",
            "UPDATE devices SET rows_stored = 0, bytes_stored = 0
             WHERE account = $1 AND device = $2",
            &[&id.account, &id.device],
        )?;
    }
    Ok(true)
}

pub(super) fn set_device_secret(
    conn: &mut Conn,
    id: &DeviceId,
    secret_hash: &str,
    broker_hash: Option<&str>,
) -> Result<bool, StoreError> {
    let n = conn.execute(
        "replacing a device's secret",
        "UPDATE devices SET secret_hash = $3, broker_hash = $4 WHERE account = $1 AND device = $2",
        &[&id.account, &id.device, &secret_hash, &broker_hash],
    )?;
    Ok(n > 0)
}

pub(super) fn revoked_devices(
    conn: &mut Conn,
    after: Option<&DeviceId>,
    max: usize,
) -> Result<Vec<DeviceId>, StoreError> {
    let (account, device) = after.map_or(("", ""), |a| (a.account.as_str(), a.device.as_str()));
    let rows = conn.query(
        "listing revoked devices",
        "SELECT account, device FROM devices WHERE secret_hash = $1
           AND (account, device) > ($2, $3) ORDER BY account, device LIMIT $4",
        &[&REVOKED_SECRET_HASH, &account, &device, &limit(max)],
    )?;
    rows.iter()
        .map(|r| {
            let (a, d): (String, String) = (col(r, 0)?, col(r, 1)?);
            DeviceId::new(a.as_str(), d.as_str())
                .map_err(|e| StoreError::Corrupt(format!("device {a}/{d}: {e}")))
        })
        .collect()
}

pub(super) fn device(conn: &mut Conn, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
    conn.query_opt(
        "reading a device",
        &format!("SELECT {DEVICE_COLS} FROM devices WHERE account = $1 AND device = $2"),
        &[&id.account, &id.device],
    )?
    .as_ref()
    .map(device_row)
    .transpose()
}

pub(super) fn devices(
    conn: &mut Conn,
    account: Option<&str>,
    after: Option<&DeviceId>,
    max: usize,
) -> Result<Vec<DeviceRecord>, StoreError> {
    let max = limit(max);
    // One SQL text per combination, so each keeps a plan that uses the primary key.
    let rows = match (account, after) {
        (None, None) => conn.query(
            "listing devices",
            &format!("SELECT {DEVICE_COLS} FROM devices ORDER BY account, device LIMIT $1"),
            &[&max],
        )?,
        (Some(a), None) => conn.query(
            "listing devices",
            &format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE account = $1
                 ORDER BY account, device LIMIT $2"
            ),
            &[&a, &max],
        )?,
        (None, Some(after)) => conn.query(
            "listing devices",
            &format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE (account, device) > ($1, $2)
                 ORDER BY account, device LIMIT $3"
            ),
            &[&after.account, &after.device, &max],
        )?,
        (Some(a), Some(after)) => conn.query(
            "listing devices",
            &format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE account = $1
                   AND (account, device) > ($2, $3)
                 ORDER BY account, device LIMIT $4"
            ),
            &[&a, &after.account, &after.device, &max],
        )?,
    };
    rows.iter().map(device_row).collect()
}

pub(super) fn update_status(
    conn: &mut Conn,
    id: &DeviceId,
    update: &StatusUpdate,
) -> Result<(), StoreError> {
    let (set_error, error) = match &update.last_error {
        Some(e) => (true, e.as_deref()),
        None => (false, None),
    };
    let n = conn.execute(
        "updating a device's status",
        "UPDATE devices SET
            online = coalesce($3, online),
            last_seen_ms = coalesce($4, last_seen_ms),
            schema_version = coalesce($5, schema_version),
            cursor_acked = coalesce($6, cursor_acked),
            pending = coalesce($7, pending),
            last_error = CASE WHEN $8 THEN $9 ELSE last_error END
         WHERE account = $1 AND device = $2",
        &[
            &id.account,
            &id.device,
            &update.online,
            &update.last_seen_ms.map(int),
            &update.schema_version,
            &update.cursor_acked.map(int),
            &update.pending.map(int),
            &set_error,
            &error,
        ],
    )?;
    if n == 0 {
        return Err(StoreError::UnknownDevice(id.to_string()));
    }
    Ok(())
}

pub(super) fn reset_online(conn: &mut Conn) -> Result<(), StoreError> {
    conn.execute(
        "marking every device offline",
        "UPDATE devices SET online = false WHERE online",
        &[],
    )?;
    Ok(())
}

pub(super) fn mark_offline_unseen(
    conn: &mut Conn,
    ids: &[DeviceId],
    since_ms: u64,
) -> Result<u64, StoreError> {
    let mut marked = 0;
    for id in ids {
        marked += conn.execute(
            "marking unseen devices offline",
            "UPDATE devices SET online = false
             WHERE account = $1 AND device = $2 AND online
               AND (last_seen_ms IS NULL OR last_seen_ms < $3)",
            &[&id.account, &id.device, &int(since_ms)],
        )?;
    }
    Ok(marked)
}

pub(super) fn ack_cursor(
    conn: &mut Conn,
    device: &DeviceId,
    cursor: u64,
) -> Result<(), StoreError> {
    // A cursor beyond the head is not one this feed issued (a cloud restored from a backup, or
    // a hostile device): it is not recorded, so the device still counts as behind until it
    // acknowledges a real one.
    let n = conn.execute(
        "recording an acknowledged cursor",
        "UPDATE devices SET cursor_acked = CASE WHEN $3 <= feed_head
             THEN greatest(cursor_acked, $3) ELSE cursor_acked END
         WHERE account = $1 AND device = $2",
        &[&device.account, &device.device, &int(cursor)],
    )?;
    if n == 0 {
        return Err(StoreError::UnknownDevice(device.to_string()));
    }
    Ok(())
}

pub(super) fn count_throttled(
    conn: &mut Conn,
    device: &DeviceId,
    rate_limited: u64,
    busy: u64,
) -> Result<(), StoreError> {
    let n = conn.execute(
        "counting a device's refused messages",
        "UPDATE devices SET messages_rate_limited = messages_rate_limited + $3,
            pushes_busy = pushes_busy + $4
         WHERE account = $1 AND device = $2",
        &[
            &device.account,
            &device.device,
            &int(rate_limited),
            &int(busy),
        ],
    )?;
    if n == 0 {
        return Err(StoreError::UnknownDevice(device.to_string()));
    }
    Ok(())
}

/// The device's push counters, duplicates included.
pub(super) fn push_counts(conn: &mut Conn, id: &DeviceId) -> Result<PushCounts, StoreError> {
    let row = conn
        .query_opt(
            "reading a device's push counters",
            "SELECT changes_applied, changes_duplicate, changes_superseded, changes_rejected
             FROM devices WHERE account = $1 AND device = $2",
            &[&id.account, &id.device],
        )?
        .ok_or_else(|| StoreError::UnknownDevice(id.to_string()))?;
    Ok(PushCounts {
        applied: col_u64(&row, 0)?,
        duplicates: col_u64(&row, 1)?,
        superseded: col_u64(&row, 2)?,
        rejected: col_u64(&row, 3)?,
    })
}
