//! Several cloud processes sharing one fleet (docs/scale-out.md).
//!
//! Every device belongs to one of a fixed number of partitions ([`partition_of`], a stable hash
//! of its id). Each partition is leased to one cloud node at a time in a table of the shared
//! PostgreSQL database; a node serves the devices of the partitions it holds and ignores the
//! others' messages (every node subscribes to every device topic: brokers without device
//! affinity, Mosquitto's `$share` and NATS included, work unchanged). A node that stops renewing
//! loses its leases after `lease`, and the others take its partitions; a node that comes back
//! takes its share again, released by the nodes above their share.
//!
//! This module is the sans-IO part: which partitions a node should renew, claim and release
//! given the lease table ([`plan`]), and what a node serves ([`Serving`]). The PostgreSQL driver
//! is [`leases`]; the wake-ups that tell the node serving a device that another node advanced
//! its feed are [`wakeups`].

#[cfg(feature = "postgres")]
pub mod leases;
pub(crate) mod presence;
#[cfg(feature = "postgres")]
pub mod wakeups;

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;

use devtables_sync::identity::DeviceId;

/// The partition of a device: FNV-1a of `account/device`, modulo `partitions`. Stable across
/// processes, versions and machines: it decides which node serves the device.
pub fn partition_of(device: &DeviceId, partitions: u32) -> u32 {
    let hash = devtables_sync::hlc::node_id_for(&format!("{}/{}", device.account, device.device));
    (hash % u64::from(partitions.max(1))) as u32
}

/// What one cloud node serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serving {
    /// Every device (a single node: SQLite, or the embedded broker).
    All,
    /// The devices of these partitions, out of `partitions`.
    Partitions {
        partitions: u32,
        held: BTreeSet<u32>,
    },
}

impl Serving {
    /// Nothing yet: a cluster node before its first lease round.
    pub fn nothing(partitions: u32) -> Serving {
        Serving::Partitions {
            partitions,
            held: BTreeSet::new(),
        }
    }

    pub fn serves(&self, device: &DeviceId) -> bool {
        match self {
            Serving::All => true,
            Serving::Partitions { partitions, held } => {
                held.contains(&partition_of(device, *partitions))
            }
        }
    }

    /// Whether this node runs the fleet-wide chores (retention): the holder of partition 0, so
    /// exactly one node does at a time (none for at most a lease during a takeover).
    pub fn leads(&self) -> bool {
        match self {
            Serving::All => true,
            Serving::Partitions { held, .. } => held.contains(&0),
        }
    }

    /// Partitions held here and not in `before`: their devices may have changes waiting.
    pub fn gained_since(&self, before: &Serving) -> Serving {
        match (self, before) {
            (Serving::Partitions { partitions, held }, Serving::Partitions { held: old, .. }) => {
                Serving::Partitions {
                    partitions: *partitions,
                    held: held.difference(old).copied().collect(),
                }
            }
            (Serving::Partitions { .. }, Serving::All) => Serving::nothing(0),
            (Serving::All, _) => Serving::All,
        }
    }

    /// What either serves.
    pub fn union(&self, other: &Serving) -> Serving {
        match (self, other) {
            (Serving::All, _) | (_, Serving::All) => Serving::All,
            (Serving::Partitions { partitions, held }, Serving::Partitions { held: more, .. }) => {
                Serving::Partitions {
                    partitions: *partitions,
                    held: held.union(more).copied().collect(),
                }
            }
        }
    }

    /// No partition (or nothing at all).
    pub fn is_empty(&self) -> bool {
        matches!(self, Serving::Partitions { held, .. } if held.is_empty())
    }

    /// Partitions held (every one for [`Serving::All`], `None`).
    pub fn held(&self) -> Option<usize> {
        match self {
            Serving::All => None,
            Serving::Partitions { held, .. } => Some(held.len()),
        }
    }
}

/// The numbers of a node's share of a scaled-out cloud, in `GET /v1/status` (all 0 on a single
/// node).
#[derive(Debug, Default)]
pub struct ClusterCounters {
    /// Partitions this node holds now.
    pub(crate) partitions_held: AtomicU64,
    /// Nodes seen within a lease at the last round (this one included).
    pub(crate) live_nodes: AtomicU64,
    /// Partitions this node took over (free, released or expired: a takeover or a rebalance).
    pub(crate) partitions_claimed: AtomicU64,
    /// Partitions this node gave up to rebalance.
    pub(crate) partitions_released: AtomicU64,
    /// Lease rounds that failed (the database unreachable).
    pub(crate) lease_rounds_failed: AtomicU64,
    /// Times the node stopped serving because its leases could not be renewed in time.
    pub(crate) leases_lost: AtomicU64,
    /// Device messages left to the node that serves the device.
    pub(crate) messages_other_nodes: AtomicU64,
    /// Sessions dropped because another node serves their device now.
    pub(crate) sessions_handed_over: AtomicU64,
    /// Devices shown online in partitions this node took over that answered no prompt within
    /// the presence check's wait, marked offline ([`presence`]).
    pub(crate) presence_marked_offline: AtomicU64,
    /// Feed wake-ups sent to the other nodes (devices they serve).
    pub(crate) wakeups_sent: AtomicU64,
    /// Feed wake-ups heard from the other nodes.
    pub(crate) wakeups_heard: AtomicU64,
    /// Failures to send or to listen for wake-ups (retried; a listener back after one prompts
    /// its devices that are behind).
    pub(crate) wakeup_failures: AtomicU64,
    /// Notifications heard on the wake-up channel that were not wake-ups (ignored).
    pub(crate) wakeups_unreadable: AtomicU64,
}

/// What the wake-up listener hands the sync loop ([`wakeups`]).
#[derive(Debug)]
pub enum Heard {
    /// Another node advanced these feeds.
    Advanced(Vec<(DeviceId, u64)>),
    /// The listener (re)connected: wake-ups may have been missed meanwhile.
    Listening,
}

/// Tells the other nodes that feeds of devices they serve advanced, and that the change log
/// grew (their change-log readers and webhooks read again).
pub trait WakeOthers: Send + Sync {
    fn wake(&self, advanced: Vec<(DeviceId, u64)>);
    fn change_head(&self, head: u64);
}

/// One row of the lease table as a round reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub partition: u32,
    /// The holder; `None` when released.
    pub node: Option<String>,
    /// When the lease ends, in the database's clock (ms).
    pub expires_ms: u64,
}

/// What a node does in one lease round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Held and kept: extended by one lease.
    pub renew: Vec<u32>,
    /// Held beyond the node's share: given up (after the node stopped serving them).
    pub release: Vec<u32>,
    /// Free or expired: taken, if no other node took them first.
    pub claim: Vec<u32>,
}

/// One round of node `me`: keep what it holds up to its share (`ceil(partitions / live)`),
/// release the rest, and claim free or expired partitions up to the share. `live` are the nodes
/// seen within a lease, `me` among them. Claims start at an offset of the node's own so that
/// nodes starting together do not race for the same partitions.
pub fn plan(me: &str, now_ms: u64, partitions: u32, leases: &[Lease], live: usize) -> Plan {
    let share = partitions.div_ceil(live.max(1) as u32) as usize;
    let mut held: Vec<u32> = leases
        .iter()
        .filter(|l| l.node.as_deref() == Some(me) && l.expires_ms > now_ms)
        .map(|l| l.partition)
        .collect();
    held.sort_unstable();
    let release = held.split_off(held.len().min(share));
    let taken: BTreeSet<u32> = leases
        .iter()
        .filter(|l| l.node.is_some() && l.expires_ms > now_ms)
        .map(|l| l.partition)
        .collect();
    let offset = (devtables_sync::hlc::node_id_for(me) % u64::from(partitions.max(1))) as u32;
    let claim = (0..partitions)
        .map(|i| (i + offset) % partitions)
        .filter(|p| !taken.contains(p))
        .take(share.saturating_sub(held.len()))
        .collect();
    Plan {
        renew: held,
        release,
        claim,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The lease table as the SQL keeps it: a claim only takes a free or expired partition.
    #[derive(Default)]
    struct Table {
        rows: BTreeMap<u32, (String, u64)>,
    }

    impl Table {
        fn leases(&self, partitions: u32) -> Vec<Lease> {
            (0..partitions)
                .map(|p| match self.rows.get(&p) {
                    Some((n, e)) => Lease {
                        partition: p,
                        node: Some(n.clone()),
                        expires_ms: *e,
                    },
                    None => Lease {
                        partition: p,
                        node: None,
                        expires_ms: 0,
                    },
                })
                .collect()
        }

        fn round(&mut self, me: &str, now: u64, lease: u64, partitions: u32, live: usize) {
            let p = plan(me, now, partitions, &self.leases(partitions), live);
            for r in &p.release {
                self.rows.remove(r);
            }
            for r in &p.renew {
                if let Some((n, e)) = self.rows.get_mut(r) {
                    if n == me && *e > now {
                        *e = now + lease;
                    }
                }
            }
            for c in &p.claim {
                let free = self.rows.get(c).is_none_or(|(_, e)| *e <= now);
                if free {
                    self.rows.insert(*c, (me.to_string(), now + lease));
                }
            }
        }

        fn held_by(&self, me: &str, now: u64) -> usize {
            self.rows
                .values()
                .filter(|(n, e)| n == me && *e > now)
                .count()
        }
    }

    #[test]
    fn nodes_share_the_partitions_take_over_a_dead_one_and_rebalance_when_it_returns() {
        let (partitions, lease) = (64, 5_000);
        let mut t = Table::default();
        let mut now = 0;
        // One node alone takes everything.
        t.round("a", now, lease, partitions, 1);
        assert_eq!(t.held_by("a", now), 64);
        // Three nodes: within a few rounds each holds its share and every partition is held.
        for _ in 0..3 {
            now += 1_000;
            for n in ["a", "b", "c"] {
                t.round(n, now, lease, partitions, 3);
            }
        }
        let shares: Vec<usize> = ["a", "b", "c"].iter().map(|n| t.held_by(n, now)).collect();
        assert_eq!(shares.iter().sum::<usize>(), 64, "{shares:?}");
        assert!(shares.iter().all(|s| *s <= 22 && *s >= 20), "{shares:?}");
        // `c` dies: its leases run out and the two others take them.
        for _ in 0..8 {
            now += 1_000;
            for n in ["a", "b"] {
                t.round(n, now, lease, partitions, 2);
            }
        }
        assert_eq!(t.held_by("a", now) + t.held_by("b", now), 64);
        assert_eq!(t.held_by("c", now), 0);
        // `c` comes back: the others release beyond their share, `c` takes it.
        for _ in 0..3 {
            now += 1_000;
            for n in ["a", "b", "c"] {
                t.round(n, now, lease, partitions, 3);
            }
        }
        let shares: Vec<usize> = ["a", "b", "c"].iter().map(|n| t.held_by(n, now)).collect();
        assert_eq!(shares.iter().sum::<usize>(), 64, "{shares:?}");
        assert!(shares.iter().all(|s| *s >= 20), "{shares:?}");
    }

    #[test]
    fn a_partition_held_by_a_live_node_is_never_claimed() {
        let leases = vec![
            Lease {
                partition: 0,
                node: Some("b".into()),
                expires_ms: 10_000,
            },
            Lease {
                partition: 1,
                node: Some("b".into()),
                expires_ms: 500,
            },
            Lease {
                partition: 2,
                node: None,
                expires_ms: 0,
            },
        ];
        let p = plan("a", 1_000, 3, &leases, 2);
        assert!(!p.claim.contains(&0));
        let mut claim = p.claim.clone();
        claim.sort_unstable();
        assert_eq!(claim, vec![1, 2]);
    }

    #[test]
    fn serving_tells_devices_gains_and_the_leader() {
        let d = DeviceId::new("acme", "d1").unwrap();
        let p = partition_of(&d, 8);
        assert_eq!(p, partition_of(&d, 8), "stable");
        let held: BTreeSet<u32> = [p].into();
        let s = Serving::Partitions {
            partitions: 8,
            held,
        };
        assert!(s.serves(&d));
        assert!(!Serving::nothing(8).serves(&d));
        assert!(Serving::All.serves(&d));
        assert_eq!(s.gained_since(&Serving::nothing(8)), s);
        assert!(s.gained_since(&s).is_empty());
        assert_eq!(s.leads(), p == 0);
    }
}
