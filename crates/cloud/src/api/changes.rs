//! The routes that let a backend react to changes: the account's change log, read as
//! server-sent events or by long poll from a durable cursor, and its webhooks.
//!
//! | Method and path | What |
//! |---|---|
//! | `GET /v1/accounts/{a}/changes?after=&model=&device=&limit=&wait=` | the changes after a cursor (JSON), waiting up to `wait` seconds for one; with `Accept: text/event-stream`, a stream of them (SSE, `id:` = seq, resumed with `Last-Event-ID`) |
//! | `GET`, `POST /v1/accounts/{a}/webhooks` | list the account's webhooks with their delivery status; create one (admin), its secret shown once |
//! | `GET`, `DELETE /v1/accounts/{a}/webhooks/{id}` | one webhook's status; delete it (admin) |
//!
//! It exists apart from the rest of the API because these routes wait: a long poll and an SSE
//! stream hold a reader slot (`changes_max_readers`) while they wait, wake when the store thread
//! says the log moved ([`crate::store_thread::StoreHandle::changes`]), read the store at most
//! every `changes_read_interval_ms`, and end at the service's shutdown.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use utoipa::{IntoParams, ToSchema};

use super::{
    check_account, device_id, int64_range, AccountPath, ApiError, ApiResult, ApiState, Body,
    Caller, ErrorKind, Params, PathParams,
};
use crate::openapi::{self, BodyErrors, Conflict, Expired, Invalid, KeyedErrors, NotFound};
use crate::status::SyncStatus;
use crate::store::{
    ChangePage, ChangeQuery, ChangeRead, KeyScope, NewWebhook, StoreError, WebhookRecord,
};
use crate::store_thread::wall_ms;

/// The cursor that asks for the head: past every sequence number (the document's int64 range).
const AT_THE_HEAD: u64 = i64::MAX as u64;
/// Events an SSE stream holds for a slow reader before its reads of the store wait.
const SSE_BUFFER: usize = 64;
/// What a full reader slot answer tells to wait, in seconds.
const BUSY_RETRY_AFTER: u64 = 1;

/// The query of `GET /v1/accounts/{account}/changes`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ChangesQuery {
    /// Changes after this sequence number: the `next` of the previous answer (or the `seq` of
    /// the last change handled). Leave it out to start at the head (only changes from now on);
    /// `0` reads from the oldest change kept. An SSE stream's `Last-Event-ID` wins over it.
    #[param(minimum = 0, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    after: Option<u64>,
    /// Only changes of this model.
    model: Option<String>,
    /// Only changes of this device's items (account-wide items have no device).
    #[param(value_type = Option<openapi::Name>)]
    device: Option<String>,
    /// Most changes in the answer (default 100, at most the service's `changes_max_page`).
    #[param(minimum = 1, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    limit: Option<u64>,
    /// Seconds to wait for a change when there is none yet (default 0: answer at once; at most
    /// the service's `changes_max_wait_secs`). Not used by an SSE stream, which waits always.
    #[param(minimum = 0, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "int64_range")]
    wait: Option<u64>,
}

/// The reader slot of a waiting reader: counted in `change_readers` while held.
struct ReaderSlot {
    _permit: OwnedSemaphorePermit,
    status: Arc<SyncStatus>,
}

impl ReaderSlot {
    fn take(s: &ApiState) -> ApiResult<ReaderSlot> {
        let Ok(permit) = s.readers.clone().try_acquire_owned() else {
            s.status
                .change_readers_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(ApiError {
                retry_after: Some(BUSY_RETRY_AFTER),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorKind::Busy,
                    format!(
                        "{} change readers are waiting, the most changes_max_readers allows: \
                         retry after {BUSY_RETRY_AFTER} s, or read without waiting (wait=0)",
                        s.config.changes.max_readers
                    ),
                )
            });
        };
        s.status.change_readers.fetch_add(1, Ordering::Relaxed);
        Ok(ReaderSlot {
            _permit: permit,
            status: s.status.clone(),
        })
    }
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        self.status.change_readers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The error a reader whose cursor retention passed gets (410, or an SSE `expired` event).
fn expired(s: &ApiState, account: &str, after: u64, floor: u64) -> ApiError {
    s.status.changes_expired.fetch_add(1, Ordering::Relaxed);
    ApiError::new(
        StatusCode::GONE,
        ErrorKind::CursorExpired,
        format!(
            "changes of account {account} after {after} up to {floor} were removed by retention \
             before this read: read again without `after` (its `next` is the head; keep it), then \
             re-read the items (GET /v1/accounts/{account}/items/{{model}}), then go on from that \
             `next`"
        ),
    )
}

async fn read(s: &ApiState, query: ChangeQuery) -> ApiResult<ChangeRead> {
    Ok(s.store
        .call(move |c| c.store.read_changes(&query))
        .await??)
}

/// The account's changes after a cursor, as JSON (long poll with `wait`) or, with
/// `Accept: text/event-stream`, as server-sent events (`event: change`, `id:` the sequence
/// number, `data:` the change; resumed with `Last-Event-ID`; a stream whose cursor retention
/// passes gets `event: expired` and ends).
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/changes",
    tag = "changes",
    params(
        AccountPath,
        ChangesQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "SSE: resume after this sequence number (wins over `after`)"),
    ),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The changes after the cursor (JSON), or their stream (SSE)",
         content((ChangePage = "application/json"), (String = "text/event-stream"))),
        Invalid, NotFound, Expired, KeyedErrors,
    ),
)]
pub(super) async fn read_changes(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountPath>,
    Params(q): Params<ChangesQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    check_account(&p.account)?;
    if let Some(model) = &q.model {
        if s.schema.model(model).is_none() {
            return Err(ApiError::not_found(format!("unknown model {model}")));
        }
    }
    if let Some(device) = &q.device {
        device_id(&p.account, device)?;
    }
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let mut after = q.after;
    // Read whatever the mode, as documented (a JSON reader's is checked, not used).
    if let Some(id) = headers.get("last-event-id") {
        let Some(id) = id.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) else {
            return Err(ApiError::bad(
                "Last-Event-ID must be the sequence number of a change (the id of an event)",
            ));
        };
        if sse {
            // Past every sequence number: the head.
            after = Some(id.min(AT_THE_HEAD));
        }
    }
    let max_page = s.config.changes.max_page;
    let limit = match q.limit {
        Some(0) => {
            return Err(ApiError::bad(
                "limit must be at least 1 (leave it out for 100)",
            ))
        }
        Some(l) => usize::try_from(l).unwrap_or(usize::MAX).min(max_page),
        None => 100.min(max_page),
    };
    let mut query = ChangeQuery {
        account: p.account.clone(),
        after: after.unwrap_or(AT_THE_HEAD),
        model: q.model,
        device: q.device,
        limit: if sse { max_page } else { limit },
        scan: s.config.changes.max_scan,
    };
    // Marked before the first read: an append committed after it wakes the wait below.
    let mut moved = s.store.changes();
    moved.borrow_and_update();
    let mut page = match read(&s, query.clone()).await? {
        ChangeRead::Page(page) => page,
        ChangeRead::Expired { floor, .. } => {
            return Err(expired(&s, &p.account, query.after, floor))
        }
    };
    if after.is_none() {
        // From now on: the head is the cursor.
        page.next = page.head;
    }
    if sse {
        let slot = ReaderSlot::take(&s)?;
        return Ok(stream(s, query, page, moved, slot));
    }
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(s.config.changes.max_wait);
    if !page.changes.is_empty() || wait.is_zero() {
        return Ok(answer(&s, page));
    }
    let _slot = ReaderSlot::take(&s)?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut shutdown = s.shutdown.clone();
    let mut last_read = Instant::now();
    loop {
        tokio::select! {
            changed = moved.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        // A busy store wakes a reader at most every `read_interval`.
        let not_before = (last_read + s.config.changes.read_interval).min(deadline.into());
        tokio::time::sleep_until(not_before.into()).await;
        moved.borrow_and_update();
        last_read = Instant::now();
        query.after = page.next;
        page = match read(&s, query.clone()).await? {
            ChangeRead::Page(next) => next,
            ChangeRead::Expired { floor, .. } => {
                return Err(expired(&s, &p.account, query.after, floor))
            }
        };
        if !page.changes.is_empty() {
            break;
        }
    }
    Ok(answer(&s, page))
}

fn answer(s: &ApiState, page: ChangePage) -> Response {
    s.status
        .changes_served
        .fetch_add(page.changes.len() as u64, Ordering::Relaxed);
    Json(page).into_response()
}

/// The SSE stream: a task reads the log and hands events to the response body through a
/// bounded channel (a slow reader makes the task wait, not the store); it ends when the reader
/// goes, the service stops, or the cursor expires.
fn stream(
    s: ApiState,
    mut query: ChangeQuery,
    first: ChangePage,
    mut moved: watch::Receiver<u64>,
    slot: ReaderSlot,
) -> Response {
    let (events, rx) = mpsc::channel::<Event>(SSE_BUFFER);
    let keepalive = s.config.changes.keepalive;
    tokio::spawn(async move {
        let _slot = slot;
        let mut shutdown = s.shutdown.clone();
        let mut page = first;
        loop {
            let served = page.changes.len() as u64;
            for change in &page.changes {
                let event = match Event::default()
                    .id(change.seq.to_string())
                    .event("change")
                    .json_data(change)
                {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!("cannot encode a change event: {e}");
                        return;
                    }
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            s.status.changes_served.fetch_add(served, Ordering::Relaxed);
            query.after = page.next;
            if page.next >= page.head {
                // Caught up: wait for the log to move.
                tokio::select! {
                    changed = moved.changed() => if changed.is_err() { return },
                    _ = events.closed() => return,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                let last_read = Instant::now();
                tokio::select! {
                    _ = tokio::time::sleep_until((last_read + s.config.changes.read_interval).into()) => {}
                    _ = events.closed() => return,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            moved.borrow_and_update();
            page = match read(&s, query.clone()).await {
                Ok(ChangeRead::Page(next)) => next,
                Ok(ChangeRead::Expired { floor, .. }) => {
                    let e = expired(&s, &query.account, query.after, floor);
                    if let Ok(event) = Event::default().event("expired").json_data(&e.body) {
                        let _ = events.send(event).await;
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!("an SSE stream of changes ended: {}", e.body.error);
                    if let Ok(event) = Event::default().event("error").json_data(&e.body) {
                        let _ = events.send(event).await;
                    }
                    return;
                }
            };
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response()
}

// ---- Webhooks ----

/// `{account}/webhooks/{id}` of a path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(super) struct WebhookPath {
    /// The webhook's account.
    #[param(value_type = openapi::Name)]
    account: String,
    /// The webhook's id.
    #[param(pattern = "^[0-9a-f]{16}$")]
    id: String,
}

/// The body of `POST /v1/accounts/{account}/webhooks`.
#[derive(Deserialize, ToSchema)]
pub(super) struct NewWebhookBody {
    /// Where the changes are posted: `https://...` (or `http://`, clear text, warned about);
    /// at most 2048 bytes, no user information.
    #[schema(
        pattern = "^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$",
        max_length = 2048
    )]
    url: String,
    /// Only changes of this model (default: every model).
    #[serde(default)]
    model: Option<String>,
    /// Deliver the changes after this sequence number (default: only changes from now on;
    /// `0`: from the oldest change kept).
    #[schema(minimum = 0, maximum = 9223372036854775807_u64)]
    #[serde(default, deserialize_with = "json_int64")]
    after: Option<u64>,
}

/// Reads an optional integer of a JSON body in the document's int64 range, also written with a
/// zero fraction (`42.0`), which JSON Schema counts as an integer.
fn json_int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= AT_THE_HEAD as f64)
            .map(|f| f as u64)
    });
    match whole {
        Some(v) if v <= AT_THE_HEAD => Ok(Some(v)),
        _ => Err(serde::de::Error::custom(format!(
            "{n} is not a whole number from 0 to {AT_THE_HEAD}"
        ))),
    }
}

/// A webhook and how its delivery goes.
#[derive(Serialize, ToSchema)]
pub(super) struct WebhookView {
    #[serde(flatten)]
    record: WebhookRecord,
    /// When the oldest change not yet delivered was stored (`null`: caught up, as far as the
    /// first `changes_max_scan` entries after the cursor tell).
    pending_since_ms: Option<u64>,
    /// How far behind the webhook is: ms since `pending_since_ms` (0: caught up).
    lag_ms: u64,
}

impl WebhookView {
    fn new(record: WebhookRecord, pending_since_ms: Option<u64>) -> WebhookView {
        WebhookView {
            lag_ms: pending_since_ms.map_or(0, |at| wall_ms().saturating_sub(at)),
            record,
            pending_since_ms,
        }
    }
}

/// The answer of a webhook creation: its secret, shown once.
#[derive(Serialize, ToSchema)]
pub(super) struct CreatedWebhook {
    webhook: WebhookView,
    /// The shared signing secret: each delivery's `X-Devtables-Signature` is `sha256=` and the
    /// hex HMAC-SHA256 of `{X-Devtables-Timestamp}.{body}` keyed with it (docs/api.md).
    secret: String,
    note: &'static str,
}

/// The account's webhooks.
#[derive(Serialize, ToSchema)]
pub(super) struct WebhookList {
    webhooks: Vec<WebhookView>,
}

/// The answer of a webhook deletion.
#[derive(Serialize, ToSchema)]
pub(super) struct WebhookDeleted {
    id: String,
    account: String,
    /// Always true.
    deleted: bool,
}

/// Warns once per creation when the store file holding the signing secrets is readable by
/// other users.
fn warn_if_store_readable(s: &ApiState) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = s.config.data_dir.join("cloud.db");
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "{} holds the webhooks' signing secrets and other users may read it: \
                     chmod 600 it (and its -wal and -shm files), or 700 its folder",
                    path.display()
                );
            }
        }
    }
}

/// Create a webhook (admin): the account's changes (of `model`, or all) after `after` are
/// posted to `url`, signed with the secret this answer shows, once.
#[utoipa::path(
    post,
    path = "/v1/accounts/{account}/webhooks",
    tag = "changes",
    params(AccountPath),
    request_body = NewWebhookBody,
    security(("api_key" = [])),
    responses(
        (status = 201, body = CreatedWebhook, description = "Created; deliveries start"),
        Invalid, NotFound, Conflict, BodyErrors, KeyedErrors,
    ),
)]
pub(super) async fn create_webhook(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountPath>,
    Body(body): Body<NewWebhookBody>,
) -> ApiResult<(StatusCode, Json<CreatedWebhook>)> {
    caller.allow(&s, Some(&p.account), KeyScope::Admin)?;
    check_account(&p.account)?;
    let target = crate::webhooks::parse_url(&body.url).map_err(ApiError::bad)?;
    if let Some(model) = &body.model {
        if s.schema.model(model).is_none() {
            return Err(ApiError::not_found(format!("unknown model {model}")));
        }
    }
    let secret = crate::webhooks::new_secret();
    let new = NewWebhook {
        account: p.account.clone(),
        url: body.url.clone(),
        model: body.model,
        secret: secret.clone(),
        after: body.after,
    };
    let most = s.config.changes.webhooks_per_account;
    // Counted and created in one store job: two creations cannot both pass the limit.
    let created = s
        .store
        .call(
            move |c| -> Result<Result<WebhookRecord, usize>, StoreError> {
                let held = c.store.webhooks(Some(&new.account))?.len();
                if held >= most {
                    return Ok(Err(held));
                }
                c.store.create_webhook(&new, wall_ms()).map(Ok)
            },
        )
        .await??;
    let record = created.map_err(|held| {
        ApiError::new(
            StatusCode::CONFLICT,
            ErrorKind::LimitReached,
            format!(
                "account {} has {held} webhooks, the most webhooks_per_account allows: delete one \
                 first",
                p.account
            ),
        )
    })?;
    if target.is_clear_text() {
        tracing::warn!(
            webhook = %record.id, url = %record.url,
            "webhook over clear-text http: its deliveries (items included) cross the network \
             readable; use https"
        );
    }
    warn_if_store_readable(&s);
    tracing::info!(webhook = %record.id, account = %record.account, "webhook created");
    s.webhooks.start(record.clone());
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            webhook: WebhookView::new(record, None),
            secret,
            note: "the secret is shown only now; the receiver checks each delivery's signature \
                   with it",
        }),
    ))
}

/// The account's webhooks with their delivery status: cursor, last status and error, failures,
/// lag.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/webhooks",
    tag = "changes",
    params(AccountPath),
    security(("api_key" = [])),
    responses(
        (status = 200, body = WebhookList, description = "The webhooks"),
        Invalid, KeyedErrors,
    ),
)]
pub(super) async fn list_webhooks(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<AccountPath>,
) -> ApiResult<Json<WebhookList>> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    check_account(&p.account)?;
    let scan = s.config.changes.max_scan;
    let account = p.account;
    let hooks = s
        .store
        .call(
            move |c| -> Result<Vec<(WebhookRecord, Option<u64>)>, StoreError> {
                let hooks = c.store.webhooks(Some(&account))?;
                hooks
                    .into_iter()
                    .map(|h| {
                        let since = c.store.webhook_pending_since(&h, scan)?;
                        Ok((h, since))
                    })
                    .collect()
            },
        )
        .await??;
    Ok(Json(WebhookList {
        webhooks: hooks
            .into_iter()
            .map(|(h, since)| WebhookView::new(h, since))
            .collect(),
    }))
}

/// One webhook with its delivery status.
#[utoipa::path(
    get,
    path = "/v1/accounts/{account}/webhooks/{id}",
    tag = "changes",
    params(WebhookPath),
    security(("api_key" = [])),
    responses(
        (status = 200, body = WebhookView, description = "The webhook"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
pub(super) async fn get_webhook(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<WebhookPath>,
) -> ApiResult<Json<WebhookView>> {
    caller.allow(&s, Some(&p.account), KeyScope::Read)?;
    check_account(&p.account)?;
    let scan = s.config.changes.max_scan;
    let (account, id) = (p.account.clone(), p.id.clone());
    let found = s
        .store
        .call(
            move |c| -> Result<Option<(WebhookRecord, Option<u64>)>, StoreError> {
                match c.store.webhook(&id)? {
                    Some(h) if h.account == account => {
                        let since = c.store.webhook_pending_since(&h, scan)?;
                        Ok(Some((h, since)))
                    }
                    _ => Ok(None),
                }
            },
        )
        .await??;
    match found {
        Some((h, since)) => Ok(Json(WebhookView::new(h, since))),
        None => Err(ApiError::not_found(format!(
            "account {} has no webhook {}",
            p.account, p.id
        ))),
    }
}

/// Delete a webhook (admin): its deliveries stop (one in flight is abandoned).
#[utoipa::path(
    delete,
    path = "/v1/accounts/{account}/webhooks/{id}",
    tag = "changes",
    params(WebhookPath),
    security(("api_key" = [])),
    responses(
        (status = 200, body = WebhookDeleted, description = "Deleted"),
        Invalid, NotFound, KeyedErrors,
    ),
)]
pub(super) async fn delete_webhook(
    caller: Caller,
    State(s): State<ApiState>,
    PathParams(p): PathParams<WebhookPath>,
) -> ApiResult<Json<WebhookDeleted>> {
    caller.allow(&s, Some(&p.account), KeyScope::Admin)?;
    check_account(&p.account)?;
    let (account, id) = (p.account.clone(), p.id.clone());
    let deleted = s
        .store
        .call(move |c| c.store.delete_webhook(&account, &id))
        .await??;
    if !deleted {
        return Err(ApiError::not_found(format!(
            "account {} has no webhook {}",
            p.account, p.id
        )));
    }
    s.webhooks.stop(&p.id);
    tracing::info!(webhook = %p.id, account = %p.account, "webhook deleted");
    Ok(Json(WebhookDeleted {
        id: p.id,
        account: p.account,
        deleted: true,
    }))
}
