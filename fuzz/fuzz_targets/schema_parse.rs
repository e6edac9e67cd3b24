//! Arbitrary bytes as schema text: a schema file is operator input read at start-up, and a bad
//! one must be refused with a typed error (the dotted path of the fault), never a panic.
#![no_main]

use devtables_schema::Schema;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The parser takes text; invalid UTF-8 is refused before it by `Schema::load`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Schema::from_json5(text);
});
