//! End-to-end tests of the `devtables` command, run as a real process.

mod api_keys;
mod broker_cluster;
mod broker_config;
mod changes;
mod clocks;
mod db_cmd;
mod devices_cmd;
mod e2e;
mod faults;
mod first_run;
mod harness;
mod isolation;
mod local_api;
mod pg;
mod proxy;
mod restore;
mod scale_out;
mod scenarios;
mod schema_cmd;
mod schema_upgrade;
mod services;
mod services_gate;
mod sim;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_devtables"))
}

pub fn example_schema() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/schema.json5")
}

pub fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}
