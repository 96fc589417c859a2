//! `loadgen`: load a udp-pool server on this machine and report what came back.

use std::process::ExitCode;

use clap::Parser;

use client::cli::LoadArgs;

fn main() -> ExitCode {
    let args = LoadArgs::parse();
    udp_pool::init_logging("warn");
    match client::load::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
