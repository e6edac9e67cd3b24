//! The one error shape of the local API, `{"error": "<sentence>", "kind": "<code>"}`, as in the
//! cloud's API, and the status and kind of every database error.
//!
//! `kind` is for programs: an existing kind keeps its name and meaning. `error` is for people:
//! what failed and what to do.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use devtables_db::DbError;
use serde::Serialize;

use crate::changelog::ReadError;
use crate::{ChangeTooLarge, OutboxFull};

/// The closed set of error kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A parameter or a field breaks a rule (400).
    Invalid,
    /// The request could not be read: not JSON, not `application/json`, a malformed query
    /// string (400, 415).
    BadRequest,
    /// The TCP listener refused a request for a host that is not loopback (403).
    Forbidden,
    /// The model may not be written on the device (`enable: 'cloud'`, `sync: 'down'`) (403).
    NotWritable,
    /// No such model, item or command (404).
    NotFound,
    /// No route serves this path (404).
    NoRoute,
    /// The route does not take this method (405).
    MethodNotAllowed,
    /// The item exists already (409).
    Exists,
    /// A `unique` field's value is held by another item (409).
    NotUnique,
    /// The command was answered already (409).
    Answered,
    /// The write was refused for another reason (409).
    Refused,
    /// The change log no longer holds the changes after the cursor: read the items again and
    /// follow from `latest` (410).
    Gone,
    /// The body or the item is larger than allowed (413).
    TooLarge,
    /// The sync outbox is full: the device has been offline too long (503).
    OutboxFull,
    /// Too many streams and long-polls are open (503).
    Busy,
    /// The agent is stopping (503).
    Stopping,
    /// The database failed (500).
    Store,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: Kind,
    pub message: String,
    /// For `gone`: the oldest cursor the log can resume from and the newest change.
    pub bounds: Option<(u64, u64)>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    oldest: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latest: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: Kind, message: String) -> ApiError {
        ApiError {
            status,
            kind,
            message,
            bounds: None,
        }
    }

    pub fn invalid(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Kind::Invalid, message)
    }

    pub fn bad_request(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, Kind::BadRequest, message)
    }

    pub fn not_found(message: String) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, Kind::NotFound, message)
    }

    pub fn busy(message: String) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Kind::Busy, message)
    }

    pub fn stopping() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Kind::Stopping,
            "the agent is stopping: retry once it runs again".into(),
        )
    }

    /// A blocking task of the request failed (it panicked or the runtime is stopping).
    pub fn task(e: tokio::task::JoinError) -> ApiError {
        tracing::error!("a local API task failed: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Kind::Store,
            format!("the request's database work failed: {e}"),
        )
    }

    pub fn from_body_rejection(rejection: BytesRejection) -> ApiError {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                Kind::TooLarge,
                "the body is larger than the local API takes (local_api.max_body_bytes)".into(),
            )
        } else {
            ApiError::new(
                status,
                Kind::BadRequest,
                format!("cannot read the body: {}", rejection.body_text()),
            )
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        let (status, kind) = match &e {
            DbError::UnknownModel(_) | DbError::NotFound { .. } => {
                (StatusCode::NOT_FOUND, Kind::NotFound)
            }
            DbError::Invalid(_)
            | DbError::BadIndexValue { .. }
            | DbError::UnknownIndex(_)
            | DbError::BadCursor(_)
            | DbError::TooManyOperations { .. }
            | DbError::BadInput(_)
            | DbError::Import { .. }
            | DbError::Json(_) => (StatusCode::BAD_REQUEST, Kind::Invalid),
            DbError::Exists { .. } => (StatusCode::CONFLICT, Kind::Exists),
            DbError::NotUnique { .. } => (StatusCode::CONFLICT, Kind::NotUnique),
            DbError::NotOnDevice(_) | DbError::DownOnly(_) => {
                (StatusCode::FORBIDDEN, Kind::NotWritable)
            }
            DbError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, Kind::TooLarge),
            DbError::Refused(inner) if inner.is::<OutboxFull>() => {
                (StatusCode::SERVICE_UNAVAILABLE, Kind::OutboxFull)
            }
            DbError::Refused(inner) if inner.is::<ChangeTooLarge>() => {
                (StatusCode::PAYLOAD_TOO_LARGE, Kind::TooLarge)
            }
            DbError::Refused(_) => (StatusCode::CONFLICT, Kind::Refused),
            DbError::ReadOnly { .. } | DbError::Closed => {
                (StatusCode::SERVICE_UNAVAILABLE, Kind::Stopping)
            }
            DbError::Corrupt(_)
            | DbError::Io(_)
            | DbError::Storage(_)
            | DbError::Damaged { .. } => {
                tracing::error!("local API: the database failed: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, Kind::Store)
            }
        };
        ApiError::new(status, kind, e.to_string())
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> ApiError {
        match e {
            ReadError::Gone { oldest, latest, .. } => ApiError {
                status: StatusCode::GONE,
                kind: Kind::Gone,
                message: e.to_string(),
                bounds: Some((oldest, latest)),
            },
            ReadError::Db(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            kind: self.kind,
            oldest: self.bounds.map(|b| b.0),
            latest: self.bounds.map(|b| b.1),
        };
        (self.status, Json(body)).into_response()
    }
}

impl ApiError {
    /// The JSON of this error (for a server-sent `error` event).
    pub fn body_json(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: &self.message,
            kind: self.kind,
            oldest: self.bounds.map(|b| b.0),
            latest: self.bounds.map(|b| b.1),
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_get_the_status_and_kind_a_program_can_act_on() {
        let cases: Vec<(DbError, StatusCode, Kind)> = vec![
            (
                DbError::UnknownModel("Nope".into()),
                StatusCode::NOT_FOUND,
                Kind::NotFound,
            ),
            (
                DbError::Exists {
                    model: "Fault".into(),
                    key: "k".into(),
                },
                StatusCode::CONFLICT,
                Kind::Exists,
            ),
            (
                DbError::DownOnly("Firmware".into()),
                StatusCode::FORBIDDEN,
                Kind::NotWritable,
            ),
            (
                DbError::BadCursor("x".into()),
                StatusCode::BAD_REQUEST,
                Kind::Invalid,
            ),
            (
                DbError::Refused(Box::new(OutboxFull { limit: 3 })),
                StatusCode::SERVICE_UNAVAILABLE,
                Kind::OutboxFull,
            ),
            (
                DbError::Refused(Box::new(ChangeTooLarge {
                    model: "Fault".into(),
                    size: 10,
                    max: 5,
                })),
                StatusCode::PAYLOAD_TOO_LARGE,
                Kind::TooLarge,
            ),
            (
                DbError::Corrupt("x".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                Kind::Store,
            ),
        ];
        for (e, status, kind) in cases {
            let text = e.to_string();
            let api = ApiError::from(e);
            assert_eq!((api.status, api.kind), (status, kind), "{text}");
            assert_eq!(api.message, text, "the database's sentence is kept");
        }
    }

    #[test]
    fn a_gone_cursor_says_where_to_resume() {
        let api = ApiError::from(ReadError::Gone {
            cursor: 3,
            oldest: 10,
            latest: 42,
        });
        assert_eq!((api.status, api.kind), (StatusCode::GONE, Kind::Gone));
        let body: serde_json::Value = serde_json::from_str(&api.body_json()).unwrap();
        assert_eq!(body["kind"], "gone");
        assert_eq!(body["oldest"], 10);
        assert_eq!(body["latest"], 42);
        assert!(body["error"].as_str().unwrap().contains("read the items"));
    }
}
