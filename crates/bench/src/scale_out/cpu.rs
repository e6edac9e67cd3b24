//! Where the CPU went during a variant's writes: the cloud nodes (by pid), PostgreSQL's
//! server processes and the broker (by command name: `postgres`, `mosquitto`), read from
//! `/proc` at the start and at the end of the write phase. On a two-core machine the simulator,
//! the cloud, the database and the broker share the cores; these figures say who took them.
//!
//! A process that ends between the two readings is not counted (PostgreSQL keeps its backends
//! for the cloud's connections, so nearly all of its work is in processes that live through).

use std::collections::HashMap;
use std::time::Instant;

use devtables_fleet::procfs;

/// CPU seconds so far of a set of processes, at one moment.
#[derive(Clone, Debug)]
pub struct CpuReading {
    at: Instant,
    /// pid → user + system CPU seconds.
    seconds: HashMap<u32, f64>,
}

/// What a group of processes is.
#[derive(Clone, Debug)]
pub enum Group {
    /// These pids.
    Pids(Vec<u32>),
    /// Every process whose `/proc/PID/comm` is this name.
    Named(&'static str),
}

impl Group {
    fn pids(&self) -> Vec<u32> {
        match self {
            Group::Pids(pids) => pids.clone(),
            Group::Named(name) => processes_named(name),
        }
    }
}

/// Every pid whose command name is `name`.
fn processes_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}

/// Reads the group now.
pub fn read(group: &Group) -> CpuReading {
    let seconds = group
        .pids()
        .into_iter()
        .filter_map(|pid| Some((pid, procfs::sample(Some(pid))?.cpu_s)))
        .collect();
    CpuReading {
        at: Instant::now(),
        seconds,
    }
}

impl CpuReading {
    /// Wall seconds from `earlier` to this reading.
    pub fn seconds_since(&self, earlier: &CpuReading) -> f64 {
        self.at.duration_since(earlier.at).as_secs_f64()
    }
}

/// CPU between two readings of one group, in percent of one core: the processes present in
/// both; `None` when none was, or no time passed.
pub fn percent(before: &CpuReading, after: &CpuReading) -> Option<f64> {
    let wall = after.at.duration_since(before.at).as_secs_f64();
    let mut used = 0.0;
    let mut any = false;
    for (pid, s) in &after.seconds {
        if let Some(b) = before.seconds.get(pid) {
            used += (s - b).max(0.0);
            any = true;
        }
    }
    (any && wall > 0.0).then(|| used / wall * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_processes_in_both_readings_count() {
        let t0 = Instant::now();
        let before = CpuReading {
            at: t0,
            seconds: HashMap::from([(1, 1.0), (2, 5.0)]),
        };
        let after = CpuReading {
            at: t0 + Duration::from_secs(2),
            seconds: HashMap::from([(1, 2.0), (3, 9.0)]),
        };
        assert_eq!(percent(&before, &after), Some(50.0));
        let gone = CpuReading {
            at: t0 + Duration::from_secs(2),
            seconds: HashMap::new(),
        };
        assert_eq!(percent(&before, &gone), None);
    }

    #[test]
    fn this_process_is_read_by_pid() {
        let me = Group::Pids(vec![std::process::id()]);
        let before = read(&me);
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(percent(&before, &read(&me)).is_some());
    }
}
