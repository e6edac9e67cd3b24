//! The one place the cloud's tests reach PostgreSQL: its URL (`DEVTABLES_POSTGRES`, default
//! `postgres://postgres@127.0.0.1:5432/test`), the services rule (unset `DEVTABLES_SERVICES`:
//! the test prints `SKIPPED` and returns; set: an unreachable PostgreSQL fails it), and a fresh
//! schema per store, dropped with its handle.

use devtables_cloud::store::postgres::{PostgresOptions, PostgresStore};
use rand::Rng;

use super::services_gate::services_on;

/// The test database's URL.
pub fn url() -> String {
    std::env::var("DEVTABLES_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A plain client of the test database, for what a test checks or breaks behind the store.
pub fn client() -> postgres::Client {
    let url = url();
    postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
        panic!("DEVTABLES_SERVICES is set but PostgreSQL at {url} is unreachable: {e}")
    })
}

/// A schema of its own for one test (`dt_test_<random hex>`), dropped with the handle.
pub struct TestSchema {
    pub name: String,
}

impl TestSchema {
    /// A fresh schema name when the service tests are on (PostgreSQL must answer then); `None`,
    /// with a `SKIPPED` line, when they are off.
    pub fn fresh() -> Option<TestSchema> {
        if !services_on() {
            return None;
        }
        // Reached now, so a missing server fails here with its address.
        drop(client());
        let name = format!("dt_test_{:016x}", rand::thread_rng().gen::<u64>());
        Some(TestSchema { name })
    }

    pub fn options(&self) -> PostgresOptions {
        PostgresOptions {
            schema: self.name.clone(),
            ..PostgresOptions::default()
        }
    }

    /// A store on this schema (the first creates it).
    pub fn store(&self) -> PostgresStore {
        self.store_with(self.options())
    }

    pub fn store_with(&self, options: PostgresOptions) -> PostgresStore {
        PostgresStore::connect(&url(), options)
            .unwrap_or_else(|e| panic!("connecting a store to schema {}: {e}", self.name))
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&url(), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
        }
    }
}
