//! [`ItemView`]: a read that builds no map. The item's stored bytes, copied once out of the
//! store, with its fields decoded only when they are asked for.
//!
//! It exists because the JSON form of a get ([`crate::Db::get`]) spends most of its work on
//! allocation: a `String` per field name and per string value, a `BTreeMap` node per entry, a
//! `String` per date spelled, and then the caller drops it all (issue 17: ~8.4k of a get's
//! ~12.5k instructions were the decode). `get_as` fills the caller's own type instead, which
//! still copies every string the type owns. A view lends everything: strings are `&str` into
//! its one buffer (the record, then the item key it was found under, which holds the pk/sk
//! values the stored form leaves out), numbers are read in place, dates are their stored
//! milliseconds ([`StoredDate`], spelled only when asked), nested arrays and objects are walked
//! when the caller walks them ([`ArrayRef`], [`ObjectRef`]).
//!
//! A view is checked whole when it is made: every value it lets the caller see decodes (tags,
//! lengths, UTF-8, finite floats, dates in the spellable range, nesting depth), exactly where
//! the JSON form would decode, so a damaged record is a [`crate::DbError`] from the get and never a
//! surprise later. The accessors then cannot fail; they re-read the same immutable bytes.
//! Hidden fields are checked only for their structure, as the JSON form skips them, and are
//! invisible unless the view was asked for with `hidden`.
//!
//! What a view shows is exactly the JSON form: [`ItemView::to_item`] equals what
//! [`crate::ReadTxn::get`] returns for the same item and `hidden` flag (a property test holds
//! the two equal).

use std::fmt;

use devtables_schema::{format_iso_ms, format_iso_ms_bytes, ttl_expiry_ms, Item, Model, TtlValue};
use serde_json::{Map, Number, Value};

use crate::codec::{self, Bad, Reader};

/// One stored item, owned, with its fields decoded on access (see the module docs).
///
/// Made by [`crate::ReadTxn::get_view`] and [`crate::Db::get_view`]; it borrows the database's
/// schema (`'m`) and nothing of the store, so holding one never blocks a writer.
pub struct ItemView<'m> {
    /// Which fields are hidden.
    model: &'m Model,
    /// Whether hidden fields are visible.
    hidden: bool,
    /// The stored record (the encoding of `codec`, checked at construction), then the item
    /// key it was found under (`pk \0 sk`: the text of the `KEY_PK`/`KEY_SK` references):
    /// the view's one allocation.
    buf: Vec<u8>,
    /// Where the key starts in `buf`.
    record_len: usize,
    /// The length of the key's `pk`.
    pk_len: usize,
    /// Bit `i`: the record's field `i` is visible (computed by the check, so the accessors
    /// do not ask the model again); fields past the 64th are asked.
    visible_mask: u64,
}

impl fmt::Debug for ItemView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.fields()).finish()
    }
}

impl<'m> ItemView<'m> {
    /// A view of `record`, stored under `key` (`pk \0 sk`, `pk_len` bytes of `pk`) in the
    /// items table of `model`, copied into one buffer and checked whole.
    pub(crate) fn new(
        model: &'m Model,
        record: &[u8],
        key: &[u8],
        pk_len: usize,
        hidden: bool,
    ) -> Result<Self, Bad> {
        let mut buf = Vec::with_capacity(record.len() + key.len());
        buf.extend_from_slice(record);
        buf.extend_from_slice(key);
        let mut view = ItemView {
            model,
            hidden,
            buf,
            record_len: record.len(),
            pk_len,
            visible_mask: 0,
        };
        view.visible_mask = view.check()?;
        Ok(view)
    }

    fn record(&self) -> &[u8] {
        self.buf.get(..self.record_len).unwrap_or_default()
    }

    /// The key's parts as text (checked at construction).
    fn key_parts(&self) -> Result<(&str, &str), Bad> {
        let key = self.buf.get(self.record_len..).unwrap_or_default();
        let (pk, sk) = match (key.get(..self.pk_len), key.get(self.pk_len + 1..)) {
            (Some(pk), Some(sk)) => (pk, sk),
            _ => return Err(Bad("item key without separator")),
        };
        match (std::str::from_utf8(pk), std::str::from_utf8(sk)) {
            (Ok(pk), Ok(sk)) => Ok((pk, sk)),
            _ => Err(Bad("key is not UTF-8")),
        }
    }

    /// A reader of the record. Key references are answered by the view ([`ItemView::top`]),
    /// so the key's text is not checked for every read.
    fn reader(&self) -> Reader<'_> {
        Reader::with_key(self.record(), ("", ""))
    }

    fn visible(&self, name: &str) -> bool {
        self.hidden || !self.model.is_hidden(name)
    }

    /// Whether the record's field `index`, called `name`, is visible.
    #[inline]
    fn visible_at(&self, index: usize, name: &str) -> bool {
        match u32::try_from(index) {
            Ok(i) if i < 64 => self.visible_mask & (1 << i) != 0,
            _ => self.visible(name),
        }
    }

    /// Decodes what the accessors will read, building nothing: the visible fields whole, the
    /// hidden ones' structure only (as `codec::decode_with` treats them). Returns which of the
    /// first 64 fields are visible.
    fn check(&self) -> Result<u64, Bad> {
        let mut r = Reader::with_key(self.record(), self.key_parts()?);
        let n = r.count()?;
        let mut mask = 0u64;
        for i in 0..n {
            let name = r.str()?;
            if self.visible(name) {
                if i < 64 {
                    mask |= 1 << i;
                }
                check_value(&mut r, 0)?;
            } else {
                r.skip(0)?;
            }
        }
        r.done()?;
        Ok(mask)
    }

    /// The top-level value at `r`, key references answered from the key.
    #[inline]
    fn top<'v>(&'v self, r: &mut Reader<'v>) -> Result<FieldRef<'v>, Bad> {
        match r.peek()? {
            codec::KEY_PK => {
                r.byte()?;
                Ok(FieldRef::Str(self.pk()))
            }
            codec::KEY_SK => {
                r.byte()?;
                Ok(FieldRef::Str(self.sk()))
            }
            _ => field_ref(r, 0),
        }
    }

    /// The model the item belongs to.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The item's primary key: the hash value (`pk`).
    pub fn pk(&self) -> &str {
        self.key_parts().map_or("", |(pk, _)| pk)
    }

    /// The item's primary key: the sort value (`sk`, `""` without a sort key).
    pub fn sk(&self) -> &str {
        self.key_parts().map_or("", |(_, sk)| sk)
    }

    /// The field `name`, when the item has it and it is visible (hidden fields only in a view
    /// asked for with `hidden`). Walks the stored fields up to it, skipping the others unread.
    pub fn get(&self, name: &str) -> Option<FieldRef<'_>> {
        if !self.visible(name) {
            return None;
        }
        let mut r = self.reader();
        let n = r.count().ok()?;
        for _ in 0..n {
            let len = r.varint().ok()?;
            if r.bytes(len).ok()? == name.as_bytes() {
                return self.top(&mut r).ok();
            }
            r.skip(0).ok()?;
        }
        None
    }

    /// The visible fields, (name, value), in stored order (the names' byte order), allocating
    /// nothing.
    pub fn fields(&self) -> Fields<'_> {
        let mut r = self.reader();
        // Checked at construction: a count is there.
        let left = r.count().unwrap_or(0);
        Fields {
            r,
            at: 0,
            left,
            view: self,
        }
    }

    /// The item in its JSON form: what [`crate::ReadTxn::get`] returns for it with the same
    /// `hidden` flag (allocates as that does).
    pub fn to_item(&self) -> Item {
        self.fields()
            .map(|(name, value)| (name.to_string(), value.to_value()))
            .collect()
    }

    /// When the item expires by its TTL field `name`, read whether that field is hidden or not
    /// (`None`: absent, or not a value a TTL reads): [`Model::expires_at_ms`]'s answer for the
    /// item, without building it. A hidden field, which the check read for its structure only,
    /// is checked whole first, as the JSON form's decode of that field would.
    pub(crate) fn expires_at_ms(&self, name: &str) -> Result<Option<i64>, Bad> {
        let mut r = self.reader();
        let n = r.count()?;
        for _ in 0..n {
            let len = r.varint()?;
            if r.bytes(len)? != name.as_bytes() {
                r.skip(0)?;
                continue;
            }
            if !self.visible(name) {
                check_value(&mut r.clone(), 0)?;
            }
            let value = match self.top(&mut r)? {
                FieldRef::U64(n) => {
                    i64::try_from(n).map_or(TtlValue::Float(n as f64), TtlValue::Int)
                }
                FieldRef::I64(n) => TtlValue::Int(n),
                FieldRef::F64(f) => TtlValue::Float(f),
                FieldRef::Str(s) => TtlValue::Text(s),
                FieldRef::Date(d) => TtlValue::Ms(d.epoch_ms()),
                _ => return Ok(None),
            };
            return Ok(ttl_expiry_ms(value));
        }
        Ok(None)
    }

    /// The size of the stored record in bytes.
    pub fn stored_len(&self) -> usize {
        self.record_len
    }
}

/// The visible fields of an [`ItemView`] (see [`ItemView::fields`]).
pub struct Fields<'v> {
    r: Reader<'v>,
    /// The index of the next stored field.
    at: usize,
    /// How many stored fields are left.
    left: usize,
    view: &'v ItemView<'v>,
}

impl<'v> Iterator for Fields<'v> {
    type Item = (&'v str, FieldRef<'v>);

    fn next(&mut self) -> Option<Self::Item> {
        while self.left > 0 {
            self.left -= 1;
            let at = self.at;
            self.at += 1;
            if at < 64 && self.view.visible_mask & (1 << at) == 0 {
                // Hidden: its name and value skipped unread.
                let len = self.r.varint().ok()?;
                self.r.bytes(len).ok()?;
                self.r.skip(0).ok()?;
                continue;
            }
            let name = self.r.str().ok()?;
            if self.view.visible_at(at, name) {
                return Some((name, self.view.top(&mut self.r).ok()?));
            }
            self.r.skip(0).ok()?;
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// One value of an [`ItemView`], borrowed from it.
///
/// Numbers keep their stored kind, as in the JSON form: a non-negative integer is `U64`, a
/// negative one `I64`, any other number `F64` (use [`FieldRef::as_f64`] and friends to read
/// one whatever its kind).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldRef<'a> {
    Null,
    Bool(bool),
    /// A non-negative integer.
    U64(u64),
    /// A negative integer.
    I64(i64),
    /// A number that is not an integer (or was stored as a float: `1.0` stays a float).
    F64(f64),
    Str(&'a str),
    /// A date stored as its instant; its JSON form is its canonical ISO 8601 spelling.
    Date(StoredDate),
    Array(ArrayRef<'a>),
    Object(ObjectRef<'a>),
}

impl<'a> FieldRef<'a> {
    /// The string, when the value is one (a date is [`FieldRef::Date`], not a string here).
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            FieldRef::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            FieldRef::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// Any number as `f64` (large integers rounded, as `serde_json::Number::as_f64`).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            FieldRef::U64(n) => Some(n as f64),
            FieldRef::I64(n) => Some(n as f64),
            FieldRef::F64(f) => Some(f),
            _ => None,
        }
    }

    /// An integer that fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldRef::U64(n) => i64::try_from(n).ok(),
            FieldRef::I64(n) => Some(n),
            _ => None,
        }
    }

    /// A non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            FieldRef::U64(n) => Some(n),
            _ => None,
        }
    }

    pub fn as_date(&self) -> Option<StoredDate> {
        match self {
            FieldRef::Date(d) => Some(*d),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, FieldRef::Null)
    }

    /// The value in its JSON form (allocates): what the JSON form of the get holds.
    pub fn to_value(&self) -> Value {
        match *self {
            FieldRef::Null => Value::Null,
            FieldRef::Bool(b) => Value::Bool(b),
            FieldRef::U64(n) => Value::Number(Number::from(n)),
            FieldRef::I64(n) => Value::Number(Number::from(n)),
            // Finite: checked when the view was made.
            FieldRef::F64(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
            FieldRef::Str(s) => Value::String(s.to_string()),
            FieldRef::Date(d) => Value::String(d.to_iso()),
            FieldRef::Array(a) => Value::Array(a.iter().map(|v| v.to_value()).collect()),
            FieldRef::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.to_string(), v.to_value()))
                    .collect::<Map<String, Value>>(),
            ),
        }
    }
}

/// A date as the item stores it: milliseconds since the Unix epoch, between the years 0000 and
/// 9999 (the instants an ISO 8601 date of the stored form spells).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoredDate {
    ms: i64,
}

impl StoredDate {
    /// Milliseconds since 1970-01-01T00:00:00.000Z (negative before).
    pub fn epoch_ms(self) -> i64 {
        self.ms
    }

    /// The canonical spelling `YYYY-MM-DDTHH:MM:SS.mmmZ`, on the stack.
    pub fn iso_bytes(self) -> [u8; 24] {
        // In range by construction (the view checked it), so always spelled.
        format_iso_ms_bytes(self.ms).unwrap_or(*b"0000-01-01T00:00:00.000Z")
    }

    /// The canonical spelling as a `String`: the text the JSON form holds.
    pub fn to_iso(self) -> String {
        format_iso_ms(self.ms).unwrap_or_default()
    }
}

impl fmt::Display for StoredDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.iso_bytes();
        // ASCII digits and separators.
        f.write_str(std::str::from_utf8(&bytes).map_err(|_| fmt::Error)?)
    }
}

/// A nested array of an [`ItemView`], decoded as it is walked.
#[derive(Clone, Copy)]
pub struct ArrayRef<'a> {
    /// The stored bytes from its first element on (the record's tail: the walk stops after
    /// `len` values).
    rest: &'a [u8],
    len: usize,
}

impl<'a> ArrayRef<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements, in order.
    pub fn iter(&self) -> Elements<'a> {
        Elements {
            r: nested_reader(self.rest),
            left: self.len,
        }
    }

    /// The element at `index` (walks the ones before it).
    pub fn get(&self, index: usize) -> Option<FieldRef<'a>> {
        self.iter().nth(index)
    }
}

impl PartialEq for ArrayRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for ArrayRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> IntoIterator for ArrayRef<'a> {
    type Item = FieldRef<'a>;
    type IntoIter = Elements<'a>;

    fn into_iter(self) -> Elements<'a> {
        self.iter()
    }
}

/// The elements of an [`ArrayRef`].
pub struct Elements<'a> {
    r: Reader<'a>,
    left: usize,
}

impl<'a> Iterator for Elements<'a> {
    type Item = FieldRef<'a>;

    fn next(&mut self) -> Option<FieldRef<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Nested values: depth 1 or more is all that matters (no key references there).
        field_ref(&mut self.r, 1).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// A nested object of an [`ItemView`], decoded as it is walked.
#[derive(Clone, Copy)]
pub struct ObjectRef<'a> {
    /// The stored bytes from its first entry on (the record's tail).
    rest: &'a [u8],
    len: usize,
}

impl<'a> ObjectRef<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, (name, value), in stored order (the names' byte order).
    pub fn iter(&self) -> Entries<'a> {
        Entries {
            r: nested_reader(self.rest),
            left: self.len,
        }
    }

    /// The entry `name` (walks the ones before it, skipping their values unread).
    pub fn get(&self, name: &str) -> Option<FieldRef<'a>> {
        let mut r = nested_reader(self.rest);
        for _ in 0..self.len {
            let len = r.varint().ok()?;
            if r.bytes(len).ok()? == name.as_bytes() {
                return field_ref(&mut r, 1).ok();
            }
            r.skip(1).ok()?;
        }
        None
    }
}

impl PartialEq for ObjectRef<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for ObjectRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The entries of an [`ObjectRef`].
pub struct Entries<'a> {
    r: Reader<'a>,
    left: usize,
}

impl<'a> Iterator for Entries<'a> {
    type Item = (&'a str, FieldRef<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let name = self.r.str().ok()?;
        Some((name, field_ref(&mut self.r, 1).ok()?))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// A reader of nested values (no key references are valid there, so no key is needed).
fn nested_reader(rest: &[u8]) -> Reader<'_> {
    Reader::with_key(rest, ("", ""))
}

/// Checks the value at `r` (at nesting `depth`) decodes as `codec`'s `Reader::value` would
/// decode it, building nothing.
fn check_value(r: &mut Reader<'_>, depth: usize) -> Result<(), Bad> {
    if depth >= codec::MAX_DEPTH {
        return Err(Bad("nested too deeply"));
    }
    match r.byte()? {
        codec::NULL | codec::FALSE | codec::TRUE => {}
        codec::KEY_PK | codec::KEY_SK if depth == 0 => {}
        codec::UINT | codec::NEGINT => {
            r.varint()?;
        }
        codec::FLOAT => {
            float(r)?;
        }
        codec::STRING => {
            r.str()?;
        }
        codec::DATE => {
            codec::date_ms(r.varint()?)?;
        }
        codec::ARRAY => {
            let n = r.count()?;
            for _ in 0..n {
                check_value(r, depth + 1)?;
            }
        }
        codec::OBJECT => {
            let n = r.count()?;
            for _ in 0..n {
                r.str()?;
                check_value(r, depth + 1)?;
            }
        }
        _ => return Err(Bad("unknown value tag")),
    }
    Ok(())
}

fn float(r: &mut Reader<'_>) -> Result<f64, Bad> {
    let mut a = [0u8; 8];
    a.copy_from_slice(r.bytes(8)?);
    let f = f64::from_le_bytes(a);
    if f.is_finite() {
        Ok(f)
    } else {
        Err(Bad("non-finite number"))
    }
}

/// The value at `r` (nesting `depth`), borrowed; a nested array or object is left unread but
/// for its count, and `r` is moved past it.
fn field_ref<'a>(r: &mut Reader<'a>, depth: usize) -> Result<FieldRef<'a>, Bad> {
    Ok(match r.byte()? {
        codec::NULL => FieldRef::Null,
        codec::FALSE => FieldRef::Bool(false),
        codec::TRUE => FieldRef::Bool(true),
        codec::UINT => FieldRef::U64(r.varint()?),
        codec::NEGINT => FieldRef::I64(!r.varint()? as i64),
        codec::FLOAT => FieldRef::F64(float(r)?),
        codec::STRING => FieldRef::Str(r.str()?),
        // Key references (top level only) are answered by `ItemView::top`.
        codec::DATE => FieldRef::Date(StoredDate {
            ms: codec::date_ms(r.varint()?)?,
        }),
        tag @ (codec::ARRAY | codec::OBJECT) => {
            let len = r.count()?;
            let rest = r.rest();
            // Past the nested value: the caller walks on to the next field.
            for _ in 0..len {
                if tag == codec::OBJECT {
                    let n = r.varint()?;
                    r.bytes(n)?;
                }
                r.skip(depth + 1)?;
            }
            if tag == codec::ARRAY {
                FieldRef::Array(ArrayRef { rest, len })
            } else {
                FieldRef::Object(ObjectRef { rest, len })
            }
        }
        _ => return Err(Bad("unknown value tag")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use devtables_schema::{format_iso_ms, JoinedKey, Schema};
    use proptest::prelude::*;
    use serde_json::json;

    const SCHEMA: &str = r#"{
        format: 'onetable:1.1.0', version: '1',
        indexes: {primary: {hash: 'pk', sort: 'sk'}},
        models: {
            M: {
                pk: {type: 'string', value: 'm#${id}'},
                sk: {type: 'string', value: 'm#'},
                id: {type: 'string'},
                secret: {type: 'string', hidden: true},
                until: {type: 'date', ttl: true},
            },
        },
    }"#;

    fn schema() -> Schema {
        Schema::from_json5(SCHEMA).unwrap()
    }

    fn key() -> JoinedKey {
        JoinedKey::from_parts("m#1", "m#")
    }

    fn view_of<'m>(model: &'m Model, raw: &[u8], hidden: bool) -> Result<ItemView<'m>, Bad> {
        ItemView::new(model, raw, key().as_bytes(), key().pk().len(), hidden)
    }

    fn record(v: &Value) -> Vec<u8> {
        codec::encode(
            v.as_object().unwrap(),
            "pk",
            Some("sk"),
            &key().to_item_key(),
        )
    }

    #[test]
    fn fields_are_lent_and_decoded_on_access() {
        let schema = schema();
        let model = schema.model("M").unwrap();
        let item = json!({
            "pk": "m#1", "sk": "m#", "id": "1", "secret": "s", "n": -3, "u": 7, "f": 0.5,
            "when": "2026-11-25T19:21:46.123Z", "t": true, "z": null,
            "a": [1, "x", {"k": [2]}], "o": {"b": "2026-11-25T19:21:46.123Z", "a": []},
        });
        let view = view_of(model, &record(&item), false).unwrap();
        assert_eq!(view.get("id"), Some(FieldRef::Str("1")));
        assert_eq!(view.get("pk"), None, "templated, so hidden");
        assert_eq!(view.get("secret"), None, "hidden");
        assert_eq!(view.get("n"), Some(FieldRef::I64(-3)));
        assert_eq!(view.get("u").and_then(|v| v.as_i64()), Some(7));
        assert_eq!(view.get("f").and_then(|v| v.as_f64()), Some(0.5));
        assert_eq!(view.get("t").and_then(|v| v.as_bool()), Some(true));
        assert!(view.get("z").is_some_and(|v| v.is_null()));
        assert_eq!(view.get("missing"), None);
        let when = view.get("when").and_then(|v| v.as_date()).unwrap();
        assert_eq!(when.epoch_ms(), 1_795_634_506_123);
        assert_eq!(when.to_string(), "2026-11-25T19:21:46.123Z");
        let Some(FieldRef::Array(a)) = view.get("a") else {
            panic!("array")
        };
        assert_eq!(a.len(), 3);
        assert_eq!(a.get(1), Some(FieldRef::Str("x")));
        let Some(FieldRef::Object(inner)) = a.get(2) else {
            panic!("object")
        };
        assert_eq!(inner.get("k").map(|v| v.to_value()), Some(json!([2])));
        let Some(FieldRef::Object(o)) = view.get("o") else {
            panic!("object")
        };
        let names: Vec<&str> = o.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(o.get("b").is_some_and(|v| v.as_date().is_some()));
        let names: Vec<&str> = view.fields().map(|(k, _)| k).collect();
        assert_eq!(names, ["a", "f", "id", "n", "o", "t", "u", "when", "z"]);
        let with_hidden = view_of(model, &record(&item), true).unwrap();
        assert_eq!(with_hidden.get("secret"), Some(FieldRef::Str("s")));
        assert_eq!(with_hidden.get("pk"), Some(FieldRef::Str("m#1")));
        assert_eq!(with_hidden.to_item(), *item.as_object().unwrap());
        let mut visible = item.as_object().unwrap().clone();
        for hidden in ["secret", "pk", "sk"] {
            visible.remove(hidden);
        }
        assert_eq!(view.to_item(), visible);
    }

    #[test]
    fn fields_past_the_visibility_mask_are_asked_of_the_model() {
        let schema = schema();
        let model = schema.model("M").unwrap();
        // 70 fields named before `secret`, so the hidden one is the record's 72nd.
        let mut item: Item = (0..70).map(|i| (format!("a{i:02}"), json!(i))).collect();
        item.insert("id".into(), json!("1"));
        item.insert("secret".into(), json!("s"));
        let raw = record(&Value::Object(item.clone()));
        let view = view_of(model, &raw, false).unwrap();
        assert_eq!(view.fields().count(), 71);
        assert_eq!(view.get("secret"), None);
        assert_eq!(view.get("a69"), Some(FieldRef::U64(69)));
        item.remove("secret");
        assert_eq!(view.to_item(), item);
        let all = view_of(model, &raw, true).unwrap();
        assert_eq!(all.fields().count(), 72);
        assert_eq!(all.fields().last(), Some(("secret", FieldRef::Str("s"))));
    }

    #[test]
    fn damaged_records_are_refused_when_the_view_is_made() {
        let schema = schema();
        let model = schema.model("M").unwrap();
        let raw = record(
            &json!({"a": "text", "b": [1.5, -2, {"c": null}], "d": "1970-01-01T00:00:00.000Z"}),
        );
        assert!(view_of(model, &raw, false).is_ok());
        for cut in 0..raw.len() {
            assert!(view_of(model, &raw[..cut], false).is_err());
        }
        // A bad string in a hidden field: refused only when hidden fields are visible, as the
        // JSON form decodes them only then.
        let bad = [
            1,
            6,
            b's',
            b'e',
            b'c',
            b'r',
            b'e',
            b't',
            codec::STRING,
            1,
            0xff,
        ];
        assert!(view_of(model, &bad, false).is_ok());
        assert!(view_of(model, &bad, true).is_err());
        let date = [
            1,
            1,
            b'd',
            codec::DATE,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x7f,
        ];
        assert!(view_of(model, &date, false).is_err());
        let nan = f64::NAN.to_le_bytes();
        let mut float = vec![1, 1, b'f', codec::FLOAT];
        float.extend_from_slice(&nan);
        assert!(view_of(model, &float, false).is_err());
        assert!(view_of(model, &[1, 1, b'a', codec::ARRAY, 1, codec::KEY_PK], false).is_err());
    }

    proptest! {
        /// Random bytes: a view is made exactly when the JSON form decodes, and then shows
        /// the same item; nothing panics.
        #[test]
        fn random_bytes_make_a_view_exactly_when_they_decode(
            bytes in prop::collection::vec(any::<u8>(), 0..64),
            hidden in any::<bool>(),
        ) {
            let schema = schema();
            let model = schema.model("M").unwrap();
            let raw_key = key();
            let keep = |k: &str| hidden || !model.is_hidden(k);
            let decoded = codec::decode_with(&bytes, raw_key.as_bytes(), &keep);
            let view = view_of(model, &bytes, hidden);
            prop_assert_eq!(decoded.is_ok(), view.is_ok());
            if let (Ok(item), Ok(view)) = (decoded, view) {
                prop_assert_eq!(view.to_item(), item);
            }
        }

        /// The TTL as the view reads it equals the model's reading of the JSON form, for
        /// values of every kind the stored form holds (dates stored as instants among them).
        #[test]
        fn ttl_read_from_the_view_equals_the_models(
            value in prop_oneof![
                (-62_167_219_200_000i64..253_402_300_799_999)
                    .prop_map(|ms| json!(format_iso_ms(ms).unwrap())),
                any::<u64>().prop_map(|n| json!(n)),
                any::<i64>().prop_map(|n| json!(n)),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
                (-1e16f64..1e16).prop_map(|f| json!(f)),
                Just(json!("2026-11-25T18:00:00Z")),
                Just(json!("2026-11-25")),
                Just(json!("soon")),
                Just(json!(true)),
                Just(json!(null)),
                Just(json!({"at": 1})),
            ],
            hidden in any::<bool>(),
        ) {
            let schema = schema();
            let model = schema.model("M").unwrap();
            let item = json!({"id": "1", "until": value});
            let view = view_of(model, &record(&item), hidden).unwrap();
            prop_assert_eq!(
                view.expires_at_ms("until").unwrap(),
                model.expires_at_ms(item.as_object().unwrap())
            );
            prop_assert_eq!(view.expires_at_ms("absent").unwrap(), None);
        }

        /// Valid records with a byte changed: the same agreement.
        #[test]
        fn mutated_records_make_a_view_exactly_when_they_decode(
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            hidden in any::<bool>(),
        ) {
            let schema = schema();
            let model = schema.model("M").unwrap();
            let mut raw = record(&json!({
                "pk": "m#1", "sk": "m#", "id": "1", "secret": "s\u{e9}", "n": -3, "f": 0.5,
                "when": "2026-11-25T19:21:46.123Z", "a": [1, "x", {"k": [2]}],
            }));
            let i = at.index(raw.len());
            raw[i] = byte;
            let raw_key = key();
            let keep = |k: &str| hidden || !model.is_hidden(k);
            let decoded = codec::decode_with(&raw, raw_key.as_bytes(), &keep);
            let view = view_of(model, &raw, hidden);
            prop_assert_eq!(decoded.is_ok(), view.is_ok());
            if let (Ok(item), Ok(view)) = (decoded, view) {
                prop_assert_eq!(view.to_item(), item);
            }
        }
    }
}
