//! JSON text to a `serde_json::Value` without silently rounding big integers.
//!
//! serde_json (without its `arbitrary_precision` feature, which would change `Value` for the
//! whole workspace) reads an integer outside the 64-bit range (`-9223372036854775808` to
//! `18446744073709551615`) as the nearest `f64`: `18446744073709551616` and
//! `18446744073709551617` become the same number, and an id or a counter is stored as something
//! its sender never wrote. [`parse_json_exact`] refuses such an integer instead, naming it and
//! where it is, and keeps every integer within the range exact (serde_json already does).
//!
//! It exists here, beside the schema, so every JSON input of devtables can use it: the
//! `devtables db` arguments, `Db::import`, and the cloud API later.

use serde_json::Value;

/// Most characters of an offending number shown in an error (a 10 MB number is not echoed).
const MAX_SHOWN_DIGITS: usize = 40;

/// Why [`parse_json_exact`] refused a text.
#[derive(Debug, thiserror::Error)]
pub enum ExactJsonError {
    /// The text is not JSON.
    #[error("invalid JSON: {0}")]
    Syntax(serde_json::Error),
    /// An integer outside the 64-bit range, which would be rounded to a float.
    #[error(
        "the integer {shown} ({where_}) is outside the 64-bit range (-9223372036854775808 to \
         18446744073709551615), so it would be rounded: send it as a string, in a string field",
        shown = shown_number(.number),
        where_ = position(*.line, *.column)
    )]
    IntegerTooLarge {
        /// The integer as written.
        number: String,
        /// Its line in the text, from 1.
        line: usize,
        /// Its column (in characters) on that line, from 1.
        column: usize,
    },
}

fn shown_number(number: &str) -> String {
    match number.char_indices().nth(MAX_SHOWN_DIGITS) {
        Some((at, _)) => format!("{}... ({} digits)", &number[..at], number.len()),
        None => number.to_string(),
    }
}

fn position(line: usize, column: usize) -> String {
    if line == 1 {
        format!("at column {column}")
    } else {
        format!("at line {line}, column {column}")
    }
}

/// Parses `text` as JSON like `serde_json::from_str`, but refuses an integer that does not fit
/// in an `i64` or a `u64` (serde_json would turn it into a rounded `f64`). Numbers with a
/// fraction or an exponent are floats, as the sender wrote them, and are kept as serde_json
/// reads them.
pub fn parse_json_exact(text: &str) -> Result<Value, ExactJsonError> {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        // An integer past the float range too (more than 309 digits) is a serde_json error:
        // say what it is rather than "number out of range".
        Err(e) => {
            return Err(match first_inexact_integer(text) {
                Some(ExactJsonError::IntegerTooLarge {
                    number,
                    line,
                    column,
                }) if e.line() == line
                    && (column..=column + number.len()).contains(&e.column()) =>
                {
                    ExactJsonError::IntegerTooLarge {
                        number,
                        line,
                        column,
                    }
                }
                _ => ExactJsonError::Syntax(e),
            })
        }
    };
    // An out-of-range integer can only have become a float: without floats there is nothing to
    // look for in the text.
    if has_float(&value) {
        if let Some(err) = first_inexact_integer(text) {
            return Err(err);
        }
    }
    Ok(value)
}

/// Whether `value` holds a number serde_json stores as a float. (serde_json limits nesting to
/// 128 levels, so the recursion is bounded.)
fn has_float(value: &Value) -> bool {
    match value {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(map) => map.values().any(has_float),
        _ => false,
    }
}

/// The first integer token (outside strings) of `text` that fits neither `i64` nor `u64`. On
/// text that is not JSON it finds what it finds, without failing.
fn first_inexact_integer(text: &str) -> Option<ExactJsonError> {
    let bytes = text.as_bytes();
    let (mut line, mut line_start) = (1usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                line += 1;
                line_start = i + 1;
                i += 1;
            }
            b'"' => {
                // Skip the string: a backslash escapes the byte after it (a quote or a
                // backslash; longer escapes hold no quote). JSON strings hold no raw newline.
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                i += 1;
                let mut integer = true;
                while i < bytes.len() {
                    match bytes[i] {
                        b'0'..=b'9' => {}
                        b'.' | b'e' | b'E' | b'+' | b'-' => integer = false,
                        _ => break,
                    }
                    i += 1;
                }
                let token = &text[start..i];
                let fits = if token.starts_with('-') {
                    token.parse::<i64>().is_ok()
                } else {
                    token.parse::<u64>().is_ok()
                };
                if integer && !fits {
                    return Some(ExactJsonError::IntegerTooLarge {
                        number: token.to_string(),
                        line,
                        column: text[line_start..start].chars().count() + 1,
                    });
                }
            }
            _ => i += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn refused(text: &str) -> (String, usize, usize) {
        match parse_json_exact(text) {
            Err(ExactJsonError::IntegerTooLarge {
                number,
                line,
                column,
            }) => (number, line, column),
            other => panic!("{text}: expected a refused integer, got {other:?}"),
        }
    }

    #[test]
    fn the_64_bit_extremes_are_kept_exact() {
        let v = parse_json_exact(r#"{"max": 18446744073709551615, "min": -9223372036854775808}"#)
            .unwrap();
        assert_eq!(v["max"].as_u64(), Some(u64::MAX));
        assert_eq!(v["min"].as_i64(), Some(i64::MIN));
        assert_eq!(
            v.to_string(),
            r#"{"max":18446744073709551615,"min":-9223372036854775808}"#
        );
    }

    #[test]
    fn one_past_either_extreme_is_refused_with_its_place() {
        assert_eq!(
            refused(r#"{"n": 18446744073709551616}"#),
            ("18446744073709551616".into(), 1, 7)
        );
        assert_eq!(
            refused("{\n  \"a\": 1.5,\n  \"n\": [1, -9223372036854775809]\n}"),
            ("-9223372036854775809".into(), 3, 12)
        );
        let err = parse_json_exact("[123456789012345678901234567890]")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the integer 123456789012345678901234567890 (at column 2) is outside the 64-bit \
             range (-9223372036854775808 to 18446744073709551615), so it would be rounded: send \
             it as a string, in a string field"
        );
    }

    #[test]
    fn a_huge_integer_is_cut_in_the_message() {
        let text = format!("[{}]", "9".repeat(100_000));
        let err = parse_json_exact(&text).unwrap_err().to_string();
        assert!(err.len() < 400, "{} bytes", err.len());
        assert!(err.contains("(100000 digits)"), "{err}");
    }

    #[test]
    fn floats_and_digits_inside_strings_are_left_alone() {
        let text = r#"{"99999999999999999999": "x\"99999999999999999999\\", "f": 1e300,
                      "g": -2.5E-3, "s": "123456789012345678901234567890"}"#;
        let v = parse_json_exact(text).unwrap();
        assert_eq!(v["f"], json!(1e300));
        assert_eq!(v["s"], json!("123456789012345678901234567890"));
        assert_eq!(
            v["99999999999999999999"],
            json!("x\"99999999999999999999\\")
        );
    }

    #[test]
    fn syntax_errors_are_serde_json_s() {
        let err = parse_json_exact("{\"a\": }").unwrap_err();
        assert!(matches!(err, ExactJsonError::Syntax(_)), "{err:?}");
        assert!(err.to_string().starts_with("invalid JSON: "), "{err}");
        // A syntax error before a number past 64 bits (one past the float range too) is
        // reported as such.
        let huge = "9".repeat(400);
        let err = parse_json_exact(&format!("[}}, {huge}]")).unwrap_err();
        assert!(matches!(err, ExactJsonError::Syntax(_)), "{err:?}");
    }

    /// Any JSON value without floats: integers across the whole 64-bit range, strings with
    /// quotes, backslashes, digits and non-ASCII characters, nested arrays and objects.
    fn value_without_floats() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            prop::sample::select(vec![i64::MIN, i64::MAX, -1, 0]).prop_map(Value::from),
            "[\"\\\\0-9a-zé\\- ]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[\"\\\\0-9a-z]{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn values_without_floats_round_trip(value in value_without_floats()) {
            for text in [value.to_string(), serde_json::to_string_pretty(&value).unwrap()] {
                prop_assert_eq!(parse_json_exact(&text).unwrap(), value.clone());
            }
        }

        #[test]
        fn an_out_of_range_integer_anywhere_is_refused(
            value in value_without_floats(),
            extra in 1u64..1_000_000,
            negative: bool,
        ) {
            // u64::MAX + extra, or i64::MIN - extra, written as text beside a float (so the
            // float check does not skip the scan for another reason).
            let big = if negative {
                format!("-{}", u128::from(i64::MIN.unsigned_abs()) + u128::from(extra))
            } else {
                (u128::from(u64::MAX) + u128::from(extra)).to_string()
            };
            let text = format!("[{value}, 0.5, {big}]");
            match parse_json_exact(&text) {
                Err(ExactJsonError::IntegerTooLarge { number, .. }) => prop_assert_eq!(number, big),
                other => prop_assert!(false, "{}: {:?}", text, other),
            }
        }
    }
}
