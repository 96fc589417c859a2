//! The load generator's engine: K connected UDP sockets ([`Flow`]s) driven
//! by one poll loop, in closed loop (a window of outstanding requests per
//! socket) or open loop (a fixed send schedule, wrk2-style), plus the
//! `--processes` parent that runs several such loops as child processes and
//! merges their tallies.
//!
//! Every request carries a per-socket `u64` id (text requests encode it in
//! the number they square), so every reply is matched to its request:
//! answered, duplicate, late, wrong or unmatched. A request without a reply
//! within `--timeout-ms` counts as lost.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use log::{debug, warn};
use netio::{ConnectedRecvBatch, ConnectedSendBatch};
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::Pid;

use crate::addr;
use crate::cli::{LoadArgs, MAX_DURATION_S};
use crate::mix::Mix;
use crate::report::{self, Setup, Tally};
use crate::wire::{self, Kind, Matched};

/// Datagrams per `sendmmsg` or `recvmmsg`.
const BATCH: usize = 64;

/// Room for one request; the longest load request is under 100 bytes.
const SEND_SLOT: usize = 128;

/// Room for one reply; larger replies are counted as unmatched.
const RECV_SLOT: usize = 2048;

/// Receive batches taken from one socket before the loop turns to sending.
const MAX_RECV_ROUNDS: usize = 8;

/// Open loop: how far ahead of their intended time requests may go, and so
/// the shortest sleep between sends. A wake-up (a timer and two context
/// switches) costs more than a send, several times more in a VM; at rates
/// above one request per tick, the requests due within a tick go together
/// in one batch, up to a tick early.
const OPEN_LOOP_TICK_NS: u64 = 100_000;

/// Socket buffer sizes asked for (the kernel may cap them at its maximum).
const RCVBUF: usize = 8 << 20;
const SNDBUF: usize = 1 << 20;

/// How often the progress bar is redrawn.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// What one load process does, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The server, on this machine.
    pub server: SocketAddr,
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
    /// When an unanswered request counts as lost.
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
    let server = addr::resolve_loopback(&args.server)?;
    install_stop_handler().context("installing the SIGINT/SIGTERM handler")?;
    let duration = match (args.duration, args.requests) {
        (Some(d), _) => d,
        (None, Some(_)) => MAX_DURATION_S,
        (None, None) => 5.0,
    };
    let processes = if args.child { 1 } else { args.processes };
    let plan = Plan {
        server,
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
        server: server.to_string(),
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
            "{} requests sent and none answered: is a server listening on {server}?",
            tally.sent
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
        cmd.arg("--child")
            .args(["--server", &plan.server.to_string()])
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
    // Every child stops by itself after its duration and drain; past this
    // deadline something is wrong, and the children are killed.
    let deadline = Instant::now() + plan.duration + plan.timeout * 2 + Duration::from_secs(10);
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

/// One request on the wire, in a ring slot indexed by its id.
#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u64,
    state: State,
    kind: Kind,
    arg: i64,
    sent_ns: u64,
    intended_ns: u64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            id: 0,
            state: State::Free,
            kind: Kind::Square,
            arg: 0,
            sent_ns: 0,
            intended_ns: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Outstanding,
    Answered,
    Lost,
    Late,
}

/// A small, fast, seedable PRNG (xorshift64*): plenty for choosing request
/// kinds and numbers.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Squares are asked of numbers in ±SQUARE_RANGE, whose squares an `i128`
/// holds exactly (and which still need more than 32 bits).
const SQUARE_RANGE: i64 = 4_000_000_000_000;

/// One connected socket and the requests sent on it.
struct Flow {
    socket: UdpSocket,
    /// `"Hi <our address>. This is server `, as a greeting to us starts.
    greeting_prefix: String,
    slots: Vec<Slot>,
    mask: u64,
    /// Requests still outstanding when the ring came round to their slot
    /// again (slow replies at a high rate), by id.
    stragglers: BTreeMap<u64, Slot>,
    /// The id the next request gets (ids start at 1).
    next_id: u64,
    /// The lowest id that may still be outstanding.
    oldest: u64,
    outstanding: usize,
    rng: Rng,
    /// Our pid, as hello requests carry it.
    pid: i64,
    /// Open loop: when request `i` (counting from 0) should go, in ns since
    /// the start: `phase_ns + i * interval_ns`.
    phase_ns: f64,
    interval_ns: f64,
    /// The last send found the socket buffer full: wait for POLLOUT.
    blocked: bool,
    /// Sent-but-uncommitted request descriptions, parallel to the batch slots.
    pending: [(Kind, i64); BATCH],
}

impl Flow {
    fn new(plan: &Plan, index: usize, capacity: usize) -> Result<Flow> {
        let socket =
            UdpSocket::bind(addr::local_wildcard(plan.server)).context("binding a load socket")?;
        socket
            .connect(plan.server)
            .with_context(|| format!("connecting a load socket to {}", plan.server))?;
        socket
            .set_nonblocking(true)
            .context("making a load socket non-blocking")?;
        // Bigger buffers absorb bursts; the kernel caps them at rmem_max.
        if let Err(e) = setsockopt(&socket, sockopt::RcvBuf, &RCVBUF) {
            debug!("SO_RCVBUF: {e}");
        }
        if let Err(e) = setsockopt(&socket, sockopt::SndBuf, &SNDBUF) {
            debug!("SO_SNDBUF: {e}");
        }
        // Kernel arrival times make latency exact however late the loop
        // gets round to reading a reply.
        if let Err(e) = setsockopt(&socket, sockopt::ReceiveTimestampns, &true) {
            debug!("SO_TIMESTAMPNS: {e}");
        }
        let local = socket
            .local_addr()
            .context("reading a load socket's address")?;
        let (phase_ns, interval_ns) = match plan.pacing {
            Pacing::Open { rate } => {
                let per_socket = rate / plan.sockets as f64;
                let interval = 1e9 / per_socket;
                // Stagger the sockets so their sends interleave evenly.
                (interval * index as f64 / plan.sockets as f64, interval)
            }
            Pacing::Closed { .. } => (0.0, 0.0),
        };
        let pid = std::process::id();
        let seed = (u64::from(pid) << 32) ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Ok(Flow {
            socket,
            greeting_prefix: format!("\"Hi {local}. This is server "),
            slots: vec![Slot::default(); capacity],
            mask: capacity as u64 - 1,
            stragglers: BTreeMap::new(),
            next_id: 1,
            oldest: 1,
            outstanding: 0,
            rng: Rng(seed | 1),
            pid: i64::from(pid),
            phase_ns,
            interval_ns,
            blocked: false,
            pending: [(Kind::Square, 0); BATCH],
        })
    }

    fn intended_ns(&self, id: u64) -> u64 {
        (self.phase_ns + (id - 1) as f64 * self.interval_ns) as u64
    }

    /// Sends what is due: up to the window in closed loop, everything whose
    /// time has come in open loop; at most `budget`. Returns how many went.
    fn send(
        &mut self,
        plan: &Plan,
        batch: &mut ConnectedSendBatch,
        now_ns: u64,
        budget: u64,
        tally: &mut Tally,
    ) -> u64 {
        let mut sent = 0;
        while sent < budget {
            let due = match plan.pacing {
                Pacing::Closed { window } => window.saturating_sub(self.outstanding),
                Pacing::Open { .. } => {
                    // Everything due within the next tick goes now, so
                    // that the loop wakes at most once per tick.
                    let horizon = now_ns + OPEN_LOOP_TICK_NS;
                    let mut n = 0;
                    while n < BATCH && self.intended_ns(self.next_id + n as u64) <= horizon {
                        n += 1;
                    }
                    n
                }
            };
            let n = due.min(BATCH).min((budget - sent) as usize);
            if n == 0 {
                break;
            }
            for i in 0..n {
                let id = self.next_id + i as u64;
                let kind = plan.mix.pick(self.rng.next());
                let arg = match kind {
                    Kind::Square => {
                        (self.rng.next() % (2 * SQUARE_RANGE as u64 + 1)) as i64 - SQUARE_RANGE
                    }
                    Kind::Hello => self.pid,
                    Kind::Sleep => plan.sleep_ms as i64,
                    Kind::Text => 0,
                };
                self.pending[i] = (kind, arg);
                let len = wire::render_load_request(kind, id, arg, batch.slot_mut(i));
                batch.set_len(i, len);
            }
            let mut refusals = 0;
            let went = loop {
                match batch.send(self.socket.as_fd(), n) {
                    Ok(k) => break k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.blocked = true;
                        break 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        // A port-unreachable left by an earlier datagram:
                        // reporting it cleared it, so send the batch again.
                        tally.refused += 1;
                        refusals += 1;
                        if refusals > 2 {
                            break 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        warn!("send: {e}");
                        break 0;
                    }
                }
            };
            for i in 0..went {
                let id = self.next_id;
                self.next_id += 1;
                // Latency counts from the intended time when the send ran
                // late (no coordinated omission), from the send itself when
                // it went ahead of time (no credit for sending early).
                let intended_ns = match plan.pacing {
                    Pacing::Open { .. } => self.intended_ns(id).min(now_ns),
                    Pacing::Closed { .. } => now_ns,
                };
                tally.max_send_lag_ns = tally
                    .max_send_lag_ns
                    .max(now_ns.saturating_sub(intended_ns));
                let slot = &mut self.slots[(id & self.mask) as usize];
                if slot.state == State::Outstanding {
                    // The ring wrapped around a request that is still
                    // waiting: it moves aside until answered or expired.
                    self.stragglers.insert(slot.id, *slot);
                }
                let (kind, arg) = self.pending[i];
                *slot = Slot {
                    id,
                    state: State::Outstanding,
                    kind,
                    arg,
                    sent_ns: now_ns,
                    intended_ns,
                };
                self.outstanding += 1;
            }
            tally.sent += went as u64;
            sent += went as u64;
            if went < n {
                break;
            }
        }
        sent
    }

    /// Takes every queued reply (a bounded number of batches) and matches
    /// it. Returns how many datagrams arrived, and whether more may be queued.
    fn receive(
        &mut self,
        batch: &mut ConnectedRecvBatch,
        clock: &Clock,
        tally: &mut Tally,
    ) -> (usize, bool) {
        let mut got = 0;
        for _ in 0..MAX_RECV_ROUNDS {
            let n = match batch.recv(self.socket.as_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tally.refused += 1;
                    continue;
                }
                Err(e) => {
                    warn!("receive: {e}");
                    return (got, false);
                }
            };
            let now_ns = clock.now_ns();
            for i in 0..n {
                let at_ns = batch
                    .arrival_ns(i)
                    .map_or(now_ns, |t| clock.since_start(t).min(now_ns));
                match batch.get(i) {
                    Some(d) => self.settle(d, at_ns, tally),
                    None => tally.unmatched += 1,
                }
            }
            got += n;
            if n < BATCH {
                return (got, false);
            }
        }
        // Rounds used up: more may be waiting.
        (got, true)
    }

    /// Matches one reply to its request and counts it.
    fn settle(&mut self, datagram: &[u8], now_ns: u64, tally: &mut Tally) {
        let (id, reply) = match wire::match_reply(datagram) {
            Matched::Json { id, reply } => (id, Some(reply)),
            Matched::Text { id } => (id, None),
            Matched::TextError(code) => {
                tally.error(code);
                tally.unmatched += 1;
                return;
            }
            Matched::Unmatched => {
                tally.unmatched += 1;
                return;
            }
        };
        if id == 0 || id >= self.next_id {
            tally.unmatched += 1;
            return;
        }
        let ring = &mut self.slots[(id & self.mask) as usize];
        let slot = if ring.id == id {
            ring
        } else if let Some(s) = self.stragglers.get_mut(&id) {
            s
        } else {
            // Expired, and its slot reused since: a very late reply.
            tally.late += 1;
            return;
        };
        match slot.state {
            State::Outstanding => {}
            State::Answered | State::Late => {
                tally.duplicates += 1;
                return;
            }
            State::Lost => {
                slot.state = State::Late;
                tally.late += 1;
                return;
            }
            State::Free => {
                tally.unmatched += 1;
                return;
            }
        }
        slot.state = State::Answered;
        self.outstanding -= 1;
        tally.answer(now_ns, now_ns.saturating_sub(slot.intended_ns));
        if self.interval_ns > 0.0 {
            // Open loop: also from the actual send, to tell the server's
            // delays from the load generator's own.
            tally.service(now_ns.saturating_sub(slot.sent_ns));
        }
        match reply {
            None if slot.kind == Kind::Text => {}
            None => tally.wrong += 1,
            Some(reply) => {
                if let Some(pid) = reply.worker_pid() {
                    tally.worker(pid);
                }
                if !reply.is_ok() {
                    tally.error(&reply.error_code().unwrap_or("unknown".into()));
                } else if slot.kind == Kind::Text
                    || !wire::reply_is_right(slot.kind, slot.arg, &reply, &self.greeting_prefix)
                {
                    tally.wrong += 1;
                }
            }
        }
    }

    /// Counts as lost every outstanding request sent at least `timeout_ns`
    /// ago. Returns when the next one would expire, if any is outstanding.
    fn expire(&mut self, now_ns: u64, timeout_ns: u64, tally: &mut Tally) -> Option<u64> {
        let mut next = None;
        while self.oldest < self.next_id {
            let slot = &mut self.slots[(self.oldest & self.mask) as usize];
            if slot.id == self.oldest && slot.state == State::Outstanding {
                let expires = slot.sent_ns + timeout_ns;
                if expires > now_ns {
                    next = Some(expires);
                    break;
                }
                slot.state = State::Lost;
                self.outstanding -= 1;
                tally.lost += 1;
            }
            self.oldest += 1;
        }
        // Stragglers are in id order, so in send order: the first is the oldest.
        while let Some(entry) = self.stragglers.first_entry() {
            let slot = entry.get();
            let expires = slot.sent_ns + timeout_ns;
            if expires > now_ns {
                next = Some(next.map_or(expires, |n: u64| n.min(expires)));
                break;
            }
            if slot.state == State::Outstanding {
                self.outstanding -= 1;
                tally.lost += 1;
            }
            entry.remove();
        }
        next
    }
}

/// Ring slots of one process, all sockets together (40 bytes each: 160 MiB).
const MAX_RING_SLOTS: usize = 1 << 22;
/// Ring slots of one socket, at least.
const MIN_RING_SLOTS: usize = 4096;

/// The ring size for each socket: room for the requests outstanding at
/// once in the usual case; slower ones move to the flow's stragglers. All
/// sockets' rings together stay within [`MAX_RING_SLOTS`] (or the minimum
/// per socket), whatever --window, --rate, --timeout-ms and --sockets
/// multiply to.
fn ring_capacity(plan: &Plan) -> usize {
    let need = match plan.pacing {
        Pacing::Closed { window } => window.saturating_mul(4),
        Pacing::Open { rate } => {
            (rate / plan.sockets as f64 * plan.timeout.as_secs_f64() * 2.0) as usize
        }
    };
    // Both powers of two, so the result is one and never above `most`.
    let most = (MAX_RING_SLOTS / plan.sockets.next_power_of_two()).max(MIN_RING_SLOTS);
    need.clamp(MIN_RING_SLOTS, most).next_power_of_two()
}

/// Runs one load process: its sockets, one poll loop, until the sending
/// is done and every request is answered or lost.
///
/// # Errors
/// When a socket cannot be set up or polling fails.
pub fn run_flows(plan: &Plan) -> Result<Tally> {
    // Wake-ups of the open loop should be as punctual as the kernel allows.
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let capacity = ring_capacity(plan);
    let mut flows = (0..plan.sockets)
        .map(|i| Flow::new(plan, i, capacity))
        .collect::<Result<Vec<_>>>()?;
    let mut send_batch = ConnectedSendBatch::new(BATCH, SEND_SLOT);
    let mut recv_batch = ConnectedRecvBatch::new(BATCH, RECV_SLOT);
    let mut tally = Tally::default();
    let timeout_ns = plan.timeout.as_nanos() as u64;
    let send_end_ns = plan.duration.as_nanos() as u64;
    // A hard stop, whatever happens: the sending, then one timeout to drain.
    let hard_end_ns = send_end_ns + timeout_ns + 1_000_000_000;
    let mut remaining = plan.requests.unwrap_or(u64::MAX);
    let bar = plan.progress.then(|| time_bar(plan.duration));
    let mut next_progress = Instant::now();
    let mut pollfds: Vec<libc::pollfd> = flows
        .iter()
        .map(|f| libc::pollfd {
            fd: f.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Sockets worth a receive call: poll said so, or the last call left
    // datagrams behind. Receiving only from these saves empty system calls.
    let mut readable = vec![true; flows.len()];
    let open = matches!(plan.pacing, Pacing::Open { .. });
    let mut next_sweep_ns = 0;
    let clock = Clock::start();
    let mut sending = true;
    // How punctual the loop itself was, for `RUST_LOG=debug`.
    let mut longest_pass_ns = 0;
    let mut oversleep_ns = 0;
    let mut pass_start_ns = 0;
    let mut slept = true;
    loop {
        let pass_ns = clock.now_ns();
        if !slept {
            longest_pass_ns = longest_pass_ns.max(pass_ns - pass_start_ns);
        }
        pass_start_ns = pass_ns;
        slept = false;
        let mut busy = false;
        if open && sending {
            // Replies are not polled for while sending: sweep every socket
            // once a tick, even when the loop never sleeps (running behind).
            let now_ns = clock.now_ns();
            if now_ns >= next_sweep_ns {
                next_sweep_ns = now_ns + OPEN_LOOP_TICK_NS;
                readable.iter_mut().for_each(|r| *r = true);
            }
        }
        for (f, r) in flows.iter_mut().zip(readable.iter_mut()) {
            if *r {
                let (got, more) = f.receive(&mut recv_batch, &clock, &mut tally);
                busy |= got > 0;
                *r = more;
            }
        }
        let now_ns = clock.now_ns();
        if sending && now_ns >= send_end_ns {
            sending = false;
            tally.send_ns = send_end_ns;
        } else if sending && (remaining == 0 || stop_requested()) {
            sending = false;
            tally.send_ns = now_ns;
            tally.interrupted = remaining > 0;
        }
        if sending {
            for f in flows.iter_mut() {
                if remaining == 0 {
                    break;
                }
                let n = f.send(plan, &mut send_batch, now_ns, remaining, &mut tally);
                remaining -= n;
                busy |= n > 0;
            }
        }
        let mut next_expiry = u64::MAX;
        for f in flows.iter_mut() {
            if let Some(t) = f.expire(now_ns, timeout_ns, &mut tally) {
                next_expiry = next_expiry.min(t);
            }
        }
        let outstanding: usize = flows.iter().map(|f| f.outstanding).sum();
        if !sending && outstanding == 0 {
            break;
        }
        if now_ns >= hard_end_ns {
            warn!("stopping with {outstanding} requests still outstanding");
            tally.lost += outstanding as u64;
            break;
        }
        if let Some(b) = &bar {
            if Instant::now() >= next_progress {
                next_progress += PROGRESS_EVERY;
                b.set_position(now_ns / 1_000_000);
                b.set_message(format!(
                    "{} sent, {} answered, {} lost",
                    tally.sent, tally.answered, tally.lost
                ));
            }
        }
        if busy {
            continue;
        }
        // Nothing to do right now: sleep until a reply, a due send, an
        // expiry, the end of sending, or the next progress redraw.
        let mut wake_ns = next_expiry.min(hard_end_ns);
        if sending {
            wake_ns = wake_ns.min(send_end_ns);
            if let Pacing::Open { .. } = plan.pacing {
                // Wake when the next request comes within a tick, but not
                // before the tick sent ahead is used up.
                for f in &flows {
                    let due = f
                        .intended_ns(f.next_id)
                        .saturating_sub(OPEN_LOOP_TICK_NS)
                        .max(now_ns + OPEN_LOOP_TICK_NS);
                    wake_ns = wake_ns.min(due);
                }
            }
        }
        if bar.is_some() {
            let until = next_progress.saturating_duration_since(Instant::now());
            wake_ns = wake_ns.min(now_ns + until.as_nanos() as u64);
        }
        let now_ns = clock.now_ns();
        if wake_ns <= now_ns {
            continue;
        }
        // While an open loop sends, replies wait for the next tick (their
        // kernel timestamps keep the latency exact): waking for each one
        // would cost more CPU than the requests themselves.
        let lazy = sending && open;
        for (p, f) in pollfds.iter_mut().zip(&flows) {
            p.events =
                if lazy { 0 } else { libc::POLLIN } | if f.blocked { libc::POLLOUT } else { 0 };
            p.revents = 0;
        }
        longest_pass_ns = longest_pass_ns.max(now_ns - pass_start_ns);
        poll_for(&mut pollfds, wake_ns - now_ns)?;
        slept = true;
        let woke_ns = clock.now_ns();
        if woke_ns > wake_ns {
            oversleep_ns = oversleep_ns.max(woke_ns - wake_ns);
        }
        for ((p, f), r) in pollfds
            .iter()
            .zip(flows.iter_mut())
            .zip(readable.iter_mut())
        {
            if p.revents & libc::POLLOUT != 0 {
                f.blocked = false;
            }
            // POLLERR: a port-unreachable waits to be read as an error.
            *r = lazy || p.revents & (libc::POLLIN | libc::POLLERR) != 0;
        }
    }
    if sending {
        tally.send_ns = clock.now_ns();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    debug!(
        "loop: longest pass {} µs, latest wake-up {} µs after its time",
        longest_pass_ns / 1000,
        oversleep_ns / 1000
    );
    Ok(tally)
}

/// The run's clock: monotonic nanoseconds since the start, and the
/// conversion of kernel (`CLOCK_REALTIME`) timestamps onto it.
struct Clock {
    start: Instant,
    realtime_start_ns: u64,
}

impl Clock {
    fn start() -> Clock {
        let start = Instant::now();
        let realtime_start_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Clock {
            start,
            realtime_start_ns,
        }
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// A `CLOCK_REALTIME` timestamp as nanoseconds since the start.
    fn since_start(&self, realtime_ns: u64) -> u64 {
        realtime_ns.saturating_sub(self.realtime_start_ns)
    }
}

/// Waits up to `ns` nanoseconds for any of `fds` to be ready.
fn poll_for(fds: &mut [libc::pollfd], ns: u64) -> Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `fds` is a valid slice of pollfd for the length passed, and
    // `ts` lives for the call; no signal mask is passed.
    let r = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e).context("polling the load sockets");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test server thread receives to stop: sent by
    /// [`FakeServer::stop`] once the run is over. A server that stopped on a
    /// silence instead gave up too early on a busy machine, when the load
    /// generator was descheduled or waiting out a timeout.
    const STOP: &[u8] = b"stop";

    /// A UDP server on a thread that answers until [`FakeServer::stop`].
    struct FakeServer {
        addr: SocketAddr,
        thread: std::thread::JoinHandle<()>,
    }

    impl FakeServer {
        /// Starts `serve`, called for each datagram but [`STOP`] with the
        /// socket, the datagram, its sender and how many came before it.
        fn start(
            mut serve: impl FnMut(&UdpSocket, &[u8], SocketAddr, u64) + Send + 'static,
        ) -> FakeServer {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            // Only a safety net, should `stop` never come: a run is over
            // long before.
            sock.set_read_timeout(Some(Duration::from_secs(120)))
                .unwrap();
            let addr = sock.local_addr().unwrap();
            let thread = std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let mut n = 0;
                while let Ok((len, from)) = sock.recv_from(&mut buf) {
                    if &buf[..len] == STOP {
                        break;
                    }
                    serve(&sock, &buf[..len], from, n);
                    n += 1;
                }
            });
            FakeServer { addr, thread }
        }

        /// Stops the server and waits for its thread.
        fn stop(self) {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.send_to(STOP, self.addr).unwrap();
            self.thread.join().unwrap();
        }
    }

    /// A correct JSON reply to the square request `datagram`.
    fn square_reply(datagram: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(datagram).unwrap();
        let x = i128::from(v["n"].as_i64().unwrap());
        format!(
            r#"{{"ok":true,"op":"square","result":{},"worker_pid":7,"id":{}}}"#,
            x * x,
            v["id"]
        )
    }

    /// A tiny square server: answers JSON squares correctly, except that
    /// every `dup_every`-th reply is sent twice and every `drop_every`-th
    /// request gets no reply (0: never).
    fn square_server(drop_every: u64, dup_every: u64) -> FakeServer {
        FakeServer::start(move |sock, datagram, from, before| {
            let n = before + 1;
            if n.checked_rem(drop_every) == Some(0) {
                return;
            }
            let reply = square_reply(datagram);
            sock.send_to(reply.as_bytes(), from).unwrap();
            if n.checked_rem(dup_every) == Some(0) {
                sock.send_to(reply.as_bytes(), from).unwrap();
            }
        })
    }

    #[test]
    fn slow_replies_outlive_the_ring() {
        // The first request is answered only after 6000 others: its ring
        // slot has been reused by then, yet it must count as answered.
        let mut held = None;
        let server = FakeServer::start(move |sock, datagram, from, before| {
            let reply = square_reply(datagram);
            if before == 0 {
                held = Some((reply, from));
                return;
            }
            sock.send_to(reply.as_bytes(), from).unwrap();
            if before + 1 == 6000 {
                let (r, f) = held.take().unwrap();
                sock.send_to(r.as_bytes(), f).unwrap();
            }
        });
        let mut p = plan(server.addr, Pacing::Closed { window: 8 }, 7000);
        p.sockets = 1;
        let t = run_flows(&p).unwrap();
        server.stop();
        assert_eq!((t.sent, t.answered, t.lost, t.late), (7000, 7000, 0, 0));
    }

    /// A plan that sends `requests` to `server`. Its duration and timeout
    /// are far longer than a run needs, so that a busy machine does not
    /// turn a slow reply into a lost one: a run ends as soon as every
    /// request is answered, and only a test that waits for a loss sets a
    /// shorter timeout.
    fn plan(server: SocketAddr, pacing: Pacing, requests: u64) -> Plan {
        Plan {
            server,
            pacing,
            sockets: 2,
            duration: Duration::from_secs(60),
            requests: Some(requests),
            mix: Mix::default(),
            sleep_ms: 0,
            timeout: Duration::from_secs(30),
            progress: false,
        }
    }

    #[test]
    fn closed_loop_counts_loss_and_duplicates() {
        let server = square_server(10, 7);
        // A window of 2 x 16 holds all 20 unanswered requests at once: the
        // run waits out the timeout once, not once per batch of losses.
        let mut p = plan(server.addr, Pacing::Closed { window: 16 }, 200);
        // A reply slower than this would count as lost: two seconds is far
        // beyond what a busy machine delays a thread.
        p.timeout = Duration::from_secs(2);
        let t = run_flows(&p).unwrap();
        server.stop();
        assert_eq!(t.sent, 200);
        assert_eq!(t.lost, 20);
        assert_eq!(t.answered, 180);
        assert_eq!(t.wrong, 0);
        assert_eq!(t.per_pid[&7], 180);
        // Every 7th request is answered twice, unless it was the dropped one.
        assert_eq!(
            t.duplicates,
            (1..=200u64).filter(|n| n % 7 == 0 && n % 10 != 0).count() as u64
        );
    }

    #[test]
    fn open_loop_keeps_its_schedule() {
        let server = square_server(0, 0);
        let start = Instant::now();
        let t = run_flows(&plan(server.addr, Pacing::Open { rate: 1000.0 }, 200)).unwrap();
        let took = start.elapsed();
        server.stop();
        assert_eq!((t.sent, t.answered, t.lost), (200, 200, 0));
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(t.send_ns >= 190_000_000, "{}", t.send_ns);
    }

    #[test]
    fn requests_are_shared_out_exactly() {
        let shares: Vec<u64> = (0..3).map(|i| share(10, 3, i)).collect();
        assert_eq!(shares, [4, 3, 3]);
        assert_eq!(share(2, 4, 3), 0);
    }

    #[test]
    fn ring_is_sized_for_the_timeout() {
        let mut p = plan(
            "127.0.0.1:1".parse().unwrap(),
            Pacing::Open { rate: 1e6 },
            1,
        );
        p.timeout = Duration::from_secs(1);
        assert_eq!(ring_capacity(&p), 1 << 20);
        p.pacing = Pacing::Closed { window: 64 };
        assert_eq!(ring_capacity(&p), 4096);
    }

    #[test]
    fn rings_stay_bounded_however_the_options_multiply() {
        let mut p = plan(
            "127.0.0.1:1".parse().unwrap(),
            Pacing::Open {
                rate: crate::cli::MAX_RATE,
            },
            1,
        );
        p.timeout = Duration::from_secs(60);
        for sockets in [1, 2, 3, 64, 1000, 1024] {
            p.sockets = sockets;
            for pacing in [
                Pacing::Open {
                    rate: crate::cli::MAX_RATE,
                },
                Pacing::Closed { window: 65_536 },
            ] {
                p.pacing = pacing;
                let ring = ring_capacity(&p);
                assert!(ring.is_power_of_two(), "{ring}");
                assert!(
                    ring * sockets <= MAX_RING_SLOTS.max(MIN_RING_SLOTS * sockets),
                    "{sockets} sockets x {ring} slots"
                );
            }
        }
        p.sockets = 1;
        p.pacing = Pacing::Open {
            rate: crate::cli::MIN_RATE,
        };
        assert_eq!(ring_capacity(&p), MIN_RING_SLOTS);
    }
}
