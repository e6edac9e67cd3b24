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
    pub fn tick(&mut self, phys_ms: u64) -> Hlc {
        let next = if phys_ms > self.last.wall_ms {
            Hlc {
                wall_ms: phys_ms,
                counter: 0,
                node: self.node,
            }
        } else if self.last.counter == u32::MAX {
            // The counter is exhausted: borrow one millisecond from the future. This keeps the
            // order strict at the cost of a 1 ms drift, which the next physical tick absorbs.
            Hlc {
                wall_ms: self.last.wall_ms.saturating_add(1),
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
        next
    }

    /// Record a version seen from another node, so later ticks order after it.
    ///
    /// `phys_ms` is accepted for symmetry with [`HlcClock::tick`]; the physical part is folded in
    /// at the next tick.
    pub fn observe(&mut self, remote: Hlc, phys_ms: u64) {
        let _ = phys_ms;
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
/// Devices use `"{account}/{device}"`; the cloud uses [`CLOUD_NODE_NAME`], which no device can
/// take because device names never contain `/`.
pub fn node_id_for(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The name whose [`node_id_for`] is the cloud's node id.
pub const CLOUD_NODE_NAME: &str = "devtables/cloud";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_monotonic_even_when_time_goes_back() {
        let mut c = HlcClock::new(7);
        let a = c.tick(1000);
        let b = c.tick(900);
        let d = c.tick(1000);
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
        let t = c.tick(10);
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
        let t = c.tick(0);
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
    fn fnv_is_stable() {
        assert_eq!(node_id_for(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(node_id_for("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
