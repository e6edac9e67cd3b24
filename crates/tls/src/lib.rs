//! The client side of devtables' TLS, in one place for every MQTT client of the project: the
//! device agent and the cloud service's own connection to its broker.
//!
//! It exists so that the two clients check a broker the same way (a CA file, optionally a
//! configured server name, or exactly one pinned leaf certificate) and present a client
//! certificate the same way (mutual TLS with the cloud's device CA), instead of each keeping its
//! own copy of this code. The sans-IO protocol crate (`devtables-sync`) must not depend on TLS,
//! hence a crate of its own.
//!
//! rustls with the ring provider is used (no OpenSSL), and the provider is passed explicitly to
//! every configuration: the cloud's embedded broker brings a second provider (aws-lc-rs) into the
//! same process, so no process-wide default can be relied on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// TLS settings of an MQTT client toward a broker checked against a CA.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientTls {
    /// The certificate authorities (PEM) the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// The name the broker's certificate must carry. Default: the broker host.
    pub server_name: Option<String>,
    /// A client certificate to present (mutual TLS). Default none.
    pub identity: Option<ClientIdentity>,
}

impl ClientTls {
    /// Checks the broker against `ca_file` under the host's name, without a client certificate.
    pub fn new(ca_file: impl Into<PathBuf>) -> ClientTls {
        ClientTls {
            ca_file: ca_file.into(),
            server_name: None,
            identity: None,
        }
    }
}

/// The `tls` block of an MQTT client's configuration file (the agent's `tls`, the cloud's
/// `external_broker_tls`): one format for both, resolved by [`ClientTlsFile::resolve`].
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ClientTlsFile {
    /// The CA certificates (PEM) the broker's certificate must chain to.
    pub ca: PathBuf,
    /// The name the broker's certificate must carry. Default: the broker host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// A client certificate (PEM) to present, for a broker that authenticates by certificate
    /// (the cloud's device-certificate listener, AWS IoT Core, Mosquitto with
    /// `require_certificate`); with `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// The key of `client_cert` (PEM).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

impl ClientTlsFile {
    /// The settings, with relative paths taken from `dir` (the configuration file's folder). A
    /// client certificate without its key, or a key without its certificate, is refused.
    pub fn resolve(&self, dir: &Path) -> Result<ClientTls, TlsError> {
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert: dir.join(cert),
                key: dir.join(key),
            }),
            (None, None) => None,
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok(ClientTls {
            ca_file: dir.join(&self.ca),
            server_name: self.server_name.clone(),
            identity,
        })
    }
}

/// A client certificate chain and its private key, both PEM files.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientIdentity {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
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
    #[error(
        "the client certificate {} and key {} cannot be used: {reason} (are they a pair?)",
        cert.display(),
        key.display()
    )]
    ClientIdentity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Rustls(String),
    #[error("a client certificate needs both client_cert and client_key, or neither")]
    HalfIdentity,
}

/// The ring provider, explicitly: no process-wide default is assumed.
pub fn provider() -> Arc<CryptoProvider> {
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

/// The first private key of a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// The rustls client configuration for `tls`: the broker's certificate must chain to the CA
/// file and carry the configured name (or the host's); the client certificate, if any, is
/// presented when the broker asks for one.
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
    client_with_verifier(
        Arc::new(Verifier::WebPki {
            inner: webpki,
            name,
        }),
        tls.identity.as_ref(),
    )
}

/// The rustls client configuration of a connection that trusts exactly the leaf certificate in
/// `leaf_file` (its first certificate), whatever names it carries: the cloud service's own
/// connection to its embedded broker over loopback, which needs no CA file.
pub fn pinned_client_config(leaf_file: &Path) -> Result<ClientConfig, TlsError> {
    let leaf = read_certs(leaf_file)?.swap_remove(0);
    client_with_verifier(
        Arc::new(Verifier::Pinned {
            leaf,
            provider: provider(),
        }),
        None,
    )
}

fn client_with_verifier(
    verifier: Arc<Verifier>,
    identity: Option<&ClientIdentity>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let certs = read_certs(&id.cert)?;
            let key = read_key(&id.key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| TlsError::ClientIdentity {
                    cert: id.cert.clone(),
                    key: id.key.clone(),
                    reason: e.to_string(),
                })
        }
    }
}

/// How a client checks a broker's certificate.
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

#[cfg(feature = "test-pki")]
pub mod test_pki;

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    /// A self-signed certificate for `name` and its key, written to `dir/{file}.pem|.key`.
    fn self_signed(dir: &Path, file: &str, name: &str) -> ClientIdentity {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let id = ClientIdentity {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        };
        std::fs::write(&id.cert, cert.pem()).unwrap();
        std::fs::write(&id.key, key.serialize_pem()).unwrap();
        id
    }

    #[test]
    fn a_client_identity_must_be_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let a = self_signed(dir.path(), "a", "a.example");
        let b = self_signed(dir.path(), "b", "b.example");
        let mut tls = ClientTls::new(&a.cert);
        tls.identity = Some(a.clone());
        let config = client_config(&tls).expect("a matching pair is accepted");
        assert!(config.client_auth_cert_resolver.has_certs());

        // Another certificate's key: refused at configuration, naming both files.
        tls.identity = Some(ClientIdentity {
            cert: a.cert.clone(),
            key: b.key.clone(),
        });
        let err = client_config(&tls).unwrap_err();
        assert!(matches!(err, TlsError::ClientIdentity { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("a.pem") && text.contains("b.key"), "{text}");

        // Without an identity, no certificate is offered.
        tls.identity = None;
        assert!(!client_config(&tls)
            .unwrap()
            .client_auth_cert_resolver
            .has_certs());
    }

    #[test]
    fn unusable_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            client_config(&ClientTls::new(&missing)),
            Err(TlsError::File { .. })
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here").unwrap();
        assert!(matches!(
            client_config(&ClientTls::new(&empty)),
            Err(TlsError::NoCert(_))
        ));
        assert!(matches!(
            pinned_client_config(&empty),
            Err(TlsError::NoCert(_))
        ));
        let a = self_signed(dir.path(), "a", "a.example");
        let mut tls = ClientTls::new(&a.cert);
        tls.server_name = Some("not a name!".into());
        assert!(matches!(client_config(&tls), Err(TlsError::ServerName(_))));
        tls.server_name = None;
        tls.identity = Some(ClientIdentity {
            cert: a.cert.clone(),
            key: empty,
        });
        assert!(matches!(client_config(&tls), Err(TlsError::File { .. })));
    }
}
