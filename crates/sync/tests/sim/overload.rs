//! A cloud that falls behind, driven through both real engines: what one device's pushes cost
//! it while its queue grows (a fleet offering more than the store applies).
//!
//! Why this is a test of its own: the random simulation applies every push at once, so it never
//! sees a device's retransmit timer fire while the cloud still holds the push. That is the case
//! where refusals and resent copies can grow with the overload and take the work that would
//! drain the queue (goodput collapse); here they must stay bounded.

use std::collections::{BTreeMap, VecDeque};

use devtables_sync::cloud::FeedGeneration;
use devtables_sync::wire::ChangeResult;

use super::*;

/// Time for the store to answer a push taken at `t`: short for ten seconds, then a burst of
/// other devices puts 5 s of work in front of it, and the queue grows by one second every five
/// (the fleet offers more than the store applies), to 15 s at one minute. The jump is what a
/// device's measured answer time cannot foresee: its retransmit timers fire while the cloud
/// still holds its pushes.
fn queue_delay(t: u64) -> u64 {
    if t < 10_000 {
        200
    } else {
        5_000 + (t - 10_000) / 5
    }
}

#[test]
fn a_cloud_falling_behind_gets_few_refusals_and_few_copies() {
    const WRITES_UNTIL: u64 = 60_000;
    const END: u64 = 180_000;
    let dev = dev_id("d0");
    let mut cloud = CloudEngine::new(CloudEngineConfig {
        device_rate: RateLimit::UNLIMITED,
        ..CloudEngineConfig::default()
    });
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
    let (mut writes, mut taken_changes, mut pushes_sent, mut busy) = (0u64, 0u64, 0u64, 0u64);

    let mut t = 0;
    while t <= END {
        if t < WRITES_UNTIL && t % 50 == 0 {
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
                if matches!(
                    wire::decode_up(&bytes, &WireConfig::default()).map(|d| d.msg),
                    Ok(UpMsg::Push { .. })
                ) {
                    pushes_sent += 1;
                }
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

    let refused = cloud.stats().pushes_busy;
    eprintln!(
        "writes {writes}, pushes sent {pushes_sent}, changes taken {taken_changes}, \
         busy answers {busy}, busy refusals {refused}"
    );
    assert_eq!(device.pending(), 0, "every write was answered");
    assert!(
        busy > 0,
        "the cloud fell behind far enough to refuse: {busy}"
    );
    // One refusal per device per queue length, not one a second: the queue reaches 12 s.
    assert!(busy <= 15, "busy answers: {busy}");
    assert!(refused <= 30, "busy refusals: {refused}");
    // Copies of changes the cloud still held: a few timeouts' worth, not the window every
    // second.
    assert!(
        taken_changes <= writes + writes / 10,
        "the cloud took {taken_changes} changes for {writes} writes"
    );
}
