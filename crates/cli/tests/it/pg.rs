//! The PostgreSQL the end-to-end tests run a cloud on: its URL (`DEVTABLES_POSTGRES`, default
//! `postgres://postgres@127.0.0.1:5432/test`) and a schema of each test's own, dropped with it.
//!
//! It exists so every test that runs `devtables cloud` on PostgreSQL (the scenarios on
//! PostgreSQL + Mosquitto, the scaled-out cloud) makes and drops its schema the same way. Only
//! tests that are on (`DEVTABLES_SERVICES` set) reach it, so an unreachable server fails them.

/// A PostgreSQL schema of the test's own, created at [`PgSchema::fresh`] and dropped (with
/// everything in it) when the handle goes.
#[derive(Debug)]
pub struct PgSchema {
    /// The database's URL, as `devtables cloud` and `devtables keys` take it.
    pub url: String,
    /// The schema's name (`dt_cli_<random hex>`): a valid `database_schema`.
    pub name: String,
}

impl PgSchema {
    /// Creates a fresh schema; panics (naming the address) when PostgreSQL does not answer.
    pub fn fresh() -> PgSchema {
        let url = std::env::var("DEVTABLES_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("dt_cli_{:012x}", rand::random::<u64>() >> 16);
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
            panic!("DEVTABLES_SERVICES is set but PostgreSQL at {url} is unreachable: {e}")
        });
        c.batch_execute(&format!("CREATE SCHEMA \"{name}\""))
            .unwrap_or_else(|e| panic!("creating schema {name}: {e}"));
        PgSchema { url, name }
    }

    /// The one integer `sql` answers, with `{s}` standing for this schema (quoted).
    pub fn query_i64(&self, sql: &str) -> i64 {
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).unwrap();
        c.query_one(
            sql.replace("{s}", &format!("\"{}\"", self.name)).as_str(),
            &[],
        )
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
        }
    }
}
