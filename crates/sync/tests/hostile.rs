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
    };
    wire::encode_up("1.0.0", &msg, &WireConfig::default()).unwrap()
}

fn valid_down() -> Vec<u8> {
    let msg = DownMsg::Welcome {
        session: 7,
        now_ms: 1,
        max_drift_ms: 60_000,
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
