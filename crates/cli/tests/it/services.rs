//! The end-to-end scenarios against real external services. Switched on by DEVTABLES_SERVICES=1
//! (set by `.ci/run`); with it set, a missing service is a failure, never a skip.

use std::net::TcpStream;
use std::time::Duration;

use super::harness::BrokerChoice;
use super::scenarios;

/// The Mosquitto address when the service suites are on; None (skip) when they are off.
fn mosquitto() -> Option<String> {
    std::env::var_os("DEVTABLES_SERVICES")?;
    let addr = std::env::var("DEVTABLES_MOSQUITTO").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let sock = addr
        .parse()
        .unwrap_or_else(|e| panic!("DEVTABLES_MOSQUITTO={addr}: {e}"));
    if let Err(e) = TcpStream::connect_timeout(&sock, Duration::from_secs(2)) {
        panic!("DEVTABLES_SERVICES is set but Mosquitto at {addr} is unreachable: {e}");
    }
    Some(addr)
}

#[test]
fn mosquitto_up_down_both_and_commands() {
    let Some(addr) = mosquitto() else { return };
    scenarios::up_down_both_and_commands(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_offline_catch_up_with_deletes() {
    let Some(addr) = mosquitto() else { return };
    scenarios::offline_catch_up_with_deletes(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_conflict_converges_and_is_logged() {
    let Some(addr) = mosquitto() else { return };
    scenarios::conflict_converges_and_is_logged(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_agent_killed_mid_batch() {
    let Some(addr) = mosquitto() else { return };
    scenarios::agent_killed_mid_batch(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_cloud_killed_mid_apply() {
    let Some(addr) = mosquitto() else { return };
    scenarios::cloud_killed_mid_apply(BrokerChoice::External(addr));
}

#[test]
fn mosquitto_killed_device_goes_offline() {
    let Some(addr) = mosquitto() else { return };
    scenarios::killed_device_goes_offline(BrokerChoice::External(addr));
}
