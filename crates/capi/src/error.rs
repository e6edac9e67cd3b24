//! Result codes, the per-thread error message, and the guard every exported function runs in.
//!
//! A C caller gets two things from a failed call: a [`DtCode`] to branch on, and a sentence for
//! people from `dt_last_error` (what failed and what to do). The guard ([`guard`]) turns every
//! Rust error into both and every panic into [`DtCode::DT_ERR_PANIC`], so no unwinding ever reaches
//! C code, which cannot handle it.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use devtables_agent::{AgentError, OutboxFull};
use devtables_db::{DbError, OpenError};
use devtables_schema::SchemaError;

/// What a call did. `DT_OK` (0) is success; `DT_NOT_FOUND` is an answer, not a failure (the item
/// is absent); every other code is a failure whose sentence `dt_last_error` gives.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DtCode {
    /// Success.
    DT_OK = 0,
    /// The item asked for does not exist (`dt_get`, `dt_update`, `dt_remove` of nothing).
    DT_NOT_FOUND = 1,
    /// A required pointer was NULL, or a string was not UTF-8. A bug in the caller.
    DT_ERR_ARGUMENT = 2,
    /// A JSON argument could not be read, or is not of the expected shape (an object, an array).
    DT_ERR_JSON = 3,
    /// The schema refuses the request: unknown model or index, a field of the wrong type or
    /// failing its validation, an item too large, a bad page token, too many batch operations.
    DT_ERR_INVALID = 4,
    /// The item exists already (`dt_create`), or a `unique` value is held by another item.
    DT_ERR_CONFLICT = 5,
    /// The write is not allowed on the device: the model is cloud-only or synced down only, or
    /// the database was opened read-only.
    DT_ERR_REFUSED = 6,
    /// The outbox is full (the device has been offline long): retry once the cloud has
    /// acknowledged some changes.
    DT_ERR_FULL = 7,
    /// The file could not be opened, read or written (missing, permission, disk, lock held by
    /// another process).
    DT_ERR_STORAGE = 8,
    /// The database file is damaged: restore it from a backup.
    DT_ERR_DAMAGED = 9,
    /// The schema file is invalid, or differs incompatibly from the one the database was written
    /// with.
    DT_ERR_SCHEMA = 10,
    /// The agent's configuration file is invalid (identity, broker, TLS, credentials).
    DT_ERR_CONFIG = 11,
    /// The call is not allowed in this state: closing a database an agent runs on, starting a
    /// second agent on one database, waiting on the agent from inside one of its callbacks,
    /// replying twice to a command.
    DT_ERR_STATE = 12,
    /// The wait ended before the condition held.
    DT_ERR_TIMEOUT = 13,
    /// A bug in devtables (or a panicking callback) was caught at the boundary: the operation's
    /// outcome is unknown, the process is intact. Please report the message.
    DT_ERR_PANIC = 14,
}

impl DtCode {
    /// Every code, in value order.
    pub fn all() -> [DtCode; 15] {
        [
            DtCode::DT_OK,
            DtCode::DT_NOT_FOUND,
            DtCode::DT_ERR_ARGUMENT,
            DtCode::DT_ERR_JSON,
            DtCode::DT_ERR_INVALID,
            DtCode::DT_ERR_CONFLICT,
            DtCode::DT_ERR_REFUSED,
            DtCode::DT_ERR_FULL,
            DtCode::DT_ERR_STORAGE,
            DtCode::DT_ERR_DAMAGED,
            DtCode::DT_ERR_SCHEMA,
            DtCode::DT_ERR_CONFIG,
            DtCode::DT_ERR_STATE,
            DtCode::DT_ERR_TIMEOUT,
            DtCode::DT_ERR_PANIC,
        ]
    }

    /// The code's name as in the header (`"DT_ERR_JSON"`).
    pub fn name(self) -> &'static CStr {
        match self {
            DtCode::DT_OK => c"DT_OK",
            DtCode::DT_NOT_FOUND => c"DT_NOT_FOUND",
            DtCode::DT_ERR_ARGUMENT => c"DT_ERR_ARGUMENT",
            DtCode::DT_ERR_JSON => c"DT_ERR_JSON",
            DtCode::DT_ERR_INVALID => c"DT_ERR_INVALID",
            DtCode::DT_ERR_CONFLICT => c"DT_ERR_CONFLICT",
            DtCode::DT_ERR_REFUSED => c"DT_ERR_REFUSED",
            DtCode::DT_ERR_FULL => c"DT_ERR_FULL",
            DtCode::DT_ERR_STORAGE => c"DT_ERR_STORAGE",
            DtCode::DT_ERR_DAMAGED => c"DT_ERR_DAMAGED",
            DtCode::DT_ERR_SCHEMA => c"DT_ERR_SCHEMA",
            DtCode::DT_ERR_CONFIG => c"DT_ERR_CONFIG",
            DtCode::DT_ERR_STATE => c"DT_ERR_STATE",
            DtCode::DT_ERR_TIMEOUT => c"DT_ERR_TIMEOUT",
            DtCode::DT_ERR_PANIC => c"DT_ERR_PANIC",
        }
    }
}

/// Why a call failed, before it becomes a code and a message at the boundary.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CapiError {
    #[error("argument {0} is NULL")]
    Null(&'static str),
    #[error("argument {name} is not UTF-8 text: {source}")]
    NotUtf8 {
        name: &'static str,
        source: std::str::Utf8Error,
    },
    #[error("argument {name} is not valid JSON: {source}")]
    Json {
        name: &'static str,
        source: serde_json::Error,
    },
    #[error("argument {name} must be {expected}")]
    Shape {
        name: &'static str,
        expected: &'static str,
    },
    #[error("no {model} item with the key {key}")]
    NotFound { model: String, key: String },
    #[error("no change subscription {0} on this database (unsubscribed already?)")]
    UnknownSubscription(u64),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot start the agent's runtime thread: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    State(String),
    #[error("timed out after {ms} ms waiting for {what}; agent status: {status}")]
    Timeout {
        ms: u32,
        what: &'static str,
        status: String,
    },
}

impl CapiError {
    pub(crate) fn code(&self) -> DtCode {
        match self {
            CapiError::Null(_) | CapiError::NotUtf8 { .. } => DtCode::DT_ERR_ARGUMENT,
            CapiError::Json { .. } | CapiError::Shape { .. } => DtCode::DT_ERR_JSON,
            CapiError::NotFound { .. } | CapiError::UnknownSubscription(_) => DtCode::DT_NOT_FOUND,
            CapiError::Db(e) => db_code(e),
            CapiError::Open(e) => open_code(e),
            CapiError::Schema(_) => DtCode::DT_ERR_SCHEMA,
            CapiError::Agent(e) => match e {
                AgentError::Open(e) => open_code(e),
                AgentError::State(e) => db_code(e),
                AgentError::Identity(_) | AgentError::Config(_) => DtCode::DT_ERR_CONFIG,
            },
            CapiError::Runtime(_) => DtCode::DT_ERR_STORAGE,
            CapiError::State(_) => DtCode::DT_ERR_STATE,
            CapiError::Timeout { .. } => DtCode::DT_ERR_TIMEOUT,
        }
    }
}

fn db_code(e: &DbError) -> DtCode {
    match e {
        DbError::NotFound { .. } => DtCode::DT_NOT_FOUND,
        DbError::Exists { .. } | DbError::NotUnique { .. } => DtCode::DT_ERR_CONFLICT,
        DbError::NotOnDevice(_) | DbError::DownOnly(_) | DbError::ReadOnly { .. } => {
            DtCode::DT_ERR_REFUSED
        }
        DbError::Refused(inner) if inner.is::<OutboxFull>() => DtCode::DT_ERR_FULL,
        // A change too large for one sync message, or another interceptor's refusal: the same
        // write will be refused again.
        DbError::Refused(_) => DtCode::DT_ERR_INVALID,
        DbError::Json(_) => DtCode::DT_ERR_JSON,
        DbError::Corrupt(_) | DbError::Damaged { .. } => DtCode::DT_ERR_DAMAGED,
        DbError::Io(_) | DbError::Storage(_) => DtCode::DT_ERR_STORAGE,
        DbError::Closed => DtCode::DT_ERR_STATE,
        DbError::Import { source, .. } => db_code(source),
        DbError::UnknownModel(_)
        | DbError::Invalid(_)
        | DbError::TooLarge { .. }
        | DbError::BadIndexValue { .. }
        | DbError::UnknownIndex(_)
        | DbError::BadCursor(_)
        | DbError::TooManyOperations { .. }
        | DbError::BadInput(_) => DtCode::DT_ERR_INVALID,
    }
}

fn open_code(e: &OpenError) -> DtCode {
    match e {
        OpenError::Storage { .. }
        | OpenError::Missing { .. }
        | OpenError::Permission { .. }
        | OpenError::Thread(_)
        | OpenError::Tables { .. }
        | OpenError::Convert { .. } => DtCode::DT_ERR_STORAGE,
        OpenError::Damaged { .. } | OpenError::UnsupportedFormat { .. } => DtCode::DT_ERR_DAMAGED,
        OpenError::SchemaChanged { .. }
        | OpenError::SchemaRecord { .. }
        | OpenError::NotUnique(_) => DtCode::DT_ERR_SCHEMA,
    }
}

thread_local! {
    /// The message of the last call on this thread that failed; `None` after a success.
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

/// Records the outcome of a call on this thread: its message on failure, nothing on success.
pub(crate) fn set_last_error(message: Option<String>) {
    let message = message.map(|m| {
        // A NUL inside a message (from user input echoed back) would end the C string early.
        CString::new(m.replace('\0', "\\0")).unwrap_or_default()
    });
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message);
}

/// The current thread's last message, or an empty string; the pointer stays valid until the next
/// call that records an outcome on this thread.
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|slot| match &*slot.borrow() {
        Some(m) => m.as_ptr(),
        None => c"".as_ptr(),
    })
}

/// The text of a caught panic's payload.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Runs the body of an exported function: its error becomes a code and this thread's message, a
/// panic becomes [`DtCode::DT_ERR_PANIC`]. `what` names the function in the panic message.
pub(crate) fn guard(what: &str, body: impl FnOnce() -> Result<(), CapiError>) -> DtCode {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error(None);
            DtCode::DT_OK
        }
        Ok(Err(e)) => {
            set_last_error(Some(e.to_string()));
            e.code()
        }
        Err(payload) => {
            set_last_error(Some(format!(
                "{what}: internal error (a panic was caught at the C boundary): {}; the \
                 operation's outcome is unknown, please report this",
                panic_text(&*payload)
            )));
            DtCode::DT_ERR_PANIC
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: the pointer is valid until the next outcome is recorded on this thread.
        unsafe { CStr::from_ptr(last_error_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_success_clears_the_message_and_a_failure_sets_it() {
        assert_eq!(
            guard("t", || Err(CapiError::Null("model"))),
            DtCode::DT_ERR_ARGUMENT
        );
        assert_eq!(last(), "argument model is NULL");
        assert_eq!(guard("t", || Ok(())), DtCode::DT_OK);
        assert_eq!(last(), "");
    }

    #[test]
    fn a_panic_is_a_code_and_a_message_not_an_unwind() {
        let code = guard("dt_test", || panic!("boom {}", 7));
        assert_eq!(code, DtCode::DT_ERR_PANIC);
        let message = last();
        assert!(
            message.starts_with("dt_test: internal error") && message.contains("boom 7"),
            "{message}"
        );
    }

    #[test]
    fn a_nul_in_a_message_does_not_cut_it() {
        set_last_error(Some("before\0after".into()));
        assert_eq!(last(), "before\\0after");
    }

    #[test]
    fn database_errors_map_to_the_codes_a_caller_branches_on() {
        let cases = [
            (
                DbError::Exists {
                    model: "M".into(),
                    key: "k".into(),
                },
                DtCode::DT_ERR_CONFLICT,
            ),
            (
                DbError::NotFound {
                    model: "M".into(),
                    key: "k".into(),
                },
                DtCode::DT_NOT_FOUND,
            ),
            (DbError::DownOnly("M".into()), DtCode::DT_ERR_REFUSED),
            (DbError::UnknownModel("M".into()), DtCode::DT_ERR_INVALID),
            (
                DbError::Refused(Box::new(OutboxFull { limit: 1 })),
                DtCode::DT_ERR_FULL,
            ),
            (DbError::Corrupt("x".into()), DtCode::DT_ERR_DAMAGED),
            (DbError::Closed, DtCode::DT_ERR_STATE),
        ];
        for (e, code) in cases {
            assert_eq!(CapiError::Db(e).code(), code);
        }
    }
}
