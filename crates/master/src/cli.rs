//! The `master` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand};

use crate::privileges::{DEFAULT_WORKER_MEMORY_MIB, MAX_WORKER_MEMORY_MIB, MIN_WORKER_MEMORY_MIB};

/// The longest `--request-timeout-ms` and `--graceful-timeout`: a day. Any
/// longer is a mistake, and a bound keeps deadline arithmetic in range.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// The largest `--max-requests` and `--journal-max-rows`: far more than
/// any use, and far from overflowing when jitter or slack is added.
pub const MAX_COUNT: u64 = 1_000_000_000_000;
/// The largest `--max-requests-jitter`.
pub const MAX_JITTER: u64 = 1_000_000_000;
/// The longest `--dedup-window`: an hour (nfsd keeps replies 2 minutes).
pub const MAX_DEDUP_WINDOW: Duration = Duration::from_secs(3600);
/// The most `--dedup-entries`.
pub const MAX_DEDUP_ENTRIES: u32 = 4_194_304;
/// The fewest and most `--dedup-bytes`: room for one largest reply, and 1 GiB.
pub const DEDUP_BYTES: std::ops::RangeInclusive<u64> = 65_536..=(1 << 30);

/// udp-pool: a UDP server that answers every datagram through a fixed pool
/// of worker processes; each reply names the PID of the worker that made it.
///
/// Signals: TERM/INT drain and stop (twice: stop at once), QUIT stops at
/// once, HUP replaces every worker, TTIN/TTOU add/remove one worker, USR2
/// replaces the master (the `master` executable found then takes over the
/// socket; nothing is lost).
///
/// Under systemd: a socket passed with LISTEN_FDS is served instead of
/// --bind, and NOTIFY_SOCKET gets READY=1, RELOADING=1, MAINPID and
/// STOPPING=1 (see contrib/systemd).
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

    /// A worker whose oldest request is older than this is killed; its requests get `timeout`
    /// (at most a day).
    #[arg(long, default_value_t = 30_000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT.as_millis() as u64))]
    pub request_timeout_ms: u64,

    /// On TERM/INT, how long workers may take to answer what they hold before they are killed
    /// (at most a day; fractions allowed).
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = parse_graceful_timeout)]
    pub graceful_timeout: Duration,

    /// On USR2, how long the new master may take to be ready (its workers
    /// up) before it is killed and this one keeps serving (fractions allowed).
    #[arg(long, default_value = "10", value_name = "SECONDS", value_parser = parse_handover_timeout)]
    pub handover_timeout: Duration,

    /// A worker retires after this many requests and is replaced (0: never). 1 gives the
    /// lecture's one-process-per-request server.
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u64).range(0..=MAX_COUNT))]
    pub max_requests: u64,

    /// Adds a random 0..=N to each worker's --max-requests, so workers do not all retire at once.
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u64).range(0..=MAX_JITTER))]
    pub max_requests_jitter: u64,

    /// Lets `{"op":"crash"}` abort the worker that gets it (for testing recovery).
    #[arg(long)]
    pub enable_fault_injection: bool,

    /// Sets SO_REUSEPORT on the socket: several masters may serve the same
    /// address, the kernel spreading clients over them by their address.
    #[arg(long)]
    pub reuse_port: bool,

    /// The SQLite journal of requests and workers; `none` turns it off.
    #[arg(long, default_value = "udp-pool-journal.db", value_name = "PATH|none",
          value_parser = NonEmptyStringValueParser::new())]
    pub journal: String,

    /// Rows of the `requests` table kept; older ones are deleted in batches.
    #[arg(long, default_value_t = 1_000_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
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

    /// How long the reply to a JSON request with an `id` is kept (seconds,
    /// fractions allowed; at most an hour): a retry from the same address
    /// with the same id and bytes gets it again instead of running twice,
    /// and one that comes while the request runs is dropped. 0 turns this
    /// duplicate request cache off.
    #[arg(long, default_value = "5", value_name = "SECONDS", value_parser = parse_dedup_window)]
    pub dedup_window: Duration,

    /// Requests the duplicate request cache holds at most, in progress or
    /// answered; the oldest go first.
    #[arg(long, default_value_t = 16_384, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=MAX_DEDUP_ENTRIES as i64))]
    pub dedup_entries: u32,

    /// Bytes of ids and replies the duplicate request cache holds at most
    /// (64 KiB to 1 GiB); the oldest go first.
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(DEDUP_BYTES))]
    pub dedup_bytes: u64,

    /// Workers run as this user (a name, or a numeric ID), after the master
    /// has bound the socket; needs a root master. Without it, a root master
    /// warns that its workers run as root.
    #[arg(long, value_name = "NAME", value_parser = NonEmptyStringValueParser::new())]
    pub user: Option<String>,

    /// Workers run with this group [default: the --user's primary group].
    #[arg(long, value_name = "NAME", requires = "user",
          value_parser = NonEmptyStringValueParser::new())]
    pub group: Option<String>,

    /// A worker's address space, in MiB (RLIMIT_AS); 0: unlimited. A worker
    /// that reaches it fails to allocate, dies, and is replaced.
    #[arg(long, default_value_t = DEFAULT_WORKER_MEMORY_MIB, value_name = "MIB",
          value_parser = parse_worker_memory)]
    pub worker_memory_limit: u64,

    /// Workers run without their seccomp filter (which otherwise allows
    /// only the system calls a started worker needs, and kills it for any
    /// other).
    #[arg(long)]
    pub no_seccomp: bool,

    /// How far ahead of this master's clock an HLC stamp from elsewhere (a
    /// request's "hlc" causal link) may be; one further ahead is refused
    /// and counted. At least the largest clock difference between servers.
    #[arg(long, default_value_t = crate::clock::DEFAULT_MAX_DELTA.as_millis() as u64,
          value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..=crate::clock::MAX_MAX_DELTA_MS))]
    pub hlc_max_delta_ms: u64,

    /// Testing only: shifts this master's wall clock (its HLC's physical
    /// time and the journal's times) by MS milliseconds, to simulate a
    /// server whose clock is wrong.
    #[arg(long, hide = true, default_value_t = 0, value_name = "MS", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i64).range(-crate::clock::MAX_SKEW_MS..=crate::clock::MAX_SKEW_MS))]
    pub debug_clock_skew_ms: i64,

    /// Form a group with other servers over this private UDP port (SWIM
    /// membership, an elected coordinator, a numbered view; see
    /// docs/CLUSTER.md). Without it the master runs alone and opens nothing more.
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Cluster")]
    pub cluster_addr: Option<SocketAddr>,

    /// Join the group through this member's cluster port (repeat for
    /// several seeds; any one that answers is enough). Without --join, the
    /// master founds a new group.
    #[arg(
        long = "join",
        value_name = "ADDR:PORT",
        requires = "cluster_addr",
        help_heading = "Cluster"
    )]
    pub join: Vec<SocketAddr>,

    /// The cluster's timers: `lan` (SWIM probes every 1 s, elections in
    /// 1-2 s) or `test` (probes every 300 ms, elections in 0.5-1 s).
    #[arg(long, value_enum, default_value_t = ClusterTiming::Lan, value_name = "PROFILE",
          requires = "cluster_addr", help_heading = "Cluster")]
    pub cluster_timing: ClusterTiming,

    /// A file holding the group's shared key (at least 16 bytes, readable
    /// by its owner only): every cluster datagram carries its MAC, and
    /// datagrams without it are dropped unread.
    #[arg(
        long,
        value_name = "FILE",
        requires = "cluster_addr",
        help_heading = "Cluster"
    )]
    pub cluster_key: Option<PathBuf>,

    /// Voters the coordinator keeps (the others are learners: they get the
    /// view but do not vote); a learner is promoted when a voter stays dead.
    #[arg(long, default_value_t = 3, value_name = "N", requires = "cluster_addr",
          value_parser = clap::value_parser!(u8).range(1..=7), help_heading = "Cluster")]
    pub voters: u8,
}

/// `--cluster-timing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClusterTiming {
    /// Production timers.
    Lan,
    /// Short timers for tests.
    Test,
}

/// Parses `--worker-memory-limit`: 0, or [`MIN_WORKER_MEMORY_MIB`] to
/// [`MAX_WORKER_MEMORY_MIB`].
fn parse_worker_memory(text: &str) -> Result<u64, String> {
    let range = MIN_WORKER_MEMORY_MIB..=MAX_WORKER_MEMORY_MIB;
    match text.parse::<u64>() {
        Ok(mib) if mib == 0 || range.contains(&mib) => Ok(mib),
        _ => Err(format!(
            "expected 0 (unlimited) or {} to {} MiB",
            range.start(),
            range.end()
        )),
    }
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

/// Parses `--dedup-window`: seconds, 0 to [`MAX_DEDUP_WINDOW`].
fn parse_dedup_window(text: &str) -> Result<Duration, String> {
    parse_seconds(text, MAX_DEDUP_WINDOW, "an hour")
}

/// Parses `--graceful-timeout`: seconds, 0 to [`MAX_TIMEOUT`].
fn parse_graceful_timeout(text: &str) -> Result<Duration, String> {
    parse_seconds(text, MAX_TIMEOUT, "a day")
}

/// Seconds, fractions allowed, from 0 to `max` (`max_name` in words).
fn parse_seconds(text: &str, max: Duration, max_name: &str) -> Result<Duration, String> {
    let max = max.as_secs_f64();
    let seconds: f64 = text
        .parse()
        .map_err(|_| "expected a number of seconds, like 30 or 0.5".to_owned())?;
    // Also refuses NaN and infinities, which no range contains.
    if !(0.0..=max).contains(&seconds) {
        return Err(format!("must be between 0 and {max} seconds ({max_name})"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses `--handover-timeout`: seconds, more than 0, at most [`MAX_TIMEOUT`].
fn parse_handover_timeout(text: &str) -> Result<Duration, String> {
    match parse_graceful_timeout(text) {
        Ok(d) if d.is_zero() => Err("must be more than 0 seconds".to_owned()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("master").chain(args.iter().copied()))
    }

    /// `option value` parses or not, for each of `values`.
    #[track_caller]
    fn edges(option: &str, ok: &[&str], refused: &[&str]) {
        for v in ok {
            let arg = format!("{option}={v}");
            if let Err(e) = parse(&[&arg]) {
                panic!("{arg} should parse: {e}");
            }
        }
        for v in refused {
            let arg = format!("{option}={v}");
            assert!(parse(&[&arg]).is_err(), "{arg} should be refused");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.serve.graceful_timeout, Duration::from_secs(30));
        assert_eq!(cli.serve.workers, 4);
    }

    #[test]
    fn every_number_has_its_bounds() {
        edges("--workers", &["0", "512"], &["-1", "513", "x"]);
        edges("--max-datagram", &["1", "65507"], &["0", "65508"]);
        edges("--max-inflight", &["1", "65536"], &["0", "65537"]);
        edges(
            "--request-timeout-ms",
            &["1", "86400000"],
            &["0", "86400001", "18446744073709551615"],
        );
        edges(
            "--max-requests",
            &["0", "1", "1000000000000"],
            &["1000000000001", "18446744073709551615"],
        );
        edges(
            "--max-requests-jitter",
            &["0", "1000000000"],
            &["1000000001", "18446744073709551615"],
        );
        edges(
            "--journal-max-rows",
            &["1", "1000000000000"],
            &["0", "1000000000001", "18446744073709551615"],
        );
        edges("--journal", &["none", "j.db"], &[""]);
        edges(
            "--worker-memory-limit",
            &["0", "32", "256", "1048576"],
            &["-1", "1", "31", "1048577", "18446744073709551615", "x", ""],
        );
        edges(
            "--bind",
            &["127.0.0.1:0", "[::1]:65535"],
            &["127.0.0.1:65536", "x"],
        );
        edges(
            "--hlc-max-delta-ms",
            &["1", "500", "3600000"],
            &["0", "-1", "3600001", "x"],
        );
        edges(
            "--debug-clock-skew-ms",
            &["0", "-2000", "2000", "-86400000", "86400000"],
            &["-86400001", "86400001", "x", ""],
        );
        let cli = parse(&["--debug-clock-skew-ms", "-2000"]).unwrap();
        assert_eq!(cli.serve.debug_clock_skew_ms, -2000);
        assert_eq!(parse(&[]).unwrap().serve.hlc_max_delta_ms, 500);
    }

    #[test]
    fn least_privilege_options() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.serve.user, None);
        assert_eq!(cli.serve.worker_memory_limit, DEFAULT_WORKER_MEMORY_MIB);
        assert!(!cli.serve.no_seccomp);
        let cli = parse(&["--user", "nobody", "--group", "nogroup", "--no-seccomp"]).unwrap();
        assert_eq!(cli.serve.user.as_deref(), Some("nobody"));
        assert_eq!(cli.serve.group.as_deref(), Some("nogroup"));
        assert!(cli.serve.no_seccomp);
        assert!(
            parse(&["--group", "nogroup"]).is_err(),
            "--group needs --user"
        );
        assert!(parse(&["--user", ""]).is_err());
        let e = parse(&["--worker-memory-limit", "8"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 (unlimited) or 32 to 1048576 MiB"), "{e}");
    }

    #[test]
    fn graceful_timeout_is_seconds_up_to_a_day() {
        edges(
            "--graceful-timeout",
            &["0", "-0", "0.001", "30", "86400"],
            &["-1", "86400.001", "1e20", "inf", "NaN", "", "30s"],
        );
        let half = parse(&["--graceful-timeout", "0.5"]).unwrap();
        assert_eq!(half.serve.graceful_timeout, Duration::from_millis(500));
        let day = parse(&["--graceful-timeout", "86400"]).unwrap();
        assert_eq!(day.serve.graceful_timeout, MAX_TIMEOUT);
        edges(
            "--handover-timeout",
            &["0.001", "10", "86400"],
            &["0", "-1", "86400.001", "x", ""],
        );
        assert_eq!(
            parse(&[]).unwrap().serve.handover_timeout,
            Duration::from_secs(10)
        );
        let e = parse(&["--graceful-timeout", "1e20"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 0 and 86400 seconds"), "{e}");
    }

    #[test]
    fn the_duplicate_request_cache_has_its_bounds() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.serve.dedup_window, Duration::from_secs(5));
        assert_eq!(
            (cli.serve.dedup_entries, cli.serve.dedup_bytes),
            (16_384, 8 << 20)
        );
        edges(
            "--dedup-window",
            &["0", "0.25", "5", "3600"],
            &["-1", "3600.5", "5s", "NaN", ""],
        );
        edges("--dedup-entries", &["1", "4194304"], &["0", "4194305", "x"]);
        edges(
            "--dedup-bytes",
            &["65536", "1073741824"],
            &["65535", "1073741825", "8MiB"],
        );
        let e = parse(&["--dedup-window", "7200"]).unwrap_err().to_string();
        assert!(e.contains("between 0 and 3600 seconds (an hour)"), "{e}");
    }

    #[test]
    fn cluster_options_need_a_cluster_address() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.serve.cluster_addr, None);
        assert!(cli.serve.join.is_empty());
        assert!(parse(&["--join", "127.0.0.1:7000"]).is_err());
        assert!(parse(&["--cluster-timing", "test"]).is_err());
        let cli = parse(&[
            "--cluster-addr",
            "127.0.0.2:7000",
            "--join",
            "127.0.0.1:7000",
            "--join",
            "127.0.0.3:7000",
            "--cluster-timing",
            "test",
        ])
        .unwrap();
        assert_eq!(cli.serve.join.len(), 2);
        assert_eq!(cli.serve.cluster_timing, ClusterTiming::Test);
        assert_eq!(cli.serve.voters, 3);
        edges("--cluster-addr", &["127.0.0.1:7000"], &["7000", "x"]);
        assert!(parse(&["--cluster-addr", "127.0.0.1:1", "--voters", "0"]).is_err());
        assert!(parse(&["--cluster-addr", "127.0.0.1:1", "--voters", "8"]).is_err());
    }

    #[test]
    fn report_takes_its_own_options() {
        let cli = parse(&["report", "--journal", "j.db", "--since", "1h", "--json"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Report(r)) if r.json));
        assert!(parse(&["report"]).is_err(), "--journal is required");
        let cli = parse(&[
            "report",
            "--journal",
            "a.db",
            "--journal",
            "b.db",
            "--rows",
            "10",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Report(r)) => {
                assert_eq!(r.journal.len(), 2);
                assert_eq!((r.rows, r.timeline), (10, 50));
            }
            other => panic!("{other:?}"),
        }
    }
}
