//! `master`: see the `master` crate.

use std::process::ExitCode;

use clap::Parser;
use master::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    udp_pool::init_logging("info");
    let result = match &cli.command {
        Some(Command::Report(args)) => master::report::run(args),
        None => master::serve(&cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("master: {e:#}");
            ExitCode::FAILURE
        }
    }
}
