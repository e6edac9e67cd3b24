//! Device and service credentials.
//!
//! A device secret is 32 random bytes (hex), shown once at registration; only its SHA-256 is
//! stored. A fast hash is right here: the secret has 256 bits of entropy, so there is nothing for
//! a dictionary or a slow hash to protect (passwords chosen by people would need argon2).

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use devtables_sync::identity::DeviceId;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::broker::{Authenticator, Principal};

/// The MQTT username of the cloud service itself.
pub const SERVICE_USERNAME: &str = "devtables-service";

/// A fresh random secret (64 hex characters).
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The stored form of a secret.
pub fn hash_secret(secret: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(secret.as_bytes())))
}

/// Compares a presented secret with a stored hash, in time independent of where they differ.
pub fn verify_secret(secret: &[u8], stored_hash: &str) -> bool {
    let Ok(secret) = std::str::from_utf8(secret) else {
        return false;
    };
    let presented = hash_secret(secret);
    let (a, b) = (presented.as_bytes(), stored_hash.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The credentials the embedded broker accepts: every registered device, and the service.
pub struct Credentials {
    service_hash: String,
    /// Device node name (`account/device`) → (id, secret hash).
    devices: RwLock<HashMap<String, (DeviceId, String)>>,
}

impl Credentials {
    pub fn new(service_secret: &str) -> Credentials {
        Credentials {
            service_hash: hash_secret(service_secret),
            devices: RwLock::new(HashMap::new()),
        }
    }

    pub fn add_device(&self, id: DeviceId, secret_hash: String) {
        self.devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.node_name(), (id, secret_hash));
    }
}

impl Authenticator for Credentials {
    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Option<Principal> {
        let (username, password) = (username?, password?);
        if username == SERVICE_USERNAME {
            return verify_secret(password, &self.service_hash).then_some(Principal::Service);
        }
        let devices = self.devices.read().unwrap_or_else(PoisonError::into_inner);
        let (id, hash) = devices.get(username)?;
        verify_secret(password, hash).then(|| Principal::Device(id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_verify_only_against_their_hash() {
        let s = generate_secret();
        assert_eq!(s.len(), 64);
        let h = hash_secret(&s);
        assert!(verify_secret(s.as_bytes(), &h));
        assert!(!verify_secret(b"guess", &h));
        assert!(!h.contains(&s), "the secret is not stored");
    }

    #[test]
    fn credentials_map_usernames_to_principals() {
        let creds = Credentials::new("svc");
        let id = DeviceId::new("acme", "d1").unwrap();
        creds.add_device(id.clone(), hash_secret("s1"));
        assert_eq!(
            creds.authenticate("x", Some("devtables-service"), Some(b"svc")),
            Some(Principal::Service)
        );
        assert_eq!(
            creds.authenticate("x", Some("acme/d1"), Some(b"s1")),
            Some(Principal::Device(id))
        );
        assert_eq!(creds.authenticate("x", Some("acme/d1"), Some(b"s2")), None);
        assert_eq!(creds.authenticate("x", Some("acme/d9"), Some(b"s1")), None);
        assert_eq!(creds.authenticate("x", None, None), None);
    }
}
