//! `client`: send one request to a udp-pool server and print its reply.

use std::process::ExitCode;

use clap::Parser;

use client::cli::ClientArgs;
use client::oneshot::{self, NoReply, EXIT_NO_REPLY};

fn main() -> ExitCode {
    let args = ClientArgs::parse();
    udp_pool::init_logging("warn");
    match oneshot::run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("client: {e:#}");
            if e.is::<NoReply>() {
                ExitCode::from(EXIT_NO_REPLY)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
