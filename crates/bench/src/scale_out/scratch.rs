//! A store of the cloud for one measurement of `scale-out`'s store figures (the raw insert
//! ceiling, the broadcast): SQLite in a fresh temporary folder, or PostgreSQL in a fresh
//! schema, opened as the service opens its store (`devtables_cloud::store::open_configured`,
//! the service's defaults: SQLite with `synchronous=FULL`), and gone when the measurement ends.

use anyhow::Context;
use devtables_cloud::store::{self, CloudStore};
use devtables_cloud::{CloudConfig, DatabaseChoice};

use super::services::PgSchema;

/// Which store.
#[derive(Clone, Debug)]
pub enum StoreKind {
    Sqlite,
    /// The database at this URL; the schema is the measurement's own.
    Postgres {
        url: String,
    },
}

impl StoreKind {
    pub fn label(&self) -> &'static str {
        match self {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres { .. } => "PostgreSQL",
        }
    }
}

/// A fresh, empty store; [`Scratch::open`] connects to it (again).
pub struct Scratch {
    config: CloudConfig,
    // Dropped after every store opened on them (callers drop their stores first).
    _dir: tempfile::TempDir,
    _schema: Option<PgSchema>,
}

impl Scratch {
    pub fn new(kind: &StoreKind) -> anyhow::Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("devtables-bench-scale-out-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let mut config = CloudConfig::new(dir.path());
        let schema = match kind {
            StoreKind::Sqlite => None,
            StoreKind::Postgres { url } => {
                let schema = PgSchema::fresh(url)?;
                config.database = DatabaseChoice::Postgres {
                    url: url.clone(),
                    schema: schema.name.clone(),
                };
                Some(schema)
            }
        };
        Ok(Scratch {
            config,
            _dir: dir,
            _schema: schema,
        })
    }

    /// A connection to the store (each call a new one: PostgreSQL writers of their own).
    pub fn open(&self) -> anyhow::Result<Box<dyn CloudStore>> {
        store::open_configured(&self.config).context("cannot open the store")
    }

    /// The push rules the service applies with its default settings.
    pub fn max_drift_ms(&self) -> u64 {
        self.config.sync.max_drift_ms
    }
}
