//! The per-device quotas of the PostgreSQL store: which pushed put may not be stored, and the
//! trim of a device's conflict log.
//!
//! It exists so the limits of what one device may cost the cloud are decided in one place, inside
//! the push's own transaction (which holds the device's owner lock and row lock), against the
//! usage counts that every row write keeps in that same transaction (`txn::PgTxn::write_row`):
//! a refusal and the rows it protects never disagree, even with other processes writing.

use devtables_sync::identity::DeviceId;
use devtables_sync::wire::{self, Change, Op, Quota, RejectReason};

use super::super::encoding::parse_version;
use super::super::{DeviceQuotas, StoreError};
use super::sql::{col, col_u64, int, Conn};

/// Why `change`, pushed by `from`, may not be stored, if it may not (the same rules as the
/// SQLite store's: deletes and puts that do not grow the usage they would cross are taken, and
/// so is one the stored row beats, which the replication rules answer).
pub(super) fn refusal(
    conn: &mut Conn,
    quotas: &DeviceQuotas,
    from: &DeviceId,
    change: &Change,
) -> Result<Option<RejectReason>, StoreError> {
    let Some(item) = change.item.as_ref().filter(|_| change.op == Op::Put) else {
        return Ok(None);
    };
    let len = wire::item_len(item) as u64;
    if len > quotas.max_item_bytes {
        return Ok(Some(RejectReason::ItemTooLarge {
            max: quotas.max_item_bytes,
        }));
    }
    let row = conn.query_opt(
        "reading the row a put replaces",
        "SELECT version, deleted, item_bytes FROM items
         WHERE account = $1 AND device = $2 AND pk = $3 AND sk = $4",
        &[&from.account, &from.device, &change.key.pk, &change.key.sk],
    )?;
    let (held_rows, held_bytes) = match &row {
        Some(r) => {
            if parse_version(&col::<String>(r, 0)?)? >= change.version {
                return Ok(None);
            }
            if col::<bool>(r, 1)? {
                (0, 0)
            } else {
                (1, col_u64(r, 2)?)
            }
        }
        None => (0, 0),
    };
    let usage = conn.query_opt(
        "reading a device's stored rows and bytes",
        "SELECT rows_stored, bytes_stored FROM devices WHERE account = $1 AND device = $2",
        &[&from.account, &from.device],
    )?;
    // An unregistered sender is refused by the push itself; nothing to count against.
    let Some(usage) = usage else { return Ok(None) };
    let (rows, bytes) = (col_u64(&usage, 0)?, col_u64(&usage, 1)?);
    if held_rows == 0 && rows.saturating_add(1) > quotas.max_rows {
        return Ok(Some(RejectReason::QuotaExceeded {
            what: Quota::Rows,
            limit: quotas.max_rows,
        }));
    }
    if len > held_bytes && bytes.saturating_sub(held_bytes).saturating_add(len) > quotas.max_bytes {
        return Ok(Some(RejectReason::QuotaExceeded {
            what: Quota::Bytes,
            limit: quotas.max_bytes,
        }));
    }
    Ok(None)
}

/// Keeps at most `max` conflict records of `device` (its pushes' conflicts), dropping the oldest;
/// counts what it dropped on the device. Returns how many.
pub(super) fn trim_conflicts(
    conn: &mut Conn,
    device: &DeviceId,
    max: u64,
) -> Result<u64, StoreError> {
    let dropped = conn.execute(
        "trimming a device's conflict log",
        "DELETE FROM conflicts WHERE account = $1 AND device = $2 AND id <= (
            SELECT id FROM conflicts WHERE account = $1 AND device = $2
            ORDER BY id DESC LIMIT 1 OFFSET $3)",
        &[&device.account, &device.device, &int(max)],
    )?;
    if dropped > 0 {
        conn.execute(
            "counting a device's dropped conflicts",
            "UPDATE devices SET conflicts_dropped = conflicts_dropped + $3
             WHERE account = $1 AND device = $2",
            &[&device.account, &device.device, &int(dropped)],
        )?;
    }
    Ok(dropped)
}
