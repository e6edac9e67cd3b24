//! TLS for every network hop of the cloud: the HTTP API's listener, the embedded broker's
//! certificate files, and the service's own MQTT client (to an external broker, or pinned to the
//! embedded broker's own certificate).
//!
//! It exists so that API keys, device secrets and items never cross a network in clear text
//! unless the configuration says so (and the service then warns at start). rustls with the ring
//! provider is used, passed explicitly: the broker's TLS brings a second provider (aws-lc-rs)
//! into the process, so no process-wide default can be relied on.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
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

/// TLS settings of the service's MQTT client toward an external broker.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientTls {
    /// The certificate authorities (PEM) the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// The name the broker's certificate must carry. Default: the broker host.
    pub server_name: Option<String>,
}

/// TLS files or settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0} holds no certificate")]
    NoCert(PathBuf),
    #[error("TLS server name {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Every certificate of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(path.to_path_buf()));
    }
    Ok(certs)
}

/// The rustls server configuration for `tls` (no client certificates).
pub fn server_config(tls: &ServerTls) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| file_error(&tls.key, e))?;
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(format!("{}: {e}", tls.cert.display())))
}

/// The rustls client configuration for an external broker.
pub fn client_config(tls: &ClientTls) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&tls.ca_file)? {
        roots.add(cert).map_err(|e| file_error(&tls.ca_file, e))?;
    }
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let name = match &tls.server_name {
        None => None,
        Some(n) => {
            Some(ServerName::try_from(n.clone()).map_err(|_| TlsError::ServerName(n.clone()))?)
        }
    };
    client_with_verifier(Arc::new(Verifier::WebPki {
        inner: webpki,
        name,
    }))
}

/// The rustls client configuration of the service's own connection to its embedded broker: it
/// trusts exactly the broker's own leaf certificate, so it needs no CA file and works whatever
/// names the certificate carries (the service connects over loopback).
pub fn pinned_client_config(broker: &ServerTls) -> Result<ClientConfig, TlsError> {
    let leaf = read_certs(&broker.cert)?.swap_remove(0);
    client_with_verifier(Arc::new(Verifier::Pinned {
        leaf,
        provider: provider(),
    }))
}

fn client_with_verifier(verifier: Arc<Verifier>) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// How the service's client checks a broker certificate.
#[derive(Debug)]
enum Verifier {
    /// The full WebPKI checks, against a configured name when one is set (rumqttc would use the
    /// host connected to).
    WebPki {
        inner: Arc<WebPkiServerVerifier>,
        name: Option<ServerName<'static>>,
    },
    /// Exactly this leaf certificate, with the handshake signatures checked against it.
    Pinned {
        leaf: CertificateDer<'static>,
        provider: Arc<CryptoProvider>,
    },
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self {
            Verifier::WebPki { inner, name } => inner.verify_server_cert(
                end_entity,
                intermediates,
                name.as_ref().unwrap_or(server_name),
                ocsp_response,
                now,
            ),
            Verifier::Pinned { leaf, .. } if leaf.as_ref() == end_entity.as_ref() => {
                Ok(ServerCertVerified::assertion())
            }
            Verifier::Pinned { .. } => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self {
            Verifier::WebPki { inner, .. } => inner.verify_tls12_signature(message, cert, dss),
            Verifier::Pinned { provider, .. } => rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &provider.signature_verification_algorithms,
            ),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self {
            Verifier::WebPki { inner, .. } => inner.verify_tls13_signature(message, cert, dss),
            Verifier::Pinned { provider, .. } => rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &provider.signature_verification_algorithms,
            ),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match self {
            Verifier::WebPki { inner, .. } => inner.supported_verify_schemes(),
            Verifier::Pinned { provider, .. } => provider
                .signature_verification_algorithms
                .supported_schemes(),
        }
    }
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
