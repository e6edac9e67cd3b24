//! The request rate of each API key of the HTTP API.
//!
//! This module exists so one key (a runaway script, a leaked key) cannot take the whole API and
//! its store thread for itself: every key has a token bucket ([`devtables_sync::rate`], the
//! rule the device sessions use too), checked where the key is verified (the `Caller`
//! extractor); a request over the rate is answered 429 with `Retry-After`, counted
//! (`api_rate_limited` in `/v1/status`) and logged (rate-limited). Buckets are kept for at most
//! `max_keys` keys: when a new key comes and the map is full, the key whose bucket is fullest is
//! forgotten, which loses it nothing, since a key seen anew starts with a full bucket.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use devtables_sync::rate::{RateLimit, TokenBucket};

use crate::status::{SyncStatus, WarnLimiter};

/// Token buckets per API key id.
pub struct ApiRateLimiter {
    limit: RateLimit,
    max_keys: usize,
    /// The origin of the buckets' clock.
    origin: Instant,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    /// Rate-limits the warnings about refused requests.
    warn: Mutex<WarnLimiter>,
}

impl ApiRateLimiter {
    /// A limiter with `limit` per key, tracking at most `max_keys` keys (at least one).
    pub fn new(limit: RateLimit, max_keys: usize) -> ApiRateLimiter {
        ApiRateLimiter {
            limit,
            max_keys: max_keys.max(1),
            origin: Instant::now(),
            buckets: Mutex::new(HashMap::new()),
            warn: Mutex::new(WarnLimiter::new(WarnLimiter::INTERVAL)),
        }
    }

    /// Takes a token of `key_id`'s rate now; `Err` holds how long until one is back.
    pub fn check(&self, key_id: &str) -> Result<(), Duration> {
        let now_ms = self.origin.elapsed().as_millis() as u64;
        self.check_at(key_id, now_ms).map_err(Duration::from_millis)
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TokenBucket>> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_at(&self, key_id: &str, now_ms: u64) -> Result<(), u64> {
        if !self.limit.is_limited() {
            return Ok(());
        }
        let limit = self.limit;
        let mut buckets = self.lock();
        if let Some(bucket) = buckets.get_mut(key_id) {
            return bucket.take(&limit, now_ms);
        }
        if buckets.len() >= self.max_keys {
            let fullest = buckets
                .iter_mut()
                .map(|(k, b)| (b.tokens(&limit, now_ms), k.clone()))
                .max()
                .map(|(_, k)| k);
            if let Some(k) = fullest {
                buckets.remove(&k);
            }
        }
        let mut bucket = TokenBucket::full(&limit, now_ms);
        let taken = bucket.take(&limit, now_ms);
        buckets.insert(key_id.to_string(), bucket);
        taken
    }
}

/// The `Retry-After` value for a wait: whole seconds, rounded up, at least one.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_millis().div_ceil(1000).max(1) as u64
}

/// The answer to a request over its key's rate: the status and sentence of the API's error shape
/// (whose kind is `rate_limited`) and `Retry-After` seconds.
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) retry_after: u64,
}

impl ApiRateLimiter {
    /// Counts and logs (rate-limited) a request of key `id` refused for `wait`, and builds its
    /// answer.
    pub(crate) fn refuse(&self, status: &SyncStatus, id: &str, wait: Duration) -> Refusal {
        refuse(status, &self.warn, id, wait)
    }
}

fn refuse(status: &SyncStatus, warn: &Mutex<WarnLimiter>, id: &str, wait: Duration) -> Refusal {
    status.api_rate_limited.fetch_add(1, Ordering::Relaxed);
    let secs = retry_after_secs(wait);
    let hit = warn
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .hit(Instant::now());
    if let Some(quiet) = hit {
        tracing::warn!(
            key = %id,
            "HTTP API request refused: the key is over its request rate ({quiet} more refusals \
             since the last warning; counted in /v1/status as api_rate_limited)"
        );
    }
    Refusal {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: format!(
            "this API key sends requests faster than its rate allows: retry in {secs} s"
        ),
        retry_after: secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_rate() {
        let l = ApiRateLimiter::new(
            RateLimit {
                per_sec: 10,
                burst: 2,
            },
            100,
        );
        assert_eq!(l.check_at("a", 0), Ok(()));
        assert_eq!(l.check_at("a", 0), Ok(()));
        assert_eq!(l.check_at("a", 0), Err(100));
        assert_eq!(l.check_at("b", 0), Ok(()), "another key is not held back");
        assert_eq!(l.check_at("a", 100), Ok(()));
        assert_eq!(retry_after_secs(Duration::from_millis(100)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn the_map_stays_within_its_bound_and_keeps_the_spent_buckets() {
        let limit = RateLimit {
            per_sec: 1,
            burst: 3,
        };
        let l = ApiRateLimiter::new(limit, 2);
        for _ in 0..3 {
            l.check_at("busy", 0).unwrap();
        }
        l.check_at("quiet", 0).unwrap();
        // A third key: the fullest bucket ("quiet") goes, the spent one stays spent.
        l.check_at("new", 0).unwrap();
        assert_eq!(l.tracked(), 2);
        assert!(l.check_at("busy", 0).is_err(), "its spent bucket was kept");
        // With the limit off nothing is tracked.
        let off = ApiRateLimiter::new(RateLimit::UNLIMITED, 1);
        assert!((0..1000).all(|i| off.check_at(&i.to_string(), 0).is_ok()));
        assert_eq!(off.tracked(), 0);
    }
}
