//! The HTTP API (JSON): devices, items, conflicts, health.
//!
//! | Method and path | What |
//! |---|---|
//! | `GET /health` | liveness: the process serves HTTP |
//! | `GET /ready` | readiness: 200 once the store answers, the broker is connected and the device topics are subscribed (SUBACK granted); else 503 with the reason |
//! | `GET /v1/status` | the sync loop's counters: subscriptions, sessions, prompts pending, publishes queued, dropped and lost, request queue use, store jobs and errors |
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
//!
//! Every error is `{"error": "<sentence>", "kind": "<kind>"}` with a fitting status code.
//!
//! # API keys
//!
//! Every route but `/health` and `/ready` needs `Authorization: Bearer dt_<id>_<secret>` (see
//! [`crate::auth`]). A key belongs to one account and has a scope: `read` may only GET, `write`
//! may also write items, `admin` may also register devices, manage the account's keys and read
//! `/v1/status` (service-wide numbers). A missing, malformed, unknown, wrong or revoked key is
//! answered 401 `unauthorized`; a valid key asking for another account or beyond its scope is
//! answered 403 `forbidden`, before anything is looked up, so the answer never tells whether the
//! target exists. Every refusal is counted (`api_unauthorized`, `api_forbidden` in
//! `/v1/status`) and logged at warn (rate-limited). The `insecure_no_auth` setting turns all of
//! this off. Each key has a request rate (`api_rate`, default 100 a second, burst 200): a request
//! over it is answered 429 `rate_limited` with `Retry-After` and counted (`api_rate_limited`);
//! see [`crate::rate_limit`]. The [`Caller`] extractor authenticates; each handler states what it needs of it
//! ([`Caller::allow`]), so a handler without a `Caller` argument would be open: the tests try
//! every route without a key.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::CloudWriteError;
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::topics;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::auth;
use crate::config::CloudConfig;
use crate::ops::{self, OpError, WriteKind};
use crate::status::{SyncStatus, WarnLimiter};
use crate::store::{ItemQuery, KeyScope, StoreError};
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
}

pub(crate) fn router(state: ApiState) -> Router {
    let limit = state.config.max_request_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/v1/status", get(status))
        .route("/v1/devices", get(list_devices).post(register_device))
        .route(
            "/v1/devices/{account}/{device}",
            get(get_device).delete(revoke_device),
        )
        .route(
            "/v1/devices/{account}/{device}/secret",
            axum::routing::post(rotate_secret),
        )
        .route(
            "/v1/accounts/{account}/items/{model}",
            get(query_account_items)
                .post(create_broadcast)
                .patch(update_broadcast)
                .delete(remove_broadcast),
        )
        .route(
            "/v1/accounts/{account}/devices/{device}/items/{model}",
            get(query_device_items)
                .post(create_device_item)
                .patch(update_device_item)
                .delete(remove_device_item),
        )
        .route(
            "/v1/accounts/{account}/devices/{device}/items/{model}/key",
            get(get_device_item),
        )
        .route("/v1/accounts/{account}/conflicts", get(conflicts))
        .route(
            "/v1/accounts/{account}/keys",
            get(list_keys).post(create_key),
        )
        .route("/v1/accounts/{account}/keys/{id}", delete(revoke_key))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// An API failure: a status code, a kind for programs, a sentence for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// `Retry-After`, in seconds (a 429).
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }
    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.message, "kind": self.kind}));
        let mut response = (self.status, body).into_response();
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
            (&self.status.api_unauthorized, "unauthorized")
        } else {
            (&self.status.api_forbidden, "forbidden")
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
                status: r.status,
                kind: r.kind,
                message: r.message,
                retry_after: Some(r.retry_after),
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
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::DeviceExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "exists", e.to_string())
            }
            StoreError::UnknownDevice(_) => ApiError::not_found(e.to_string()),
            StoreError::DeviceRevoked(_) => {
                ApiError::new(StatusCode::CONFLICT, "revoked", e.to_string())
            }
            StoreError::BadQuery(_) => ApiError::bad(e.to_string()),
            StoreError::Database(_) | StoreError::Corrupt(_) => {
                tracing::error!("store failure behind the API: {e}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
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
                ApiError::new(StatusCode::FORBIDDEN, "not_writable", message)
            }
            CloudWriteError::Ownership(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "ownership", message)
            }
            CloudWriteError::WrongOwner { .. } | CloudWriteError::Validation(_) => {
                ApiError::bad(message)
            }
            CloudWriteError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
            }
            CloudWriteError::WrongModel { .. } => {
                ApiError::new(StatusCode::CONFLICT, "wrong_model", message)
            }
            CloudWriteError::KeyNotOfModel { .. } => ApiError::bad(message),
            CloudWriteError::Clock(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "clock", message)
            }
            CloudWriteError::Store(s) => s.into(),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// `Json` and `Query` whose rejections (bad JSON, wrong content type, bad query string) answer in
/// the API's error format instead of axum's plain text.
pub(crate) struct Body<T>(T);
pub(crate) struct Params<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(ApiError::new(r.status(), "bad_request", r.body_text())),
        }
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
            Err(r) => Err(ApiError::new(r.status(), "bad_request", r.body_text())),
        }
    }
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// How long readiness waits for the store to answer.
const READY_STORE_TIMEOUT: Duration = Duration::from_secs(2);

async fn ready(State(s): State<ApiState>) -> Response {
    let store_ok = matches!(
        tokio::time::timeout(READY_STORE_TIMEOUT, s.store.call(|_| ())).await,
        Ok(Ok(()))
    );
    let status = s.status.snapshot(s.config.mqtt.request_queue);
    // The first thing missing, in the order they come up.
    let reason = if !store_ok {
        Some("the store does not answer".to_string())
    } else if !status.broker_connected {
        Some("not connected to the MQTT broker".to_string())
    } else if !status.subscribed {
        Some(format!(
            "the device topics are not subscribed yet ({} attempts so far)",
            status.subscribe_attempts
        ))
    } else {
        None
    };
    let body = Json(json!({
        "ready": reason.is_none(),
        "store": store_ok,
        "broker": status.broker_connected,
        "subscribed": status.subscribed,
        "reason": reason,
    }));
    let code = if reason.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body).into_response()
}

async fn status(caller: Caller, State(s): State<ApiState>) -> ApiResult<Json<Value>> {
    caller.allow(&s, None, KeyScope::Admin)?;
    let snapshot = s.status.snapshot(s.config.mqtt.request_queue);
    let mut body = serde_json::to_value(snapshot).unwrap_or(Value::Null);
    // The embedded broker's refusals of revoked devices, and of CONNECTs the registry could not
    // answer for.
    if let (Some(creds), Value::Object(map)) = (&s.broker.credentials, &mut body) {
        let (revoked, registry_failures) = creds.refusals();
        map.insert("mqtt_refused_revoked".into(), revoked.into());
        map.insert("mqtt_registry_failures".into(), registry_failures.into());
        map.insert("mqtt_revoked_sessions_closed".into(), creds.swept().into());
    }
    Ok(Json(body))
}

fn device_id(account: &str, device: &str) -> ApiResult<DeviceId> {
    DeviceId::new(account, device).map_err(|e| ApiError::bad(e.to_string()))
}

#[derive(Deserialize)]
struct Register {
    account: String,
    device: String,
    /// Also issue a client certificate for the device-certificate listener.
    #[serde(default)]
    certificate: bool,
}

async fn register_device(
    caller: Caller,
    State(s): State<ApiState>,
    Body(body): Body<Register>,
) -> ApiResult<(StatusCode, Json<Value>)> {
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
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ca", e.to_string())
                })?;
            Some((ca, certs))
        }
    };
    let secret = ops::register_device(&s.store, s.broker.credentials.as_ref(), &id).await?;
    let certificate = match issuer {
        None => Value::Null,
        Some((ca, certs)) => {
            let issued = crate::ca::validity_days(u64::from(certs.validity_days))
                .and_then(|validity| ca.issue(&id, &auth::hash_secret(&secret), validity))
                .map_err(|e| {
                    tracing::error!(device = %id, "registered, but cannot issue its certificate: {e}");
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "ca", format!(
                        "device {id} is registered, but its certificate could not be issued \
                         (issue one with `devtables devices cert`): {e}"
                    ))
                })?;
            json!({
                "cert": issued.cert_pem,
                "key": issued.key_pem,
                "ca": issued.ca_pem,
                "not_after_ms": issued.not_after_ms,
                "mqtt_address": certs.listen.to_string(),
            })
        }
    };
    let prefix = &s.config.topic_prefix;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "account": id.account,
            "device": id.device,
            "secret": secret,
            "mqtt": {
                "address": s.mqtt_addr,
                "client_id": id.node_name(),
                "username": id.node_name(),
                "topics": {
                    "up": topics::up_topic(prefix, &id),
                    "down": topics::down_topic(prefix, &id),
                    "broadcast": topics::broadcast_topic(prefix, &id.account),
                },
            },
            "certificate": certificate,
            "note": "the secret (and the certificate's key) is shown only now; store it on the device",
        })),
    ))
}

#[derive(Deserialize)]
struct DeviceList {
    account: Option<String>,
    /// `account/device` of the last device of the previous page.
    after: Option<String>,
    limit: Option<usize>,
}

fn with_lag(record: crate::store::DeviceRecord) -> Value {
    let lag = record.feed_head.saturating_sub(record.cursor_acked);
    let mut v = serde_json::to_value(&record).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("cursor_lag".into(), lag.into());
    }
    v
}

async fn list_devices(
    caller: Caller,
    State(s): State<ApiState>,
    Params(mut q): Params<DeviceList>,
) -> ApiResult<Json<Value>> {
    // A key sees its own account's devices only, whatever the query asks.
    if let Caller::Key { account, .. } = &caller {
        let asked = q.account.take().unwrap_or_else(|| account.clone());
        caller.allow(&s, Some(&asked), KeyScope::Read)?;
        q.account = Some(asked);
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
    let limit = q.limit.unwrap_or(100).min(s.config.max_page_items);
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
    let devices: Vec<Value> = devices.into_iter().map(with_lag).collect();
    Ok(Json(json!({"devices": devices, "next": next})))
}

async fn get_device(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Read)?;
    let id = device_id(&account, &device)?;
    let who = id.clone();
    match s.store.call(move |c| c.store.device(&who)).await?? {
        Some(record) => Ok(Json(with_lag(record))),
        None => Err(ApiError::not_found(format!(
            "device {id} is not registered"
        ))),
    }
}

#[derive(Deserialize, Default)]
struct RevokeQuery {
    #[serde(default)]
    delete_items: bool,
}

async fn revoke_device(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device)): Path<(String, String)>,
    Params(q): Params<RevokeQuery>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Admin)?;
    let id = device_id(&account, &device)?;
    ops::revoke_device(&s.store, &s.broker, &id, q.delete_items).await?;
    Ok(Json(json!({
        "account": id.account,
        "device": id.device,
        "revoked": true,
        "items_deleted": q.delete_items,
    })))
}

async fn rotate_secret(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Admin)?;
    let id = device_id(&account, &device)?;
    let secret = ops::rotate_secret(&s.store, &s.broker, &id).await?;
    Ok(Json(json!({
        "account": id.account,
        "device": id.device,
        "secret": secret,
        "note": "the secret is shown only now; store it on the device",
    })))
}

#[derive(Deserialize, Default)]
struct ItemsQuery {
    device: Option<String>,
    pk: Option<String>,
    sk_prefix: Option<String>,
    /// A JSON object of field = value filters.
    #[serde(rename = "where")]
    filter: Option<String>,
    limit: Option<usize>,
    next: Option<String>,
}

async fn run_query(
    s: &ApiState,
    account: String,
    model: String,
    q: ItemsQuery,
) -> ApiResult<Json<Value>> {
    if s.schema.model(&model).is_none() {
        return Err(ApiError::not_found(format!("unknown model {model}")));
    }
    let filters = match &q.filter {
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m.into_iter().collect(),
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
        limit: q.limit.unwrap_or(100).min(s.config.max_page_items),
        next: q.next,
    };
    let page = s.store.call(move |c| c.store.query_items(&query)).await??;
    Ok(Json(serde_json::to_value(page).unwrap_or(Value::Null)))
}

async fn query_account_items(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, model)): Path<(String, String)>,
    Params(q): Params<ItemsQuery>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Read)?;
    run_query(&s, account, model, q).await
}

async fn query_device_items(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device, model)): Path<(String, String, String)>,
    Params(mut q): Params<ItemsQuery>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Read)?;
    device_id(&account, &device)?;
    q.device = Some(device);
    run_query(&s, account, model, q).await
}

#[derive(Deserialize)]
struct KeyQuery {
    #[serde(default)]
    pk: String,
    #[serde(default)]
    sk: String,
}

async fn get_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device, model)): Path<(String, String, String)>,
    Params(k): Params<KeyQuery>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Read)?;
    let owner = Owner::Device(device_id(&account, &device)?);
    let key = ItemKey { pk: k.pk, sk: k.sk };
    let m = model.clone();
    match s
        .store
        .call(move |c| c.store.get_item(&owner, &m, &key))
        .await??
    {
        Some(item) if item.item.is_some() => {
            Ok(Json(serde_json::to_value(item).unwrap_or(Value::Null)))
        }
        _ => Err(ApiError::not_found(format!("no such {model} item"))),
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let message = e.to_string();
        match e {
            OpError::UnknownModel(_) | OpError::NotFound(_) => ApiError::not_found(message),
            OpError::Invalid(_) | OpError::BadAccount(_) => ApiError::bad(message),
            OpError::Exists(_) => ApiError::new(StatusCode::CONFLICT, "exists", message),
            OpError::Write(w) => w.into(),
            OpError::Store(s) => s.into(),
            OpError::Gone(g) => g.into(),
        }
    }
}

async fn write_item(
    s: &ApiState,
    owner: Owner,
    model: String,
    input: Item,
    kind: WriteKind,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let max = s.config.sync.wire.max_message_bytes;
    let change = ops::write_item(&s.store, &s.sync, max, owner, &model, input, kind).await?;
    let status = match kind {
        WriteKind::Create => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let version = devtables_sync::wire::hlc_to_string(change.version);
    let item = match (&change.item, s.schema.model(&model)) {
        (Some(item), Some(m)) => Value::Object(m.project(item, false)),
        _ => Value::Null,
    };
    let key = json!({"pk": change.key.pk, "sk": change.key.sk});
    Ok((
        status,
        Json(json!({"item": item, "version": version, "key": key})),
    ))
}

fn object(body: Value) -> ApiResult<Item> {
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::bad("the body must be a JSON object")),
    }
}

async fn create_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device, model)): Path<(String, String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.allow(&s, Some(&account), KeyScope::Write)?;
    let owner = Owner::Device(device_id(&account, &device)?);
    write_item(&s, owner, model, object(body)?, WriteKind::Create).await
}

async fn update_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device, model)): Path<(String, String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.allow(&s, Some(&account), KeyScope::Write)?;
    let owner = Owner::Device(device_id(&account, &device)?);
    write_item(&s, owner, model, object(body)?, WriteKind::Update).await
}

async fn remove_device_item(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, device, model)): Path<(String, String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.allow(&s, Some(&account), KeyScope::Write)?;
    let owner = Owner::Device(device_id(&account, &device)?);
    write_item(&s, owner, model, object(body)?, WriteKind::Remove).await
}

fn account_owner(account: &str) -> ApiResult<Owner> {
    // Validate the account name with a placeholder device.
    device_id(account, "x")?;
    Ok(Owner::Account(account.to_string()))
}

async fn create_broadcast(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, model)): Path<(String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.allow(&s, Some(&account), KeyScope::Write)?;
    write_item(
        &s,
        account_owner(&account)?,
        model,
        object(body)?,
        WriteKind::Create,
    )
    .await
}

async fn update_broadcast(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, model)): Path<(String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.allow(&s, Some(&account), KeyScope::Write)?;
    write_item(
        &s,
        account_owner(&account)?,
        model,
        object(body)?,
        WriteKind::Update,
    )
    .await
}

async fn remove_broadcast(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, model)): Path<(String, String)>,
    Body(body): Body<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.allow(&s, Some(&account), KeyScope::Write)?;
    write_item(
        &s,
        account_owner(&account)?,
        model,
        object(body)?,
        WriteKind::Remove,
    )
    .await
}

#[derive(Deserialize)]
struct ConflictQuery {
    before: Option<u64>,
    limit: Option<usize>,
}

async fn conflicts(
    caller: Caller,
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Params(q): Params<ConflictQuery>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Read)?;
    let limit = q.limit.unwrap_or(100).min(s.config.max_page_items);
    let list = s
        .store
        .call(move |c| c.store.conflicts(&account, q.before, limit))
        .await??;
    Ok(Json(json!({"conflicts": list})))
}

#[derive(Deserialize)]
struct NewKey {
    scope: KeyScope,
}

async fn create_key(
    caller: Caller,
    State(s): State<ApiState>,
    Path(account): Path<String>,
    Body(body): Body<NewKey>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    caller.allow(&s, Some(&account), KeyScope::Admin)?;
    let new = ops::create_api_key(&s.store, &account, body.scope).await?;
    tracing::info!(id = %new.id, account = %new.account, scope = %new.scope, "API key created");
    let mut answer = serde_json::to_value(&new).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut answer {
        m.insert(
            "note".into(),
            "the key is shown only now; send it as Authorization: Bearer <key>".into(),
        );
    }
    Ok((StatusCode::CREATED, Json(answer)))
}

async fn list_keys(
    caller: Caller,
    State(s): State<ApiState>,
    Path(account): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Admin)?;
    let keys = s.store.call(move |c| c.store.api_keys(&account)).await??;
    Ok(Json(json!({"keys": keys})))
}

async fn revoke_key(
    caller: Caller,
    State(s): State<ApiState>,
    Path((account, id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.allow(&s, Some(&account), KeyScope::Admin)?;
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
    Ok(Json(json!({"id": id, "account": account, "revoked": true})))
}
