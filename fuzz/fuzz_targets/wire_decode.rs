//! Arbitrary bytes as MQTT payloads: any client the broker lets publish can send the cloud
//! anything on its `up` topic, and a device can receive anything on its `down` topic. Decoding
//! must give a typed `WireError`, never a panic; and what decodes must encode and decode again
//! to the same message, so both ends agree on what was said.
#![no_main]

use devtables_sync::wire::{decode_down, decode_up, encode_down, encode_up, WireConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits, so the size and count checks are reached by small inputs.
    let cfg = WireConfig {
        max_message_bytes: 4096,
        max_changes: 8,
    };
    if let Ok(d) = decode_up(data, &cfg) {
        if let Ok(again) = encode_up(&d.schema, &d.msg, &cfg) {
            let back = decode_up(&again, &cfg).expect("an encoded up message decodes");
            assert_eq!(back.msg, d.msg, "an up message changed through encode/decode");
        }
    }
    if let Ok(d) = decode_down(data, &cfg) {
        if let Ok(again) = encode_down(&d.schema, &d.msg, &cfg) {
            let back = decode_down(&again, &cfg).expect("an encoded down message decodes");
            assert_eq!(back.msg, d.msg, "a down message changed through encode/decode");
        }
    }
});
