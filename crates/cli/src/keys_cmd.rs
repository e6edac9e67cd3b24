//! `devtables keys`: create, list and revoke the HTTP API's keys directly in a cloud's data
//! folder.
//!
//! It exists for the bootstrap: the API refuses every request without a key, so the first admin
//! key cannot come from the API. This command opens the cloud's store itself (SQLite in WAL
//! mode, so it works while the cloud runs too; or the PostgreSQL database of a scaled-out cloud
//! with `--database`) and prints a new key once.

use clap::{Args, Subcommand, ValueEnum};
use devtables_cloud::auth;
use devtables_cloud::store::{CloudStore, KeyScope};

use crate::store_target::StoreTarget;
use devtables_sync::identity::DeviceId;

#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Args)]
struct Target {
    #[command(flatten)]
    store: StoreTarget,
    /// The account the keys belong to.
    #[arg(long)]
    account: String,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (on standard output, once: only its hash is stored).
    Create {
        #[command(flatten)]
        target: Target,
        /// What the key may do: read (GET only), write (also items), admin (also devices, keys
        /// and the service status).
        #[arg(long, value_enum)]
        scope: Scope,
    },
    /// List the account's keys as JSON lines (ids, scopes, times; never a secret).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Revoke one of the account's keys.
    Revoke {
        #[command(flatten)]
        target: Target,
        /// The key's id (the part after `dt_`, up to the next `_`).
        #[arg(long)]
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Scope {
    Read,
    Write,
    Admin,
}

impl From<Scope> for KeyScope {
    fn from(s: Scope) -> KeyScope {
        match s {
            Scope::Read => KeyScope::Read,
            Scope::Write => KeyScope::Write,
            Scope::Admin => KeyScope::Admin,
        }
    }
}

fn open(target: &Target) -> anyhow::Result<Box<dyn CloudStore>> {
    // The API's rule for account names (checked with a placeholder device).
    DeviceId::new(target.account.as_str(), "x")
        .map_err(|e| anyhow::anyhow!("invalid account {:?}: {e}", target.account))?;
    target.store.open(true)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    match args.command {
        KeysCommand::Create { target, scope } => {
            let mut store = open(&target)?;
            let new =
                auth::create_api_key(store.as_mut(), &target.account, scope.into(), now_ms())?;
            eprintln!(
                "created {} key {} of account {}; it is shown only now \
                 (send it as Authorization: Bearer <key>):",
                new.scope, new.id, new.account
            );
            println!("{}", new.key);
        }
        KeysCommand::List { target } => {
            let mut store = open(&target)?;
            for key in store.api_keys(&target.account)? {
                println!("{}", serde_json::to_string(&key)?);
            }
        }
        KeysCommand::Revoke { target, id } => {
            let mut store = open(&target)?;
            if !store.revoke_api_key(&target.account, &id, now_ms())? {
                anyhow::bail!("account {} has no API key {id}", target.account);
            }
            eprintln!("revoked key {id} of account {}", target.account);
        }
    }
    Ok(())
}
