//! `devtables devices`: act on a cloud's device registry directly in its data folder.
//!
//! It exists so an operator can cut a device off without an API key at hand (a stolen device,
//! the API down): the command opens the cloud's SQLite store itself (WAL mode, so it works while
//! the cloud runs). A running cloud's embedded broker reads device credentials through a cache
//! with a short time-to-live (`credentials_ttl`, default 5 s) and sweeps for revoked devices as
//! often, so within that time it refuses the device's connections and closes its live session;
//! its pushes are refused by the store at once. Through the cloud's API
//! (`DELETE /v1/devices/{account}/{device}`) all of it is immediate.
//!
//! `devtables devices cert` issues a client certificate for a registered device from the
//! cloud's device CA in the same data folder (created there if it does not exist yet), for the
//! embedded broker's device-certificate listener: for a device registered without one, or one
//! whose certificate expires or whose secret was rotated.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use devtables_cloud::ca::{self, DeviceCa};
use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::{CloudStore, REVOKED_SECRET_HASH};
use devtables_sync::identity::DeviceId;

use crate::store_target::StoreTarget;

#[derive(Args)]
pub struct DevicesArgs {
    #[command(subcommand)]
    command: DevicesCommand,
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Revoke a device: it may no longer connect and its pushes are refused; its items stay
    /// unless --delete-items is given.
    Revoke {
        #[command(flatten)]
        store: StoreTarget,
        #[arg(long)]
        account: String,
        #[arg(long)]
        device: String,
        /// Also delete the device's items and feed (in the same transaction).
        #[arg(long)]
        delete_items: bool,
    },
    /// Issue a client certificate for a registered device from the cloud's device CA: writes
    /// cert.pem, key.pem (owner-only) and ca.pem to --out. The certificate is bound to the
    /// device's current secret: rotating the secret cuts it off.
    Cert {
        /// The cloud's data folder (holding `cloud.db`, and the CA in `ca/`).
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        account: String,
        #[arg(long)]
        device: String,
        /// The folder to write the files to (created if needed; existing files are kept, and
        /// the command refuses).
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid, in days.
        #[arg(long, default_value_t = ca::DEFAULT_VALIDITY_DAYS)]
        validity_days: u32,
    },
}

/// The files `devtables devices cert` writes, with their modes.
const CERT_FILES: [(&str, u32); 3] = [("cert.pem", 0o644), ("key.pem", 0o600), ("ca.pem", 0o644)];

fn device_id(account: &str, device: &str) -> anyhow::Result<DeviceId> {
    DeviceId::new(account, device)
        .map_err(|e| anyhow::anyhow!("invalid device {account}/{device}: {e}"))
}

/// The cloud store of `data`, which must exist (a command on a registry never creates one).
fn open_store(data: &Path) -> anyhow::Result<SqliteStore> {
    let path = data.join("cloud.db");
    if !path.is_file() {
        anyhow::bail!("{} holds no cloud store (cloud.db)", data.display());
    }
    Ok(SqliteStore::open(&path, SqliteOptions::default())?)
}

/// Writes the certificate's files to `out`, all or none.
fn write_cert_files(out: &Path, texts: [&str; 3]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let mut written = Vec::new();
    for ((name, mode), text) in CERT_FILES.iter().zip(texts) {
        let path = out.join(name);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, *mode);
        #[cfg(not(unix))]
        let _ = mode;
        let result = options.open(&path).and_then(|mut f| {
            written.push(path.clone());
            f.write_all(text.as_bytes())?;
            f.sync_all()
        });
        if let Err(e) = result {
            for done in &written {
                let _ = std::fs::remove_file(done);
            }
            anyhow::bail!(
                "cannot write {}: {e} (nothing was written; an existing file is never replaced)",
                path.display()
            );
        }
    }
    Ok(())
}

pub fn run(args: DevicesArgs) -> anyhow::Result<()> {
    match args.command {
        DevicesCommand::Cert {
            data,
            account,
            device,
            out,
            validity_days,
        } => {
            let id = device_id(&account, &device)?;
            let validity = ca::validity_days(u64::from(validity_days))?;
            let mut store = open_store(&data)?;
            let Some(record) = store.device(&id)? else {
                anyhow::bail!("device {id} is not registered");
            };
            if record.secret_hash == REVOKED_SECRET_HASH {
                anyhow::bail!(
                    "device {id} is revoked: rotate its secret to make it usable again, then issue"
                );
            }
            // Refused before issuing, so an existing file is never the reason for a new CA.
            for (name, _) in CERT_FILES {
                if out.join(name).exists() {
                    anyhow::bail!("{} exists: choose another --out", out.join(name).display());
                }
            }
            let ca = DeviceCa::open_or_create(&data)?;
            let cert = ca.issue(&id, &record.secret_hash, validity)?;
            write_cert_files(&out, [&cert.cert_pem, &cert.key_pem, &cert.ca_pem])?;
            eprintln!(
                "issued a certificate for device {id}, valid {validity_days} days: {}",
                out.display()
            );
        }
        DevicesCommand::Revoke {
            store,
            account,
            device,
            delete_items,
        } => {
            let id = device_id(&account, &device)?;
            // A revocation is meaningless on a store that does not exist yet: do not create one.
            let mut store = store.open(false)?;
            if !store.revoke_device(&id, delete_items)? {
                anyhow::bail!("device {id} is not registered");
            }
            eprintln!(
                "revoked device {id}{}",
                if delete_items {
                    " and deleted its items"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}
