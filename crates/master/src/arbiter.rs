//! The arbiter: the master's one loop, shaped like gunicorn's arbiter and
//! nginx's master cycle. It sleeps in `epoll_wait` until a datagram, a
//! worker's pipe, a signal or a deadline wakes it, notes what is ready, and
//! then runs a fixed sequence of small steps, each doing its own work only;
//! [`Arbiter::run`] reads as the table of contents of what the master does.
//!
//! # Layout
//! * this file: the configuration, the phases, the loop and its wake-ups.
//! * `control`: signals, phases (boot, drain, stop) and their deadlines.
//! * `supervise`: the workers: completions, reaping and settling, timeouts,
//!   the pool's size, spawning.
//! * `intake`: datagrams, dispatch, and the answers the master gives itself
//!   (stats, `too_large`, inline mode, errors for requests it cannot place).
//! * `handover`: `USR2`: starting a new master and handing it the socket,
//!   or rolling back; in a new master, waiting for the old one's `go`.
//!
//! The decisions these steps make are pure functions in [`crate::pool`]
//! (dispatch, the pool plan, deadlines, settling) and [`crate::backoff`],
//! unit-tested without processes.

mod control;
mod handover;
mod intake;
mod stats;
mod supervise;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use std::os::fd::AsFd;

use crate::backoff::CrashLoop;
use crate::dedup::Dedup;
use crate::group::Group;
use crate::guard::Guard;
use crate::journal::{self, Journal};
use crate::ledger::{Ledger, Responder};
use crate::pool::{self, Dispatcher, Pending, WorkerSlot};
use crate::replace::{Listener, Origin, Predecessor, Successor};
use crate::signals::Signals;
use netio::RecvBatch;

const TOKEN_UDP: u64 = 0;
const TOKEN_SIGNALS: u64 = 1;
/// The channel to the master this one replaces, or to its replacement.
const TOKEN_HANDOVER: u64 = u64::MAX;
/// Worker tokens are `FIRST_WORKER_TOKEN + 2*serial (+1 for its request pipe)`.
const FIRST_WORKER_TOKEN: u64 = 2;
/// Datagrams per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// `recvmmsg` calls per turn, so that pipes and signals are not starved.
const RECV_ROUNDS: usize = 8;
/// Requests read and not yet placed, at most: beyond this the socket is not
/// read, and the kernel's queue holds the rest.
const QUEUE_CAP: usize = RECV_BATCH * RECV_ROUNDS;
/// How long the initial workers have to report ready.
const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often, at most, the pipes of idle workers are read when no turn
/// woken by a timeout or a signal did (their pipes do not wake the master:
/// [`pool::completions_wake`]).
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// How long workers sent `QUIT` (stop at once) have before `KILL`.
const QUIT_GRACE: Duration = Duration::from_secs(1);

/// Everything the arbiter is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to bind (unless the socket is inherited).
    pub bind: SocketAddr,
    /// Bind with `SO_REUSEPORT`, sharing the address with other masters.
    pub reuse_port: bool,
    /// The executable `USR2` starts as the new master.
    pub master_path: PathBuf,
    /// The arguments it is started with (this master's own).
    pub master_args: Vec<OsString>,
    /// How long a new master started by `USR2` has to be ready.
    pub handover_timeout: Duration,
    /// Pool size; 0 answers inline.
    pub workers: usize,
    /// The worker executable.
    pub worker_path: PathBuf,
    /// Largest datagram accepted.
    pub max_datagram: usize,
    /// Requests one worker may hold.
    pub max_inflight: usize,
    /// Age at which a worker's oldest request gets it killed.
    pub request_timeout: Duration,
    /// How long a graceful stop may take.
    pub graceful_timeout: Duration,
    /// Requests before a worker retires (0: never).
    pub max_requests: u64,
    /// Random extra requests per worker, up to this.
    pub max_requests_jitter: u64,
    /// Whether `crash` aborts workers.
    pub fault_injection: bool,
    /// The journal file, if on.
    pub journal: Option<PathBuf>,
    /// Rows the journal keeps.
    pub journal_max_rows: u64,
    /// Sources with no reply bound and no rate limit.
    pub trusted: Vec<ipnet::IpNet>,
    /// Replies to other sources are at most this many times their request.
    pub amplification_factor: u32,
    /// Replies per second per prefix for other sources (0: no limit).
    pub rate_limit: u32,
    /// Every N-th datagram over the limit gets `rate_limited` (0: none).
    pub rate_limit_slip: u32,
    /// The duplicate request cache's bounds (a zero window: off).
    pub dedup: crate::dedup::Limits,
    /// The user, group, limits and filter of every worker.
    pub confinement: crate::privileges::Confinement,
    /// The master's hybrid logical clock: stamps journal rows and `stats`
    /// replies, follows the causal links of requests; shared with the
    /// cluster thread.
    pub clock: crate::clock::Clock,
    /// A group of servers to form or join (`--cluster-addr`).
    pub group: Option<crate::group::GroupOptions>,
}

/// Where the master is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the initial workers to report ready; the socket is not
    /// read yet (datagrams wait in the kernel queue).
    Booting { deadline: Instant },
    /// A master started by `USR2` whose workers are ready: it has said
    /// `ready` and waits for the old master's `go` before it reads.
    Standby { deadline: Instant },
    /// Serving.
    Running,
    /// TERM/INT: no new datagrams; workers answer what they hold, then exit.
    Draining { deadline: Instant },
    /// QUIT, a second TERM/INT, or the graceful timeout: workers were sent
    /// `QUIT` (stop after the batch in progress) and get `KILL` at
    /// `kill_at`; what they held is answered `shutting_down` as each one is
    /// reaped and its completions read.
    Stopping { kill_at: Instant },
    /// Every worker is gone: leave the loop.
    Stopped,
}

/// What `epoll_wait` said is ready, noted before any step acts.
#[derive(Debug, Default)]
struct Ready {
    /// The UDP socket has datagrams.
    datagrams: bool,
    /// The signalfd has signals.
    signals: bool,
    /// The hand-over channel has something to read.
    handover: bool,
    /// Serials of workers whose completion pipe epoll reported readable.
    completions: Vec<u64>,
    /// Read the pipes of idle workers too (they do not wake the master).
    sweep: bool,
}

/// The master process's state.
pub struct Arbiter {
    cfg: Config,
    master_pid: u32,
    epoll: Epoll,
    events: Vec<EpollEvent>,
    ready: Ready,
    signals: Signals,
    /// Datagrams of the current `recvmmsg` (out while they are handled).
    recv: Option<RecvBatch>,
    responder: Responder,
    ledger: Ledger,
    guard: Guard,
    /// Replies kept for retries: each request answered at most once.
    dedup: Dedup,
    slots: Vec<WorkerSlot>,
    /// Requests read (or taken back from a stopped worker) and not placed.
    dispatcher: Dispatcher,
    /// Requests the dispatch step could not place, answered in that step;
    /// kept to reuse its memory.
    refused: Vec<Pending>,
    /// The pool size asked for (changed by TTIN/TTOU).
    target: usize,
    next_serial: u64,
    next_seq: u64,
    phase: Phase,
    /// A SIGCHLD or a pipe's end of stream says some worker may be reapable.
    reap_due: bool,
    /// Workers `manage_workers` started this turn: while the pool grows,
    /// requests wait for it rather than get `busy`.
    spawned_this_turn: usize,
    crash_loop: CrashLoop,
    started: Instant,
    rng: u64,
    /// How the socket came: bound, from systemd, from an old master.
    socket_origin: String,
    /// A `USR2` arrived: the hand-over step starts a new master.
    replace_requested: bool,
    /// The master `USR2` started, until it is ready or given up.
    successor: Option<Successor>,
    /// The master this one handed its socket to: it reads no more, and
    /// stops once its workers have answered what they hold.
    handed_over_to: Option<Pid>,
    /// In a master started by `USR2`: the old master, until its `go`.
    predecessor: Option<Predecessor>,
    /// The group of servers, if any (its thread starts once serving).
    group: Group,
    /// Places the workers' SENT_AT times on the master's clock.
    monotonic: supervise::Monotonic,
    /// When the idle workers' completion pipes are read next at the latest.
    next_sweep: Instant,
}

impl Arbiter {
    /// Takes the socket, opens the journal and sets up signals; starts no
    /// worker yet.
    ///
    /// # Errors
    /// When the journal cannot be opened, the worker executable is
    /// missing, or epoll/signalfd fail.
    pub fn new(cfg: Config, listener: Listener) -> anyhow::Result<Arbiter> {
        if cfg.workers > 0 && !cfg.worker_path.is_file() {
            bail!(
                "worker executable {} not found (build it with `cargo build --release`, or pass --worker-path)",
                cfg.worker_path.display()
            );
        }
        // Signals are blocked before any thread (the journal writer) starts,
        // so that every thread inherits the mask and only the signalfd sees them.
        let signals = Signals::install().context("cannot set up signal handling")?;
        let socket_origin = listener.origin.describe();
        let socket = listener.socket;
        let predecessor = match listener.origin {
            Origin::Predecessor(p) => Some(p),
            Origin::Bound | Origin::Systemd => None,
        };
        let journal = match &cfg.journal {
            Some(path) => {
                let origin = journal::Origin {
                    clock: cfg.clock.clone(),
                    server: socket.local_addr().ok(),
                };
                Some(Journal::open_for(path, cfg.journal_max_rows, &origin)?)
            }
            None => None,
        };
        let group = match cfg.group.clone() {
            Some(opts) => Group::bind(
                opts,
                socket.local_addr()?,
                journal.as_ref().map(Journal::cluster_journal),
            )?,
            None => Group::Off,
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
        epoll.add(
            signals.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNALS),
        )?;
        let now = Instant::now();
        Ok(Arbiter {
            master_pid: std::process::id(),
            epoll,
            events: vec![EpollEvent::empty(); 64],
            ready: Ready::default(),
            signals,
            recv: Some(RecvBatch::new(RECV_BATCH, cfg.max_datagram)),
            responder: Responder::new(socket),
            ledger: Ledger::new(journal),
            guard: Guard::new(
                cfg.trusted.clone(),
                cfg.amplification_factor,
                cfg.rate_limit,
                cfg.rate_limit_slip,
            ),
            dedup: Dedup::new(cfg.dedup),
            slots: Vec::new(),
            // Keep a turn's requests together unless a request may block.
            dispatcher: if cfg.fault_injection {
                Dispatcher::spreading()
            } else {
                Dispatcher::default()
            },
            refused: Vec::new(),
            target: cfg.workers,
            next_serial: 0,
            next_seq: 0,
            phase: Phase::Booting {
                deadline: now + BOOT_TIMEOUT,
            },
            reap_due: false,
            spawned_this_turn: 0,
            crash_loop: CrashLoop::default(),
            started: now,
            rng: u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15,
            socket_origin,
            replace_requested: false,
            successor: None,
            handed_over_to: None,
            predecessor,
            group,
            monotonic: supervise::Monotonic::now(),
            next_sweep: now,
            cfg,
        })
    }

    /// The journal's handle for the cluster thread's events, if the
    /// journal is on (the cluster thread stamps with `cfg.clock`, the same
    /// clock).
    pub fn cluster_journal(&self) -> Option<crate::journal::ClusterJournal> {
        self.ledger.journal.as_ref().map(Journal::cluster_journal)
    }

    /// The address the socket is bound to (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.responder.socket.local_addr()
    }

    /// Runs until a stop signal has been handled and every worker is gone.
    ///
    /// # Errors
    /// When the initial workers cannot start, or the event loop itself fails.
    pub fn run(mut self) -> anyhow::Result<()> {
        self.start_pool()?;
        while self.phase != Phase::Stopped {
            self.wait_for_events()?; // note what is ready; act below, in this order
            let now = Instant::now();
            self.read_completions(false); // READY, STOPPING, DONE, end of stream
            self.handle_signals(); // phases, pool size, reload, stops
            self.reap_workers(now)?; // waitpid; settle workers reaped and read to the end
            self.check_timeouts(now); // kill workers holding a request too long
            self.check_phase_deadlines(now)?; // boot done or failed, drain timeout, KILL
            self.hand_over(now)?; // USR2: start a new master, hand it the socket or roll back
            self.manage_workers(now); // retire and start workers toward the target
            self.read_datagrams(now); // stats, too_large, inline answered; the rest queued
            self.dispatch(now); // queued requests to workers; busy, shutting_down
            self.flush_requests(); // write request pipes; close those of retiring workers
            self.arm_completions(); // which completion pipes wake the master
            self.responder.send(); // the master's own replies, without blocking
            self.ledger.flush_journal(); // rows to the journal's writer thread
        }
        self.group.finish();
        log::info!(
            "stopped: {} requests answered, {} errors",
            self.ledger.totals.answered(),
            self.ledger.totals.errors.iter().sum::<u64>()
        );
        if let Some(j) = self.ledger.journal.take() {
            j.close();
        }
        Ok(())
    }

    /// Sleeps until something is ready or the next deadline, and notes what
    /// is ready.
    fn wait_for_events(&mut self) -> anyhow::Result<()> {
        let timeout = self.next_wakeup(Instant::now());
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(e).context("epoll_wait"),
        };
        let ready = &mut self.ready;
        ready.datagrams = false;
        ready.signals = false;
        ready.handover = false;
        ready.completions.clear();
        for ev in &self.events[..n] {
            match ev.data() {
                TOKEN_UDP => ready.datagrams = true,
                TOKEN_SIGNALS => ready.signals = true,
                TOKEN_HANDOVER => ready.handover = true,
                // A writable request pipe only wakes the loop: the flush
                // step writes every outbox.
                token if (token - FIRST_WORKER_TOKEN) % 2 == 1 => {}
                token => ready.completions.push((token - FIRST_WORKER_TOKEN) / 2),
            }
        }
        // The pipes that do not wake the master ([`pool::completions_wake`])
        // are read anyway: a busy worker's when due ([`pool::completions_due`]),
        // an idle one's at a sweep (a turn a signal or a timeout woke, and
        // at least every SWEEP_EVERY).
        let now = Instant::now();
        ready.sweep = n == 0 || ready.signals || now >= self.next_sweep;
        if ready.sweep {
            self.next_sweep = now + SWEEP_EVERY;
        }
        Ok(())
    }

    /// How long `epoll_wait` may sleep: until the nearest deadline, at most 1 s.
    fn next_wakeup(&self, now: Instant) -> u16 {
        let phase_deadline = match self.phase {
            Phase::Booting { deadline }
            | Phase::Standby { deadline }
            | Phase::Draining { deadline } => Some(deadline),
            Phase::Stopping { kill_at } => Some(kill_at),
            Phase::Running | Phase::Stopped => None,
        };
        let until = [
            self.dispatcher.next_deadline(),
            pool::next_timeout(&self.slots, self.cfg.request_timeout),
            self.crash_loop.next_spawn_at(),
            phase_deadline,
            self.successor.as_ref().map(|s| s.deadline),
        ]
        .into_iter()
        .flatten()
        .fold(now + Duration::from_secs(1), Instant::min);
        // Round up so that a deadline is past when the loop wakes.
        let ms = until
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000);
        ms.min(1000) as u16
    }

    /// The address clients reach this server at (as `members` names it).
    fn service_addr(&self) -> SocketAddr {
        self.local_addr().unwrap_or(self.cfg.bind)
    }

    /// Whether new work is taken: booting, standing by or running.
    fn accepting(&self) -> bool {
        matches!(
            self.phase,
            Phase::Booting { .. } | Phase::Standby { .. } | Phase::Running
        )
    }

    /// Whether the socket is read: running, and not handed over.
    fn reading(&self) -> bool {
        self.phase == Phase::Running && self.handed_over_to.is_none()
    }
}

impl Drop for Arbiter {
    /// On any exit path, no worker outlives the master unreaped.
    fn drop(&mut self) {
        for slot in &self.slots {
            let _ = kill(slot.pid, Signal::SIGKILL);
        }
        for slot in &self.slots {
            let _ = waitpid(slot.pid, None);
        }
    }
}
