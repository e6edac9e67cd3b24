//! How every store turns what it keeps as text back into the engine's values, and the few
//! input rules of the HTTP API's reads that do not depend on the database: versions, items,
//! feed generations, the owner columns, the devices a fan-out reached, item-query field names, page tokens and key-prefix
//! ranges; and where a snapshot page ends.
//!
//! It exists so the SQLite and PostgreSQL stores decode stored rows and check API input the
//! same way (a page token of one is a page token of the other, a corrupt version is
//! [`StoreError::Corrupt`] in both), without either store depending on the other.

use devtables_schema::Item;
use devtables_sync::cloud::{FeedGeneration, SnapshotCursor, MAX_FEED_GENERATIONS};
use devtables_sync::hlc::Hlc;
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::{hlc_from_str, Change};

use super::StoreError;

/// The devices of `account` a fan-out reached (device column, new feed head) as the engine's
/// ids; a stored device name that is not a valid id is [`StoreError::Corrupt`].
pub(crate) fn account_devices(
    account: &str,
    reached: Vec<(String, u64)>,
) -> Result<super::Advanced, StoreError> {
    reached
        .into_iter()
        .map(|(device, head)| {
            DeviceId::new(account, device.as_str())
                .map(|id| (id, head))
                .map_err(|e| StoreError::Corrupt(format!("device {account}/{device}: {e}")))
        })
        .collect()
}

/// The (account, device) columns of an owner's rows: device `''` for account-wide items.
pub(crate) fn owner_cols(owner: &Owner) -> (&str, &str) {
    match owner {
        Owner::Device(d) => (&d.account, &d.device),
        Owner::Account(a) => (a, ""),
    }
}

/// A stored version ([`devtables_sync::wire::hlc_to_string`] text).
pub(crate) fn parse_version(s: &str) -> Result<Hlc, StoreError> {
    hlc_from_str(s).map_err(|e| StoreError::Corrupt(format!("stored version: {e}")))
}

/// A stored item's JSON text.
pub(crate) fn parse_item(s: &str) -> Result<Item, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("stored item JSON: {e}")))
}

/// An item as JSON text: what SQLite stores, and what the quotas count the bytes of.
pub(crate) fn item_json(item: &Item) -> Result<String, StoreError> {
    serde_json::to_string(item)
        .map_err(|e| StoreError::Database(format!("encoding an item as JSON: {e}")))
}

/// The generations of a feed as `devices.feed_generations` holds them: `gen:base` pairs, oldest
/// first, separated by commas.
pub(crate) fn parse_generations(text: &str) -> Result<Vec<FeedGeneration>, StoreError> {
    text.split(',')
        .map(|pair| {
            let bad = || StoreError::Corrupt(format!("devices.feed_generations {text:?}"));
            let (gen, base) = pair.split_once(':').ok_or_else(bad)?;
            Ok(FeedGeneration {
                gen: gen.parse().map_err(|_| bad())?,
                base: base.parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

/// The generations text to store instead of `text` when it holds more than
/// [`MAX_FEED_GENERATIONS`] (the oldest dropped), or `None` when it is within the bound.
pub(crate) fn oldest_generations_dropped(text: &str) -> Result<Option<String>, StoreError> {
    let gens = parse_generations(text)?;
    if gens.len() <= MAX_FEED_GENERATIONS {
        return Ok(None);
    }
    let kept = &gens[gens.len() - MAX_FEED_GENERATIONS..];
    Ok(Some(
        kept.iter()
            .map(|g| format!("{}:{}", g.gen, g.base))
            .collect::<Vec<_>>()
            .join(","),
    ))
}

/// The smallest string greater than every string that starts with `prefix` (`None`: no bound).
///
/// Text compares by UTF-8 bytes (SQLite's default, PostgreSQL's `COLLATE "C"`), which is code
/// point order, so the successor is the prefix with its trailing U+10FFFF characters dropped and
/// its last other character incremented.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match last as u32 {
            0xD7FF => Some('\u{E000}'),
            c => char::from_u32(c + 1),
        };
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Refuses a query filter that does not name a plain top-level field (letters, digits, `_`).
pub(crate) fn check_filter_field(name: &str) -> Result<(), StoreError> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Ok(());
    }
    Err(StoreError::BadQuery(format!(
        "filter field {name:?} must be a top-level field name of letters, digits and '_'"
    )))
}

/// The opaque `next` token of an item page that ended at (device, pk, sk).
pub(crate) fn encode_token(device: &str, pk: &str, sk: &str) -> Result<String, StoreError> {
    serde_json::to_vec(&(device, pk, sk))
        .map(hex::encode)
        .map_err(|e| StoreError::Database(format!("encoding a page token: {e}")))
}

/// The (device, pk, sk) of a `next` token; a forged one is [`StoreError::BadQuery`].
pub(crate) fn decode_token(token: &str) -> Result<(String, String, String), StoreError> {
    let bad = || StoreError::BadQuery("the next token is not one this service issued".to_string());
    let bytes = hex::decode(token).map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// Cuts a snapshot page read one row past `limit` (so the store knows whether more follow) to
/// `limit`, and returns where the next page starts: after its last item, or `None` at the end.
pub(crate) fn snapshot_next(items: &mut Vec<Change>, limit: usize) -> Option<SnapshotCursor> {
    if items.len() <= limit {
        return None;
    }
    items.truncate(limit);
    items.last().map(|c| SnapshotCursor {
        model: c.model.clone(),
        key: c.key.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_round_trip_and_keep_the_newest() {
        let many: Vec<String> = (1..=MAX_FEED_GENERATIONS as u64 + 2)
            .map(|g| format!("{g}:{}", g * 10))
            .collect();
        let kept = oldest_generations_dropped(&many.join(","))
            .unwrap()
            .expect("over the bound");
        let gens = parse_generations(&kept).unwrap();
        assert_eq!(gens.len(), MAX_FEED_GENERATIONS);
        assert_eq!(gens.last().unwrap().gen, MAX_FEED_GENERATIONS as u64 + 2);
        assert_eq!(oldest_generations_dropped("0:0").unwrap(), None);
        assert!(matches!(
            parse_generations("7:x"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn tokens_round_trip_and_forged_ones_are_bad_queries() {
        let t = encode_token("d1", "p", "s\u{1F600}").unwrap();
        assert_eq!(
            decode_token(&t).unwrap(),
            ("d1".into(), "p".into(), "s\u{1F600}".into())
        );
        for forged in ["zz", "00", &hex::encode("[1,2]")] {
            assert!(matches!(decode_token(forged), Err(StoreError::BadQuery(_))));
        }
        assert!(check_filter_field("name_2").is_ok());
        for bad in ["", "a.b", "a\"", "é"] {
            assert!(matches!(
                check_filter_field(bad),
                Err(StoreError::BadQuery(_))
            ));
        }
    }

    #[test]
    fn prefix_end_bounds_every_prefix() {
        assert_eq!(prefix_end("ab"), Some("ac".into()));
        assert_eq!(prefix_end("a\u{10FFFF}"), Some("b".into()));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{D7FF}"), Some("a\u{E000}".into()));
        for (p, s) in [("a", "a\u{10FFFF}z"), ("x#", "x#\u{10FFFF}\u{10FFFF}")] {
            let end = prefix_end(p).unwrap();
            assert!(s.starts_with(p) && s >= p && s < end.as_str());
        }
    }
}
