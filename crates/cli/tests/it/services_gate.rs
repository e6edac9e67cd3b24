//! The switch of the tests that need real external services (Mosquitto, PostgreSQL, tools):
//! `DEVTABLES_SERVICES` set (as `.ci/run` does) runs them, and then a missing service is a
//! failure, never a skip; unset, each such test prints a `SKIPPED` line and returns, so a run
//! without the services says so instead of looking green.
//!
//! One file, shared: the cloud crate's tests include it by path (`crates/cloud/tests/it/main.rs`),
//! so every crate's service tests follow the same rule.

use std::io::Write;

/// Whether the service suites are on; when they are off, says that this test is skipped.
/// Rust's test harness has no skip status and captures what the print macros write, so the line
/// goes to the stderr handle itself, which the harness leaves alone: it shows in every run.
pub(super) fn services_on() -> bool {
    if std::env::var_os("DEVTABLES_SERVICES").is_some() {
        return true;
    }
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("services::<unnamed test>");
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {name}: DEVTABLES_SERVICES not set"
    );
    false
}
