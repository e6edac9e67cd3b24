//! The device registry of the SQLite store: registration, the sync status each device reports,
//! and the feed cursor it acknowledged. Each device's secret is held as two hashes: the one the
//! embedded broker and the store check (`secret_hash`), and Mosquitto's form of it
//! (`broker_hash`, NULL for a device registered before layout 4 or revoked), which
//! `devtables broker-config mosquitto` exports.
//!
//! It exists so the `devices` table is read and written in one place (its columns are listed
//! once, in [`DEVICE_COLS`] and [`device_row`]).

use devtables_sync::apply::PushCounts;
use devtables_sync::identity::DeviceId;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::super::{DeviceRecord, StatusUpdate, StoreError, REVOKED_SECRET_HASH};
use super::sql::{db, sql_int, write_txn};

const DEVICE_COLS: &str =
    "account, device, secret_hash, registered_ms, online, last_seen_ms, schema_version, \
                           cursor_acked, feed_head, pending, last_error, changes_applied, \
                           changes_superseded, changes_rejected, broker_hash, rows_stored, \
                           bytes_stored, changes_over_quota, messages_rate_limited, pushes_busy, \
                           conflicts_dropped";

fn device_row(r: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        account: r.get(0)?,
        device: r.get(1)?,
        secret_hash: r.get(2)?,
        registered_ms: r.get(3)?,
        online: r.get::<_, i64>(4)? != 0,
        last_seen_ms: r.get(5)?,
        schema_version: r.get(6)?,
        cursor_acked: r.get(7)?,
        feed_head: r.get(8)?,
        pending: r.get(9)?,
        last_error: r.get(10)?,
        changes_applied: r.get(11)?,
        changes_superseded: r.get(12)?,
        changes_rejected: r.get(13)?,
        broker_hash: r.get(14)?,
        rows_stored: r.get(15)?,
        bytes_stored: r.get(16)?,
        changes_over_quota: r.get(17)?,
        messages_rate_limited: r.get(18)?,
        pushes_busy: r.get(19)?,
        conflicts_dropped: r.get(20)?,
    })
}

pub(super) fn device_exists(conn: &Connection, id: &DeviceId) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM devices WHERE account = ?1 AND device = ?2")
        .and_then(|mut s| s.exists(params![id.account, id.device]))
        .map_err(db("looking up a device"))
}

pub(super) fn register_device(
    conn: &Connection,
    id: &DeviceId,
    secret_hash: &str,
    broker_hash: Option<&str>,
    now_ms: u64,
) -> Result<(), StoreError> {
    // feed_head = feed_floor = 1: a first read from cursor 0 requires a full resync.
    let n = conn
        .prepare_cached(
            "INSERT INTO devices (account, device, secret_hash, broker_hash, registered_ms,
                                  feed_head, feed_floor)
             VALUES (?1, ?2, ?3, ?4, ?5, 1, 1) ON CONFLICT (account, device) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                id.account,
                id.device,
                secret_hash,
                broker_hash,
                now_ms
            ])
        })
        .map_err(db("registering a device"))?;
    if n == 0 {
        return Err(StoreError::DeviceExists(id.to_string()));
    }
    Ok(())
}

pub(super) fn revoke_device(
    conn: &mut Connection,
    id: &DeviceId,
    delete_items: bool,
) -> Result<bool, StoreError> {
    // Immediate: the revocation and a concurrent push (this process or another on the same file)
    // are ordered by SQLite's write lock, so a push is either applied before it or refused after.
    let tx = write_txn(conn, "starting a revocation")?;
    let n = tx
        .execute(
            "UPDATE devices SET secret_hash = ?3, broker_hash = NULL, online = 0
             WHERE account = ?1 AND device = ?2",
            params![id.account, id.device, REVOKED_SECRET_HASH],
        )
        .map_err(db("revoking a device"))?;
    if n == 0 {
        return Ok(false);
    }
    if delete_items {
        for table in ["items", "feed", "watermarks"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE account = ?1 AND device = ?2"),
                params![id.account, id.device],
            )
            .map_err(db("deleting a revoked device's data"))?;
        }
        // Its usage goes with its rows.
        tx.execute(
            "UPDATE devices SET rows_stored = 0, bytes_stored = 0 WHERE account = ?1 AND device = ?2",
            params![id.account, id.device],
        )
        .map_err(db("clearing a revoked device's usage"))?;
    }
    tx.commit().map_err(db("committing a revocation"))?;
    Ok(true)
}

pub(super) fn set_device_secret(
    conn: &Connection,
    id: &DeviceId,
    secret_hash: &str,
    broker_hash: Option<&str>,
) -> Result<bool, StoreError> {
    let n = conn
        .execute(
            "UPDATE devices SET secret_hash = ?3, broker_hash = ?4 WHERE account = ?1 AND device = ?2",
            params![id.account, id.device, secret_hash, broker_hash],
        )
        .map_err(db("replacing a device's secret"))?;
    Ok(n > 0)
}

pub(super) fn revoked_devices(
    conn: &Connection,
    after: Option<&DeviceId>,
    limit: usize,
) -> Result<Vec<DeviceId>, StoreError> {
    let (account, device) = after.map_or(("", ""), |a| (a.account.as_str(), a.device.as_str()));
    let rows: Vec<(String, String)> = conn
        .prepare_cached(
            "SELECT account, device FROM devices WHERE secret_hash = ?1
               AND (account, device) > (?2, ?3) ORDER BY account, device LIMIT ?4",
        )
        .and_then(|mut s| {
            s.query_map(
                params![REVOKED_SECRET_HASH, account, device, sql_int(limit)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect()
        })
        .map_err(db("listing revoked devices"))?;
    rows.into_iter()
        .map(|(a, d)| {
            DeviceId::new(a.as_str(), d.as_str())
                .map_err(|e| StoreError::Corrupt(format!("device {a}/{d}: {e}")))
        })
        .collect()
}

/// Whether the device is revoked (a push from it must not be applied).
pub(super) fn device_revoked(conn: &Connection, id: &DeviceId) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT 1 FROM devices WHERE account = ?1 AND device = ?2 AND secret_hash = ?3",
    )
    .and_then(|mut s| s.exists(params![id.account, id.device, REVOKED_SECRET_HASH]))
    .map_err(db("checking whether a device is revoked"))
}

pub(super) fn device(conn: &Connection, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLS} FROM devices WHERE account = ?1 AND device = ?2"
    ))
    .and_then(|mut s| {
        s.query_row(params![id.account, id.device], device_row)
            .optional()
    })
    .map_err(db("reading a device"))
}

pub(super) fn devices(
    conn: &Connection,
    account: Option<&str>,
    after: Option<&DeviceId>,
    limit: usize,
) -> Result<Vec<DeviceRecord>, StoreError> {
    let mut sql = format!("SELECT {DEVICE_COLS} FROM devices WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    if let Some(a) = account {
        sql.push_str(" AND account = ?");
        args.push(Value::Text(a.to_string()));
    }
    if let Some(after) = after {
        sql.push_str(" AND (account, device) > (?, ?)");
        args.push(Value::Text(after.account.clone()));
        args.push(Value::Text(after.device.clone()));
    }
    sql.push_str(" ORDER BY account, device LIMIT ?");
    args.push(Value::Integer(sql_int(limit)));
    conn.prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(params_from_iter(args.iter()), device_row)?
                .collect()
        })
        .map_err(db("listing devices"))
}

pub(super) fn update_status(
    conn: &Connection,
    id: &DeviceId,
    update: &StatusUpdate,
) -> Result<(), StoreError> {
    let (set_error, error) = match &update.last_error {
        Some(e) => (true, e.as_deref()),
        None => (false, None),
    };
    let n = conn
        .prepare_cached(
            "UPDATE devices SET
                online = coalesce(?3, online),
                last_seen_ms = coalesce(?4, last_seen_ms),
                schema_version = coalesce(?5, schema_version),
                cursor_acked = coalesce(?6, cursor_acked),
                pending = coalesce(?7, pending),
                last_error = CASE WHEN ?8 THEN ?9 ELSE last_error END
             WHERE account = ?1 AND device = ?2",
        )
        .and_then(|mut s| {
            s.execute(params![
                id.account,
                id.device,
                update.online,
                update.last_seen_ms,
                update.schema_version,
                update.cursor_acked,
                update.pending,
                set_error,
                error
            ])
        })
        .map_err(db("updating a device's status"))?;
    if n == 0 {
        return Err(StoreError::UnknownDevice(id.to_string()));
    }
    Ok(())
}

pub(super) fn reset_online(conn: &Connection) -> Result<(), StoreError> {
    conn.execute("UPDATE devices SET online = 0 WHERE online <> 0", [])
        .map_err(db("marking every device offline"))?;
    Ok(())
}

pub(super) fn mark_offline_unseen(
    conn: &mut Connection,
    ids: &[DeviceId],
    since_ms: u64,
) -> Result<u64, StoreError> {
    let tx = write_txn(conn, "starting to mark unseen devices offline")?;
    let mut marked = 0;
    {
        let mut update = tx
            .prepare_cached(
                "UPDATE devices SET online = 0
                 WHERE account = ?1 AND device = ?2 AND online <> 0
                   AND (last_seen_ms IS NULL OR last_seen_ms < ?3)",
            )
            .map_err(db("marking unseen devices offline"))?;
        for id in ids {
            marked += update
                .execute(params![
                    id.account,
                    id.device,
                    i64::try_from(since_ms).unwrap_or(i64::MAX)
                ])
                .map_err(db("marking unseen devices offline"))? as u64;
        }
    }
    tx.commit()
        .map_err(db("committing unseen devices marked offline"))?;
    Ok(marked)
}

pub(super) fn ack_cursor(
    conn: &Connection,
    device: &DeviceId,
    cursor: u64,
) -> Result<(), StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE devices SET cursor_acked = CASE WHEN ?3 <= feed_head
                 THEN max(cursor_acked, ?3) ELSE cursor_acked END
             WHERE account = ?1 AND device = ?2",
        )
        // A cursor beyond the head is not one this feed issued (a cloud restored from a backup,
        // or a hostile device): it is not recorded, so the device still counts as behind until
        // it acknowledges a real one (and is prompted after a restart).
        .and_then(|mut s| {
            s.execute(params![
                device.account,
                device.device,
                i64::try_from(cursor).unwrap_or(i64::MAX)
            ])
        })
        .map_err(db("recording an acknowledged cursor"))?;
    if n == 0 {
        return Err(StoreError::UnknownDevice(device.to_string()));
    }
    Ok(())
}

pub(super) fn count_throttled(
    conn: &Connection,
    device: &DeviceId,
    rate_limited: u64,
    busy: u64,
) -> Result<(), StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE devices SET messages_rate_limited = messages_rate_limited + ?3,
                pushes_busy = pushes_busy + ?4
             WHERE account = ?1 AND device = ?2",
        )
        .and_then(|mut s| {
            s.execute(params![
                device.account,
                device.device,
                i64::try_from(rate_limited).unwrap_or(i64::MAX),
                i64::try_from(busy).unwrap_or(i64::MAX)
            ])
        })
        .map_err(db("counting a device's refused messages"))?;
    if n == 0 {
        return Err(StoreError::UnknownDevice(device.to_string()));
    }
    Ok(())
}

/// The device's push counters, duplicates included.
pub(super) fn push_counts(conn: &Connection, id: &DeviceId) -> Result<PushCounts, StoreError> {
    conn.prepare_cached(
        "SELECT changes_applied, changes_duplicate, changes_superseded, changes_rejected
         FROM devices WHERE account = ?1 AND device = ?2",
    )
    .and_then(|mut s| {
        s.query_row(params![id.account, id.device], |r| {
            Ok(PushCounts {
                applied: r.get(0)?,
                duplicates: r.get(1)?,
                superseded: r.get(2)?,
                rejected: r.get(3)?,
            })
        })
        .optional()
    })
    .map_err(db("reading a device's push counters"))?
    .ok_or_else(|| StoreError::UnknownDevice(id.to_string()))
}

/// What a device stores now: (live rows, bytes of their JSON); `None` if it is not registered.
pub(super) fn usage(conn: &Connection, id: &DeviceId) -> Result<Option<(u64, u64)>, StoreError> {
    conn.prepare_cached(
        "SELECT rows_stored, bytes_stored FROM devices WHERE account = ?1 AND device = ?2",
    )
    .and_then(|mut s| {
        s.query_row(params![id.account, id.device], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
    })
    .map_err(db("reading a device's stored rows and bytes"))
}
