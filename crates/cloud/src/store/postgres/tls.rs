//! TLS to PostgreSQL: every network hop of devtables is encrypted, the database's included. The
//! client is rustls (as every other TLS client of the project) through `tokio-postgres-rustls`,
//! checking the server against the CA of the cloud's `database_tls` block (the same
//! `devtables-tls` settings as the broker's: CA, optional server name, optional client
//! certificate). With TLS configured the connection requires it (`sslmode=require`): a server
//! without TLS is refused, never used in clear text.

use std::sync::Arc;

/// The rustls settings of the store's connections (and the cluster's: leases, wake-ups).
#[derive(Clone, Debug)]
pub struct PostgresTls(pub Arc<rustls::ClientConfig>);

impl PartialEq for PostgresTls {
    fn eq(&self, other: &PostgresTls) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for PostgresTls {}

/// Connects with `tls` when given (required), in clear text otherwise.
pub fn connect(
    config: &postgres::Config,
    tls: Option<&PostgresTls>,
) -> Result<postgres::Client, postgres::Error> {
    match tls {
        None => config.connect(postgres::NoTls),
        Some(tls) => {
            let mut config = config.clone();
            config.ssl_mode(postgres::config::SslMode::Require);
            config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(
                (*tls.0).clone(),
            ))
        }
    }
}

/// Whether the connection goes over the network in clear text: TCP to a host other than the
/// loopback, without TLS (warned at start).
pub fn clear_text_over_network(config: &postgres::Config, tls: Option<&PostgresTls>) -> bool {
    tls.is_none()
        && config.get_hosts().iter().any(|h| match h {
            postgres::config::Host::Tcp(name) => {
                !(name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback()))
            }
            #[cfg(unix)]
            postgres::config::Host::Unix(_) => false,
        })
}
