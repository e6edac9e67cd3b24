//! Commands for applications: the pending commands the cloud wrote for this device that no
//! handler in the agent runs (the standalone agent's built-ins are `ping` and `echo`) wait in the
//! database until an application takes one and answers it.
//!
//! Taking a command leases it to the taker for `command_lease`; a command whose lease ran out
//! unanswered (the application crashed, hung, or lost the answer) is offered again, to any
//! taker: delivery is at least once, and `delivery` in the offer counts the times. The first
//! answer while the command is pending wins; a later one is answered 409 `answered`. Leases
//! live in memory: after an agent restart every pending command is offered again.
//!
//! A command nobody takes stays `pending` (counted as `waiting` in `GET /v1/status`), in the
//! database and in the cloud, until an application answers it: the agent never answers "no
//! handler" while it serves the local API.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use devtables_db::{DbError, Origin};
use devtables_schema::{Item, ItemKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::changes::wait_of;
use super::error::{ApiError, Kind};
use super::items::blocking;
use super::{json_body, Shared};
use crate::commands::{is_pending, name_of, pending_commands, result_patch};

/// The leases of the commands taken and not answered yet, and the counts `status` shows.
#[derive(Default)]
pub(crate) struct Leases {
    /// Only pending commands hold one: a scan forgets the leases of commands no longer pending.
    held: HashMap<ItemKey, Lease>,
    /// Offers of a command whose earlier lease ran out unanswered.
    redelivered: u64,
    /// Results applications wrote.
    answered: u64,
}

struct Lease {
    until: Instant,
    /// Times the command was offered.
    deliveries: u32,
}

/// The commands part of `GET /v1/status`.
#[derive(Serialize)]
pub(crate) struct CommandCounts {
    /// Pending commands no handler runs and no application holds: they wait for a taker.
    waiting: usize,
    /// Pending commands an application took and has not answered (lease running).
    leased: usize,
    /// Offers of a command whose lease ran out unanswered.
    redelivered: u64,
    /// Results applications wrote.
    answered: u64,
}

/// A command an application may take.
struct Waiting {
    key: ItemKey,
    name: String,
    item: Item,
}

/// What `next`, `list` and the command stream give an application.
#[derive(Serialize)]
struct Offered {
    /// The handle to answer with (`POST /v1/commands/{id}/result`).
    id: String,
    /// The command's name (its `command` field).
    command: String,
    /// Its `args` field (null when it has none).
    args: Value,
    /// The whole command item (hidden fields left out).
    item: Item,
    /// How long the taker holds it, in ms (0 in `list`).
    lease_ms: u64,
    /// How many times it was offered, this time included (0 in `list`).
    delivery: u32,
}

/// The handle of a command: its key, hex-encoded (`pk`, a NUL, `sk`).
fn handle_of(key: &ItemKey) -> String {
    hex::encode(crate::state::raw_key(key))
}

fn key_of(handle: &str) -> Option<ItemKey> {
    crate::state::key_from_raw(&hex::decode(handle).ok()?)
}

/// The pending commands the cloud wrote whose name no handler of the agent runs, oldest key
/// first.
fn waiting(s: &Shared) -> Result<Vec<Waiting>, DbError> {
    let Some(model) = s.schema.model(&s.command_model) else {
        return Ok(Vec::new());
    };
    let pending = pending_commands(&s.db, &s.schema, &s.command_model, s.node)?;
    let handlers = s.handlers.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = Vec::new();
    for mut item in pending {
        let name = name_of(&item);
        if handlers.commands.contains_key(&name) {
            continue;
        }
        let Ok(key) = model.primary_key(&item) else {
            continue;
        };
        model.strip_hidden(&mut item);
        out.push(Waiting { key, name, item });
    }
    Ok(out)
}

pub(crate) fn counts(s: &Shared) -> Result<CommandCounts, DbError> {
    let found = waiting(s)?;
    let now = Instant::now();
    let leases = s.leases.lock().unwrap_or_else(PoisonError::into_inner);
    let leased = found
        .iter()
        .filter(|w| leases.held.get(&w.key).is_some_and(|l| l.until > now))
        .count();
    Ok(CommandCounts {
        waiting: found.len() - leased,
        leased,
        redelivered: leases.redelivered,
        answered: leases.answered,
    })
}

/// The `command=a,b` filter.
fn names_of(text: Option<&str>) -> Option<Vec<String>> {
    text.filter(|t| !t.is_empty())
        .map(|t| t.split(',').map(|n| n.trim().to_string()).collect())
}

/// Takes the oldest command not leased (or whose lease ran out), waiting up to `wait` for one;
/// `None` when none came.
async fn take(
    s: &Arc<Shared>,
    names: &Option<Vec<String>>,
    wait: Duration,
) -> Result<Option<Offered>, ApiError> {
    let deadline = Instant::now() + wait;
    let mut changed = s.commands_changed.subscribe();
    loop {
        changed.borrow_and_update();
        let shared = s.clone();
        let found = blocking(move || Ok(waiting(&shared)?)).await?;
        let now = Instant::now();
        let mut next_expiry: Option<Instant> = None;
        {
            let mut leases = s.leases.lock().unwrap_or_else(PoisonError::into_inner);
            // Answered or removed commands keep no lease.
            leases
                .held
                .retain(|key, _| found.iter().any(|w| w.key == *key));
            for w in found {
                if names.as_ref().is_some_and(|n| !n.contains(&w.name)) {
                    continue;
                }
                let lease_until = now + s.config.command_lease;
                let delivery = match leases.held.get_mut(&w.key) {
                    Some(lease) if lease.until > now => {
                        next_expiry = Some(next_expiry.map_or(lease.until, |e| e.min(lease.until)));
                        continue;
                    }
                    Some(lease) => {
                        lease.until = lease_until;
                        lease.deliveries += 1;
                        let n = lease.deliveries;
                        leases.redelivered += 1;
                        tracing::info!(command = %w.name, delivery = n, "offering a command again: its lease ran out unanswered");
                        n
                    }
                    None => {
                        leases.held.insert(
                            w.key.clone(),
                            Lease {
                                until: lease_until,
                                deliveries: 1,
                            },
                        );
                        1
                    }
                };
                return Ok(Some(Offered {
                    id: handle_of(&w.key),
                    args: w.item.get("args").cloned().unwrap_or(Value::Null),
                    command: w.name,
                    item: w.item,
                    lease_ms: s.config.command_lease.as_millis() as u64,
                    delivery,
                }));
            }
        }
        if now >= deadline {
            return Ok(None);
        }
        let wake = next_expiry.map_or(deadline, |e| e.min(deadline));
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = s.stopped() => return Err(ApiError::stopping()),
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct NextQuery {
    wait: Option<String>,
    command: Option<String>,
}

fn query_of(query: Result<Query<NextQuery>, QueryRejection>) -> Result<NextQuery, ApiError> {
    query.map(|Query(q)| q).map_err(|e| {
        ApiError::bad_request(format!("cannot read the query string: {}", e.body_text()))
    })
}

/// `GET /v1/commands`: what waits or is leased, oldest first.
pub(crate) async fn list(State(s): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let shared = s.clone();
    let found = blocking(move || Ok(waiting(&shared)?)).await?;
    let now = Instant::now();
    let leases = s.leases.lock().unwrap_or_else(PoisonError::into_inner);
    let commands: Vec<Value> = found
        .into_iter()
        .map(|w| {
            let leased_ms = leases
                .held
                .get(&w.key)
                .filter(|l| l.until > now)
                .map(|l| (l.until - now).as_millis() as u64);
            serde_json::json!({
                "id": handle_of(&w.key),
                "command": w.name,
                "args": w.item.get("args").cloned().unwrap_or(Value::Null),
                "item": w.item,
                "leased_for_ms": leased_ms,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "commands": commands })))
}

/// `GET /v1/commands/next?wait=S&command=a,b`: 200 with a command, or 204 when none came within
/// the wait.
pub(crate) async fn next(
    State(s): State<Arc<Shared>>,
    query: Result<Query<NextQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query_of(query)?;
    let wait = wait_of(&s, q.wait.as_deref())?;
    let _permit = if wait.is_zero() {
        None
    } else {
        Some(s.stream_permit()?)
    };
    match take(&s, &names_of(q.command.as_deref()), wait).await? {
        Some(offered) => Ok(Json(offered).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

/// `GET /v1/commands/stream?command=a,b`: a `command` event per command taken (each leased as
/// by `next`), until the client goes or the API stops.
pub(crate) async fn stream(
    State(s): State<Arc<Shared>>,
    query: Result<Query<NextQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query_of(query)?;
    let permit = s.stream_permit()?;
    let names = names_of(q.command.as_deref());
    let events = futures_util::stream::unfold(
        (s, names, permit, false),
        |(s, names, permit, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let wait = s.config.max_wait;
                let event = match take(&s, &names, wait).await {
                    Ok(None) => continue,
                    Ok(Some(offered)) => Event::default()
                        .event("command")
                        .data(serde_json::to_string(&offered).unwrap_or_default()),
                    Err(e) if e.kind == Kind::Stopping => return None,
                    Err(e) => {
                        let event = Event::default().event("error").data(e.body_json());
                        return Some((Ok::<_, Infallible>(event), (s, names, permit, true)));
                    }
                };
                return Some((Ok::<_, Infallible>(event), (s, names, permit, false)));
            }
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The command is not (or no longer) in the database, or not of the command model.
#[derive(Debug, thiserror::Error)]
#[error("no such command")]
struct NoSuchCommand;

/// The command was answered already.
#[derive(Debug, thiserror::Error)]
#[error("the command was answered already (status {0})")]
struct NotPending(String);

/// `POST /v1/commands/{id}/result` with `{"result": ...}` (done), `{"error": "..."}` (failed)
/// or `{"status": "failed", "result": ...}`: writes the outcome to the command item, which
/// replicates to the cloud.
pub(crate) async fn result(
    State(s): State<Arc<Shared>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(handle) = path
        .map_err(|e| ApiError::bad_request(format!("cannot read the path: {}", e.body_text())))?;
    let body = json_body(&headers, body)?;
    let Value::Object(body) = body else {
        return Err(ApiError::invalid(
            "the body must be an object: {\"result\": ...} or {\"error\": \"...\"}".into(),
        ));
    };
    let (done, result) = match (
        body.get("error"),
        body.get("status").and_then(Value::as_str),
    ) {
        (Some(error), _) => (false, serde_json::json!({ "error": error })),
        (None, None | Some("done")) => (true, body.get("result").cloned().unwrap_or_default()),
        (None, Some("failed")) => (false, body.get("result").cloned().unwrap_or_default()),
        (None, Some(other)) => {
            return Err(ApiError::invalid(format!(
                "status {other:?} is not done or failed"
            )))
        }
    };
    let result = if result.is_null() {
        Value::Object(Default::default())
    } else {
        result
    };
    let no_such = || ApiError::not_found(format!("no pending command {handle}"));
    let Some(key) = key_of(&handle) else {
        return Err(no_such());
    };
    let shared = s.clone();
    let written_key = key.clone();
    let written = tokio::task::spawn_blocking(move || {
        let s = shared;
        s.db.write(Origin::Local, |t| {
            let current = match t.get_stored(&written_key)? {
                Some((model, item)) if model.name() == s.command_model => item,
                _ => return Err(DbError::Refused(Box::new(NoSuchCommand))),
            };
            if !is_pending(&current) {
                let status = current
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("none")
                    .to_string();
                return Err(DbError::Refused(Box::new(NotPending(status))));
            }
            let patch = result_patch(&s.schema, &current, done, result);
            t.update(&s.command_model, &patch, false)
        })
    })
    .await
    .map_err(ApiError::task)?;
    let item = match written {
        Ok(item) => item,
        Err(DbError::Refused(e)) if e.is::<NoSuchCommand>() => return Err(no_such()),
        Err(DbError::Refused(e)) if e.is::<NotPending>() => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                Kind::Answered,
                format!("command {handle}: {e}; the first answer stands"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    {
        let mut leases = s.leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases.held.remove(&key);
        leases.answered += 1;
    }
    Ok(Json(serde_json::json!({ "item": item })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_is_the_key_and_nothing_else_decodes() {
        let key = ItemKey {
            pk: "device#d1".into(),
            sk: "command#01J".into(),
        };
        let handle = handle_of(&key);
        assert!(handle.chars().all(|c| c.is_ascii_hexdigit()), "{handle}");
        assert_eq!(key_of(&handle), Some(key));
        assert_eq!(key_of("zz"), None);
        assert_eq!(key_of(&hex::encode(b"no separator")), None);
    }

    #[test]
    fn command_names_filter() {
        assert_eq!(names_of(None), None);
        assert_eq!(names_of(Some("")), None);
        assert_eq!(
            names_of(Some("reboot, update")),
            Some(vec!["reboot".to_string(), "update".to_string()])
        );
    }
}
