//! A cloud that falls behind, driven through both real engines: what one device's pushes cost
//! it while its queue grows (a fleet offering more than the store applies).
//!
//! Why this is a test of its own: the random simulation applies every push at once, so it never
//! sees a device's retransmit timer fire while the cloud still holds the push. That is the case
//! where refusals and resent copies can grow with the overload and take the work that would
//! drain the queue (goodput collapse); here refusals must stay bounded, and a copy of a change
//! the cloud still holds must not be applied again.

use std::collections::{BTreeMap, VecDeque};

use devtables_sync::cloud::FeedGeneration;
use devtables_sync::wire::ChangeResult;

use super::*;

/// What one run of a device against a store falling behind came to.
#[derive(Debug)]
struct Overload {
    writes: u64,
    /// Changes the cloud handed to its store (a copy taken counts again).
    taken_changes: u64,
    /// `busy` answers the device received.
    busy: u64,
    cloud: devtables_sync::cloud::CloudEngineStats,
    /// Outbox entries left unanswered at the end.
    pending: usize,
}

/// One device writing a change every `write_every` ms until `writes_until`, against a cloud
/// whose store answers a push taken at `t` after `queue_delay(t)` (in order, one push after
/// the other), until `end`.
fn drive(
    cfg: CloudEngineConfig,
    queue_delay: impl Fn(u64) -> u64,
    write_every: u64,
    writes_until: u64,
    end: u64,
) -> Overload {
    let dev = dev_id("d0");
    let mut cloud = CloudEngine::new(cfg);
    let mut device = DeviceEngine::new(
        DeviceConfig::default(),
        "1.0.0".into(),
        Restored {
            cursor: 0,
            outbox: vec![],
            mark: Default::default(),
            answered: 0,
        },
    );
    device.handle_connected(0);

    let mut outbox: BTreeMap<ItemKey, Change> = BTreeMap::new();
    // Pushes taken by the cloud, answered in order: (answer time, batch, changes).
    let mut store: VecDeque<(u64, u64, Vec<Change>)> = VecDeque::new();
    let mut last_done = 0;
    let mut answered = 0u64;
    let (mut writes, mut taken_changes, mut busy) = (0u64, 0u64, 0u64);

    let mut t = 0;
    while t <= end {
        if t < writes_until && t % write_every == 0 {
            let c = change("U", "d0", &format!("k{writes}"), hlc(T0 + t));
            writes += 1;
            outbox.insert(c.key.clone(), c.clone());
            device.handle_local_change(t, c);
        }
        if device.poll_timeout().is_some_and(|at| at <= t) {
            device.handle_timeout(t);
        }
        if cloud.poll_timeout().is_some_and(|at| at <= t) {
            cloud.handle_timeout(t);
        }
        while let Some((_, batch, changes)) = store.pop_front_if(|(at, _, _)| *at <= t) {
            answered += changes.len() as u64;
            let results = changes
                .iter()
                .map(|c| ChangeResult {
                    model: c.model.clone(),
                    key: c.key.clone(),
                    version: c.version,
                    kept: None,
                    status: ChangeStatus::Applied,
                })
                .collect();
            cloud.handle_push_applied(t, &dev, batch, results);
        }
        // Until nothing moves at this instant: device actions and messages, cloud actions.
        loop {
            let mut moved = false;
            while let Some(a) = device.poll_action() {
                moved = true;
                if let DeviceAction::LoadBatch { batch, keys } = a {
                    let changes = keys
                        .iter()
                        .filter_map(|(_, k)| outbox.get(k).cloned())
                        .collect();
                    device.handle_batch_loaded(t, batch, changes);
                }
            }
            while let Some(bytes) = device.poll_transmit() {
                moved = true;
                cloud.handle_message(t, T0 + t, &dev, &bytes);
            }
            while let Some(a) = cloud.poll_action() {
                moved = true;
                match a {
                    CloudAction::ReadFeed { after, .. } => cloud.handle_feed_page(
                        t,
                        &dev,
                        FeedPage {
                            after,
                            changes: vec![],
                            head: 0,
                            resync_required: false,
                            unreadable: vec![],
                            generations: vec![FeedGeneration { gen: 0, base: 0 }],
                            answered,
                        },
                    ),
                    CloudAction::ApplyPush { batch, changes, .. } => {
                        taken_changes += changes.len() as u64;
                        last_done = last_done.max(t + queue_delay(t));
                        store.push_back((last_done, batch, changes));
                    }
                    CloudAction::Transmit { bytes, .. } => {
                        if let Ok(DownMsg::Error {
                            code: ErrorCode::Busy { .. },
                            ..
                        }) = wire::decode_down(&bytes, &WireConfig::default()).map(|d| d.msg)
                        {
                            busy += 1;
                        }
                        device.handle_message(t, &bytes);
                    }
                    _ => {}
                }
            }
            while device.poll_event().is_some() {}
            if !moved {
                break;
            }
        }
        t += 10;
    }
    let run = Overload {
        writes,
        taken_changes,
        busy,
        cloud: cloud.stats(),
        pending: device.pending(),
    };
    eprintln!("{run:?}");
    run
}

fn unlimited() -> CloudEngineConfig {
    CloudEngineConfig {
        device_rate: RateLimit::UNLIMITED,
        ..CloudEngineConfig::default()
    }
}

/// Time for the store to answer a push taken at `t`: short for ten seconds, then a burst of
/// other devices puts 5 s of work in front of it, and the queue grows by one second every five
/// (the fleet offers more than the store applies), to 15 s at one minute. The jump is what a
/// device's measured answer time cannot foresee: its retransmit timers fire while the cloud
/// still holds its pushes.
fn queue_jumps_then_grows(t: u64) -> u64 {
    if t < 10_000 {
        200
    } else {
        5_000 + (t - 10_000) / 5
    }
}

#[test]
fn a_cloud_falling_behind_gets_few_refusals_and_applies_no_copy() {
    let run = drive(unlimited(), queue_jumps_then_grows, 50, 60_000, 180_000);
    assert_eq!(run.pending, 0, "every write was answered");
    assert!(
        run.busy > 0,
        "the cloud fell behind far enough to refuse: {run:?}"
    );
    // One refusal per device per queue length, not one a second: the queue reaches 12 s.
    assert!(run.busy <= 15, "busy answers: {run:?}");
    assert!(run.cloud.pushes_busy <= 30, "busy refusals: {run:?}");
    // The timers fired at the jump while the cloud held the pushes: copies were sent, and
    // recognised as changes in progress instead of being applied again.
    assert!(
        run.cloud.push_changes_covered > 0,
        "no copy was sent: {run:?}"
    );
    assert_eq!(
        run.taken_changes, run.writes,
        "each change taken once: {run:?}"
    );
}

/// A device of a large fleet: one write every two seconds, each push alone in flight (so never
/// refused `busy`), against a store whose queue grows by half a second every second for a
/// minute, then drains. Each answer takes longer than the one before: the device's estimate,
/// fed by answers, stays behind, and its timers fire while the cloud still holds its pushes.
fn queue_keeps_growing(t: u64) -> u64 {
    if t < 5_000 {
        100
    } else if t < 65_000 {
        100 + (t - 5_000) / 2
    } else {
        100
    }
}

#[test]
fn copies_of_pushes_a_slow_cloud_still_holds_are_answered_once_not_applied_again() {
    let run = drive(unlimited(), queue_keeps_growing, 2_000, 60_000, 240_000);
    assert_eq!(run.pending, 0, "every write was answered");
    assert_eq!(run.busy, 0, "one push in flight at a time: {run:?}");
    // Copies went out, each whole (the device had nothing else queued), and none was taken.
    assert!(
        run.cloud.pushes_covered > 0,
        "the device sent no copy: {run:?}"
    );
    assert_eq!(
        run.cloud.push_changes_covered, run.cloud.pushes_covered,
        "{run:?}"
    );
    assert_eq!(
        run.taken_changes, run.writes,
        "each change taken once: {run:?}"
    );
}
