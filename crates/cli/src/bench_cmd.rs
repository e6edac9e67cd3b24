//! `devtables bench <cmd>`: every benchmark of `devtables_bench` (db, sync, catch-up, wire,
//! footprint, memory, fleet, scale-out, plot) from the `devtables` command itself; the parts
//! that measure a process of their own re-run this program as `devtables bench <hidden
//! subcommand>`.

use anyhow::Context;
use clap::Args;
use devtables_bench::{BenchCmd, ChildCommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    cmd: BenchCmd,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let child = ChildCommand::current_exe(&["bench"]).context("cannot find this program")?;
    devtables_bench::run(args.cmd, &child)?;
    Ok(())
}
