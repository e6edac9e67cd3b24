//! The cloud-store checks: the [`CloudTxn`] contract, feed and snapshot reads, purges, and the
//! replication rules run through the store.

use devtables_schema::ItemKey;
use devtables_sync::apply::{
    cloud_apply_push, cloud_write, CloudOp, CloudWriteError, Conflict, Loser, PushCounts,
    PushRules, RowWrite, StoredRow, DEFAULT_MAX_DRIFT_MS,
};
use devtables_sync::cloud::{FeedGeneration, FeedPage, SnapshotCursor, MAX_FEED_GENERATIONS};
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{Change, ChangeResult, ChangeStatus, Op, RejectReason};

use crate::{
    del, dev, ensure, ensure_eq, item, put, schema, ver, Check, CloudStoreUnderTest, DynCloud,
    OrFail, Outcome, ACCOUNT, OTHER_ACCOUNT, T0,
};

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        vec![$(Check { name: stringify!($name), run: $name::<H> }),*]
    };
}

pub(crate) fn checks<H: CloudStoreUnderTest>() -> Vec<Check<H>> {
    checks![
        row_is_identified_by_owner_and_key,
        stored_row_returns_what_write_row_stored,
        a_transaction_reads_its_own_writes,
        rolled_back_transaction_leaves_nothing,
        append_feed_coalesces_per_key_and_bumps_the_head,
        feed_returns_the_current_state_of_each_key,
        feed_pages_hold_at_most_limit_in_cursor_order,
        a_new_device_starts_below_its_floor,
        broadcast_rows_fan_out_to_every_device_of_the_account,
        a_broadcast_to_a_large_account_fans_out_in_bounded_steps,
        a_rewrite_restarts_a_fan_out_and_a_purge_ends_it,
        a_rolled_back_broadcast_leaves_no_fan_out,
        snapshot_pages_cover_each_live_down_row_once_in_order,
        purge_removes_old_tombstones_with_their_feed_entries,
        purge_watermark_only_rises_and_is_per_owner,
        max_version_covers_items_tombstones_and_watermarks,
        count_push_adds_up,
        conflicts_are_logged_per_account,
        push_stores_under_the_sender_and_replays_are_duplicates,
        stale_push_returns_the_winner_and_feeds_it_back,
        wrong_model_push_is_refused_until_the_row_is_a_tombstone,
        every_write_meets_the_watermark_of_a_purged_key,
        a_feed_starts_a_new_generation_once_per_run,
        pushes_count_every_answer_in_their_transaction,
        versions_beyond_the_drift_bound_are_refused,
        api_writes_order_after_the_stored_version,
    ]
}

pub(crate) const NOW: u64 = T0 + 100_000;

pub(crate) fn d1() -> DeviceId {
    dev("d1")
}
pub(crate) fn d2() -> DeviceId {
    dev("d2")
}
pub(crate) fn x1() -> DeviceId {
    DeviceId::new(OTHER_ACCOUNT, "x1").expect("valid device id")
}
pub(crate) fn own(d: &DeviceId) -> Owner {
    Owner::Device(d.clone())
}

/// Registers d1, d2 (account acme) and x1 (account globex).
pub(crate) fn setup<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    for d in [d1(), d2(), x1()] {
        h.register_device(&d, T0).or_fail("registering a device")?;
    }
    Ok(())
}

/// Stores a change as a row (and appends it to the feed when `feed`), committed at `now`.
pub(crate) fn store<H: CloudStoreUnderTest>(
    h: &mut H,
    now: u64,
    owner: &Owner,
    c: &Change,
    feed: bool,
) -> Outcome {
    store_then(h, now, owner, c, feed, true)
}

/// [`store`], committed when `commit`, rolled back otherwise.
fn store_then<H: CloudStoreUnderTest>(
    h: &mut H,
    now: u64,
    owner: &Owner,
    c: &Change,
    feed: bool,
    commit: bool,
) -> Outcome {
    h.txn(now, commit, |t| {
        t.write_row(&RowWrite {
            owner,
            model: &c.model,
            key: &c.key,
            item: c.item.as_ref(),
            version: c.version,
            base: c.base,
        })?;
        if feed {
            t.append_feed(owner, &c.model, &c.key)?;
        }
        Ok(())
    })
    .or_fail("storing a row")
}

fn row<H: CloudStoreUnderTest>(
    h: &mut H,
    owner: &Owner,
    key: &ItemKey,
) -> Result<Option<StoredRow>, String> {
    h.txn(NOW, false, |t| t.stored_row(owner, key))
        .or_fail("reading a row")
}

fn watermark<H: CloudStoreUnderTest>(h: &mut H, owner: &Owner) -> Result<Option<Hlc>, String> {
    h.txn(NOW, false, |t| t.purge_watermark(owner))
        .or_fail("reading a watermark")
}

pub(crate) fn push<H: CloudStoreUnderTest>(
    h: &mut H,
    now: u64,
    from: &DeviceId,
    changes: &[Change],
) -> Result<Vec<ChangeStatus>, String> {
    let s = schema();
    let mut clock = HlcClock::new(99);
    let results: Vec<ChangeResult> = h
        .txn(now, true, |t| {
            cloud_apply_push(
                &mut DynCloud(t),
                &s,
                &mut clock,
                now,
                &PushRules::default(),
                from,
                changes,
            )
        })
        .or_fail("applying a push")?;
    ensure_eq!(results.len(), changes.len(), "one result per change");
    for (r, c) in results.iter().zip(changes) {
        ensure!(
            r.model == c.model && r.key == c.key && r.version == c.version,
            "result {r:?} does not answer change {c:?}"
        );
    }
    Ok(results.into_iter().map(|r| r.status).collect())
}

fn api<H: CloudStoreUnderTest>(
    h: &mut H,
    clock: &mut HlcClock,
    now: u64,
    owner: &Owner,
    model: &str,
    op: CloudOp,
) -> Result<Result<Change, String>, String> {
    let s = schema();
    // A refusal must roll back; the harness only commits an Ok.
    let mut refused = None;
    let out = h
        .txn(now, true, |t| {
            match cloud_write(&mut DynCloud(t), &s, clock, now, 1 << 17, owner, model, op) {
                Ok(c) => Ok(Some(c)),
                Err(CloudWriteError::Store(e)) => Err(e),
                Err(other) => {
                    refused = Some(format!("{other:?}"));
                    Ok(None)
                }
            }
        })
        .or_fail("an API write")?;
    Ok(match (out, refused) {
        (Some(c), _) => Ok(c),
        (None, Some(r)) => Err(r),
        (None, None) => Err("refused".into()),
    })
}

fn feed<H: CloudStoreUnderTest>(
    h: &mut H,
    d: &DeviceId,
    after: u64,
    limit: usize,
) -> Result<FeedPage, String> {
    h.read_feed(d, after, limit).or_fail("reading a feed")
}

fn head<H: CloudStoreUnderTest>(h: &mut H, d: &DeviceId) -> Result<u64, String> {
    Ok(feed(h, d, 1, 1)?.head)
}

fn keys_of(page: &FeedPage) -> Vec<ItemKey> {
    page.changes.iter().map(|(_, c)| c.key.clone()).collect()
}

fn row_of(c: &Change) -> StoredRow {
    StoredRow {
        model: c.model.clone(),
        version: c.version,
        deleted: c.op == Op::Delete,
        base: c.base,
    }
}

fn row_is_identified_by_owner_and_key<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    store(h, NOW, &own(&d1()), &a, false)?;
    ensure_eq!(
        row(h, &own(&d1()), &a.key)?,
        Some(row_of(&a)),
        "the row of d1"
    );
    ensure_eq!(
        row(h, &own(&d2()), &a.key)?,
        None,
        "the same key of another device"
    );
    let acct = Owner::Account(ACCOUNT.into());
    ensure_eq!(row(h, &acct, &a.key)?, None, "the same key of the account");
    // Alt's keys collide with Dev's: a write under Alt replaces the one row of the key.
    let alt = put(&s, "Alt", "d1", "a", ver(20, 1), Some(a.version));
    ensure_eq!(alt.key, a.key, "Dev and Alt keys collide");
    store(h, NOW, &own(&d1()), &alt, false)?;
    ensure_eq!(
        row(h, &own(&d1()), &a.key)?,
        Some(row_of(&alt)),
        "the key's one row after a write of another model"
    );
    Ok(())
}

fn stored_row_returns_what_write_row_stored<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let cases = [
        put(&s, "Dev", "d1", "a", ver(10, 7), None),
        put(&s, "Dev", "d1", "a", ver(11, 8), Some(ver(10, 7))),
        // A tombstone keeps its version and base.
        del(&s, "Dev", "d1", "a", ver(12, 9), Some(ver(11, 8))),
        put(
            &s,
            "Other",
            "d1",
            "b",
            Hlc {
                wall_ms: T0,
                counter: u32::MAX,
                node: u64::MAX,
            },
            None,
        ),
        del(&s, "Other", "d1", "c", ver(1, 1), None),
    ];
    for c in &cases {
        store(h, NOW, &o, c, false)?;
        ensure_eq!(
            row(h, &o, &c.key)?,
            Some(row_of(c)),
            "row after writing {c:?}"
        );
    }
    Ok(())
}

fn a_transaction_reads_its_own_writes<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let seen = h
        .txn(NOW, true, |t| {
            t.write_row(&RowWrite {
                owner: &o,
                model: &a.model,
                key: &a.key,
                item: a.item.as_ref(),
                version: a.version,
                base: None,
            })?;
            t.stored_row(&o, &a.key)
        })
        .or_fail("write then read in one transaction")?;
    ensure_eq!(
        seen,
        Some(row_of(&a)),
        "a row read back in its own transaction"
    );
    Ok(())
}

fn rolled_back_transaction_leaves_nothing<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let c = conflict_of(&o, &a);
    let head_before = head(h, &d1())?;
    h.txn(NOW, false, |t| {
        t.write_row(&RowWrite {
            owner: &o,
            model: &a.model,
            key: &a.key,
            item: a.item.as_ref(),
            version: a.version,
            base: None,
        })?;
        t.append_feed(&o, &a.model, &a.key)?;
        t.append_feed(&Owner::Account(ACCOUNT.into()), &a.model, &a.key)?;
        t.count_push(
            &d1(),
            &PushCounts {
                applied: 1,
                duplicates: 0,
                superseded: 1,
                rejected: 1,
            },
        )?;
        t.log_conflict(&c)?;
        Ok(())
    })
    .or_fail("a transaction rolled back")?;
    ensure_eq!(row(h, &o, &a.key)?, None, "the row of a rolled-back write");
    let page = feed(h, &d1(), 1, 10)?;
    ensure_eq!(page.head, head_before, "the feed head after a rollback");
    ensure!(
        page.changes.is_empty(),
        "feed entries after a rollback: {page:?}"
    );
    ensure_eq!(
        head(h, &d2())?,
        head_before,
        "the account feed after a rollback"
    );
    ensure_eq!(
        h.push_counts(&d1()).or_fail("counts")?,
        PushCounts::default(),
        "counters"
    );
    ensure_eq!(
        h.conflicts(ACCOUNT).or_fail("conflicts")?,
        0,
        "conflicts after a rollback"
    );
    ensure_eq!(
        h.max_version().or_fail("max version")?,
        None,
        "max version after a rollback"
    );
    Ok(())
}

/// A conflict record for the checks.
fn conflict_of(owner: &Owner, c: &Change) -> Conflict {
    Conflict {
        owner: owner.clone(),
        model: c.model.clone(),
        key: c.key.clone(),
        device: None,
        winner: c.version,
        loser: Hlc {
            wall_ms: c.version.wall_ms - 1,
            ..c.version
        },
        lost: Loser::Incoming,
        incoming: c.item.clone(),
    }
}

fn append_feed_coalesces_per_key_and_bumps_the_head<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let h0 = head(h, &d1())?;
    let k1 = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let k2 = put(&s, "Dev", "d1", "b", ver(11, 1), None);
    store(h, NOW, &o, &k1, true)?;
    store(h, NOW, &o, &k2, true)?;
    let k1b = put(&s, "Dev", "d1", "a", ver(12, 1), Some(k1.version));
    store(h, NOW, &o, &k1b, true)?;
    let page = feed(h, &d1(), h0, 10)?;
    ensure!(
        !page.resync_required,
        "a read at the head of a new feed needs no resync"
    );
    ensure_eq!(page.head, h0 + 3, "the head after three appends");
    ensure_eq!(
        keys_of(&page),
        vec![k2.key.clone(), k1.key.clone()],
        "coalesced feed keys in order"
    );
    ensure!(
        page.changes[0].0 < page.changes[1].0 && page.changes[1].0 == page.head,
        "feed cursors ascend to the head: {:?}",
        page.changes.iter().map(|(c, _)| *c).collect::<Vec<_>>()
    );
    ensure!(
        page.changes.iter().all(|(c, _)| *c > h0),
        "cursors above the start"
    );
    // Several appends in one transaction coalesce too.
    h.txn(NOW, true, |t| {
        t.append_feed(&o, "Dev", &k2.key)?;
        t.append_feed(&o, "Dev", &k2.key)
    })
    .or_fail("two appends of one key")?;
    let page = feed(h, &d1(), h0, 10)?;
    ensure_eq!(
        keys_of(&page),
        vec![k1.key.clone(), k2.key.clone()],
        "keys after re-appending b"
    );
    ensure!(page.head >= h0 + 4, "the head moved: {}", page.head);
    ensure_eq!(
        page.changes[1].0,
        page.head,
        "the newest entry sits at the head"
    );
    Ok(())
}

fn feed_returns_the_current_state_of_each_key<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let h0 = head(h, &d1())?;
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    store(h, NOW, &o, &a, true)?;
    // Overwritten without an append: the entry still carries the current state.
    let gone = del(&s, "Dev", "d1", "a", ver(20, 1), Some(a.version));
    store(h, NOW, &o, &gone, false)?;
    let page = feed(h, &d1(), h0, 10)?;
    ensure_eq!(page.changes.len(), 1, "one entry");
    let c = &page.changes[0].1;
    ensure!(
        c.op == Op::Delete && c.item.is_none() && c.version == gone.version && c.model == "Dev",
        "the entry carries the tombstone: {c:?}"
    );
    // The key's current model: Alt now holds the key.
    let alt = put(&s, "Alt", "d1", "a", ver(30, 1), None);
    store(h, NOW, &o, &alt, true)?;
    let page = feed(h, &d1(), h0, 10)?;
    ensure_eq!(page.changes.len(), 1, "one entry per key");
    let c = &page.changes[0].1;
    ensure!(
        c.op == Op::Put && c.model == "Alt" && c.version == alt.version && c.item == alt.item,
        "the entry carries the current put: {c:?}"
    );
    Ok(())
}

fn feed_pages_hold_at_most_limit_in_cursor_order<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let h0 = head(h, &d1())?;
    let mut want = Vec::new();
    for (i, n) in ["e", "d", "c", "b", "a"].iter().enumerate() {
        let c = put(&s, "Dev", "d1", n, ver(10 + i as u64, 1), None);
        store(h, NOW, &o, &c, true)?;
        want.push(c.key);
    }
    let mut got = Vec::new();
    let mut after = h0;
    let mut sizes = Vec::new();
    for _ in 0..10 {
        let page = feed(h, &d1(), after, 2)?;
        ensure_eq!(page.head, h0 + 5, "the head of every page");
        ensure_eq!(page.after, after, "the page echoes its after");
        ensure!(page.changes.len() <= 2, "page over its limit: {page:?}");
        sizes.push(page.changes.len());
        if page.changes.is_empty() {
            break;
        }
        for (cursor, c) in &page.changes {
            ensure!(*cursor > after, "cursor {cursor} not after {after}");
            after = *cursor;
            got.push(c.key.clone());
        }
    }
    ensure_eq!(sizes, vec![2, 2, 1, 0], "page sizes");
    ensure_eq!(got, want, "keys in append order");
    Ok(())
}

fn a_new_device_starts_below_its_floor<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let page = feed(h, &d1(), 0, 10)?;
    ensure!(
        page.resync_required,
        "cursor 0 of a new device needs a resync: {page:?}"
    );
    let page = feed(h, &d1(), page.head, 10)?;
    ensure!(
        !page.resync_required && page.changes.is_empty(),
        "at the head: {page:?}"
    );
    Ok(())
}

fn broadcast_rows_fan_out_to_every_device_of_the_account<H: CloudStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    setup(h)?;
    let s = schema();
    let heads = [head(h, &d1())?, head(h, &d2())?, head(h, &x1())?];
    let acct = Owner::Account(ACCOUNT.into());
    let c = put(&s, "Cast", "", "fw", ver(10, 1), None);
    store(h, NOW, &acct, &c, true)?;
    for (d, h0) in [(d1(), heads[0]), (d2(), heads[1])] {
        let page = feed(h, &d, h0, 10)?;
        ensure_eq!(page.head, h0 + 1, "the head of {d}");
        ensure_eq!(page.changes.len(), 1, "entries of {d}");
        let got = &page.changes[0].1;
        ensure!(
            got.model == "Cast"
                && got.key == c.key
                && got.item == c.item
                && got.version == c.version,
            "{d} receives the broadcast row: {got:?}"
        );
    }
    let page = feed(h, &x1(), heads[2], 10)?;
    ensure!(
        page.head == heads[2] && page.changes.is_empty(),
        "another account's device receives nothing: {page:?}"
    );
    // The broadcast row is the account's, not a device's.
    ensure_eq!(row(h, &own(&d1()), &c.key)?, None, "no device row");
    ensure_eq!(row(h, &acct, &c.key)?, Some(row_of(&c)), "the account row");
    Ok(())
}

/// Registers devices f0.. of [`ACCOUNT`] until the account has `3 * batch + 1` (with d1, d2),
/// so a broadcast needs the write's batch and three steps. Returns every device of the account.
fn large_account<H: CloudStoreUnderTest>(h: &mut H) -> Result<(Vec<DeviceId>, usize), String> {
    setup(h)?;
    let batch = h.fanout_batch();
    ensure!(
        (2..=4).contains(&batch),
        "the suite needs a fan-out batch of 2 to 4, the store has {batch}"
    );
    let mut devices = vec![d1(), d2()];
    for i in 0..(3 * batch - 1) {
        let d = dev(&format!("f{i}"));
        h.register_device(&d, T0).or_fail("registering a device")?;
        devices.push(d);
    }
    Ok((devices, batch))
}

/// Each device's feed head.
fn heads<H: CloudStoreUnderTest>(h: &mut H, devices: &[DeviceId]) -> Result<Vec<u64>, String> {
    devices.iter().map(|d| head(h, d)).collect()
}

/// Steps the pending fan-outs until none is left, checking each step's bound; returns the steps
/// that reached a device, and every device reached (in order, repeats kept).
fn settle_fanout<H: CloudStoreUnderTest>(
    h: &mut H,
    batch: usize,
) -> Result<(usize, Vec<DeviceId>), String> {
    let (mut steps, mut reached) = (0, Vec::new());
    for _ in 0..1000 {
        match h.fanout_step().or_fail("a fan-out step")? {
            None => return Ok((steps, reached)),
            Some(step) => {
                ensure!(
                    step.len() <= batch,
                    "a step reached {} devices, beyond the batch of {batch}",
                    step.len()
                );
                steps += usize::from(!step.is_empty());
                reached.extend(step);
            }
        }
    }
    Err("the fan-out never settled (1000 steps)".into())
}

fn a_broadcast_to_a_large_account_fans_out_in_bounded_steps<H: CloudStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    let (devices, batch) = large_account(h)?;
    let s = schema();
    let before = heads(h, &devices)?;
    let other = head(h, &x1())?;
    let acct = Owner::Account(ACCOUNT.into());
    let c = put(&s, "Cast", "", "fw", ver(10, 1), None);
    store(h, NOW, &acct, &c, true)?;
    let after_write = heads(h, &devices)?;
    let moved: Vec<&DeviceId> = devices
        .iter()
        .zip(before.iter().zip(&after_write))
        .filter(|(_, (b, a))| a > b)
        .map(|(d, _)| d)
        .collect();
    ensure_eq!(
        moved.len(),
        batch,
        "devices the write's own transaction reached"
    );
    let (steps, reached) = settle_fanout(h, batch)?;
    ensure_eq!(steps, 3, "steps after the write's batch");
    ensure_eq!(
        reached.len(),
        devices.len() - batch,
        "devices the steps reached: each once"
    );
    for d in &reached {
        ensure!(
            !moved.contains(&d),
            "{d} was reached by the write and again by a step"
        );
    }
    for (d, b) in devices.iter().zip(&before) {
        let page = feed(h, d, *b, 10)?;
        ensure_eq!(page.head, b + 1, "the head of {d}: one entry");
        ensure!(
            page.changes.len() == 1
                && page.changes[0].1.key == c.key
                && page.changes[0].1.version == c.version,
            "{d} receives the broadcast: {page:?}"
        );
    }
    ensure_eq!(
        head(h, &x1())?,
        other,
        "another account's device is not reached"
    );
    ensure_eq!(h.fanout_step().or_fail("a fan-out step")?, None, "settled");
    Ok(())
}

fn a_rewrite_restarts_a_fan_out_and_a_purge_ends_it<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    let (devices, batch) = large_account(h)?;
    let s = schema();
    let acct = Owner::Account(ACCOUNT.into());
    let first = put(&s, "Cast", "", "fw", ver(10, 1), None);
    store(h, NOW, &acct, &first, true)?;
    let one = h.fanout_step().or_fail("a fan-out step")?;
    ensure!(
        one.as_ref().is_some_and(|s| s.len() == batch),
        "one step of the first write: {one:?}"
    );
    // A second write of the key before the first fan-out ended: every device needs an entry
    // newer than it, whether the first write reached it or not.
    let before = heads(h, &devices)?;
    let second = put(&s, "Cast", "", "fw", ver(20, 1), None);
    store(h, NOW, &acct, &second, true)?;
    let (steps, _) = settle_fanout(h, batch)?;
    ensure_eq!(steps, 3, "the second write's fan-out started over");
    for (d, b) in devices.iter().zip(&before) {
        let page = feed(h, d, *b, 10)?;
        ensure!(
            page.head == b + 1
                && page.changes.len() == 1
                && page.changes[0].1.version == second.version,
            "{d} receives the second write once after its head {b}: {page:?}"
        );
    }
    // A delete's fan-out, pending when retention purges the tombstone: it ends, and the devices
    // it had not reached lose the key's older entry (their floors rise: a resync).
    let before = heads(h, &devices)?;
    let gone = del(&s, "Cast", "", "fw", ver(30, 1), None);
    store(h, T0, &acct, &gone, true)?;
    let purged = h.purge(NOW, 1000).or_fail("purging")?;
    ensure_eq!(purged, 1, "the tombstone purged");
    ensure_eq!(
        h.fanout_step().or_fail("a fan-out step")?,
        None,
        "the purge ended the fan-out"
    );
    for (d, b) in devices.iter().zip(&before) {
        let page = feed(h, d, *b, 10)?;
        ensure!(
            page.changes.iter().all(|(_, c)| c.key != gone.key),
            "{d} still has an entry of the purged key: {page:?}"
        );
        ensure!(
            page.resync_required,
            "{d} lost an entry of the purged key and must resync: {page:?}"
        );
    }
    Ok(())
}

fn a_rolled_back_broadcast_leaves_no_fan_out<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    let (devices, _) = large_account(h)?;
    let s = schema();
    let before = heads(h, &devices)?;
    let acct = Owner::Account(ACCOUNT.into());
    let c = put(&s, "Cast", "", "fw", ver(10, 1), None);
    store_then(h, NOW, &acct, &c, true, false)?;
    ensure_eq!(
        h.fanout_step().or_fail("a fan-out step")?,
        None,
        "no fan-out pending"
    );
    ensure_eq!(heads(h, &devices)?, before, "no feed moved");
    Ok(())
}

fn snapshot_pages_cover_each_live_down_row_once_in_order<H: CloudStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let acct = Owner::Account(ACCOUNT.into());
    let other_acct = Owner::Account(OTHER_ACCOUNT.into());
    let mut want = Vec::new();
    for (model, name) in [
        ("Dev", "b"),
        ("Dev", "a"),
        ("Other", "a"),
        ("Alt", "c"),
        ("Down", "a"),
    ] {
        let c = put(&s, model, "d1", name, ver(10, 1), None);
        store(h, NOW, &o, &c, true)?;
        want.push(c);
    }
    for name in ["b", "a"] {
        let c = put(&s, "Cast", "", name, ver(11, 1), None);
        store(h, NOW, &acct, &c, true)?;
        want.push(c);
    }
    // Not for d1: up-only rows, tombstones, another device's rows, another account's broadcast.
    store(
        h,
        NOW,
        &o,
        &put(&s, "Up", "d1", "a", ver(12, 1), None),
        false,
    )?;
    store(
        h,
        NOW,
        &o,
        &del(&s, "Dev", "d1", "t", ver(12, 1), None),
        true,
    )?;
    store(
        h,
        NOW,
        &own(&d2()),
        &put(&s, "Dev", "d2", "z", ver(12, 1), None),
        true,
    )?;
    store(
        h,
        NOW,
        &other_acct,
        &put(&s, "Cast", "", "z", ver(12, 1), None),
        true,
    )?;
    want.sort_by(|a, b| (&a.model, &a.key).cmp(&(&b.model, &b.key)));
    let head_now = head(h, &d1())?;
    for limit in [1usize, 2, 3, 100] {
        let mut got: Vec<Change> = Vec::new();
        let mut from: Option<SnapshotCursor> = None;
        for page_no in 0..100 {
            let page = h
                .read_snapshot(&s, &d1(), 7, from.as_ref(), limit)
                .or_fail("reading a snapshot page")?;
            ensure_eq!(page.resync, 7, "the page echoes its resync");
            if page_no == 0 {
                ensure_eq!(
                    page.cursor,
                    head_now,
                    "the first page carries the feed head"
                );
            }
            ensure!(
                page.items.len() <= limit,
                "page over its limit {limit}: {}",
                page.items.len()
            );
            ensure!(
                page.unreadable.is_empty(),
                "unreadable rows: {:?}",
                page.unreadable
            );
            got.extend(page.items.iter().cloned());
            match page.next {
                Some(n) => {
                    let last = page
                        .items
                        .last()
                        .ok_or("a page with a next must hold items")?;
                    ensure!(
                        n.model == last.model && n.key == last.key,
                        "next {n:?} is not the page's last item"
                    );
                    from = Some(n);
                }
                None => break,
            }
        }
        let summary = |v: &[Change]| {
            v.iter()
                .map(|c| format!("{}/{}", c.model, c.key.sk))
                .collect::<Vec<_>>()
        };
        ensure_eq!(
            summary(&got),
            summary(&want),
            "snapshot items (limit {limit})"
        );
        for (g, w) in got.iter().zip(&want) {
            ensure!(
                g.op == Op::Put && g.item == w.item && g.version == w.version,
                "snapshot item {g:?} differs from the stored row {w:?}"
            );
        }
    }
    Ok(())
}

fn purge_removes_old_tombstones_with_their_feed_entries<H: CloudStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let h0 = head(h, &d1())?;
    let a = del(&s, "Dev", "d1", "a", ver(10, 1), None);
    let b = put(&s, "Dev", "d1", "b", ver(11, 1), None);
    let c = del(&s, "Dev", "d1", "c", ver(5, 1), None);
    store(h, T0, &o, &a, true)?;
    store(h, T0, &o, &b, true)?;
    store(h, T0 + 5000, &o, &c, true)?;
    let removed = h.purge(T0 + 6000, 2000).or_fail("purging")?;
    ensure_eq!(removed, 1, "tombstones purged");
    ensure_eq!(row(h, &o, &a.key)?, None, "the old tombstone");
    ensure_eq!(
        row(h, &o, &b.key)?,
        Some(row_of(&b)),
        "a live row older than retention"
    );
    ensure_eq!(row(h, &o, &c.key)?, Some(row_of(&c)), "a recent tombstone");
    ensure_eq!(
        watermark(h, &o)?,
        Some(a.version),
        "the owner's purge watermark"
    );
    let page = feed(h, &d1(), h0, 10)?;
    ensure!(
        page.resync_required,
        "a cursor below the purged entry needs a resync: {page:?}"
    );
    let page = feed(h, &d1(), h0 + 1, 10)?;
    ensure!(
        !page.resync_required,
        "the purged entry's cursor reads on: {page:?}"
    );
    ensure_eq!(
        keys_of(&page),
        vec![b.key.clone(), c.key.clone()],
        "entries left"
    );
    Ok(())
}

fn purge_watermark_only_rises_and_is_per_owner<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let acct = Owner::Account(ACCOUNT.into());
    store(
        h,
        T0,
        &o,
        &del(&s, "Dev", "d1", "a", ver(50, 1), None),
        true,
    )?;
    store(
        h,
        T0,
        &o,
        &del(&s, "Dev", "d1", "b", ver(40, 1), None),
        true,
    )?;
    h.purge(T0 + 10_000, 1000).or_fail("purging")?;
    ensure_eq!(
        watermark(h, &o)?,
        Some(ver(50, 1)),
        "the highest purged version"
    );
    // A later purge of a lower version leaves the watermark.
    store(
        h,
        T0 + 20_000,
        &o,
        &del(&s, "Dev", "d1", "c", ver(30, 1), None),
        true,
    )?;
    store(
        h,
        T0 + 20_000,
        &acct,
        &del(&s, "Cast", "", "c", ver(60, 1), None),
        true,
    )?;
    let n = h.purge(T0 + 30_000, 1000).or_fail("purging")?;
    ensure_eq!(n, 2, "tombstones purged");
    ensure_eq!(
        watermark(h, &o)?,
        Some(ver(50, 1)),
        "the watermark never falls"
    );
    ensure_eq!(
        watermark(h, &own(&d2()))?,
        None,
        "another device's watermark"
    );
    ensure_eq!(
        watermark(h, &acct)?,
        Some(ver(60, 1)),
        "the account's watermark"
    );
    // The broadcast tombstone left every device feed of the account: old cursors resync.
    let page = feed(h, &d2(), 1, 10)?;
    ensure!(
        page.resync_required,
        "d2 below the purged broadcast entry: {page:?}"
    );
    Ok(())
}

fn max_version_covers_items_tombstones_and_watermarks<H: CloudStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    ensure_eq!(h.max_version().or_fail("max")?, None, "an empty store");
    store(
        h,
        T0,
        &o,
        &put(&s, "Dev", "d1", "a", ver(10, 1), None),
        false,
    )?;
    ensure_eq!(
        h.max_version().or_fail("max")?,
        Some(ver(10, 1)),
        "one item"
    );
    store(
        h,
        T0,
        &own(&d2()),
        &del(&s, "Dev", "d2", "b", ver(20, 2), None),
        false,
    )?;
    ensure_eq!(
        h.max_version().or_fail("max")?,
        Some(ver(20, 2)),
        "a tombstone"
    );
    h.purge(T0 + 10_000, 1000).or_fail("purging")?;
    ensure_eq!(
        h.max_version().or_fail("max")?,
        Some(ver(20, 2)),
        "a purged tombstone's watermark"
    );
    Ok(())
}

fn count_push_adds_up<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    h.txn(NOW, true, |t| {
        t.count_push(
            &d1(),
            &PushCounts {
                applied: 1,
                duplicates: 6,
                superseded: 2,
                rejected: 3,
            },
        )?;
        t.count_push(
            &d1(),
            &PushCounts {
                applied: 4,
                duplicates: 0,
                superseded: 0,
                rejected: 1,
            },
        )
    })
    .or_fail("counting")?;
    h.txn(NOW, true, |t| {
        t.count_push(
            &d1(),
            &PushCounts {
                applied: 10,
                duplicates: 0,
                superseded: 0,
                rejected: 0,
            },
        )
    })
    .or_fail("counting")?;
    ensure_eq!(
        h.push_counts(&d1()).or_fail("counts")?,
        PushCounts {
            applied: 15,
            duplicates: 6,
            superseded: 2,
            rejected: 4
        },
        "d1's counters"
    );
    ensure_eq!(
        feed(h, &d1(), 1, 1)?.answered,
        27,
        "d1's answered count: every change of every push"
    );
    ensure_eq!(feed(h, &d2(), 1, 1)?.answered, 0, "d2's answered count");
    ensure_eq!(
        h.push_counts(&d2()).or_fail("counts")?,
        PushCounts::default(),
        "d2's counters"
    );
    Ok(())
}

fn conflicts_are_logged_per_account<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    h.txn(NOW, true, |t| {
        t.log_conflict(&conflict_of(&o, &a))?;
        t.log_conflict(&conflict_of(&o, &a))
    })
    .or_fail("logging conflicts")?;
    ensure_eq!(
        h.conflicts(ACCOUNT).or_fail("conflicts")?,
        2,
        "conflicts of acme"
    );
    ensure_eq!(
        h.conflicts(OTHER_ACCOUNT).or_fail("conflicts")?,
        0,
        "conflicts of globex"
    );
    Ok(())
}

fn applied() -> ChangeStatus {
    ChangeStatus::Applied
}

fn push_stores_under_the_sender_and_replays_are_duplicates<H: CloudStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    setup(h)?;
    let s = schema();
    let h0 = head(h, &d1())?;
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    ensure_eq!(
        push(h, NOW, &d1(), std::slice::from_ref(&a))?,
        vec![applied()],
        "first push"
    );
    ensure_eq!(
        row(h, &own(&d1()), &a.key)?,
        Some(row_of(&a)),
        "stored under the sender"
    );
    ensure_eq!(
        push(h, NOW, &d1(), std::slice::from_ref(&a))?,
        vec![applied()],
        "a replay"
    );
    let page = feed(h, &d1(), h0, 10)?;
    ensure_eq!(
        keys_of(&page),
        vec![a.key.clone()],
        "the echo in the sender's feed"
    );
    // d2 pushing an item that names d1 is refused and stored nowhere.
    let theirs = put(&s, "Dev", "d1", "b", ver(11, 2), None);
    let st = push(h, NOW, &d2(), std::slice::from_ref(&theirs))?;
    ensure_eq!(
        st,
        vec![ChangeStatus::Rejected {
            reason: RejectReason::Ownership
        }],
        "ownership"
    );
    ensure_eq!(
        row(h, &own(&d1()), &theirs.key)?,
        None,
        "the refused row under d1"
    );
    ensure_eq!(
        row(h, &own(&d2()), &theirs.key)?,
        None,
        "the refused row under d2"
    );
    ensure_eq!(
        h.push_counts(&d1()).or_fail("counts")?,
        PushCounts {
            applied: 1,
            duplicates: 1,
            superseded: 0,
            rejected: 0
        },
        "d1 counts one write and one duplicate for a push and its replay"
    );
    ensure_eq!(
        h.push_counts(&d2()).or_fail("counts")?,
        PushCounts {
            applied: 0,
            duplicates: 0,
            superseded: 0,
            rejected: 1
        },
        "d2's refusal is counted"
    );
    Ok(())
}

fn stale_push_returns_the_winner_and_feeds_it_back<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let new = put(&s, "Dev", "d1", "a", ver(20, 2), None);
    let old = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    push(h, NOW, &d1(), std::slice::from_ref(&new))?;
    let h1 = head(h, &d1())?;
    let st = push(h, NOW, &d1(), std::slice::from_ref(&old))?;
    ensure_eq!(
        st,
        vec![ChangeStatus::Stale {
            winner: new.version
        }],
        "the older write"
    );
    ensure_eq!(
        row(h, &own(&d1()), &new.key)?,
        Some(row_of(&new)),
        "the winner stays"
    );
    let page = feed(h, &d1(), h1, 10)?;
    ensure!(
        page.head > h1,
        "the winner is fed back to the loser: head {} <= {h1}",
        page.head
    );
    ensure_eq!(keys_of(&page), vec![new.key.clone()], "the re-appended key");
    ensure_eq!(
        page.changes[0].1.version,
        new.version,
        "the feed carries the winner"
    );
    ensure_eq!(
        h.push_counts(&d1()).or_fail("counts")?,
        PushCounts {
            applied: 1,
            duplicates: 0,
            superseded: 1,
            rejected: 0
        },
        "counters"
    );
    ensure_eq!(
        h.conflicts(ACCOUNT).or_fail("conflicts")?,
        1,
        "the lost race is logged"
    );
    Ok(())
}

fn wrong_model_push_is_refused_until_the_row_is_a_tombstone<H: CloudStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    setup(h)?;
    let s = schema();
    let dev_a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    push(h, NOW, &d1(), std::slice::from_ref(&dev_a))?;
    let alt_a = put(&s, "Alt", "d1", "a", ver(20, 1), None);
    let st = push(h, NOW, &d1(), std::slice::from_ref(&alt_a))?;
    ensure_eq!(
        st,
        vec![ChangeStatus::Rejected {
            reason: RejectReason::WrongModel {
                stored: "Dev".into()
            }
        }],
        "a write of Alt over a live Dev item"
    );
    ensure_eq!(
        row(h, &own(&d1()), &dev_a.key)?,
        Some(row_of(&dev_a)),
        "the Dev row stays"
    );
    let gone = del(&s, "Dev", "d1", "a", ver(30, 1), Some(dev_a.version));
    ensure_eq!(
        push(h, NOW, &d1(), std::slice::from_ref(&gone))?,
        vec![applied()],
        "the delete"
    );
    let alt_b = put(&s, "Alt", "d1", "a", ver(40, 1), Some(gone.version));
    ensure_eq!(
        push(h, NOW, &d1(), std::slice::from_ref(&alt_b))?,
        vec![applied()],
        "Alt after it"
    );
    ensure_eq!(
        row(h, &own(&d1()), &alt_b.key)?,
        Some(row_of(&alt_b)),
        "the Alt row"
    );
    ensure_eq!(
        h.push_counts(&d1()).or_fail("counts")?,
        PushCounts {
            applied: 3,
            duplicates: 0,
            superseded: 0,
            rejected: 1
        },
        "counters"
    );
    Ok(())
}

fn every_write_meets_the_watermark_of_a_purged_key<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let gone = del(&s, "Dev", "d1", "a", ver(20, 1), Some(a.version));
    push(h, T0, &d1(), &[a.clone(), gone.clone()])?;
    let purge_at = T0 + 10 * 60_000;
    ensure_eq!(
        h.purge(purge_at, 60_000).or_fail("purging")?,
        1,
        "tombstones purged"
    );
    ensure_eq!(row(h, &o, &a.key)?, None, "the purged row");
    let h1 = head(h, &d1())?;
    // Written before the delete by a device that knew the key (base): it lost to the delete.
    let late = put(&s, "Dev", "d1", "a", ver(15, 3), Some(a.version));
    let st = push(h, purge_at, &d1(), std::slice::from_ref(&late))?;
    ensure_eq!(
        st,
        vec![ChangeStatus::Stale {
            winner: gone.version
        }],
        "a late write"
    );
    let tombstone = |version| StoredRow {
        model: "Dev".into(),
        version,
        deleted: true,
        base: None,
    };
    ensure_eq!(
        row(h, &o, &a.key)?,
        Some(tombstone(gone.version)),
        "the purged tombstone is back so the feed delivers it"
    );
    let page = feed(h, &d1(), h1, 10)?;
    ensure!(
        page.changes
            .iter()
            .any(|(_, c)| c.key == a.key && c.op == Op::Delete),
        "the feed delivers the winning delete: {page:?}"
    );
    // A create (no base) below the watermark loses the same way, whatever its key: it may be a
    // create whose acknowledgement was lost, resent after the delete was purged.
    let resent = put(&s, "Dev", "d1", "r", ver(12, 3), None);
    ensure_eq!(
        push(h, purge_at, &d1(), std::slice::from_ref(&resent))?,
        vec![ChangeStatus::Stale {
            winner: gone.version
        }],
        "a create below the watermark"
    );
    ensure_eq!(
        row(h, &o, &resent.key)?,
        Some(tombstone(gone.version)),
        "a tombstone at the watermark, fed to the device"
    );
    // Newer writes apply, with or without a base.
    let newer = put(&s, "Dev", "d1", "a", ver(30, 3), Some(a.version));
    ensure_eq!(
        push(h, purge_at, &d1(), std::slice::from_ref(&newer))?,
        vec![applied()],
        "newer"
    );
    let fresh = put(&s, "Dev", "d1", "f", ver(21, 3), None);
    ensure_eq!(
        push(h, purge_at, &d1(), std::slice::from_ref(&fresh))?,
        vec![applied()],
        "a create above the watermark"
    );
    // The watermark is per owner: d2 never purged anything.
    let theirs = put(&s, "Dev", "d2", "r", ver(12, 4), None);
    ensure_eq!(
        push(h, purge_at, &d2(), std::slice::from_ref(&theirs))?,
        vec![applied()],
        "another owner's create"
    );
    Ok(())
}

fn a_feed_starts_a_new_generation_once_per_run<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let fresh = feed(h, &d1(), 1, 10)?;
    ensure_eq!(
        fresh.generations,
        vec![FeedGeneration { gen: 0, base: 0 }],
        "a new feed's generations"
    );
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    store(h, NOW, &o, &a, true)?;
    let first = feed(h, &d1(), 1, 10)?;
    ensure!(
        first.generations.len() == 2
            && first.gen() != 0
            && first.generations[1].base == fresh.head
            && first.head == fresh.head + 1,
        "the run's first append starts a generation at the head it took over: {first:?}"
    );
    let b = put(&s, "Dev", "d1", "b", ver(11, 1), None);
    store(h, NOW, &o, &b, true)?;
    let same = feed(h, &d1(), 1, 10)?;
    ensure_eq!(
        same.generations,
        first.generations,
        "a second append of the run"
    );
    h.new_run().or_fail("a new run")?;
    let before = feed(h, &d1(), 1, 10)?;
    ensure_eq!(
        before.generations,
        first.generations,
        "a new run before it appends"
    );
    let c = put(&s, "Dev", "d1", "c", ver(12, 1), None);
    store(h, NOW, &o, &c, true)?;
    let after = feed(h, &d1(), 1, 10)?;
    let mut want = first.generations.clone();
    want.push(FeedGeneration {
        gen: after.gen(),
        base: before.head,
    });
    ensure!(
        after.gen() != first.gen() && after.gen() != 0,
        "a new run's generation: {after:?}"
    );
    ensure_eq!(after.generations, want, "the generations after a new run");
    ensure_eq!(after.head, before.head + 1, "the head still moves by one");
    // A rolled-back append starts nothing.
    h.new_run().or_fail("a new run")?;
    h.txn(NOW, false, |t| t.append_feed(&o, &c.model, &c.key))
        .or_fail("a rolled-back append")?;
    let kept = feed(h, &d1(), 1, 10)?;
    ensure_eq!(
        (kept.generations.clone(), kept.head),
        (after.generations.clone(), after.head),
        "after a rolled-back append"
    );
    // Broadcast appends move every device's generation; snapshot pages tell it too.
    let (cast, cast_key) = item(&s, "Cast", "", "fw", 5);
    let acct = Owner::Account(ACCOUNT.into());
    h.txn(NOW, true, |t| {
        t.write_row(&RowWrite {
            owner: &acct,
            model: "Cast",
            key: &cast_key,
            item: Some(&cast),
            version: ver(13, 1),
            base: None,
        })?;
        t.append_feed(&acct, "Cast", &cast_key)
    })
    .or_fail("a broadcast append")?;
    let d1_page = feed(h, &d1(), 1, 10)?;
    let d2_page = feed(h, &d2(), 1, 10)?;
    ensure!(
        d1_page.gen() != after.gen() && d1_page.gen() == d2_page.gen(),
        "the run's generation on every device of the account: {d1_page:?} {d2_page:?}"
    );
    let x1_page = feed(h, &x1(), 1, 10)?;
    ensure_eq!(
        x1_page.generations,
        vec![FeedGeneration { gen: 0, base: 0 }],
        "a device of another account"
    );
    let snap = h
        .read_snapshot(&s, &d1(), 9, None, 10)
        .or_fail("a snapshot page")?;
    ensure_eq!(snap.gen, d1_page.gen(), "the snapshot page's generation");
    // The oldest generations go first, past the bound.
    for i in 0..MAX_FEED_GENERATIONS {
        h.new_run().or_fail("a new run")?;
        let k = put(
            &s,
            "Dev",
            "d1",
            &format!("g{i}"),
            ver(20 + i as u64, 1),
            None,
        );
        store(h, NOW, &o, &k, true)?;
    }
    let many = feed(h, &d1(), 1, 10)?;
    ensure_eq!(
        many.generations.len(),
        MAX_FEED_GENERATIONS,
        "generations kept"
    );
    ensure!(
        many.generations.windows(2).all(|w| w[0].base < w[1].base),
        "oldest first: {:?}",
        many.generations
    );
    Ok(())
}

fn pushes_count_every_answer_in_their_transaction<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let new = put(&s, "Dev", "d1", "a", ver(20, 1), None);
    let old = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let theirs = put(&s, "Dev", "d2", "b", ver(11, 1), None);
    ensure_eq!(feed(h, &d1(), 1, 1)?.answered, 0, "before any push");
    push(h, NOW, &d1(), std::slice::from_ref(&new))?;
    ensure_eq!(feed(h, &d1(), 1, 1)?.answered, 1, "a written change");
    let st = push(h, NOW, &d1(), &[new.clone(), old, theirs])?;
    ensure_eq!(
        st,
        vec![
            applied(),
            ChangeStatus::Stale {
                winner: new.version
            },
            ChangeStatus::Rejected {
                reason: RejectReason::Ownership
            }
        ],
        "a duplicate, a stale and a refused change"
    );
    ensure_eq!(
        feed(h, &d1(), 1, 1)?.answered,
        4,
        "every answer counts, whatever its verdict"
    );
    // A push rolled back counts nothing.
    let s2 = schema();
    let mut clock = HlcClock::new(99);
    let later = put(&s, "Dev", "d1", "c", ver(30, 1), None);
    h.txn(NOW, false, |t| {
        cloud_apply_push(
            &mut DynCloud(t),
            &s2,
            &mut clock,
            NOW,
            &PushRules::default(),
            &d1(),
            std::slice::from_ref(&later),
        )
    })
    .or_fail("a rolled-back push")?;
    ensure_eq!(
        feed(h, &d1(), 1, 1)?.answered,
        4,
        "after a rolled-back push"
    );
    ensure_eq!(feed(h, &d2(), 1, 1)?.answered, 0, "another device's count");
    Ok(())
}

fn versions_beyond_the_drift_bound_are_refused<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let far = Hlc {
        wall_ms: NOW + DEFAULT_MAX_DRIFT_MS + 1,
        counter: 0,
        node: 1,
    };
    let c = put(&s, "Dev", "d1", "a", far, None);
    let st = push(h, NOW, &d1(), std::slice::from_ref(&c))?;
    ensure_eq!(
        st,
        vec![ChangeStatus::Rejected {
            reason: RejectReason::VersionAhead {
                cloud_ms: NOW,
                max_drift_ms: DEFAULT_MAX_DRIFT_MS
            }
        }],
        "a version past the drift bound"
    );
    ensure_eq!(row(h, &own(&d1()), &c.key)?, None, "nothing stored");
    let edge = Hlc {
        wall_ms: NOW + DEFAULT_MAX_DRIFT_MS,
        counter: u32::MAX,
        node: u64::MAX,
    };
    let c = put(&s, "Dev", "d1", "a", edge, None);
    ensure_eq!(
        push(h, NOW, &d1(), std::slice::from_ref(&c))?,
        vec![applied()],
        "at the bound"
    );
    ensure_eq!(h.max_version().or_fail("max")?, Some(edge), "max version");
    Ok(())
}

fn api_writes_order_after_the_stored_version<H: CloudStoreUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let o = own(&d1());
    let ahead = put(&s, "Dev", "d1", "a", ver(100_000 + 50_000, 1), None);
    push(h, NOW, &d1(), std::slice::from_ref(&ahead))?;
    let mut clock = HlcClock::new(77);
    let (fields, _) = item(&s, "Dev", "d1", "a", 5);
    let h1 = head(h, &d1())?;
    let c = api(h, &mut clock, NOW, &o, "Dev", CloudOp::Put(fields))?
        .map_err(|e| format!("an API write was refused: {e}"))?;
    ensure!(
        c.version > ahead.version,
        "API version {} not after {}",
        c.version,
        ahead.version
    );
    ensure_eq!(c.base, Some(ahead.version), "the API write's base");
    ensure_eq!(
        row(h, &o, &c.key)?.map(|r| r.version),
        Some(c.version),
        "the stored version"
    );
    ensure_eq!(
        feed(h, &d1(), h1, 10)?.changes.len(),
        1,
        "the API write is fed"
    );
    // Refusals, each leaving the store as it was.
    let (alt, _) = item(&s, "Alt", "d1", "a", 5);
    let r = api(h, &mut clock, NOW, &o, "Alt", CloudOp::Put(alt))?;
    ensure!(
        r.is_err(),
        "an API write of Alt over a live Dev item: {r:?}"
    );
    let (up, up_key) = item(&s, "Up", "d1", "u", 5);
    let r = api(h, &mut clock, NOW, &o, "Up", CloudOp::Put(up))?;
    ensure!(r.is_err(), "an API write of an up-only model: {r:?}");
    ensure_eq!(row(h, &o, &up_key)?, None, "no up-only row");
    let (cast, cast_key) = item(&s, "Cast", "", "fw", 5);
    let r = api(h, &mut clock, NOW, &o, "Cast", CloudOp::Put(cast.clone()))?;
    ensure!(r.is_err(), "a broadcast model with a device owner: {r:?}");
    let h2 = head(h, &d2())?;
    let acct = Owner::Account(ACCOUNT.into());
    api(h, &mut clock, NOW, &acct, "Cast", CloudOp::Put(cast))?
        .map_err(|e| format!("a broadcast write was refused: {e}"))?;
    ensure!(row(h, &acct, &cast_key)?.is_some(), "the broadcast row");
    ensure_eq!(
        feed(h, &d2(), h2, 10)?.changes.len(),
        1,
        "d2 is fed the broadcast write"
    );
    ensure_eq!(
        row(h, &o, &c.key)?.map(|r| r.model),
        Some("Dev".to_string()),
        "Dev holds a"
    );
    Ok(())
}
