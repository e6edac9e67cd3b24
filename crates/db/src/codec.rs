//! The stored form of an item: a compact binary encoding of its JSON object (since format 2).
//!
//! Items stay JSON documents at the API, in export/import and on the wire; only the bytes in the
//! items tables use this encoding, which decodes without parsing text (no escapes, no number
//! parsing) and lets reads look at single fields (TTL, filter fields) without decoding the
//! whole item. The file's format number is kept in the `meta` table (see `convert`): files written
//! with JSON values (format 1) are converted when opened, unknown formats are refused.
//!
//! Encoding (`varint` = unsigned LEB128):
//! - an item: `varint count`, then per field (in the map's key order) `varint len, key bytes,
//!   value`;
//! - a value: one tag byte, then `NULL`, `FALSE`, `TRUE`: nothing; `UINT`: varint; `NEGINT`:
//!   varint of `!(n as u64)` (n < 0); `FLOAT`: 8 bytes little-endian IEEE 754; `STRING`:
//!   `varint len`, UTF-8 bytes; `ARRAY`: `varint count`, values; `OBJECT`: like an item;
//!   `KEY_PK`, `KEY_SK`: nothing: the string is the pk (sk) part of the item's own key in the
//!   items table (used for the top-level primary-key attributes, which would repeat the key);
//!   `DATE`: zigzag varint of epoch milliseconds, for a string that is exactly the canonical
//!   ISO-8601 spelling of that instant (`YYYY-MM-DDTHH:MM:SS.mmmZ`, the stored form of dates):
//!   decoding spells it again, byte for byte (checked when encoding).
//!
//! Every read is bounds-checked and UTF-8-checked: corrupt bytes give [`DbError::Corrupt`], never
//! a panic.

use devtables_schema::{format_iso_ms as format_date, format_iso_ms_bytes, Item, ItemKey};
use serde_json::{Map, Number, Value};

use crate::DbError;

pub(crate) const NULL: u8 = 0;
pub(crate) const FALSE: u8 = 1;
pub(crate) const TRUE: u8 = 2;
pub(crate) const UINT: u8 = 3;
pub(crate) const NEGINT: u8 = 4;
pub(crate) const FLOAT: u8 = 5;
pub(crate) const STRING: u8 = 6;
pub(crate) const ARRAY: u8 = 7;
pub(crate) const OBJECT: u8 = 8;
pub(crate) const KEY_PK: u8 = 9;
pub(crate) const KEY_SK: u8 = 10;
pub(crate) const DATE: u8 = 11;

/// Nesting limit of decoded values (serde_json's own limit is 128).
pub(crate) const MAX_DEPTH: usize = 128;

/// Encodes a stored item whose key is `key`; `hash` and `sort` name the primary index's key
/// attributes, whose values are left out when they equal the key's parts.
pub(crate) fn encode(item: &Item, hash: &str, sort: Option<&str>, key: &ItemKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    put_varint(&mut out, item.len() as u64);
    for (k, v) in item {
        put_str(&mut out, k);
        match v {
            Value::String(s) if k == hash && *s == key.pk => out.push(KEY_PK),
            Value::String(s) if Some(k.as_str()) == sort && *s == key.sk => out.push(KEY_SK),
            _ => encode_value(v, &mut out),
        }
    }
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
        Value::String(s) => match canonical_date_ms(s) {
            Some(ms) => {
                out.push(DATE);
                put_varint(out, ((ms << 1) ^ (ms >> 63)) as u64);
            }
            None => {
                out.push(STRING);
                put_str(out, s);
            }
        },
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

/// Epoch milliseconds of `s` when it is exactly the canonical spelling `YYYY-MM-DDTHH:MM:SS.mmmZ`
/// of that instant (so `format_date` gives `s` back).
fn canonical_date_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[23] != b'Z' {
        return None;
    }
    let sep = [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ];
    if sep.iter().any(|&(i, c)| b[i] != c) {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        b[from..to].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec, milli) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let ms = (((days_from_civil(y, m, d) * 24 + h) * 60 + mi) * 60 + sec) * 1000 + milli;
    // Rejects what does not round-trip (February 30th and the like); spelled on the stack, as
    // this runs for every date-like string an item stores.
    (format_iso_ms_bytes(ms)?.as_slice() == b).then_some(ms)
}

/// The instant a `DATE` value holds (zigzag varint), spelled canonically.
pub(crate) fn date_text(z: u64) -> Result<String, Bad> {
    format_date(unzigzag(z)).ok_or_else(|| corrupt("date out of range"))
}

/// Epoch milliseconds of `0000-01-01T00:00:00.000Z`, the first instant a date spells.
pub(crate) const DATE_MIN_MS: i64 = -62_167_219_200_000;
/// Epoch milliseconds of `9999-12-31T23:59:59.999Z`, the last instant a date spells.
pub(crate) const DATE_MAX_MS: i64 = 253_402_300_799_999;

/// The instant a `DATE` value holds (zigzag varint), when it has a spelling (as
/// [`date_text`] accepts it, without spelling it).
pub(crate) fn date_ms(z: u64) -> Result<i64, Bad> {
    let ms = unzigzag(z);
    if (DATE_MIN_MS..=DATE_MAX_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(corrupt("date out of range"))
    }
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Upper bound of the JSON text length of an item of key `key` whose encoding is `encoded_len`
/// bytes long: a byte of the encoding becomes at most 14 bytes of JSON (a `DATE` of 2 bytes is
/// 27 with quotes and comma; `\u0000` is 6 for 1), a key reference the key part, escaped.
pub(crate) fn json_len_bound(encoded_len: usize, key: &ItemKey) -> usize {
    encoded_len
        .saturating_mul(14)
        .saturating_add(key.pk.len().saturating_add(key.sk.len()).saturating_mul(6))
        .saturating_add(64)
}

/// Why stored bytes do not decode (small, so the decoder's results stay small).
#[derive(Debug)]
pub(crate) struct Bad(pub(crate) &'static str);

impl From<Bad> for DbError {
    fn from(Bad(what): Bad) -> Self {
        DbError::Corrupt(format!("stored item is malformed: {what}"))
    }
}

fn corrupt(what: &'static str) -> Bad {
    Bad(what)
}

/// The parts of an encoded item key (`pk \0 sk`).
fn key_parts(raw_key: &[u8]) -> Result<(&str, &str), Bad> {
    let at = raw_key
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| corrupt("item key without separator"))?;
    let pk = std::str::from_utf8(&raw_key[..at]).map_err(|_| corrupt("key is not UTF-8"))?;
    let sk = std::str::from_utf8(&raw_key[at + 1..]).map_err(|_| corrupt("key is not UTF-8"))?;
    Ok((pk, sk))
}

#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    pub(crate) key: (&'a str, &'a str),
}

impl<'a> Reader<'a> {
    pub(crate) fn new(raw: &'a [u8], raw_key: &'a [u8]) -> Result<Self, Bad> {
        Ok(Reader::with_key(raw, key_parts(raw_key)?))
    }

    /// A reader of `raw` whose key references stand for `key` (pk, sk), already split.
    pub(crate) fn with_key(raw: &'a [u8], key: (&'a str, &'a str)) -> Self {
        Reader {
            buf: raw,
            pos: 0,
            key,
        }
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// The next byte, not consumed.
    #[inline]
    pub(crate) fn peek(&self) -> Result<u8, Bad> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| corrupt("truncated"))
    }

    #[inline]
    pub(crate) fn byte(&mut self) -> Result<u8, Bad> {
        let b = *self.buf.get(self.pos).ok_or_else(|| corrupt("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u64, Bad> {
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

    #[inline]
    pub(crate) fn bytes(&mut self, len: u64) -> Result<&'a [u8], Bad> {
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

    #[inline]
    pub(crate) fn str(&mut self) -> Result<&'a str, Bad> {
        let len = self.varint()?;
        let b = self.bytes(len)?;
        // No `unsafe` for ASCII: the standard library's check already runs word by word.
        std::str::from_utf8(b).map_err(|_| corrupt("string is not UTF-8"))
    }

    /// A count of entries that each take at least one byte (bounds the allocation).
    #[inline]
    pub(crate) fn count(&mut self) -> Result<usize, Bad> {
        let n = self.varint()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(corrupt("count exceeds the item"));
        }
        Ok(n as usize)
    }

    fn map(&mut self, depth: usize, keep: &dyn Fn(&str) -> bool) -> Result<Item, Bad> {
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

    fn value(&mut self, depth: usize) -> Result<Value, Bad> {
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
            DATE => Value::String(date_text(self.varint()?)?),
            ARRAY => {
                let n = self.count()?;
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.value(depth + 1)?);
                }
                Value::Array(a)
            }
            OBJECT => Value::Object(self.map(depth + 1, &|_| true)?),
            KEY_PK if depth == 0 => Value::String(self.key.0.to_string()),
            KEY_SK if depth == 0 => Value::String(self.key.1.to_string()),
            _ => return Err(corrupt("unknown value tag")),
        })
    }

    pub(crate) fn skip(&mut self, depth: usize) -> Result<(), Bad> {
        if depth >= MAX_DEPTH {
            return Err(corrupt("nested too deeply"));
        }
        match self.byte()? {
            NULL | FALSE | TRUE => {}
            KEY_PK | KEY_SK if depth == 0 => {}
            UINT | NEGINT | DATE => {
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

    pub(crate) fn done(&self) -> Result<(), Bad> {
        if self.pos != self.buf.len() {
            return Err(corrupt("trailing bytes"));
        }
        Ok(())
    }
}

/// The whole item stored as `raw` under the item key `raw_key`.
pub(crate) fn decode(raw: &[u8], raw_key: &[u8]) -> Result<Item, DbError> {
    decode_with(raw, raw_key, &|_| true)
}

/// The item with only the top-level fields `keep` accepts (the others are skipped unread).
pub(crate) fn decode_with(
    raw: &[u8],
    raw_key: &[u8],
    keep: &dyn Fn(&str) -> bool,
) -> Result<Item, DbError> {
    let mut r = Reader::new(raw, raw_key)?;
    let item = r.map(0, keep)?;
    r.done()?;
    Ok(item)
}

/// Whether the top-level field `name` is the string `expected` (without decoding the item).
pub(crate) fn field_is_str(
    raw: &[u8],
    raw_key: &[u8],
    name: &str,
    expected: &str,
) -> Result<bool, DbError> {
    let mut r = Reader::new(raw, raw_key)?;
    let n = r.count()?;
    for _ in 0..n {
        let k = r.str()?;
        if k == name {
            return Ok(match r.byte()? {
                STRING => r.str()? == expected,
                KEY_PK => r.key.0 == expected,
                KEY_SK => r.key.1 == expected,
                _ => false,
            });
        }
        r.skip(0)?;
    }
    Ok(false)
}

/// The stored bytes of an item in a format-1 file (JSON text) converted to this format.
pub(crate) fn from_json(
    raw: &[u8],
    raw_key: &[u8],
    hash: &str,
    sort: Option<&str>,
) -> Result<Vec<u8>, DbError> {
    let item: Item = serde_json::from_slice(raw)
        .map_err(|e| DbError::Corrupt(format!("stored item is not JSON: {e}")))?;
    let (pk, sk) = key_parts(raw_key)?;
    let key = ItemKey {
        pk: pk.to_string(),
        sk: sk.to_string(),
    };
    Ok(encode(&item, hash, sort, &key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Item {
        v.as_object().cloned().unwrap_or_default()
    }

    const RAW_KEY: &[u8] = b"p1\0s1";

    fn key() -> ItemKey {
        ItemKey {
            pk: "p1".into(),
            sk: "s1".into(),
        }
    }

    fn enc(item: &Item) -> Vec<u8> {
        encode(item, "pk", Some("sk"), &key())
    }

    fn decode(raw: &[u8]) -> Result<Item, DbError> {
        super::decode(raw, RAW_KEY)
    }

    #[test]
    fn key_attributes_are_taken_from_the_key() {
        let item = obj(json!({"pk": "p1", "sk": "s1", "x": "p1"}));
        let raw = enc(&item);
        let other = obj(json!({"pk": "p1", "sk": "OTHER", "x": "p1"}));
        assert!(raw.len() + 5 < enc(&other).len() + 4, "pk and sk left out");
        assert_eq!(decode(&raw).unwrap(), item);
        assert_eq!(decode(&enc(&other)).unwrap(), other);
        assert!(field_is_str(&raw, RAW_KEY, "sk", "s1").unwrap());
        assert_eq!(super::decode(&raw, b"a\0b").unwrap()["pk"], json!("a"));
        assert!(super::decode(&raw, b"no separator").is_err());
        // A number with the key's text is not a key reference.
        let num = obj(json!({"pk": 1}));
        let k1 = ItemKey {
            pk: "1".into(),
            sk: String::new(),
        };
        let raw = encode(&num, "pk", None, &k1);
        assert_eq!(super::decode(&raw, b"1\0").unwrap(), num);
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
        let raw = enc(&item);
        assert_eq!(decode(&raw).unwrap(), item);
        // Numbers keep their kind (a float that is integral stays a float).
        assert!(decode(&raw).unwrap()["one"].is_f64());
        assert!(decode(&raw).unwrap()["u"].is_u64());
        assert!(serde_json::to_vec(&item).unwrap().len() <= json_len_bound(raw.len(), &key()));
        let dates = obj(json!({"a": "1970-01-01T00:00:00.000Z", "b": [false, null]}));
        let json_len = serde_json::to_vec(&dates).unwrap().len();
        assert!(json_len <= json_len_bound(enc(&dates).len(), &key()));
    }

    #[test]
    fn canonical_dates_are_stored_as_numbers_and_spelled_again() {
        let dates = [
            "2026-11-25T19:21:46.123Z",
            "1970-01-01T00:00:00.000Z",
            "1969-12-31T23:59:59.999Z",
            "0000-01-01T00:00:00.000Z",
            "9999-12-31T23:59:59.999Z",
            "2024-02-29T12:00:00.000Z",
        ];
        for d in dates {
            let ms = canonical_date_ms(d).unwrap_or_else(|| panic!("{d}"));
            assert_eq!(format_date(ms).as_deref(), Some(d));
            let item = obj(json!({"d": d, "nested": {"d": [d]}}));
            let raw = enc(&item);
            assert_eq!(decode(&raw).unwrap(), item);
        }
        assert_eq!(
            canonical_date_ms("2026-11-25T18:00:00.000Z"),
            Some(1_795_629_600_000)
        );
        for not in [
            "2023-02-29T00:00:00.000Z",
            "2026-11-25T18:00:00.000+",
            "2026-11-25T24:00:00.000Z",
            "2026-11-25 18:00:00.000Z",
            "2026-11-25T18:00:00.00Z",
            "2026-11-25T18:00:00Z",
            "+026-11-25T18:00:00.000Z",
        ] {
            assert_eq!(canonical_date_ms(not), None, "{not}");
            let item = obj(json!({ "d": not }));
            assert_eq!(decode(&enc(&item)).unwrap(), item);
        }
        // Every millisecond of a leap day, sampled.
        let start = canonical_date_ms("2000-02-28T00:00:00.000Z").unwrap();
        for ms in (start..start + 3 * 86_400_000).step_by(997_001) {
            let text = format_date(ms).unwrap();
            assert_eq!(canonical_date_ms(&text), Some(ms), "{text}");
        }
    }

    #[test]
    fn the_date_range_is_the_spellable_range() {
        let zig = |ms: i64| ((ms << 1) ^ (ms >> 63)) as u64;
        for ms in [DATE_MIN_MS, DATE_MAX_MS, 0, -1, 1] {
            assert!(format_iso_ms_bytes(ms).is_some(), "{ms}");
            assert_eq!(date_ms(zig(ms)).ok(), Some(ms));
            assert!(date_text(zig(ms)).is_ok());
        }
        for ms in [DATE_MIN_MS - 1, DATE_MAX_MS + 1, i64::MIN, i64::MAX] {
            assert!(format_iso_ms_bytes(ms).is_none(), "{ms}");
            assert!(date_ms(zig(ms)).is_err());
            assert!(date_text(zig(ms)).is_err());
        }
    }

    #[test]
    fn partial_decode_and_field_probe() {
        let item = obj(json!({"_type": "A", "x": {"deep": [1, 2]}, "y": "keep", "z": 3}));
        let raw = enc(&item);
        let part = decode_with(&raw, RAW_KEY, &|k| k == "y").unwrap();
        assert_eq!(part, obj(json!({"y": "keep"})));
        assert!(field_is_str(&raw, RAW_KEY, "_type", "A").unwrap());
        assert!(!field_is_str(&raw, RAW_KEY, "_type", "B").unwrap());
        assert!(!field_is_str(&raw, RAW_KEY, "z", "3").unwrap());
        assert!(!field_is_str(&raw, RAW_KEY, "missing", "A").unwrap());
    }

    #[test]
    fn corrupt_bytes_are_errors_not_panics() {
        let raw = enc(&obj(json!({"a": "text", "b": [1.5, -2, {"c": null}]})));
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
        deep.extend(std::iter::repeat_n([ARRAY, 1], 10_000).flatten());
        deep.push(NULL);
        assert!(decode(&deep).is_err());
        // Key references only stand for top-level values.
        assert!(decode(&[1, 1, b'a', ARRAY, 1, KEY_PK]).is_err());
        assert!(decode(&[1, 1, b'a', KEY_PK]).is_ok());
    }
}
