//! A certificate authority made for one test, and the certificates it signs, written as PEM
//! files: the TLS tests of every crate (agent, cloud, CLI) make their keys the same way, here.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

use crate::ClientIdentity;

/// A self-signed CA.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug, PartialEq)]
pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A CA whose subject's common name is `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a CA certificate");
        TestCa { cert, key }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `dir/<name>-ca.pem`.
    pub fn write_ca(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, self.cert.pem()).expect("writing the CA certificate");
        path
    }

    /// A server certificate for `localhost` and 127.0.0.1, written to `dir/<name>.pem` and
    /// `dir/<name>.key`.
    pub fn server(&self, dir: &Path, name: &str) -> PemFiles {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server parameters");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        self.sign(params, dir, name)
    }

    /// A client certificate whose subject's common name is `common_name`, written to
    /// `dir/<name>.pem` and `dir/<name>.key`.
    pub fn client(&self, dir: &Path, name: &str, common_name: &str) -> ClientIdentity {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let files = self.sign(params, dir, name);
        ClientIdentity {
            cert: files.cert,
            key: files.key,
        }
    }

    fn sign(&self, params: CertificateParams, dir: &Path, name: &str) -> PemFiles {
        let key = KeyPair::generate().expect("a key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("a signed certificate");
        let files = PemFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("writing the certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("writing the key");
        files
    }
}
