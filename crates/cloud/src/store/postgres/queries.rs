//! The PostgreSQL store's reads for the HTTP API: one item, filtered and paged item queries, and
//! the conflict log.
//!
//! It exists because these reads take input from API callers: the filter field names are
//! checked, the page tokens are opaque and refused when forged, and a key prefix becomes an
//! exact range (the rules are `crate::store::encoding`'s, shared with the SQLite store). Field
//! filters run in SQL on the `jsonb` items: an equality is a containment (`item @> {"f": v}`),
//! which the `items_fields` GIN index serves, with a type check so that, as in SQLite, a string
//! matches only a string and a number only a number (of any representation).

use devtables_schema::ItemKey;
use devtables_sync::identity::Owner;
use postgres::types::ToSql;
use postgres::Row;

use super::super::encoding::{
    check_filter_field, decode_token, encode_token, owner_cols, parse_version, prefix_end,
};
use super::super::sqlite::MAX_QUERY_LIMIT;
use super::super::{ConflictRecord, ItemPage, ItemQuery, StoreError, StoredItem};
use super::sql::{col, col_item, col_u64, limit, Conn};

const ITEM_COLS: &str = "account, device, model, pk, sk, item, version, updated_ms";

/// Reads the [`ITEM_COLS`] columns.
fn item_row(r: &Row) -> Result<StoredItem, StoreError> {
    let device: String = col(r, 1)?;
    Ok(StoredItem {
        account: col(r, 0)?,
        device: (!device.is_empty()).then_some(device),
        model: col(r, 2)?,
        pk: col(r, 3)?,
        sk: col(r, 4)?,
        item: col_item(r, 5)?,
        version: parse_version(&col::<String>(r, 6)?)?,
        updated_ms: col_u64(r, 7)?,
    })
}

pub(super) fn get_item(
    conn: &mut Conn,
    owner: &Owner,
    model: &str,
    key: &ItemKey,
) -> Result<Option<StoredItem>, StoreError> {
    let (account, device) = owner_cols(owner);
    conn.query_opt(
        "reading an item",
        &format!(
            "SELECT {ITEM_COLS} FROM items
             WHERE account = $1 AND device = $2 AND pk = $3 AND sk = $4 AND model = $5"
        ),
        &[&account, &device, &key.pk, &key.sk, &model],
    )?
    .as_ref()
    .map(item_row)
    .transpose()
}

/// The SQL of an item query and its parameters, built clause by clause.
struct Sql {
    text: String,
    params: Vec<Box<dyn ToSql + Sync>>,
}

impl Sql {
    /// Adds a parameter; returns its placeholder.
    fn param(&mut self, v: impl ToSql + Sync + 'static) -> String {
        self.params.push(Box::new(v));
        format!("${}", self.params.len())
    }
}

pub(super) fn query_items(conn: &mut Conn, query: &ItemQuery) -> Result<ItemPage, StoreError> {
    let max = query.limit.clamp(1, MAX_QUERY_LIMIT);
    let mut sql = Sql {
        text: String::new(),
        params: Vec::new(),
    };
    let account = sql.param(query.account.clone());
    let model = sql.param(query.model.clone());
    sql.text = format!(
        "SELECT {ITEM_COLS} FROM items WHERE account = {account} AND model = {model} AND NOT deleted"
    );
    if let Some(device) = &query.device {
        let p = sql.param(device.clone());
        sql.text.push_str(&format!(" AND device = {p}"));
    }
    if let Some(pk) = &query.pk {
        let p = sql.param(pk.clone());
        sql.text.push_str(&format!(" AND pk = {p}"));
    }
    if let Some(prefix) = query.sk_prefix.as_deref().filter(|p| !p.is_empty()) {
        // A range, not LIKE: exact for any prefix, and it uses the index.
        let p = sql.param(prefix.to_string());
        sql.text.push_str(&format!(" AND sk >= {p}"));
        if let Some(end) = prefix_end(prefix) {
            let p = sql.param(end);
            sql.text.push_str(&format!(" AND sk < {p}"));
        }
    }
    for (field, value) in &query.filters {
        check_filter_field(field)?;
        let kind = match value {
            serde_json::Value::String(_) => Some("string"),
            serde_json::Value::Number(_) => Some("number"),
            serde_json::Value::Bool(_) => Some("boolean"),
            // Null matches an explicit null or an absent field.
            serde_json::Value::Null => None,
            serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
                return Err(StoreError::BadQuery(format!(
                    "filter {field}: only strings, numbers, booleans and null can be compared"
                )));
            }
        };
        let name = sql.param(field.clone());
        match kind {
            Some(kind) => {
                let mut wanted = serde_json::Map::new();
                wanted.insert(field.clone(), value.clone());
                let contains = sql.param(serde_json::Value::Object(wanted));
                sql.text.push_str(&format!(
                    " AND item @> {contains} AND jsonb_typeof(item -> {name}) = '{kind}'"
                ));
            }
            None => sql.text.push_str(&format!(
                " AND coalesce(jsonb_typeof(item -> {name}), 'null') = 'null'"
            )),
        }
    }
    if let Some(token) = &query.next {
        let (device, pk, sk) = decode_token(token)?;
        let (d, p, s) = (sql.param(device), sql.param(pk), sql.param(sk));
        sql.text
            .push_str(&format!(" AND (device, pk, sk) > ({d}, {p}, {s})"));
    }
    let n = sql.param(limit(max + 1));
    sql.text
        .push_str(&format!(" ORDER BY device, pk, sk LIMIT {n}"));
    let params: Vec<&(dyn ToSql + Sync)> = sql.params.iter().map(|p| p.as_ref()).collect();
    let rows = conn.query("querying items", &sql.text, &params)?;
    let more = rows.len() > max;
    let items = rows
        .iter()
        .take(max)
        .map(item_row)
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
    conn: &mut Conn,
    account: &str,
    before: Option<u64>,
    max: usize,
) -> Result<Vec<ConflictRecord>, StoreError> {
    let before = before.map_or(i64::MAX, |b| i64::try_from(b).unwrap_or(i64::MAX));
    let rows = conn.query(
        "listing conflicts",
        "SELECT id, at_ms, account, device, model, pk, sk, winner, loser, lost, loser_item
         FROM conflicts WHERE account = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        &[&account, &before, &limit(max)],
    )?;
    rows.iter()
        .map(|r| {
            Ok(ConflictRecord {
                id: col_u64(r, 0)?,
                at_ms: col_u64(r, 1)?,
                account: col(r, 2)?,
                device: col(r, 3)?,
                model: col(r, 4)?,
                pk: col(r, 5)?,
                sk: col(r, 6)?,
                winner: col(r, 7)?,
                loser: col(r, 8)?,
                lost: col(r, 9)?,
                loser_item: col_item(r, 10)?,
            })
        })
        .collect()
}
