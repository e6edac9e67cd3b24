//! What the PostgreSQL store sends down to devices: a page of a device's change feed, and a
//! page of the full snapshot a resync walks.
//!
//! It exists because both reads turn stored rows into the changes a device applies
//! ([`row_change`]), and both must report an unreadable row instead of stalling on it. Both read
//! the device's head first and bound what they read by it: in the operation's REPEATABLE READ
//! snapshot that changes nothing, and inside a group (READ COMMITTED, a snapshot per statement)
//! it keeps the page from holding entries the head does not cover; an entry the head covers
//! that a concurrent write moved (a key's entry is replaced by a newer one) is found after the
//! head by the next read.

use devtables_schema::{ItemKey, Schema};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage, UnreadableRow};
use devtables_sync::identity::DeviceId;
use devtables_sync::wire::{Change, Op};

use super::super::encoding::{parse_generations, parse_version, snapshot_next};
use super::super::StoreError;
use super::sql::{col, col_u64, int, json_item, limit, Conn};

/// The change a feed or snapshot delivers for a row in its current state.
fn row_change(
    model: String,
    pk: String,
    sk: String,
    item: Option<serde_json::Value>,
    version: &str,
    deleted: bool,
) -> Result<Change, StoreError> {
    let version = parse_version(version)?;
    let (op, item) = if deleted {
        (Op::Delete, None)
    } else {
        let Some(value) = item else {
            return Err(StoreError::Corrupt(format!(
                "live item {model} ({pk}, {sk}) has no JSON"
            )));
        };
        (Op::Put, Some(json_item(value)?))
    };
    Ok(Change {
        model,
        key: ItemKey { pk, sk },
        op,
        item,
        version,
        base: None,
    })
}

/// A page of `device`'s feed after cursor `after` (see `CloudStore::read_feed`).
pub(super) fn read_feed(
    conn: &mut Conn,
    device: &DeviceId,
    after: u64,
    max: usize,
) -> Result<FeedPage, StoreError> {
    let state = conn.query_opt(
        "reading a device's feed head",
        "SELECT feed_head, feed_floor, feed_generations, changes_answered FROM devices
         WHERE account = $1 AND device = $2",
        &[&device.account, &device.device],
    )?;
    let Some(state) = state else {
        return Err(StoreError::UnknownDevice(device.to_string()));
    };
    let head = col_u64(&state, 0)?;
    let floor = col_u64(&state, 1)?;
    let generations = parse_generations(&col::<String>(&state, 2)?)?;
    let answered = col_u64(&state, 3)?;
    // Below the purged floor, or beyond the head (the device holds entries this database
    // never had: it was restored from a backup, or the cursor is hostile): only a full resync
    // brings the device back in step.
    if after < floor || after > head {
        return Ok(FeedPage {
            after,
            changes: Vec::new(),
            head,
            resync_required: true,
            unreadable: Vec::new(),
            generations,
            answered,
        });
    }
    let mut changes = Vec::new();
    let mut unreadable = Vec::new();
    let mut from = after;
    // A short page tells the engine the feed is exhausted, so entries whose item row vanished
    // (only possible through manual SQL) are skipped without shortening the page.
    while changes.len() + unreadable.len() < max {
        let want = max - changes.len() - unreadable.len();
        let rows = conn.query(
            "reading a device feed",
            "SELECT f.seq, i.model, f.pk, f.sk, i.item, i.version, i.deleted
             FROM feed f LEFT JOIN items i
               ON i.account = f.account AND i.device = f.owner AND i.pk = f.pk AND i.sk = f.sk
             WHERE f.account = $1 AND f.device = $2 AND f.seq > $3 AND f.seq <= $4
             ORDER BY f.seq LIMIT $5",
            &[
                &device.account,
                &device.device,
                &int(from),
                &int(head),
                &limit(want),
            ],
        )?;
        let fetched = rows.len();
        for row in rows {
            let seq = col_u64(&row, 0)?;
            from = seq;
            let pk: String = col(&row, 2)?;
            let sk: String = col(&row, 3)?;
            let model: Option<String> = col(&row, 1)?;
            let Some(model) = model else {
                tracing::warn!(%device, seq, %pk, %sk, "feed entry without an item row: skipped");
                continue;
            };
            // A row that cannot be decoded is reported and skipped: it must never stall the
            // device's feed.
            let decoded = (|| {
                let item: Option<serde_json::Value> = col(&row, 4)?;
                let version: String = col(&row, 5)?;
                let deleted: bool = col(&row, 6)?;
                row_change(
                    model.clone(),
                    pk.clone(),
                    sk.clone(),
                    item,
                    &version,
                    deleted,
                )
            })();
            match decoded {
                Ok(change) => changes.push((seq, change)),
                Err(e) => {
                    tracing::warn!(%device, seq, %model, %pk, %sk, "unreadable feed row skipped: {e}");
                    unreadable.push(UnreadableRow {
                        cursor: seq,
                        model,
                        key: ItemKey { pk, sk },
                        reason: e.to_string(),
                    });
                }
            }
        }
        if fetched < want {
            break;
        }
    }
    Ok(FeedPage {
        after,
        changes,
        head,
        resync_required: false,
        unreadable,
        generations,
        answered,
    })
}

/// A page of the items a resync of `device` delivers (see `CloudStore::read_snapshot`).
pub(super) fn read_snapshot(
    conn: &mut Conn,
    schema: &Schema,
    device: &DeviceId,
    resync: u64,
    from: Option<&SnapshotCursor>,
    max: usize,
) -> Result<SnapshotPage, StoreError> {
    let max = max.max(1);
    let state = conn.query_opt(
        "reading a device's feed head",
        "SELECT feed_head, feed_gen FROM devices WHERE account = $1 AND device = $2",
        &[&device.account, &device.device],
    )?;
    let Some(state) = state else {
        return Err(StoreError::UnknownDevice(device.to_string()));
    };
    let head = col_u64(&state, 0)?;
    let gen: String = col(&state, 1)?;
    let gen: u64 = gen
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("devices.feed_gen {gen:?}")))?;
    // Models in name order (byte order, as `COLLATE "C"` compares); each is owned either by
    // the device or, when broadcast, by the account.
    let mut models: Vec<(&str, bool)> = schema
        .models()
        .filter(|m| m.process().syncs_down())
        .map(|m| (m.name(), m.process().broadcast))
        .collect();
    models.sort_unstable();
    // One item more than the page, to know whether another page follows.
    let mut items: Vec<Change> = Vec::new();
    let mut unreadable = Vec::new();
    for (model, broadcast) in models {
        let owner = if broadcast {
            ""
        } else {
            device.device.as_str()
        };
        let after_key = match from {
            Some(f) if model < f.model.as_str() => continue,
            Some(f) if model == f.model => Some(&f.key),
            _ => None,
        };
        let want = limit(max + 1 - items.len());
        let rows = match after_key {
            Some(k) => conn.query(
                "reading a snapshot page",
                "SELECT pk, sk, item, version FROM items
                 WHERE account = $1 AND model = $2 AND device = $3 AND NOT deleted
                   AND (pk, sk) > ($4, $5)
                 ORDER BY pk, sk LIMIT $6",
                &[&device.account, &model, &owner, &k.pk, &k.sk, &want],
            )?,
            None => conn.query(
                "reading a snapshot page",
                "SELECT pk, sk, item, version FROM items
                 WHERE account = $1 AND model = $2 AND device = $3 AND NOT deleted
                 ORDER BY pk, sk LIMIT $4",
                &[&device.account, &model, &owner, &want],
            )?,
        };
        for row in rows {
            let pk: String = col(&row, 0)?;
            let sk: String = col(&row, 1)?;
            let decoded = (|| {
                let item: Option<serde_json::Value> = col(&row, 2)?;
                let version: String = col(&row, 3)?;
                row_change(
                    model.to_string(),
                    pk.clone(),
                    sk.clone(),
                    item,
                    &version,
                    false,
                )
            })();
            match decoded {
                Ok(change) => items.push(change),
                Err(e) => {
                    tracing::warn!(%device, %model, %pk, %sk, "unreadable row skipped in a resync: {e}");
                    unreadable.push(UnreadableRow {
                        cursor: 0,
                        model: model.to_string(),
                        key: ItemKey { pk, sk },
                        reason: e.to_string(),
                    });
                }
            }
        }
        if items.len() > max {
            break;
        }
    }
    let next = snapshot_next(&mut items, max);
    Ok(SnapshotPage {
        resync,
        items,
        next,
        cursor: head,
        unreadable,
        gen,
    })
}
