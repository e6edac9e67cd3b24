//! The device-store checks: the [`DeviceTxn`] contract (one row per key, tombstones keep their
//! version, pending entries, resync marks and sweeps, the cursor in the same transaction), local
//! writes and restore, and `device_apply` run through the store.

use devtables_schema::ItemKey;
use devtables_sync::apply::{device_apply, ApplyOutcome, ApplyPage, FeedMark, StoredVersion};
use devtables_sync::cloud::SnapshotCursor;
use devtables_sync::hlc::{Hlc, HlcClock};
use devtables_sync::wire::{Change, Op};

use crate::{
    del, ensure, ensure_eq, fields, item, put, schema, ver, Check, DeviceStoreUnderTest, DynDevice,
    OrFail, Outcome, T0,
};

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        vec![$(Check { name: stringify!($name), run: $name::<H> }),*]
    };
}

pub(crate) fn checks<H: DeviceStoreUnderTest>() -> Vec<Check<H>> {
    checks![
        put_remote_is_read_back_with_model_and_version,
        a_row_is_identified_by_its_key_alone,
        a_remote_delete_keeps_a_tombstone_at_its_version,
        a_transaction_reads_its_own_writes,
        rolled_back_transaction_leaves_nothing,
        the_cursor_is_stored_in_the_same_transaction,
        local_writes_record_one_pending_entry_per_key,
        a_local_write_builds_on_the_stored_version,
        acknowledged_entries_leave_only_at_their_version,
        a_newer_remote_write_takes_the_pending_entry_it_beat,
        sweep_deletes_only_unseen_unpending_down_items,
        resync_clear_forgets_the_marks,
        apply_keeps_the_highest_version,
        apply_refuses_a_change_of_another_model_at_a_held_key,
        apply_ignores_models_the_device_does_not_sync_down,
        a_swept_tombstone_is_revived_by_the_same_version,
        the_final_snapshot_page_sweeps_and_stores_its_cursor,
        restore_returns_the_outbox_cursor_and_clock,
        the_feed_mark_is_stored_with_its_page,
        the_answered_count_goes_with_the_outbox_trim,
        repush_requeues_every_held_write_of_up_syncing_models,
        a_restore_resync_sets_cloud_only_models_back,
    ]
}

const D: &str = "d1";

fn key(model: &str, name: &str) -> ItemKey {
    item(&schema(), model, D, name, 0).1
}

fn remote_put<H: DeviceStoreUnderTest>(h: &mut H, c: &Change) -> Outcome {
    let item = c.item.clone().ok_or("a put carries its item")?;
    h.txn(true, |t| t.put_remote(&c.model, &c.key, item, c.version))
        .or_fail("storing a remote item")
}

fn remote_delete<H: DeviceStoreUnderTest>(h: &mut H, c: &Change) -> Outcome {
    h.txn(true, |t| t.delete_remote(&c.model, &c.key, c.version))
        .or_fail("storing a remote delete")
}

fn local<H: DeviceStoreUnderTest>(h: &mut H, model: &str, name: &str, delete: bool) -> Outcome {
    let f = fields(&schema(), model, D, name, 3);
    h.local_write(model, &f, delete, T0)
        .or_fail("a local write")
}

fn version<H: DeviceStoreUnderTest>(
    h: &mut H,
    k: &ItemKey,
) -> Result<Option<StoredVersion>, String> {
    h.version(k).or_fail("reading a version")
}

fn live_model<H: DeviceStoreUnderTest>(h: &mut H, k: &ItemKey) -> Result<Option<String>, String> {
    Ok(h.item(k).or_fail("reading an item")?.map(|(m, _)| m))
}

fn pending<H: DeviceStoreUnderTest>(h: &mut H, model: &str, k: &ItemKey) -> Result<bool, String> {
    h.txn(false, |t| t.has_pending(model, k))
        .or_fail("reading has_pending")
}

fn apply<H: DeviceStoreUnderTest>(h: &mut H, page: &ApplyPage) -> Result<ApplyOutcome, String> {
    let s = schema();
    let mut clock = HlcClock::new(5);
    h.txn(true, |t| {
        device_apply(&mut DynDevice(t), &s, &mut clock, T0, page).map_err(|e| match e {
            devtables_sync::apply::ApplyError::Store(e) => e,
        })
    })
    .or_fail("applying a page")
}

fn feed(from: u64, changes: Vec<Change>) -> ApplyPage {
    ApplyPage::Feed {
        from,
        to: from + 1,
        changes,
        mark: None,
    }
}

fn sv(version: Hlc, deleted: bool) -> Option<StoredVersion> {
    Some(StoredVersion { version, deleted })
}

fn put_remote_is_read_back_with_model_and_version<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    remote_put(h, &a)?;
    ensure_eq!(
        version(h, &a.key)?,
        sv(a.version, false),
        "the stored version"
    );
    ensure_eq!(
        h.item(&a.key).or_fail("item")?,
        Some(("Dev".to_string(), a.item.clone().unwrap_or_default())),
        "the item"
    );
    let (model, via) = h
        .txn(false, |t| {
            Ok((t.live_model(&a.key)?, t.stored_version("Dev", &a.key)?))
        })
        .or_fail("reading through the transaction")?;
    ensure_eq!(model, Some("Dev".to_string()), "live_model");
    ensure_eq!(via, sv(a.version, false), "stored_version");
    ensure!(
        !pending(h, "Dev", &a.key)?,
        "a remote write records no outbox entry"
    );
    ensure!(
        h.restore().or_fail("restore")?.outbox.is_empty(),
        "no outbox after a remote write"
    );
    Ok(())
}

fn a_row_is_identified_by_its_key_alone<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    remote_put(h, &a)?;
    // Alt's key collides with Dev's: the store holds one row for the key, whatever model asks.
    let seen = h
        .txn(false, |t| t.stored_version("Alt", &a.key))
        .or_fail("stored_version under the other model")?;
    ensure_eq!(
        seen,
        sv(a.version, false),
        "the version of the key asked under Alt"
    );
    remote_delete(h, &del(&s, "Dev", D, "a", ver(20, 1), None))?;
    let alt = put(&s, "Alt", D, "a", ver(30, 1), None);
    remote_put(h, &alt)?;
    ensure_eq!(
        live_model(h, &a.key)?,
        Some("Alt".to_string()),
        "the model now holding the key"
    );
    let seen = h
        .txn(false, |t| t.stored_version("Dev", &a.key))
        .or_fail("stored_version under the first model")?;
    ensure_eq!(
        seen,
        sv(alt.version, false),
        "the version of the key asked under Dev"
    );
    Ok(())
}

fn a_remote_delete_keeps_a_tombstone_at_its_version<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    remote_put(h, &a)?;
    let gone = del(&s, "Dev", D, "a", ver(20, 1), None);
    remote_delete(h, &gone)?;
    ensure_eq!(h.item(&a.key).or_fail("item")?, None, "the deleted item");
    ensure_eq!(live_model(h, &a.key)?, None, "live_model of a tombstone");
    ensure_eq!(
        version(h, &a.key)?,
        sv(gone.version, true),
        "the tombstone's version"
    );
    // A delete of a key never seen still records its version.
    let never = del(&s, "Other", D, "n", ver(5, 2), None);
    remote_delete(h, &never)?;
    ensure_eq!(
        version(h, &never.key)?,
        sv(never.version, true),
        "a tombstone of an unknown key"
    );
    Ok(())
}

fn a_transaction_reads_its_own_writes<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    let item = a.item.clone().unwrap_or_default();
    let (v, m) = h
        .txn(true, |t| {
            t.put_remote("Dev", &a.key, item, a.version)?;
            Ok((t.stored_version("Dev", &a.key)?, t.live_model(&a.key)?))
        })
        .or_fail("write then read")?;
    ensure_eq!(
        v,
        sv(a.version, false),
        "the version read in the writing transaction"
    );
    ensure_eq!(
        m,
        Some("Dev".to_string()),
        "the model read in the writing transaction"
    );
    Ok(())
}

fn rolled_back_transaction_leaves_nothing<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    let b = put(&s, "Dev", D, "b", ver(10, 1), None);
    remote_put(h, &b)?;
    let item = a.item.clone().unwrap_or_default();
    h.txn(false, |t| {
        t.put_remote("Dev", &a.key, item, a.version)?;
        t.delete_remote("Dev", &b.key, ver(20, 1))?;
        t.resync_mark_seen("Dev", &b.key)?;
        t.set_cursor(99)
    })
    .or_fail("a rolled-back transaction")?;
    ensure_eq!(h.item(&a.key).or_fail("item")?, None, "a rolled-back put");
    ensure_eq!(version(h, &a.key)?, None, "a rolled-back put's version");
    ensure_eq!(
        version(h, &b.key)?,
        sv(b.version, false),
        "a rolled-back delete"
    );
    ensure_eq!(
        h.restore().or_fail("restore")?.cursor,
        0,
        "a rolled-back cursor"
    );
    // The rolled-back mark is gone: a sweep now deletes b.
    let swept = h.txn(true, |t| t.resync_sweep()).or_fail("sweeping")?;
    ensure_eq!(
        swept,
        vec![("Dev".to_string(), b.key.clone())],
        "swept after the rollback"
    );
    Ok(())
}

fn the_cursor_is_stored_in_the_same_transaction<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    let item = a.item.clone().unwrap_or_default();
    h.txn(true, |t| {
        t.put_remote("Dev", &a.key, item, a.version)?;
        t.set_cursor(7)
    })
    .or_fail("a page and its cursor")?;
    ensure_eq!(h.restore().or_fail("restore")?.cursor, 7, "the cursor");
    ensure_eq!(version(h, &a.key)?, sv(a.version, false), "the page's item");
    h.txn(true, |t| t.set_cursor(u64::MAX))
        .or_fail("the largest cursor")?;
    ensure_eq!(
        h.restore().or_fail("restore")?.cursor,
        u64::MAX,
        "the largest cursor"
    );
    Ok(())
}

fn local_writes_record_one_pending_entry_per_key<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let k = key("Dev", "a");
    local(h, "Dev", "a", false)?;
    ensure!(
        pending(h, "Dev", &k)?,
        "a local write of a synced model is pending"
    );
    let first = h.restore().or_fail("restore")?.outbox;
    ensure_eq!(first.len(), 1, "outbox entries");
    ensure_eq!(first[0].base, None, "a create has no base");
    ensure_eq!(
        version(h, &k)?,
        sv(first[0].version, false),
        "the entry's version is the key's"
    );
    local(h, "Dev", "a", false)?;
    let second = h.restore().or_fail("restore")?.outbox;
    ensure_eq!(second.len(), 1, "a second write of the key coalesces");
    ensure!(
        second[0].version > first[0].version,
        "the coalesced entry is newer"
    );
    ensure_eq!(
        second[0].base,
        None,
        "a coalesced entry keeps the base the cloud knows"
    );
    ensure_eq!(
        version(h, &k)?,
        sv(second[0].version, false),
        "the key's version"
    );
    local(h, "Dev", "a", true)?;
    let third = h.restore().or_fail("restore")?.outbox;
    ensure!(
        third.len() == 1 && third[0].op == Op::Delete && third[0].item.is_none(),
        "a local delete replaces the entry: {third:?}"
    );
    ensure_eq!(
        version(h, &k)?,
        sv(third[0].version, true),
        "the local tombstone's version"
    );
    // A device-only model records nothing to send.
    local(h, "Local", "l", false)?;
    ensure!(
        !pending(h, "Local", &key("Local", "l"))?,
        "a device-only write is not pending"
    );
    ensure_eq!(
        h.restore().or_fail("restore")?.outbox.len(),
        1,
        "outbox entries"
    );
    Ok(())
}

fn a_local_write_builds_on_the_stored_version<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    // A remote version far ahead of any clock the store may stamp with.
    let ahead = Hlc {
        wall_ms: T0 + 10 * 365 * 86_400_000,
        counter: 3,
        node: 1,
    };
    let b = put(&s, "Other", D, "b", ahead, None);
    remote_put(h, &b)?;
    local(h, "Other", "b", false)?;
    let out = h.restore().or_fail("restore")?.outbox;
    ensure_eq!(out.len(), 1, "outbox entries");
    ensure_eq!(out[0].base, Some(ahead), "the base is the stored version");
    ensure!(
        out[0].version > ahead,
        "the local version {} orders after {ahead}",
        out[0].version
    );
    Ok(())
}

fn acknowledged_entries_leave_only_at_their_version<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    local(h, "Dev", "a", false)?;
    local(h, "Dev", "b", false)?;
    let out = h.restore().or_fail("restore")?.outbox;
    let (a, b) = (out[0].clone(), out[1].clone());
    let stale = Hlc {
        counter: a.version.counter.wrapping_add(1),
        ..a.version
    };
    h.outbox_remove(&[(a.model.clone(), a.key.clone(), stale)], None)
        .or_fail("removing")?;
    ensure_eq!(
        h.restore().or_fail("restore")?.outbox.len(),
        2,
        "an ack of another version"
    );
    h.outbox_remove(&[(a.model.clone(), a.key.clone(), a.version)], None)
        .or_fail("removing")?;
    let left = h.restore().or_fail("restore")?.outbox;
    ensure_eq!(left, vec![b.clone()], "the entry left");
    ensure!(!pending(h, "Dev", &a.key)?, "a is no longer pending");
    ensure!(pending(h, "Dev", &b.key)?, "b is still pending");
    Ok(())
}

fn a_newer_remote_write_takes_the_pending_entry_it_beat<H: DeviceStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    local(h, "Dev", "a", false)?;
    local(h, "Dev", "b", false)?;
    let out = h.restore().or_fail("restore")?.outbox;
    let (a, b) = (out[0].clone(), out[1].clone());
    // Not older than the pending change: the entry stays (and a rolled-back take leaves it).
    let same = h
        .txn(true, |t| t.take_superseded("Dev", &a.key, a.version))
        .or_fail("take_superseded")?;
    ensure_eq!(same, None, "an entry not older than the winner");
    let newer = Hlc {
        wall_ms: a.version.wall_ms + 1,
        ..a.version
    };
    let rolled_back = h
        .txn(false, |t| t.take_superseded("Dev", &a.key, newer))
        .or_fail("take_superseded")?;
    ensure_eq!(
        rolled_back,
        Some(a.clone()),
        "the lost change, read in the transaction"
    );
    ensure!(
        pending(h, "Dev", &a.key)?,
        "a rolled-back take leaves the entry"
    );
    // Older than the winner: taken, only it, and returned as it was queued.
    let taken = h
        .txn(true, |t| t.take_superseded("Dev", &a.key, newer))
        .or_fail("take_superseded")?;
    ensure_eq!(taken, Some(a.clone()), "the lost change");
    ensure!(!pending(h, "Dev", &a.key)?, "a is no longer pending");
    ensure_eq!(
        h.restore().or_fail("restore")?.outbox,
        vec![b.clone()],
        "only b is left to send"
    );
    // Applied through `device_apply`: the remote delete beats b's pending change.
    let s = schema();
    let winner = Hlc {
        wall_ms: b.version.wall_ms + 1,
        ..b.version
    };
    let outcome = apply(h, &feed(0, vec![del(&s, "Dev", D, "b", winner, None)]))?;
    ensure_eq!(
        outcome.superseded,
        vec![(b.clone(), winner)],
        "the page's outcome names the lost change and its winner"
    );
    ensure!(
        h.restore().or_fail("restore")?.outbox.is_empty(),
        "no entry is left to send"
    );
    Ok(())
}

fn sweep_deletes_only_unseen_unpending_down_items<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let seen = put(&s, "Dev", D, "a", ver(10, 1), None);
    let unseen = put(&s, "Dev", D, "b", ver(11, 1), None);
    let other = put(&s, "Other", D, "c", ver(12, 1), None);
    let down = put(&s, "Down", D, "d", ver(13, 1), None);
    for c in [&seen, &unseen, &other, &down] {
        remote_put(h, c)?;
    }
    local(h, "Dev", "p", false)?;
    local(h, "Local", "l", false)?;
    local(h, "Up", "u", false)?;
    // The device acknowledged u long ago: not pending, but up-only items are never swept.
    let up = h.restore().or_fail("restore")?.outbox;
    let u = up
        .iter()
        .find(|c| c.model == "Up")
        .ok_or("the Up entry")?
        .clone();
    h.outbox_remove(&[(u.model.clone(), u.key.clone(), u.version)], None)
        .or_fail("removing")?;
    let mut swept = h
        .txn(true, |t| {
            t.resync_clear()?;
            t.resync_mark_seen("Dev", &seen.key)?;
            t.resync_sweep()
        })
        .or_fail("a resync sweep")?;
    swept.sort();
    let mut want = vec![
        ("Dev".to_string(), unseen.key.clone()),
        ("Other".to_string(), other.key.clone()),
        ("Down".to_string(), down.key.clone()),
    ];
    want.sort();
    ensure_eq!(swept, want, "swept keys");
    for c in [&unseen, &other, &down] {
        ensure_eq!(h.item(&c.key).or_fail("item")?, None, "swept {}", c.key.sk);
        ensure_eq!(
            version(h, &c.key)?,
            sv(c.version, true),
            "a swept tombstone keeps its version"
        );
    }
    for k in [
        seen.key.clone(),
        key("Dev", "p"),
        key("Local", "l"),
        key("Up", "u"),
    ] {
        ensure!(
            h.item(&k).or_fail("item")?.is_some(),
            "{} survives the sweep",
            k.sk
        );
    }
    // The sweep cleared the marks: the next one deletes what was seen.
    let swept = h
        .txn(true, |t| t.resync_sweep())
        .or_fail("a second sweep")?;
    ensure_eq!(
        swept,
        vec![("Dev".to_string(), seen.key.clone())],
        "the second sweep"
    );
    Ok(())
}

fn resync_clear_forgets_the_marks<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    remote_put(h, &a)?;
    h.txn(true, |t| t.resync_mark_seen("Dev", &a.key))
        .or_fail("marking")?;
    let swept = h
        .txn(true, |t| {
            t.resync_clear()?;
            t.resync_sweep()
        })
        .or_fail("clear then sweep")?;
    ensure_eq!(
        swept,
        vec![("Dev".to_string(), a.key.clone())],
        "swept after a clear"
    );
    Ok(())
}

fn apply_keeps_the_highest_version<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let v10 = put(&s, "Dev", D, "a", ver(10, 1), None);
    let out = apply(h, &feed(0, vec![v10.clone()]))?;
    ensure!(
        out.applied == 1 && out.stale == 0 && out.cursor == Some(1),
        "first put: {out:?}"
    );
    let out = apply(
        h,
        &feed(
            1,
            vec![v10.clone(), put(&s, "Dev", D, "a", ver(5, 1), None)],
        ),
    )?;
    ensure!(
        out.applied == 0 && out.stale == 2,
        "a replay and an older put: {out:?}"
    );
    let gone = del(&s, "Dev", D, "a", ver(20, 1), None);
    let out = apply(
        h,
        &feed(
            2,
            vec![gone.clone(), put(&s, "Dev", D, "a", ver(15, 1), None)],
        ),
    )?;
    ensure!(
        out.applied == 1 && out.stale == 1,
        "a delete then an older put: {out:?}"
    );
    ensure_eq!(
        version(h, &v10.key)?,
        sv(gone.version, true),
        "the tombstone wins"
    );
    ensure_eq!(
        h.restore().or_fail("restore")?.cursor,
        3,
        "the cursor of the last page"
    );
    Ok(())
}

fn apply_refuses_a_change_of_another_model_at_a_held_key<H: DeviceStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    remote_put(h, &a)?;
    let out = apply(h, &feed(0, vec![put(&s, "Alt", D, "a", ver(50, 1), None)]))?;
    ensure!(
        out.applied == 0 && out.invalid.len() == 1,
        "Alt over a live Dev item: {out:?}"
    );
    ensure_eq!(
        live_model(h, &a.key)?,
        Some("Dev".to_string()),
        "Dev keeps the key"
    );
    ensure_eq!(version(h, &a.key)?, sv(a.version, false), "Dev's version");
    Ok(())
}

fn apply_ignores_models_the_device_does_not_sync_down<H: DeviceStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    let s = schema();
    let up = put(&s, "Up", D, "u", ver(10, 1), None);
    let out = apply(h, &feed(0, vec![up.clone()]))?;
    ensure!(
        out.ignored == 1 && out.applied == 0,
        "an up-only change: {out:?}"
    );
    ensure_eq!(
        version(h, &up.key)?,
        None,
        "nothing stored for an up-only change"
    );
    Ok(())
}

fn a_swept_tombstone_is_revived_by_the_same_version<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    remote_put(h, &a)?;
    h.txn(true, |t| {
        t.resync_clear()?;
        t.resync_sweep()
    })
    .or_fail("sweeping")?;
    ensure_eq!(
        version(h, &a.key)?,
        sv(a.version, true),
        "the sweep tombstone"
    );
    let out = apply(h, &feed(0, vec![a.clone()]))?;
    ensure_eq!(out.applied, 1, "the put of the swept version applies");
    ensure_eq!(live_model(h, &a.key)?, Some("Dev".to_string()), "revived");
    ensure_eq!(
        version(h, &a.key)?,
        sv(a.version, false),
        "the revived version"
    );
    Ok(())
}

fn the_final_snapshot_page_sweeps_and_stores_its_cursor<H: DeviceStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    let s = schema();
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    let b = put(&s, "Dev", D, "b", ver(11, 1), None);
    remote_put(h, &b)?;
    let pos = SnapshotCursor {
        model: "Dev".into(),
        key: a.key.clone(),
    };
    let first = ApplyPage::Snapshot {
        resync: 3,
        after: None,
        last: Some(pos.clone()),
        items: vec![a.clone()],
        done: false,
        cursor: 42,
        mark: None,
        restore: false,
    };
    let out = apply(h, &first)?;
    ensure!(
        out.applied == 1 && out.cursor.is_none() && out.swept == 0,
        "first page: {out:?}"
    );
    ensure_eq!(
        h.restore().or_fail("restore")?.cursor,
        0,
        "no cursor before the final page"
    );
    let last = ApplyPage::Snapshot {
        resync: 3,
        after: Some(pos),
        last: None,
        items: vec![],
        done: true,
        cursor: 42,
        mark: None,
        restore: false,
    };
    let out = apply(h, &last)?;
    ensure_eq!(out.swept, 1, "swept");
    ensure_eq!(
        out.swept_keys,
        vec![("Dev".to_string(), b.key.clone())],
        "swept keys"
    );
    ensure_eq!(out.cursor, Some(42), "the resync cursor");
    ensure_eq!(
        h.restore().or_fail("restore")?.cursor,
        42,
        "the stored cursor"
    );
    ensure_eq!(
        live_model(h, &a.key)?,
        Some("Dev".to_string()),
        "the snapshot's item"
    );
    ensure_eq!(
        version(h, &b.key)?,
        sv(b.version, true),
        "the swept item's tombstone"
    );
    Ok(())
}

fn restore_returns_the_outbox_cursor_and_clock<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let fresh = h.restore().or_fail("restore")?;
    ensure_eq!(fresh, crate::DeviceRestore::default(), "a fresh store");
    local(h, "Dev", "a", false)?;
    local(h, "Dev", "b", false)?;
    let r = h.restore().or_fail("restore")?;
    let keys: Vec<&str> = r.outbox.iter().map(|c| c.key.sk.as_str()).collect();
    ensure_eq!(keys, vec!["k#a", "k#b"], "the outbox, oldest first");
    let newest = r.outbox.iter().map(|c| c.version).max();
    ensure!(
        r.last_hlc.is_some() && r.last_hlc >= newest,
        "the clock resumes after every issued version: {:?} < {newest:?}",
        r.last_hlc
    );
    // Remote versions do not move the restored clock of the device; a later local write of
    // the key still orders after them (it observes the stored version).
    Ok(())
}

fn the_feed_mark_is_stored_with_its_page<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let mark = FeedMark { gen: 7, seen: 12 };
    let page = ApplyPage::Feed {
        from: 0,
        to: 12,
        changes: vec![put(&s, "Dev", D, "a", ver(10, 1), None)],
        mark: Some(mark),
    };
    // A rolled-back page leaves the mark as it was.
    let s2 = schema();
    let mut clock = HlcClock::new(5);
    h.txn(false, |t| {
        device_apply(&mut DynDevice(t), &s2, &mut clock, T0, &page).map_err(|e| match e {
            devtables_sync::apply::ApplyError::Store(e) => e,
        })
    })
    .or_fail("a rolled-back page")?;
    ensure_eq!(
        h.restore().or_fail("restore")?.mark,
        FeedMark::default(),
        "after a rolled-back page"
    );
    apply(h, &page)?;
    let r = h.restore().or_fail("restore")?;
    ensure_eq!((r.cursor, r.mark), (12, mark), "stored with the page");
    // A page that stores no mark keeps it; a later one replaces it, lower or not (the engine
    // decides what it is: a restore resync lowers it).
    apply(
        h,
        &ApplyPage::Feed {
            from: 12,
            to: 13,
            changes: vec![],
            mark: None,
        },
    )?;
    ensure_eq!(
        h.restore().or_fail("restore")?.mark,
        mark,
        "a page without one"
    );
    let lower = FeedMark { gen: 8, seen: 3 };
    apply(
        h,
        &ApplyPage::Feed {
            from: 13,
            to: 14,
            changes: vec![],
            mark: Some(lower),
        },
    )?;
    ensure_eq!(h.restore().or_fail("restore")?.mark, lower, "replaced");
    Ok(())
}

fn the_answered_count_goes_with_the_outbox_trim<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    local(h, "Dev", "a", false)?;
    local(h, "Dev", "b", false)?;
    let out = h.restore().or_fail("restore")?.outbox;
    let (a, b) = (out[0].clone(), out[1].clone());
    h.outbox_remove(&[(a.model.clone(), a.key.clone(), a.version)], Some(5))
        .or_fail("removing")?;
    let r = h.restore().or_fail("restore")?;
    ensure_eq!(
        (r.outbox, r.answered),
        (vec![b.clone()], 5),
        "the trim and its count, together"
    );
    h.outbox_remove(&[(b.model.clone(), b.key.clone(), b.version)], Some(3))
        .or_fail("removing")?;
    let r = h.restore().or_fail("restore")?;
    ensure_eq!(
        (r.outbox.len(), r.answered),
        (0, 5),
        "a lower count (an earlier push answered late) does not lower it"
    );
    h.outbox_remove(&[], None).or_fail("removing nothing")?;
    ensure_eq!(h.restore().or_fail("restore")?.answered, 5, "no count");
    h.store_answered(2).or_fail("storing a count")?;
    ensure_eq!(
        h.restore().or_fail("restore")?.answered,
        2,
        "a re-push's end replaces it"
    );
    Ok(())
}

fn repush_requeues_every_held_write_of_up_syncing_models<H: DeviceStoreUnderTest>(
    h: &mut H,
) -> Outcome {
    let s = schema();
    // Held from the cloud: a live item and a tombstone of a model that syncs both ways, a
    // live item of another, and one of a model that only syncs down.
    let a = put(&s, "Dev", D, "a", ver(10, 1), None);
    let b = del(&s, "Dev", D, "b", ver(11, 1), None);
    let c = put(&s, "Other", D, "c", ver(12, 1), None);
    let d = put(&s, "Down", D, "d", ver(13, 1), None);
    remote_put(h, &a)?;
    remote_delete(h, &b)?;
    remote_put(h, &c)?;
    remote_put(h, &d)?;
    // Written here: up-only items (one deleted since), a device-only item, and a pending write.
    local(h, "Up", "u", false)?;
    local(h, "Up", "v", false)?;
    local(h, "Up", "v", true)?;
    local(h, "Local", "l", false)?;
    let acked = h.restore().or_fail("restore")?.outbox;
    let acked: Vec<(String, ItemKey, Hlc)> = acked
        .iter()
        .map(|c| (c.model.clone(), c.key.clone(), c.version))
        .collect();
    h.outbox_remove(&acked, Some(9)).or_fail("acknowledging")?;
    local(h, "Dev", "p", false)?;
    let pending_p = h.restore().or_fail("restore")?.outbox;
    ensure_eq!(pending_p.len(), 1, "one write pending");
    let held: Vec<(String, ItemKey)> = [
        ("Dev", a.key.clone()),
        ("Dev", b.key.clone()),
        ("Other", c.key.clone()),
        ("Up", key("Up", "u")),
        ("Up", key("Up", "v")),
    ]
    .into_iter()
    .map(|(m, k)| (m.to_string(), k))
    .collect();
    let mut before = Vec::new();
    for (_, k) in &held {
        before.push(version(h, k)?.ok_or(format!("{} holds a version", k.sk))?);
    }
    let done = h.repush(2).or_fail("a re-push")?;
    ensure_eq!(done.requeued, 5, "held writes put back: {done:?}");
    ensure!(
        done.slices >= 3,
        "at most 2 held writes per transaction: {done:?}"
    );
    let r = h.restore().or_fail("restore")?;
    ensure_eq!(
        r.outbox[0].clone(),
        pending_p[0].clone(),
        "the pending entry is untouched"
    );
    let mut got: Vec<(String, ItemKey)> = r.outbox[1..]
        .iter()
        .map(|c| (c.model.clone(), c.key.clone()))
        .collect();
    got.sort();
    let mut want = held.clone();
    want.sort();
    ensure_eq!(got, want, "the re-pushed keys");
    for ((_, k), was) in held.iter().zip(&before) {
        let entry = r
            .outbox
            .iter()
            .find(|c| &c.key == k)
            .ok_or(format!("{} re-pushed", k.sk))?;
        ensure_eq!(
            (entry.version, entry.op == Op::Delete, entry.base),
            (was.version, was.deleted, None),
            "{}: its held version, as put or delete, without a base",
            k.sk
        );
        ensure_eq!(
            version(h, k)?,
            Some(*was),
            "{}: its version is unchanged",
            k.sk
        );
        if entry.op == Op::Put {
            ensure!(
                entry.item == h.item(k).or_fail("item")?.map(|(_, i)| i),
                "{}: the live item is what is sent",
                k.sk
            );
        }
    }
    ensure_eq!(r.answered, 9, "the count waits for StoreAnswered");
    let again = h.repush(2).or_fail("a second re-push")?;
    ensure_eq!(again.requeued, 0, "everything is pending already");
    Ok(())
}

fn a_restore_resync_sets_cloud_only_models_back<H: DeviceStoreUnderTest>(h: &mut H) -> Outcome {
    let s = schema();
    let d1 = put(&s, "Down", D, "d1", ver(30, 1), None);
    let d2 = put(&s, "Down", D, "d2", ver(31, 1), None);
    let a = put(&s, "Dev", D, "a", ver(40, 1), None);
    for c in [&d1, &d2, &a] {
        remote_put(h, c)?;
    }
    let older_d1 = put(&s, "Down", D, "d1", ver(20, 1), None);
    let older_a = put(&s, "Dev", D, "a", ver(35, 1), None);
    let page = |restore: bool| ApplyPage::Snapshot {
        resync: 4,
        after: None,
        last: None,
        items: vec![older_a.clone(), older_d1.clone()],
        done: true,
        cursor: 8,
        mark: Some(FeedMark { gen: 3, seen: 8 }),
        restore,
    };
    // An ordinary resync keeps the higher versions (and sweeps d2 keeping its version).
    let plain = apply(h, &page(false))?;
    ensure!(
        plain.stale == 2 && plain.adopted == 0,
        "ordinary resync: {plain:?}"
    );
    ensure_eq!(version(h, &d1.key)?, sv(d1.version, false), "d1 kept");
    ensure_eq!(version(h, &d2.key)?, sv(d2.version, true), "d2 swept");
    // Again, as a restore resync: the cloud-only model takes the cloud's lower version; the
    // model the device writes up keeps its own (it re-pushes it).
    remote_put(h, &d2)?;
    let out = apply(h, &page(true))?;
    ensure_eq!(out.adopted, 1, "adopted: {out:?}");
    ensure_eq!(
        version(h, &d1.key)?,
        sv(older_d1.version, false),
        "d1 set back"
    );
    ensure!(
        h.item(&d1.key).or_fail("item")?.map(|(_, i)| i) == older_d1.item,
        "d1 holds the cloud's item"
    );
    ensure_eq!(version(h, &a.key)?, sv(a.version, false), "a kept");
    ensure_eq!(h.item(&d2.key).or_fail("item")?, None, "d2 swept");
    ensure_eq!(
        version(h, &d2.key)?,
        sv(Hlc::ZERO, true),
        "d2's version forgotten, so the cloud's next write of it applies"
    );
    let later = put(&s, "Down", D, "d2", ver(5, 1), None);
    let out = apply(h, &feed(8, vec![later.clone()]))?;
    ensure_eq!(out.applied, 1, "a later, lower cloud write of d2 applies");
    ensure_eq!(
        h.restore().or_fail("restore")?.mark,
        FeedMark { gen: 3, seen: 8 },
        "the restore resync's mark"
    );
    Ok(())
}
