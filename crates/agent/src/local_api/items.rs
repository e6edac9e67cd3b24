//! The item operations of the local API, and the parts `--stdin` shares with it (the find
//! parameters and their bounds, the batch), so both page and batch alike.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use devtables_db::{Db, DbError, FindOptions, Page, TxnOp};
use devtables_schema::Item;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::{json_body, Shared};

/// Why an item operation failed before or in the database.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    /// A parameter breaks a rule of the API (a limit over the maximum, a malformed batch).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        match e {
            OpError::Invalid(message) => ApiError::invalid(message),
            OpError::Db(e) => e.into(),
        }
    }
}

/// A find: the properties (key fields, sort-key conditions, filters) and the page.
#[derive(Debug, Default)]
pub(crate) struct FindParams {
    pub(crate) props: Item,
    /// Items per page; the default page when `None`.
    pub(crate) limit: Option<usize>,
    /// The `next` token of the previous page.
    pub(crate) next: Option<String>,
    /// A secondary index to query instead of the primary key.
    pub(crate) index: Option<String>,
    pub(crate) reverse: bool,
}

/// One page of a find, within the bounds: a `limit` at most `max_page` (larger is refused, not
/// cut, so a caller never mistakes a short page for the end), `default_page` items without one.
pub(crate) fn find(
    db: &Db,
    model: &str,
    params: FindParams,
    default_page: usize,
    max_page: usize,
) -> Result<Page, OpError> {
    let limit = match params.limit {
        Some(limit) if limit > max_page => {
            return Err(OpError::Invalid(format!(
                "limit {limit} is over the largest page, {max_page} items: page with `next` \
                 (local_api.max_page)"
            )))
        }
        Some(limit) => limit,
        None => default_page,
    };
    Ok(db.find(
        model,
        &params.props,
        &FindOptions {
            index: params.index,
            limit: Some(limit),
            next: params.next,
            reverse: params.reverse,
            hidden: false,
        },
    )?)
}

/// The operations of a batch: `[{"op": "create"|"update"|"upsert"|"remove", "model": M,
/// "item": {...}}, ...]`.
pub(crate) fn parse_batch(ops: &Value) -> Result<Vec<TxnOp>, OpError> {
    let Some(list) = ops.as_array() else {
        return Err(OpError::Invalid(
            "`ops` must be an array of {op, model, item}".into(),
        ));
    };
    let mut out = Vec::with_capacity(list.len());
    for (at, op) in list.iter().enumerate() {
        let field = |name: &str| op.get(name);
        let model = field("model")
            .and_then(Value::as_str)
            .ok_or_else(|| OpError::Invalid(format!("ops[{at}]: `model` (a string) is missing")))?
            .to_string();
        let item = match field("item") {
            Some(Value::Object(item)) => item.clone(),
            _ => {
                return Err(OpError::Invalid(format!(
                    "ops[{at}]: `item` (an object) is missing"
                )))
            }
        };
        out.push(match field("op").and_then(Value::as_str) {
            Some("create") => TxnOp::Create { model, item },
            Some("update") => TxnOp::Update {
                model,
                item,
                upsert: false,
            },
            Some("upsert") => TxnOp::Update {
                model,
                item,
                upsert: true,
            },
            Some("remove") => TxnOp::Remove { model, key: item },
            other => {
                return Err(OpError::Invalid(format!(
                    "ops[{at}]: `op` is {other:?}: one of create, update, upsert, remove"
                )))
            }
        });
    }
    Ok(out)
}

/// `{"item": ...}`.
#[derive(Serialize)]
pub(crate) struct ItemAnswer {
    item: Item,
}

/// `{"items": [...], "next": token or null}`.
#[derive(Serialize)]
pub(crate) struct PageAnswer {
    items: Vec<Item>,
    next: Option<String>,
}

/// `{"results": [item or null, ...]}`, one per operation.
#[derive(Serialize)]
pub(crate) struct BatchAnswer {
    results: Vec<Option<Item>>,
}

/// The query string of a find, a get and a remove.
#[derive(Deserialize)]
pub(crate) struct ItemQuery {
    /// JSON object: key fields, sort-key conditions, filters.
    #[serde(rename = "where")]
    where_: Option<String>,
    limit: Option<String>,
    next: Option<String>,
    index: Option<String>,
    reverse: Option<String>,
}

fn model_of(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(m)| m)
        .map_err(|e| ApiError::bad_request(format!("cannot read the path: {}", e.body_text())))
}

fn query_of(query: Result<Query<ItemQuery>, QueryRejection>) -> Result<ItemQuery, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        ApiError::bad_request(format!("cannot read the query string: {}", e.body_text()))
    })
}

/// The `where` parameter: a JSON object (none: `{}`).
fn props_of(where_: Option<&str>) -> Result<Item, ApiError> {
    let Some(text) = where_ else {
        return Ok(Item::new());
    };
    match devtables_schema::parse_json_exact(text) {
        Ok(Value::Object(props)) => Ok(props),
        Ok(_) => Err(ApiError::invalid(
            "`where` must be a JSON object of properties".into(),
        )),
        Err(e) => Err(ApiError::bad_request(format!("`where` is not JSON: {e}"))),
    }
}

fn object(body: Value) -> Result<Item, ApiError> {
    match body {
        Value::Object(item) => Ok(item),
        _ => Err(ApiError::invalid(
            "the body must be a JSON object (the item)".into(),
        )),
    }
}

/// Runs blocking database work off the async workers (a write waits for its flush).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::task)?
}

pub(crate) async fn create(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ItemAnswer>), ApiError> {
    let model = model_of(path)?;
    let item = object(json_body(&headers, body)?)?;
    let item = blocking(move || Ok(s.db.create(&model, &item)?)).await?;
    Ok((StatusCode::CREATED, Json(ItemAnswer { item })))
}

pub(crate) async fn update(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ItemAnswer>, ApiError> {
    let model = model_of(path)?;
    let item = object(json_body(&headers, body)?)?;
    let item = blocking(move || Ok(s.db.update(&model, &item)?)).await?;
    Ok(Json(ItemAnswer { item }))
}

pub(crate) async fn upsert(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ItemAnswer>, ApiError> {
    let model = model_of(path)?;
    let item = object(json_body(&headers, body)?)?;
    let item = blocking(move || Ok(s.db.upsert(&model, &item)?)).await?;
    Ok(Json(ItemAnswer { item }))
}

pub(crate) async fn remove(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ItemQuery>, QueryRejection>,
) -> Result<Json<ItemAnswer>, ApiError> {
    let model = model_of(path)?;
    let key = props_of(query_of(query)?.where_.as_deref())?;
    let removed = blocking(move || {
        s.db.remove(&model, &key)?
            .ok_or_else(|| ApiError::not_found(format!("no such {model} item")))
    })
    .await?;
    Ok(Json(ItemAnswer { item: removed }))
}

pub(crate) async fn get_one(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ItemQuery>, QueryRejection>,
) -> Result<Json<ItemAnswer>, ApiError> {
    let model = model_of(path)?;
    let key = props_of(query_of(query)?.where_.as_deref())?;
    let item = blocking(move || {
        s.db.get(&model, &key)?
            .ok_or_else(|| ApiError::not_found(format!("no such {model} item")))
    })
    .await?;
    Ok(Json(ItemAnswer { item }))
}

pub(crate) async fn find_page(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ItemQuery>, QueryRejection>,
) -> Result<Json<PageAnswer>, ApiError> {
    let model = model_of(path)?;
    let q = query_of(query)?;
    let limit =
        match q.limit.as_deref() {
            None | Some("") => None,
            Some(text) => Some(text.parse::<usize>().map_err(|_| {
                ApiError::invalid(format!("limit {text:?} is not a count of items"))
            })?),
        };
    let reverse = match q.reverse.as_deref() {
        None | Some("" | "false" | "0") => false,
        Some("true" | "1") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "reverse {other:?} is not true or false"
            )))
        }
    };
    let params = FindParams {
        props: props_of(q.where_.as_deref())?,
        limit,
        next: q.next.filter(|n| !n.is_empty()),
        index: q.index.filter(|i| !i.is_empty()),
        reverse,
    };
    let page = blocking(move || {
        Ok(find(
            &s.db,
            &model,
            params,
            s.config.default_page,
            s.config.max_page,
        )?)
    })
    .await?;
    Ok(Json(PageAnswer {
        items: page.items,
        next: page.next,
    }))
}

/// The body of `POST /v1/batch`.
pub(crate) async fn batch(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchAnswer>, ApiError> {
    let body = json_body(&headers, body)?;
    let ops = parse_batch(body.get("ops").unwrap_or(&Value::Null))?;
    let results = blocking(move || Ok(s.db.transaction(&ops)?)).await?;
    Ok(Json(BatchAnswer { results }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_batch_names_the_operation_that_is_wrong() {
        let ops = parse_batch(&json!([
            {"op": "create", "model": "Fault", "item": {"id": "1"}},
            {"op": "upsert", "model": "Setting", "item": {"name": "a"}},
            {"op": "remove", "model": "Setting", "item": {"name": "b"}},
        ]))
        .unwrap();
        assert!(matches!(&ops[0], TxnOp::Create { model, .. } if model == "Fault"));
        assert!(matches!(&ops[1], TxnOp::Update { upsert: true, .. }));
        assert!(matches!(&ops[2], TxnOp::Remove { .. }));
        for (bad, says) in [
            (json!({"op": "create"}), "must be an array"),
            (json!([{"op": "create", "item": {}}]), "ops[0]: `model`"),
            (
                json!([{"op": "create", "model": "F", "item": {}}, {"op": "explode", "model": "F", "item": {}}]),
                "ops[1]: `op`",
            ),
            (
                json!([{"op": "create", "model": "F", "item": 3}]),
                "ops[0]: `item`",
            ),
        ] {
            let err = parse_batch(&bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn where_must_be_an_object_and_exact() {
        assert_eq!(props_of(None).unwrap(), Item::new());
        assert_eq!(
            props_of(Some(r#"{"deviceId":"d1"}"#)).unwrap()["deviceId"],
            "d1"
        );
        assert_eq!(
            props_of(Some("[1]")).unwrap_err().kind,
            super::super::error::Kind::Invalid
        );
        let err = props_of(Some(r#"{"n": 18446744073709551616}"#)).unwrap_err();
        assert_eq!(
            err.kind,
            super::super::error::Kind::BadRequest,
            "{}",
            err.message
        );
    }
}
