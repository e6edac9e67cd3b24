//! `devtables agent --config FILE` and `devtables cloud --config FILE`: the standalone agent and
//! cloud service, until Ctrl-C (or SIGTERM).
//!
//! Both take command-line overrides of the file's addresses and data (`--api`, `--mqtt`,
//! `--data`; the agent's `--mqtt`, `--db` and its local API's `--local-api-socket`,
//! `--local-api-tcp`, `--no-local-api`, parsed and applied by
//! `devtables_agent::standalone::AgentArgs`, which the device-only binary shares), so a
//! second instance or a port already taken needs no edited copy of the file. A cloud that cannot
//! start says which option or key changes the port it could not bind, and leaves behind no data
//! folder or file this run created ([`StartCleanup`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use devtables_agent::standalone;
pub use devtables_agent::standalone::AgentArgs;
use devtables_cloud::broker::BrokerError;
use devtables_cloud::{BrokerMode, Cloud, CloudConfig, CloudFile, StartError};
use devtables_schema::Schema;

#[derive(Args)]
pub struct CloudArgs {
    /// The configuration file (JSON5).
    #[arg(long)]
    config: PathBuf,
    /// The HTTP API's address, instead of the file's `api` (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    api: Option<SocketAddr>,
    /// The MQTT address, instead of the file's: the embedded broker's listener (`embedded_broker`,
    /// or `embedded_broker_tls.listen` when that is its only one), or the external broker
    /// (`external_broker`, host:port; several, separated by commas, for a broker cluster).
    #[arg(long, value_name = "ADDR")]
    mqtt: Option<String>,
    /// The data folder, instead of the file's `data_dir` (created when missing).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

/// The standalone agent: the command line and the loop shared with the device-only
/// `devtables-agent` binary.
pub fn agent(args: AgentArgs) -> anyhow::Result<()> {
    args.run()?;
    Ok(())
}

pub fn cloud(args: CloudArgs) -> anyhow::Result<()> {
    let (schema_path, mut config) = CloudFile::load(&args.config)
        .map_err(|e| anyhow::anyhow!("invalid cloud configuration: {e}"))?;
    apply_cloud_overrides(&mut config, &args)?;
    let schema = Schema::load(&schema_path)
        .with_context(|| format!("cannot load schema {}", schema_path.display()))?;
    crate::limits::raise_open_files("each connected device holds a socket");
    let cleanup = StartCleanup::before(&config.data_dir);
    runtime()?.block_on(async move {
        let cloud = match Cloud::start(config.clone(), Arc::new(schema)).await {
            Ok(cloud) => cloud,
            Err(e) => {
                cleanup.undo();
                return Err(explain_start_error(e, &config, Some(&args.config)));
            }
        };
        eprintln!(
            "devtables cloud running: API http://{}  MQTT {}; Ctrl-C stops it",
            cloud.api_addr, cloud.mqtt_addr
        );
        stop_signal().await;
        cloud.shutdown().await;
        Ok(())
    })
}

/// `--api`, `--mqtt` and `--data` over the file's settings.
fn apply_cloud_overrides(config: &mut CloudConfig, args: &CloudArgs) -> anyhow::Result<()> {
    if let Some(api) = args.api {
        config.api_listen = api;
    }
    if let Some(data) = &args.data {
        config.data_dir = data.clone();
    }
    let Some(mqtt) = &args.mqtt else {
        return Ok(());
    };
    match &mut config.broker {
        BrokerMode::Embedded { listen } => {
            let addr: SocketAddr = mqtt.parse().with_context(|| {
                format!(
                    "--mqtt {mqtt}: the embedded broker listens on an address like 127.0.0.1:1883"
                )
            })?;
            match (&mut config.broker_tls, config.broker_plain) {
                // The TLS listener alone: that is the one devices use.
                (Some(tls), false) => tls.listen = addr,
                _ => *listen = addr,
            }
        }
        BrokerMode::External { host, port, .. } => {
            use devtables_cloud::config::{parse_external_brokers, ExternalScheme};
            let list = parse_external_brokers(mqtt.split(',').map(str::trim))
                .map_err(|e| anyhow::anyhow!("--mqtt {mqtt}: {e}"))?;
            match (list.scheme, config.external_tls.is_some()) {
                (Some(ExternalScheme::Tls), false) => {
                    bail!("--mqtt {mqtt} asks for TLS, but the file sets no external_broker_tls")
                }
                (Some(ExternalScheme::Clear), true) => {
                    bail!("--mqtt {mqtt} is clear text, but the file sets external_broker_tls")
                }
                _ => {}
            }
            let mut addresses = list.addresses.into_iter();
            if let Some((h, p)) = addresses.next() {
                (*host, *port) = (h, p);
            }
            config.mqtt.external_fallbacks = addresses.collect();
        }
    }
    Ok(())
}

/// The start error, and for a port already in use which option (and, with a file, which key)
/// moves it.
pub(crate) fn explain_start_error(
    error: StartError,
    config: &CloudConfig,
    file: Option<&Path>,
) -> anyhow::Error {
    let in_use = |addr: &SocketAddr, source: &std::io::Error| {
        source.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0
    };
    let (addr, option, key) = match &error {
        StartError::Api { addr, source } if in_use(addr, source) => (*addr, "--api", "api"),
        StartError::Broker(BrokerError::Bind { addr, source }) if in_use(addr, source) => {
            let key = if config
                .broker_tls
                .as_ref()
                .is_some_and(|t| t.listen == *addr)
            {
                "embedded_broker_tls.listen"
            } else if config
                .device_certificates
                .as_ref()
                .is_some_and(|c| c.listen == *addr)
            {
                "device_certificates.listen"
            } else {
                "embedded_broker"
            };
            // Only the devices' listener has a command-line option.
            let option = match (key, config.broker_plain) {
                ("embedded_broker", _) | ("embedded_broker_tls.listen", false) => "--mqtt",
                _ => "",
            };
            (*addr, option, key)
        }
        _ => return anyhow::Error::new(error),
    };
    let mut other = addr;
    other.set_port(addr.port().checked_add(1).unwrap_or(addr.port() - 1));
    let mqtt_guess = if addr.port() == 1883 {
        " (a system Mosquitto?)"
    } else {
        ""
    };
    let pass = if option.is_empty() {
        String::new()
    } else {
        format!("pass {option} {other}")
    };
    let set = file.map(|f| format!("set `{key}` in {}", f.display()));
    let how = match (pass.is_empty(), set) {
        (false, Some(set)) => format!("{pass} or {set}"),
        (false, None) => pass,
        (true, Some(set)) => set,
        (true, None) => "choose another port".to_string(),
    };
    anyhow::anyhow!("{error}. Port {} is in use{mqtt_guess}: {how}", addr.port())
}

/// What a start may create in a data folder, undone when the start fails: the folder itself
/// when this run made it, or otherwise the entries this run added to it. A file that was there
/// (a store with its data) is never touched, nor the SQLite journal files of a store that was
/// there (`cloud.db-wal` of an existing `cloud.db`: it may hold the store's last commits).
pub(crate) struct StartCleanup {
    dir: PathBuf,
    /// The folder's entries before the start; `None` when it did not exist.
    before: Option<BTreeSet<std::ffi::OsString>>,
}

impl StartCleanup {
    pub(crate) fn before(dir: &Path) -> StartCleanup {
        let before = std::fs::read_dir(dir).ok().map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect()
        });
        StartCleanup {
            dir: dir.to_path_buf(),
            before,
        }
    }

    /// Removes what the failed start created (best effort: a failure here is reported, the
    /// start's own error is what matters).
    pub(crate) fn undo(self) {
        let result = match &self.before {
            None => match std::fs::remove_dir_all(&self.dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
            Some(before) => self.remove_new_entries(before),
        };
        if let Err(e) = result {
            eprintln!(
                "could not remove what the failed start created in {}: {e}",
                self.dir.display()
            );
        }
    }

    fn remove_new_entries(&self, before: &BTreeSet<std::ffi::OsString>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let sidecar_of_kept = before.iter().any(|old| {
                let (old, name) = (old.to_string_lossy(), name.to_string_lossy());
                name.len() > old.len()
                    && name.starts_with(old.as_ref())
                    && name[old.len()..].starts_with('-')
            });
            if before.contains(&name) || sidecar_of_kept {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    standalone::runtime().context("cannot start the async runtime")
}

/// Ctrl-C or SIGTERM (the one the standalone agent also stops on).
pub(crate) use devtables_agent::standalone::stop_signal;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_start_removes_only_what_it_created() {
        let root = tempfile::tempdir().unwrap();
        // A folder the run made goes whole.
        let new = root.path().join("new");
        let cleanup = StartCleanup::before(&new);
        std::fs::create_dir_all(new.join("ca")).unwrap();
        std::fs::write(new.join("cloud.db"), b"x").unwrap();
        cleanup.undo();
        assert!(!new.exists());

        // In a folder that was there, only the new entries go; a kept store's journal stays.
        let old = root.path().join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("cloud.db"), b"kept").unwrap();
        let cleanup = StartCleanup::before(&old);
        for made in ["cloud.db-wal", "cloud.db-shm", "other.db", "other.db-wal"] {
            std::fs::write(old.join(made), b"x").unwrap();
        }
        std::fs::create_dir_all(old.join("ca")).unwrap();
        cleanup.undo();
        let mut left: Vec<String> = std::fs::read_dir(&old)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["cloud.db", "cloud.db-shm", "cloud.db-wal"]);
    }
}
