//! The HTTP API (JSON): devices, items, conflicts, keys, health.
//!
//! | Method and path | What |
//! |---|---|
//! | `GET /health` | liveness: the process serves HTTP |
//! | `GET /ready` | readiness: 200 once the store answers, the broker is connected and the device topics are subscribed (SUBACK granted); else 503 with the reason |
//! | `GET /v1/openapi.json` | the OpenAPI document of this API ([`crate::openapi`]) |
//! | `GET /v1/status` | the sync loop's counters: subscriptions, sessions, prompts pending, publishes queued, dropped and lost, request queue use, store jobs and errors |
//! | `GET /metrics` | the same numbers and the store job latency histogram, in the Prometheus text format ([`crate::metrics`]); an admin key, or none with `metrics_open` |
//! | `POST /v1/devices` `{account, device}` | register a device; the answer holds its secret, once |
//! | `GET /v1/devices?account=&after=&limit=` | list devices with their sync status |
//! | `GET /v1/devices/{account}/{device}` | one device: online, last seen, cursor lag, pending, last error |
//! | `DELETE /v1/devices/{account}/{device}?delete_items=` | revoke a device (admin): its MQTT session is closed at once and it may not connect again; its items stay unless `delete_items=true` |
//! | `POST /v1/devices/{account}/{device}/secret` | give a device a new secret (admin), shown once; the old one stops working, its session is closed; data and cursor stay |
//! | `GET /v1/accounts/{a}/items/{model}?device=&pk=&sk_prefix=&where=&limit=&next=` | query items across devices (or one) |
//! | `GET /v1/accounts/{a}/devices/{d}/items/{model}?...` | the same, for one device |
//! | `GET /v1/accounts/{a}/devices/{d}/items/{model}/key?pk=&sk=` | one item by key |
//! | `POST`, `PATCH`, `DELETE /v1/accounts/{a}/devices/{d}/items/{model}` | create, partially update, remove a device's item (replicates down per the schema) |
//! | `POST`, `PATCH`, `DELETE /v1/accounts/{a}/items/{model}` | the same for an account-wide (broadcast) item |
//! | `GET /v1/accounts/{a}/conflicts?before=&limit=` | the conflict log, newest first |
//! | `POST /v1/accounts/{a}/keys` `{scope}` | create an API key of the account; the answer holds the key, once |
//! | `GET /v1/accounts/{a}/keys` | the account's API keys (ids, scopes, times; never a secret) |
//! | `DELETE /v1/accounts/{a}/keys/{id}` | revoke a key |
//! | `GET /v1/accounts/{a}/changes?after=&model=&device=&limit=&wait=` | the account's change log after a cursor: JSON (long poll) or SSE ([`changes`]) |
//! | `GET`, `POST /v1/accounts/{a}/webhooks`; `GET`, `DELETE .../webhooks/{id}` | the account's webhooks and their delivery status ([`changes`]) |
//!
//! Every route is registered in [`routes`] together with its `#[utoipa::path]` documentation, so
//! the served document lists exactly the routes served; the answers are typed structs here (or
//! store records), so the document's schemas are the ones serialized.
//!
//! Every error, whatever produced it (a handler, a refused key, an unreadable body, query or
//! path, an unknown route, a wrong method), is one JSON shape, [`ErrorBody`]:
//! `{"error": "<sentence for people>", "kind": "<stable code for programs>"}`, with a fitting
//! status code. The kinds are the closed set [`ErrorKind`].
//!
//! # API keys
//!
//! Every route but `/health`, `/ready` and `/v1/openapi.json` needs `Authorization: Bearer
//! dt_<id>_<secret>` (see [`crate::auth`]). A key belongs to one account and has a scope: `read`
//! may only GET, `write` may also write items, `admin` may also register devices, manage the
//! account's keys and read `/v1/status` (service-wide numbers). A missing, malformed, unknown,
//! wrong or revoked key is answered 401 `unauthorized`; a valid key asking for another account or
//! beyond its scope is answered 403 `forbidden`, before anything is looked up, so the answer never
//! tells whether the target exists. Every refusal is counted (`api_unauthorized`, `api_forbidden`
//! in `/v1/status`) and logged at warn (rate-limited). The `insecure_no_auth` setting turns all of
//! this off. Each key has a request rate (`api_rate`, default 100 a second, burst 200): a request
//! over it is answered 429 `rate_limited` with `Retry-After` and counted (`api_rate_limited`);
//! see [`crate::rate_limit`]. The [`Caller`] extractor authenticates; each handler states what it needs of it
//! ([`Caller::allow`]), so a handler without a `Caller` argument would be open: the tests try
//! every documented route without a key.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::CloudWriteError;
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::topics;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod changes;

use crate::auth;
use crate::config::CloudConfig;
use crate::openapi::{self, BodyErrors, Conflict, Invalid, KeyedErrors, NotFound};
use crate::ops::{self, OpError, WriteKind};
use crate::status::{StatusSnapshot, SyncStatus, WarnLimiter};
use crate::store::{
    ApiKeyRecord, ConflictRecord, DeviceRecord, ItemPage, ItemQuery, KeyScope, StoreError,
    StoredItem, REVOKED_SECRET_HASH,
};
use crate::store_thread::{wall_ms, StoreGone, StoreHandle};
use crate::sync_loop::SyncInput;

#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) store: StoreHandle,
    pub(crate) sync: mpsc::Sender<SyncInput>,
    pub(crate) schema: Arc<Schema>,
    /// The embedded broker's credentials cache and sessions (empty with an external broker).
    pub(crate) broker: ops::BrokerControl,
    pub(crate) status: Arc<SyncStatus>,
    pub(crate) mqtt_addr: String,
    pub(crate) config: Arc<CloudConfig>,
    /// Rate-limits the warnings about refused requests (each one is counted in `status`).
    pub(crate) refusals: Arc<Mutex<WarnLimiter>>,
    /// The request rate of each API key.
    pub(crate) rate: Arc<crate::rate_limit::ApiRateLimiter>,
    /// The reader slots of the change log (`changes_max_readers`).
    pub(crate) readers: Arc<tokio::sync::Semaphore>,
    /// The webhooks' delivery tasks, started and stopped with their creation and deletion.
    pub(crate) webhooks: crate::webhooks::Webhooks,
    /// The service's shutdown: waiting readers answer, SSE streams end.
    pub(crate) shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Every route of the API with its documentation: the one list both the router and the OpenAPI
/// document are made from (`routes!` takes only handlers that carry a `#[utoipa::path]`, and
/// the handlers it groups must share one path).
pub(crate) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(openapi::header())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(openapi::serve_document))
        .routes(routes!(status))
        .routes(routes!(metrics))
        .routes(routes!(list_devices, register_device))
        .routes(routes!(get_device, revoke_device))
        .routes(routes!(rotate_secret))
        .routes(routes!(
            query_account_items,
            create_broadcast,
            update_broadcast,
            remove_broadcast
        ))
        .routes(routes!(
            query_device_items,
            create_device_item,
            update_device_item,
            remove_device_item
        ))
        .routes(routes!(get_device_item))
        .routes(routes!(conflicts))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
        .routes(routes!(changes::read_changes))
        .routes(routes!(changes::list_webhooks, changes::create_webhook))
        .routes(routes!(changes::get_webhook, changes::delete_webhook))
}

pub(crate) fn router(state: ApiState) -> Router {
    let limit = state.config.max_request_bytes;
    let (router, _document) = routes().split_for_parts();
    router
        // After the routes: it applies to the routes added before it.
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Answers a path no route serves, in the API's error shape.
async fn no_route(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorKind::NoRoute,
        format!(
            "no route serves {}: the routes are listed in GET {}",
            uri.path(),
            openapi::DOCUMENT_PATH
        ),
    )
}

/// Answers a method a route does not take, in the API's error shape; axum adds the `Allow`
/// header with the methods it does take.
async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorKind::MethodNotAllowed,
        format!(
            "{method} is not served on {}: the Allow header lists the methods that are",
            uri.path()
        ),
    )
}

/// The stable code of an error, for programs (the `kind` of [`ErrorBody`]). New kinds may be
/// added; an existing one keeps its name and meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ErrorKind {
    /// A parameter or a field of the body breaks a rule (400).
    Invalid,
    /// The request could not be read: bad JSON, wrong content type, a malformed query string
    /// or path (400, 415, 422).
    BadRequest,
    /// No valid API key (401).
    Unauthorized,
    /// The key may not do that: another account or a lower scope (403).
    Forbidden,
    /// The model may not be written from the cloud (403).
    NotWritable,
    /// The item belongs to another owner than the one named (403).
    Ownership,
    /// No such device, model, item or key (404).
    NotFound,
    /// No route serves this path: see the OpenAPI document (404).
    NoRoute,
    /// The route does not take this method (405).
    MethodNotAllowed,
    /// The device or item exists already (409).
    Exists,
    /// The device is revoked (409).
    Revoked,
    /// The key is held by an item of another model (409).
    WrongModel,
    /// The body or the item is larger than allowed (413).
    TooLarge,
    /// The store failed (500).
    Store,
    /// The service is stopping (503).
    Stopping,
    /// The cloud's clock cannot stamp the write now (503).
    Clock,
    /// The API key is over its request rate: retry after `Retry-After` seconds (429).
    RateLimited,
    /// The device CA failed to load or to issue a certificate (500).
    Ca,
    /// The metrics exposition could not be made (500).
    Metrics,
    /// Retention removed changes after the reader's cursor: re-read the items, then read the
    /// changes from the head (410).
    CursorExpired,
    /// Too many readers of the change log wait: retry after `Retry-After` seconds (503).
    Busy,
    /// The account holds the most of these the service allows (webhooks): delete one first
    /// (409).
    LimitReached,
}

/// Every error answer of the API.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What failed and what to do, for people.
    error: String,
    /// What failed, for programs.
    kind: ErrorKind,
}

/// An API failure: a status code, a kind for programs, a sentence for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// `Retry-After`, in seconds (a 429).
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: message.into(),
                kind,
            },
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorKind::Invalid, message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }
    /// A request axum could not read (body, query string, path): its status, our shape.
    fn unreadable(status: StatusCode, message: String) -> ApiError {
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorKind::TooLarge
        } else {
            ErrorKind::BadRequest
        };
        ApiError::new(status, kind, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Who is calling, as its API key says.
#[derive(Clone, Debug)]
pub(crate) enum Caller {
    /// A valid, unrevoked key.
    Key {
        id: String,
        account: String,
        scope: KeyScope,
    },
    /// Anybody: the service runs with `insecure_no_auth`.
    Insecure,
}

/// What the 401 answers say when a key was presented but is not valid: one sentence for every
/// reason, so a guesser learns nothing about which part was wrong (the log says which).
const INVALID_KEY: &str = "the API key is not valid (unknown, wrong secret or revoked)";

impl ApiState {
    /// Counts and logs (rate-limited) a refused request, and builds its answer.
    fn refuse(&self, status: StatusCode, message: &str, why: &str) -> ApiError {
        let (counter, kind) = if status == StatusCode::UNAUTHORIZED {
            (&self.status.api_unauthorized, ErrorKind::Unauthorized)
        } else {
            (&self.status.api_forbidden, ErrorKind::Forbidden)
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hit = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hit(Instant::now());
        if let Some(quiet) = hit {
            tracing::warn!(
                status = status.as_u16(),
                "HTTP API request refused: {why} ({quiet} more refusals since the last warning; \
                 counted in /v1/status as api_unauthorized and api_forbidden)"
            );
        }
        ApiError::new(status, kind, message)
    }

    fn unauthorized(&self, message: &str, why: &str) -> ApiError {
        self.refuse(StatusCode::UNAUTHORIZED, message, why)
    }
}

impl axum::extract::FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &ApiState,
    ) -> Result<Self, ApiError> {
        if s.config.insecure_no_auth {
            return Ok(Caller::Insecure);
        }
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(s.unauthorized(
                "this request needs an API key: send Authorization: Bearer <key>",
                "no Authorization header",
            ));
        };
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .and_then(auth::parse_api_key);
        let Some((id, secret)) = presented else {
            return Err(s.unauthorized(
                "the Authorization header must be `Bearer dt_<id>_<secret>`",
                "a malformed Authorization header",
            ));
        };
        let lookup = id.to_string();
        let record = s.store.call(move |c| c.store.api_key(&lookup)).await??;
        let Some(record) = record else {
            return Err(s.unauthorized(INVALID_KEY, &format!("unknown key id {id}")));
        };
        // The secret is checked before the revocation, so only the key's holder learns (from
        // the log's owner) that it was revoked.
        if !auth::verify_secret(secret.as_bytes(), &record.secret_hash) {
            return Err(s.unauthorized(INVALID_KEY, &format!("wrong secret for key {id}")));
        }
        if record.revoked_ms.is_some() {
            return Err(s.unauthorized(INVALID_KEY, &format!("revoked key {id}")));
        }
        // The key is known to be its holder's: its request rate applies.
        if let Err(wait) = s.rate.check(&record.id) {
            let r = s.rate.refuse(&s.status, &record.id, wait);
            return Err(ApiError {
                retry_after: Some(r.retry_after),
                ..ApiError::new(r.status, ErrorKind::RateLimited, r.message)
            });
        }
        Ok(Caller::Key {
            id: record.id,
            account: record.account,
            scope: record.scope,
        })
    }
}

impl Caller {
    /// Whether the caller may act on `account` (`None`: on the service as a whole, which only
    /// an admin key may) with at least the scope `need`; 403 `forbidden` otherwise, the same
    /// answer whether or not the target exists.
    fn allow(&self, s: &ApiState, account: Option<&str>, need: KeyScope) -> ApiResult<()> {
        let Caller::Key {
            id,
            account: own,
            scope,
        } = self
        else {
            return Ok(());
        };
        let account_ok = account.is_none_or(|a| a == own);
        let scope_ok = *scope >= need;
        if account_ok && scope_ok {
            return Ok(());
        }
        let target = account.unwrap_or("the whole service");
        Err(s.refuse(
            StatusCode::FORBIDDEN,
            "this API key may not do that",
            &format!("key {id} ({scope} of {own}) asked for {need} on {target}"),
        ))
    }
}

impl From<StoreGone> for ApiError {
    fn from(e: StoreGone) -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Stopping,
            e.to_string(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::DeviceExists(_) => {
                ApiError::new(StatusCode::CONFLICT, ErrorKind::Exists, e.to_string())
            }
            StoreError::UnknownDevice(_) => ApiError::not_found(e.to_string()),
            StoreError::DeviceRevoked(_) => {
                ApiError::new(StatusCode::CONFLICT, ErrorKind::Revoked, e.to_string())
            }
            StoreError::BadQuery(_) => ApiError::bad(e.to_string()),
            StoreError::Database(_) | StoreError::Corrupt(_) => {
                tracing::error!("store failure behind the API: {e}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorKind::Store,
                    e.to_string(),
                )
            }
        }
    }
}

impl From<CloudWriteError<StoreError>> for ApiError {
    fn from(e: CloudWriteError<StoreError>) -> Self {
        let message = e.to_string();
        match e {
            CloudWriteError::UnknownModel(_) => ApiError::not_found(message),
            CloudWriteError::NotInCloud(_) | CloudWriteError::UpOnly(_) => {
                ApiError::new(StatusCode::FORBIDDEN, ErrorKind::NotWritable, message)
            }
            CloudWriteError::Ownership(_) => {
                ApiError::new(StatusCode::FORBIDDEN, ErrorKind::Ownership, message)
            }
            CloudWriteError::WrongOwner { .. } | CloudWriteError::Validation(_) => {
                ApiError::bad(message)
            }
            CloudWriteError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::TooLarge, message)
            }
            CloudWriteError::WrongModel { .. } => {
                ApiError::new(StatusCode::CONFLICT, ErrorKind::WrongModel, message)
            }
            CloudWriteError::KeyNotOfModel { .. } => ApiError::bad(message),
            CloudWriteError::Clock(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Clock, message)
            }
            CloudWriteError::Store(s) => s.into(),
        }
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let message = e.to_string();
        match e {
            OpError::UnknownModel(_) | OpError::NotFound(_) => ApiError::not_found(message),
            OpError::Invalid(_) | OpError::BadAccount(_) => ApiError::bad(message),
            OpError::Exists(_) => ApiError::new(StatusCode::CONFLICT, ErrorKind::Exists, message),
            OpError::Write(w) => w.into(),
            OpError::Store(s) => s.into(),
            OpError::Gone(g) => g.into(),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// `Json`, `Query` and `Path` whose rejections (bad JSON, wrong content type, a body too large,
/// a bad query string, a path that does not decode) answer in the API's error shape instead of
/// axum's plain text.
pub(crate) struct Body<T>(T);
pub(crate) struct Params<T>(T);
pub(crate) struct PathParams<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    /// As axum's `Json` (415 without a JSON content type, 400 for bad JSON, 422 for JSON of the
    /// wrong shape), except that the text is read with `parse_json_exact`: an integer past 64
    /// bits is refused (400) instead of being rounded to a float and stored changed.
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::trim)
            .is_some_and(|m| m.eq_ignore_ascii_case("application/json") || m.ends_with("+json"));
        if !json {
            return Err(ApiError::unreadable(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError::unreadable(r.status(), r.body_text()))?;
        let bad = |m: String| ApiError::unreadable(StatusCode::BAD_REQUEST, m);
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| bad(format!("the body is not UTF-8 text: {e}")))?;
        let value = devtables_schema::parse_json_exact(text).map_err(|e| match e {
            devtables_schema::ExactJsonError::Syntax(e) => {
                bad(format!("Failed to parse the request body as JSON: {e}"))
            }
            too_large => bad(too_large.to_string()),
        })?;
        T::deserialize(value).map(Body).map_err(|e| {
            ApiError::unreadable(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            )
        })
    }
}

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for Params<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Params(v)),
            Err(r) => Err(ApiError::unreadable(r.status(), r.body_text())),
        }
    }
}

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S>
    for PathParams<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(PathParams(v)),
            Err(r) => Err(ApiError::unreadable(r.status(), r.body_text())),
        }
    }
}

// ---- Paths and their parameters ----

/// `{account}` of a path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct AccountPath {
    /// The account (tenant).
    #[param(value_type = openapi::Name)]
    account: String,
}

/// `{account}/{device}` of a path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct DevicePath {
    /// The device's account.
    #[param(value_type = openapi::Name)]
    account: String,
    /// The device's name within its account.
    #[param(value_type = openapi::Name)]
    device: String,
}

/// `{account}`, `{device}` and `{model}` of an item path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct DeviceModelPath {
    /// The device's account.
    #[param(value_type = openapi::Name)]
    account: String,
    /// The device's name within its account.
    #[param(value_type = openapi::Name)]
    device: String,
    /// A model of the service's schema (404 for another name).
    model: String,
}

/// `{account}` and `{model}` of an account-wide item path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct AccountModelPath {
    /// The account (tenant).
    #[param(value_type = openapi::Name)]
    account: String,
    /// A model of the service's schema (404 for another name).
    model: String,
}

/// `{account}/keys/{id}` of a path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct KeyPath {
    /// The key's account.
    #[param(value_type = openapi::Name)]
    account: String,
    /// The key's id: the 16 hex digits after `dt_` in the key.
    #[param(pattern = "^[0-9a-f]{16}$")]
    id: String,
}

fn device_id(account: &str, device: &str) -> ApiResult<DeviceId> {
    DeviceId::new(account, device).map_err(|e| ApiError::bad(e.to_string()))
}

/// Refuses an account name that breaks the naming rule (400), as the document's pattern says.
/// With a key, `Caller::allow` has already confined the request to the key's own (valid)
/// account; this matters with `insecure_no_auth`.
fn check_account(account: &str) -> ApiResult<()> {
    // The rule of device ids, with a placeholder device.
    device_id(account, "x").map(drop)
}

fn account_owner(account: &str) -> ApiResult<Owner> {
    check_account(account)?;
    Ok(Owner::Account(account.to_string()))
}

/// Reads an optional count of a query string (`limit`, `before`) in the range the document
/// gives it: 0 to `i64::MAX`, the `int64` format's non-negative half (what JSON tools and
/// SQLite take), refusing what is outside (400) rather than taking what is documented invalid.
fn int64_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value = Option::<u64>::deserialize(d)?;
    match value {
        Some(v) if i64::try_from(v).is_err() => Err(serde::de::Error::custom(format!(
            "{v} is too large: at most {}",
            i64::MAX
        ))),
        _ => Ok(value),
    }
}

/// The size of a page: `limit` if given (default 100), at most the service's `max_page_items`:
/// a larger page than the service serves is not an error, just capped. `limit=0` is refused, as
/// `devtables db find --limit 0` is: a page of nothing is never what a caller meant.
fn page_size(limit: Option<u64>, max_page_items: usize) -> Result<usize, ApiError> {
    match limit {
        Some(0) => Err(ApiError::bad(
            "limit must be at least 1 (leave it out for the default page of 100)",
        )),
        l => Ok(l
            .map_or(100, |l| usize::try_from(l).unwrap_or(usize::MAX))
            .min(max_page_items)),
    }
}

/// A fixed remark of an answer that holds a secret.
const SHOWN_ONCE: &str = "the secret is shown only now; store it on the device";

// ---- Health ----

/// The answer of `GET /health`.
#[derive(Serialize, ToSchema)]
struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses((status = 200, body = Health, description = "The process serves HTTP")),
)]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The answer of `GET /ready`.
#[derive(Serialize, ToSchema)]
struct Readiness {
    ready: bool,
    /// The store answered within 2 s.
    store: bool,
    /// Both of the service's MQTT connections (ingress and egress) are up.
    broker: bool,
    /// The device topics are subscribed (SUBACK granted).
    subscribed: bool,
    /// The first thing missing, when not ready.
    reason: Option<String>,
}

/// How long readiness waits for the store to answer.
const READY_STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness: the store answers, the broker is connected and the device topics are subscribed.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "health",
    responses(
        (status = 200, body = Readiness, description = "Ready to serve devices"),
        (status = 503, body = Readiness, description = "Not ready yet; `reason` says what is missing"),
    ),
)]
async fn ready(State(s): State<ApiState>) -> (StatusCode, Json<Readiness>) {
    let store_ok = matches!(
        tokio::time::timeout(READY_STORE_TIMEOUT, s.store.call(|_| ())).await,
        Ok(Ok(()))
    );
    let status = s.status.snapshot(s.config.mqtt.request_queue);
    // The first thing missing, in the order they come up.
    let reason = if !store_ok {
        Some("the store does not answer".to_string())
    } else if !status.broker_connected {
        Some(format!(
            "not connected to the MQTT broker ({} of the reading connections up)",
            status.ingress_clients_up
        ))
    } else if !status.egress_connected {
        Some(format!(
            "not every connection that publishes to devices is up ({} up)",
            status.egress_clients_up
        ))
    } else if !status.subscribed {
        Some(format!(
            "the device topics are not subscribed yet ({} attempts so far)",
            status.subscribe_attempts
        ))
    } else {
        None
    };
    let code = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready: reason.is_none(),
        store: store_ok,
        broker: status.broker_connected && status.egress_connected,
        subscribed: status.subscribed,
        reason,
    };
    (code, Json(body))
}

/// The answer of `GET /v1/status`: the sync loop's numbers, and the embedded broker's refusals
/// (absent with an external broker).
#[derive(Serialize, ToSchema)]
pub(crate) struct ServiceStatus {
    #[serde(flatten)]
    sync: StatusSnapshot,
    /// CONNECTs of revoked devices the embedded broker refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_refused_revoked: Option<u64>,
    /// CONNECTs refused because the device registry could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_registry_failures: Option<u64>,
    /// Live sessions closed because their device was found revoked by another process.
    #[serde(skip_serializing_if = "Option::is_none")]
    mqtt_revoked_sessions_closed: Option<u64>,
}

/// The service's own queues, counters and drops (an admin key of any account).
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "health",
    security(("api_key" = [])),
    responses((status = 200, body = ServiceStatus, description = "The numbers now"), KeyedErrors),
)]
async fn status(caller: Caller, State(s): State<ApiState>) -> ApiResult<Json<ServiceStatus>> {
    caller.allow(&s, None, KeyScope::Admin)?;
    Ok(Json(ServiceStatus::now(&s)))
}

impl ServiceStatus {
    /// The numbers now: what `/v1/status` answers and `/metrics` renders.
    fn now(s: &ApiState) -> ServiceStatus {
        let sync = s.status.snapshot(s.config.mqtt.request_queue);
        let refusals = s.broker.credentials.as_ref().map(|creds| {
            let (revoked, registry_failures) = creds.refusals();
            (revoked, registry_failures, creds.swept())
        });
        ServiceStatus {
            sync,
            mqtt_refused_revoked: refusals.map(|r| r.0),
            mqtt_registry_failures: refusals.map(|r| r.1),
            mqtt_revoked_sessions_closed: refusals.map(|r| r.2),
        }
    }

    /// A status with every part present (the embedded broker's too), for the tests that tie
    /// the metrics to the status fields.
    #[cfg(test)]
    pub(crate) fn example(sync: StatusSnapshot) -> ServiceStatus {
        ServiceStatus {
            sync,
            mqtt_refused_revoked: Some(0),
            mqtt_registry_failures: Some(0),
            mqtt_revoked_sessions_closed: Some(0),
        }
    }
}

/// Who may scrape `/metrics`: an admin key, as for `/v1/status`, or anybody when the service
/// runs with `metrics_open` (a scraper on a private network; warned at start).
pub(crate) struct MetricsReader;

impl axum::extract::FromRequestParts<ApiState> for MetricsReader {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &ApiState,
    ) -> Result<Self, ApiError> {
        if !s.config.metrics_open {
            Caller::from_request_parts(parts, s)
                .await?
                .allow(s, None, KeyScope::Admin)?;
        }
        Ok(MetricsReader)
    }
}

/// The service's numbers in the Prometheus (OpenMetrics) text format: every `/v1/status` field
/// as `devtables_<field>` (counters with `_total`), and the store job latency histogram
/// `devtables_store_job_seconds` (an admin key of any account, or none with `metrics_open`).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    security(("api_key" = [])),
    responses(
        (status = 200, body = String, content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8",
         description = "The exposition; the metric names are listed in docs/api.md"),
        (status = 500, body = ErrorBody, description = "The exposition could not be made"),
        KeyedErrors
    ),
)]
async fn metrics(_reader: MetricsReader, State(s): State<ApiState>) -> ApiResult<Response> {
    let status = serde_json::to_value(ServiceStatus::now(&s)).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Metrics,
            format!("cannot read the status for the metrics: {e}"),
        )
    })?;
    let text = crate::metrics::render(&status, &s.status.store_job_latency).map_err(|e| {
        tracing::error!("{e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Metrics,
            e.to_string(),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

// ---- Devices ----

/// The body of `POST /v1/devices`.
#[derive(Deserialize, ToSchema)]
struct Register {
    #[schema(value_type = openapi::Name)]
    account: String,
    #[schema(value_type = openapi::Name)]
    device: String,
    /// Also issue a client certificate for the device-certificate listener.
    #[serde(default)]
    certificate: bool,
}

/// How a registered device reaches the broker.
#[derive(Serialize, ToSchema)]
struct MqttAccess {
    /// The broker's address as the service sees it (`host:port`).
    address: String,
    client_id: String,
    username: String,
    topics: DeviceTopics,
}

/// The MQTT topics of one device.
#[derive(Serialize, ToSchema)]
struct DeviceTopics {
    /// Where the device publishes.
    up: String,
    /// Where the cloud publishes to the device.
    down: String,
    /// Where the cloud publishes to every device of the account.
    broadcast: String,
}

/// The answer of a registration: the device's secret, shown once, and how it connects.
#[derive(Serialize, ToSchema)]
struct Registered {
    account: String,
    device: String,
    /// The device's MQTT password; only its hash is stored.
    secret: String,
    mqtt: MqttAccess,
    /// Present when the registration asked for a client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    certificate: Option<IssuedCertificate>,
    note: &'static str,
}

/// A device's client certificate for the device-certificate listener, shown once.
#[derive(Serialize, ToSchema)]
struct IssuedCertificate {
    /// The certificate, PEM; its CN is `{account}/{device}`.
    cert: String,
    /// Its private key, PEM; not kept by the cloud.
    key: String,
    /// The device CA's certificate, PEM.
    ca: String,
    /// When the certificate expires, in ms since the Unix epoch.
    not_after_ms: u64,
    /// The device-certificate listener's address.
    mqtt_address: String,
}

/// Register a device (admin). The answer holds its secret, once.
#[utoipa::path(
    post,
    path = "/v1/devices",
    tag = "devices",
    request_body = Register,
    security(("api_key" = [])),
    responses(
        (status = 201, body = Registered, description = "Registered"),
        Invalid, Conflict, BodyErrors, KeyedErrors,
    ),
)]
async fn register_device(
    caller: Caller,
    State(s): State<ApiState>,
    Body(body): Body<Register>,
) -> ApiResult<(StatusCode, Json<Registered>)> {
    caller.allow(&s, Some(&body.account), KeyScope::Admin)?;
    let id = device_id(&body.account, &body.device)?;
    // The CA is loaded before registering, so a cloud that cannot issue registers nothing.
    let issuer = match (body.certificate, &s.config.device_certificates) {
        (false, _) => None,
        (true, None) => {
            return Err(ApiError::bad(
                "this cloud issues no device certificates: configure device_certificates",
            ))
        }
        (true, Some(certs)) => {
            let ca = crate::ca::DeviceCa::open_or_create_blocking(s.config.data_dir.clone())
                .await
                .map_err(|e| {
                    tracing::error!("cannot load the device CA: {e}");
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        ErrorKind::Ca,
                        e.to_string(),
                    )
                })?;
            Some((ca, certs))
        }
    };
    let secret = ops::register_device(&s.store, s.broker.credentials.as_ref(), &id).await?;
    let certificate = match issuer {
        None => None,
        Some((ca, certs)) => {
            let issued = crate::ca::validity_days(u64::from(certs.validity_days))
                .and_then(|validity| ca.issue(&id, &auth::hash_secret(&secret), validity))
                .map_err(|e| {
                    tracing::error!(device = %id, "registered, but cannot issue its certificate: {e}");
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Ca, format!(
                        "device {id} is registered, but its certificate could not be issued \
                         (issue one with `devtables devices cert`): {e}"
                    ))
                })?;
            Some(IssuedCertificate {
                cert: issued.cert_pem,
                key: issued.key_pem,
                ca: issued.ca_pem,
                not_after_ms: issued.not_after_ms,
                mqtt_address: certs.listen.to_string(),
            })
        }
    };
    let prefix = &s.config.topic_prefix;
    let mqtt = MqttAccess {
        address: s.mqtt_addr.clone(),
        client_id: id.node_name(),
        username: id.node_name(),
        topics: DeviceTopics {
            up: topics::up_topic(prefix, &id),
            down: topics::down_topic(prefix, &id),
            broadcast: topics::broadcast_topic(prefix, &id.account),
        },
    };
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            account: id.account,
            device: id.device,
            secret,
            mqtt,
            certificate,
            note: SHOWN_ONCE,
        }),
    ))
}

/// The query of `GET /v1/devices`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeviceListQuery {
    /// Only this account's devices; a key sees its own account's only, which is the default.
    #[param(value_type = Option<openapi::Name>)]
    account: Option<String>,
    /// `account/device` of the last device of the previous page (its `next`).
    #[param(pattern = "^[A-Za-z0-9_.-]{1,64}/[A-Za-z0-9_.-]{1,64}$")]
    after: Option<String>,
    /// Most devices in the page (default 100, at most the service's `max_page_items`).
    #[param(minimum = 1, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    limit: Option<u64>,
}

/// A device and its sync status, with its lag (`feed_head - cursor_acked`) and whether it is
/// revoked.
#[derive(Serialize, ToSchema)]
struct DeviceView {
    #[serde(flatten)]
    record: DeviceRecord,
    /// Feed entries the device has not acknowledged yet.
    cursor_lag: u64,
    /// The device is revoked: it may not connect, and its pushes are refused. Its record, items
    /// and feed stay; a new secret (`POST .../secret`) reinstates it.
    revoked: bool,
}

impl From<DeviceRecord> for DeviceView {
    fn from(record: DeviceRecord) -> Self {
        DeviceView {
            cursor_lag: record.feed_head.saturating_sub(record.cursor_acked),
            revoked: record.secret_hash == REVOKED_SECRET_HASH,
            record,
        }
    }
}

/// A page of devices.
#[derive(Serialize, ToSchema)]
struct DevicePage {
    devices: Vec<DeviceView>,
    /// The `after` of the next page; `null` on the last one.
    next: Option<String>,
}

/// List devices with their sync status, ordered by account and name.
#[utoipa::path(
    get,
    path = "/v1/devices",
    tag = "devices",
    params(DeviceListQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, body = DevicePage, description = "A page of devices"),
        Invalid, KeyedErrors,
    ),
)]
async fn list_devices(
    caller: Caller,
    State(s): State<ApiState>,
    Params(mut q): Params<DeviceListQuery>,
) -> ApiResult<Json<DevicePage>> {
    // A key sees its own account's devices only, whatever the query asks.
    if let Caller::Key { account, .. } = &caller {
        let asked = q.account.take().unwrap_or_else(|| account.clone());
        caller.allow(&s, Some(&asked), KeyScope::Read)?;
        q.account = Some(asked);
    }
    if let Some(account) = &q.account {
        check_account(account)?;
    }
    let after = match &q.after {
        Some(a) => {
            let (acct, dev) = a
                .split_once('/')
                .ok_or_else(|| ApiError::bad("after must be account/device"))?;
            Some(device_id(acct, dev)?)
        }
        None => None,
    };
    let limit = page_size(q.limit, s.config.max_page_items)?;
    let account = q.account.clone();
    let devices = s
        .store
        .call(move |c| c.store.devices(account.as_deref(), after.as_ref(), limit))
        .await??;
    let next = (devices.len() == limit)
        .then(|| {
            devices
                .last()
                .map(|d| format!("{}/{}", d.account, d.device))
        })
        .flatten();
    let devices = devices.into_iter().map(DeviceView::from).collect();
    Ok(Json(DevicePage { devices, next }))
}

/// One device: online, last seen, cursor lag, pending, last error.
#[utoipa::path(
    get,
    path = "/v1/devices/{account}/{device}",
    tag = "devices",
    params(DevicePath),
    security(("api_key" = [])),
    responses(
        (status = 200, body = DeviceView, description = "The device"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
async fn get_device(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DevicePath>,
) -> ApiResult<Json<DeviceView>> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    let id = device_id(&p.account, &p.device)?;
    let who = id.clone();
    match s.store.call(move |c| c.store.device(&who)).await?? {
        Some(record) => Ok(Json(record.into())),
        None => Err(ApiError::not_found(format!(
            "device {id} is not registered"
        ))),
    }
}

/// The query of a device revocation.
#[derive(Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
struct RevokeQuery {
    /// Also delete the device's items and feed (default false).
    #[serde(default)]
    delete_items: bool,
}

/// The answer of a device revocation.
#[derive(Serialize, ToSchema)]
struct DeviceRevoked {
    account: String,
    device: String,
    /// Always true.
    revoked: bool,
    items_deleted: bool,
}

/// Revoke a device (admin): its MQTT session is closed at once and it may not connect again;
/// its items stay unless `delete_items=true`.
#[utoipa::path(
    delete,
    path = "/v1/devices/{account}/{device}",
    tag = "devices",
    params(DevicePath, RevokeQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, body = DeviceRevoked, description = "Revoked"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
async fn revoke_device(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DevicePath>,
    Params(q): Params<RevokeQuery>,
) -> ApiResult<Json<DeviceRevoked>> {
    caller.allow(&s, Some(&p.account), KeyScope::Admin)?;
    let id = device_id(&p.account, &p.device)?;
    ops::revoke_device(&s.store, &s.broker, &id, q.delete_items).await?;
    Ok(Json(DeviceRevoked {
        account: id.account,
        device: id.device,
        revoked: true,
        items_deleted: q.delete_items,
    }))
}

/// The answer of a secret rotation: the new secret, shown once.
#[derive(Serialize, ToSchema)]
struct NewSecret {
    account: String,
    device: String,
    secret: String,
    note: &'static str,
}

/// Give a device a new secret (admin), shown once. The old one stops working and its session
/// is closed; data and cursor stay; a revoked device becomes usable again.
#[utoipa::path(
    post,
    path = "/v1/devices/{account}/{device}/secret",
    tag = "devices",
    params(DevicePath),
    security(("api_key" = [])),
    responses(
        (status = 200, body = NewSecret, description = "The new secret"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
async fn rotate_secret(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DevicePath>,
) -> ApiResult<Json<NewSecret>> {
    caller.allow(&s, Some(&p.account), KeyScope::Admin)?;
    let id = device_id(&p.account, &p.device)?;
    let secret = ops::rotate_secret(&s.store, &s.broker, &id).await?;
    Ok(Json(NewSecret {
        account: id.account,
        device: id.device,
        secret,
        note: SHOWN_ONCE,
    }))
}

// ---- Items ----

/// The query of `GET /v1/accounts/{account}/items/{model}`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AccountItemsQuery {
    /// Only this device's items (default: every device's, and the account-wide ones).
    #[param(value_type = Option<openapi::Name>)]
    device: Option<String>,
    /// Only items whose partition key equals this.
    pk: Option<String>,
    /// Only items whose sort key begins with this.
    sk_prefix: Option<String>,
    /// A JSON object of top-level field: value equality filters, values being strings,
    /// numbers, booleans or null (null also matches an absent field), e.g. `{"severity":"warn"}`.
    #[serde(rename = "where")]
    filter: Option<String>,
    /// Most items in the page (default 100, at most the service's `max_page_items`).
    #[param(minimum = 1, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    limit: Option<u64>,
    /// The `next` token of the previous page.
    next: Option<String>,
}

/// The query of `GET /v1/accounts/{account}/devices/{device}/items/{model}`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeviceItemsQuery {
    /// Only items whose partition key equals this.
    pk: Option<String>,
    /// Only items whose sort key begins with this.
    sk_prefix: Option<String>,
    /// A JSON object of top-level field: value equality filters, values being strings,
    /// numbers, booleans or null (null also matches an absent field), e.g. `{"severity":"warn"}`.
    #[serde(rename = "where")]
    filter: Option<String>,
    /// Most items in the page (default 100, at most the service's `max_page_items`).
    #[param(minimum = 1, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    limit: Option<u64>,
    /// The `next` token of the previous page.
    next: Option<String>,
}

impl DeviceItemsQuery {
    fn for_device(self, device: String) -> AccountItemsQuery {
        AccountItemsQuery {
            device: Some(device),
            pk: self.pk,
            sk_prefix: self.sk_prefix,
            filter: self.filter,
            limit: self.limit,
            next: self.next,
        }
    }
}

async fn run_query(
    s: &ApiState,
    account: String,
    model: String,
    q: AccountItemsQuery,
) -> ApiResult<Json<ItemPage>> {
    if s.schema.model(&model).is_none() {
        return Err(ApiError::not_found(format!("unknown model {model}")));
    }
    let filters = match &q.filter {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(m)) => m.into_iter().collect(),
            _ => return Err(ApiError::bad("where must be a JSON object of field: value")),
        },
        None => Vec::new(),
    };
    let query = ItemQuery {
        account,
        model,
        device: q.device,
        pk: q.pk,
        sk_prefix: q.sk_prefix,
        filters,
        limit: page_size(q.limit, s.config.max_page_items)?,
        next: q.next,
    };
    let page = s.store.call(move |c| c.store.query_items(&query)).await??;
    Ok(Json(page))
}

/// Query an account's items of one model, across its devices (or one) and its account-wide
/// items, ordered by device, pk and sk.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/items/{model}",
    tag = "items",
    params(AccountModelPath, AccountItemsQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, body = ItemPage, description = "A page of items"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
async fn query_account_items(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountModelPath>,
    Params(q): Params<AccountItemsQuery>,
) -> ApiResult<Json<ItemPage>> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    check_account(&p.account)?;
    if let Some(device) = &q.device {
        device_id(&p.account, device)?;
    }
    run_query(&s, p.account, p.model, q).await
}

/// Query one device's items of one model, ordered by pk and sk.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/devices/{device}/items/{model}",
    tag = "items",
    params(DeviceModelPath, DeviceItemsQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, body = ItemPage, description = "A page of items"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
async fn query_device_items(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DeviceModelPath>,
    Params(q): Params<DeviceItemsQuery>,
) -> ApiResult<Json<ItemPage>> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    device_id(&p.account, &p.device)?;
    run_query(&s, p.account, p.model, q.for_device(p.device)).await
}

/// The query of `GET .../items/{model}/key`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct KeyQuery {
    /// The item's partition key (default empty).
    #[serde(default)]
    pk: String,
    /// The item's sort key (default empty).
    #[serde(default)]
    sk: String,
}

/// One live item of a device, by its key.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/devices/{device}/items/{model}/key",
    tag = "items",
    params(DeviceModelPath, KeyQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, body = StoredItem, description = "The item"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
async fn get_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DeviceModelPath>,
    Params(k): Params<KeyQuery>,
) -> ApiResult<Json<StoredItem>> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    let owner = Owner::Device(device_id(&p.account, &p.device)?);
    let key = ItemKey { pk: k.pk, sk: k.sk };
    let m = p.model.clone();
    match s
        .store
        .call(move |c| c.store.get_item(&owner, &m, &key))
        .await??
    {
        Some(item) if item.item.is_some() => Ok(Json(item)),
        _ => Err(ApiError::not_found(format!("no such {} item", p.model))),
    }
}

/// The key of a written item.
#[derive(Serialize, ToSchema)]
struct WrittenKey {
    pk: String,
    sk: String,
}

/// The answer of an item write.
#[derive(Serialize, ToSchema)]
struct Written {
    /// The item as stored (hidden fields left out); `null` after a removal.
    #[schema(value_type = Option<Object>)]
    item: Option<Item>,
    /// The version the cloud stamped (its HLC, as text).
    #[schema(pattern = "^[0-9a-f]{12}-[0-9a-f]{8}-[0-9a-f]{16}$")]
    version: String,
    key: WrittenKey,
}

async fn write_item(
    s: &ApiState,
    owner: Owner,
    model: String,
    input: Item,
    kind: WriteKind,
) -> ApiResult<(StatusCode, Json<Written>)> {
    let max = s.config.sync.wire.max_message_bytes;
    let change = ops::write_item(&s.store, &s.sync, max, owner, &model, input, kind).await?;
    let status = match kind {
        WriteKind::Create => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let item = match (&change.item, s.schema.model(&model)) {
        (Some(item), Some(m)) => Some(m.project(item, false)),
        _ => None,
    };
    Ok((
        status,
        Json(Written {
            item,
            version: devtables_sync::wire::hlc_to_string(change.version),
            key: WrittenKey {
                pk: change.key.pk,
                sk: change.key.sk,
            },
        }),
    ))
}

/// Item bodies are JSON objects whose fields the service's schema defines for the model; the
/// document cannot list them, the service validates them (400 `invalid`).
fn object(body: serde_json::Value) -> ApiResult<Item> {
    match body {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad("the body must be a JSON object")),
    }
}

/// Create an item of a device (replicates down to it if the model syncs down).
#[utoipa::path(
    post,
    path = "/v1/accounts/{account}/devices/{device}/items/{model}",
    tag = "items",
    params(DeviceModelPath),
    request_body(content = Object, description = "The item's fields, as the model defines them"),
    security(("api_key" = [])),
    responses(
        (status = 201, body = Written, description = "Created"),
        Invalid, NotFound, Conflict, BodyErrors, KeyedErrors,
    ),
)]
async fn create_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DeviceModelPath>,
    Body(body): Body<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Written>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Write)?;
    let owner = Owner::Device(device_id(&p.account, &p.device)?);
    write_item(&s, owner, p.model, object(body)?, WriteKind::Create).await
}

/// Change the given fields of an item of a device.
#[utoipa::path(
    patch,
    path = "/v1/accounts/{account}/devices/{device}/items/{model}",
    tag = "items",
    params(DeviceModelPath),
    request_body(content = Object, description = "The item's key fields and the fields to change"),
    security(("api_key" = [])),
    responses(
        (status = 200, body = Written, description = "Updated"),
        Invalid, NotFound, Conflict, BodyErrors, KeyedErrors,
    ),
)]
async fn update_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DeviceModelPath>,
    Body(body): Body<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Written>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Write)?;
    let owner = Owner::Device(device_id(&p.account, &p.device)?);
    write_item(&s, owner, p.model, object(body)?, WriteKind::Update).await
}

/// Remove an item of a device.
#[utoipa::path(
    delete,
    path = "/v1/accounts/{account}/devices/{device}/items/{model}",
    tag = "items",
    params(DeviceModelPath),
    request_body(content = Object, description = "The item's key fields"),
    security(("api_key" = [])),
    responses(
        (status = 200, body = Written, description = "Removed (`item` is null)"),
        Invalid, NotFound, Conflict, BodyErrors, KeyedErrors,
    ),
)]
async fn remove_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<DeviceModelPath>,
    Body(body): Body<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Written>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Write)?;
    let owner = Owner::Device(device_id(&p.account, &p.device)?);
    write_item(&s, owner, p.model, object(body)?, WriteKind::Remove).await
}

/// Create an account-wide (broadcast) item, delivered to every device of the account.
#[utoipa::path(
    post,
    path = "/v1/accounts/{account}/items/{model}",
    tag = "items",
    params(AccountModelPath),
    request_body(content = Object, description = "The item's fields, as the model defines them"),
    security(("api_key" = [])),
    responses(
        (status = 201, body = Written, description = "Created"),
        Invalid, NotFound, Conflict, BodyErrors, KeyedErrors,
    ),
)]
async fn create_broadcast(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountModelPath>,
    Body(body): Body<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Written>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Write)?;
    let owner = account_owner(&p.account)?;
    write_item(&s, owner, p.model, object(body)?, WriteKind::Create).await
}

/// Change the given fields of an account-wide (broadcast) item.
#[utoipa::path(
    patch,
    path = "/v1/accounts/{account}/items/{model}",
    tag = "items",
    params(AccountModelPath),
    request_body(content = Object, description = "The item's key fields and the fields to change"),
    security(("api_key" = [])),
    responses(
        (status = 200, body = Written, description = "Updated"),
        Invalid, NotFound, Conflict, BodyErrors, KeyedErrors,
    ),
)]
async fn update_broadcast(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountModelPath>,
    Body(body): Body<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Written>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Write)?;
    let owner = account_owner(&p.account)?;
    write_item(&s, owner, p.model, object(body)?, WriteKind::Update).await
}

/// Remove an account-wide (broadcast) item.
#[utoipa::path(
    delete,
    path = "/v1/accounts/{account}/items/{model}",
    tag = "items",
    params(AccountModelPath),
    request_body(content = Object, description = "The item's key fields"),
    security(("api_key" = [])),
    responses(
        (status = 200, body = Written, description = "Removed (`item` is null)"),
        Invalid, NotFound, Conflict, BodyErrors, KeyedErrors,
    ),
)]
async fn remove_broadcast(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountModelPath>,
    Body(body): Body<serde_json::Value>,
) -> ApiResult<(StatusCode, Json<Written>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Write)?;
    let owner = account_owner(&p.account)?;
    write_item(&s, owner, p.model, object(body)?, WriteKind::Remove).await
}

// ---- Conflicts ----

/// The query of `GET /v1/accounts/{account}/conflicts`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ConflictQuery {
    /// Only conflicts with an id below this (the last id of the previous page).
    #[param(maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    before: Option<u64>,
    /// Most conflicts in the page (default 100, at most the service's `max_page_items`).
    #[param(minimum = 1, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    limit: Option<u64>,
}

/// A page of the conflict log.
#[derive(Serialize, ToSchema)]
struct ConflictPage {
    conflicts: Vec<ConflictRecord>,
}

/// The account's conflict log, newest first: which write lost to which, and the losing item.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/conflicts",
    tag = "items",
    params(AccountPath, ConflictQuery),
    security(("api_key" = [])),
    responses(
        (status = 200, body = ConflictPage, description = "A page of conflicts"),
        Invalid, KeyedErrors,
    ),
)]
async fn conflicts(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountPath>,
    Params(q): Params<ConflictQuery>,
) -> ApiResult<Json<ConflictPage>> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    check_account(&p.account)?;
    let limit = page_size(q.limit, s.config.max_page_items)?;
    let account = p.account;
    let conflicts = s
        .store
        .call(move |c| c.store.conflicts(&account, q.before, limit))
        .await??;
    Ok(Json(ConflictPage { conflicts }))
}

// ---- API keys ----

/// The body of `POST /v1/accounts/{account}/keys`.
#[derive(Deserialize, ToSchema)]
struct NewKey {
    scope: KeyScope,
}

/// The answer of a key creation: the key, shown once.
#[derive(Serialize, ToSchema)]
struct CreatedKey {
    id: String,
    account: String,
    scope: KeyScope,
    /// The full key, `dt_<id>_<secret>`, to send as `Authorization: Bearer <key>`; only the
    /// hash of its secret is stored.
    key: String,
    created_ms: u64,
    note: &'static str,
}

/// Create an API key of the account (admin). The answer holds the key, once.
#[utoipa::path(
    post,
    path = "/v1/accounts/{account}/keys",
    tag = "keys",
    params(AccountPath),
    request_body = NewKey,
    security(("api_key" = [])),
    responses(
        (status = 201, body = CreatedKey, description = "Created"),
        Invalid, BodyErrors, KeyedErrors,
    ),
)]
async fn create_key(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountPath>,
    Body(body): Body<NewKey>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Admin)?;
    let new = ops::create_api_key(&s.store, &p.account, body.scope).await?;
    tracing::info!(id = %new.id, account = %new.account, scope = %new.scope, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            id: new.id,
            account: new.account,
            scope: new.scope,
            key: new.key,
            created_ms: new.created_ms,
            note: "the key is shown only now; send it as Authorization: Bearer <key>",
        }),
    ))
}

/// The account's API keys.
#[derive(Serialize, ToSchema)]
struct KeyList {
    keys: Vec<ApiKeyRecord>,
}

/// The account's API keys: ids, scopes, times; never a secret (admin).
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/keys",
    tag = "keys",
    params(AccountPath),
    security(("api_key" = [])),
    responses(
        (status = 200, body = KeyList, description = "The keys"),
        Invalid, KeyedErrors,
    ),
)]
async fn list_keys(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountPath>,
) -> ApiResult<Json<KeyList>> {
    caller.allow(&s, Some(&p.account), KeyScope::Admin)?;
    check_account(&p.account)?;
    let account = p.account;
    let keys = s.store.call(move |c| c.store.api_keys(&account)).await??;
    Ok(Json(KeyList { keys }))
}

/// The answer of a key revocation.
#[derive(Serialize, ToSchema)]
struct KeyRevoked {
    id: String,
    account: String,
    /// Always true.
    revoked: bool,
}

/// Revoke an API key of the account (admin); it is refused from then on.
#[utoipa::path(
    delete,
    path = "/v1/accounts/{account}/keys/{id}",
    tag = "keys",
    params(KeyPath),
    security(("api_key" = [])),
    responses(
        (status = 200, body = KeyRevoked, description = "Revoked"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
async fn revoke_key(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<KeyPath>,
) -> ApiResult<Json<KeyRevoked>> {
    caller.allow(&s, Some(&p.account), KeyScope::Admin)?;
    check_account(&p.account)?;
    let KeyPath { account, id } = p;
    let (acct, key) = (account.clone(), id.clone());
    let revoked = s
        .store
        .call(move |c| c.store.revoke_api_key(&acct, &key, wall_ms()))
        .await??;
    if !revoked {
        return Err(ApiError::not_found(format!(
            "account {account} has no API key {id}"
        )));
    }
    tracing::info!(%id, %account, "API key revoked");
    Ok(Json(KeyRevoked {
        id,
        account,
        revoked: true,
    }))
}
