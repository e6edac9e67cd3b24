//! Arbitrary bytes as a stored item: a database file can be corrupted on disk or written by
//! another program, and reading it must give `DbError::Corrupt`, never a panic. What decodes must
//! encode and decode again to the same item.
#![no_main]

use devtables_db::fuzzing::{decode_item, decode_item_with, encode_item, field_is_str};
use devtables_schema::ItemKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: length of the raw key (`pk \0 sk`); then the key; the rest is the stored item.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len());
    let (raw_key, raw) = rest.split_at(n);
    let _ = field_is_str(raw, raw_key, "_type", "Fault");
    let _ = decode_item_with(raw, raw_key, &|f| f.starts_with('s'));
    let Ok(item) = decode_item(raw, raw_key) else {
        return;
    };
    let at = raw_key.iter().position(|b| *b == 0).expect("a decoded item has a key");
    let key = ItemKey {
        pk: String::from_utf8(raw_key[..at].to_vec()).expect("UTF-8 pk"),
        sk: String::from_utf8(raw_key[at + 1..].to_vec()).expect("UTF-8 sk"),
    };
    let again = encode_item(&item, &key);
    let back = decode_item(&again, raw_key).expect("an encoded item decodes");
    assert_eq!(back, item, "an item changed through encode/decode");
});
