//! The cloud's device certificate authority: the CA that signs devices' client certificates for
//! mutual TLS, kept in the data folder (`ca/ca.pem`, `ca/ca.key`).
//!
//! It exists so a device can prove who it is with a certificate instead of a secret (a key that
//! never leaves the device, hardware-backed where the device has a secure element). The embedded
//! broker's device-certificate listener accepts only certificates chaining to this CA; the
//! certificate's subject names the device (`CN = {account}/{device}`), and the registry still
//! decides whether that device may connect.
//!
//! # Why the certificate carries a credential binding
//!
//! There is no revocation list: a certificate is cut off through the registry. Revoking the
//! device refuses it at once, but a revoked device becomes usable again when its secret is
//! rotated, and a leaked certificate must not come back with it. So every certificate also names,
//! in its organization (`O`), a digest of the device's stored secret hash at issue time
//! ([`credential_binding`]); the broker refuses a certificate whose binding is not the device's
//! current one. Rotating the secret therefore cuts off every certificate issued before, and
//! issuing again (registration, or `devtables devices cert`) gives one for the new credentials.
//! The digest is of a hash of a 256-bit random secret: it reveals nothing usable.
//!
//! # Files
//!
//! Created on first use, atomically: both files are written and synced in a temporary folder,
//! which is then renamed to `ca` (a crash leaves no half-made CA, and two processes creating it
//! at once end up sharing the one that won the rename). `ca.key` is owner-only (0600) in an
//! owner-only folder (0700); a key readable by others is warned about at every load. rcgen 0.13
//! cannot read a certificate back without a second X.509 parser, so on load the issuer is rebuilt
//! from the key and the fixed CA name, and a probe certificate is verified against `ca.pem`: a
//! key and certificate that do not belong together are refused instead of issuing certificates
//! that no broker would accept.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use devtables_sync::identity::DeviceId;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};

/// The folder of the CA inside the cloud's data folder.
pub const CA_DIR: &str = "ca";
/// The CA certificate (PEM), inside [`CA_DIR`]: what devices' certificates chain to.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (PEM, owner-only), inside [`CA_DIR`].
pub const CA_KEY_FILE: &str = "ca.key";
/// Default validity of a device certificate: 90 days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 90;
/// Longest validity of a device certificate (the CA's own validity bounds it anyway).
pub const MAX_VALIDITY_DAYS: u32 = 3650;
/// Validity of the CA certificate: 20 years. Device certificates are short-lived; the CA is
/// meant to outlive the fleet's hardware.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// A certificate is valid from a few minutes before its issue, so a broker whose clock is
/// slightly behind the issuer's (the CLI on another host, another cloud node) accepts it at once.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The CA's subject. Fixed: the issuer is rebuilt from it and the key on every load.
const CA_COMMON_NAME: &str = "devtables device CA";
const CA_ORGANIZATION: &str = "devtables";
/// What starts every credential binding (the certificate's `O`).
const BINDING_PREFIX: &str = "devtables-credentials-";

/// The device CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a usable CA key: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error(
        "the device CA in {} is inconsistent: {reason}; restore ca.pem and ca.key together from \
         a backup, or move the folder away to start a new CA (every device certificate must \
         then be issued again)",
        dir.display()
    )]
    Mismatch { dir: PathBuf, reason: String },
    #[error("device certificate validity must be 1 to {MAX_VALIDITY_DAYS} days, got {0}")]
    Validity(u64),
    #[error("cannot issue a device certificate: {0}")]
    Issue(String),
}

/// A device's client certificate just issued: the only moment its private key exists outside
/// the device (it is not stored by the cloud).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCertificate {
    /// The certificate (PEM); its subject is `CN = {account}/{device}`.
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
    /// The CA certificate (PEM) it chains to.
    pub ca_pem: String,
    /// When it stops being valid, in Unix milliseconds.
    pub not_after_ms: u64,
}

/// The cloud's device CA, loaded from the data folder.
pub struct DeviceCa {
    dir: PathBuf,
    cert_pem: String,
    /// The CA as rcgen signs with it (rebuilt from the fixed name and the key).
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The credential binding a device certificate carries for a device whose stored secret hash is
/// `secret_hash` (see the module documentation).
pub fn credential_binding(secret_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"devtables device certificate binding\0");
    h.update(secret_hash.as_bytes());
    format!("{BINDING_PREFIX}{}", hex::encode(&h.finalize()[..16]))
}

/// `days` as a validity, or why it is out of range.
pub fn validity_days(days: u64) -> Result<Duration, CaError> {
    if days == 0 || days > u64::from(MAX_VALIDITY_DAYS) {
        return Err(CaError::Validity(days));
    }
    Ok(Duration::from_secs(days * 24 * 3600))
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_path_buf();
    move |source| CaError::Io { what, path, source }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    // Signs device certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    // Positive and exactly 16 bytes long once DER-encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from(bytes.to_vec())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Writes `bytes` to a new file at `path` with `mode` (on Unix) and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(io("create", path))?;
    file.write_all(bytes).map_err(io("write", path))?;
    file.sync_all().map_err(io("sync", path))
}

/// Syncs a folder, so a rename or a new file in it survives a crash.
fn sync_dir(path: &Path) -> Result<(), CaError> {
    #[cfg(unix)]
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", path))?;
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

impl DeviceCa {
    /// [`DeviceCa::open_or_create`] on a blocking thread, for async callers (the HTTP API).
    pub async fn open_or_create_blocking(data_dir: PathBuf) -> Result<DeviceCa, CaError> {
        tokio::task::spawn_blocking(move || DeviceCa::open_or_create(&data_dir))
            .await
            .map_err(|e| CaError::Issue(format!("the task loading the CA failed: {e}")))?
    }

    /// The CA of the data folder `data_dir`, created there on first use (see the module
    /// documentation for how).
    pub fn open_or_create(data_dir: &Path) -> Result<DeviceCa, CaError> {
        let dir = data_dir.join(CA_DIR);
        if !dir.join(CA_KEY_FILE).exists() {
            Self::create(data_dir, &dir)?;
        }
        Self::open(&dir)
    }

    fn create(data_dir: &Path, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(data_dir).map_err(io("create", data_dir))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = data_dir.join(format!(".ca-new-{}-{nanos}", std::process::id()));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&tmp).map_err(io("create", &tmp))?;
        let made = (|| {
            let key = KeyPair::generate().map_err(|e| CaError::Issue(e.to_string()))?;
            let mut params = ca_params();
            let now = SystemTime::now();
            params.not_before = (now - BACKDATE).into();
            params.not_after = (now + CA_VALIDITY).into();
            params.serial_number = Some(random_serial());
            let cert = params
                .self_signed(&key)
                .map_err(|e| CaError::Issue(e.to_string()))?;
            write_new(
                &tmp.join(CA_KEY_FILE),
                key.serialize_pem().as_bytes(),
                0o600,
            )?;
            write_new(&tmp.join(CA_CERT_FILE), cert.pem().as_bytes(), 0o644)?;
            sync_dir(&tmp)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match std::fs::rename(&tmp, dir) {
            Ok(()) => {
                sync_dir(data_dir)?;
                tracing::info!(dir = %dir.display(), "created the device CA");
                Ok(())
            }
            // Another process created it meanwhile: use that one.
            Err(_) if dir.join(CA_KEY_FILE).exists() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(io("rename into place", dir)(e))
            }
        }
    }

    fn open(dir: &Path) -> Result<DeviceCa, CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path)
                .map_err(io("read", &key_path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %key_path.display(),
                    "the device CA key is readable by other users (mode {:o}): anyone who reads \
                     it can make device certificates; chmod 600 it",
                    mode & 0o777
                );
            }
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
        let issuer = ca_params().self_signed(&key).map_err(|e| CaError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let ca = DeviceCa {
            dir: dir.to_path_buf(),
            cert_pem,
            issuer,
            key,
        };
        ca.check_pair()?;
        Ok(ca)
    }

    /// Issues a probe certificate and verifies it against `ca.pem` as the broker will.
    fn check_pair(&self) -> Result<(), CaError> {
        let mismatch = |reason: String| CaError::Mismatch {
            dir: self.dir.clone(),
            reason,
        };
        let roots =
            devtables_tls::read_certs(&self.cert_file()).map_err(|e| mismatch(e.to_string()))?;
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store
                .add(root)
                .map_err(|e| mismatch(format!("ca.pem: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            devtables_tls::provider(),
        )
        .build()
        .map_err(|e| mismatch(e.to_string()))?;
        let probe_id =
            DeviceId::new("probe", "probe").map_err(|e| CaError::Issue(e.to_string()))?;
        let now = SystemTime::now();
        let probe = self.issue_between(&probe_id, "probe", now - BACKDATE, now + BACKDATE)?;
        let der = CertificateDer::from_pem_slice(probe.cert_pem.as_bytes())
            .map_err(|e| CaError::Issue(e.to_string()))?;
        verifier
            .verify_client_cert(&der, &[], UnixTime::now())
            .map_err(|e| mismatch(format!("ca.key does not sign for ca.pem ({e})")))?;
        Ok(())
    }

    /// The CA certificate file (what the broker's device-certificate listener trusts).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `id`, valid from now for `validity`, bound to the device's
    /// current stored secret hash (see [`credential_binding`]).
    pub fn issue(
        &self,
        id: &DeviceId,
        secret_hash: &str,
        validity: Duration,
    ) -> Result<DeviceCertificate, CaError> {
        let now = SystemTime::now();
        self.issue_between(id, secret_hash, now - BACKDATE, now + validity)
    }

    /// Issues a certificate for `id` valid from `not_before` to `not_after` (an explicit window:
    /// [`DeviceCa::issue`] is the usual way).
    pub fn issue_between(
        &self,
        id: &DeviceId,
        secret_hash: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<DeviceCertificate, CaError> {
        let issue = |e: rcgen::Error| CaError::Issue(e.to_string());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.node_name());
        dn.push(DnType::OrganizationName, credential_binding(secret_hash));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(issue)?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(issue)?;
        Ok(DeviceCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
            not_after_ms: unix_ms(not_after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(device: &str) -> DeviceId {
        DeviceId::new("acme", device).unwrap()
    }

    /// Whether the broker's check (WebPKI client verification against `ca.pem`) accepts `cert`.
    fn verifies(ca: &DeviceCa, cert_pem: &str) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in devtables_tls::read_certs(&ca.cert_file()).unwrap() {
            roots.add(c).unwrap();
        }
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            devtables_tls::provider(),
        )
        .build()
        .unwrap();
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        v.verify_client_cert(&der, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_ca_is_created_once_owner_only_and_reloaded() {
        let data = tempfile::tempdir().unwrap();
        let ca = DeviceCa::open_or_create(data.path()).unwrap();
        let pem = std::fs::read_to_string(data.path().join("ca/ca.pem")).unwrap();
        assert_eq!(ca.cert_pem(), pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &str| {
                std::fs::metadata(data.path().join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode("ca/ca.key"), 0o600);
            assert_eq!(mode("ca"), 0o700);
        }
        // No temporary folder is left behind.
        let names: Vec<_> = std::fs::read_dir(data.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["ca".to_string()]);

        // Reopened: the same CA, and a certificate issued by the first still verifies.
        let cert = ca
            .issue(&dev("d1"), "h", validity_days(1).unwrap())
            .unwrap();
        let again = DeviceCa::open_or_create(data.path()).unwrap();
        assert_eq!(again.cert_pem(), pem);
        assert_eq!(verifies(&again, &cert.cert_pem), Ok(()));
        let cert2 = again
            .issue(&dev("d2"), "h", validity_days(1).unwrap())
            .unwrap();
        assert_eq!(verifies(&ca, &cert2.cert_pem), Ok(()));
        assert_eq!(cert2.ca_pem, pem);
    }

    #[test]
    fn certificates_verify_only_within_their_validity_and_against_their_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ca = DeviceCa::open_or_create(a.path()).unwrap();
        let other = DeviceCa::open_or_create(b.path()).unwrap();
        let day = Duration::from_secs(24 * 3600);
        let now = SystemTime::now();
        let good = ca.issue(&dev("d1"), "h", day).unwrap();
        assert_eq!(verifies(&ca, &good.cert_pem), Ok(()));
        assert!(good.not_after_ms > unix_ms(now));

        let expired = ca
            .issue_between(&dev("d1"), "h", now - 2 * day, now - day)
            .unwrap();
        let err = verifies(&ca, &expired.cert_pem).unwrap_err();
        assert!(err.contains("xpired"), "{err}");
        // Another cloud's CA bears the same name, so the chain is found and its signature fails.
        let foreign = other.issue(&dev("d1"), "h", day).unwrap();
        let err = verifies(&ca, &foreign.cert_pem).unwrap_err();
        assert!(err.contains("BadSignature"), "{err}");
    }

    #[test]
    fn a_ca_whose_key_and_certificate_differ_is_refused() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        DeviceCa::open_or_create(a.path()).unwrap();
        DeviceCa::open_or_create(b.path()).unwrap();
        // b's certificate with a's key.
        std::fs::copy(b.path().join("ca/ca.pem"), a.path().join("ca/ca.pem")).unwrap();
        let err = DeviceCa::open_or_create(a.path()).unwrap_err();
        assert!(matches!(err, CaError::Mismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("backup"), "{err}");

        // A damaged key: a typed error naming the file.
        std::fs::write(b.path().join("ca/ca.key"), "garbage").unwrap();
        let err = DeviceCa::open_or_create(b.path()).unwrap_err();
        assert!(matches!(err, CaError::Key { .. }), "{err:?}");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn the_binding_follows_the_credentials() {
        let h1 = credential_binding("sha256:aa");
        assert_eq!(h1, credential_binding("sha256:aa"));
        assert_ne!(h1, credential_binding("sha256:ab"));
        assert!(h1.starts_with(BINDING_PREFIX) && !h1.contains("aa"));
        assert_eq!(h1.len(), BINDING_PREFIX.len() + 32);
    }

    #[test]
    fn validity_is_bounded() {
        assert!(validity_days(0).is_err());
        assert!(validity_days(u64::from(MAX_VALIDITY_DAYS) + 1).is_err());
        assert_eq!(
            validity_days(2).unwrap(),
            Duration::from_secs(2 * 24 * 3600)
        );
    }
}
