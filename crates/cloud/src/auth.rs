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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use devtables_sync::identity::DeviceId;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::broker::{Authenticator, PeerCertificate, Principal, Refusal};
use crate::store::{CloudStore, KeyScope, StoreError, REVOKED_SECRET_HASH};
use crate::store_thread::{StoreGone, StoreHandle};

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

/// Default time a device's credentials are trusted from the cache before the store is asked
/// again (5 s): how long a change made by another process on the same store (the `devtables
/// devices` command, a second cloud node) may take to reach this broker.
pub const DEFAULT_CREDENTIALS_TTL: Duration = Duration::from_secs(5);
/// Default most devices whose credentials the cache holds.
pub const DEFAULT_CREDENTIALS_CACHE: usize = 100_000;

/// One cached answer of the store about a device: its secret hash, or `None` if not registered
/// (remembered too, so that a client trying unknown names cannot make every CONNECT a query).
struct Cached {
    hash: Option<String>,
    at: Instant,
}

/// The credentials the embedded broker accepts: the service's (if it has a login at all), and
/// every registered device's, read from the store through a bounded cache.
///
/// The cloud service itself needs no login on its own broker (device messages and its publishes
/// go in-process), so it builds its credentials with [`Credentials::devices_only`]: no
/// superuser password exists that could leak. [`Credentials::new`] keeps one for a broker that
/// a service reaches over MQTT.
///
/// Why a cache with a short TTL rather than a copy of the registry: the registry may change
/// under this process (the `devtables devices revoke` command on the data folder, another cloud
/// node on the same store), and there is no notification for that. An answer is trusted for
/// `ttl` (default [`DEFAULT_CREDENTIALS_TTL`]); after that, or on a miss, the store is asked on
/// its thread. Changes made through this process (registration, revocation, rotation) update the
/// cache at once. At most `max_entries` devices are cached (default
/// [`DEFAULT_CREDENTIALS_CACHE`]); when full, expired answers go first, then the oldest.
/// Without a store ([`Credentials::new`] alone, for a broker run apart from the service) the
/// cache is the whole registry and its entries do not expire.
pub struct Credentials {
    /// The service login's secret hash; `None`: no service login (every login is a device's).
    service_hash: Option<String>,
    ttl: Duration,
    max_entries: usize,
    store: OnceLock<StoreHandle>,
    cache: Mutex<HashMap<String, Cached>>,
    /// CONNECTs refused because the device is revoked.
    refused_revoked: AtomicU64,
    /// CONNECTs refused because the store could not be asked.
    store_failures: AtomicU64,
    /// Live sessions closed because their device was found revoked by another process.
    swept: AtomicU64,
}

impl Credentials {
    pub fn new(service_secret: &str) -> Credentials {
        Credentials::with_cache(
            service_secret,
            DEFAULT_CREDENTIALS_TTL,
            DEFAULT_CREDENTIALS_CACHE,
        )
    }

    /// Credentials with the given cache time-to-live and size (at least one entry).
    pub fn with_cache(service_secret: &str, ttl: Duration, max_entries: usize) -> Credentials {
        Credentials {
            service_hash: Some(hash_secret(service_secret)),
            ..Credentials::devices_only(ttl, max_entries)
        }
    }

    /// Credentials that accept devices only: the service's username is refused like a wrong
    /// password (what the cloud service's own embedded broker uses).
    pub fn devices_only(ttl: Duration, max_entries: usize) -> Credentials {
        Credentials {
            service_hash: None,
            ttl,
            max_entries: max_entries.max(1),
            store: OnceLock::new(),
            cache: Mutex::new(HashMap::new()),
            refused_revoked: AtomicU64::new(0),
            store_failures: AtomicU64::new(0),
            swept: AtomicU64::new(0),
        }
    }

    /// From now on, misses and expired answers are read from this store. Set once; later calls
    /// are ignored. The read blocks the calling thread, so [`Authenticator::authenticate`] must
    /// then run off the async workers (the broker calls it on a `spawn_blocking` thread).
    pub fn attach_store(&self, store: StoreHandle) {
        let _ = self.store.set(store);
    }

    /// Records a device's current secret hash (registration, rotation, or
    /// [`REVOKED_SECRET_HASH`] for a revocation), so this broker acts on it at once.
    pub fn add_device(&self, id: DeviceId, secret_hash: String) {
        self.put(id, Some(secret_hash));
    }

    /// CONNECTs refused because the device was revoked, and because the store could not answer.
    pub fn refusals(&self) -> (u64, u64) {
        (
            self.refused_revoked.load(Ordering::Relaxed),
            self.store_failures.load(Ordering::Relaxed),
        )
    }

    /// Counts a live session closed because its device was revoked by another process.
    pub fn count_swept(&self) {
        self.swept.fetch_add(1, Ordering::Relaxed);
    }

    /// Live sessions closed because their device was revoked by another process.
    pub fn swept(&self) -> u64 {
        self.swept.load(Ordering::Relaxed)
    }

    fn put(&self, id: DeviceId, hash: Option<String>) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let name = id.node_name();
        if cache.len() >= self.max_entries && !cache.contains_key(&name) {
            let ttl = self.ttl;
            let has_store = self.store.get().is_some();
            // Expired answers would be asked again anyway; without a store nothing expires.
            if has_store {
                cache.retain(|_, c| c.at.elapsed() < ttl);
            }
            if cache.len() >= self.max_entries {
                if let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, c)| c.at)
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&oldest);
                }
            }
        }
        cache.insert(
            name,
            Cached {
                hash,
                at: Instant::now(),
            },
        );
    }

    /// The device's secret hash as the cache or the store knows it: `Ok(None)` when it is not
    /// registered, `Err` when the store could not be asked.
    fn secret_hash(&self, id: &DeviceId) -> Result<Option<String>, StoreGone> {
        let store = self.store.get();
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = cache.get(&id.node_name()) {
                if store.is_none() || c.at.elapsed() < self.ttl {
                    return Ok(c.hash.clone());
                }
            }
        }
        let Some(store) = store else {
            return Ok(None);
        };
        let who = id.clone();
        let hash = match store.call_blocking(move |c| c.store.device(&who))? {
            Ok(record) => record.map(|r| r.secret_hash),
            Err(e) => {
                tracing::warn!(device = %id, "cannot read the device's credentials: {e}");
                return Err(StoreGone);
            }
        };
        self.put(id.clone(), hash.clone());
        Ok(hash)
    }
}

impl Authenticator for Credentials {
    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        let (Some(username), Some(password)) = (username, password) else {
            return Err(Refusal::BadCredentials);
        };
        if username == SERVICE_USERNAME {
            return self
                .service_hash
                .as_ref()
                .filter(|hash| verify_secret(password, hash))
                .map(|_| Principal::Service)
                .ok_or(Refusal::BadCredentials);
        }
        // Only a well-formed device name is looked up (hostile usernames never reach the store).
        let id = parse_device(username).ok_or(Refusal::BadCredentials)?;
        let hash = self.live_secret_hash(&id)?;
        if verify_secret(password, &hash) {
            Ok(Principal::Device(id))
        } else {
            Err(Refusal::BadCredentials)
        }
    }

    /// The certificate names the device in its CN and its credentials in its O (see
    /// [`crate::ca`]): the device must be registered, not revoked, and the binding must be that
    /// of its current secret hash (a certificate issued before a rotation is refused).
    fn authenticate_certificate(&self, cert: &PeerCertificate) -> Result<Principal, Refusal> {
        let id = cert
            .common_name
            .as_deref()
            .and_then(parse_device)
            .ok_or(Refusal::NotAuthorized)?;
        let hash = self
            .live_secret_hash(&id)
            .map_err(|_| Refusal::NotAuthorized)?;
        if cert.organization.as_deref() != Some(crate::ca::credential_binding(&hash).as_str()) {
            // The broker logs the refusal (at info, rate-limited); this is its detail.
            tracing::debug!(device = %id, "MQTT connection refused: the certificate was issued for credentials the device no longer has (issue a new one)");
            return Err(Refusal::NotAuthorized);
        }
        Ok(Principal::Device(id))
    }
}

/// `{account}/{device}` as a device id, if it is a valid one.
fn parse_device(name: &str) -> Option<DeviceId> {
    let (account, device) = name.split_once('/')?;
    DeviceId::new(account, device).ok()
}

impl Credentials {
    /// The stored secret hash of a registered device that is not revoked; an unknown device is
    /// `BadCredentials`, a revoked one or an unanswered registry `NotAuthorized` (both counted).
    fn live_secret_hash(&self, id: &DeviceId) -> Result<String, Refusal> {
        let hash = match self.secret_hash(id) {
            Ok(Some(hash)) => hash,
            Ok(None) => return Err(Refusal::BadCredentials),
            Err(_) => {
                self.store_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %id, "MQTT connection refused: the device registry did not answer");
                return Err(Refusal::NotAuthorized);
            }
        };
        if hash == REVOKED_SECRET_HASH {
            self.refused_revoked.fetch_add(1, Ordering::Relaxed);
            // The broker logs the refusal (at info, rate-limited); this is its detail.
            tracing::debug!(device = %id, "MQTT connection refused: the device is revoked");
            return Err(Refusal::NotAuthorized);
        }
        Ok(hash)
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
    fn devices_only_credentials_have_no_service_login() {
        let creds = Credentials::devices_only(Duration::from_secs(60), 4);
        let id = DeviceId::new("acme", "d1").unwrap();
        creds.add_device(id.clone(), hash_secret("s1"));
        for password in [&b""[..], b"svc", b"anything"] {
            assert_eq!(
                creds.authenticate("x", Some(SERVICE_USERNAME), Some(password)),
                Err(Refusal::BadCredentials)
            );
        }
        assert_eq!(
            creds.authenticate("x", Some("acme/d1"), Some(b"s1")),
            Ok(Principal::Device(id))
        );
    }

    #[test]
    fn credentials_map_usernames_to_principals() {
        let creds = Credentials::new("svc");
        let id = DeviceId::new("acme", "d1").unwrap();
        creds.add_device(id.clone(), hash_secret("s1"));
        assert_eq!(
            creds.authenticate("x", Some("devtables-service"), Some(b"svc")),
            Ok(Principal::Service)
        );
        assert_eq!(
            creds.authenticate("x", Some("acme/d1"), Some(b"s1")),
            Ok(Principal::Device(id.clone()))
        );
        let bad = Err(Refusal::BadCredentials);
        assert_eq!(creds.authenticate("x", Some("acme/d1"), Some(b"s2")), bad);
        assert_eq!(creds.authenticate("x", Some("acme/d9"), Some(b"s1")), bad);
        assert_eq!(
            creds.authenticate("x", Some("not a device"), Some(b"s1")),
            bad
        );
        assert_eq!(creds.authenticate("x", None, None), bad);
        // A revocation recorded here is refused as "not authorized", whatever the secret.
        creds.add_device(id, REVOKED_SECRET_HASH.to_string());
        assert_eq!(
            creds.authenticate("x", Some("acme/d1"), Some(b"s1")),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(creds.refusals(), (1, 0));
    }

    #[test]
    fn certificates_map_to_live_devices_with_current_credentials() {
        let creds = Credentials::new("svc");
        let id = DeviceId::new("acme", "d1").unwrap();
        let hash = hash_secret("s1");
        creds.add_device(id.clone(), hash.clone());
        let cert = |cn: &str, o: &str| PeerCertificate {
            common_name: Some(cn.into()),
            organization: Some(o.into()),
        };
        let binding = crate::ca::credential_binding(&hash);
        assert_eq!(
            creds.authenticate_certificate(&cert("acme/d1", &binding)),
            Ok(Principal::Device(id.clone()))
        );
        let refused = Err(Refusal::NotAuthorized);
        // Another device's name, a name that is no device, none at all.
        assert_eq!(
            creds.authenticate_certificate(&cert("acme/d9", &binding)),
            refused
        );
        assert_eq!(
            creds.authenticate_certificate(&cert("devtables-service", &binding)),
            refused
        );
        assert_eq!(
            creds.authenticate_certificate(&PeerCertificate::default()),
            refused
        );
        // Issued for the credentials before a rotation, or with no binding.
        let old = crate::ca::credential_binding(&hash_secret("s0"));
        assert_eq!(
            creds.authenticate_certificate(&cert("acme/d1", &old)),
            refused
        );
        assert_eq!(
            creds.authenticate_certificate(&PeerCertificate {
                common_name: Some("acme/d1".into()),
                organization: None,
            }),
            refused
        );
        // Revoked: refused and counted, whatever the certificate.
        creds.add_device(id, REVOKED_SECRET_HASH.to_string());
        assert_eq!(
            creds.authenticate_certificate(&cert("acme/d1", &binding)),
            refused
        );
        assert_eq!(creds.refusals(), (1, 0));
    }

    #[test]
    fn the_cache_stays_within_its_bound() {
        let creds = Credentials::with_cache("svc", Duration::from_secs(60), 2);
        for d in ["d1", "d2", "d3"] {
            let id = DeviceId::new("acme", d).unwrap();
            creds.add_device(id, hash_secret(d));
        }
        assert_eq!(creds.cache.lock().unwrap().len(), 2);
        // The newest is kept.
        assert!(creds
            .authenticate("x", Some("acme/d3"), Some(b"d3"))
            .is_ok());
    }
}
