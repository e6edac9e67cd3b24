//! What the tests share: C strings, reading and freeing what the library returns, a real cloud
//! (SQLite, embedded broker, HTTP API with an admin key) on its own runtime, the agent's
//! configuration file, and waiting for a condition with a deadline.

use std::ffi::{c_char, CStr, CString};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devtables_capi::{dt_db_open, dt_free, dt_last_error, DtCode, DtDb};
use devtables_cloud::store::KeyScope;
use devtables_cloud::{BrokerMode, Cloud, CloudConfig};
use devtables_schema::Schema;
use serde_json::Value;

/// How long a condition may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The example schema every test uses.
pub fn schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/schema.json5")
}

pub fn cs(text: &str) -> CString {
    CString::new(text).expect("no NUL in test text")
}

/// The calling thread's `dt_last_error`, copied.
pub fn last_error() -> String {
    // SAFETY: never NULL, valid until the next call on this thread.
    unsafe { CStr::from_ptr(dt_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Reads a string the library returned as JSON and frees it.
pub fn take_json(ptr: *mut c_char) -> Value {
    assert!(!ptr.is_null(), "the library returned NULL");
    // SAFETY: a live string from the library, freed right after.
    let text = unsafe { CStr::from_ptr(ptr) }.to_str().unwrap().to_string();
    unsafe { dt_free(ptr) };
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"))
}

/// Asserts a call's code, with its message on failure.
#[track_caller]
pub fn expect(code: DtCode, want: DtCode) {
    assert_eq!(code, want, "dt_last_error: {}", last_error());
}

/// Opens a database for the example schema: at `path`, or in memory.
pub fn open(path: Option<&Path>) -> *mut DtDb {
    let schema = cs(schema_path().to_str().unwrap());
    let path = path.map(|p| cs(p.to_str().unwrap()));
    let mut db = std::ptr::null_mut();
    // SAFETY: valid strings and out pointer.
    let code = unsafe {
        dt_db_open(
            schema.as_ptr(),
            path.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
            &mut db,
        )
    };
    expect(code, DtCode::DT_OK);
    assert!(!db.is_null());
    db
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Writes the agent's configuration file for `acme/{device}` in `dir` (database `{device}.db`
/// beside it) and returns its path.
pub fn write_agent_config(dir: &Path, device: &str, secret: &str, mqtt_port: u16) -> PathBuf {
    let path = dir.join(format!("{device}.json5"));
    let text = serde_json::json!({
        "account": "acme",
        "device": device,
        "secret": secret,
        "schema": schema_path(),
        "db": format!("{device}.db"),
        "broker": format!("mqtt://127.0.0.1:{mqtt_port}"),
        "batch_delay_ms": 5,
        "reconnect_delay_ms": 100,
        "reconnect_max_delay_ms": 400,
    });
    std::fs::write(&path, text.to_string()).unwrap();
    path
}

/// The real cloud service in this process, on a runtime of its own (the test's thread stays a
/// plain thread, as a C program's is), with an admin API key of account `acme`.
pub struct TestCloud {
    runtime: tokio::runtime::Runtime,
    cloud: Option<Cloud>,
    pub api: String,
    key: String,
}

impl TestCloud {
    pub fn start(data_dir: &Path) -> TestCloud {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let schema = Arc::new(Schema::load(&schema_path()).unwrap());
        let mut config = CloudConfig::new(data_dir);
        config.api_listen = "127.0.0.1:0".parse().unwrap();
        config.broker = BrokerMode::Embedded {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        config.sqlite_full_sync = false;
        let (cloud, key) = runtime.block_on(async {
            let cloud = Cloud::start(config, schema)
                .await
                .expect("the cloud starts");
            let key = cloud
                .create_api_key("acme", KeyScope::Admin)
                .await
                .expect("an admin key");
            (cloud, key.key)
        });
        TestCloud {
            api: cloud.api_addr.to_string(),
            runtime,
            cloud: Some(cloud),
            key,
        }
    }

    fn cloud(&self) -> &Cloud {
        self.cloud.as_ref().expect("running")
    }

    /// The port of the embedded broker.
    pub fn mqtt_port(&self) -> u16 {
        devtables_agent_port(&self.cloud().mqtt_addr)
    }

    /// Registers `acme/{device}` through the API; returns its secret.
    pub fn register(&self, device: &str) -> String {
        let (status, body) = self.send(
            "POST",
            "/v1/devices",
            serde_json::json!({"account": "acme", "device": device}),
        );
        assert_eq!(status, 201, "register {device}: {body}");
        body["secret"].as_str().expect("a secret").to_string()
    }

    /// A request with a JSON body to the API; (status, body).
    pub fn send(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let response = match ureq::request(method, &format!("http://{}{path}", self.api))
            .set("authorization", &format!("Bearer {}", self.key))
            .send_json(body)
        {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        (status, response.into_json().unwrap_or(Value::Null))
    }

    /// `GET path` of the API; the body, or the status and body as the error.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        match ureq::get(&format!("http://{}{path}", self.api))
            .set("authorization", &format!("Bearer {}", self.key))
            .call()
        {
            Ok(r) => r.into_json().map_err(|e| e.to_string()),
            Err(ureq::Error::Status(code, r)) => {
                Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The live items of `model` the cloud holds for `acme/{device}`, through the API.
    pub fn items(&self, device: &str, model: &str) -> Result<Vec<Value>, String> {
        let page = self.get(&format!("/v1/accounts/acme/devices/{device}/items/{model}"))?;
        Ok(page["items"]
            .as_array()
            .ok_or_else(|| format!("no items in {page}"))?
            .iter()
            .filter_map(|stored| stored.get("item").filter(|i| !i.is_null()).cloned())
            .collect())
    }

    /// Writes a command for `acme/{device}` through the API; returns its id.
    pub fn command(&self, device: &str, name: &str, args: Value) -> String {
        let (status, body) = self.send(
            "POST",
            &format!("/v1/accounts/acme/devices/{device}/items/Command"),
            serde_json::json!({"deviceId": device, "command": name, "args": args}),
        );
        assert_eq!(status, 201, "command {name}: {body}");
        body["item"]["id"]
            .as_str()
            .expect("a command id")
            .to_string()
    }

    /// Waits until the cloud holds command `id` of `device` with a status other than
    /// `pending`; returns the item.
    pub fn answered_command(&self, device: &str, id: &str) -> Value {
        eventually(&format!("command {id} answered in the cloud"), || {
            let commands = self.items(device, "Command")?;
            let found = commands.iter().find(|c| c["id"] == id).cloned();
            match found {
                Some(c) if c["status"] != "pending" => Ok(c),
                other => Err(format!("{other:?}")),
            }
        })
    }
}

impl Drop for TestCloud {
    fn drop(&mut self) {
        if let Some(cloud) = self.cloud.take() {
            self.runtime.block_on(cloud.shutdown());
        }
    }
}

/// The port of a `host:port` address.
fn devtables_agent_port(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// Polls `f` until it answers `Ok`, failing with `what` and the last observation at the deadline.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match f() {
            Ok(v) => return v,
            Err(seen) => last = seen,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}; last seen: {last}");
}
