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

    /// Sources whose replies have no bound and no rate limit; `none` trusts
    /// no one. Anyone else may be a forged address (see docs/SECURITY.md).
    #[arg(long, value_name = "CIDR", num_args = 1.., value_delimiter = ',',
          default_values = ["127.0.0.0/8", "::1/128"], value_parser = parse_trusted)]
    pub trusted: Vec<Option<ipnet::IpNet>>,

    /// No reply to a source outside --trusted is larger than this many
    /// times the datagram it sent (QUIC's rule: 3).
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub amplification_factor: u32,

    /// Replies per second per source prefix (/24, /56) outside --trusted,
    /// with a burst of one second's worth; 0 turns the limit off.
    #[arg(long, default_value_t = 200, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub rate_limit: u32,

    /// Over the rate limit, every N-th datagram gets a short `rate_limited`
    /// error (the rest no reply); 0: none does.
    #[arg(long, default_value_t = 2, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub rate_limit_slip: u32,
}

/// A `--trusted` value: a CIDR (`10.0.0.0/8`), a bare address (a /32 or
/// /128), or `none`.
fn parse_trusted(s: &str) -> Result<Option<ipnet::IpNet>, String> {
    if s == "none" {
        return Ok(None);
    }
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Ok(Some(net.trunc()));
    }
    s.parse::<std::net::IpAddr>()
        .map(|ip| Some(ipnet::IpNet::from(ip)))
        .map_err(|_| format!("{s:?} is not a CIDR (like 10.0.0.0/8), an address, or none"))
}
