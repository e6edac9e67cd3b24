//! The external services `scale-out` needs, found or refused up front: PostgreSQL at
//! `DEVTABLES_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`) and Mosquitto at
//! `DEVTABLES_MOSQUITTO` (default `127.0.0.1:1883`), the variables and defaults of the service
//! tests. A missing one fails the benchmark with its address: it never skips. Every variant
//! works in a PostgreSQL schema of its own ([`PgSchema`]), dropped when it ends.
//!
//! The `postgres` client runs a small tokio runtime inside every call, so these calls are made
//! off the benchmark's runtime (from the thread that drives it, between its `block_on`s).

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context;

/// The PostgreSQL of the service tests.
pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The Mosquitto of the service tests.
pub const DEFAULT_MOSQUITTO: &str = "127.0.0.1:1883";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the services are.
#[derive(Clone, Debug)]
pub struct Services {
    pub postgres: String,
    pub mosquitto: String,
}

impl Services {
    /// The addresses from the environment, each checked: PostgreSQL answers a query, Mosquitto
    /// accepts a TCP connection.
    pub fn find() -> anyhow::Result<Services> {
        let postgres =
            std::env::var("DEVTABLES_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.into());
        let mosquitto =
            std::env::var("DEVTABLES_MOSQUITTO").unwrap_or_else(|_| DEFAULT_MOSQUITTO.into());
        let mut client =
            postgres::Client::connect(&postgres, postgres::NoTls).with_context(|| {
                format!("PostgreSQL at {postgres} (DEVTABLES_POSTGRES) is unreachable")
            })?;
        client
            .simple_query("SELECT 1")
            .with_context(|| format!("PostgreSQL at {postgres} does not answer"))?;
        let addr = mosquitto
            .to_socket_addrs()
            .with_context(|| format!("DEVTABLES_MOSQUITTO={mosquitto}"))?
            .next()
            .with_context(|| format!("DEVTABLES_MOSQUITTO={mosquitto} resolves to nothing"))?;
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).with_context(|| {
            format!("Mosquitto at {mosquitto} (DEVTABLES_MOSQUITTO) is unreachable")
        })?;
        Ok(Services {
            postgres,
            mosquitto,
        })
    }
}

/// A fresh PostgreSQL schema, dropped (with everything in it) when this is dropped.
pub struct PgSchema {
    url: String,
    pub name: String,
}

impl PgSchema {
    /// A schema named `dt_bench_<random hex>`, created now.
    pub fn fresh(url: &str) -> anyhow::Result<PgSchema> {
        let name = format!("dt_bench_{:012x}", rand::random::<u64>() >> 16);
        let mut client = postgres::Client::connect(url, postgres::NoTls)
            .with_context(|| format!("PostgreSQL at {url} is unreachable"))?;
        client
            .batch_execute(&format!("CREATE SCHEMA \"{name}\""))
            .with_context(|| format!("cannot create the schema {name}"))?;
        Ok(PgSchema {
            url: url.to_string(),
            name,
        })
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let dropped = postgres::Client::connect(&self.url, postgres::NoTls)
            .and_then(|mut c| c.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.name)));
        if let Err(e) = dropped {
            eprintln!("cannot drop the PostgreSQL schema {}: {e}", self.name);
        }
    }
}
