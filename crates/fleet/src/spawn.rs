//! The cloud of [`crate::Target::Spawn`]: `devtables cloud` as a separate child process, so
//! the cloud and the simulator each have their own open-files limit and their own `/proc`
//! figures.
//!
//! It runs on embedded defaults (SQLite, the embedded broker) in a temporary folder, with its
//! API and broker on ports the operating system picks (port 0; the child prints the addresses
//! it bound, which are read from its log), no API rate limit (the simulator's registrations
//! and down writes would otherwise wait behind it), and the simulation's retention. Its admin
//! key comes from `devtables keys create` on the data folder, the bootstrap the README
//! describes. The child is stopped (SIGTERM, then SIGKILL) when the simulation ends, and
//! killed if the simulator dies first.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::io::Write as _;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::config::SCHEMA;
use crate::FleetError;

/// Longest wait for the child to say where it listens.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the child to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The line `devtables cloud` prints once it serves.
const RUNNING: &str = "devtables cloud running: API http://";

/// A running child cloud.
pub(crate) struct SpawnedCloud {
    child: Child,
    pub(crate) pid: u32,
    /// `http://HOST:PORT` of its API.
    pub(crate) url: String,
    /// `HOST:PORT` of its broker.
    pub(crate) mqtt: String,
    pub(crate) admin_key: String,
    /// What [`SpawnedCloud::restart`] starts again.
    program: PathBuf,
    log: String,
    retention_secs: u64,
    purge_secs: u64,
    extra_config: String,
    cgroup: Option<PathBuf>,
    /// Its folder (configuration, `data/`, `cloud.log`); deleted on drop unless kept.
    dir: Option<tempfile::TempDir>,
    pub(crate) path: PathBuf,
}

/// What the child's configuration sets.
pub(crate) struct SpawnSettings<'a> {
    pub(crate) program: &'a Path,
    pub(crate) log: &'a str,
    pub(crate) extra_config: &'a str,
    /// The control group the child is moved into ([`crate::Target::Spawn`]).
    pub(crate) cgroup: Option<&'a Path>,
    pub(crate) keep_dir: bool,
    pub(crate) account: &'a str,
    pub(crate) retention: Duration,
    pub(crate) purge_interval: Duration,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |source| FleetError::Io {
        what: what.to_string(),
        source,
    }
}

pub(crate) async fn start(s: SpawnSettings<'_>) -> Result<SpawnedCloud, FleetError> {
    let dir = tempfile::Builder::new()
        .prefix("devtables-sim-cloud-")
        .tempdir()
        .map_err(io("cannot create the cloud's folder"))?;
    let path = dir.path().to_path_buf();
    std::fs::write(path.join("schema.json5"), SCHEMA).map_err(io("cannot write the schema"))?;
    let retention_secs = s.retention.as_secs().max(1);
    let purge_secs = s.purge_interval.as_secs().max(1);
    let extra_config = s.extra_config.to_string();
    let config = config_text(
        "127.0.0.1:0",
        "127.0.0.1:0",
        retention_secs,
        purge_secs,
        &extra_config,
    );
    let config_path = path.join("cloud.json5");
    std::fs::write(&config_path, config).map_err(io("cannot write the cloud's configuration"))?;

    let keys = Command::new(s.program)
        .args([
            "keys",
            "create",
            "--scope",
            "admin",
            "--account",
            s.account,
            "--data",
        ])
        .arg(path.join("data"))
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| FleetError::Spawn(format!("cannot run {} keys: {e}", s.program.display())))?;
    if !keys.status.success() {
        return Err(FleetError::Spawn(format!(
            "{} keys create failed: {}",
            s.program.display(),
            String::from_utf8_lossy(&keys.stderr).trim()
        )));
    }
    let admin_key = String::from_utf8_lossy(&keys.stdout).trim().to_string();
    if !admin_key.starts_with("dt_") {
        return Err(FleetError::Spawn(format!(
            "{} keys create printed no key: {admin_key:?}",
            s.program.display()
        )));
    }

    let (child, pid, url, mqtt) = launch(s.program, s.log, &config_path, &path, s.cgroup).await?;
    tracing::info!(pid, %url, %mqtt, folder = %path.display(), "started the cloud");
    Ok(SpawnedCloud {
        child,
        pid,
        url,
        mqtt,
        admin_key,
        program: s.program.to_path_buf(),
        log: s.log.to_string(),
        retention_secs,
        purge_secs,
        extra_config,
        cgroup: s.cgroup.map(Path::to_path_buf),
        dir: if s.keep_dir {
            // Kept: the folder outlives the simulation.
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        },
        path,
    })
}

/// The child's configuration file: embedded defaults, the given listen addresses.
fn config_text(
    api: &str,
    broker: &str,
    retention_secs: u64,
    purge_secs: u64,
    extra: &str,
) -> String {
    format!(
        "// Written by devtables sim: the cloud of one simulation.\n\
         {{\n  schema: 'schema.json5',\n  data_dir: 'data',\n  api: '{api}',\n  \
         embedded_broker: '{broker}',\n  tombstone_retention_secs: {retention_secs},\n  \
         purge_interval_secs: {purge_secs},\n  api_requests_per_sec: 0,\n  {extra}\n}}\n"
    )
}

/// Starts `program cloud --config config_path` and waits until it says where it serves;
/// its stderr goes to `cloud.log` in `path` (appended: a restarted cloud's lines follow); with
/// `cgroup`, the child is moved into that control group first.
async fn launch(
    program: &Path,
    log: &str,
    config_path: &Path,
    path: &Path,
    cgroup: Option<&Path>,
) -> Result<(Child, u32, String, String), FleetError> {
    let mut child = Command::new(program)
        .arg("cloud")
        .arg("--config")
        .arg(config_path)
        .env("DEVTABLES_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FleetError::Spawn(format!("cannot run {} cloud: {e}", program.display())))?;
    let pid = child
        .id()
        .ok_or_else(|| FleetError::Spawn("the cloud exited at once".into()))?;
    if let Some(cgroup) = cgroup {
        // `cgroup.procs` moves every thread of the process, and threads started later follow.
        let what = format!(
            "cannot move the cloud into the control group {} (make it first, as root)",
            cgroup.display()
        );
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).map_err(io(&what))?;
    }
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| FleetError::Spawn("the cloud's stderr is not piped".into()))?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path.join("cloud.log"))
        .map_err(io("cannot open cloud.log"))?;
    // Every line of the child's stderr goes to cloud.log (a full pipe would stall the cloud);
    // the line saying where it listens is also handed over.
    let (addrs_tx, addrs_rx) = oneshot::channel();
    tokio::spawn(copy_cloud_log(stderr, log_file, addrs_tx));
    let addrs = tokio::select! {
        found = addrs_rx => found.ok(),
        _ = tokio::time::sleep(START_TIMEOUT) => None,
        status = child.wait() => {
            return Err(FleetError::Spawn(format!(
                "the cloud exited ({}) before it served; see {}",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                path.join("cloud.log").display()
            )));
        }
    };
    let Some((api, mqtt)) = addrs else {
        return Err(FleetError::Spawn(format!(
            "the cloud did not say where it listens within {START_TIMEOUT:?}; see {}",
            path.join("cloud.log").display()
        )));
    };
    Ok((child, pid, format!("http://{api}"), mqtt))
}

/// Copies every line a `devtables cloud` child writes to stderr into `log` (a full pipe would
/// stall the child) and hands over the addresses of its "running" line ([`cloud_addresses`]).
pub async fn copy_cloud_log(
    stderr: tokio::process::ChildStderr,
    mut log: std::fs::File,
    addrs: oneshot::Sender<(String, String)>,
) {
    let mut addrs = Some(addrs);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(found) = cloud_addresses(&line) {
            if let Some(tx) = addrs.take() {
                let _ = tx.send(found);
            }
        }
        // A line to the page cache: short enough for the runtime's thread.
        if writeln!(log, "{line}").is_err() {
            break;
        }
    }
}

/// `(http://API, MQTT)` from the line `devtables cloud running: API http://A  MQTT M; ...`.
/// The API's `host:port` and the MQTT address of `devtables cloud`'s "running" line.
pub fn cloud_addresses(line: &str) -> Option<(String, String)> {
    let rest = &line[line.find(RUNNING)? + RUNNING.len()..];
    let (api, rest) = rest.split_once(char::is_whitespace)?;
    let mqtt = rest.trim_start().strip_prefix("MQTT ")?;
    let mqtt = mqtt.split(|c: char| c == ';' || c.is_whitespace()).next()?;
    Some((api.to_string(), mqtt.to_string()))
}

impl SpawnedCloud {
    /// Stops the child: SIGTERM (its clean shutdown), SIGKILL if it has not exited in time.
    async fn terminate(&mut self) {
        // SAFETY: kill sends a signal to our own child, whose pid we hold until it is reaped.
        let _ = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    "the cloud did not stop within {STOP_TIMEOUT:?}: killing it"
                );
                let _ = self.child.kill().await;
            }
        }
    }

    /// Restarts the child as an operator would (SIGTERM, then start again) on the same data
    /// and the same addresses, so the devices find it where it was. Returns once it serves.
    pub(crate) async fn restart(&mut self) -> Result<(), FleetError> {
        self.terminate().await;
        let api = self.url.trim_start_matches("http://").to_string();
        let config = config_text(
            &api,
            &self.mqtt,
            self.retention_secs,
            self.purge_secs,
            &self.extra_config,
        );
        let config_path = self.path.join("cloud.json5");
        std::fs::write(&config_path, config)
            .map_err(io("cannot rewrite the cloud's configuration"))?;
        let (child, pid, url, mqtt) = launch(
            &self.program,
            &self.log,
            &config_path,
            &self.path,
            self.cgroup.as_deref(),
        )
        .await?;
        if (url.as_str(), mqtt.as_str()) != (self.url.as_str(), self.mqtt.as_str()) {
            return Err(FleetError::Spawn(format!(
                "the restarted cloud serves {url} and {mqtt}, not {} and {}",
                self.url, self.mqtt
            )));
        }
        tracing::info!(pid, "restarted the cloud");
        (self.child, self.pid) = (child, pid);
        Ok(())
    }

    pub(crate) async fn stop(&mut self) {
        self.terminate().await;
        match self.dir.take() {
            Some(dir) => drop(dir),
            None => eprintln!("the cloud's folder is kept: {}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_line_gives_both_addresses() {
        let line = "devtables cloud running: API http://127.0.0.1:43121  MQTT 127.0.0.1:38805; Ctrl-C stops it";
        assert_eq!(
            cloud_addresses(line),
            Some(("127.0.0.1:43121".into(), "127.0.0.1:38805".into()))
        );
        assert_eq!(cloud_addresses("some other line"), None);
    }
}
