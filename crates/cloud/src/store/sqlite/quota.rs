//! The per-device quotas of the SQLite store: which pushed put may not be stored, and the trim
//! of a device's conflict log.
//!
//! It exists so the limits of what one device may cost the cloud are decided in one place, inside
//! the push's own transaction, against the usage counts ([`super::devices::usage`]) that every
//! row write keeps in that same transaction (`txn::SqlTxn::write_row`): a refusal and the rows it
//! protects can never disagree, even with other writers on the file.

use devtables_sync::identity::DeviceId;
use devtables_sync::wire::{self, Change, Op, Quota, RejectReason};
use rusqlite::{params, Connection, OptionalExtension};

use super::super::{DeviceQuotas, StoreError};
use super::devices::usage;
use super::sql::{db, parse_version};

/// Why `change`, pushed by `from`, may not be stored, if it may not: its item is over
/// `max_item_bytes`, or storing it would take the device past `max_rows` or `max_bytes`. Deletes
/// are always taken (they make room); so is a put that does not grow the usage it would cross
/// (an update in place, a smaller item), and one the stored row beats (it changes nothing; the
/// replication rules answer it).
pub(super) fn refusal(
    conn: &Connection,
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
    let row: Option<(String, bool, u64)> = conn
        .prepare_cached(
            "SELECT version, deleted, coalesce(length(CAST(item AS BLOB)), 0) FROM items
             WHERE account = ?1 AND device = ?2 AND pk = ?3 AND sk = ?4",
        )
        .and_then(|mut s| {
            s.query_row(
                params![from.account, from.device, change.key.pk, change.key.sk],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
        .map_err(db("reading the row a put replaces"))?;
    let (held_rows, held_bytes) = match &row {
        Some((version, _, _)) if parse_version(version)? >= change.version => return Ok(None),
        Some((_, false, bytes)) => (1, *bytes),
        _ => (0, 0),
    };
    // An unregistered sender is refused by the push itself; nothing to count against.
    let Some((rows, bytes)) = usage(conn, from)? else {
        return Ok(None);
    };
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
/// counts what it dropped on the device. Called after each record of the device is added, so
/// one record goes at a time (more only right after the limit was lowered). Returns how many.
pub(super) fn trim_conflicts(
    conn: &Connection,
    device: &DeviceId,
    max: u64,
) -> Result<u64, StoreError> {
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let dropped = conn
        .prepare_cached(
            "DELETE FROM conflicts WHERE account = ?1 AND device = ?2 AND id <= (
                SELECT id FROM conflicts WHERE account = ?1 AND device = ?2
                ORDER BY id DESC LIMIT 1 OFFSET ?3)",
        )
        .and_then(|mut s| s.execute(params![device.account, device.device, max]))
        .map_err(db("trimming a device's conflict log"))?;
    if dropped > 0 {
        conn.prepare_cached(
            "UPDATE devices SET conflicts_dropped = conflicts_dropped + ?3
             WHERE account = ?1 AND device = ?2",
        )
        .and_then(|mut s| s.execute(params![device.account, device.device, dropped as i64]))
        .map_err(db("counting a device's dropped conflicts"))?;
    }
    Ok(dropped as u64)
}

#[cfg(test)]
mod tests {
    //! The quotas against a real SQLite file: refusals per change inside the push, usage kept
    //! by every write, the conflict cap, and the layout-4 upgrade counting what is stored.

    use devtables_sync::apply::CloudOp;
    use devtables_sync::identity::Owner;
    use devtables_sync::wire::{ChangeStatus, Quota, RejectReason};
    use rusqlite::Connection;
    use serde_json::json;

    use super::super::tests::{api_put, clock, dev, put, schema, ver, MAX_MSG, NOW, RULES};
    use super::super::{SqliteOptions, SqliteStore};
    use crate::store::{CloudStore, DeviceQuotas};

    fn open(dir: &std::path::Path, quotas: DeviceQuotas) -> SqliteStore {
        SqliteStore::open(
            &dir.join("cloud.db"),
            SqliteOptions {
                quotas,
                ..SqliteOptions::default()
            },
        )
        .unwrap()
    }

    /// What the device's live rows hold, counted from the rows themselves.
    fn counted(dir: &std::path::Path) -> (u64, u64) {
        Connection::open(dir.join("cloud.db"))
            .unwrap()
            .query_row(
                "SELECT count(*), coalesce(sum(length(CAST(item AS BLOB))), 0) FROM items
                 WHERE account = 'a' AND device = 'd1' AND deleted = 0",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
    }

    fn statuses(r: &[devtables_sync::wire::ChangeResult]) -> Vec<ChangeStatus> {
        r.iter().map(|r| r.status.clone()).collect()
    }

    #[test]
    fn puts_over_a_quota_are_refused_per_change_and_deletes_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let quotas = DeviceQuotas {
            max_item_bytes: 300,
            max_rows: 2,
            ..DeviceQuotas::default()
        };
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = open(dir.path(), quotas);
        s.register_device(&d1, "hash", None, NOW).unwrap();
        let mut c = clock();
        // `value` sets the item's size: the number's digits.
        let up = |name: &str, v: u64, value: u64| {
            put(
                &schema,
                "Both",
                json!({"deviceId": "d1", "name": name, "v": value}),
                ver(NOW + v, 1),
            )
        };
        let big = "b".repeat(400);
        let push = |s: &mut SqliteStore, c: &mut _, changes: &[_]| {
            s.apply_push(&schema, c, NOW, RULES, &d1, changes)
                .unwrap()
                .0
        };
        let over_rows = ChangeStatus::Rejected {
            reason: RejectReason::QuotaExceeded {
                what: Quota::Rows,
                limit: 2,
            },
        };
        let r = push(
            &mut s,
            &mut c,
            &[up("a", 1, 0), up("b", 1, 0), up("c", 1, 0), up(&big, 1, 0)],
        );
        assert_eq!(
            statuses(&r),
            vec![
                ChangeStatus::Applied,
                ChangeStatus::Applied,
                over_rows.clone(),
                ChangeStatus::Rejected {
                    reason: RejectReason::ItemTooLarge { max: 300 }
                }
            ]
        );
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!(
            (rec.rows_stored, rec.bytes_stored),
            counted(dir.path()),
            "the kept counts are the rows' own"
        );
        assert_eq!(rec.rows_stored, 2);
        assert_eq!(
            (
                rec.changes_applied,
                rec.changes_rejected,
                rec.changes_over_quota
            ),
            (2, 2, 2)
        );
        // At the quota: an update in place is taken (no new row); a new key is not.
        let r = push(&mut s, &mut c, &[up("a", 2, 1 << 60), up("d", 2, 0)]);
        assert_eq!(statuses(&r), vec![ChangeStatus::Applied, over_rows]);
        // A delete is always taken, and the room it makes serves the next change of the push.
        let mut del = up("b", 3, 0);
        del.op = devtables_sync::wire::Op::Delete;
        del.item = None;
        let r = push(&mut s, &mut c, &[del, up("d", 3, 0)]);
        assert_eq!(
            statuses(&r),
            vec![ChangeStatus::Applied, ChangeStatus::Applied]
        );
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!((rec.rows_stored, rec.bytes_stored), counted(dir.path()));
        assert_eq!(rec.rows_stored, 2);
        assert_eq!(rec.changes_over_quota, 3);
        // A change the stored row beats is not a quota matter: the rules answer it stale.
        let r = push(&mut s, &mut c, &[up("c", 0, 0)]);
        assert_eq!(r.len(), 1);
        assert!(
            matches!(r[0].status, ChangeStatus::Rejected { .. }),
            "c was never stored, so it is still over the quota: {:?}",
            r[0].status
        );
        let r = push(&mut s, &mut c, &[up("a", 0, 0)]);
        assert!(matches!(r[0].status, ChangeStatus::Stale { .. }), "{r:?}");

        // The usage survives a reopen, and a new quota applies to what is stored.
        drop(s);
        let mut s = open(
            dir.path(),
            DeviceQuotas {
                max_rows: 10,
                max_bytes: 10,
                ..quotas
            },
        );
        let r = push(&mut s, &mut c, &[up("e", 4, 0)]);
        assert_eq!(
            statuses(&r),
            vec![ChangeStatus::Rejected {
                reason: RejectReason::QuotaExceeded {
                    what: Quota::Bytes,
                    limit: 10
                }
            }]
        );
        // Shrinking an item is taken even over the byte quota.
        let r = push(&mut s, &mut c, &[up("a", 5, 0)]);
        assert_eq!(statuses(&r), vec![ChangeStatus::Applied]);
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!((rec.rows_stored, rec.bytes_stored), counted(dir.path()));
    }

    #[test]
    fn api_writes_and_revocations_keep_the_usage_true() {
        let dir = tempfile::tempdir().unwrap();
        let (schema, d1) = (schema(), dev("a", "d1"));
        let mut s = open(dir.path(), DeviceQuotas::default());
        s.register_device(&d1, "hash", None, NOW).unwrap();
        let mut c = clock();
        let owner = Owner::Device(d1.clone());
        api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &owner,
            "Both",
            json!({"deviceId": "d1", "name": "x", "v": 1}),
        );
        let (ch, _) = api_put(
            &mut s,
            &schema,
            &mut c,
            NOW,
            &owner,
            "Both",
            json!({"deviceId": "d1", "name": "y", "v": 2}),
        );
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!(rec.rows_stored, 2);
        assert_eq!((rec.rows_stored, rec.bytes_stored), counted(dir.path()));
        s.write(
            &schema,
            &mut c,
            NOW,
            MAX_MSG,
            &owner,
            "Both",
            CloudOp::Delete(ch.key),
        )
        .unwrap();
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!((rec.rows_stored, rec.bytes_stored), counted(dir.path()));
        assert_eq!(rec.rows_stored, 1);
        s.count_throttled(&d1, 5, 2).unwrap();
        s.count_throttled(&d1, 1, 0).unwrap();
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!((rec.messages_rate_limited, rec.pushes_busy), (6, 2));
        assert!(s.revoke_device(&d1, true).unwrap());
        let rec = s.device(&d1).unwrap().unwrap();
        assert_eq!((rec.rows_stored, rec.bytes_stored), (0, 0));
    }

    #[test]
    fn a_devices_conflict_log_keeps_its_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let (schema, d1, d2) = (schema(), dev("a", "d1"), dev("a", "d2"));
        let mut s = open(
            dir.path(),
            DeviceQuotas {
                max_conflicts: 2,
                ..DeviceQuotas::default()
            },
        );
        for d in [&d1, &d2] {
            s.register_device(d, "hash", None, NOW).unwrap();
        }
        let mut c = clock();
        // Every write from a new node on the same key, knowing no base: a conflict each time.
        for (d, n) in [(&d1, 5u64), (&d2, 1)] {
            for i in 0..=n {
                let ch = put(
                    &schema,
                    "Both",
                    json!({"deviceId": d.device, "name": "k", "v": i}),
                    ver(NOW + i, 100 + i),
                );
                s.apply_push(&schema, &mut c, NOW, RULES, d, &[ch]).unwrap();
            }
        }
        let log = s.conflicts("a", None, 100).unwrap();
        let of = |d: &str| {
            log.iter()
                .filter(|r| r.device.as_deref() == Some(d))
                .count()
        };
        assert_eq!((of("d1"), of("d2")), (2, 1), "{log:?}");
        assert_eq!(
            log.iter()
                .find(|r| r.device.as_deref() == Some("d1"))
                .unwrap()
                .winner,
            devtables_sync::wire::hlc_to_string(ver(NOW + 5, 105)),
            "the newest are kept"
        );
        assert_eq!(s.device(&d1).unwrap().unwrap().conflicts_dropped, 3);
        assert_eq!(s.device(&d2).unwrap().unwrap().conflicts_dropped, 0);
    }

    #[test]
    fn a_layout_4_file_is_upgraded_with_its_usage_counted() {
        let dir = tempfile::tempdir().unwrap();
        // A file as layout 4 left it: the columns of the usage do not exist yet.
        {
            let mut s = open(dir.path(), DeviceQuotas::default());
            let d1 = dev("a", "d1");
            s.register_device(&d1, "hash", None, NOW).unwrap();
            let schema = schema();
            let changes: Vec<_> = ["p", "q", "r"]
                .iter()
                .map(|n| {
                    put(
                        &schema,
                        "Both",
                        json!({"deviceId": "d1", "name": n}),
                        ver(NOW, 1),
                    )
                })
                .collect();
            s.apply_push(&schema, &mut clock(), NOW, RULES, &d1, &changes)
                .unwrap();
        }
        let raw = Connection::open(dir.path().join("cloud.db")).unwrap();
        raw.execute_batch(
            "DROP INDEX conflicts_by_device;
             ALTER TABLE devices DROP COLUMN rows_stored;
             ALTER TABLE devices DROP COLUMN bytes_stored;
             ALTER TABLE devices DROP COLUMN changes_over_quota;
             ALTER TABLE devices DROP COLUMN messages_rate_limited;
             ALTER TABLE devices DROP COLUMN pushes_busy;
             ALTER TABLE devices DROP COLUMN conflicts_dropped;
             ALTER TABLE devices DROP COLUMN changes_duplicate;
             ALTER TABLE devices DROP COLUMN changes_answered;
             ALTER TABLE devices DROP COLUMN feed_gen;
             ALTER TABLE devices DROP COLUMN feed_generations;
             UPDATE meta SET value = '4' WHERE key = 'schema_version';",
        )
        .unwrap();
        drop(raw);
        let mut s = open(dir.path(), DeviceQuotas::default());
        let rec = s.device(&dev("a", "d1")).unwrap().unwrap();
        assert_eq!(rec.rows_stored, 3);
        assert_eq!((rec.rows_stored, rec.bytes_stored), counted(dir.path()));
        assert!(rec.bytes_stored > 0);
    }
}
