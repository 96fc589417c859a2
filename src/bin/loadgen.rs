//! `loadgen`: load a udp-pool server on this machine and report what came back.

use std::process::ExitCode;

use clap::Parser;

use client::cli::LoadArgs;

fn main() -> ExitCode {
    let args = LoadArgs::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match client::load::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
