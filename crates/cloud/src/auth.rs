//! Device, service and API credentials.
//!
//! A device secret is 32 random bytes (hex), shown once at registration; only its SHA-256 is
//! stored. A fast hash is right here: the secret has 256 bits of entropy, so there is nothing for
//! a dictionary or a slow hash to protect (passwords chosen by people would need argon2).
//!
//! An API key of the HTTP API is `dt_<id>_<secret>`: the id (16 hex characters) finds the stored
//! key, the secret (64 hex characters, the same kind as a device secret) is checked against its
//! stored hash. The key is shown once, when it is created.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use devtables_sync::identity::DeviceId;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::broker::{Authenticator, Principal};
use crate::store::{CloudStore, KeyScope, StoreError};

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

/// What every API key begins with (so a leaked key is recognisable, e.g. by secret scanners).
pub const API_KEY_PREFIX: &str = "dt_";

/// An API key just created: the only moment its full text exists outside the client.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NewApiKey {
    pub id: String,
    pub account: String,
    pub scope: KeyScope,
    /// The full key, `dt_<id>_<secret>`, to send as `Authorization: Bearer <key>`.
    pub key: String,
    pub created_ms: u64,
}

/// Creates an API key of `account` in the store: a fresh secret, stored hashed. Returns the full
/// key, which is not stored and cannot be shown again.
pub fn create_api_key(
    store: &mut dyn CloudStore,
    account: &str,
    scope: KeyScope,
    now_ms: u64,
) -> Result<NewApiKey, StoreError> {
    let secret = generate_secret();
    let id = store.create_api_key(account, scope, &hash_secret(&secret), now_ms)?;
    Ok(NewApiKey {
        key: format!("{API_KEY_PREFIX}{id}_{secret}"),
        id,
        account: account.to_string(),
        scope,
        created_ms: now_ms,
    })
}

/// Splits a presented API key into its id and secret; `None` when it is not of the form
/// `dt_<16 hex>_<64 hex>` (lowercase), whatever else it holds.
pub fn parse_api_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(API_KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
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
    fn api_keys_parse_only_in_their_exact_form() {
        let id = "0123456789abcdef";
        let secret = generate_secret();
        let key = format!("dt_{id}_{secret}");
        assert_eq!(parse_api_key(&key), Some((id, secret.as_str())));
        for bad in [
            String::new(),
            "dt_".into(),
            format!("xx_{id}_{secret}"),
            format!("dt_{id}{secret}"),
            format!("dt_{id}_{secret}0"),
            format!("dt_{}_{secret}", &id[1..]),
            format!("dt_{}_{secret}", id.to_uppercase()),
            format!(
                "dt_{id}_{}",
                secret.replace(|c: char| c.is_ascii_digit(), "_")
            ),
            format!("dt_{id}_{}", "é".repeat(32)),
        ] {
            assert_eq!(parse_api_key(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_created_api_key_is_stored_only_as_a_hash() {
        let mut store = crate::store::sqlite::SqliteStore::open_in_memory().unwrap();
        let new = create_api_key(&mut store, "acme", KeyScope::Write, 5).unwrap();
        let (id, secret) = parse_api_key(&new.key).expect("the key parses");
        assert_eq!(id, new.id);
        let stored = store.api_key(id).unwrap().unwrap();
        assert_eq!(
            (stored.account.as_str(), stored.scope),
            ("acme", KeyScope::Write)
        );
        assert!(verify_secret(secret.as_bytes(), &stored.secret_hash));
        assert!(!stored.secret_hash.contains(secret));
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
