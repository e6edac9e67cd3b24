//! The standalone agent: a configuration file in, an agent running until Ctrl-C, SIGTERM or (in
//! `--stdin` mode) the end of standard input, serving the local API ([`crate::local_api`]) for
//! the device's other processes unless the file turns it off.
//!
//! Two binaries run it, `devtables agent` (crates/cli, the full command with the cloud) and the
//! device-only `devtables-agent` (`src/bin/devtables-agent.rs`, without the cloud, the broker and
//! SQLite). The loop lives here, once, so the two cannot drift apart.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use devtables_schema::{Schema, SchemaError};
use serde_json::{json, Value};

use crate::config::{AgentConfig, AgentFile};
use crate::local_api::items::{self, FindParams};
use crate::{Agent, AgentError, LocalApi, LocalApiError};

/// Most bytes of one `--stdin` line; a longer line is answered with an error and skipped, so a
/// runaway writer cannot make the agent buffer without bound.
pub const MAX_STDIN_LINE: usize = 1 << 20;

/// How long the end of `--stdin` input waits, by default, for the cloud to acknowledge every
/// queued change before the agent stops.
pub const DEFAULT_STDIN_DRAIN: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Clone, Debug)]
pub struct StandaloneOptions {
    /// The agent's configuration file (JSON5, see [`AgentFile`]).
    pub config: PathBuf,
    /// Read operations on the device database as JSON lines from standard input and answer each
    /// with one JSON line on standard output (see [`stdin_op`]); the end of input stops the agent
    /// once the outbox is empty, or after [`Self::stdin_drain`].
    pub stdin: bool,
    /// How long the end of `--stdin` input waits for the cloud to acknowledge every queued
    /// change (a script that writes and closes its input expects its writes to reach the cloud).
    /// What is still queued then stays in the database and goes at the next start. `None`: the
    /// file's `stdin_drain_secs`, else [`DEFAULT_STDIN_DRAIN`].
    pub stdin_drain: Option<Duration>,
}

/// The command line of both binaries that run the standalone agent (`devtables agent`,
/// `devtables-agent`): the configuration file and the overrides of it, parsed here once so the
/// two cannot drift apart.
#[cfg(feature = "cli")]
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The configuration file (JSON5).
    #[arg(long)]
    config: PathBuf,
    /// The broker, instead of the file's `broker`: host:port, mqtt://host:port, or
    /// mqtts://host:port (TLS, with the file's `tls` block); several, separated by commas, name
    /// the nodes of a broker cluster, tried in turn.
    #[arg(long, value_name = "ADDR")]
    mqtt: Option<String>,
    /// The database file, instead of the file's `db` (created when missing).
    #[arg(long, value_name = "FILE")]
    db: Option<PathBuf>,
    /// Read operations on the device database as JSON lines from standard input
    /// (`{"op":"create","model":"Fault","item":{...}}`; ops: create, update, upsert, remove, get,
    /// find, batch, status; an "id" is echoed) and answer each with one JSON line on standard
    /// output. End of input stops
    /// the agent once the cloud has every change (see --stdin-drain-secs).
    #[arg(long)]
    stdin: bool,
    /// With --stdin: how long the end of input waits for the cloud to acknowledge every queued
    /// change before the agent stops (default: the file's `stdin_drain_secs`, else 10). What is
    /// still queued then goes at the next start.
    #[arg(long, value_name = "SECS")]
    stdin_drain_secs: Option<u64>,
    /// The local API's Unix socket, instead of the file's `local_api.socket` (default: the
    /// database file with the extension `.sock`).
    #[arg(long, value_name = "PATH")]
    local_api_socket: Option<PathBuf>,
    /// Also serve the local API on this loopback address, e.g. 127.0.0.1:7070 (the file's
    /// `local_api.tcp`; default: no TCP).
    #[arg(long, value_name = "ADDR")]
    local_api_tcp: Option<String>,
    /// Serve no local API (the file's `local_api: {enabled: false}`).
    #[arg(long, conflicts_with_all = ["local_api_socket", "local_api_tcp"])]
    no_local_api: bool,
}

#[cfg(feature = "cli")]
impl AgentArgs {
    /// Loads the file, applies the overrides and runs the agent until it stops.
    pub fn run(self) -> Result<(), StandaloneError> {
        let (mut file, mut config) = AgentFile::load(&self.config)?;
        if let Some(broker) = &self.mqtt {
            let list = crate::config::parse_broker_list(broker.split(',').map(str::trim))?;
            let refuse = |why: String| Err(StandaloneError::Agent(AgentError::Config(why)));
            match (list.scheme, &config.tls) {
                (crate::config::BrokerScheme::Tls, None) => {
                    return refuse(format!(
                        "--mqtt {broker} asks for TLS, but {} has no tls block (tls: {{ca: ...}})",
                        self.config.display()
                    ))
                }
                (crate::config::BrokerScheme::Clear, Some(_)) => {
                    return refuse(format!(
                        "--mqtt {broker} is clear text, but {} sets tls: use mqtts:// or host:port",
                        self.config.display()
                    ))
                }
                _ => {}
            }
            config.set_broker_addresses(&list);
        }
        if let Some(db) = &self.db {
            file.db = db.clone();
            config.db_path = db.clone();
        }
        file.override_local_api(self.local_api_socket, self.local_api_tcp, self.no_local_api);
        let options = StandaloneOptions {
            config: self.config,
            stdin: self.stdin,
            stdin_drain: self.stdin_drain_secs.map(Duration::from_secs),
        };
        run_loaded(&options, &file, config)
    }
}

/// Why the standalone agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("cannot load schema {path}: {source}")]
    Schema { path: PathBuf, source: SchemaError },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    LocalApi(Box<LocalApiError>),
}

impl From<LocalApiError> for StandaloneError {
    fn from(e: LocalApiError) -> Self {
        StandaloneError::LocalApi(Box::new(e))
    }
}

/// The log filter when `DEVTABLES_LOG` is not set.
pub const DEFAULT_LOG: &str = "warn";

/// The log both binaries write: to stderr, filtered by `DEVTABLES_LOG` (default `warn`), with
/// the `log` crate's records (the embedded broker's) forwarded.
#[cfg(feature = "cli")]
pub fn init_logging() {
    init_logging_with(DEFAULT_LOG)
}

/// [`init_logging`] with another filter when `DEVTABLES_LOG` is not set (`devtables sim`
/// quiets its thousands of agents).
#[cfg(feature = "cli")]
pub fn init_logging_with(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVTABLES_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs the agent the file describes until it is told to stop; then shuts it down cleanly (the
/// event loop ends, the database is closed).
pub fn run(options: StandaloneOptions) -> Result<(), StandaloneError> {
    let (file, config) = AgentFile::load(&options.config)?;
    run_loaded(&options, &file, config)
}

/// [`run`] on a configuration file already loaded, whose settings the caller may have changed
/// (`devtables agent` applies its `--mqtt` and `--db` there).
pub fn run_loaded(
    options: &StandaloneOptions,
    file: &AgentFile,
    config: AgentConfig,
) -> Result<(), StandaloneError> {
    let schema = Schema::load(&file.schema).map_err(|source| StandaloneError::Schema {
        path: file.schema.clone(),
        source,
    })?;
    let drain = options
        .stdin_drain
        .or(file.stdin_drain_secs.map(Duration::from_secs))
        .unwrap_or(DEFAULT_STDIN_DRAIN);
    let local_api = file.local_api_config()?;
    let mut config = config;
    if let Some(local) = &local_api {
        local.prepare_agent(&mut config);
    }
    // `--stdin` pages as the local API does.
    let max_page = local_api
        .as_ref()
        .map_or(crate::local_api::DEFAULT_MAX_PAGE, |c| c.max_page);
    let runtime = runtime().map_err(StandaloneError::Runtime)?;
    runtime.block_on(async move {
        let agent = Agent::start(config, Arc::new(schema))?;
        builtin_commands(&agent);
        let api = match local_api.map(|c| LocalApi::start(&agent, c)).transpose() {
            Ok(api) => api,
            Err(e) => {
                agent.shutdown().await;
                return Err(e.into());
            }
        };
        if let Some(api) = &api {
            eprintln!(
                "devtables agent {}: local API on {}",
                agent.id(),
                describe_local_api(api)
            );
        }
        eprintln!("devtables agent {} running; Ctrl-C stops it", agent.id());
        // One listener for the agent's whole life: one made anew per loop turn would miss a
        // signal that arrives between two turns (tokio keeps no signal for a later listener).
        let stop = stop_signal();
        tokio::pin!(stop);
        if serve(&agent, options.stdin, max_page, stop.as_mut()).await == Stopped::InputEnded {
            drain_outbox(&agent, drain, stop).await;
        }
        if let Some(api) = api {
            api.shutdown().await;
        }
        agent.shutdown().await;
        Ok(())
    })
}

/// `unix:PATH` and `http://ADDR`, what the local API serves on.
fn describe_local_api(api: &LocalApi) -> String {
    let mut on = Vec::new();
    if let Some(path) = api.socket() {
        on.push(format!("unix:{}", path.display()));
    }
    if let Some(addr) = api.tcp_addr() {
        on.push(format!("http://{addr}"));
    }
    on.join(" and ")
}

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Stopped {
    /// Ctrl-C or SIGTERM: stop now.
    Signal,
    /// The end of `--stdin` input: stop once what was written reached the cloud.
    InputEnded,
}

/// Waits until the outbox is empty (every local change acknowledged by the cloud), at most
/// `bound`, or a stop signal; says on standard error what stays queued.
async fn drain_outbox(
    agent: &Agent,
    bound: Duration,
    mut stop: Pin<&mut impl Future<Output = ()>>,
) {
    let mut pending = agent.status().pending;
    if pending == 0 {
        return;
    }
    eprintln!(
        "devtables agent {}: input ended; waiting up to {} s for the cloud to take {pending} \
         queued change{}",
        agent.id(),
        bound.as_secs_f64(),
        if pending == 1 { "" } else { "s" }
    );
    let deadline = tokio::time::Instant::now() + bound;
    let mut status = agent.watch_status();
    // The status changes when the outbox shrinks; the tick is a safety net, not the signal.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while pending > 0 {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut stop => break,
            changed = status.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        pending = agent.status().pending;
    }
    if pending == 0 {
        eprintln!(
            "devtables agent {}: every change reached the cloud",
            agent.id()
        );
    } else {
        let why = agent.status().connection.unwrap_or_default();
        tracing::warn!(device = %agent.id(), pending, "stopping with changes still queued");
        eprintln!(
            "devtables agent {}: stopping with {pending} change{} still queued (kept in the \
             database; they go at the next start){}",
            agent.id(),
            if pending == 1 { "" } else { "s" },
            if why.is_empty() {
                String::new()
            } else {
                format!("; {why}")
            }
        );
    }
}

/// The multi-threaded tokio runtime the standalone services run on.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The agent's life: answers `--stdin` lines, or prints a status line every few seconds; tells
/// standard error each time the cloud welcomes a session (`ready`), which is when a supervisor
/// or a measurement knows changes flow.
async fn serve(
    agent: &Agent,
    stdin: bool,
    max_page: usize,
    mut stop: Pin<&mut impl Future<Output = ()>>,
) -> Stopped {
    let mut status = agent.watch_status();
    let mut was_ready = false;
    let mut watching = true;
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let (lines_tx, mut lines) = tokio::sync::mpsc::channel::<Result<String, usize>>(64);
    if stdin {
        std::thread::spawn(move || read_lines(std::io::stdin().lock(), &lines_tx));
    } else {
        drop(lines_tx);
    }
    loop {
        tokio::select! {
            _ = &mut stop => return Stopped::Signal,
            line = lines.recv(), if stdin => match line {
                Some(Ok(line)) => println!("{}", stdin_op_paged(agent, &line, max_page)),
                Some(Err(len)) => {
                    tracing::warn!(len, max = MAX_STDIN_LINE, "stdin line too long; skipped");
                    println!("{}", json!({"ok": false, "error": format!(
                        "line of {len} bytes is over the {MAX_STDIN_LINE}-byte limit; skipped")}));
                }
                None => return Stopped::InputEnded,
            },
            changed = status.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let s = status.borrow_and_update().clone();
                if s.ready && !was_ready {
                    eprintln!("devtables agent {} ready: cursor={} pending={}", agent.id(), s.cursor, s.pending);
                }
                was_ready = s.ready;
            }
            _ = ticker.tick() => {
                if stdin { continue; }
                let s = status.borrow().clone();
                eprintln!("connected={} ready={} cursor={} pending={} rejected={} dropped={}{}",
                    s.connected, s.ready, s.cursor, s.pending, s.rejected, s.dropped,
                    s.connection.map(|c| format!(" | {c}")).unwrap_or_default());
            }
        }
    }
}

/// Forwards the lines of `input` (each at most [`MAX_STDIN_LINE`] bytes; a longer one is skipped
/// and reported by its length) until its end, a read error, or the receiver is gone.
fn read_lines(
    mut input: impl std::io::BufRead,
    out: &tokio::sync::mpsc::Sender<Result<String, usize>>,
) {
    loop {
        let mut buf = Vec::new();
        let mut limited = std::io::Read::take(&mut input, MAX_STDIN_LINE as u64 + 1);
        let n = match std::io::BufRead::read_until(&mut limited, b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let message = if buf.last() != Some(&b'\n') && n > MAX_STDIN_LINE {
            // Skip the rest of the long line.
            let mut skipped = n;
            loop {
                let mut rest = Vec::new();
                let mut chunk = std::io::Read::take(&mut input, 64 * 1024);
                match std::io::BufRead::read_until(&mut chunk, b'\n', &mut rest) {
                    Ok(0) | Err(_) => break,
                    Ok(m) => {
                        skipped += m;
                        if rest.last() == Some(&b'\n') {
                            break;
                        }
                    }
                }
            }
            Err(skipped)
        } else {
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            Ok(String::from_utf8_lossy(&buf).into_owned())
        };
        if out.blocking_send(message).is_err() {
            return;
        }
    }
}

/// Commands every standalone agent answers (applications linking the library add their own).
fn builtin_commands(agent: &Agent) {
    let device = agent.id().to_string();
    agent.on_command("ping", Arc::new(move |_cmd| Ok(json!({"pong": device}))));
    agent.on_command(
        "echo",
        Arc::new(|cmd| Ok(cmd.get("args").cloned().unwrap_or(Value::Null))),
    );
}

/// One JSON-lines operation of `--stdin` mode: `{"op":"create","model":"Fault","item":{...}}`
/// (ops: create, update, upsert, remove, get, find, batch, status), answered with `{"ok":true,
/// "result":...}` or `{"ok":false,"error":"..."}`. A request's `"id"` (any JSON value) is
/// echoed in its answer. `find` pages as the local API does with `limit` (at most the API's
/// `max_page`, 1000 by default), `next`, `index`, `reverse` beside `item`; its answer holds the
/// page's items in `result` and the token of the next page in `next` (null at the end). Without
/// `limit` and `next`, it answers every match, as it always did. `batch` takes `ops`,
/// a list of `{op, model, item}` writes, in one transaction; `result` holds one item (or null)
/// per operation.
pub fn stdin_op(agent: &Agent, line: &str) -> Value {
    stdin_op_paged(agent, line, crate::local_api::DEFAULT_MAX_PAGE)
}

/// [`stdin_op`] with the largest page of the local API's configuration.
fn stdin_op_paged(agent: &Agent, line: &str, max_page: usize) -> Value {
    let request = match devtables_schema::parse_json_exact(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("not JSON: {e}")}),
    };
    let mut answer = stdin_answer(agent, &request, max_page);
    if let (Some(id), Some(fields)) = (request.get("id"), answer.as_object_mut()) {
        fields.insert("id".into(), id.clone());
    }
    answer
}

fn stdin_answer(agent: &Agent, request: &Value, max_page: usize) -> Value {
    let op = request
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let item = match request.get("item") {
        Some(Value::Object(m)) => m.clone(),
        _ => devtables_schema::Item::new(),
    };
    let db = agent.db();
    let result = match op {
        "create" => db.create(model, &item).map(|i| json!(i)),
        "update" => db.update(model, &item).map(|i| json!(i)),
        "upsert" => db.upsert(model, &item).map(|i| json!(i)),
        "remove" => db.remove(model, &item).map(|i| json!(i)),
        "get" => db.get(model, &item).map(|i| json!(i)),
        "find" => {
            let params = match find_params(request, item) {
                Ok(p) => p,
                Err(e) => return json!({"ok": false, "error": e}),
            };
            // No `limit`: every match (a `next` alone continues in pages of the largest size).
            let default_page = if params.next.is_some() {
                max_page
            } else {
                usize::MAX
            };
            return match items::find(db, model, params, default_page, max_page) {
                Ok(page) => json!({"ok": true, "result": page.items, "next": page.next}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            };
        }
        "batch" => {
            let ops = match items::parse_batch(request.get("ops").unwrap_or(&Value::Null)) {
                Ok(ops) => ops,
                Err(e) => return json!({"ok": false, "error": e.to_string()}),
            };
            db.transaction(&ops).map(|r| json!(r))
        }
        "status" => Ok(json!(agent.status())),
        other => return json!({"ok": false, "error": format!("unknown op {other:?}")}),
    };
    match result {
        Ok(value) => json!({"ok": true, "result": value}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

/// The page fields of a `--stdin` find: `limit`, `next`, `index`, `reverse`.
fn find_params(request: &Value, props: devtables_schema::Item) -> Result<FindParams, String> {
    let limit = match request.get("limit") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| format!("limit {v} is not a count of items"))? as usize,
        ),
    };
    let text = |name: &str| -> Result<Option<String>, String> {
        match request.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!("{name} {v} is not a string")),
        }
    };
    Ok(FindParams {
        props,
        limit,
        next: text("next")?,
        index: text("index")?,
        reverse: request
            .get("reverse")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(input: &[u8]) -> Vec<Result<String, usize>> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        read_lines(input, &tx);
        drop(tx);
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    #[test]
    fn lines_are_forwarded_and_an_overlong_one_is_skipped_by_its_length() {
        let mut input = b"{\"op\":\"status\"}\r\n".to_vec();
        input.extend(vec![b'x'; MAX_STDIN_LINE + 10]);
        input.extend(b"\nlast");
        let got = lines_of(&input);
        assert_eq!(
            got,
            vec![
                Ok("{\"op\":\"status\"}".to_string()),
                Err(MAX_STDIN_LINE + 11),
                Ok("last".to_string()),
            ]
        );
        // A line of exactly the limit passes.
        let mut exact = vec![b'y'; MAX_STDIN_LINE];
        exact.push(b'\n');
        assert_eq!(lines_of(&exact), vec![Ok("y".repeat(MAX_STDIN_LINE))]);
    }
}
