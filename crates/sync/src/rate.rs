//! Token buckets: the one rate-limiting rule, shared by the cloud engine (messages per device
//! session) and the cloud service (HTTP requests per API key).
//!
//! It exists so that both limits behave alike and are tested once, and so that the engine's
//! limit stays sans-IO: the time comes in as a parameter (ms, any monotonic origin), nothing here
//! reads a clock. Tokens are counted in thousandths, so rates below one per millisecond refill
//! exactly, without floating point.

/// A rate limit: `per_sec` tokens refill every second, up to `burst` held at once. One token is
/// one message (or request). `per_sec == 0` means no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per second; 0 turns the limit off.
    pub per_sec: u32,
    /// Most tokens held: how many may come at once after a quiet time (at least 1).
    pub burst: u32,
}

impl RateLimit {
    /// No limit at all.
    pub const UNLIMITED: RateLimit = RateLimit {
        per_sec: 0,
        burst: 0,
    };

    /// Whether this limit refuses anything.
    pub fn is_limited(&self) -> bool {
        self.per_sec > 0
    }

    fn capacity_milli(&self) -> u64 {
        u64::from(self.burst.max(1)) * 1000
    }

    /// Time, in ms, for an empty bucket to refill `tokens` (capped at the burst), at least 1.
    pub fn refill_ms(&self, tokens: u32) -> u64 {
        if !self.is_limited() {
            return 0;
        }
        let milli = u64::from(tokens.clamp(1, self.burst.max(1))) * 1000;
        milli.div_ceil(u64::from(self.per_sec)).max(1)
    }
}

/// The state of one limited sender: tokens held (in thousandths) as of a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    milli: u64,
    at_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`: a new sender may send a whole burst at once.
    pub fn full(limit: &RateLimit, now_ms: u64) -> TokenBucket {
        TokenBucket {
            milli: limit.capacity_milli(),
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, limit: &RateLimit, now_ms: u64) {
        // Time never runs backwards here: an earlier `now_ms` adds nothing.
        let elapsed = now_ms.saturating_sub(self.at_ms);
        if elapsed > 0 {
            let add = elapsed.saturating_mul(u64::from(limit.per_sec));
            self.milli = self.milli.saturating_add(add).min(limit.capacity_milli());
            self.at_ms = now_ms;
        }
    }

    /// Takes one token at `now_ms`; when none is left, `Err` holds the ms until one is.
    pub fn take(&mut self, limit: &RateLimit, now_ms: u64) -> Result<(), u64> {
        if !limit.is_limited() {
            return Ok(());
        }
        self.refill(limit, now_ms);
        if self.milli >= 1000 {
            self.milli -= 1000;
            Ok(())
        } else {
            Err((1000 - self.milli)
                .div_ceil(u64::from(limit.per_sec))
                .max(1))
        }
    }

    /// Time, in ms from `now_ms`, until the bucket is full again (0: it is).
    pub fn full_in_ms(&mut self, limit: &RateLimit, now_ms: u64) -> u64 {
        if !limit.is_limited() {
            return 0;
        }
        self.refill(limit, now_ms);
        (limit.capacity_milli() - self.milli).div_ceil(u64::from(limit.per_sec))
    }

    /// Whole tokens held at `now_ms`.
    pub fn tokens(&mut self, limit: &RateLimit, now_ms: u64) -> u64 {
        self.refill(limit, now_ms);
        self.milli / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limit = RateLimit {
            per_sec: 10,
            burst: 3,
        };
        let mut b = TokenBucket::full(&limit, 0);
        assert_eq!(
            (0..3).map(|_| b.take(&limit, 0)).collect::<Vec<_>>(),
            vec![Ok(()), Ok(()), Ok(())]
        );
        assert_eq!(b.take(&limit, 0), Err(100), "one token every 100 ms");
        assert_eq!(b.take(&limit, 60), Err(40));
        assert_eq!(b.take(&limit, 100), Ok(()));
        assert_eq!(b.full_in_ms(&limit, 100), 300);
        // A long quiet time refills only up to the burst.
        assert_eq!(b.tokens(&limit, 1_000_000), 3);
        // Time going backwards adds nothing and takes nothing.
        let mut b = TokenBucket::full(&limit, 500);
        for _ in 0..3 {
            b.take(&limit, 500).unwrap();
        }
        assert!(b.take(&limit, 100).is_err());
        assert_eq!(b.take(&limit, 600), Ok(()));
    }

    #[test]
    fn zero_rate_is_no_limit_and_refill_times_are_exact() {
        let off = RateLimit::UNLIMITED;
        let mut b = TokenBucket::full(&off, 0);
        assert!((0..10_000).all(|_| b.take(&off, 0).is_ok()));
        let limit = RateLimit {
            per_sec: 3,
            burst: 100,
        };
        assert_eq!(limit.refill_ms(1), 334);
        assert_eq!(limit.refill_ms(50), 16_667);
        assert_eq!(limit.refill_ms(1000), 33_334, "capped at the burst");
        assert_eq!(off.refill_ms(5), 0);
    }
}
