//! The `master` command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// udp-pool: a UDP server that answers every datagram through a fixed pool
/// of worker processes; each reply names the PID of the worker that made it.
///
/// Signals: TERM/INT drain and stop (twice: stop at once), QUIT stops at
/// once, HUP replaces every worker, TTIN/TTOU add/remove one worker.
#[derive(Parser, Debug)]
#[command(name = "master", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// How to serve (the default command).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The largest pool `--workers` and `TTIN` may make.
pub const MAX_WORKERS: u16 = 512;

/// Subcommands of `master`.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Summarise a journal: requests, outcomes, latency, and a table per worker PID.
    Report(crate::report::ReportArgs),
}

/// The options of a serving master.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address and port of the UDP socket (IPv6 as [::1]:10001). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:10001", value_name = "ADDR:PORT")]
    pub bind: SocketAddr,

    /// Worker processes in the pool; 0 answers inline in the master (no pool).
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=MAX_WORKERS as i64))]
    pub workers: u16,

    /// The worker executable [default: `worker` next to this `master`].
    #[arg(long, value_name = "PATH")]
    pub worker_path: Option<PathBuf>,

    /// Largest datagram accepted; a longer one gets a `too_large` error reply.
    #[arg(long, default_value_t = 8192, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(1..=65507))]
    pub max_datagram: u32,

    /// Requests one worker may hold at once; when every worker is full, clients get `busy`.
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_inflight: u32,

    /// A worker whose oldest request is older than this is killed; its requests get `timeout`.
    #[arg(long, default_value_t = 30_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,

    /// On TERM/INT, how long workers may take to answer what they hold before they are killed.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub graceful_timeout: f64,

    /// A worker retires after this many requests and is replaced (0: never). 1 gives the
    /// lecture's one-process-per-request server.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_requests: u64,

    /// Adds a random 0..=N to each worker's --max-requests, so workers do not all retire at once.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub max_requests_jitter: u64,

    /// Lets `{"op":"crash"}` abort the worker that gets it (for testing recovery).
    #[arg(long)]
    pub enable_fault_injection: bool,

    /// The SQLite journal of requests and workers; `none` turns it off.
    #[arg(long, default_value = "udp-pool-journal.db", value_name = "PATH|none")]
    pub journal: String,

    /// Rows of the `requests` table kept; older ones are deleted in batches.
    #[arg(long, default_value_t = 1_000_000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub journal_max_rows: u64,
}
