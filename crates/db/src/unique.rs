//! `unique` fields, kept unique by a table of their values written with the items.
//!
//! OneTable enforces `unique` with one extra item per value (`_unique#Model#field#value`),
//! created in the transaction of the write, so that a second item with the value fails. The
//! database does the equivalent in a table of its own, `unique`: every value a unique field
//! holds (per model and field, within the value of its `scope` template when it has one) → the
//! primary key of the item holding it. Every write of an item (create, update, upsert, remove,
//! import, replication, TTL purge) goes through `WriteTxn::store` or `WriteTxn::remove_found`,
//! which claim and release values here, in the write's own transaction: the table and the
//! items commit together or not at all.
//!
//! A local write or an import that would give a second live item a value already held is
//! refused ([`DbError::NotUnique`]). A replicated write is not: the cloud does not enforce
//! `unique`, and refusing one item of a feed page would stop that page, and replication with
//! it, for good; the replicated item takes the value over (logged at warn).
//!
//! The table is built at open for the unique fields the file has no entries for yet (a file
//! from before this table, or a schema change that made a field unique, which
//! [`crate::DbOptions::allow_schema_change`] must allow), and entries of fields no longer
//! unique are dropped; `meta` records which fields (and scopes) the entries were built for,
//! like the secondary indexes.

use std::collections::BTreeMap;

use devtables_schema::{Item, ItemKey, Model, Schema, UniqueScope, UniqueValue};
use std::ops::Bound;

use devtables_logstore::LogWrite;

use crate::error::UniqueCollision;
use crate::tables::{self, UNIQUE};
use crate::{keys, read, DbError, OpenError};

/// Prefix of the `meta` keys recording which unique fields the table holds entries for:
/// `unique:<model>\0<field>` → the field's scope definition ([`scope_definition`]).
const META_PREFIX: &str = "unique:";

/// Scope tags in a value key.
const MODEL_WIDE: u8 = b'm';
const SCOPED: u8 = b's';
const UNRESOLVED: u8 = b'u';

fn push_part(out: &mut Vec<u8>, text: &str) {
    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// The prefix every value key of `model`'s `field` starts with. Parts are length-prefixed, so
/// no name, scope or value can make one key look like another's.
pub(crate) fn field_prefix(model: &str, field: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + model.len() + field.len());
    push_part(&mut out, model);
    push_part(&mut out, field);
    out
}

/// Key of one value: model, field, scope (model-wide, a scope's text, or unresolved), value.
pub(crate) fn value_key(model: &str, value: &UniqueValue) -> Vec<u8> {
    let mut out = field_prefix(model, &value.field);
    match &value.scope {
        UniqueScope::Model => out.push(MODEL_WIDE),
        UniqueScope::Scoped(scope) => {
            out.push(SCOPED);
            push_part(&mut out, scope);
        }
        UniqueScope::Unresolved { .. } => out.push(UNRESOLVED),
    }
    out.extend_from_slice(value.value.as_bytes());
    out
}

/// The unique values of a stored item, each with its key.
pub(crate) fn keyed(model: &Model, item: &Item) -> Vec<(Vec<u8>, UniqueValue)> {
    if !model.has_unique_fields() {
        return Vec::new();
    }
    model
        .unique_values(item)
        .into_iter()
        .map(|v| (value_key(model.name(), &v), v))
        .collect()
}

/// The scope shown in errors: `None` for a model-wide value.
pub(crate) fn scope_text(scope: &UniqueScope) -> Option<String> {
    match scope {
        UniqueScope::Model => None,
        UniqueScope::Scoped(text) => Some(text.clone()),
        UniqueScope::Unresolved { variable } => Some(format!("(unresolved: no {variable})")),
    }
}

/// Whether the schema has any unique field (else no write opens the table).
pub(crate) fn schema_has_unique(schema: &Schema) -> bool {
    schema.models().any(Model::has_unique_fields)
}

/// What `meta` records for a unique field: its scope template, or that it is model-wide.
fn scope_definition(scope: Option<&str>) -> String {
    match scope {
        Some(template) => format!("scope {template}"),
        None => "model".into(),
    }
}

/// Why preparing the unique table at open failed.
pub(crate) enum PrepareError {
    Db(DbError),
    Open(Box<OpenError>),
}

impl From<DbError> for PrepareError {
    fn from(e: DbError) -> Self {
        PrepareError::Db(e)
    }
}

impl From<devtables_logstore::LogError> for PrepareError {
    fn from(e: devtables_logstore::LogError) -> Self {
        PrepareError::Db(e.into())
    }
}

/// Brings the table in line with the schema's unique fields, in the opening transaction: drops
/// the entries of fields no longer unique (or with another scope), builds those of fields that
/// have none from the live stored items, refusing the open when two of them share a value.
pub(crate) fn prepare(
    tx: &mut LogWrite<'_>,
    schema: &Schema,
    now_ms: i64,
    path: &std::path::Path,
) -> Result<(), PrepareError> {
    let mut wanted = BTreeMap::new();
    for model in schema.models() {
        for field in model.fields().iter().filter(|f| f.unique()) {
            wanted.insert(
                (model.name().to_string(), field.name().to_string()),
                scope_definition(field.unique_scope()),
            );
        }
    }
    let mut recorded = BTreeMap::new();
    let recorded_end = keys::prefix_end(META_PREFIX.as_bytes());
    for (k, v) in tx.range(
        tables::META,
        (
            Bound::Included(META_PREFIX.as_bytes()),
            Bound::Excluded(recorded_end.as_slice()),
        ),
        false,
        usize::MAX,
    )? {
        let (Ok(k), Ok(v)) = (String::from_utf8(k), String::from_utf8(v)) else {
            return Err(DbError::Corrupt("a unique field's meta entry is not UTF-8".into()).into());
        };
        let Some(rest) = k.strip_prefix(META_PREFIX) else {
            continue;
        };
        if let Some((model, field)) = rest.split_once('\0') {
            recorded.insert((model.to_string(), field.to_string()), v);
        }
    }
    if wanted.is_empty() && recorded.is_empty() {
        return Ok(());
    }
    for ((model, field), definition) in &recorded {
        if wanted.get(&(model.clone(), field.clone())) == Some(definition) {
            continue;
        }
        let start = field_prefix(model, field);
        let end = keys::prefix_end(&start);
        let stale = tx.keys(
            UNIQUE,
            (
                Bound::Included(start.as_slice()),
                Bound::Excluded(end.as_slice()),
            ),
            usize::MAX,
        )?;
        for key in &stale {
            tx.remove(UNIQUE, key)?;
        }
        tx.remove(tables::META, meta_key(model, field).as_bytes())?;
    }
    for ((model_name, field), definition) in &wanted {
        if recorded.get(&(model_name.clone(), field.clone())) == Some(definition) {
            continue;
        }
        let Some(model) = schema.model(model_name) else {
            continue;
        };
        let mut built = 0u64;
        let items = tx.range(
            &tables::items_table_name(model_name),
            tables::ALL,
            false,
            usize::MAX,
        )?;
        for (raw, stored) in items {
            let item = read::decode_item(&stored, &raw)?;
            if read::expired(model, &item, now_ms) {
                continue;
            }
            for (key, value) in keyed(model, &item) {
                if value.field != *field {
                    continue;
                }
                let held = tx.get(UNIQUE, &key)?;
                if let Some(first) = held.filter(|h| *h != raw) {
                    let collision = UniqueCollision {
                        path: path.to_path_buf(),
                        model: model_name.clone(),
                        field: field.clone(),
                        value: value.value,
                        scope: scope_text(&value.scope),
                        first: shown_key(&first),
                        second: shown_key(&raw),
                    };
                    return Err(PrepareError::Open(Box::new(OpenError::NotUnique(
                        Box::new(collision),
                    ))));
                }
                tx.insert(UNIQUE, &key, &raw)?;
                built += 1;
            }
        }
        tables::meta_put(tx, &meta_key(model_name, field), definition)?;
        tracing::info!(
            path = %path.display(),
            model = %model_name,
            field = %field,
            values = built,
            "built the unique values of a field"
        );
    }
    Ok(())
}

fn meta_key(model: &str, field: &str) -> String {
    format!("{META_PREFIX}{model}\0{field}")
}

/// An encoded primary key as errors show it.
pub(crate) fn shown_key(raw: &[u8]) -> String {
    match keys::decode_item_key(raw) {
        Some(key) => crate::txn::display_key(&key),
        None => format!("{:?}", String::from_utf8_lossy(raw)),
    }
}

/// The value keys a write claims and releases for the item at one key.
pub(crate) struct Moves {
    /// Keys the new item holds that the table does not give it yet.
    pub(crate) claim: Vec<Vec<u8>>,
    /// Keys the old item held that the new one does not.
    pub(crate) release: Vec<Vec<u8>>,
}

/// A value another live item holds, found by [`plan`].
pub(crate) struct Conflict {
    pub(crate) value: UniqueValue,
    pub(crate) holder: ItemKey,
}

/// What writing `new` (replacing `old`) at `raw_key` claims and releases, and the values it
/// claims that another item holds. `holds` says whether the item at a key is live and still
/// holds a value key: an entry may outlive its holder's value (an expired holder, or a value a
/// replicated write took over), and such an entry is free to claim.
pub(crate) fn plan(
    tx: &LogWrite<'_>,
    raw_key: &[u8],
    old: Option<(&Model, &Item)>,
    new: Option<(&Model, &Item)>,
    mut holds: impl FnMut(&ItemKey, &[u8]) -> Result<bool, DbError>,
) -> Result<(Moves, Vec<Conflict>), DbError> {
    let old_keys: Vec<Vec<u8>> = old
        .map(|(m, i)| keyed(m, i).into_iter().map(|(k, _)| k).collect())
        .unwrap_or_default();
    let new_values = new.map(|(m, i)| keyed(m, i)).unwrap_or_default();
    let mut moves = Moves {
        claim: Vec::new(),
        release: old_keys
            .iter()
            .filter(|k| !new_values.iter().any(|(n, _)| n == *k))
            .cloned()
            .collect(),
    };
    let mut conflicts = Vec::new();
    for (key, value) in new_values {
        let holder = tx.get(UNIQUE, &key)?;
        match holder {
            Some(h) if h == raw_key => continue,
            Some(h) => {
                if let Some(holder) = keys::decode_item_key(&h) {
                    if holds(&holder, &key)? {
                        conflicts.push(Conflict { value, holder });
                    }
                }
            }
            None => {}
        }
        moves.claim.push(key);
    }
    Ok((moves, conflicts))
}

/// Applies `moves` for the item at `raw_key`: a released value is removed only while this item
/// holds it.
pub(crate) fn apply(tx: &mut LogWrite<'_>, raw_key: &[u8], moves: &Moves) -> Result<(), DbError> {
    for key in &moves.release {
        let ours = tx.get(UNIQUE, key)?.is_some_and(|h| h == raw_key);
        if ours {
            tx.remove(UNIQUE, key)?;
        }
    }
    for key in &moves.claim {
        tx.insert(UNIQUE, key, raw_key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(field: &str, scope: UniqueScope, value: &str) -> UniqueValue {
        UniqueValue {
            field: field.into(),
            scope,
            value: value.into(),
        }
    }

    #[test]
    fn value_keys_are_unambiguous_and_start_with_their_field_prefix() {
        let keys = [
            value_key("M", &value("f", UniqueScope::Model, "a")),
            value_key("M", &value("f", UniqueScope::Scoped("a".into()), "")),
            value_key("M", &value("f", UniqueScope::Scoped("".into()), "a")),
            value_key(
                "M",
                &value(
                    "f",
                    UniqueScope::Unresolved {
                        variable: "x".into(),
                    },
                    "a",
                ),
            ),
            value_key("Mf", &value("", UniqueScope::Model, "a")),
            value_key("M", &value("fa", UniqueScope::Model, "")),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        let prefix = field_prefix("M", "f");
        let end = keys::prefix_end(&prefix);
        let inside = keys.iter().filter(|k| **k >= prefix && **k < end).count();
        assert_eq!(inside, 4, "the four keys of M.f, and only those");
    }

    #[test]
    fn scopes_are_shown_in_errors() {
        assert_eq!(scope_text(&UniqueScope::Model), None);
        assert_eq!(
            scope_text(&UniqueScope::Scoped("d1".into())).as_deref(),
            Some("d1")
        );
        assert_eq!(scope_definition(None), "model");
        assert_eq!(scope_definition(Some("${a}")), "scope ${a}");
    }
}
