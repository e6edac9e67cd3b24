//! `GET /v1/changes`: the change log after a cursor, as server-sent events or as a JSON page.
//!
//! The cursor is the sequence number of the last change the reader saw: the `Last-Event-ID`
//! header (what an SSE client sends when it reconnects), else `from=N`, else `from=now` (only
//! what happens from now on). `model=A,B` keeps those models' changes. A cursor the log no
//! longer covers is answered 410 `gone` (or, mid-stream, a `gone` event that ends the stream):
//! read the items again, then follow from `latest`.
//!
//! Server-sent events (`Accept: text/event-stream`): first a `ready` event
//! (`{"from": cursor, "latest": n}`, no id), then one `change` event per change, `id:` its
//! sequence number and `data:` the [`crate::changelog::ChangeEntry`] as JSON; a comment every
//! 15 s keeps idle connections open. JSON (any other `Accept`): `{"changes": [...], "next": N,
//! "latest": n}` with at most `limit` changes; `next` is the cursor to ask with next time (it
//! passes over changes the model filter left out). With `wait=S` an empty page waits up to S
//! seconds for a change (long-poll).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::items::blocking;
use super::Shared;
use crate::changelog::{self, ChangeEntry};

/// Entries read per database read while streaming.
const STREAM_PAGE: usize = 256;

/// How often an idle stream sends a comment (so proxies and clients keep it open).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
pub(crate) struct ChangesQuery {
    from: Option<String>,
    model: Option<String>,
    wait: Option<String>,
    limit: Option<String>,
}

/// `{"changes": [...], "next": N, "latest": n}`.
#[derive(Serialize)]
struct ChangesPage {
    changes: Vec<ChangeEntry>,
    next: u64,
    latest: u64,
}

/// The models a reader follows (`None`: all).
struct ModelFilter(Option<Vec<String>>);

impl ModelFilter {
    fn keeps(&self, entry: &ChangeEntry) -> bool {
        self.0
            .as_ref()
            .is_none_or(|models| models.contains(&entry.model))
    }
}

fn parse_count(name: &str, text: Option<&str>) -> Result<Option<u64>, ApiError> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => t
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::invalid(format!("{name} {t:?} is not a whole number"))),
    }
}

pub(crate) async fn changes(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    query: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(format!("cannot read the query string: {}", e.body_text()))
    })?;
    let filter = match q.model.as_deref().filter(|m| !m.is_empty()) {
        None => ModelFilter(None),
        Some(list) => {
            let models: Vec<String> = list.split(',').map(|m| m.trim().to_string()).collect();
            for m in &models {
                if s.schema.model(m).is_none() {
                    return Err(ApiError::invalid(format!(
                        "model {m:?} is not in the schema"
                    )));
                }
            }
            ModelFilter(Some(models))
        }
    };
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let cursor = match last_event_id.or(q.from.as_deref().filter(|f| !f.is_empty())) {
        None | Some("now") => {
            let db = s.db.clone();
            blocking(move || Ok(changelog::state(&db)?.latest())).await?
        }
        Some(text) => text.parse::<u64>().map_err(|_| {
            ApiError::invalid(format!(
                "cursor {text:?} is not a sequence number (or `now`)"
            ))
        })?,
    };
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_stream {
        stream(s, cursor, filter).await
    } else {
        let limit = match parse_count("limit", q.limit.as_deref())? {
            None => s.config.default_page,
            Some(n) if n as usize > s.config.max_page => {
                return Err(ApiError::invalid(format!(
                    "limit {n} is over the largest page, {} changes (local_api.max_page)",
                    s.config.max_page
                )))
            }
            Some(n) => (n as usize).max(1),
        };
        let wait = wait_of(&s, q.wait.as_deref())?;
        Ok(Json(page(s, cursor, filter, limit, wait).await?).into_response())
    }
}

/// The `wait` parameter, within `max_wait`.
pub(crate) fn wait_of(s: &Shared, text: Option<&str>) -> Result<Duration, ApiError> {
    let wait = Duration::from_secs(parse_count("wait", text)?.unwrap_or(0));
    if wait > s.config.max_wait {
        return Err(ApiError::invalid(format!(
            "wait {} s is over the longest wait, {} s (local_api.max_wait_secs)",
            wait.as_secs(),
            s.config.max_wait.as_secs()
        )));
    }
    Ok(wait)
}

/// A JSON page of at most `limit` changes after `cursor`, waiting up to `wait` for one.
async fn page(
    s: Arc<Shared>,
    mut cursor: u64,
    filter: ModelFilter,
    limit: usize,
    wait: Duration,
) -> Result<ChangesPage, ApiError> {
    let _permit = if wait.is_zero() {
        None
    } else {
        Some(s.stream_permit()?)
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut changed = s.changed.subscribe();
    loop {
        changed.borrow_and_update();
        let db = s.db.clone();
        let after = cursor;
        let (entries, state) =
            blocking(move || Ok(changelog::read_after(&db, after, STREAM_PAGE)?)).await?;
        let read = entries.len();
        let mut out = Vec::new();
        for entry in entries {
            if out.len() == limit {
                break;
            }
            cursor = entry.seq;
            if filter.keeps(&entry) {
                out.push(entry);
            }
        }
        if !out.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(ChangesPage {
                changes: out,
                next: cursor,
                latest: state.latest(),
            });
        }
        if read == STREAM_PAGE {
            // A full read all filtered out: more may follow at once.
            continue;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = s.stopped() => return Err(ApiError::stopping()),
        }
    }
}

/// What a change stream holds between two events.
struct Follow {
    s: Arc<Shared>,
    cursor: u64,
    filter: ModelFilter,
    changed: tokio::sync::watch::Receiver<u64>,
    queue: VecDeque<Event>,
    /// No event follows what is queued.
    ending: bool,
    /// Held while the stream is open (local_api.max_streams).
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Follow {
    /// The next event, or `None` when the stream ends (the API stops, or the log cannot go on).
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            if self.ending {
                return None;
            }
            self.changed.borrow_and_update();
            let db = self.s.db.clone();
            let after = self.cursor;
            let read =
                tokio::task::spawn_blocking(move || changelog::read_after(&db, after, STREAM_PAGE))
                    .await;
            match read {
                Ok(Ok((entries, _))) if entries.is_empty() => {
                    tokio::select! {
                        _ = self.changed.changed() => {}
                        _ = self.s.stopped() => return None,
                    }
                }
                Ok(Ok((entries, _))) => {
                    for entry in entries {
                        self.cursor = entry.seq;
                        if self.filter.keeps(&entry) {
                            let data = serde_json::to_string(&entry).unwrap_or_default();
                            self.queue.push_back(
                                Event::default()
                                    .id(entry.seq.to_string())
                                    .event("change")
                                    .data(data),
                            );
                        }
                    }
                }
                Ok(Err(e)) => {
                    let e = ApiError::from(e);
                    let name = if matches!(e.kind, super::error::Kind::Gone) {
                        "gone"
                    } else {
                        "error"
                    };
                    self.queue
                        .push_back(Event::default().event(name).data(e.body_json()));
                    self.ending = true;
                }
                Err(e) => {
                    self.queue.push_back(
                        Event::default()
                            .event("error")
                            .data(ApiError::task(e).body_json()),
                    );
                    self.ending = true;
                }
            }
        }
    }
}

/// The server-sent event stream after `cursor`; the cursor is checked first, so a gone one is
/// a 410 answer, not a stream.
async fn stream(s: Arc<Shared>, cursor: u64, filter: ModelFilter) -> Result<Response, ApiError> {
    let permit = s.stream_permit()?;
    let db = s.db.clone();
    let state = blocking(move || {
        // Checks the cursor (a page of nothing: only whether it is still covered).
        let (_, state) = changelog::read_after(&db, cursor, 0)?;
        Ok(state)
    })
    .await?;
    let ready = Event::default()
        .event("ready")
        .data(serde_json::json!({"from": cursor, "latest": state.latest()}).to_string());
    let follow = Follow {
        changed: s.changed.subscribe(),
        s,
        cursor,
        filter,
        queue: VecDeque::from([ready]),
        ending: false,
        _permit: permit,
    };
    let events = futures_util::stream::unfold(follow, |mut follow| async move {
        follow
            .next_event()
            .await
            .map(|event| (Ok::<_, Infallible>(event), follow))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}
