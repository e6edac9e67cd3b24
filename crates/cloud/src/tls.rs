//! TLS for every network hop of the cloud: the HTTP API's listener, the embedded broker's
//! certificate files, and the service's own MQTT client (to an external broker, or pinned to the
//! embedded broker's own certificate).
//!
//! It exists so that API keys, device secrets and items never cross a network in clear text
//! unless the configuration says so (and the service then warns at start). rustls with the ring
//! provider is used, passed explicitly: the broker's TLS brings a second provider (aws-lc-rs)
//! into the process, so no process-wide default can be relied on. The client side (CA file,
//! server name, pinned certificate, client certificate) is shared with the agent and lives in
//! `devtables-tls`; this module re-exports it and holds the server side.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use devtables_tls::{read_certs, read_key, ClientIdentity, ClientTls, TlsError};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::status::{SyncStatus, WarnLimiter};

/// A server certificate chain and its private key, both PEM files.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerTls {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The rustls server configuration for `tls` (no client certificates).
pub fn server_config(tls: &ServerTls) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&tls.cert)?;
    let key = read_key(&tls.key)?;
    ServerConfig::builder_with_provider(devtables_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(format!("{}: {e}", tls.cert.display())))
}

/// The rustls client configuration for an external broker.
pub fn client_config(tls: &ClientTls) -> Result<rustls::ClientConfig, TlsError> {
    devtables_tls::client_config(tls)
}

/// The rustls client configuration of the service's own connection to its embedded broker: it
/// trusts exactly the broker's own leaf certificate, so it needs no CA file and works whatever
/// names the certificate carries (the service connects over loopback).
pub fn pinned_client_config(broker: &ServerTls) -> Result<rustls::ClientConfig, TlsError> {
    devtables_tls::pinned_client_config(&broker.cert)
}

/// Most TLS handshakes of the HTTP API in progress at once; the accept loop waits for a free
/// slot beyond it (so a flood of idle connections cannot grow memory).
pub const API_HANDSHAKES: usize = 256;
/// How long an HTTP API client may take to finish its TLS handshake.
const API_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener for `axum::serve` that hands over connections once their TLS handshake is done.
///
/// Handshakes run on their own tasks (at most [`API_HANDSHAKES`]), so a slow client never
/// holds up the others. A failed handshake is counted (`api_tls_handshakes_failed` in
/// `GET /v1/status`) and warned about, rate-limited.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
    local_addr: std::net::SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS on `listener` with `config`.
    pub fn new(
        listener: TcpListener,
        config: ServerConfig,
        status: Arc<SyncStatus>,
    ) -> std::io::Result<TlsListener> {
        let local_addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = mpsc::channel(API_HANDSHAKES);
        let slots = Arc::new(Semaphore::new(API_HANDSHAKES));
        let warn = Arc::new(Mutex::new(WarnLimiter::new(WarnLimiter::INTERVAL)));
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!("HTTP API accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx, status, warn) =
                    (acceptor.clone(), tx.clone(), status.clone(), warn.clone());
                tokio::spawn(async move {
                    let outcome =
                        tokio::time::timeout(API_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    match outcome {
                        Ok(Ok(tls)) => {
                            drop(slot);
                            let _ = tx.send((tls, peer)).await;
                        }
                        failed => {
                            status
                                .api_tls_handshakes_failed
                                .fetch_add(1, Ordering::Relaxed);
                            let reason = match failed {
                                Ok(Err(e)) => e.to_string(),
                                _ => "timed out".to_string(),
                            };
                            let log = warn
                                .lock()
                                .map(|mut w| w.hit(Instant::now()))
                                .ok()
                                .flatten();
                            if let Some(suppressed) = log {
                                tracing::warn!(%peer, suppressed, "HTTP API TLS handshake refused: {reason}");
                            }
                        }
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local_addr,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended (only when the listener is being dropped): never return.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
