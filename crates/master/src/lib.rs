//! The udp-pool master: binds one UDP socket, supervises a fixed pool of
//! `worker` processes, hands each datagram to one of them over a pipe, and
//! keeps the SQLite journal of what happened.
//!
//! # Layout
//! * [`cli`]: the command line.
//! * [`arbiter`]: the event loop (gunicorn's arbiter, nginx's master cycle)
//!   and its steps: read datagrams, dispatch, reap, time out, respawn.
//! * [`pool`]: a worker slot and the requests it holds, and the pure
//!   decisions over them (dispatch, the pool plan, deadlines, settling).
//! * [`backoff`]: crash-loop detection and the respawn back-off.
//! * [`clock`]: the hybrid logical clock (`uhlc`) that stamps the journal
//!   and orders several servers' journals causally.
//! * [`exit`]: how a worker's life ended (exit status and reason).
//! * [`guard`]: trusted sources, the amplification bound, the rate limit.
//! * [`dedup`]: the duplicate request cache (each request answered at most
//!   once: retries get the kept reply).
//! * [`ratelimit`]: per-prefix token buckets in a table of fixed size.
//! * [`privileges`]: the user, group and limits workers run with.
//! * [`spawn`]: fork and exec of one worker with its pipes and confinement.
//! * [`udp`]: the server socket: bound, or inherited and checked.
//! * [`replace`]: where the socket comes from (`--bind`, systemd's
//!   `LISTEN_FDS`, the master replaced on `USR2`) and the hand-over from
//!   an old master to a new one.
//! * [`notify`]: `sd_notify` messages to the service manager.
//! * [`signals`]: signals through a signalfd.
//! * [`ledger`]: counters, journal rows, and the master's own replies.
//! * [`journal`]: the SQLite journal and its writer thread.
//! * [`report`]: `master report`.
//! * [`group`]: a group of servers (`--cluster-addr`): the cluster
//!   thread's options, its life, and the `members` reply.

pub mod arbiter;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod dedup;
pub mod exit;
pub mod group;
pub mod guard;
pub mod journal;
pub mod ledger;
pub mod notify;
pub mod pool;
pub mod privileges;
pub mod ratelimit;
pub mod replace;
pub mod report;
pub mod signals;
pub mod spawn;
pub mod udp;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

/// Serves until stopped by a signal.
///
/// # Errors
/// When the server cannot start (socket, journal, workers) or its loop fails.
pub fn serve(args: &cli::ServeArgs) -> anyhow::Result<()> {
    // SAFETY: the master has one thread until `Arbiter::new` starts the
    // journal's writer, so changing the environment here races nothing.
    let listener = unsafe { replace::take_listener(args.bind, args.reuse_port) }?;
    let worker_path = worker_path(args)?;
    let credentials = privileges::resolve(args.user.as_deref(), args.group.as_deref())?;
    let seccomp = !args.no_seccomp && protocol::handoff::SECCOMP_AVAILABLE;
    let clock = clock::Clock::for_master(
        args.debug_clock_skew_ms,
        Duration::from_millis(args.hlc_max_delta_ms),
    )?;
    if args.debug_clock_skew_ms != 0 {
        log::warn!(
            "--debug-clock-skew-ms {}: this master's clock is deliberately wrong (for testing)",
            args.debug_clock_skew_ms
        );
    }
    if !args.no_seccomp && !seccomp && args.workers > 0 {
        log::warn!(
            "workers run without a seccomp filter: this build's allow-list is for x86_64 \
             and aarch64 Linux, not {}",
            std::env::consts::ARCH
        );
    }
    let cfg = arbiter::Config {
        bind: args.bind,
        reuse_port: args.reuse_port,
        master_path: replace::own_executable()?,
        master_args: replace::own_arguments(),
        handover_timeout: args.handover_timeout,
        workers: usize::from(args.workers),
        worker_path,
        max_datagram: args.max_datagram as usize,
        max_inflight: args.max_inflight as usize,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        graceful_timeout: args.graceful_timeout,
        max_requests: args.max_requests,
        max_requests_jitter: args.max_requests_jitter,
        fault_injection: args.enable_fault_injection,
        journal: (args.journal != "none").then(|| PathBuf::from(&args.journal)),
        journal_max_rows: args.journal_max_rows,
        trusted: args.trusted.iter().flatten().copied().collect(),
        amplification_factor: args.amplification_factor,
        rate_limit: args.rate_limit,
        rate_limit_slip: args.rate_limit_slip,
        dedup: dedup::Limits {
            window: args.dedup_window,
            entries: args.dedup_entries as usize,
            bytes: args.dedup_bytes as usize,
            // Past every path a request can take: a timeout, a re-dispatch
            // and a second timeout.
            stale_after: 2 * Duration::from_millis(args.request_timeout_ms)
                + args.dedup_window
                + Duration::from_secs(1),
        },
        confinement: privileges::Confinement {
            credentials,
            memory_limit: privileges::memory_limit(args.worker_memory_limit),
            seccomp,
        },
        group: group_options(args, clock.hlc())?,
        clock,
    };
    if cfg.workers == 0 && cfg.fault_injection {
        log::warn!(
            "--enable-fault-injection has no effect with --workers 0: the master never aborts"
        );
    }
    if cfg.workers == 0 && args.user.is_some() {
        log::warn!("--user has no effect with --workers 0: the master answers as itself");
    }
    let workers = cfg.workers;
    let arbiter = arbiter::Arbiter::new(cfg, listener)?;
    // After the socket is bound and the journal open: a master that cannot
    // start says only why.
    privileges::warn_if_root_without_user(args.user.as_deref(), workers);
    arbiter.run()
}

/// The group options (`--cluster-addr` and the rest), with the key read.
///
/// # Errors
/// When the cluster key cannot be used.
fn group_options(
    args: &cli::ServeArgs,
    hlc: &std::sync::Arc<uhlc::HLC>,
) -> anyhow::Result<Option<group::GroupOptions>> {
    let Some(cluster_addr) = args.cluster_addr else {
        return Ok(None);
    };
    let key = args
        .cluster_key
        .as_deref()
        .map(group::read_key)
        .transpose()?;
    if key.is_none() {
        log::warn!(
            "cluster port {cluster_addr} without --cluster-key: anyone who can reach it can \
             take part in the group; keep it on a private network (docs/CLUSTER.md)"
        );
    }
    Ok(Some(group::GroupOptions {
        cluster_addr,
        join: args.join.clone(),
        profile: match args.cluster_timing {
            cli::ClusterTiming::Lan => cluster::Profile::Lan,
            cli::ClusterTiming::Test => cluster::Profile::Test,
        },
        key,
        voters: usize::from(args.voters),
        // The master's own clock: the journal's stamps and the cluster's
        // are one causal order.
        hlc: std::sync::Arc::clone(hlc),
    }))
}

/// The worker executable: `--worker-path`, else `worker` next to the
/// running `master` (where `cargo build` and `cargo install --path .` put
/// both). Checked here, with what to do about it, so that a missing worker
/// is one clear line and not a failed spawn.
///
/// # Errors
/// When the master's own path is unknown, or (with a pool) the worker is
/// not a file.
fn worker_path(args: &cli::ServeArgs) -> anyhow::Result<PathBuf> {
    let (path, hint) = match &args.worker_path {
        Some(p) => (p.clone(), "check --worker-path"),
        None => {
            let exe = std::env::current_exe().context("cannot locate the master executable")?;
            (
                exe.with_file_name("worker"),
                "build both with `cargo build --release` at the repository's root, \
                 install both with `cargo install --path .`, or pass --worker-path",
            )
        }
    };
    if args.workers > 0 && !path.is_file() {
        bail!("worker executable {} not found: {hint}", path.display());
    }
    Ok(path)
}
