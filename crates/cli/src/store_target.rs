//! Which cloud store a command works on: SQLite in a cloud's data folder (`--data`) or the
//! PostgreSQL database of a scaled-out cloud (`--database`). One set of flags for `keys`,
//! `devices revoke` and `broker-config`, so every registry command reaches both stores alike.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use devtables_cloud::store::{open_configured, CloudStore};
use devtables_cloud::{CloudConfig, DatabaseChoice};

#[derive(Args, Clone, Debug)]
pub struct StoreTarget {
    /// The cloud's data folder (the `data_dir` of its configuration, holding `cloud.db`).
    #[arg(long, required_unless_present = "database")]
    pub data: Option<PathBuf>,
    /// The cloud's PostgreSQL database instead (its `database` URL); the variable
    /// DEVTABLES_DATABASE keeps a password out of the process list.
    #[arg(long, env = "DEVTABLES_DATABASE", conflicts_with = "data")]
    pub database: Option<String>,
    /// With --database: the cloud's `database_schema`.
    #[arg(long, default_value = "devtables", requires = "database")]
    pub database_schema: String,
    /// With --database: TLS to it, checking the server against this CA (the cloud's
    /// `database_tls.ca`).
    #[arg(long, requires = "database")]
    pub database_ca: Option<PathBuf>,
}

impl StoreTarget {
    /// The store as the generated files name it (a folder, or the database's host and
    /// schema: never the URL, which may hold a password).
    pub fn describe(&self) -> String {
        match (&self.data, &self.database) {
            (_, Some(url)) => {
                let host = url
                    .rsplit('@')
                    .next()
                    .unwrap_or(url)
                    .trim_start_matches("postgres://")
                    .trim_start_matches("postgresql://");
                format!("PostgreSQL {host}, schema {}", self.database_schema)
            }
            (Some(data), None) => data.display().to_string(),
            (None, None) => "(no store)".into(),
        }
    }

    /// Opens the store. A SQLite store is created only when `create` (a key may be the first
    /// thing a new cloud gets; a registry command on a folder without a store is a typo).
    pub fn open(&self, create: bool) -> anyhow::Result<Box<dyn CloudStore>> {
        let config = match (&self.data, &self.database) {
            (_, Some(url)) => {
                let mut c = CloudConfig::new(".");
                c.database = DatabaseChoice::Postgres {
                    url: url.clone(),
                    schema: self.database_schema.clone(),
                };
                c.database_tls = self
                    .database_ca
                    .as_ref()
                    .map(devtables_cloud::tls::ClientTls::new);
                c
            }
            (Some(data), None) => {
                if create {
                    std::fs::create_dir_all(data)
                        .with_context(|| format!("cannot create {}", data.display()))?;
                } else if !data.join("cloud.db").is_file() {
                    anyhow::bail!(
                        "{} holds no cloud store (cloud.db): pass the cloud's data folder as \
                         --data, or its database as --database",
                        data.display()
                    );
                }
                CloudConfig::new(data)
            }
            (None, None) => anyhow::bail!("give the cloud's --data folder or its --database"),
        };
        Ok(open_configured(&config)?)
    }
}
