//! A serde `Deserializer` over the stored binary form of an item (`codec`), so a read can fill
//! the caller's own type (`Db::get_as`, `Db::find_as`) straight from the bytes in the page.
//!
//! It exists because the JSON form of a read builds a `serde_json::Map` per item: a heap
//! allocation for every key and every string value, most of which a caller then copies into its
//! own struct and drops. Here strings are lent from the stored bytes (`visit_borrowed_str`),
//! fields the caller's type does not name are skipped without being decoded
//! (`deserialize_ignored_any`), and hidden fields are skipped like the JSON form leaves them out.
//!
//! What a caller's type sees is exactly the JSON form of the item: deserializing into
//! `serde_json::Value` gives the same value as [`codec::decode`] (a property test holds it to
//! that), numbers keep their kind (`u64`, `i64`, `f64`), dates are their ISO text, and the
//! pk/sk values left out of the encoding are lent from the row key. Corrupt bytes are
//! [`DeError::Corrupt`], a type that does not fit is [`DeError::Shape`]; neither panics.

use serde::de::{
    self, value::BorrowedStrDeserializer, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess,
    SeqAccess, VariantAccess, Visitor,
};

use crate::codec::{self, Bad, Reader};

/// Why stored bytes did not deserialize into the caller's type.
#[derive(Debug)]
pub(crate) enum DeError {
    /// The stored bytes are malformed (as [`codec::decode`] would say).
    Corrupt(&'static str),
    /// The item does not fit the requested type (serde's message: missing field, wrong type...).
    Shape(String),
}

impl std::fmt::Display for DeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeError::Corrupt(what) => write!(f, "stored item is malformed: {what}"),
            DeError::Shape(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        DeError::Shape(msg.to_string())
    }
}

impl From<Bad> for DeError {
    fn from(Bad(what): Bad) -> Self {
        DeError::Corrupt(what)
    }
}

/// Deserializes the item stored as `raw` under the item key `raw_key` into `T`, with only the
/// top-level fields `keep` accepts (the others are skipped unread, as if absent).
pub(crate) fn from_stored<'a, T: de::Deserialize<'a>>(
    raw: &'a [u8],
    raw_key: &'a [u8],
    keep: &dyn Fn(&str) -> bool,
) -> Result<T, DeError> {
    let mut r = Reader::new(raw, raw_key)?;
    let value = T::deserialize(ItemDe { r: &mut r, keep })?;
    r.done()?;
    Ok(value)
}

/// The whole stored item: a map of its top-level fields.
struct ItemDe<'r, 'a, 'k> {
    r: &'r mut Reader<'a>,
    keep: &'k dyn Fn(&str) -> bool,
}

impl<'de> de::Deserializer<'de> for ItemDe<'_, 'de, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let left = self.r.count()?;
        let mut access = Fields {
            r: self.r,
            left,
            depth: 0,
            keep: Some(self.keep),
        };
        let value = visitor.visit_map(&mut access)?;
        access.finish()?;
        Ok(value)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let n = self.r.count()?;
        for _ in 0..n {
            self.r.str()?;
            self.r.skip(0)?;
        }
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct enum identifier
    }
}

/// One value at nesting depth `depth` (0: a top-level field's value).
struct ValueDe<'r, 'a> {
    r: &'r mut Reader<'a>,
    depth: usize,
}

impl<'de> ValueDe<'_, 'de> {
    /// The text of a string-like value (`STRING`, a key reference, `DATE`) whose tag was read.
    fn text(&mut self, tag: u8) -> Result<Option<Text<'de>>, DeError> {
        Ok(Some(match tag {
            codec::STRING => Text::Borrowed(self.r.str()?),
            codec::KEY_PK if self.depth == 0 => Text::Borrowed(self.r.key.0),
            codec::KEY_SK if self.depth == 0 => Text::Borrowed(self.r.key.1),
            codec::DATE => Text::Owned(codec::date_text(self.r.varint()?)?),
            _ => return Ok(None),
        }))
    }
}

enum Text<'a> {
    Borrowed(&'a str),
    Owned(String),
}

impl<'de> de::Deserializer<'de> for ValueDe<'_, 'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, DeError> {
        if self.depth >= codec::MAX_DEPTH {
            return Err(DeError::Corrupt("nested too deeply"));
        }
        let tag = self.r.byte()?;
        if let Some(text) = self.text(tag)? {
            return match text {
                Text::Borrowed(s) => visitor.visit_borrowed_str(s),
                Text::Owned(s) => visitor.visit_string(s),
            };
        }
        match tag {
            codec::NULL => visitor.visit_unit(),
            codec::FALSE => visitor.visit_bool(false),
            codec::TRUE => visitor.visit_bool(true),
            codec::UINT => visitor.visit_u64(self.r.varint()?),
            codec::NEGINT => visitor.visit_i64(!self.r.varint()? as i64),
            codec::FLOAT => {
                let mut a = [0u8; 8];
                a.copy_from_slice(self.r.bytes(8)?);
                let f = f64::from_le_bytes(a);
                if !f.is_finite() {
                    return Err(DeError::Corrupt("non-finite number"));
                }
                visitor.visit_f64(f)
            }
            codec::ARRAY => {
                let left = self.r.count()?;
                let mut access = Elements {
                    r: self.r,
                    left,
                    depth: self.depth + 1,
                };
                let value = visitor.visit_seq(&mut access)?;
                access.finish()?;
                Ok(value)
            }
            codec::OBJECT => {
                let left = self.r.count()?;
                let mut access = Fields {
                    r: self.r,
                    left,
                    depth: self.depth + 1,
                    keep: None,
                };
                let value = visitor.visit_map(&mut access)?;
                access.finish()?;
                Ok(value)
            }
            _ => Err(DeError::Corrupt("unknown value tag")),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if self.r.peek()? == codec::NULL {
            self.r.byte()?;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    /// Enums as JSON spells them: a unit variant is a string, any other a one-entry object.
    fn deserialize_enum<V: Visitor<'de>>(
        mut self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let tag = self.r.peek()?;
        if tag == codec::OBJECT {
            self.r.byte()?;
            if self.r.count()? != 1 {
                return Err(de::Error::invalid_value(
                    de::Unexpected::Map,
                    &"an object with one entry (an enum variant)",
                ));
            }
            return visitor.visit_enum(Variant {
                r: self.r,
                depth: self.depth + 1,
            });
        }
        self.r.byte()?;
        match self.text(tag)? {
            Some(Text::Borrowed(s)) => visitor.visit_enum(BorrowedStrDeserializer::new(s)),
            Some(Text::Owned(s)) => visitor.visit_enum(s.into_deserializer()),
            None => Err(de::Error::invalid_type(
                de::Unexpected::Other("a non-string value"),
                &"a string or a one-entry object (an enum variant)",
            )),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.r.skip(self.depth)?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

/// The entries of an object (`keep: None`) or of the item itself (hidden fields left out).
struct Fields<'r, 'a, 'k> {
    r: &'r mut Reader<'a>,
    left: usize,
    depth: usize,
    keep: Option<&'k dyn Fn(&str) -> bool>,
}

impl Fields<'_, '_, '_> {
    /// Refuses entries the visitor left unread (serde_json does the same with trailing input).
    fn finish(&self) -> Result<(), DeError> {
        if self.left != 0 {
            return Err(de::Error::invalid_length(self.left, &"fewer map entries"));
        }
        Ok(())
    }
}

impl<'de> MapAccess<'de> for Fields<'_, 'de, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        while self.left > 0 {
            self.left -= 1;
            let key = self.r.str()?;
            match self.keep {
                Some(keep) if !keep(key) => self.r.skip(self.depth)?,
                _ => {
                    return seed
                        .deserialize(BorrowedStrDeserializer::new(key))
                        .map(Some)
                }
            }
        }
        Ok(None)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        seed.deserialize(ValueDe {
            r: self.r,
            depth: self.depth,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.keep.is_none().then_some(self.left)
    }
}

struct Elements<'r, 'a> {
    r: &'r mut Reader<'a>,
    left: usize,
    depth: usize,
}

impl Elements<'_, '_> {
    fn finish(&self) -> Result<(), DeError> {
        if self.left != 0 {
            return Err(de::Error::invalid_length(self.left, &"fewer elements"));
        }
        Ok(())
    }
}

impl<'de> SeqAccess<'de> for Elements<'_, 'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(ValueDe {
            r: self.r,
            depth: self.depth,
        })
        .map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.left)
    }
}

/// A one-entry object read as an enum variant: the key names it, the value holds its data.
struct Variant<'r, 'a> {
    r: &'r mut Reader<'a>,
    depth: usize,
}

impl<'de, 'r> EnumAccess<'de> for Variant<'r, 'de> {
    type Error = DeError;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), DeError> {
        let key = self.r.str()?;
        let v = seed.deserialize(BorrowedStrDeserializer::<DeError>::new(key))?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for Variant<'_, 'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        de::Deserialize::deserialize(ValueDe {
            r: self.r,
            depth: self.depth,
        })
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(ValueDe {
            r: self.r,
            depth: self.depth,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(
            ValueDe {
                r: self.r,
                depth: self.depth,
            },
            visitor,
        )
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_map(
            ValueDe {
                r: self.r,
                depth: self.depth,
            },
            visitor,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devtables_schema::{Item, ItemKey};
    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};
    use serde_json::{json, Value};

    const RAW_KEY: &[u8] = b"p1\0s1";

    fn key() -> ItemKey {
        ItemKey {
            pk: "p1".into(),
            sk: "s1".into(),
        }
    }

    fn enc(v: &Value) -> Vec<u8> {
        codec::encode(v.as_object().unwrap(), "pk", Some("sk"), &key())
    }

    fn all(_: &str) -> bool {
        true
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Reading<'a> {
        pk: String,
        #[serde(borrow)]
        name: &'a str,
        value: f64,
        count: u32,
        delta: i64,
        status: Status,
        created: String,
        tags: Vec<String>,
        missing: Option<String>,
        nothing: Option<u8>,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq, Clone)]
    #[serde(rename_all = "lowercase")]
    enum Status {
        Ok,
        Fault,
    }

    #[test]
    fn a_struct_is_filled_from_the_stored_bytes_with_unknown_fields_skipped() {
        let item = json!({
            "pk": "p1", "sk": "s1", "name": "sensor-1", "value": 20.5, "count": 7,
            "delta": -3, "status": "fault", "created": "2026-11-25T19:21:46.123Z",
            "tags": ["a", "b"], "nothing": null,
            "ignored": {"deep": [1, {"x": "y"}], "date": "1970-01-01T00:00:00.000Z"},
        });
        let raw = enc(&item);
        let r: Reading = from_stored(&raw, RAW_KEY, &all).unwrap();
        assert_eq!(
            r,
            Reading {
                pk: "p1".into(),
                name: "sensor-1",
                value: 20.5,
                count: 7,
                delta: -3,
                status: Status::Fault,
                created: "2026-11-25T19:21:46.123Z".into(),
                tags: vec!["a".into(), "b".into()],
                missing: None,
                nothing: None,
            }
        );
        // Fields `keep` refuses are absent: a required one is then missing.
        let err = from_stored::<Reading>(&raw, RAW_KEY, &|k| k != "pk").unwrap_err();
        assert!(
            matches!(&err, DeError::Shape(m) if m.contains("missing field `pk`")),
            "{err}"
        );
    }

    #[test]
    fn a_type_that_does_not_fit_is_an_error_not_a_panic() {
        let raw = enc(&json!({"pk": "p1", "count": -1, "name": 5, "big": 300}));
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Count {
            count: u32,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Name {
            name: String,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Big {
            big: u8,
        }
        for err in [
            from_stored::<Count>(&raw, RAW_KEY, &all).unwrap_err(),
            from_stored::<Name>(&raw, RAW_KEY, &all).unwrap_err(),
            from_stored::<Big>(&raw, RAW_KEY, &all).unwrap_err(),
            from_stored::<Vec<u8>>(&raw, RAW_KEY, &all).unwrap_err(),
            from_stored::<(String,)>(&enc(&json!({"a": ["x", "y"]})), RAW_KEY, &all).unwrap_err(),
        ] {
            assert!(matches!(err, DeError::Shape(_)), "{err}");
        }
        // A fixed-size tuple does not silently drop the rest of an array.
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Pair {
            a: (String,),
        }
        let err = from_stored::<Pair>(&enc(&json!({"a": ["x", "y"]})), RAW_KEY, &all);
        assert!(matches!(err, Err(DeError::Shape(_))));
    }

    #[test]
    fn corrupt_bytes_are_errors_for_every_prefix() {
        let v = json!({"a": "text", "b": [1.5, -2, {"c": null}], "d": "2026-11-25T19:21:46.123Z"});
        let raw = enc(&v);
        for cut in 0..raw.len() {
            let r = from_stored::<Value>(&raw[..cut], RAW_KEY, &all);
            assert!(matches!(r, Err(DeError::Corrupt(_))), "cut {cut}: {r:?}");
            let r = from_stored::<de::IgnoredAny>(&raw[..cut], RAW_KEY, &all);
            assert!(r.is_err(), "cut {cut}");
        }
        let mut deep = vec![1, 1, b'a'];
        deep.extend(std::iter::repeat_n([codec::ARRAY, 1], 10_000).flatten());
        deep.push(codec::NULL);
        assert!(from_stored::<Value>(&deep, RAW_KEY, &all).is_err());
        assert!(from_stored::<de::IgnoredAny>(&deep, RAW_KEY, &all).is_err());
        // Key references stand only for top-level values.
        assert!(
            from_stored::<Value>(&[1, 1, b'a', codec::ARRAY, 1, codec::KEY_PK], RAW_KEY, &all)
                .is_err()
        );
    }

    #[test]
    fn enums_read_as_json_spells_them() {
        #[derive(Debug, Deserialize, Serialize, PartialEq, Clone)]
        enum E {
            Unit,
            New(i32),
            Tuple(u8, String),
            Struct { x: bool },
        }
        #[derive(Debug, Deserialize, Serialize, PartialEq)]
        struct Holder {
            es: Vec<E>,
        }
        let h = Holder {
            es: vec![
                E::Unit,
                E::New(-4),
                E::Tuple(3, "t".into()),
                E::Struct { x: true },
            ],
        };
        let raw = enc(&serde_json::to_value(&h).unwrap());
        assert_eq!(from_stored::<Holder>(&raw, RAW_KEY, &all).unwrap(), h);
        let raw = enc(&json!({"es": [{"Unit": null, "New": 1}]}));
        assert!(from_stored::<Holder>(&raw, RAW_KEY, &all).is_err());
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(|n| json!(n)),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            "[a-z\u{e9}\u{0}\"]{0,8}".prop_map(Value::String),
            (0i64..253_402_300_799_999)
                .prop_map(|ms| { Value::String(devtables_schema::format_iso_ms(ms).unwrap()) }),
            Just(json!("p1")),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{0,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Into `serde_json::Value`, the deserializer gives exactly what `codec::decode` does,
        /// with and without a field filter; `IgnoredAny` walks the same bytes.
        #[test]
        fn value_form_equals_the_decoded_item(
            fields in prop::collection::btree_map("[a-z]{0,4}|pk|sk", json_value(), 0..8),
            pk_is_key in any::<bool>(),
        ) {
            let mut item: Item = fields.into_iter().collect();
            if pk_is_key {
                item.insert("pk".into(), json!("p1"));
                item.insert("sk".into(), json!("s1"));
            }
            let raw = codec::encode(&item, "pk", Some("sk"), &key());
            let got: Value = from_stored(&raw, RAW_KEY, &all).unwrap();
            prop_assert_eq!(got, Value::Object(codec::decode(&raw, RAW_KEY).unwrap()));
            let keep = |k: &str| k.len() < 3;
            let got: Value = from_stored(&raw, RAW_KEY, &keep).unwrap();
            prop_assert_eq!(got, Value::Object(codec::decode_with(&raw, RAW_KEY, &keep).unwrap()));
            from_stored::<de::IgnoredAny>(&raw, RAW_KEY, &all).unwrap();
            let map: std::collections::BTreeMap<String, Value> = from_stored(&raw, RAW_KEY, &all).unwrap();
            prop_assert_eq!(map.len(), item.len());
        }

        /// A caller's struct stored through its JSON form comes back equal.
        #[test]
        fn typed_round_trip(
            name in "[a-zA-Z0-9 \u{e9}]{0,12}",
            value in any::<f64>().prop_filter("finite", |f| f.is_finite()),
            count in any::<u64>(),
            delta in any::<i64>(),
            small in any::<i8>(),
            flag in any::<bool>(),
            when in (0i64..253_402_300_799_999).prop_map(|ms| devtables_schema::format_iso_ms(ms).unwrap()),
            tags in prop::collection::vec("[a-z]{0,5}", 0..4),
            note in prop::option::of("[a-z]{0,5}"),
            fault in any::<bool>(),
        ) {
            #[derive(Debug, Deserialize, Serialize, PartialEq)]
            struct T {
                name: String,
                value: f64,
                count: u64,
                delta: i64,
                small: i8,
                flag: bool,
                when: String,
                tags: Vec<String>,
                note: Option<String>,
                status: Status,
                inner: Inner,
            }
            #[derive(Debug, Deserialize, Serialize, PartialEq)]
            struct Inner {
                pair: (u8, String),
                map: std::collections::BTreeMap<String, i64>,
            }
            let t = T {
                name, value, count, delta, small, flag, when, tags, note,
                status: if fault { Status::Fault } else { Status::Ok },
                inner: Inner {
                    pair: (7, "seven".into()),
                    map: [("a".to_string(), -1), ("b".to_string(), 2)].into_iter().collect(),
                },
            };
            let raw = enc(&serde_json::to_value(&t).unwrap());
            prop_assert_eq!(from_stored::<T>(&raw, RAW_KEY, &all).unwrap(), t);
        }
    }
}
