//! Command lines of the `client` and `loadgen` binaries.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::mix::Mix;

/// The longest a load run may last, whatever it is asked: every run stops by itself.
pub const MAX_DURATION_S: f64 = 600.0;

/// Send one request to a udp-pool server and print its reply.
#[derive(Debug, Parser)]
#[command(
    name = "client",
    version,
    after_help = "Exit status: 0 for a reply, 1 for an error reply (or another failure), \
                  2 when no server answered."
)]
pub struct ClientArgs {
    /// Server to ask, HOST:PORT. Repeat to name fallbacks, tried in order
    /// when one does not answer.
    #[arg(
        long = "server",
        value_name = "ADDR",
        default_value = "127.0.0.1:10001"
    )]
    pub servers: Vec<String>,

    /// How long to wait for each attempt's reply.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,

    /// Retries per server after the first attempt.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,

    /// Print the raw reply instead of a readable line.
    #[arg(long)]
    pub json: bool,

    /// Run K client processes at once, each sending the request with its own
    /// PID (as the lecture's "multiple client processes" do).
    #[arg(long, value_name = "K",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub processes: Option<u32>,

    /// What to ask.
    #[command(subcommand)]
    pub command: ClientCommand,
}

/// The requests `client` can send.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// A greeting: the reply names the worker that answered.
    Hello,
    /// Square N: an integer of any size, or a decimal, sent exactly as typed.
    Square {
        /// The number to square.
        #[arg(allow_hyphen_values = true)]
        n: String,
    },
    /// Ask a worker to sleep MS milliseconds, then reply.
    Sleep {
        /// Milliseconds to sleep.
        ms: u64,
    },
    /// Pool statistics, answered by the master.
    Stats,
    /// Send TEXT as it is (the lecture's text dialect: a number gets its
    /// square, other text a greeting). The first reply wins.
    Send {
        /// The text; several words are joined with spaces.
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
    },
}

/// Load a udp-pool server on this machine and report what came back.
///
/// Closed loop (the default) keeps --window requests outstanding per socket;
/// open loop (--rate) sends on a fixed schedule and measures latency from
/// the intended send time, so a stalled server cannot hide its stalls.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version)]
pub struct LoadArgs {
    /// Server to load, HOST:PORT; loopback addresses only.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:10001")]
    pub server: String,

    /// Closed loop: requests outstanding per socket.
    #[arg(long, value_name = "W", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub window: u32,

    /// Open loop: requests per second, over all sockets and processes.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// UDP sockets per process, served by one poll loop.
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub sockets: u32,

    /// Separate load processes; the parent merges their results.
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub processes: u32,

    /// Seconds to send for (default 5 without --requests; at most 600).
    #[arg(long, value_name = "S")]
    pub duration: Option<f64>,

    /// Requests to send in all, then stop (still within --duration).
    #[arg(long, value_name = "N")]
    pub requests: Option<u64>,

    /// Request mix as KIND=WEIGHT,... with kinds square, hello, sleep, text.
    #[arg(long, value_name = "MIX", default_value = "square=100")]
    pub mix: Mix,

    /// How long each sleep request asks the worker to sleep.
    #[arg(long, value_name = "MS", default_value_t = 1)]
    pub sleep_ms: u64,

    /// A request with no reply this long after it was sent counts as lost;
    /// also how long to wait for the last replies.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,

    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,

    /// Draw the latency distribution and throughput over time into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub quiet: bool,

    /// Internal: run as one of --processes and print the raw tally as JSON.
    #[arg(long, hide = true)]
    pub child: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_lines_are_consistent() {
        ClientArgs::command().debug_assert();
        LoadArgs::command().debug_assert();
    }

    #[test]
    fn client_takes_negative_and_huge_numbers() {
        let a = ClientArgs::parse_from(["client", "--server", "[::1]:7", "square", "-5"]);
        assert_eq!(a.servers, ["[::1]:7"]);
        assert!(matches!(a.command, ClientCommand::Square { n } if n == "-5"));
        let a = ClientArgs::parse_from(["client", "send", "Hi", "server!"]);
        assert_eq!(a.servers, ["127.0.0.1:10001"]);
        assert!(
            matches!(a.command, ClientCommand::Send { text } if text.join(" ") == "Hi server!")
        );
    }

    #[test]
    fn loadgen_defaults() {
        let a = LoadArgs::parse_from(["loadgen", "--mix", "square=9,hello=1"]);
        assert_eq!(a.window, 64);
        assert_eq!(a.mix.to_string(), "square=9,hello=1");
        assert!(LoadArgs::try_parse_from(["loadgen", "--mix", "cube=1"]).is_err());
    }
}
