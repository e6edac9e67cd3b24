//! Byte encodings of the keys of every table.
//!
//! All key parts are UTF-8 strings without NUL, joined by a NUL byte, so the byte order of an
//! encoded key is the order of (first part, second part, ...) and a part prefix is a byte prefix.
//! UTF-8 never contains the byte 0xFF, which makes `prefix + 0xFF` an exclusive upper bound of
//! every key that starts with `prefix`.

use devtables_schema::ItemKey;

pub(crate) const SEP: u8 = 0;
pub(crate) const TOP: u8 = 0xFF;

/// Items table key: `pk \0 sk`.
pub(crate) fn item_key(key: &ItemKey) -> Vec<u8> {
    join(&[&key.pk, &key.sk])
}

pub(crate) fn decode_item_key(raw: &[u8]) -> Option<ItemKey> {
    let mut parts = split(raw);
    let pk = parts.next()?;
    let sk = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    Some(ItemKey { pk, sk })
}

/// Secondary index key: `hash \0 sort \0 pk \0 sk`: unique per item, ordered by (hash, sort).
pub(crate) fn index_key(hash: &str, sort: &str, key: &ItemKey) -> Vec<u8> {
    join(&[hash, sort, &key.pk, &key.sk])
}

/// The encoded item key (`pk \0 sk`) that a secondary-index key ends with, as a slice of it.
pub(crate) fn trailing_item_key_raw(raw: &[u8]) -> Option<&[u8]> {
    let last = raw.iter().rposition(|b| *b == SEP)?;
    let start = raw[..last]
        .iter()
        .rposition(|b| *b == SEP)
        .map_or(0, |p| p + 1);
    Some(&raw[start..])
}

/// TTL table key: expiry (big-endian milliseconds) then the item key, so a range up to `now`
/// yields exactly the expired items, oldest first.
pub(crate) fn ttl_key(expires_ms: i64, key: &ItemKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.pk.len() + key.sk.len() + 1);
    out.extend_from_slice(&(expires_ms.max(0) as u64).to_be_bytes());
    out.extend_from_slice(&item_key(key));
    out
}

pub(crate) fn decode_ttl_key(raw: &[u8]) -> Option<ItemKey> {
    decode_item_key(raw.get(8..)?)
}

pub(crate) fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&SEP)
}

/// Concatenate parts with the separator; a trailing separator is added when `open` so the
/// result is the prefix of every key whose leading parts are `parts`.
pub(crate) fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut out = join(parts);
    out.push(SEP);
    out
}

/// Exclusive upper bound of every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    out.push(TOP);
    out
}

fn join(parts: &[&str]) -> Vec<u8> {
    let len = parts.iter().map(|p| p.len() + 1).sum();
    let mut out = Vec::with_capacity(len);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(SEP);
        }
        out.extend_from_slice(p.as_bytes());
    }
    out
}

fn split(raw: &[u8]) -> impl Iterator<Item = String> + '_ {
    raw.split(|b| *b == SEP)
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(pk: &str, sk: &str) -> ItemKey {
        ItemKey {
            pk: pk.into(),
            sk: sk.into(),
        }
    }

    #[test]
    fn item_keys_round_trip_and_sort_by_parts() {
        let a = item_key(&k("a", "z"));
        let b = item_key(&k("ab", ""));
        assert!(a < b, "pk 'a' sorts before pk 'ab' whatever the sort key");
        assert_eq!(decode_item_key(&a), Some(k("a", "z")));
    }

    #[test]
    fn the_schemas_joined_key_is_the_item_key() {
        // A get looks the item up by `Model::primary_key_joined`'s bytes as they are.
        for (pk, sk) in [("a", "z"), ("", "s"), ("p", ""), ("d\u{e9}v#1", "x#y")] {
            assert_eq!(
                devtables_schema::JoinedKey::from_parts(pk, sk).as_bytes(),
                item_key(&k(pk, sk)).as_slice()
            );
        }
    }

    #[test]
    fn prefix_bounds_cover_exactly_the_prefix() {
        let p = prefix(&["dev"]);
        let end = prefix_end(&p);
        let inside = item_key(&k("dev", "\u{10FFFF}"));
        let outside = item_key(&k("dev2", ""));
        assert!(inside >= p && inside < end);
        assert!(!(outside >= p && outside < end));
    }

    #[test]
    fn trailing_key_of_index_entries() {
        let raw = index_key("h", "s", &k("p", "q"));
        assert_eq!(
            trailing_item_key_raw(&raw),
            Some(item_key(&k("p", "q")).as_slice())
        );
        let two = item_key(&k("p", "q"));
        assert_eq!(trailing_item_key_raw(&two), Some(two.as_slice()));
        assert_eq!(trailing_item_key_raw(b"nosep"), None);
        let ttl = ttl_key(5, &k("p", "q"));
        assert_eq!(decode_ttl_key(&ttl), Some(k("p", "q")));
    }

    /// A create takes the schema's joined key (`JoinedKey`) as its row key without building
    /// it again (`WriteTxn::store_new`): the two spellings must be the same bytes.
    #[test]
    fn joined_key_is_the_row_key() {
        for (pk, sk) in [
            ("dev#d0001", "reading#00000042"),
            ("p", ""),
            ("", "s"),
            ("é#1", "ü"),
        ] {
            let joined = devtables_schema::JoinedKey::from_parts(pk, sk);
            assert_eq!(joined.to_item_key(), k(pk, sk));
            assert_eq!(joined.into_bytes(), item_key(&k(pk, sk)));
        }
    }
}
