//! A process's CPU time and resident memory from `/proc` (Linux), and the open-files limit.
//!
//! The simulator reports what the cloud costs while it serves the fleet: CPU as a percentage
//! of one core between two readings, RSS in MiB. Elsewhere than Linux the readings are `None`
//! and the report says so. The open-files limit matters because every simulated device holds
//! a socket: the soft limit (often 1024) is raised to the hard one at start.

use std::time::Instant;

/// One reading of a process.
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    /// The process read (`None`: this one).
    pub pid: Option<u32>,
    /// When it was read.
    pub at: Instant,
    /// User plus system CPU time, in seconds.
    pub cpu_s: f64,
    /// Resident set size, in bytes.
    pub rss_bytes: u64,
}

impl ProcSample {
    /// CPU use between `earlier` and this reading, in percent of one core; `None` when the two
    /// readings are of different processes (the cloud was restarted in between).
    pub fn cpu_pct_since(&self, earlier: &ProcSample) -> Option<f64> {
        if self.pid != earlier.pid {
            return None;
        }
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        (wall > 0.0).then(|| (self.cpu_s - earlier.cpu_s).max(0.0) / wall * 100.0)
    }

    pub fn rss_mib(&self) -> f64 {
        self.rss_bytes as f64 / (1024.0 * 1024.0)
    }
}

/// Reads process `pid` (`None`: this process); `None` when it cannot be read (gone, not Linux).
pub fn sample(pid: Option<u32>) -> Option<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_string(),
    };
    let at = Instant::now();
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    Some(ProcSample {
        pid,
        at,
        cpu_s: cpu_seconds(&stat, clock_ticks_per_second()?)?,
        rss_bytes: rss_bytes(&status)?,
    })
}

/// utime + stime of a `/proc/PID/stat` line, in seconds. The command name (field 2) may hold
/// spaces and parentheses, so the fields are counted after its last `)`.
fn cpu_seconds(stat: &str, ticks_per_s: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state (3), ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt,
    // majflt, cmajflt, utime (14), stime (15).
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / ticks_per_s)
}

/// `VmRSS` of `/proc/PID/status`, in bytes.
fn rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn clock_ticks_per_second() -> Option<f64> {
    // SAFETY: sysconf reads a constant of the system; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then_some(ticks as f64)
}

/// The open-files limit before and after [`raise_open_files_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFilesLimit {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// Raises this process's soft limit of open files to its hard limit (children inherit it).
pub fn raise_open_files_limit() -> std::io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(OpenFilesLimit {
        before,
        after: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // A name with a space and a parenthesis, as a thread may have.
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1";
        assert_eq!(cpu_seconds(stat, 100.0), Some(3.0));
        assert_eq!(cpu_seconds("garbage", 100.0), None);
    }

    #[test]
    fn rss_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nThreads:\t3\n";
        assert_eq!(rss_bytes(status), Some(2048 * 1024));
        assert_eq!(rss_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_can_be_read_and_its_limit_raised() {
        let a = sample(None).expect("/proc/self is readable on Linux");
        assert!(a.rss_bytes > 0);
        let limit = raise_open_files_limit().unwrap();
        assert_eq!(limit.after, limit.hard);
        assert!(limit.after >= limit.before);
    }
}
