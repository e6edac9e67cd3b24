//! The agent behind the C ABI: start replication from the agent's configuration file, command
//! handlers written in C, the status, waiting for the cloud, and stopping.
//!
//! The agent is asynchronous (tokio); a C program is not. So each `dt_agent` owns a tokio runtime
//! with one worker thread, on which the agent's event loop, its MQTT connection and the command
//! handlers run; the exported functions are plain blocking calls. A call that would block on that
//! runtime from one of its own threads (waiting or stopping from inside a callback) is refused
//! with `DT_ERR_STATE` instead of deadlocking or panicking.

use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devtables_agent::config::AgentFile;
use devtables_agent::{Agent, AgentStatus};
use devtables_db::Db;
use devtables_schema::{Item, Schema};
use serde_json::Value;

use crate::changes::{in_callback, UserPtr};
use crate::db::DtDb;
use crate::error::{guard, panic_text, CapiError, DtCode};
use crate::text::{borrow, borrow_opt, clear, put};

/// How long `dt_agent_stop` lets the runtime's tasks end before it lets go of them.
const RUNTIME_STOP: Duration = Duration::from_secs(5);

/// Longest pause between two looks at the status while waiting: `pending` is read from the
/// durable outbox, which shrinks without a status message to wake on.
const WAIT_POLL: Duration = Duration::from_millis(50);

/// A running agent (`dt_agent` in C). Opaque to C.
pub struct DtAgent {
    /// Taken by `dt_agent_stop`.
    runtime: Option<tokio::runtime::Runtime>,
    agent: Option<Agent>,
    db: AgentDb,
}

/// The database an agent replicates.
enum AgentDb {
    /// Opened by `dt_agent_start` from the configuration file; closed by `dt_agent_stop`.
    Owned(Box<DtDb>),
    /// The caller's, from `dt_db_open`; it stays open after `dt_agent_stop`.
    Given(*mut DtDb),
}

impl DtAgent {
    fn db(&self) -> &DtDb {
        match &self.db {
            AgentDb::Owned(db) => db,
            // SAFETY: the caller's handle stays live while the agent runs: dt_db_close refuses
            // to close it before dt_agent_stop.
            AgentDb::Given(db) => unsafe { &**db },
        }
    }

    fn agent(&self) -> Result<&Agent, CapiError> {
        self.agent
            .as_ref()
            .ok_or_else(|| CapiError::State("the agent is stopped".into()))
    }
}

/// The agent behind a handle the caller passed.
///
/// # Safety
/// `agent` is NULL or a live handle from `dt_agent_start`.
unsafe fn handle<'a>(agent: *const DtAgent) -> Result<&'a DtAgent, CapiError> {
    // SAFETY: the caller promised a live handle or NULL.
    unsafe { agent.as_ref() }.ok_or(CapiError::Null("agent"))
}

/// Refuses a blocking call made from a thread that the agent (or a change callback) runs on.
fn refuse_inside_callbacks(what: &str) -> Result<(), CapiError> {
    if tokio::runtime::Handle::try_current().is_ok() || in_callback() {
        return Err(CapiError::State(format!(
            "{what} was called from inside a callback (a command handler or a change callback): \
             it would wait for the thread it runs on; call it from another thread"
        )));
    }
    Ok(())
}

/// Starts replicating, as the agent's configuration file at `config_path` says (the JSON5 file
/// of `devtables-agent --config`: account, device, secret, broker, TLS, limits).
///
/// With `db` NULL, the agent opens the file's `schema` and `db` itself (with the file's
/// durability); `dt_agent_db` gives that database, and `dt_agent_stop` closes it. With `db` a
/// handle from `dt_db_open`, the agent replicates it (the file's `schema` and `db` entries are
/// then not used); it stays open after `dt_agent_stop`, and cannot be closed before. One agent
/// per database.
///
/// The agent connects in the background and keeps reconnecting; `dt_agent_wait_ready` waits for
/// the cloud. On success `*out` is the handle, to be stopped with `dt_agent_stop`.
///
/// # Safety
/// `db` is NULL or a live handle from `dt_db_open`; `config_path` is a NUL-terminated string;
/// `out` points to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn dt_agent_start(
    db: *mut DtDb,
    config_path: *const c_char,
    out: *mut *mut DtAgent,
) -> DtCode {
    guard("dt_agent_start", || {
        if out.is_null() {
            return Err(CapiError::Null("out"));
        }
        // SAFETY: non-NULL and writable, as the caller promised.
        unsafe { *out = std::ptr::null_mut() };
        // SAFETY: as the caller promised.
        let config_path = unsafe { borrow(config_path, "config_path") }?;
        let (file, config) = AgentFile::load(Path::new(config_path))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("devtables-agent")
            .enable_all()
            .build()
            .map_err(CapiError::Runtime)?;
        let agent_db = if db.is_null() {
            let schema = Arc::new(Schema::load(&file.schema)?);
            let opened = Db::open(&config.db_path, schema, config.db_options())?;
            AgentDb::Owned(Box::new(DtDb::new(opened)))
        } else {
            // SAFETY: a live handle, as the caller promised.
            let given = unsafe { &*db };
            if given
                .agent_running
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                return Err(CapiError::State(
                    "an agent already runs on this database: one agent per database (stop the \
                     other with dt_agent_stop first)"
                        .into(),
                ));
            }
            AgentDb::Given(db)
        };
        let mut dt = DtAgent {
            runtime: None,
            agent: None,
            db: agent_db,
        };
        let started = {
            let _in_runtime = runtime.enter();
            Agent::start_with_db(config, dt.db().db.clone())
        };
        match started {
            Ok(agent) => {
                dt.db().agent_running.store(true, Ordering::SeqCst);
                dt.agent = Some(agent);
                dt.runtime = Some(runtime);
                // SAFETY: as above.
                unsafe { *out = Box::into_raw(Box::new(dt)) };
                Ok(())
            }
            Err(e) => {
                dt.db().agent_running.store(false, Ordering::SeqCst);
                if let AgentDb::Owned(db) = dt.db {
                    // The start's error is the one to report.
                    let _ = db.close();
                }
                Err(e.into())
            }
        }
    })
}

/// The database the agent replicates: the one given to `dt_agent_start`, or the one it opened.
/// Borrowed: valid until `dt_agent_stop` for a database the agent opened (never pass it to
/// `dt_db_close`); NULL when `agent` is NULL.
///
/// # Safety
/// `agent` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn dt_agent_db(agent: *mut DtAgent) -> *mut DtDb {
    // SAFETY: as the caller promised.
    match unsafe { agent.as_ref() } {
        Some(a) => a.db() as *const DtDb as *mut DtDb,
        None => std::ptr::null_mut(),
    }
}

/// The agent's status as JSON, owned by the caller (free it with `dt_free`): `connected`,
/// `ready` (the cloud welcomed the session), `pending` (local changes not yet acknowledged, read
/// from the durable outbox), `cursor`, `last_error`, and the counters of docs/device.md.
///
/// # Safety
/// `agent` is a live handle; `out_json` points to writable storage for one pointer.
#[no_mangle]
pub unsafe extern "C" fn dt_agent_status(
    agent: *mut DtAgent,
    out_json: *mut *mut c_char,
) -> DtCode {
    // SAFETY: as the caller promised.
    unsafe { clear(out_json) };
    guard("dt_agent_status", || {
        if out_json.is_null() {
            return Err(CapiError::Null("out_json"));
        }
        // SAFETY: as the caller promised.
        let status = unsafe { handle(agent) }?.agent()?.status();
        // SAFETY: as above.
        unsafe { put(out_json, &status) };
        Ok(())
    })
}

/// Waits until `done` holds for the status, at most `timeout_ms`.
fn wait_for(
    dt: &DtAgent,
    what: &'static str,
    timeout_ms: u32,
    done: impl Fn(&AgentStatus) -> bool,
) -> Result<(), CapiError> {
    refuse_inside_callbacks(what)?;
    let agent = dt.agent()?;
    let runtime = dt
        .runtime
        .as_ref()
        .ok_or_else(|| CapiError::State("the agent is stopped".into()))?;
    let deadline = Instant::now() + Duration::from_millis(timeout_ms.into());
    let mut changes = agent.watch_status();
    runtime.block_on(async {
        loop {
            let status = agent.status();
            if done(&status) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CapiError::Timeout {
                    ms: timeout_ms,
                    what,
                    status: serde_json::to_string(&status).unwrap_or_default(),
                });
            }
            let pause = (deadline - now).min(WAIT_POLL);
            match tokio::time::timeout(pause, changes.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                // The event loop ended: nothing will wake us, look again after the pause.
                Ok(Err(_)) => tokio::time::sleep(pause).await,
            }
        }
    })
}

/// Waits until the cloud has welcomed the agent's session (changes flow both ways), at most
/// `timeout_ms` milliseconds: `DT_OK`, or `DT_ERR_TIMEOUT` with the status in `dt_last_error`.
/// Not from inside a callback (`DT_ERR_STATE`).
///
/// # Safety
/// `agent` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn dt_agent_wait_ready(agent: *mut DtAgent, timeout_ms: u32) -> DtCode {
    guard("dt_agent_wait_ready", || {
        // SAFETY: as the caller promised.
        let dt = unsafe { handle(agent) }?;
        wait_for(dt, "the cloud to welcome the agent", timeout_ms, |s| {
            s.ready
        })
    })
}

/// Waits until the agent is connected to the cloud and every local change so far is
/// acknowledged (the outbox is empty), at most `timeout_ms` milliseconds: `DT_OK`, or
/// `DT_ERR_TIMEOUT` with the status in `dt_last_error`. Not from inside a callback
/// (`DT_ERR_STATE`).
///
/// # Safety
/// `agent` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn dt_agent_wait_synced(agent: *mut DtAgent, timeout_ms: u32) -> DtCode {
    guard("dt_agent_wait_synced", || {
        // SAFETY: as the caller promised.
        let dt = unsafe { handle(agent) }?;
        wait_for(
            dt,
            "every local change to be acknowledged",
            timeout_ms,
            |s| s.ready && s.pending == 0,
        )
    })
}

/// A command handler: `user` is the pointer given to `dt_on_command`; `command_json` is the
/// command item (`{"id": ..., "command": "reboot", "args": {...}, "status": "pending", ...}`),
/// valid only during the call; the handler answers through `reply` (`dt_reply_ok` or
/// `dt_reply_fail`), which is valid only during the call too.
pub type DtCommandFn = Option<
    unsafe extern "C-unwind" fn(
        user: *mut c_void,
        command_json: *const c_char,
        reply: *mut DtReply,
    ),
>;

/// The answer of one command handler call (`dt_reply` in C). Opaque to C; lives for one call.
pub struct DtReply {
    outcome: Option<Result<Value, String>>,
}

/// Runs `handler(user, command_json, reply)` for every command item named `name` that arrives
/// from the cloud with status `pending` (and for those already waiting in the database): the
/// reply becomes the item's `status` (`done` or `failed`) and `result`, written back and synced
/// up. Registering a name again replaces its handler.
///
/// Thread rules: the handler runs on the agent's runtime thread, one command at a time; keep it
/// short (hand long work to a thread of yours: the connection waits meanwhile). It may read and
/// write the database; it must not stop the agent or wait on it, and must not unwind. A command
/// runs at least once: after a crash before its result was stored it runs again, so handlers
/// must tolerate a repeat (or check the item). `user` must stay valid until `dt_agent_stop`
/// returns.
///
/// # Safety
/// `agent` is a live handle; `name` is a NUL-terminated string; `handler` is safe to call with
/// `user` from the agent's thread.
#[no_mangle]
pub unsafe extern "C" fn dt_on_command(
    agent: *mut DtAgent,
    name: *const c_char,
    handler: DtCommandFn,
    user: *mut c_void,
) -> DtCode {
    guard("dt_on_command", || {
        // SAFETY: as the caller promised.
        let dt = unsafe { handle(agent) }?;
        let name = unsafe { borrow(name, "name") }?.to_string();
        let handler = handler.ok_or(CapiError::Null("handler"))?;
        let user = UserPtr(user);
        let command = name.clone();
        dt.agent()?.on_command(
            &name,
            Arc::new(move |item: &Item| {
                let text = CString::new(Value::Object(item.clone()).to_string())
                    .map_err(|e| format!("the command item cannot be passed to C: {e}"))?;
                let mut reply = DtReply { outcome: None };
                let user = user;
                // SAFETY: the caller of dt_on_command promised the handler is safe to call with
                // `user` here; the text and the reply live until it returns.
                let called = catch_unwind(AssertUnwindSafe(|| unsafe {
                    handler(user.0, text.as_ptr(), &mut reply)
                }));
                match called {
                    Ok(()) => reply.outcome.unwrap_or_else(|| {
                        Err(format!(
                            "the handler of command {command:?} returned without dt_reply_ok \
                             or dt_reply_fail"
                        ))
                    }),
                    Err(payload) => Err(format!(
                        "the handler of command {command:?} panicked: {}",
                        panic_text(&*payload)
                    )),
                }
            }),
        );
        Ok(())
    })
}

/// Answers a command with success: `result_json` (any JSON value; an object is stored as the
/// item's `result`, another value as `{"value": ...}`; NULL is `{}`) is copied. Once per call
/// of a handler: a second answer is `DT_ERR_STATE`. Invalid JSON is `DT_ERR_JSON` and answers
/// nothing (the handler may answer again).
///
/// # Safety
/// `reply` is the pointer the handler was given, during its call; `result_json` is NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn dt_reply_ok(reply: *mut DtReply, result_json: *const c_char) -> DtCode {
    guard("dt_reply_ok", || {
        // SAFETY: as the caller promised.
        let reply = unsafe { reply.as_mut() }.ok_or(CapiError::Null("reply"))?;
        let result = match unsafe { borrow_opt(result_json, "result_json") }? {
            Some(text) => serde_json::from_str(text).map_err(|source| CapiError::Json {
                name: "result_json",
                source,
            })?,
            None => Value::Object(Item::new()),
        };
        answer(reply, Ok(result))
    })
}

/// Answers a command with failure: the item's `status` becomes `failed` and its `result`
/// `{"error": message}` (NULL: "failed"). Once per call of a handler, like `dt_reply_ok`.
///
/// # Safety
/// `reply` is the pointer the handler was given, during its call; `message` is NULL or a
/// NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn dt_reply_fail(reply: *mut DtReply, message: *const c_char) -> DtCode {
    guard("dt_reply_fail", || {
        // SAFETY: as the caller promised.
        let reply = unsafe { reply.as_mut() }.ok_or(CapiError::Null("reply"))?;
        let message = unsafe { borrow_opt(message, "message") }?.unwrap_or("failed");
        answer(reply, Err(message.to_string()))
    })
}

fn answer(reply: &mut DtReply, outcome: Result<Value, String>) -> Result<(), CapiError> {
    if reply.outcome.is_some() {
        return Err(CapiError::State(
            "this command was answered already: call dt_reply_ok or dt_reply_fail once".into(),
        ));
    }
    reply.outcome = Some(outcome);
    Ok(())
}

/// Stops the agent: its event loop ends (what is not acknowledged stays in the durable outbox
/// and is sent by the next agent on this database), the database it opened is closed, and the
/// handle is freed. A database given to `dt_agent_start` stays open. NULL does nothing. Not from
/// inside a callback (`DT_ERR_STATE`; the handle stays valid).
///
/// # Safety
/// `agent` is NULL or a live handle, not used again after this call (unless it answered
/// `DT_ERR_STATE`).
#[no_mangle]
pub unsafe extern "C" fn dt_agent_stop(agent: *mut DtAgent) -> DtCode {
    guard("dt_agent_stop", || {
        if agent.is_null() {
            return Ok(());
        }
        refuse_inside_callbacks("dt_agent_stop")?;
        // SAFETY: made by Box::into_raw in dt_agent_start; the caller gives it up.
        let mut dt = unsafe { Box::from_raw(agent) };
        if let (Some(runtime), Some(running)) = (dt.runtime.take(), dt.agent.take()) {
            runtime.block_on(running.shutdown());
            runtime.shutdown_timeout(RUNTIME_STOP);
        }
        dt.db().agent_running.store(false, Ordering::SeqCst);
        match dt.db {
            AgentDb::Owned(db) => db.close(),
            AgentDb::Given(_) => Ok(()),
        }
    })
}
