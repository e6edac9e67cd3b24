//! Hybrid logical clock.
//!
//! This module exists because wall clocks on devices are skewed by minutes or hours, and the
//! original system's wall-clock last-writer-wins lost updates under skew. Every replicated write
//! carries an [`Hlc`]: a timestamp that follows physical time when clocks are sane, but never goes
//! backwards and always moves past every version its node has seen, so a write made after
//! observing another write always orders after it, whatever the wall clocks say.
//!
//! The clock does not read time: the caller passes `phys_ms` (its own physical clock), which keeps
//! the crate deterministic and lets the simulator inject skew.

/// The largest `wall_ms` a version may carry: 2^48 - 1 ms (about the year 10889). The text form
/// ([`crate::wire::hlc_to_string`]) gives the wall time exactly 12 hex digits, so every version
/// the wire accepts sorts the same as text (in SQL) and as [`Hlc`] (in Rust).
pub const MAX_WALL_MS: u64 = (1 << 48) - 1;

/// A hybrid logical timestamp: the version of one replicated write.
///
/// The order is total: by `wall_ms`, then `counter`, then `node` as a tie-break, so two distinct
/// writers never produce equal versions and every replica picks the same winner.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the issuing node believed (possibly moved forward to
    /// stay ahead of versions it observed).
    pub wall_ms: u64,
    /// Logical counter that orders versions issued within one `wall_ms`.
    pub counter: u32,
    /// The issuing node (see [`node_id_for`]); breaks ties between concurrent writers.
    pub node: u64,
}

impl Hlc {
    /// The smallest version; lower than any version a clock issues.
    pub const ZERO: Hlc = Hlc {
        wall_ms: 0,
        counter: 0,
        node: 0,
    };
}

/// The clock cannot issue a version: it already issued the largest one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the version clock is exhausted (it reached wall time {MAX_WALL_MS} ms with its counter \
full): the device clock or a restored version is absurdly far in the future; fix the clock and \
let the cloud correct it"
)]
pub struct ClockExhausted;

impl std::fmt::Display for Hlc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}@{:x}", self.wall_ms, self.counter, self.node)
    }
}

/// The clock of one node (a device, or the cloud).
///
/// Invariant: every [`Hlc`] returned by [`HlcClock::tick`] is strictly greater than every version
/// issued or observed before by this clock. The driver persists [`HlcClock::last`] (or the
/// highest stored version) and calls [`HlcClock::restore`] after a restart.
#[derive(Clone, Debug)]
pub struct HlcClock {
    /// This node's id, written into every issued version.
    node: u64,
    /// The highest version issued or observed (its `node` may be another node's).
    last: Hlc,
}

impl HlcClock {
    /// A fresh clock for `node` that has seen nothing.
    pub fn new(node: u64) -> HlcClock {
        HlcClock {
            node,
            last: Hlc::ZERO,
        }
    }

    /// A clock for `node` that resumes after `last` (the highest version it issued or stored).
    pub fn restore(node: u64, last: Hlc) -> HlcClock {
        HlcClock { node, last }
    }

    /// This clock's node id.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// Issue a new version, strictly greater than anything issued or observed before.
    ///
    /// `phys_ms` beyond [`MAX_WALL_MS`] counts as [`MAX_WALL_MS`]; once the clock holds the
    /// largest version it refuses to tick rather than wrap or repeat a version.
    pub fn tick(&mut self, phys_ms: u64) -> Result<Hlc, ClockExhausted> {
        let phys_ms = phys_ms.min(MAX_WALL_MS);
        let next = if phys_ms > self.last.wall_ms {
            Hlc {
                wall_ms: phys_ms,
                counter: 0,
                node: self.node,
            }
        } else if self.last.counter == u32::MAX {
            // The counter is exhausted: borrow one millisecond from the future. This keeps the
            // order strict at the cost of a 1 ms drift, which the next physical tick absorbs.
            if self.last.wall_ms >= MAX_WALL_MS {
                return Err(ClockExhausted);
            }
            Hlc {
                wall_ms: self.last.wall_ms + 1,
                counter: 0,
                node: self.node,
            }
        } else {
            Hlc {
                wall_ms: self.last.wall_ms,
                counter: self.last.counter + 1,
                node: self.node,
            }
        };
        self.last = next;
        Ok(next)
    }

    /// Forget versions beyond `wall_ms`: the clock was ahead of the time the cloud accepts.
    ///
    /// Used by a device whose push the cloud refused as too far in the future: every version it
    /// issued beyond the bound was refused, so none of them exists anywhere else and going back
    /// breaks no causal order the fleet has seen. Versions the device observed from the cloud
    /// are never beyond the bound, and the per-key base is observed again at the next write.
    pub fn rewind_to(&mut self, wall_ms: u64) {
        if self.last.wall_ms > wall_ms {
            self.last = Hlc {
                wall_ms,
                counter: 0,
                node: self.node,
            };
        }
    }

    /// Record a version seen from another node, so later ticks order after it.
    ///
    /// `phys_ms` is accepted for symmetry with [`HlcClock::tick`]; the physical part is folded in
    /// at the next tick.
    pub fn observe(&mut self, remote: Hlc, phys_ms: u64) {
        let _ = phys_ms;
        let remote = Hlc {
            wall_ms: remote.wall_ms.min(MAX_WALL_MS),
            ..remote
        };
        if remote > self.last {
            self.last = remote;
        }
    }

    /// The highest version issued or observed so far.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

/// A stable node id for a name: 64-bit FNV-1a of its UTF-8 bytes.
///
/// Devices use `"{account}/{device}"`; a cloud process uses [`cloud_node_name`] of its own node
/// name, which no device can take because device names never contain `/` twice.
pub fn node_id_for(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The prefix of a cloud process's node name; see [`cloud_node_name`].
pub const CLOUD_NODE_NAME: &str = "devtables/cloud";

/// The node name of one cloud process: `devtables/cloud/{node}`. Each cloud process mints
/// versions with its own node id, so two cloud nodes writing one key at the same millisecond
/// still produce distinct, totally ordered versions.
pub fn cloud_node_name(node: &str) -> String {
    format!("{CLOUD_NODE_NAME}/{node}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_monotonic_even_when_time_goes_back() {
        let mut c = HlcClock::new(7);
        let a = c.tick(1000).unwrap();
        let b = c.tick(900).unwrap();
        let d = c.tick(1000).unwrap();
        assert!(a < b && b < d);
        assert_eq!(b.wall_ms, 1000);
    }

    #[test]
    fn tick_moves_past_observed_remote_even_with_higher_node() {
        let mut c = HlcClock::new(1);
        let remote = Hlc {
            wall_ms: 5_000_000,
            counter: 3,
            node: u64::MAX,
        };
        c.observe(remote, 10);
        let t = c.tick(10).unwrap();
        assert!(t > remote);
        assert_eq!(t.node, 1);
    }

    #[test]
    fn counter_overflow_borrows_a_millisecond() {
        let mut c = HlcClock::restore(
            1,
            Hlc {
                wall_ms: 5,
                counter: u32::MAX,
                node: 1,
            },
        );
        let t = c.tick(0).unwrap();
        assert_eq!(
            t,
            Hlc {
                wall_ms: 6,
                counter: 0,
                node: 1
            }
        );
    }

    #[test]
    fn the_top_version_refuses_to_tick_instead_of_repeating() {
        let mut c = HlcClock::new(1);
        let a = c.tick(u64::MAX).unwrap();
        assert_eq!(a.wall_ms, MAX_WALL_MS);
        c.observe(
            Hlc {
                wall_ms: u64::MAX,
                counter: u32::MAX - 1,
                node: 0,
            },
            0,
        );
        let b = c.tick(0).unwrap();
        assert!(b > a);
        assert_eq!((b.wall_ms, b.counter), (MAX_WALL_MS, u32::MAX));
        assert_eq!(c.tick(u64::MAX), Err(ClockExhausted));
        assert_eq!(c.last(), b, "a refused tick changes nothing");
    }

    #[test]
    fn rewind_forgets_only_what_is_beyond_the_bound() {
        let mut c = HlcClock::new(3);
        let ahead = c.tick(10_000_000).unwrap();
        c.rewind_to(20_000_000);
        assert_eq!(c.last(), ahead, "nothing beyond the bound: no change");
        c.rewind_to(5_000);
        let t = c.tick(4_000).unwrap();
        assert_eq!((t.wall_ms, t.counter), (5_000, 1));
    }

    #[test]
    fn each_cloud_node_mints_its_own_versions() {
        let a = node_id_for(&cloud_node_name("a"));
        let b = node_id_for(&cloud_node_name("b"));
        assert_ne!(a, b);
        // Device node names are "{account}/{device}" with no further `/`: never a cloud's.
        assert_eq!(cloud_node_name("x"), "devtables/cloud/x");
        let (mut ca, mut cb) = (HlcClock::new(a), HlcClock::new(b));
        let (va, vb) = (ca.tick(5).unwrap(), cb.tick(5).unwrap());
        assert_ne!(va, vb, "same millisecond, distinct versions");
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(node_id_for(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(node_id_for("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
