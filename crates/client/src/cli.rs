//! Command lines of the `client` and `loadgen` binaries.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::failover::Policy;
use crate::mix::Mix;

/// The longest a load run may last, whatever it is asked: every run stops by itself.
pub const MAX_DURATION_S: f64 = 600.0;
/// The shortest `--duration`: a millisecond, which survives the trip to a
/// `--processes` child.
pub const MIN_DURATION_S: f64 = 0.001;
/// The lowest `--rate`: one request every 1000 s, less than one a run.
pub const MIN_RATE: f64 = 0.001;
/// The highest `--rate`: a hundred times what one machine's loopback carries.
pub const MAX_RATE: f64 = 1e8;

/// The most `--server`s a command line may name.
pub const MAX_SERVERS: usize = 16;

/// How `client` retries and fails over, for its `--help`.
const CLIENT_AFTER_HELP: &str = "\
Several servers: a request starts at the first server (--policy first) or, with
--processes K, client process i starts at server i mod n (--policy round-robin).
A server that does not reply within --timeout-ms is sent the same datagram again
(same id, same socket, so its duplicate-request cache absorbs it) --retries times,
then the request fails over to the next server, with the same id. A `busy` or
`shutting_down` reply and an ICMP port unreachable (nothing listens) fail over at
once. A reply that comes late from a server already left behind still answers.
Within one process, a server that timed out 3 times in a row, refused or said
shutting_down is skipped for 5 s. The reply is printed with the server that
sent it. With --discover SEED the server list is the group's servers that are
up, as SEED's `members` reply names them (docs/CLUSTER.md).

Exit status: 0 for a reply, 1 for an error reply (or another failure), 2 when no
server answered (one line names each server tried and why: timeout, refused,
busy, shutting_down).";

/// Send one request to a udp-pool server and print its reply.
#[derive(Debug, Parser)]
#[command(name = "client", version, after_help = CLIENT_AFTER_HELP)]
pub struct ClientArgs {
    /// Server to ask, HOST:PORT. Repeat to name several (at most 16): see
    /// --policy and below.
    #[arg(
        long = "server",
        value_name = "ADDR",
        default_value = "127.0.0.1:10001"
    )]
    pub servers: Vec<String>,

    /// Ask this server (HOST:PORT; repeat for more seeds, tried in turn) for
    /// `members` and use the servers of its group that are up, in order of
    /// their numbers, instead of --server.
    #[arg(long, value_name = "SEED")]
    pub discover: Vec<String>,

    /// Which server a request starts at.
    #[arg(long, value_enum, default_value_t = Policy::First)]
    pub policy: Policy,

    /// How long to wait for each attempt's reply.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,

    /// Resends of the request to one server (same id, same socket) after a
    /// timeout, before failing over to the next.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,

    /// Print the reply as it came, with a "server" field added (a reply
    /// that is not a JSON object is printed as {"reply":TEXT,"server":ADDR}).
    #[arg(long)]
    pub json: bool,

    /// Run K client processes at once, each sending the request with its own
    /// PID (as the lecture's "multiple client processes" do).
    #[arg(long, value_name = "K",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub processes: Option<u32>,

    /// Internal: this client's number among --processes, for
    /// `--policy round-robin`.
    #[arg(long, hide = true, default_value_t = 0)]
    pub process_index: usize,

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
    /// The group of servers, as the first server (or seed) that answers
    /// sees it: a table, or its JSON with --json.
    Members,
    /// Send TEXT as it is (the lecture's text dialect: a number gets its
    /// square, other text a greeting). The first reply wins.
    Send {
        /// The text; several words are joined with spaces.
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        text: Vec<String>,
    },
}

/// How `loadgen` spreads load and fails over, for its `--help`.
const LOAD_AFTER_HELP: &str = "\
Several servers: each socket sends to one server: all to the first
(--policy first) or socket i of process p to server (p * --sockets + i) mod n
(--policy round-robin: per socket, not per request). Every process also has one
socket per server for requests that fail over. A request without a reply within
--timeout-ms is sent again on the same socket --retries times, then fails over
to the next server with the same id; a `busy` or `shutting_down` reply and an
ICMP port unreachable fail it over at once (port unreachable: every request on
that server). It is lost when no server is left. A server that timed out 3 times
in a row, refused or said shutting_down is skipped for 5 s: its sockets' new
requests go to the next server. The report counts, per server, the datagrams
sent, the requests answered, retried, failed over and lost.";

/// Load a udp-pool server on this machine and report what came back.
///
/// Closed loop (the default) keeps --window requests outstanding per socket;
/// open loop (--rate) sends on a fixed schedule and measures latency from
/// the intended send time, so a stalled server cannot hide its stalls.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version, after_help = LOAD_AFTER_HELP)]
pub struct LoadArgs {
    /// Server to load, HOST:PORT; loopback addresses only. Repeat to load
    /// several (at most 16).
    #[arg(
        long = "server",
        value_name = "ADDR",
        default_value = "127.0.0.1:10001"
    )]
    pub servers: Vec<String>,

    /// Ask this server (loopback; repeat for more seeds) for `members` once
    /// at the start, and load the servers of its group that are up instead
    /// of --server.
    #[arg(long, value_name = "SEED")]
    pub discover: Vec<String>,

    /// How sockets are spread over the servers.
    #[arg(long, value_enum, default_value_t = Policy::First)]
    pub policy: Policy,

    /// Resends of a timed-out request to the same server (same id, same
    /// socket) before it fails over or counts as lost.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=10))]
    pub retries: u8,

    /// Closed loop: requests outstanding per socket.
    #[arg(long, value_name = "W", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub window: u32,

    /// Open loop: requests per second, over all sockets and processes (0.001 to 1e8).
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// UDP sockets per process, served by one poll loop.
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub sockets: u32,

    /// Separate load processes; the parent merges their results.
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub processes: u32,

    /// Seconds to send for (default 5 without --requests; 0.001 to 600).
    #[arg(long, value_name = "S", value_parser = parse_duration)]
    pub duration: Option<f64>,

    /// Requests to send in all, then stop (still within --duration).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,

    /// Request mix as KIND=WEIGHT,... with kinds square, hello, sleep, text.
    #[arg(long, value_name = "MIX", default_value = "square=100")]
    pub mix: Mix,

    /// How long each sleep request asks the worker to sleep (at most the server's 10000).
    #[arg(long, value_name = "MS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(0..=protocol::MAX_SLEEP_MS))]
    pub sleep_ms: u64,

    /// An attempt with no reply this long after it was sent is retried,
    /// failed over or, at the last server, counted lost.
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

    /// Internal: this child's number among --processes, for
    /// `--policy round-robin`.
    #[arg(long, hide = true, default_value_t = 0)]
    pub process_index: usize,
}

/// Parses a number of `what` from `min` to `max`; also refuses NaN and
/// infinities, which no range contains.
fn parse_bounded(text: &str, what: &str, min: f64, max: f64) -> Result<f64, String> {
    let x: f64 = text
        .parse()
        .map_err(|_| format!("expected a number of {what}"))?;
    if !(min..=max).contains(&x) {
        return Err(format!("must be from {min} to {max} {what}"));
    }
    Ok(x)
}

/// Parses `--rate`: [`MIN_RATE`] to [`MAX_RATE`] requests per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    parse_bounded(text, "requests per second", MIN_RATE, MAX_RATE)
}

/// Parses `--duration`: [`MIN_DURATION_S`] to [`MAX_DURATION_S`] seconds.
fn parse_duration(text: &str) -> Result<f64, String> {
    parse_bounded(text, "seconds", MIN_DURATION_S, MAX_DURATION_S)
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
    fn several_servers_and_a_policy() {
        let a = ClientArgs::parse_from([
            "client",
            "--server",
            "127.0.0.1:1",
            "--server",
            "127.0.0.1:2",
            "--policy",
            "round-robin",
            "hello",
        ]);
        assert_eq!(a.servers, ["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(a.policy, Policy::RoundRobin);
        assert_eq!(
            ClientArgs::parse_from(["client", "hello"]).policy,
            Policy::First
        );
        let l = LoadArgs::parse_from(["loadgen", "--server", "[::1]:1", "--server", "127.0.0.1:2"]);
        assert_eq!(l.servers, ["[::1]:1", "127.0.0.1:2"]);
        assert_eq!((l.policy, l.retries), (Policy::First, 0));
        assert!(ClientArgs::try_parse_from(["client", "--policy", "random", "hello"]).is_err());
        let d = ClientArgs::parse_from(["client", "--discover", "127.0.0.1:1", "members"]);
        assert_eq!(d.discover, ["127.0.0.1:1"]);
        assert!(matches!(d.command, ClientCommand::Members));
        let l = LoadArgs::parse_from(["loadgen", "--discover", "127.0.0.1:1"]);
        assert_eq!(l.discover, ["127.0.0.1:1"]);
    }

    /// `option=value` parses or not, for each of `values`.
    #[track_caller]
    fn edges<P: Parser>(command: &[&str], option: &str, ok: &[&str], refused: &[&str]) {
        let parse = |v: &str| {
            let arg = format!("{option}={v}");
            let args: Vec<&str> = [command[0], &arg]
                .into_iter()
                .chain(command[1..].iter().copied())
                .collect();
            (arg.clone(), P::try_parse_from(args))
        };
        for v in ok {
            if let (arg, Err(e)) = parse(v) {
                panic!("{arg} should parse: {e}");
            }
        }
        for v in refused {
            let (arg, r) = parse(v);
            assert!(r.is_err(), "{arg} should be refused");
        }
    }

    #[test]
    fn client_numbers_have_bounds() {
        let c = &["client", "hello"];
        edges::<ClientArgs>(c, "--timeout-ms", &["1", "600000"], &["0", "600001", "-1"]);
        edges::<ClientArgs>(c, "--retries", &["0", "100"], &["101", "4294967296"]);
        edges::<ClientArgs>(c, "--processes", &["1", "256"], &["0", "257"]);
    }

    #[test]
    fn loadgen_numbers_have_bounds() {
        let l = &["loadgen"];
        edges::<LoadArgs>(l, "--window", &["1", "65536"], &["0", "65537"]);
        edges::<LoadArgs>(l, "--sockets", &["1", "1024"], &["0", "1025"]);
        edges::<LoadArgs>(l, "--processes", &["1", "64"], &["0", "65"]);
        edges::<LoadArgs>(l, "--timeout-ms", &["1", "60000"], &["0", "60001"]);
        edges::<LoadArgs>(l, "--retries", &["0", "10"], &["11", "-1"]);
        edges::<LoadArgs>(
            l,
            "--sleep-ms",
            &["0", "10000"],
            &["10001", "18446744073709551615"],
        );
        edges::<LoadArgs>(
            l,
            "--requests",
            &["1", "18446744073709551615"],
            &["0", "18446744073709551616"],
        );
        edges::<LoadArgs>(
            l,
            "--rate",
            &["0.001", "1", "1e8"],
            &[
                "0",
                "0.0009",
                "-5",
                "100000001",
                "1e300",
                "inf",
                "NaN",
                "5/s",
            ],
        );
        edges::<LoadArgs>(
            l,
            "--duration",
            &["0.001", "5", "600"],
            &["0", "0.0009", "-1", "600.1", "1e20", "inf", "NaN", "5s"],
        );
        let e = LoadArgs::try_parse_from(["loadgen", "--rate", "1e300"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("must be from 0.001 to 100000000 requests per second"),
            "{e}"
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
