//! Hostile bytes on the wire: decoding never panics, and engines fed garbage keep running and
//! answer with typed errors.

use devtables_sync::cloud::{CloudEngine, CloudEngineConfig};
use devtables_sync::device::{DeviceConfig, DeviceEngine, Restored};
use devtables_sync::identity::DeviceId;
use devtables_sync::wire::{self, DownMsg, UpMsg, WireConfig};
use proptest::prelude::*;

fn valid_up() -> Vec<u8> {
    let msg = UpMsg::Hello {
        session: 7,
        cursor: 3,
        pending: 1,
        mark: None,
    };
    wire::encode_up("1.0.0", &msg, &WireConfig::default()).unwrap()
}

fn valid_down() -> Vec<u8> {
    let msg = DownMsg::Welcome {
        session: 7,
        now_ms: 1,
        max_drift_ms: 60_000,
        answered: None,
        repush: false,
    };
    wire::encode_down("1.0.0", &msg, &WireConfig::default()).unwrap()
}

/// A valid message with some bytes overwritten, inserted or cut.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    proptest::collection::vec((0..len.max(1), any::<u8>(), 0u8..3), 1..8).prop_map(move |edits| {
        let mut bytes = base.clone();
        for (at, byte, kind) in edits {
            let at = at.min(bytes.len());
            match kind {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => bytes.truncate(at),
            }
        }
        bytes
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let cfg = WireConfig::default();
        let _ = wire::decode_up(&bytes, &cfg);
        let _ = wire::decode_down(&bytes, &cfg);
    }

    #[test]
    fn decoding_mutated_messages_never_panics(up in mutated(valid_up()), down in mutated(valid_down())) {
        let cfg = WireConfig::default();
        let _ = wire::decode_up(&up, &cfg);
        let _ = wire::decode_down(&down, &cfg);
    }

    #[test]
    fn engines_survive_garbage(messages in proptest::collection::vec(mutated(valid_up()), 1..20)) {
        let device = DeviceId::new("acme", "d1").unwrap();
        let mut cloud = CloudEngine::new(CloudEngineConfig { schema_version: "1".into(), ..CloudEngineConfig::default() });
        let mut dev = DeviceEngine::new(DeviceConfig::default(), "1".into(), Restored::default());
        dev.handle_connected(0);
        for (i, m) in messages.iter().enumerate() {
            cloud.handle_message(i as u64, i as u64, &device, m);
            dev.handle_message(i as u64, m);
            while cloud.poll_action().is_some() {}
            while dev.poll_transmit().is_some() {}
            while dev.poll_action().is_some() {}
            while dev.poll_event().is_some() {}
        }
        cloud.handle_timeout(1_000_000);
        dev.handle_timeout(1_000_000);
    }
}

#[test]
fn oversized_and_future_messages_get_typed_errors() {
    let cfg = WireConfig {
        max_message_bytes: 64,
        ..WireConfig::default()
    };
    let big = vec![b' '; 65];
    assert!(matches!(
        wire::decode_up(&big, &cfg),
        Err(wire::WireError::TooLarge { .. })
    ));
    let future = br#"{"v":99,"schema":"1","msg":{"type":"bye"}}"#;
    assert!(matches!(
        wire::decode_up(future, &WireConfig::default()),
        Err(wire::WireError::UnsupportedVersion { .. })
    ));
}

/// One input of a hostile device (and of the store answering the engine's reads).
#[derive(Clone, Debug)]
enum Step {
    Hello {
        session: u64,
        cursor: u64,
        schema: usize,
    },
    Push {
        changes: usize,
        key: usize,
    },
    FeedAck(u64),
    /// A snapshot acknowledgement: of the current resync or not, with a position of this size.
    SnapshotAck {
        current: bool,
        pos: usize,
        done: bool,
    },
    Bye,
    Garbage(Vec<u8>),
    /// The store answers the engine's outstanding reads and pushes; a feed read demands a resync.
    Store {
        resync: bool,
        items: usize,
        key: usize,
        last: bool,
    },
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<u64>(), 0u64..50, 0usize..100).prop_map(|(session, cursor, schema)| Step::Hello {
            session: session % 4,
            cursor,
            schema
        }),
        (0usize..40, 0usize..3000).prop_map(|(changes, key)| Step::Push { changes, key }),
        (0u64..100).prop_map(Step::FeedAck),
        (any::<bool>(), 0usize..60_000, any::<bool>())
            .prop_map(|(current, pos, done)| Step::SnapshotAck { current, pos, done }),
        Just(Step::Bye),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Step::Garbage),
        (any::<bool>(), 0usize..6, 0usize..=STORE_KEY, any::<bool>()).prop_map(
            |(resync, items, key, last)| Step::Store {
                resync,
                items,
                key,
                last
            }
        ),
        (0u64..20_000).prop_map(Step::Tick),
    ]
}

/// Longest pk (and sk) the simulated store holds: its snapshot positions are at most
/// `model + 2 * STORE_KEY` bytes.
const STORE_KEY: usize = 300;

fn key_of(len: usize, tag: usize) -> devtables_schema::ItemKey {
    devtables_schema::ItemKey {
        pk: format!("{tag}")
            .repeat(len.max(1))
            .chars()
            .take(len.max(1))
            .collect(),
        sk: "s".repeat(len),
    }
}

fn delete(key: devtables_schema::ItemKey) -> wire::Change {
    wire::Change {
        model: "M".into(),
        key,
        op: wire::Op::Delete,
        item: None,
        version: devtables_sync::hlc::Hlc {
            wall_ms: 1,
            counter: 0,
            node: 1,
        },
        base: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Whatever a device sends, and however the store answers, the engine holds no more for the
    /// device's session than `session_state_bound` of the longest position the store produced.
    #[test]
    fn a_hostile_device_cannot_grow_its_session_past_the_bound(steps in proptest::collection::vec(step(), 1..80)) {
        use devtables_sync::cloud::{CloudAction, FeedPage, SnapshotPage, SnapshotCursor};
        let device = DeviceId::new("acme", "d1").unwrap();
        let cfg = CloudEngineConfig { schema_version: "1".into(), ..CloudEngineConfig::default() };
        let bound = cfg.session_state_bound(1 + 2 * STORE_KEY);
        let mut cloud = CloudEngine::new(cfg);
        let (mut now, mut resync, mut pending) = (0u64, 0u64, Vec::new());
        for s in steps {
            now += 1;
            let up = |msg: &UpMsg, schema: &str| wire::encode_up(schema, msg, &WireConfig::default());
            let bytes = match &s {
                Step::Hello { session, cursor, schema } => {
                    let schema = "v".repeat(*schema);
                    // Over the schema bound the encoder refuses: send the raw envelope.
                    let msg = UpMsg::Hello { session: *session, cursor: *cursor, pending: 0, mark: None, };
                    Some(up(&msg, &schema).unwrap_or_else(|_| {
                        format!(r#"{{"v":1,"schema":"{schema}","msg":{{"type":"hello","session":{session},"cursor":{cursor},"pending":0}}}}"#).into_bytes()
                    }))
                }
                Step::Push { changes, key } => {
                    let changes = (0..*changes).map(|i| delete(key_of(*key, i))).collect();
                    up(&UpMsg::Push { batch: now, changes, session: None, }, "1").ok()
                }
                Step::FeedAck(cursor) => up(&UpMsg::FeedAck { cursor: *cursor }, "1").ok(),
                Step::SnapshotAck { current, pos, done } => {
                    let pos = SnapshotCursor { model: "M".into(), key: key_of(*pos, 9) };
                    let resync = if *current { resync } else { resync ^ 1 };
                    up(&UpMsg::SnapshotAck { resync, pos: Some(pos), done: *done }, "1").ok()
                }
                Step::Bye => up(&UpMsg::Bye, "1").ok(),
                Step::Garbage(b) => Some(b.clone()),
                Step::Store { .. } | Step::Tick(_) => None,
            };
            if let Some(bytes) = bytes {
                cloud.handle_message(now, now, &device, &bytes);
            }
            if let Step::Tick(dt) = s {
                now += dt;
                cloud.handle_timeout(now);
            }
            while let Some(a) = cloud.poll_action() {
                match a {
                    CloudAction::ReadSnapshot { resync: r, .. } => resync = r,
                    CloudAction::ReadFeed { .. } | CloudAction::ApplyPush { .. } => {}
                    _ => continue,
                }
                pending.push(a);
            }
            if let Step::Store { resync: need, items, key, last } = s {
                for a in std::mem::take(&mut pending) {
                    match a {
                        CloudAction::ReadFeed { after, .. } => cloud.handle_feed_page(now, &device, FeedPage {
                            after, changes: vec![], head: after + 5, resync_required: need, unreadable: vec![],
                            generations: vec![],
                            answered: 0,
                        }),
                        CloudAction::ReadSnapshot { resync, from, .. } => {
                            let items: Vec<wire::Change> = (0..items).map(|i| {
                                let mut c = delete(key_of(key, i));
                                c.op = wire::Op::Put;
                                c.item = Some(devtables_schema::Item::new());
                                c
                            }).collect();
                            let next = (!last).then(|| SnapshotCursor { model: "M".into(), key: key_of(key, 7) });
                            let _ = from;
                            cloud.handle_snapshot_page(now, &device, SnapshotPage {
                                resync, items, next, cursor: 3, unreadable: vec![],
                                gen: 0,
                            });
                        }
                        CloudAction::ApplyPush { batch, .. } => cloud.handle_push_applied(now, &device, batch, vec![]),
                        _ => {}
                    }
                }
                while let Some(a) = cloud.poll_action() {
                    if let CloudAction::ReadSnapshot { resync: r, .. } = &a { resync = *r; }
                    if matches!(a, CloudAction::ReadFeed { .. } | CloudAction::ReadSnapshot { .. } | CloudAction::ApplyPush { .. }) {
                        pending.push(a);
                    }
                }
            }
            if let Some(held) = cloud.session_state_bytes(&device) {
                prop_assert!(held <= bound, "the session holds {held} bytes, over the bound {bound}");
            }
        }
    }
}

#[test]
fn the_default_per_session_bound_is_what_the_security_doc_says() {
    let cfg = CloudEngineConfig::default();
    // docs/security.md quotes these numbers: the bound with positions of 1 KiB and of 64 KiB.
    let small = cfg.session_state_bound(1024);
    let large = cfg.session_state_bound(64 * 1024);
    let fixed = cfg.session_state_bound(0);
    println!(
        "per-session bound: {fixed} bytes fixed, {small} with 1 KiB positions, {large} with 64 KiB"
    );
    assert_eq!(small - fixed, 5 * 1024, "3 + feed_window positions");
    assert!(small < 10 * 1024, "{small}");
    assert!(large < 6 * 64 * 1024, "{large}");
}

#[test]
fn the_per_session_bound_at_the_configurable_maxima_is_what_the_security_doc_says() {
    // The largest values the cloud's file accepts (`sync_engine`, crates/cloud config.rs).
    let cfg = CloudEngineConfig {
        feed_window: 64,
        max_pushes_in_progress: 1024,
        max_covered_changes: 65_536,
        remembered_answers: 4096,
        ..CloudEngineConfig::default()
    };
    let fixed = cfg.session_state_bound(0);
    let per_position = cfg.session_state_bound(1) - fixed;
    println!("per-session bound at the maxima: {fixed} bytes plus {per_position} × P");
    assert_eq!(per_position, 3 + 64, "3 + feed_window positions");
    // docs/security.md quotes it: 579 640 bytes plus 67 × P on a 64-bit build.
    assert!((550 * 1024..650 * 1024).contains(&fixed), "{fixed}");
}
