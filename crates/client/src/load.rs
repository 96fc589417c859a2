//! The load generator: the command line's plan, the `--processes` parent
//! that runs several load processes as children and merges their tallies,
//! and the SIGINT/SIGTERM handling; [`engine`] is one process's sockets and
//! poll loop.
//!
//! Every request is matched to its reply by id; a request without a reply
//! from any server it was tried at (each within `--timeout-ms`, after
//! `--retries`) counts as lost.

mod engine;

use std::io::{self, IsTerminal, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

pub use engine::run_flows;

use crate::addr;
use crate::cli::{LoadArgs, MAX_DURATION_S};
use crate::failover::{Policy, SkipRule};
use crate::mix::Mix;
use crate::report::{self, Setup, Tally};

/// How often the progress bar is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// What one load process does, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The servers, on this machine.
    pub servers: Vec<SocketAddr>,
    /// How sockets are spread over them.
    pub policy: Policy,
    /// This process's number among `--processes` (0 for a lone process).
    pub process_index: usize,
    /// Resends of a timed-out request to the same server.
    pub retries: u8,
    /// When a server is skipped.
    pub skip: SkipRule,
    /// Closed or open loop.
    pub pacing: Pacing,
    /// Sockets in this process.
    pub sockets: usize,
    /// When to stop sending.
    pub duration: Duration,
    /// Requests to send in this process, if bounded by count.
    pub requests: Option<u64>,
    /// What to send.
    pub mix: Mix,
    /// Milliseconds each sleep request asks for.
    pub sleep_ms: u64,
    /// How long each attempt waits for its reply.
    pub timeout: Duration,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// Keep this many requests outstanding per socket.
    Closed {
        /// Outstanding requests per socket.
        window: usize,
    },
    /// Send this many requests per second in this process, evenly spread
    /// over its sockets, whatever the replies do.
    Open {
        /// Requests per second in this process.
        rate: f64,
    },
}

/// Runs the `loadgen` command line: one load process, several as child
/// processes, or (with `--child`) one child that prints its raw tally.
///
/// # Errors
/// A bad address or option, a socket that cannot be set up, a child that
/// failed, or a report or plot that cannot be written.
pub fn run(args: &LoadArgs) -> Result<()> {
    // Load goes to this machine only, to every server named (or found).
    let servers = if args.discover.is_empty() || args.child {
        addr::resolve_servers(&args.servers, true)?
    } else {
        let timeout = Duration::from_millis(args.timeout_ms);
        crate::discover::discover(&args.discover, timeout, true)?.servers
    };
    install_stop_handler().context("installing the SIGINT/SIGTERM handler")?;
    let duration = match (args.duration, args.requests) {
        (Some(d), _) => d,
        (None, Some(_)) => MAX_DURATION_S,
        (None, None) => 5.0,
    };
    let processes = if args.child { 1 } else { args.processes };
    let plan = Plan {
        servers: servers.clone(),
        policy: args.policy,
        process_index: args.process_index,
        retries: args.retries,
        skip: SkipRule::default(),
        pacing: match args.rate {
            // A child is told the whole rate and --processes, so that what
            // it parses is what the user gave, bounds and all.
            Some(rate) => Pacing::Open {
                rate: rate / f64::from(args.processes),
            },
            None => Pacing::Closed {
                window: args.window as usize,
            },
        },
        sockets: args.sockets as usize,
        duration: Duration::from_secs_f64(duration),
        // A parent of --processes hands each child its share instead.
        requests: args.requests,
        mix: args.mix,
        sleep_ms: args.sleep_ms,
        timeout: Duration::from_millis(args.timeout_ms),
        progress: !args.quiet && !args.child && io::stderr().is_terminal(),
    };
    if args.child {
        let tally = run_flows(&plan)?;
        let mut out = io::stdout().lock();
        serde_json::to_writer(&mut out, &tally).context("writing the tally")?;
        writeln!(out).context("writing the tally")?;
        return Ok(());
    }
    let tally = if processes > 1 {
        run_processes(args, &plan, processes)?
    } else {
        run_flows(&plan)?
    };
    let setup = Setup {
        servers: servers.iter().map(SocketAddr::to_string).collect(),
        policy: args.policy.as_str(),
        retries: args.retries,
        mode: match plan.pacing {
            Pacing::Closed { .. } => "closed",
            Pacing::Open { .. } => "open",
        },
        window: args.rate.is_none().then_some(args.window),
        rate: args.rate,
        sockets: args.sockets,
        processes,
        mix: args.mix.to_string(),
        timeout_ms: args.timeout_ms,
    };
    let mut out = io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report::render_json(&setup, &tally))
            .context("writing the report")?;
        writeln!(out).context("writing the report")?;
    } else {
        write!(out, "{}", report::render_text(&setup, &tally)).context("writing the report")?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, crate::plot::render_svg(&setup, &tally))
            .with_context(|| format!("writing the plot {}", path.display()))?;
        if !args.json {
            writeln!(out, "plot        {}", path.display()).context("writing the report")?;
        }
    }
    if tally.sent > 0 && tally.answered == 0 {
        bail!(
            "{} requests sent and none answered: is a server listening on {}?",
            tally.sent,
            setup.servers.join(" or ")
        );
    }
    Ok(())
}

/// Runs `processes` copies of this load generator, each sending its share,
/// and merges their tallies.
fn run_processes(args: &LoadArgs, plan: &Plan, processes: u32) -> Result<Tally> {
    let exe = std::env::current_exe().context("finding the loadgen executable")?;
    let mut children: Vec<Child> = Vec::new();
    let total = args.requests;
    for i in 0..processes {
        let mut cmd = Command::new(&exe);
        cmd.arg("--child");
        for server in &plan.servers {
            cmd.args(["--server", &server.to_string()]);
        }
        cmd.args(["--policy", plan.policy.as_str()])
            .args(["--retries", &plan.retries.to_string()])
            .args(["--process-index", &i.to_string()])
            .args(["--sockets", &args.sockets.to_string()])
            .args(["--window", &args.window.to_string()])
            .args(["--duration", &plan.duration.as_secs_f64().to_string()])
            .args(["--mix", &args.mix.to_string()])
            .args(["--sleep-ms", &args.sleep_ms.to_string()])
            .args(["--timeout-ms", &args.timeout_ms.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(rate) = args.rate {
            cmd.args(["--rate", &rate.to_string()])
                .args(["--processes", &processes.to_string()]);
        }
        if let Some(n) = total {
            let mine = share(n, processes, i);
            if mine == 0 {
                continue;
            }
            cmd.args(["--requests", &mine.to_string()]);
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_children(&mut children);
                return Err(e).context("starting a load process");
            }
        }
    }
    // Every child stops by itself after its duration and drain (every
    // attempt at every server); past this deadline something is wrong, and
    // the children are killed.
    let attempts = (u32::from(plan.retries) + 1) * plan.servers.len() as u32;
    let deadline =
        Instant::now() + plan.duration + plan.timeout * (attempts + 1) + Duration::from_secs(10);
    let bar = plan.progress.then(|| time_bar(plan.duration));
    let start = Instant::now();
    // Read every child's output while it runs: a tally larger than a pipe
    // buffer would otherwise block the child before it exits.
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| (drain(c.stdout.take()), drain(c.stderr.take())))
        .collect();
    let mut statuses = vec![None; children.len()];
    let mut forwarded = false;
    while statuses.iter().any(Option::is_none) {
        if stop_requested() && !forwarded {
            // Ask every child to stop sending and report what it has.
            forwarded = true;
            for c in &children {
                if let Ok(pid) = i32::try_from(c.id()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
                }
            }
        }
        for (c, s) in children.iter_mut().zip(statuses.iter_mut()) {
            if s.is_none() {
                *s = c.try_wait().context("waiting for a load process")?;
            }
        }
        if Instant::now() > deadline {
            stop_children(&mut children);
            bail!("load processes did not finish in time");
        }
        if let Some(b) = &bar {
            b.set_position(start.elapsed().as_millis() as u64);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut tally = Tally::default();
    for ((child, status), (stdout, stderr)) in children.iter().zip(statuses).zip(readers) {
        let stdout = stdout.join().unwrap_or_default();
        let stderr = stderr.join().unwrap_or_default();
        let status = status.expect("every child was waited for");
        let line = stdout.lines().last().unwrap_or("");
        match serde_json::from_str::<Tally>(line) {
            Ok(t) if status.success() => tally.merge(&t),
            _ => bail!(
                "load process {} failed ({status}): {}",
                child.id(),
                stderr.trim()
            ),
        }
        // A child's warnings are worth passing on.
        if !stderr.is_empty() {
            eprint!("{stderr}");
        }
    }
    Ok(tally)
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut text);
        }
        text
    })
}

/// Child `i`'s share of `total` requests split over `processes`.
fn share(total: u64, processes: u32, i: u32) -> u64 {
    let p = u64::from(processes);
    total / p + u64::from(u64::from(i) < total % p)
}

fn stop_children(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn time_bar(duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:40}] {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Set by SIGINT or SIGTERM: stop sending, wait for the replies still due,
/// and report.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// The first SIGINT or SIGTERM ends the sending early (the report still
/// comes); a second one kills as usual (`SA_RESETHAND`).
fn install_stop_handler() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_stop),
        SaFlags::SA_RESETHAND,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        sigaction(Signal::SIGINT, &action)?;
        sigaction(Signal::SIGTERM, &action)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_shared_out_exactly() {
        let shares: Vec<u64> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(shares, [4, 3, 3]);
        assert_eq!(share(2, 4, 3), 0);
    }
}
