//! The local API: the agent's device database, its change stream and its commands over HTTP on
//! a Unix socket (and optionally on loopback TCP), for device applications in any language.
//!
//! Why: while the agent runs, its database file is locked; an application that is not written
//! in Rust (Python, Node, a shell script with curl) needs another way in. This is that way: the
//! same operations as the Rust library and the C library, plus what a separate process needs in
//! place of callbacks: a durable change stream it can resume ([`crate::changelog`]) and command
//! delivery with leases.
//!
//! | Method and path | What |
//! |---|---|
//! | `GET /v1/status` | the agent's status, the change log's bounds, the commands waiting |
//! | `POST /v1/items/{model}` | create (body: the item) → 201 `{item}` |
//! | `PUT /v1/items/{model}` | upsert → `{item}` |
//! | `PATCH /v1/items/{model}` | update the given fields → `{item}` |
//! | `DELETE /v1/items/{model}?where=JSON` | remove → `{item}` (the item removed) |
//! | `GET /v1/items/{model}/one?where=JSON` | get one by its key fields → `{item}` |
//! | `GET /v1/items/{model}?where=JSON&limit=&next=&index=&reverse=` | find, a page → `{items, next}` |
//! | `POST /v1/batch` `{ops: [{op, model, item}]}` | several writes in one transaction → `{results}` |
//! | `GET /v1/changes?from=&model=` | changes after a cursor: server-sent events (`Accept: text/event-stream`, resumable with `Last-Event-ID`), or a JSON page with `wait=` (long-poll) |
//! | `GET /v1/commands` | the pending commands waiting for an application |
//! | `GET /v1/commands/next?wait=&command=` | take one (long-poll): leased for `command_lease_secs`, offered again if unanswered |
//! | `GET /v1/commands/stream?command=` | the same as server-sent events |
//! | `POST /v1/commands/{id}/result` `{result}` or `{error}` | answer it: the result is written to the command item and replicates to the cloud |
//!
//! Every error is `{"error": "<sentence>", "kind": "<code>"}` with a fitting status, as in the
//! cloud's API ([`error`]). Bodies are JSON (`Content-Type: application/json`, at most
//! `max_body_bytes`), pages at most `max_page` items, waits at most `max_wait`, open streams and
//! long-polls at most `max_streams`.
//!
//! Access: the Unix socket is the access control (mode 0600, or 0660 with `socket_group`); there
//! are no keys. The TCP listener, off by default, takes loopback addresses only, and then every
//! local user can reach it; it refuses requests whose `Host` is not a loopback name (a web page
//! the device's browser loads cannot reach it through DNS rebinding), and bodies must be
//! `application/json` (a cross-site form cannot post one).
//!
//! # Layout
//! - [`error`]: the error shape and the status and kind of each database error.
//! - `items`: the item operations, shared with `--stdin` ([`crate::standalone::stdin_op`]).
//! - `changes`: `GET /v1/changes` over the change log.
//! - `commands`: leases, `next`, `stream`, `result`.

mod changes;
mod commands;
pub mod error;
pub(crate) mod items;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use devtables_db::{Db, HookId, ItemChange};
use devtables_schema::Schema;
use devtables_sync::identity::DeviceId;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};

use crate::changelog::ChangeLogLimits;
use crate::{Agent, AgentConfig, AgentStatus, Handlers};
use error::ApiError;

/// The longest Unix socket path the kernel takes (`sun_path` is 108 bytes with its final NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Items of a page when the request gives no `limit` ([`LocalApiConfig::default_page`]).
pub const DEFAULT_PAGE: usize = 100;

/// The largest `limit` by default ([`LocalApiConfig::max_page`]); `--stdin` pages within it too.
pub const DEFAULT_MAX_PAGE: usize = 1000;

/// How long [`LocalApi::shutdown`] waits for open requests to end before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of the local API. Every limit is here, with its default.
#[derive(Clone, Debug)]
pub struct LocalApiConfig {
    /// The Unix socket to serve on. `None`: no socket (TCP only). The standalone agent's default
    /// is its database file with the extension `.sock`.
    pub socket: Option<PathBuf>,
    /// The group (name or numeric id) whose members may use the socket: mode 0660 with that
    /// group. Default `None`: mode 0600, the agent's user only.
    pub socket_group: Option<String>,
    /// A loopback address to serve on as well (`127.0.0.1:PORT`, `[::1]:PORT`; port 0: any).
    /// Default `None`: nothing listens on the network.
    pub tcp: Option<SocketAddr>,
    /// Largest request body. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Items of a find page (and changes of a JSON page) when the request gives no `limit`.
    /// Default 100.
    pub default_page: usize,
    /// Largest `limit` a request may ask for. Default 1000.
    pub max_page: usize,
    /// Longest `wait` of a long-poll. Default 60 s.
    pub max_wait: Duration,
    /// How long a command taken by an application stays reserved for it; unanswered by then, it
    /// is offered again. Default 30 s.
    pub command_lease: Duration,
    /// Most change streams, command streams and long-polls open at once. Default 64; beyond it
    /// a request is answered 503 `busy`.
    pub max_streams: usize,
    /// What the change log keeps.
    pub change_log: ChangeLogLimits,
}

impl LocalApiConfig {
    /// The defaults, on the Unix socket `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> LocalApiConfig {
        LocalApiConfig {
            socket: Some(socket.into()),
            socket_group: None,
            tcp: None,
            max_body_bytes: 1 << 20,
            default_page: DEFAULT_PAGE,
            max_page: DEFAULT_MAX_PAGE,
            max_wait: Duration::from_secs(60),
            command_lease: Duration::from_secs(30),
            max_streams: 64,
            change_log: ChangeLogLimits::default(),
        }
    }

    /// What the agent must do for this API: keep the change log, and leave commands without a
    /// handler pending for applications to take. Call it before [`Agent::start`].
    pub fn prepare_agent(&self, agent: &mut AgentConfig) {
        agent.change_log = Some(self.change_log);
        agent.hold_unhandled_commands = true;
    }

    /// Checks the settings that do not need the file system.
    pub fn validate(&self) -> Result<(), LocalApiError> {
        if self.socket.is_none() && self.tcp.is_none() {
            return Err(LocalApiError::Config(
                "neither a socket nor a TCP address: set local_api.socket or local_api.tcp, or \
                 turn the local API off (local_api: {enabled: false})"
                    .into(),
            ));
        }
        if let Some(addr) = self.tcp {
            if !addr.ip().is_loopback() {
                return Err(LocalApiError::Config(format!(
                    "local_api.tcp {addr} is not a loopback address: the local API has no keys, \
                     so it listens on 127.0.0.1 or [::1] only (use the Unix socket with \
                     socket_group to share it with other users)"
                )));
            }
        }
        if let Some(path) = &self.socket {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(LocalApiError::Config(format!(
                    "the socket path {} is {len} bytes, more than the {MAX_SOCKET_PATH} a Unix \
                     socket path may have: set local_api.socket to a shorter path",
                    path.display()
                )));
            }
        }
        for (name, value) in [
            ("max_body_bytes", self.max_body_bytes),
            ("default_page", self.default_page),
            ("max_page", self.max_page),
            ("max_streams", self.max_streams),
        ] {
            if value == 0 {
                return Err(LocalApiError::Config(format!(
                    "local_api.{name} must be at least 1"
                )));
            }
        }
        if self.default_page > self.max_page {
            return Err(LocalApiError::Config(format!(
                "local_api.default_page ({}) is larger than max_page ({})",
                self.default_page, self.max_page
            )));
        }
        if self.command_lease.is_zero() {
            return Err(LocalApiError::Config(
                "local_api.command_lease_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Why the local API could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("invalid local API configuration: {0}")]
    Config(String),
    #[error(
        "the agent keeps no change log: start it with the configuration LocalApiConfig::prepare_agent \
         gives (AgentConfig::change_log)"
    )]
    NoChangeLog,
    #[error(
        "another process serves the local API socket {path} (a second agent on the same \
         database?): stop it, or set local_api.socket to another path"
    )]
    SocketInUse { path: PathBuf },
    #[error(
        "{path} exists and is not a socket: it is left alone; remove it or set local_api.socket \
         to another path"
    )]
    NotASocket { path: PathBuf },
    #[error("cannot listen on the local API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the owner group or mode of the local API socket {path}: {detail}")]
    SocketAccess { path: PathBuf, detail: String },
    #[error(
        "cannot listen on {addr} for the local API: {source} (is the port in use? set \
         local_api.tcp to another port)"
    )]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the change log: {0}")]
    ChangeLog(#[from] devtables_db::DbError),
}

/// What every request handler shares.
pub(crate) struct Shared {
    pub(crate) db: Db,
    pub(crate) schema: Arc<Schema>,
    pub(crate) id: DeviceId,
    pub(crate) status: watch::Receiver<AgentStatus>,
    pub(crate) handlers: Handlers,
    pub(crate) command_model: String,
    pub(crate) node: u64,
    pub(crate) config: LocalApiConfig,
    /// Bumped after every committed change (the database's commit hook): change streams wake.
    pub(crate) changed: watch::Sender<u64>,
    /// Bumped after every committed change of the command model: command waiters wake.
    pub(crate) commands_changed: watch::Sender<u64>,
    /// Set when the API stops: streams end and long-polls answer at once.
    pub(crate) stop: watch::Receiver<bool>,
    /// One permit per open stream or long-poll.
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) leases: Mutex<commands::Leases>,
}

impl Shared {
    /// A permit for one stream or long-poll, or 503 `busy`.
    pub(crate) fn stream_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::busy(format!(
                "{} change streams, command streams and long-polls are open, the most the local \
                 API serves at once (local_api.max_streams): close one, or retry later",
                self.config.max_streams
            ))
        })
    }

    /// Resolves when the API stops.
    pub(crate) async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }

    /// The agent's status with `pending` read from the durable outbox now.
    fn agent_status(&self) -> AgentStatus {
        let mut status = self.status.borrow().clone();
        if let Ok(n) = crate::state::outbox_len(&self.db) {
            status.pending = n as usize;
        }
        status
    }
}

/// A running local API. Dropping it does not stop it: call [`LocalApi::shutdown`].
pub struct LocalApi {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    hook: HookId,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
}

impl LocalApi {
    /// Serves `agent`'s database, changes and commands on the configured socket and TCP
    /// address, on the current tokio runtime. The agent must have been started with the
    /// configuration [`LocalApiConfig::prepare_agent`] gives. A stale socket file (no process
    /// behind it) is replaced; a live one is refused ([`LocalApiError::SocketInUse`]).
    pub fn start(agent: &Agent, config: LocalApiConfig) -> Result<LocalApi, LocalApiError> {
        config.validate()?;
        if !agent.change_log {
            return Err(LocalApiError::NoChangeLog);
        }
        let db = agent.db().clone();
        let (changed, _) = watch::channel(0u64);
        let (commands_changed, _) = watch::channel(0u64);
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            db: db.clone(),
            schema: db.schema().clone(),
            id: agent.id().clone(),
            status: agent.watch_status(),
            handlers: agent.handlers.clone(),
            command_model: agent.command_model.clone(),
            node: agent.node,
            config: config.clone(),
            changed,
            commands_changed,
            stop: stop_rx,
            streams: Arc::new(Semaphore::new(config.max_streams)),
            leases: Mutex::default(),
        });
        let socket_listener = match &config.socket {
            Some(path) => Some(bind_socket(path, config.socket_group.as_deref())?),
            None => None,
        };
        let tcp_listener = match config.tcp {
            Some(addr) => {
                let bound = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(tokio::net::TcpListener::from_std);
                match bound {
                    Ok(l) => Some(l),
                    Err(source) => {
                        if let Some(path) = &config.socket {
                            let _ = std::fs::remove_file(path);
                        }
                        return Err(LocalApiError::Tcp { addr, source });
                    }
                }
            }
            None => None,
        };
        let tcp = tcp_listener.as_ref().and_then(|l| l.local_addr().ok());

        let hook_shared = Arc::downgrade(&shared);
        let hook = db.subscribe(Arc::new(move |change: &ItemChange| {
            let Some(shared) = hook_shared.upgrade() else {
                return;
            };
            shared.changed.send_modify(|n| *n = n.wrapping_add(1));
            if change.model == shared.command_model {
                shared
                    .commands_changed
                    .send_modify(|n| *n = n.wrapping_add(1));
            }
        }));

        let mut tasks = Vec::new();
        if let Some(listener) = socket_listener {
            let app = router(shared.clone());
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { shared.stopped().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!("the local API socket stopped serving: {e}");
                }
            }));
        }
        if let Some(listener) = tcp_listener {
            let app = router(shared.clone()).layer(axum::middleware::from_fn(loopback_host_only));
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { shared.stopped().await })
                    .await;
                if let Err(e) = served {
                    tracing::error!("the local API TCP listener stopped serving: {e}");
                }
            }));
        }
        Ok(LocalApi {
            shared,
            stop,
            hook,
            tasks,
            socket: config.socket,
            tcp,
        })
    }

    /// The Unix socket served on.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// The TCP address served on (the port chosen when the configuration said 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Stops serving: streams end, long-polls answer, open requests get [`SHUTDOWN_GRACE`] to
    /// finish; the socket file is removed. Call it before [`Agent::shutdown`].
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for mut task in self.tasks {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("local API requests still open after the grace period: dropped");
                task.abort();
            }
        }
        self.shared.db.unsubscribe(self.hook);
        if let Some(path) = &self.socket {
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), "cannot remove the local API socket: {e}");
                }
            }
        }
    }
}

/// Binds the Unix socket at `path`, replacing a stale one, owner-only or shared with `group`.
fn bind_socket(
    path: &Path,
    group: Option<&str>,
) -> Result<tokio::net::UnixListener, LocalApiError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(LocalApiError::SocketInUse {
                    path: path.to_path_buf(),
                });
            }
            // Left by an agent that did not stop cleanly: nobody listens behind it.
            tracing::info!(path = %path.display(), "replacing a stale local API socket");
            std::fs::remove_file(path).map_err(|source| LocalApiError::Socket {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(LocalApiError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(LocalApiError::Socket {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let listener =
        tokio::net::UnixListener::bind(path).map_err(|source| LocalApiError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    let access = |detail: String| LocalApiError::SocketAccess {
        path: path.to_path_buf(),
        detail,
    };
    let mode = match group {
        Some(group) => {
            let owned = group_id(group).and_then(|gid| {
                std::os::unix::fs::chown(path, None, Some(gid))
                    .map_err(|e| format!("chown to group {group}: {e}"))
            });
            if let Err(detail) = owned {
                let _ = std::fs::remove_file(path);
                return Err(access(detail));
            }
            0o660
        }
        None => 0o600,
    };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        let _ = std::fs::remove_file(path);
        return Err(access(format!("chmod {mode:o}: {e}")));
    }
    Ok(listener)
}

/// The numeric id of a group given by name or number.
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(group)
        .map_err(|_| format!("group name {group:?} holds a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed `group` is a valid value for getgrnam_r to fill.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the NUL-terminated name, the entry and the
    // buffer with its true length, and the result pointer.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot look up group {group:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if found.is_null() {
        return Err(format!("no group named {group:?} on this system"));
    }
    Ok(entry.gr_gid)
}

/// Every route of the local API.
fn router(shared: Arc<Shared>) -> Router {
    let max_body = shared.config.max_body_bytes;
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/items/{model}",
            post(items::create)
                .put(items::upsert)
                .patch(items::update)
                .delete(items::remove)
                .get(items::find_page),
        )
        .route("/v1/items/{model}/one", get(items::get_one))
        .route("/v1/batch", post(items::batch))
        .route("/v1/changes", get(changes::changes))
        .route("/v1/commands", get(commands::list))
        .route("/v1/commands/next", get(commands::next))
        .route("/v1/commands/stream", get(commands::stream))
        .route("/v1/commands/{id}/result", post(commands::result))
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                error::Kind::NoRoute,
                "no route serves this path: see docs/local-api.md for the routes".into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                error::Kind::MethodNotAllowed,
                "this route does not take that method".into(),
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

/// Refuses a TCP request whose `Host` is not a loopback name (see the module doc).
async fn loopback_host_only(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if is_loopback_host(host) {
        next.run(request).await
    } else {
        ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            error::Kind::Forbidden,
            format!(
                "Host {host:?} is not a loopback name: the local API's TCP listener answers \
                 requests for localhost, 127.0.0.1 or [::1] only"
            ),
        )
        .into_response()
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, _)) => inside,
            None => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The answer of `GET /v1/status`.
#[derive(Serialize)]
struct StatusAnswer {
    /// `account/device`.
    device: String,
    #[serde(flatten)]
    agent: AgentStatus,
    local_api: LocalStatus,
}

#[derive(Serialize)]
struct LocalStatus {
    changes: ChangesStatus,
    commands: commands::CommandCounts,
    /// Change streams, command streams and long-polls open now.
    streams_open: usize,
}

#[derive(Serialize)]
struct ChangesStatus {
    /// The newest change's sequence number (a reader that starts now follows from here).
    latest: u64,
    /// The oldest cursor a reader may resume from.
    oldest: u64,
    /// Entries kept.
    kept: u64,
}

async fn status(State(s): State<Arc<Shared>>) -> Result<Json<StatusAnswer>, ApiError> {
    let shared = s.clone();
    let (log, counts) = tokio::task::spawn_blocking(move || {
        let log = crate::changelog::state(&shared.db)?;
        let counts = commands::counts(&shared)?;
        Ok::<_, devtables_db::DbError>((log, counts))
    })
    .await
    .map_err(ApiError::task)??;
    Ok(Json(StatusAnswer {
        device: s.id.to_string(),
        agent: s.agent_status(),
        local_api: LocalStatus {
            changes: ChangesStatus {
                latest: log.latest(),
                oldest: log.oldest_cursor(),
                kept: log.next - log.first,
            },
            commands: counts,
            streams_open: s.config.max_streams - s.streams.available_permits(),
        },
    }))
}

/// The JSON body of a request: `application/json`, UTF-8, integers exact (one past 64 bits is
/// refused, not rounded).
pub(crate) fn json_body(
    headers: &HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<serde_json::Value, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            error::Kind::BadRequest,
            "send the body as JSON with Content-Type: application/json".into(),
        ));
    }
    let body = body.map_err(ApiError::from_body_rejection)?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not UTF-8: {e}")))?;
    devtables_schema::parse_json_exact(text)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "localhost",
            "localhost:7070",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:7070",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:7070",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:7070",
            "localhost.evil.example",
            "10.0.0.1:7070",
            "[::2]:7070",
            "[::1",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn the_configuration_refuses_what_cannot_work() {
        let ok = LocalApiConfig::new("/run/app/gw.sock");
        assert!(ok.validate().is_ok());
        let mut c = ok.clone();
        c.tcp = Some("0.0.0.0:7070".parse().unwrap());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        c.tcp = Some("127.0.0.1:0".parse().unwrap());
        assert!(c.validate().is_ok());
        let mut c = ok.clone();
        c.socket = Some(PathBuf::from(format!("/tmp/{}.sock", "x".repeat(120))));
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("shorter path"), "{err}");
        let mut c = ok.clone();
        c.socket = None;
        assert!(c.validate().is_err(), "nothing to serve on");
        let mut c = ok;
        c.max_page = 10;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("default_page"));
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_refused_and_another_file_left_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

        let live = bind_socket(&path, None).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(matches!(
            bind_socket(&path, None),
            Err(LocalApiError::SocketInUse { .. })
        ));
        // The listener goes (a killed agent): its file stays, and the next bind replaces it.
        drop(live);
        assert!(path.exists());
        let again = bind_socket(&path, None).unwrap();
        drop(again);

        let file = dir.path().join("notes.sock");
        std::fs::write(&file, "mine").unwrap();
        assert!(matches!(
            bind_socket(&file, None),
            Err(LocalApiError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");

        // Shared with a group: 0660 and that group (this process's own, which it may set).
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        let shared = dir.path().join("g.sock");
        let _listener = bind_socket(&shared, Some(&gid.to_string())).unwrap();
        assert_eq!(mode(&shared), 0o660);
        assert_eq!(std::fs::metadata(&shared).unwrap().gid(), gid);
        let err = bind_socket(&dir.path().join("h.sock"), Some("no-such-group-devtables"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no group named"), "{err}");
        assert!(
            !dir.path().join("h.sock").exists(),
            "a failed start leaves no socket"
        );
    }

    #[test]
    fn groups_resolve_by_number_and_by_name() {
        assert_eq!(group_id("1234"), Ok(1234));
        // The root group exists on every Unix system.
        assert_eq!(group_id("root"), Ok(0));
        let err = group_id("no-such-group-devtables").unwrap_err();
        assert!(err.contains("no group named"), "{err}");
    }
}
