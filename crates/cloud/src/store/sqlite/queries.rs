//! The SQLite store's reads for the HTTP API: one item, filtered and paged item queries, and the
//! conflict log.
//!
//! It exists because these reads take input from API callers: the filter field names are
//! checked, the page tokens are opaque and refused when forged, and a key prefix becomes an
//! exact range (the rules are `crate::store::encoding`'s, shared with the PostgreSQL store).

use devtables_schema::ItemKey;
use devtables_sync::identity::Owner;
use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::super::{ConflictRecord, ItemPage, ItemQuery, StoreError, StoredItem};
use super::sql::{db, owner_cols, parse_item, parse_version, sql_int};
use crate::store::encoding::{check_filter_field, decode_token, encode_token, prefix_end};

/// Most items one [`CloudStore::query_items`] page returns.
///
/// [`CloudStore::query_items`]: super::super::CloudStore::query_items
pub const MAX_QUERY_LIMIT: usize = 1000;

const ITEM_COLS: &str = "account, device, model, pk, sk, item, version, updated_ms";

/// An `items` row as read, before its JSON and version are decoded.
struct RawItem {
    account: String,
    device: String,
    model: String,
    pk: String,
    sk: String,
    item: Option<String>,
    version: String,
    updated_ms: u64,
}

impl RawItem {
    /// Reads the [`ITEM_COLS`] columns.
    fn read(r: &Row<'_>) -> rusqlite::Result<RawItem> {
        Ok(RawItem {
            account: r.get(0)?,
            device: r.get(1)?,
            model: r.get(2)?,
            pk: r.get(3)?,
            sk: r.get(4)?,
            item: r.get(5)?,
            version: r.get(6)?,
            updated_ms: r.get(7)?,
        })
    }

    fn decode(self) -> Result<StoredItem, StoreError> {
        Ok(StoredItem {
            account: self.account,
            device: (!self.device.is_empty()).then_some(self.device),
            model: self.model,
            pk: self.pk,
            sk: self.sk,
            item: self.item.as_deref().map(parse_item).transpose()?,
            version: parse_version(&self.version)?,
            updated_ms: self.updated_ms,
        })
    }
}

pub(super) fn get_item(
    conn: &Connection,
    owner: &Owner,
    model: &str,
    key: &ItemKey,
) -> Result<Option<StoredItem>, StoreError> {
    let (account, device) = owner_cols(owner);
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {ITEM_COLS} FROM items WHERE account = ?1 AND device = ?2 AND pk = ?3 AND sk = ?4 AND model = ?5"
        ))
        .and_then(|mut s| s.query_row(params![account, device, key.pk, key.sk, model], RawItem::read).optional())
        .map_err(db("reading an item"))?;
    raw.map(RawItem::decode).transpose()
}

pub(super) fn query_items(conn: &Connection, query: &ItemQuery) -> Result<ItemPage, StoreError> {
    let limit = query.limit.clamp(1, MAX_QUERY_LIMIT);
    let mut sql = format!(
        "SELECT {ITEM_COLS} FROM items INDEXED BY items_by_model WHERE account = ? AND model = ? AND deleted = 0"
    );
    let mut args: Vec<Value> = vec![
        Value::Text(query.account.clone()),
        Value::Text(query.model.clone()),
    ];
    if let Some(device) = &query.device {
        sql.push_str(" AND device = ?");
        args.push(Value::Text(device.clone()));
    }
    if let Some(pk) = &query.pk {
        sql.push_str(" AND pk = ?");
        args.push(Value::Text(pk.clone()));
    }
    if let Some(prefix) = query.sk_prefix.as_deref().filter(|p| !p.is_empty()) {
        // A range, not LIKE: exact for any prefix, and it uses the index.
        sql.push_str(" AND sk >= ?");
        args.push(Value::Text(prefix.to_string()));
        if let Some(end) = prefix_end(prefix) {
            sql.push_str(" AND sk < ?");
            args.push(Value::Text(end));
        }
    }
    for (field, value) in &query.filters {
        check_filter_field(field)?;
        let path = Value::Text(format!("$.\"{field}\""));
        match value {
            serde_json::Value::String(s) => {
                sql.push_str(" AND json_type(item, ?) = 'text' AND json_extract(item, ?) = ?");
                args.extend([path.clone(), path, Value::Text(s.clone())]);
            }
            serde_json::Value::Number(n) => {
                let number = match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => Value::Integer(i),
                    (None, Some(f)) => Value::Real(f),
                    (None, None) => {
                        return Err(StoreError::BadQuery(format!(
                            "filter {field}: bad number {n}"
                        )))
                    }
                };
                sql.push_str(
                    " AND json_type(item, ?) IN ('integer', 'real') AND json_extract(item, ?) = ?",
                );
                args.extend([path.clone(), path, number]);
            }
            serde_json::Value::Bool(b) => {
                sql.push_str(" AND json_type(item, ?) = ?");
                args.extend([
                    path,
                    Value::Text(if *b { "true" } else { "false" }.to_string()),
                ]);
            }
            // Null matches an explicit null or an absent field.
            serde_json::Value::Null => {
                sql.push_str(" AND coalesce(json_type(item, ?), 'null') = 'null'");
                args.push(path);
            }
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                return Err(StoreError::BadQuery(format!(
                    "filter {field}: only strings, numbers, booleans and null can be compared"
                )));
            }
        }
    }
    if let Some(token) = &query.next {
        let (device, pk, sk) = decode_token(token)?;
        sql.push_str(" AND (device, pk, sk) > (?, ?, ?)");
        args.extend([Value::Text(device), Value::Text(pk), Value::Text(sk)]);
    }
    sql.push_str(" ORDER BY device, pk, sk LIMIT ?");
    args.push(Value::Integer(sql_int(limit + 1)));
    let raws: Vec<RawItem> = conn
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(params_from_iter(args.iter()), RawItem::read)?
                .collect()
        })
        .map_err(db("querying items"))?;
    let more = raws.len() > limit;
    let items = raws
        .into_iter()
        .take(limit)
        .map(RawItem::decode)
        .collect::<Result<Vec<_>, _>>()?;
    let next = match items.last() {
        Some(last) if more => Some(encode_token(
            last.device.as_deref().unwrap_or(""),
            &last.pk,
            &last.sk,
        )?),
        _ => None,
    };
    Ok(ItemPage { items, next })
}

pub(super) fn conflicts(
    conn: &Connection,
    account: &str,
    before: Option<u64>,
    limit: usize,
) -> Result<Vec<ConflictRecord>, StoreError> {
    let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    type ConflictRow = (
        u64,
        u64,
        String,
        Option<String>,
        String,
        String,
        String,
        String,
        String,
        String,
        Option<String>,
    );
    let rows: Vec<ConflictRow> = conn
        .prepare_cached(
            "SELECT id, at_ms, account, device, model, pk, sk, winner, loser, lost, loser_item FROM conflicts
             WHERE account = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
        )
        .and_then(|mut s| {
            s.query_map(params![account, before, sql_int(limit)], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                ))
            })?
            .collect()
        })
        .map_err(db("listing conflicts"))?;
    rows.into_iter()
        .map(
            |(id, at_ms, account, device, model, pk, sk, winner, loser, lost, loser_item)| {
                Ok(ConflictRecord {
                    id,
                    at_ms,
                    account,
                    device,
                    model,
                    pk,
                    sk,
                    winner,
                    loser,
                    lost,
                    loser_item: loser_item.as_deref().map(parse_item).transpose()?,
                })
            },
        )
        .collect()
}
