//! TLS for the agent's MQTT connection: it turns the configured CA file (PEM) and optional
//! server name into a rustls client configuration for rumqttc.
//!
//! It exists so that a device never sends its secret or its items in clear text unless its
//! configuration says so explicitly. rustls with the ring provider is used (no OpenSSL, no
//! process-wide provider to install), and the provider is passed explicitly because other
//! crates in the same process may enable a second one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// TLS settings of an MQTT client.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientTls {
    /// The certificate authorities (PEM) the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// The name the broker's certificate must carry. Default: the broker host.
    pub server_name: Option<String>,
}

/// The TLS settings could not be turned into a client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("the CA file {0} holds no certificate")]
    NoCa(PathBuf),
    #[error("TLS server name {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
    #[error("TLS setup failed: {0}")]
    Rustls(String),
}

/// The ring provider, explicitly: no process-wide default is assumed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::CaFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCa(path.to_path_buf()));
    }
    Ok(certs)
}

/// The rustls client configuration for `tls`.
pub fn client_config(tls: &ClientTls) -> Result<ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&tls.ca_file)? {
        roots.add(cert).map_err(|e| TlsError::CaFile {
            path: tls.ca_file.clone(),
            reason: e.to_string(),
        })?;
    }
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let config = match &tls.server_name {
        None => builder.with_webpki_verifier(webpki),
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|_| TlsError::ServerName(name.clone()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(RenamedVerifier {
                    inner: webpki,
                    name,
                }))
        }
    }
    .with_no_client_auth();
    Ok(config)
}

/// Verifies the broker's certificate against a configured name instead of the host connected
/// to (rumqttc uses the host as the name), with the full WebPKI checks otherwise.
#[derive(Debug)]
struct RenamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for RenamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
