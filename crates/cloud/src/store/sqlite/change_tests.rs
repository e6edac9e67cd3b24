//! Unit tests of the SQLite store's change log and webhooks: what a write appends, what a read
//! returns after a cursor and with filters, what retention removes and tells, and how a webhook's
//! cursor moves.

use super::tests::{api_put, clock, dev, put, schema, store, ver, NOW, RULES};
use super::*;
use crate::store::{ChangeEvent, ChangeOp, ChangePage};
use devtables_sync::wire::{hlc_to_string, Op};
use serde_json::json;

fn query(account: &str, after: u64) -> ChangeQuery {
    ChangeQuery {
        account: account.into(),
        after,
        model: None,
        device: None,
        limit: 1000,
        scan: 100_000,
    }
}

fn page(s: &mut SqliteStore, q: &ChangeQuery) -> ChangePage {
    match s.read_changes(q).unwrap() {
        ChangeRead::Page(p) => p,
        ChangeRead::Expired { floor, head } => {
            panic!(
                "expected a page, the cursor {} expired (floor {floor}, head {head})",
                q.after
            )
        }
    }
}

/// (op, device, model, sk, item's `v`) of one change: what a reader learns.
type Seen<'a> = (ChangeOp, Option<&'a str>, &'a str, &'a str, Option<i64>);

fn seen(changes: &[ChangeEvent]) -> Vec<Seen<'_>> {
    changes
        .iter()
        .map(|c| {
            (
                c.op,
                c.device.as_deref(),
                c.model.as_str(),
                c.key.sk.as_str(),
                c.item
                    .as_ref()
                    .and_then(|i| i.get("v"))
                    .and_then(|v| v.as_i64()),
            )
        })
        .collect()
}

fn del(change: &Change, version: Hlc) -> Change {
    Change {
        op: Op::Delete,
        item: None,
        version,
        base: Some(change.version),
        ..change.clone()
    }
}

#[test]
fn every_row_write_appends_one_change_in_commit_order_with_its_item() {
    let schema = schema();
    let (d1, x1) = (dev("a", "d1"), dev("b", "x1"));
    let mut s = store(&[&d1, &x1]);
    let mut c = clock();
    let up = put(
        &schema,
        "Up",
        json!({"deviceId": "d1", "name": "u", "v": 1}),
        ver(NOW, 7),
    );
    let both = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "b", "v": 2}),
        ver(NOW + 1, 7),
    );
    s.apply_push(
        &schema,
        &mut c,
        NOW,
        RULES,
        &d1,
        &[up.clone(), both.clone()],
    )
    .unwrap();
    let (down, _) = api_put(
        &mut s,
        &schema,
        &mut c,
        NOW + 2,
        &Owner::Device(d1.clone()),
        "Down",
        json!({"deviceId": "d1", "name": "w", "v": 3}),
    );
    api_put(
        &mut s,
        &schema,
        &mut c,
        NOW + 3,
        &Owner::Account("a".into()),
        "Bcast",
        json!({"name": "f", "v": 4}),
    );
    s.apply_push(
        &schema,
        &mut c,
        NOW + 4,
        RULES,
        &d1,
        &[del(&up, ver(NOW + 4, 7))],
    )
    .unwrap();
    // Another account's write is not in this account's log.
    let other = put(
        &schema,
        "Both",
        json!({"deviceId": "x1", "name": "b", "v": 9}),
        ver(NOW, 8),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &x1, &[other])
        .unwrap();

    let p = page(&mut s, &query("a", 0));
    assert_eq!(
        seen(&p.changes),
        vec![
            (ChangeOp::Put, Some("d1"), "Up", "x#u", Some(1)),
            (ChangeOp::Put, Some("d1"), "Both", "x#b", Some(2)),
            (ChangeOp::Put, Some("d1"), "Down", "x#w", Some(3)),
            (ChangeOp::Put, None, "Bcast", "x#f", Some(4)),
            (ChangeOp::Delete, Some("d1"), "Up", "x#u", None),
        ]
    );
    let seqs: Vec<u64> = p.changes.iter().map(|c| c.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!((p.next, p.head), (seqs[4], seqs[4]));
    assert_eq!(p.changes[0].version, up.version);
    assert_eq!(
        p.changes[2].version, down.version,
        "the API write's own version"
    );
    assert_eq!(p.changes[0].at_ms, NOW);
    assert!(p.changes.iter().all(|c| c.account == "a"));
    // The JSON a reader gets: key as an object, version as text, no item on a delete.
    let event = serde_json::to_value(&p.changes[4]).unwrap();
    assert_eq!(event["key"], json!({"pk": "d#d1", "sk": "x#u"}));
    assert_eq!(event["version"], hlc_to_string(ver(NOW + 4, 7)));
    assert_eq!(event["op"], "delete");
    assert!(event.get("item").is_none(), "{event}");

    let b = page(&mut s, &query("b", 0));
    assert_eq!(b.changes.len(), 1);
    assert!(b.changes[0].seq > seqs[4], "one sequence across accounts");
    // Reading from the last seen sequence gives nothing more, and the hint is the head.
    let rest = page(&mut s, &query("a", seqs[4]));
    assert!(rest.changes.is_empty());
    assert_eq!(s.change_head_hint(), b.changes[0].seq);
}

#[test]
fn only_writes_that_store_a_row_append_and_a_rollback_appends_nothing() {
    let schema = schema();
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    let mut c = clock();
    let both = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "b", "v": 1}),
        ver(NOW, 7),
    );
    s.apply_push(
        &schema,
        &mut c,
        NOW,
        RULES,
        &d1,
        std::slice::from_ref(&both),
    )
    .unwrap();
    // A replay (duplicate) and a stale write store no row: no change.
    let stale = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "b", "v": 0}),
        ver(NOW - 5, 7),
    );
    s.apply_push(&schema, &mut c, NOW, RULES, &d1, &[both.clone(), stale])
        .unwrap();
    assert_eq!(page(&mut s, &query("a", 0)).changes.len(), 1);
    // A transaction rolled back leaves no entry, though it took a sequence number.
    let hint = s.change_head_hint();
    s.conformance_txn(NOW, false, |t| {
        t.write_row(&devtables_sync::apply::RowWrite {
            owner: &Owner::Device(d1.clone()),
            model: "Both",
            key: &both.key,
            item: None,
            version: ver(NOW + 1, 7),
            base: None,
        })
    })
    .unwrap();
    assert!(
        s.change_head_hint() > hint,
        "the hint counts the rolled-back append"
    );
    let p = page(&mut s, &query("a", 0));
    assert_eq!(p.changes.len(), 1, "{:?}", p.changes);
    // A revoked device's push fails whole: no change either.
    s.revoke_device(&d1, false).unwrap();
    let late = put(
        &schema,
        "Both",
        json!({"deviceId": "d1", "name": "z"}),
        ver(NOW + 2, 7),
    );
    assert!(s
        .apply_push(&schema, &mut c, NOW, RULES, &d1, &[late])
        .is_err());
    assert_eq!(page(&mut s, &query("a", 0)).changes.len(), 1);
}

/// Writes `n` changes of `model` for d1 (items named `{model}{i}`), one push each.
fn write_n(s: &mut SqliteStore, model: &str, n: u64, at: u64) {
    let schema = schema();
    let d1 = dev("a", "d1");
    let mut c = clock();
    for i in 0..n {
        let ch = put(
            &schema,
            model,
            json!({"deviceId": "d1", "name": format!("{}{i}", model.to_lowercase()), "v": i}),
            ver(at + i, 7),
        );
        s.apply_push(&schema, &mut c, at + i, RULES, &d1, &[ch])
            .unwrap();
    }
}

#[test]
fn pages_hold_at_most_limit_and_filters_move_the_cursor_past_what_they_examined() {
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    write_n(&mut s, "Both", 10, NOW);
    write_n(&mut s, "Up", 1, NOW + 100);
    let all = page(&mut s, &query("a", 0));
    assert_eq!(all.changes.len(), 11);
    let up_seq = all.changes[10].seq;

    // Pages of 4: the cursor is the last change returned.
    let mut q = query("a", 0);
    q.limit = 4;
    let mut got = Vec::new();
    loop {
        let p = page(&mut s, &q);
        assert!(p.changes.len() <= 4);
        got.extend(p.changes.iter().map(|c| c.seq));
        if p.changes.is_empty() {
            assert_eq!(p.next, q.after, "an empty page stays where it was");
            break;
        }
        q.after = p.next;
    }
    assert_eq!(got, all.changes.iter().map(|c| c.seq).collect::<Vec<_>>());

    // A model filter that matches only the last entry, examining 3 entries a read: empty
    // pages whose cursor moves 3 entries on, then the match.
    let mut q = query("a", 0);
    q.model = Some("Up".into());
    q.scan = 3;
    let mut reads = 0;
    let found = loop {
        let p = page(&mut s, &q);
        reads += 1;
        if let Some(c) = p.changes.first() {
            break c.clone();
        }
        assert!(p.next > q.after, "an empty filtered read moves on");
        q.after = p.next;
    };
    assert_eq!((found.seq, found.model.as_str()), (up_seq, "Up"));
    assert_eq!(reads, 4, "11 entries, 3 examined a read");
    // A device filter: d1's changes, none for another device.
    let mut q = query("a", 0);
    q.device = Some("d1".into());
    assert_eq!(page(&mut s, &q).changes.len(), 11);
    q.device = Some("d2".into());
    let p = page(&mut s, &q);
    assert!(p.changes.is_empty());
    assert_eq!(p.next, p.head, "everything examined");
}

#[test]
fn retention_by_count_and_age_expires_older_cursors_and_never_reuses_a_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let d1 = dev("a", "d1");
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    s.register_device(&d1, "hash", None, NOW).unwrap();
    write_n(&mut s, "Both", 5, NOW);
    let seqs: Vec<u64> = page(&mut s, &query("a", 0))
        .changes
        .iter()
        .map(|c| c.seq)
        .collect();

    // Too young and within the count: nothing removed.
    let keep_all = ChangeRetention {
        max_age_ms: 1000,
        max_per_account: 10,
    };
    assert_eq!(
        s.purge_changes(NOW + 10, &keep_all).unwrap(),
        ChangePurgeStats {
            removed: 0,
            kept: 5
        }
    );
    // At most 2 per account: the 3 oldest go, and a cursor before them is told so.
    let two = ChangeRetention {
        max_age_ms: 1000,
        max_per_account: 2,
    };
    assert_eq!(
        s.purge_changes(NOW + 10, &two).unwrap(),
        ChangePurgeStats {
            removed: 3,
            kept: 2
        }
    );
    assert_eq!(
        s.read_changes(&query("a", 0)).unwrap(),
        ChangeRead::Expired {
            floor: seqs[2],
            head: seqs[4]
        }
    );
    assert!(matches!(
        s.read_changes(&query("a", seqs[1])).unwrap(),
        ChangeRead::Expired { .. }
    ));
    // From the floor on, nothing was missed.
    let p = page(&mut s, &query("a", seqs[2]));
    assert_eq!(
        p.changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        seqs[3..]
    );
    // By age: everything is old an hour later; the log is empty, its head stays.
    let stats = s.purge_changes(NOW + 3_600_000, &two).unwrap();
    assert_eq!(
        stats,
        ChangePurgeStats {
            removed: 2,
            kept: 0
        }
    );
    let p = page(&mut s, &query("a", seqs[4]));
    assert_eq!((p.changes.len(), p.head, p.next), (0, seqs[4], seqs[4]));
    // Reopened (a restart), the next change still gets a higher sequence number.
    drop(s);
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(s.change_head_hint(), seqs[4]);
    write_n(&mut s, "Up", 1, NOW + 4_000_000);
    let p = page(&mut s, &query("a", seqs[4]));
    assert_eq!(p.changes.len(), 1);
    assert!(p.changes[0].seq > seqs[4]);
}

#[test]
fn a_webhook_starts_at_the_head_and_its_cursor_moves_only_forward_on_success_or_skip() {
    let d1 = dev("a", "d1");
    let mut s = store(&[&d1]);
    write_n(&mut s, "Both", 2, NOW);
    let head = page(&mut s, &query("a", 0)).head;
    let new = |after| NewWebhook {
        account: "a".into(),
        url: "http://127.0.0.1:9/hook".into(),
        model: Some("Up".into()),
        secret: "whsec_test".into(),
        after,
    };
    let hook = s.create_webhook(&new(None), NOW).unwrap();
    assert_eq!(hook.cursor, head, "only changes from now on");
    assert_eq!(hook.id.len(), 16);
    let from_start = s.create_webhook(&new(Some(0)), NOW).unwrap();
    assert_eq!(from_start.cursor, 0);
    assert_eq!(s.webhooks(Some("a")).unwrap().len(), 2);
    assert!(s.webhooks(Some("b")).unwrap().is_empty());

    // Nothing of its model is pending; an Up change is.
    assert_eq!(s.webhook_pending_since(&hook, 100).unwrap(), None);
    write_n(&mut s, "Up", 1, NOW + 50);
    assert_eq!(s.webhook_pending_since(&hook, 100).unwrap(), Some(NOW + 50));

    let fail = WebhookAttempt::Failed {
        status: Some(503),
        error: "HTTP 503".into(),
    };
    assert!(s.record_webhook_attempt(&hook.id, &fail, NOW + 60).unwrap());
    assert!(s.record_webhook_attempt(&hook.id, &fail, NOW + 61).unwrap());
    let h = s.webhook(&hook.id).unwrap().unwrap();
    assert_eq!(
        (
            h.cursor,
            h.failures,
            h.failures_total,
            h.last_status,
            h.last_error.as_deref()
        ),
        (head, 2, 2, Some(503), Some("HTTP 503"))
    );
    let up_head = page(&mut s, &query("a", 0)).head;
    let ok = WebhookAttempt::Delivered {
        status: 204,
        cursor: up_head,
        changes: 1,
        gap: false,
    };
    assert!(s.record_webhook_attempt(&hook.id, &ok, NOW + 70).unwrap());
    let h = s.webhook(&hook.id).unwrap().unwrap();
    assert_eq!(
        (
            h.cursor,
            h.failures,
            h.failures_total,
            h.deliveries,
            h.changes_delivered
        ),
        (up_head, 0, 2, 1, 1)
    );
    assert_eq!((h.last_error, h.last_success_ms), (None, Some(NOW + 70)));
    // Never back: a stale skip does not move it.
    s.record_webhook_attempt(&hook.id, &WebhookAttempt::Skipped { cursor: 1 }, NOW)
        .unwrap();
    assert_eq!(s.webhook(&hook.id).unwrap().unwrap().cursor, up_head);

    assert!(
        !s.delete_webhook("b", &hook.id).unwrap(),
        "another account's"
    );
    assert!(s.delete_webhook("a", &hook.id).unwrap());
    assert!(!s.record_webhook_attempt(&hook.id, &ok, NOW).unwrap());
    assert_eq!(s.webhook(&hook.id).unwrap(), None);
}

#[test]
fn a_layout_6_file_gains_an_empty_change_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let d1 = dev("a", "d1");
    {
        let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        s.register_device(&d1, "h", None, NOW).unwrap();
        write_n(&mut s, "Both", 1, NOW);
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "DROP TABLE changes; DROP TABLE change_floors; DROP TABLE webhooks;
         DELETE FROM sqlite_sequence WHERE name = 'changes';
         UPDATE meta SET value = '6' WHERE key = 'schema_version';",
    )
    .unwrap();
    drop(raw);
    let mut s = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    assert_eq!(s.device(&d1).unwrap().unwrap().changes_applied, 1, "intact");
    assert!(
        page(&mut s, &query("a", 0)).changes.is_empty(),
        "the old write is not a change"
    );
    write_n(&mut s, "Up", 1, NOW + 10);
    assert_eq!(page(&mut s, &query("a", 0)).changes.len(), 1);
}
