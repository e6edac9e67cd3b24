//! The change-log checks: what a cloud store that serves backends (the SQLite store, and the
//! PostgreSQL one to come) must keep besides its rows. Every row write, and only that, appends
//! one entry in its own transaction; entries are read per account in sequence order; the
//! sequence only grows (across runs); retention says which cursors it made stale.
//!
//! A separate suite from the cloud-store one: the simulation's in-memory stores, which stand in
//! for the cloud only towards devices, have no change log.

use devtables_sync::identity::Owner;
use devtables_sync::wire::{ChangeStatus, Op};

use crate::cloud::{d1, d2, own, push, setup, store, x1, NOW};
use crate::{
    del, ensure, ensure_eq, put, schema, ver, ChangeLogUnderTest, Check, LoggedChange, OrFail,
    Outcome, ACCOUNT, OTHER_ACCOUNT,
};

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        vec![$(Check { name: stringify!($name), run: $name::<H> }),*]
    };
}

pub(crate) fn checks<H: ChangeLogUnderTest>() -> Vec<Check<H>> {
    checks![
        each_committed_row_write_is_logged_once_in_order,
        a_rolled_back_write_is_not_logged,
        the_log_is_per_account_with_one_sequence,
        a_push_logs_only_the_rows_it_writes,
        retention_makes_older_cursors_expire_and_keeps_the_rest,
        the_sequence_keeps_growing_across_runs,
    ]
}

/// Every entry of `account` after `after`, or the floor when the cursor expired.
fn read<H: ChangeLogUnderTest>(
    h: &mut H,
    account: &str,
    after: u64,
) -> Result<Result<Vec<LoggedChange>, u64>, String> {
    h.changes(account, after).or_fail("reading the change log")
}

fn entries<H: ChangeLogUnderTest>(
    h: &mut H,
    account: &str,
    after: u64,
) -> Result<Vec<LoggedChange>, String> {
    read(h, account, after)?.map_err(|floor| {
        format!("the cursor {after} of {account} expired (floor {floor}) with no retention")
    })
}

fn ascending(log: &[LoggedChange]) -> Outcome {
    ensure!(
        log.windows(2).all(|w| w[0].seq < w[1].seq),
        "sequence numbers not strictly increasing: {:?}",
        log.iter().map(|c| c.seq).collect::<Vec<_>>()
    );
    Ok(())
}

fn each_committed_row_write_is_logged_once_in_order<H: ChangeLogUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let b = put(&s, "Dev", "d2", "b", ver(11, 2), None);
    let gone = del(&s, "Dev", "d1", "a", ver(12, 1), Some(a.version));
    let cast = put(&s, "Cast", "", "c", ver(13, 3), None);
    store(h, NOW, &own(&d1()), &a, false)?;
    store(h, NOW + 1, &own(&d2()), &b, true)?;
    store(h, NOW + 2, &own(&d1()), &gone, false)?;
    store(h, NOW + 3, &Owner::Account(ACCOUNT.into()), &cast, true)?;
    let log = entries(h, ACCOUNT, 0)?;
    ascending(&log)?;
    let got: Vec<_> = log
        .iter()
        .map(|c| {
            (
                c.owner.clone(),
                c.model.as_str(),
                c.key.clone(),
                c.version,
                c.item.clone(),
            )
        })
        .collect();
    let want = vec![
        (own(&d1()), "Dev", a.key.clone(), a.version, a.item.clone()),
        (own(&d2()), "Dev", b.key.clone(), b.version, b.item.clone()),
        (own(&d1()), "Dev", gone.key.clone(), gone.version, None),
        (
            Owner::Account(ACCOUNT.into()),
            "Cast",
            cast.key.clone(),
            cast.version,
            cast.item.clone(),
        ),
    ];
    ensure_eq!(
        got,
        want,
        "the log: every write, its owner, key, version and item"
    );
    ensure_eq!(log[0].at_ms, NOW, "the time the write was stored");
    // Reading after an entry starts after it.
    let rest = entries(h, ACCOUNT, log[1].seq)?;
    ensure_eq!(
        rest.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![log[2].seq, log[3].seq],
        "entries after the second"
    );
    ensure!(
        entries(h, ACCOUNT, log[3].seq)?.is_empty(),
        "nothing after the last entry"
    );
    Ok(())
}

fn a_rolled_back_write_is_not_logged<H: ChangeLogUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let o = own(&d1());
    let _ = h.txn(NOW, false, |t| {
        t.write_row(&devtables_sync::apply::RowWrite {
            owner: &o,
            model: &a.model,
            key: &a.key,
            item: a.item.as_ref(),
            version: a.version,
            base: None,
        })
    });
    ensure!(
        entries(h, ACCOUNT, 0)?.is_empty(),
        "a rolled-back write left an entry"
    );
    store(h, NOW, &o, &a, false)?;
    ensure_eq!(entries(h, ACCOUNT, 0)?.len(), 1, "the committed write");
    Ok(())
}

fn the_log_is_per_account_with_one_sequence<H: ChangeLogUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let x = put(&s, "Dev", "x1", "x", ver(11, 2), None);
    let b = put(&s, "Dev", "d1", "b", ver(12, 1), None);
    store(h, NOW, &own(&d1()), &a, false)?;
    store(h, NOW, &own(&x1()), &x, false)?;
    store(h, NOW, &own(&d1()), &b, false)?;
    let acme = entries(h, ACCOUNT, 0)?;
    let globex = entries(h, OTHER_ACCOUNT, 0)?;
    ensure_eq!(
        acme.iter().map(|c| c.key.clone()).collect::<Vec<_>>(),
        vec![a.key.clone(), b.key.clone()],
        "{ACCOUNT}'s entries only"
    );
    ensure_eq!(globex.len(), 1, "{OTHER_ACCOUNT}'s entries");
    ensure!(
        acme[0].seq < globex[0].seq && globex[0].seq < acme[1].seq,
        "one sequence across accounts, in commit order: {} {} {}",
        acme[0].seq,
        globex[0].seq,
        acme[1].seq
    );
    Ok(())
}

fn a_push_logs_only_the_rows_it_writes<H: ChangeLogUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let first = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    let newer = put(&s, "Dev", "d1", "a", ver(20, 1), Some(first.version));
    ensure_eq!(
        push(h, NOW, &d1(), &[first.clone(), newer.clone()])?,
        vec![ChangeStatus::Applied, ChangeStatus::Applied],
        "two writes"
    );
    // A replay of a stored version and a write that loses store no row.
    let stale = put(&s, "Dev", "d1", "a", ver(15, 2), None);
    let answers = push(h, NOW, &d1(), &[newer.clone(), stale])?;
    ensure_eq!(answers[0], ChangeStatus::Applied, "the replay");
    ensure!(
        matches!(answers[1], ChangeStatus::Stale { .. }),
        "the older write lost: {:?}",
        answers[1]
    );
    let log = entries(h, ACCOUNT, 0)?;
    ensure_eq!(
        log.iter()
            .map(|c| (c.version, c.deleted))
            .collect::<Vec<_>>(),
        vec![(first.version, false), (newer.version, false)],
        "one entry per version written, none for the replay or the loser"
    );
    let gone = del(&s, "Dev", "d1", "a", ver(30, 1), Some(newer.version));
    ensure_eq!(gone.op, Op::Delete, "a delete");
    push(h, NOW, &d1(), std::slice::from_ref(&gone))?;
    let log = entries(h, ACCOUNT, 0)?;
    ensure_eq!(log.len(), 3, "the delete is logged");
    ensure!(
        log[2].deleted && log[2].item.is_none() && log[2].version == gone.version,
        "the delete's entry: {:?}",
        log[2]
    );
    Ok(())
}

fn retention_makes_older_cursors_expire_and_keeps_the_rest<H: ChangeLogUnderTest>(
    h: &mut H,
) -> Outcome {
    setup(h)?;
    let s = schema();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let c = put(&s, "Dev", "d1", name, ver(10 + i as u64, 1), None);
        store(h, NOW, &own(&d1()), &c, false)?;
    }
    let x = put(&s, "Dev", "x1", "x", ver(20, 2), None);
    store(h, NOW, &own(&x1()), &x, false)?;
    let log = entries(h, ACCOUNT, 0)?;
    h.trim_changes(1).or_fail("trimming the change log")?;
    ensure_eq!(
        read(h, ACCOUNT, 0)?,
        Err(log[1].seq),
        "a cursor before what retention removed expires, naming the highest removed"
    );
    ensure!(
        read(h, ACCOUNT, log[0].seq)?.is_err(),
        "a cursor inside what was removed expires"
    );
    let rest = entries(h, ACCOUNT, log[1].seq)?;
    ensure_eq!(
        rest.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![log[2].seq],
        "from the floor on, the kept entry"
    );
    ensure_eq!(
        entries(h, OTHER_ACCOUNT, 0)?.len(),
        1,
        "another account under its own limit keeps its entry"
    );
    Ok(())
}

fn the_sequence_keeps_growing_across_runs<H: ChangeLogUnderTest>(h: &mut H) -> Outcome {
    setup(h)?;
    let s = schema();
    let a = put(&s, "Dev", "d1", "a", ver(10, 1), None);
    store(h, NOW, &own(&d1()), &a, false)?;
    let first = entries(h, ACCOUNT, 0)?;
    h.trim_changes(0).or_fail("emptying the change log")?;
    h.new_run().or_fail("a new run")?;
    let b = put(&s, "Dev", "d1", "b", ver(11, 1), None);
    store(h, NOW, &own(&d1()), &b, false)?;
    let after = entries(h, ACCOUNT, first[0].seq)?;
    ensure_eq!(after.len(), 1, "the new entry after the old cursor");
    ensure!(
        after[0].seq > first[0].seq,
        "a sequence number was reused: {} after {}",
        after[0].seq,
        first[0].seq
    );
    Ok(())
}
