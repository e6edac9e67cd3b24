//! `devtables-bench`: the benchmarks of `devtables bench` (`devtables_bench::run`) as a binary of
//! their own, for `cargo run -p devtables-bench -- <cmd>` without building the `devtables`
//! command.

use std::process::ExitCode;

use clap::Parser;
use devtables_bench::{BenchCmd, ChildCommand};

#[derive(Parser)]
#[command(name = "devtables-bench", about = "Benchmarks of devtables")]
struct Cli {
    #[command(subcommand)]
    cmd: BenchCmd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let child = match ChildCommand::current_exe(&[]) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot find this program's executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    match devtables_bench::run(cli.cmd, &child) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
