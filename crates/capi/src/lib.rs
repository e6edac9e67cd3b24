//! The devtables device library for C: the device database and the replication agent behind a
//! C ABI, for device applications written in C (the embedded norm) or any language with a C FFI.
//!
//! It exists because the Rust API (`devtables_db::Db`, `devtables_agent::Agent`) cannot be
//! called from C: this crate is a thin boundary over it, nothing more. Items go in and out as
//! JSON text, handles are opaque pointers, failures are codes plus a message, and no panic ever
//! crosses into C. The header is `include/devtables.h`, generated from this crate by cbindgen
//! (a test keeps it current); docs/device.md is the guide, `examples/c/` a whole program.
//!
//! # The rules of the ABI
//! - **Results**: every function that can fail returns a `dt_code`; `DT_OK` is 0. The sentence
//!   explaining the last failure on the calling thread is `dt_last_error()`.
//! - **Strings in**: NUL-terminated UTF-8, borrowed for the call only.
//! - **Strings out** (`char **out_json`): allocated by this library, owned by the caller, freed
//!   with `dt_free` (never `free()`). Optional where the documentation says so (pass NULL); set to
//!   NULL on failure.
//! - **Handles**: `dt_db` from `dt_db_open` (closed by `dt_db_close`), `dt_agent` from
//!   `dt_agent_start` (stopped by `dt_agent_stop`). Every function of a handle may be called
//!   from any thread at the same time, except its close/stop.
//! - **Callbacks** (changes, commands) run on the library's or a writer's thread; each
//!   function's documentation says which, and what they may call.
//! - **Panics**: caught at the boundary (`DT_ERR_PANIC`), also those of a Rust callback. Built
//!   with a `panic = "abort"` profile (the `release-device` profile), a panic ends the process
//!   instead: see docs/device.md.
//!
//! # Layout
//! - `error`: the codes (`dt_code`), the per-thread message, the guard around every function.
//! - `text`: C strings in and out, and the one allocator rule for returned strings.
//! - `db`: open, close, create/get/find/update/upsert/remove, batches (why no begin/commit: see
//!   there).
//! - `changes`: change callbacks, and how unsubscribing waits for a running call.
//! - `agent`: the agent on a runtime of its own, command handlers, status, waits, stop.

mod agent;
mod changes;
mod db;
mod error;
mod text;

use std::ffi::{c_char, c_int};

pub use agent::{
    dt_agent_db, dt_agent_start, dt_agent_status, dt_agent_stop, dt_agent_wait_ready,
    dt_agent_wait_synced, dt_on_command, dt_reply_fail, dt_reply_ok, DtAgent, DtCommandFn, DtReply,
};
pub use changes::{dt_subscribe, dt_unsubscribe, DtChangeFn};
pub use db::{
    dt_batch, dt_create, dt_db_close, dt_db_open, dt_find, dt_get, dt_remove, dt_update, dt_upsert,
    DtDb,
};
pub use error::DtCode;

/// The library's version, a static string (never freed).
#[no_mangle]
pub extern "C" fn dt_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Why the last failed call on this thread failed (what failed, and what to do), or "" after a
/// call that succeeded. Owned by the library: valid until the next `dt_` call on this thread, so
/// copy it to keep it. Never NULL.
#[no_mangle]
pub extern "C" fn dt_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// The name of a code (`"DT_ERR_JSON"`), a static string; `"DT_UNKNOWN"` for a value that is no
/// code.
#[no_mangle]
pub extern "C" fn dt_code_name(code: c_int) -> *const c_char {
    let name = DtCode::all()
        .into_iter()
        .find(|c| *c as c_int == code)
        .map_or(c"DT_UNKNOWN", DtCode::name);
    name.as_ptr()
}

/// Frees a string this library returned through a `char **` argument. NULL does nothing.
///
/// # Safety
/// `text` is NULL or a string this library returned and that was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn dt_free(text: *mut c_char) {
    // SAFETY: as the caller promised.
    unsafe { text::take_back(text) }
}
