//! The stored form of an item: a compact binary encoding of its JSON object (format 2).
//!
//! Items stay JSON documents at the API, in export/import and on the wire; only the bytes in the
//! `items` table use this encoding, which decodes without parsing text (no escapes, no number
//! parsing) and lets reads look at single fields (type, TTL, filter fields) without decoding the
//! whole item. The file's format number is kept in the `meta` table (see `lib.rs`): files written
//! with JSON values (format 1) are converted when opened, unknown formats are refused.
//!
//! Encoding (`varint` = unsigned LEB128):
//! - an item: `varint count`, then per field (in the map's key order) `varint len, key bytes,
//!   value`;
//! - a value: one tag byte, then `NULL`, `FALSE`, `TRUE`: nothing; `UINT`: varint; `NEGINT`:
//!   varint of `!(n as u64)` (n < 0); `FLOAT`: 8 bytes little-endian IEEE 754; `STRING`:
//!   `varint len`, UTF-8 bytes; `ARRAY`: `varint count`, values; `OBJECT`: like an item.
//!
//! Every read is bounds-checked and UTF-8-checked: corrupt bytes give [`DbError::Corrupt`], never
//! a panic.

use devtables_schema::Item;
use serde_json::{Map, Number, Value};

use crate::DbError;

/// The stored-item format this version writes and reads.
pub(crate) const FORMAT: u32 = 2;
/// Files written before the format was recorded stored items as JSON text.
pub(crate) const FORMAT_JSON: u32 = 1;

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const UINT: u8 = 3;
const NEGINT: u8 = 4;
const FLOAT: u8 = 5;
const STRING: u8 = 6;
const ARRAY: u8 = 7;
const OBJECT: u8 = 8;

/// Nesting limit of decoded values (serde_json's own limit is 128).
const MAX_DEPTH: usize = 128;

pub(crate) fn encode(item: &Item) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    encode_map(item, &mut out);
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn encode_map(map: &Map<String, Value>, out: &mut Vec<u8>) {
    put_varint(out, map.len() as u64);
    for (k, v) in map {
        put_str(out, k);
        encode_value(v, out);
    }
}

fn encode_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(NULL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push(UINT);
                put_varint(out, u);
            } else if let Some(i) = n.as_i64() {
                out.push(NEGINT);
                put_varint(out, !(i as u64));
            } else {
                out.push(FLOAT);
                out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
            }
        }
        Value::String(s) => {
            out.push(STRING);
            put_str(out, s);
        }
        Value::Array(a) => {
            out.push(ARRAY);
            put_varint(out, a.len() as u64);
            for v in a {
                encode_value(v, out);
            }
        }
        Value::Object(m) => {
            out.push(OBJECT);
            encode_map(m, out);
        }
    }
}

/// Upper bound of the JSON text length of an item whose encoding is `encoded_len` bytes long
/// (a byte of the encoding becomes at most 6 bytes of JSON: `\u0000`; `false,` is 6 for 1).
pub(crate) fn json_len_bound(encoded_len: usize) -> usize {
    encoded_len.saturating_mul(8).saturating_add(64)
}

fn corrupt(what: &str) -> DbError {
    DbError::Corrupt(format!("stored item is malformed: {what}"))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, DbError> {
        let b = *self.buf.get(self.pos).ok_or_else(|| corrupt("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DbError> {
        let mut v = 0u64;
        let mut shift = 0u32;
        loop {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(corrupt("varint overflow"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(corrupt("varint overflow"));
            }
        }
    }

    fn bytes(&mut self, len: u64) -> Result<&'a [u8], DbError> {
        let len = usize::try_from(len).map_err(|_| corrupt("length"))?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn str(&mut self) -> Result<&'a str, DbError> {
        let len = self.varint()?;
        let b = self.bytes(len)?;
        std::str::from_utf8(b).map_err(|_| corrupt("string is not UTF-8"))
    }

    /// A count of entries that each take at least one byte (bounds the allocation).
    fn count(&mut self) -> Result<usize, DbError> {
        let n = self.varint()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(corrupt("count exceeds the item"));
        }
        Ok(n as usize)
    }

    fn map(&mut self, depth: usize, keep: &dyn Fn(&str) -> bool) -> Result<Item, DbError> {
        let n = self.count()?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let k = self.str()?;
            if keep(k) {
                let v = self.value(depth)?;
                entries.push((k.to_string(), v));
            } else {
                self.skip(depth)?;
            }
        }
        Ok(entries.into_iter().collect())
    }

    fn value(&mut self, depth: usize) -> Result<Value, DbError> {
        if depth >= MAX_DEPTH {
            return Err(corrupt("nested too deeply"));
        }
        Ok(match self.byte()? {
            NULL => Value::Null,
            FALSE => Value::Bool(false),
            TRUE => Value::Bool(true),
            UINT => Value::Number(Number::from(self.varint()?)),
            NEGINT => Value::Number(Number::from(!self.varint()? as i64)),
            FLOAT => {
                let b = self.bytes(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let f = f64::from_le_bytes(a);
                Value::Number(Number::from_f64(f).ok_or_else(|| corrupt("non-finite number"))?)
            }
            STRING => Value::String(self.str()?.to_string()),
            ARRAY => {
                let n = self.count()?;
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.value(depth + 1)?);
                }
                Value::Array(a)
            }
            OBJECT => Value::Object(self.map(depth + 1, &|_| true)?),
            _ => return Err(corrupt("unknown value tag")),
        })
    }

    fn skip(&mut self, depth: usize) -> Result<(), DbError> {
        if depth >= MAX_DEPTH {
            return Err(corrupt("nested too deeply"));
        }
        match self.byte()? {
            NULL | FALSE | TRUE => {}
            UINT | NEGINT => {
                self.varint()?;
            }
            FLOAT => {
                self.bytes(8)?;
            }
            STRING => {
                let len = self.varint()?;
                self.bytes(len)?;
            }
            ARRAY => {
                let n = self.count()?;
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
            }
            OBJECT => {
                let n = self.count()?;
                for _ in 0..n {
                    let len = self.varint()?;
                    self.bytes(len)?;
                    self.skip(depth + 1)?;
                }
            }
            _ => return Err(corrupt("unknown value tag")),
        }
        Ok(())
    }

    fn done(&self) -> Result<(), DbError> {
        if self.pos != self.buf.len() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(())
    }
}

/// The whole item.
pub(crate) fn decode(raw: &[u8]) -> Result<Item, DbError> {
    decode_with(raw, &|_| true)
}

/// The item with only the top-level fields `keep` accepts (the others are skipped unread).
pub(crate) fn decode_with(raw: &[u8], keep: &dyn Fn(&str) -> bool) -> Result<Item, DbError> {
    let mut r = Reader { buf: raw, pos: 0 };
    let item = r.map(0, keep)?;
    r.done()?;
    Ok(item)
}

/// Whether the top-level field `name` is the string `expected` (without decoding the item).
pub(crate) fn field_is_str(raw: &[u8], name: &str, expected: &str) -> Result<bool, DbError> {
    let mut r = Reader { buf: raw, pos: 0 };
    let n = r.count()?;
    for _ in 0..n {
        let k = r.str()?;
        if k == name {
            return Ok(match r.byte()? {
                STRING => r.str()? == expected,
                _ => false,
            });
        }
        r.skip(0)?;
    }
    Ok(false)
}

/// The stored bytes of an item in a format-1 file (JSON text) converted to this format.
pub(crate) fn from_json(raw: &[u8]) -> Result<Vec<u8>, DbError> {
    let item: Item = serde_json::from_slice(raw)
        .map_err(|e| DbError::Corrupt(format!("stored item is not JSON: {e}")))?;
    Ok(encode(&item))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Item {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn items_round_trip() {
        let item = obj(json!({
            "s": "héllo \u{0} \"q\"", "empty": "", "u": 0, "big": u64::MAX, "neg": -5,
            "min": i64::MIN, "f": 20.125, "tiny": 1e-300, "third": 1.0 / 3.0, "one": 1.0,
            "t": true, "fa": false, "n": null,
            "a": [1, "x", [], {}, [null, {"k": [2.5]}]],
            "o": {"z": {"y": {"x": "deep"}}, "": "empty key"},
        }));
        let raw = encode(&item);
        assert_eq!(decode(&raw).unwrap(), item);
        // Numbers keep their kind (a float that is integral stays a float).
        assert!(decode(&raw).unwrap()["one"].is_f64());
        assert!(decode(&raw).unwrap()["u"].is_u64());
        assert!(serde_json::to_vec(&item).unwrap().len() <= json_len_bound(raw.len()));
    }

    #[test]
    fn partial_decode_and_field_probe() {
        let item = obj(json!({"_type": "A", "x": {"deep": [1, 2]}, "y": "keep", "z": 3}));
        let raw = encode(&item);
        let part = decode_with(&raw, &|k| k == "y").unwrap();
        assert_eq!(part, obj(json!({"y": "keep"})));
        assert!(field_is_str(&raw, "_type", "A").unwrap());
        assert!(!field_is_str(&raw, "_type", "B").unwrap());
        assert!(!field_is_str(&raw, "z", "3").unwrap());
        assert!(!field_is_str(&raw, "missing", "A").unwrap());
    }

    #[test]
    fn corrupt_bytes_are_errors_not_panics() {
        let raw = encode(&obj(json!({"a": "text", "b": [1.5, -2, {"c": null}]})));
        for cut in 0..raw.len() {
            assert!(decode(&raw[..cut]).is_err(), "truncated at {cut}");
        }
        let mut bad = raw.clone();
        bad.push(0);
        assert!(matches!(decode(&bad), Err(DbError::Corrupt(_))));
        assert!(decode(b"{\"json\": 1}").is_err());
        assert!(decode(&[0xff; 12]).is_err());
        // A huge count does not allocate.
        assert!(decode(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        // Deep nesting is refused, not a stack overflow.
        let mut deep = vec![1, 1, b'a'];
        deep.extend(std::iter::repeat([ARRAY, 1]).take(10_000).flatten());
        deep.push(NULL);
        assert!(decode(&deep).is_err());
    }
}
