//! `devtables devices`: act on a cloud's device registry directly in its data folder.
//!
//! It exists so an operator can cut a device off without an API key at hand (a stolen device,
//! the API down): the command opens the cloud's SQLite store itself (WAL mode, so it works while
//! the cloud runs). A running cloud's embedded broker reads device credentials through a cache
//! with a short time-to-live (`credentials_ttl`, default 5 s) and sweeps for revoked devices as
//! often, so within that time it refuses the device's connections and closes its live session;
//! its pushes are refused by the store at once. Through the cloud's API
//! (`DELETE /v1/devices/{account}/{device}`) all of it is immediate.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::CloudStore;
use devtables_sync::identity::DeviceId;

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
        /// The cloud's data folder (the `data_dir` of its configuration, holding `cloud.db`).
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        account: String,
        #[arg(long)]
        device: String,
        /// Also delete the device's items and feed (in the same transaction).
        #[arg(long)]
        delete_items: bool,
    },
}

pub fn run(args: DevicesArgs) -> anyhow::Result<()> {
    match args.command {
        DevicesCommand::Revoke {
            data,
            account,
            device,
            delete_items,
        } => {
            let id = DeviceId::new(account.as_str(), device.as_str())
                .map_err(|e| anyhow::anyhow!("invalid device {account}/{device}: {e}"))?;
            let path = data.join("cloud.db");
            // A revocation is meaningless on a store that does not exist yet: do not create one.
            if !path.is_file() {
                anyhow::bail!("{} holds no cloud store (cloud.db)", data.display());
            }
            let mut store = SqliteStore::open(&path, SqliteOptions::default())?;
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
