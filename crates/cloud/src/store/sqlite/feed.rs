//! What the SQLite store sends down to devices: a page of a device's change feed, and a page
//! of the full snapshot a resync walks.
//!
//! It exists because both reads turn stored rows into the changes a device applies
//! ([`row_change`]), and both must report an unreadable row instead of stalling on it.

use devtables_schema::{ItemKey, Schema};
use devtables_sync::cloud::{FeedPage, SnapshotCursor, SnapshotPage, UnreadableRow};
use devtables_sync::identity::DeviceId;
use devtables_sync::wire::{Change, Op};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::super::StoreError;
use super::sql::{db, parse_item, parse_version, read_txn, sql_int};
pub(super) use crate::store::encoding::oldest_generations_dropped;
use crate::store::encoding::{parse_generations, snapshot_next};

/// The change a feed or snapshot delivers for a row in its current state.
fn row_change(
    model: String,
    pk: String,
    sk: String,
    item: Option<String>,
    version: &str,
    deleted: bool,
) -> Result<Change, StoreError> {
    let version = parse_version(version)?;
    let (op, item) = if deleted {
        (Op::Delete, None)
    } else {
        let Some(text) = item else {
            return Err(StoreError::Corrupt(format!(
                "live item {model} ({pk}, {sk}) has no JSON"
            )));
        };
        (Op::Put, Some(parse_item(&text)?))
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

/// A page of `device`'s feed after cursor `after` (see [`CloudStore::read_feed`]).
///
/// [`CloudStore::read_feed`]: super::super::CloudStore::read_feed
pub(super) fn read_feed(
    conn: &mut Connection,
    device: &DeviceId,
    after: u64,
    limit: usize,
) -> Result<FeedPage, StoreError> {
    // One read transaction: the head and the entries come from the same snapshot, so every
    // entry up to the head is either returned or after the page.
    let tx = read_txn(conn, "starting a feed read")?;
    let state: Option<(u64, u64, String, u64)> = tx
        .prepare_cached(
            "SELECT feed_head, feed_floor, feed_generations, changes_answered FROM devices
             WHERE account = ?1 AND device = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![device.account, device.device], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
        })
        .map_err(db("reading a device's feed head"))?;
    let Some((head, floor, generations, answered)) = state else {
        return Err(StoreError::UnknownDevice(device.to_string()));
    };
    let generations = parse_generations(&generations)?;
    // Below the purged floor, or beyond the head (the device holds entries this database
    // never had: it was restored from a backup, or the cursor is hostile): only a full
    // resync brings the device back in step.
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
    type FeedRow = (
        u64,
        Option<String>,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<bool>,
    );
    let mut changes = Vec::new();
    let mut unreadable = Vec::new();
    let mut from = after;
    // A short page tells the engine the feed is exhausted, so entries whose item row
    // vanished (only possible through manual SQL) are skipped without shortening the page.
    while changes.len() + unreadable.len() < limit {
        let want = limit - changes.len() - unreadable.len();
        let rows: Vec<FeedRow> = tx
            .prepare_cached(
                "SELECT f.seq, i.model, f.pk, f.sk, i.item, i.version, i.deleted
                 FROM feed f LEFT JOIN items i
                   ON i.account = f.account AND i.device = f.owner AND i.pk = f.pk AND i.sk = f.sk
                 WHERE f.account = ?1 AND f.device = ?2 AND f.seq > ?3
                 ORDER BY f.seq LIMIT ?4",
            )
            .and_then(|mut s| {
                s.query_map(
                    params![device.account, device.device, from, sql_int(want)],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                        ))
                    },
                )?
                .collect()
            })
            .map_err(db("reading a device feed"))?;
        let fetched = rows.len();
        for (seq, model, pk, sk, item, version, deleted) in rows {
            from = seq;
            let (Some(model), Some(version), Some(deleted)) = (model, version, deleted) else {
                tracing::warn!(%device, seq, %pk, %sk, "feed entry without an item row: skipped");
                continue;
            };
            // A row that cannot be decoded is reported and skipped: it must never stall
            // the device's feed.
            match row_change(
                model.clone(),
                pk.clone(),
                sk.clone(),
                item,
                &version,
                deleted,
            ) {
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

/// A page of the items a resync of `device` delivers (see [`CloudStore::read_snapshot`]).
///
/// [`CloudStore::read_snapshot`]: super::super::CloudStore::read_snapshot
pub(super) fn read_snapshot(
    conn: &mut Connection,
    schema: &Schema,
    device: &DeviceId,
    resync: u64,
    from: Option<&SnapshotCursor>,
    limit: usize,
) -> Result<SnapshotPage, StoreError> {
    let limit = limit.max(1);
    let tx = read_txn(conn, "starting a snapshot read")?;
    let state: Option<(u64, String)> = tx
        .prepare_cached(
            "SELECT feed_head, feed_gen FROM devices WHERE account = ?1 AND device = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![device.account, device.device], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
        })
        .map_err(db("reading a device's feed head"))?;
    let Some((head, gen)) = state else {
        return Err(StoreError::UnknownDevice(device.to_string()));
    };
    let gen: u64 = gen
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("devices.feed_gen {gen:?}")))?;
    // Models in name order (byte order, as SQLite compares text); each is owned either by the
    // device or, when broadcast, by the account.
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
        let want = sql_int(limit + 1 - items.len());
        type SnapRow = (String, String, Option<String>, String);
        let map = |r: &Row<'_>| -> rusqlite::Result<SnapRow> {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        };
        let rows: Vec<SnapRow> = match after_key {
            Some(k) => tx
                .prepare_cached(
                    "SELECT pk, sk, item, version FROM items INDEXED BY items_by_model
                     WHERE account = ?1 AND model = ?2 AND device = ?3 AND deleted = 0 AND (pk, sk) > (?4, ?5)
                     ORDER BY pk, sk LIMIT ?6",
                )
                .and_then(|mut s| {
                    s.query_map(params![device.account, model, owner, k.pk, k.sk, want], map)?.collect()
                }),
            None => tx
                .prepare_cached(
                    "SELECT pk, sk, item, version FROM items INDEXED BY items_by_model
                     WHERE account = ?1 AND model = ?2 AND device = ?3 AND deleted = 0
                     ORDER BY pk, sk LIMIT ?4",
                )
                .and_then(|mut s| s.query_map(params![device.account, model, owner, want], map)?.collect()),
        }
        .map_err(db("reading a snapshot page"))?;
        for (pk, sk, item, version) in rows {
            match row_change(
                model.to_string(),
                pk.clone(),
                sk.clone(),
                item,
                &version,
                false,
            ) {
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
        if items.len() > limit {
            break;
        }
    }
    let next = snapshot_next(&mut items, limit);
    Ok(SnapshotPage {
        resync,
        items,
        next,
        cursor: head,
        unreadable,
        gen,
    })
}
