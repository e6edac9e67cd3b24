//! Real processes for end-to-end tests: a `devtables cloud` and `devtables agent --stdin`
//! children, an HTTP client for the API, and waiting for conditions with a deadline.
//!
//! The cloud's API refuses requests without a key, so every cloud started here gets an admin key
//! of [`KEY_ACCOUNT`] from `devtables keys create` on its store (the real bootstrap path) before
//! it starts, and every API call of the harness sends it.
//!
//! A cloud runs on a [`Backend`]: a broker ([`BrokerChoice`]) and a store ([`StoreChoice`]:
//! SQLite in its data folder, or PostgreSQL in a schema of the test's own). A bare
//! `BrokerChoice` means SQLite, so a test says only what differs.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::pg::PgSchema;
use super::{bin, example_schema};

pub const WAIT: Duration = Duration::from_secs(30);

/// The account of the admin key the harness creates for each cloud (every end-to-end test's
/// devices live in it).
pub const KEY_ACCOUNT: &str = "acme";

/// An HTTP client of one cloud's API, with its key (cheap to clone into a thread).
#[derive(Clone)]
pub struct ApiClient {
    /// `host:port` of the API.
    pub addr: String,
    /// The admin key of [`KEY_ACCOUNT`].
    pub key: String,
}

impl ApiClient {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The `Authorization` header value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.key)
    }

    pub fn get(&self, path: &str) -> Result<Value, String> {
        match ureq::get(&self.url(path))
            .set("authorization", &self.bearer())
            .call()
        {
            Ok(r) => r.into_json().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// A request with a JSON body; returns (status, body).
    pub fn send(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let result = ureq::request(method, &self.url(path))
            .set("authorization", &self.bearer())
            .send_json(body);
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        (status, response.into_json().unwrap_or(Value::Null))
    }

    /// Registers `account/device` with this client's key; returns the device's secret.
    pub fn register(&self, account: &str, device: &str) -> String {
        let (status, body) = self.send(
            "POST",
            "/v1/devices",
            json!({"account": account, "device": device}),
        );
        assert_eq!(status, 201, "register {account}/{device}: {body}");
        body["secret"].as_str().expect("a secret").to_string()
    }
}

/// Creates an admin key of [`KEY_ACCOUNT`] in the cloud data folder `data` with
/// `devtables keys create`; returns the key it printed.
pub fn create_admin_key(data: &Path) -> String {
    create_key(data, KEY_ACCOUNT, "admin")
}

/// Creates a key of `account` with `scope` (`read`, `write`, `admin`) in the cloud data folder
/// `data` with `devtables keys create`; returns the key it printed.
pub fn create_key(data: &Path, account: &str, scope: &str) -> String {
    create_key_in(&StoreChoice::Sqlite, data, account, scope)
}

/// Creates a key of `account` with `scope` in the store `store` names (for SQLite, the one in
/// the data folder `data`) with `devtables keys create`; returns the key it printed.
pub fn create_key_in(store: &StoreChoice, data: &Path, account: &str, scope: &str) -> String {
    let out = bin()
        .args(["keys", "create", "--account", account, "--scope", scope])
        .args(store.key_args(data))
        .output()
        .expect("devtables keys create runs");
    assert!(
        out.status.success(),
        "devtables keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(key.starts_with("dt_"), "not a key: {key:?}");
    key
}

/// A port that was free a moment ago (for restarts on the same address).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A topic prefix no other test (or CI run on a shared broker) uses.
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "dt{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Polls `f` until it returns Some, failing with `what` and the last observation at the deadline.
pub fn eventually<T>(what: &str, f: impl FnMut() -> Result<T, String>) -> T {
    eventually_within(what, WAIT, f, String::new)
}

/// [`eventually`] with a longer bound, for what a third party paces (a broker cluster's leader
/// elections); `explain` adds what the failure message should show besides the last
/// observation (the processes' last log lines).
pub fn eventually_within<T>(
    what: &str,
    wait: Duration,
    mut f: impl FnMut() -> Result<T, String>,
    explain: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + wait;
    let mut last = String::new();
    while Instant::now() < deadline {
        match f() {
            Ok(v) => return v,
            Err(seen) => last = seen,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "timed out waiting for {what}; last seen: {last}{}",
        explain()
    );
}

/// Most log lines kept per process; older ones are dropped (and counted).
const MAX_LOG_LINES: usize = 20_000;

/// The last lines a child process wrote to stderr, without terminal colours, so a test can wait
/// for what the process reports about itself (a resync, a retention pass).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<LogBuf>>);

#[derive(Default)]
struct LogBuf {
    lines: VecDeque<String>,
    dropped: u64,
    /// Lines that held a terminal escape code (the processes write to a pipe here: none).
    coloured: u64,
}

impl Logs {
    /// Keeps what a child process writes to `stderr`, on a thread of its own; echoed with `tag`
    /// when `DEVTABLES_TEST_VERBOSE` is set.
    pub fn capture(stderr: impl std::io::Read + Send + 'static, tag: String) -> Logs {
        let logs = Logs::default();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.push(&line);
                if std::env::var_os("DEVTABLES_TEST_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
            }
        });
        logs
    }

    fn push(&self, line: &str) {
        let mut b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if b.lines.len() >= MAX_LOG_LINES {
            b.lines.pop_front();
            b.dropped += 1;
        }
        if line.contains('\u{1b}') {
            b.coloured += 1;
        }
        b.lines.push_back(strip_ansi(line));
    }

    /// Lines that held terminal colour codes, kept or not.
    pub fn coloured_lines(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .coloured
    }

    /// Lines (kept so far) that contain `needle`.
    pub fn matching(&self, needle: &str) -> Vec<String> {
        let b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        b.lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// The last `n` lines kept, for a failure's report.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = b.lines.len().saturating_sub(n);
        b.lines.iter().skip(skip).cloned().collect()
    }

    /// Waits until a line satisfies `pred`; returns it.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        eventually(what, || {
            let b = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            b.lines.iter().find(|l| pred(l)).cloned().ok_or_else(|| {
                format!(
                    "no such line among {} kept ({} older dropped)",
                    b.lines.len(),
                    b.dropped
                )
            })
        })
    }
}

/// The text of a log line without ANSI colour sequences (the tracing formatter colours fields).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Which broker the cloud and agents use.
#[derive(Clone, Debug)]
pub enum BrokerChoice {
    /// The cloud's embedded broker on this port (0: any).
    Embedded(u16),
    /// An external broker at host:port.
    External(String),
    /// The cloud file's broker keys as given (JSON5, e.g. an `embedded_broker_tls` listener
    /// alone, or an `external_broker` with `external_broker_tls` and credentials); the cloud's
    /// MQTT address is the one it prints.
    Configured(String),
}

/// Which store the cloud keeps its data in.
#[derive(Clone, Debug, Default)]
pub enum StoreChoice {
    /// SQLite, `cloud.db` in the cloud's data folder (the cloud's default).
    #[default]
    Sqlite,
    /// PostgreSQL, in a schema of the test's own: shared by every process of the test that
    /// holds it (a cloud started again, the nodes of a scaled-out cloud) and dropped with the
    /// last of them.
    Postgres(Arc<PgSchema>),
}

impl StoreChoice {
    /// PostgreSQL in a fresh schema of its own.
    pub fn fresh_postgres() -> StoreChoice {
        StoreChoice::Postgres(Arc::new(PgSchema::fresh()))
    }

    /// The cloud file's keys that select this store (none for SQLite, the default).
    fn config_keys(&self) -> String {
        match self {
            StoreChoice::Sqlite => String::new(),
            StoreChoice::Postgres(pg) => {
                format!("database: '{}', database_schema: '{}',", pg.url, pg.name)
            }
        }
    }

    /// The arguments of `devtables keys create` that name this store, for a cloud whose data
    /// folder is `data`.
    fn key_args(&self, data: &Path) -> Vec<OsString> {
        match self {
            StoreChoice::Sqlite => vec!["--data".into(), data.into()],
            StoreChoice::Postgres(pg) => vec![
                "--database".into(),
                pg.url.clone().into(),
                "--database-schema".into(),
                pg.name.clone().into(),
            ],
        }
    }
}

/// What a cloud runs on: its broker and its store.
#[derive(Clone, Debug)]
pub struct Backend {
    pub broker: BrokerChoice,
    pub store: StoreChoice,
}

impl Backend {
    /// Whether the cloud runs as a cluster node (docs/scale-out.md): PostgreSQL and an external
    /// broker. Such a node started again waits for its predecessor's leases to run out before
    /// it serves devices.
    pub fn is_cluster_node(&self) -> bool {
        matches!(self.store, StoreChoice::Postgres(_))
            && matches!(self.broker, BrokerChoice::External(_))
    }
}

/// A broker alone: the cloud keeps its data in SQLite.
impl From<BrokerChoice> for Backend {
    fn from(broker: BrokerChoice) -> Backend {
        Backend {
            broker,
            store: StoreChoice::Sqlite,
        }
    }
}

pub struct CloudProc {
    child: Child,
    pub api: String,
    pub mqtt: String,
    pub dir: PathBuf,
    /// What this process printed to stderr (its log at level info).
    pub logs: Logs,
    prefix: String,
    backend: Backend,
    api_port: u16,
    extra: String,
    /// The admin key of [`KEY_ACCOUNT`] every API call sends (kept across restarts).
    pub key: String,
    /// The schema file the cloud runs (the example schema unless a test changes it).
    schema: PathBuf,
}

impl CloudProc {
    pub fn start(dir: &Path, prefix: &str, backend: impl Into<Backend>) -> CloudProc {
        Self::start_with(dir, prefix, backend, "")
    }

    /// With extra configuration keys (JSON5, e.g. `purge_interval_secs: 1,`).
    pub fn start_with(
        dir: &Path,
        prefix: &str,
        backend: impl Into<Backend>,
        extra: &str,
    ) -> CloudProc {
        let backend = backend.into();
        let key = create_key_in(
            &backend.store,
            &dir.join("cloud-data"),
            KEY_ACCOUNT,
            "admin",
        );
        Self::start_keyed(dir, prefix, backend, extra, key)
    }

    /// On a store prepared beforehand (the data folder `dir/cloud-data`, or the PostgreSQL
    /// schema), whose admin key of [`KEY_ACCOUNT`] is `key` (for a test that must read the store
    /// before the cloud starts, or start several nodes on one store).
    pub fn start_keyed(
        dir: &Path,
        prefix: &str,
        backend: impl Into<Backend>,
        extra: &str,
        key: String,
    ) -> CloudProc {
        Self::start_on(
            dir,
            prefix,
            backend.into(),
            free_port(),
            extra,
            key,
            &example_schema(),
        )
    }

    /// On the schema file `schema` instead of the example schema.
    pub fn start_with_schema(
        dir: &Path,
        prefix: &str,
        backend: impl Into<Backend>,
        schema: &Path,
    ) -> CloudProc {
        let backend = backend.into();
        let key = create_key_in(
            &backend.store,
            &dir.join("cloud-data"),
            KEY_ACCOUNT,
            "admin",
        );
        Self::start_on(dir, prefix, backend, free_port(), "", key, schema)
    }

    /// Stops (SIGTERM) and starts again on the same data and ports with the schema file
    /// `schema`: how an operator upgrades the cloud's schema.
    pub fn restart_with_schema(&mut self, schema: &Path) {
        // SAFETY: kill(2) on the pid of a child this struct owns and has not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let next = Self::start_on(
            &self.dir,
            &self.prefix,
            self.backend.clone(),
            self.api_port,
            &self.extra,
            self.key.clone(),
            schema,
        );
        *self = next;
    }

    fn start_on(
        dir: &Path,
        prefix: &str,
        backend: Backend,
        api_port: u16,
        extra: &str,
        key: String,
        schema: &Path,
    ) -> CloudProc {
        let broker_line = match &backend.broker {
            BrokerChoice::Embedded(port) => format!("embedded_broker: '127.0.0.1:{port}',"),
            BrokerChoice::External(addr) => format!("external_broker: '{addr}',"),
            BrokerChoice::Configured(lines) => lines.clone(),
        };
        let store_line = backend.store.config_keys();
        let config = format!(
            "{{schema: '{}', data_dir: 'cloud-data', api: '127.0.0.1:{api_port}', {broker_line} {store_line} topic_prefix: '{prefix}', {extra}}}",
            schema.display()
        );
        let path = dir.join("cloud.json5");
        std::fs::write(&path, config).unwrap();
        let mut child = bin()
            .args(["cloud", "--config"])
            .arg(&path)
            .env("DEVTABLES_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("devtables cloud starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let logs = Logs::default();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.push(&line);
                if line.contains("devtables cloud running") {
                    let _ = tx.send(line.clone());
                }
                if std::env::var_os("DEVTABLES_TEST_VERBOSE").is_some() {
                    eprintln!("[cloud] {line}");
                }
            }
        });
        let line = rx
            .recv_timeout(WAIT)
            .expect("the cloud prints its addresses when it is ready");
        let api = line
            .split("API http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .expect("API address")
            .to_string();
        let mqtt = line
            .split("MQTT ")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .expect("MQTT address")
            .trim()
            .to_string();
        let mut backend = backend;
        if let BrokerChoice::Embedded(_) = backend.broker {
            let port = mqtt
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap();
            backend.broker = BrokerChoice::Embedded(port);
        }
        let cloud = CloudProc {
            child,
            api,
            mqtt,
            dir: dir.to_path_buf(),
            logs,
            prefix: prefix.to_string(),
            backend,
            api_port,
            extra: extra.to_string(),
            key,
            schema: schema.to_path_buf(),
        };
        // Running is not ready: until its subscription to the device topics holds, the cloud
        // hears no device (a raw test client that says hello once would wait forever).
        eventually("the cloud ready (its device subscription holds)", || {
            cloud.get("/ready").map(|_| ())
        });
        // A cluster node hears every device but answers only those of the partitions it
        // leases (docs/scale-out.md): until its first lease round claimed some, a message is
        // left to another node (an agent says hello again; a raw test client would wait).
        if cloud.backend.is_cluster_node() {
            eventually("the cluster node to lease partitions", || {
                let status = cloud.get("/v1/status")?;
                let held = status["sync"]["cluster_partitions_held"]
                    .as_u64()
                    .or_else(|| status["cluster_partitions_held"].as_u64())
                    .unwrap_or(0);
                (held > 0).then_some(()).ok_or(status.to_string())
            });
        }
        cloud
    }

    /// SIGKILL, then start again on the same data, API port and MQTT port.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Starts again on the same data, API port and MQTT port, after [`Self::kill`] (a test may
    /// change the data folder in between: put a backup back).
    pub fn start_again(&mut self) {
        let next = Self::start_on(
            &self.dir,
            &self.prefix,
            self.backend.clone(),
            self.api_port,
            &self.extra,
            self.key.clone(),
            &self.schema,
        );
        *self = next;
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.api, path)
    }

    /// A client of this cloud's API with its admin key.
    pub fn client(&self) -> ApiClient {
        ApiClient {
            addr: self.api.clone(),
            key: self.key.clone(),
        }
    }

    /// `GET path` with the admin key: the JSON body, or the status and body of a failure.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        self.client().get(path)
    }

    /// A request with a JSON body and the admin key; returns (status, body).
    pub fn send(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.client().send(method, path, body)
    }

    pub fn register(&self, account: &str, device: &str) -> String {
        self.client().register(account, device)
    }

    /// How many pushed changes the cloud wrote for a device: the `changes_applied` field of its
    /// record. A duplicate the cloud answers `applied` without writing is not counted, so for
    /// writes with distinct (key, version) this equals the writes that reached the cloud, each
    /// once.
    pub fn changes_applied(&self, account: &str, device: &str) -> u64 {
        let record = self
            .get(&format!("/v1/devices/{account}/{device}"))
            .unwrap_or_else(|e| panic!("device record of {account}/{device}: {e}"));
        record["changes_applied"]
            .as_u64()
            .unwrap_or_else(|| panic!("the device record has no changes_applied counter: {record}"))
    }

    /// Items of a model for one device (at most 1000).
    pub fn items(&self, account: &str, device: &str, model: &str) -> Result<Vec<Value>, String> {
        let page = self.get(&format!(
            "/v1/accounts/{account}/devices/{device}/items/{model}?limit=1000"
        ))?;
        Ok(page["items"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for CloudProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct AgentProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    name: String,
    /// What this process printed to stderr (its log at level info).
    pub logs: Logs,
}

pub struct AgentSpec<'a> {
    pub dir: &'a Path,
    pub name: &'a str,
    pub account: &'a str,
    pub device: &'a str,
    pub secret: &'a str,
    pub mqtt: &'a str,
    pub prefix: &'a str,
    /// The agent's schema (default: the example schema).
    pub schema: Option<&'a Path>,
}

impl AgentProc {
    pub fn start(spec: &AgentSpec<'_>) -> AgentProc {
        Self::start_with(spec, "")
    }

    /// With extra configuration keys (JSON5, e.g. `keep_alive_secs: 2,`).
    pub fn start_with(spec: &AgentSpec<'_>, extra: &str) -> AgentProc {
        Self::start_with_env(spec, extra, &[])
    }

    /// With extra configuration keys and extra environment variables for the agent process (for
    /// example libfaketime's, to give the device a wrong clock).
    pub fn start_with_env(spec: &AgentSpec<'_>, extra: &str, env: &[(&str, &str)]) -> AgentProc {
        let config = format!(
            "{{account: '{}', device: '{}', secret: '{}', schema: '{}', db: '{}.db', broker: '{}', topic_prefix: '{}', batch_delay_ms: 20, reconnect_max_delay_ms: 2000, {extra}}}",
            spec.account,
            spec.device,
            spec.secret,
            spec.schema.map(Path::to_path_buf).unwrap_or_else(example_schema).display(),
            spec.name,
            spec.mqtt,
            spec.prefix
        );
        let path = spec.dir.join(format!("{}.json5", spec.name));
        std::fs::write(&path, config).unwrap();
        let mut child = bin()
            .args(["agent", "--stdin", "--config"])
            .arg(&path)
            .env("DEVTABLES_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("devtables agent starts");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let name = spec.name.to_string();
        let tag = name.clone();
        let logs = Logs::capture(stderr, tag);
        let stdin = child.stdin.take();
        AgentProc {
            child,
            stdin,
            lines,
            name,
            logs,
        }
    }

    /// Sends one operation line without waiting for its answer.
    pub fn send(&mut self, request: &Value) {
        let stdin = self.stdin.as_mut().expect("agent stdin");
        writeln!(stdin, "{request}").expect("agent accepts input");
        stdin.flush().unwrap();
    }

    /// The next answer line.
    pub fn answer(&mut self) -> Value {
        let line = self
            .lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("agent {} did not answer", self.name));
        serde_json::from_str(&line).expect("answers are JSON")
    }

    /// One operation and its answer; panics when it fails.
    pub fn op(&mut self, request: Value) -> Value {
        self.send(&request);
        let answer = self.answer();
        assert_eq!(answer["ok"], true, "{request} failed: {answer}");
        answer["result"].clone()
    }

    /// One operation that must fail; returns the error message.
    pub fn op_err(&mut self, request: Value) -> String {
        self.send(&request);
        let answer = self.answer();
        assert_eq!(answer["ok"], false, "{request} should fail: {answer}");
        answer["error"].as_str().unwrap_or_default().to_string()
    }

    pub fn status(&mut self) -> Value {
        self.op(json!({"op": "status"}))
    }

    /// Waits until the agent is ready and its outbox is empty.
    pub fn wait_synced(&mut self) {
        let mut last = Value::Null;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            last = self.status();
            if last["ready"] == true && last["pending"] == 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent {} never synced: {last}", self.name);
    }

    /// Closes stdin: the agent waits (bounded) for the cloud to take its queued changes,
    /// flushes and exits; waits for it.
    pub fn stop(mut self) {
        drop(self.stdin.take());
        self.wait_gone("did not stop");
    }

    /// Waits for the process to exit; panics with `failure` after [`WAIT`].
    fn wait_gone(&mut self, failure: &str) {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent {} {failure}", self.name);
    }

    /// SIGTERM: the agent stops at once, without waiting for the cloud to take its queued
    /// changes as the end of its input does (for an agent offline by design); waits for it.
    pub fn terminate(mut self) {
        // SAFETY: kill(2) on the pid of a child this struct owns and has not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        self.wait_gone("did not stop on SIGTERM");
    }

    /// The exit status, once the agent exited (closing its input, [`Self::close_input`]).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent {} did not exit", self.name);
    }

    /// Closes the agent's standard input (the end of its `--stdin` operations).
    pub fn close_input(&mut self) {
        drop(self.stdin.take());
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A Mosquitto process of a test's own, on the configuration it was given, with what it logs.
pub struct MosquittoProc {
    child: Child,
    /// `127.0.0.1:port` of the listener the test waits for.
    pub addr: String,
    /// What the broker printed to stderr.
    pub logs: Logs,
}

impl MosquittoProc {
    /// Starts `mosquitto -c conf` and waits until `port` (a listener of that configuration, on
    /// 127.0.0.1) accepts connections. Panics when the binary cannot run or the port never opens
    /// (with the broker's last log lines).
    pub fn start(conf: &Path, port: u16) -> MosquittoProc {
        let mut child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("the mosquitto binary cannot be started: {e}"));
        let stderr = child.stderr.take().unwrap();
        let logs = Logs::capture(stderr, "mosquitto".to_string());
        let addr = format!("127.0.0.1:{port}");
        let mut broker = MosquittoProc { child, addr, logs };
        eventually("mosquitto listening", || {
            if let Ok(Some(status)) = broker.child.try_wait() {
                panic!("mosquitto exited ({status}): {:?}", broker.logs.tail(20));
            }
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        broker
    }

    /// The process id (for `--reload-pid`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for MosquittoProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
