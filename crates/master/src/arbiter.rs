//! The arbiter: the master's one loop, shaped like gunicorn's arbiter and
//! nginx's master cycle. It sleeps in `epoll_wait` until a datagram, a
//! worker's pipe, a signal or a deadline wakes it, then runs a fixed
//! sequence of small steps; [`Arbiter::run`] reads as what the master does.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netio::RecvBatch;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use protocol::answer;
use protocol::frame::{self, FrameBuf, ToMaster};
use protocol::{ErrorCode, Op, Outcome, ReplyContext, Request};

use crate::journal::{self, ExitReason, Journal};
use crate::ledger::{Ledger, Responder};
use crate::pool::{InFlight, SlotState, WorkerSlot};
use crate::signals::Signals;
use crate::spawn::spawn_worker;

const TOKEN_UDP: u64 = 0;
const TOKEN_SIGNALS: u64 = 1;
/// Worker tokens are `FIRST_WORKER_TOKEN + 2*serial (+1 for its request pipe)`.
const FIRST_WORKER_TOKEN: u64 = 2;
/// Datagrams per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// `recvmmsg` calls per wake-up, so that pipes and signals are not starved.
const RECV_ROUNDS: usize = 8;
/// How long the initial workers have to report ready.
const BOOT_TIMEOUT: Duration = Duration::from_secs(10);
/// Crash-loop detection: this many workers dying before they served a
/// single request within [`CRASH_WINDOW`] starts the respawn back-off.
const CRASH_INTENSITY: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How long workers sent `QUIT` (stop at once) have before `KILL`.
const QUIT_GRACE: Duration = Duration::from_secs(1);

/// Everything the arbiter is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to bind.
    pub bind: SocketAddr,
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
}

/// Where the master is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the initial workers to report ready; the socket is not
    /// read yet (datagrams wait in the kernel queue).
    Booting { deadline: Instant },
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

/// The master process's state.
pub struct Arbiter {
    cfg: Config,
    master_pid: u32,
    epoll: Epoll,
    signals: Signals,
    recv: RecvBatch,
    responder: Responder,
    ledger: Ledger,
    slots: Vec<WorkerSlot>,
    /// Requests taken back from a worker that stopped without answering
    /// them, waiting for the dispatch step; each with the error it gets if
    /// no worker can take it.
    backlog: VecDeque<(InFlight, ErrorCode)>,
    /// The pool size asked for (changed by TTIN/TTOU).
    target: usize,
    next_serial: u64,
    next_seq: u64,
    /// Round-robin cursor for ties in dispatch.
    rr: usize,
    phase: Phase,
    /// A SIGCHLD or a pipe end of stream says some worker may be reapable.
    reap_due: bool,
    /// Deaths of workers that had served nothing, within [`CRASH_WINDOW`].
    early_deaths: VecDeque<Instant>,
    backoff: Duration,
    next_spawn_at: Option<Instant>,
    started: Instant,
    rng: u64,
}

impl Arbiter {
    /// Binds the socket, opens the journal and sets up signals; starts no
    /// worker yet.
    ///
    /// # Errors
    /// When the socket cannot be bound, the journal cannot be opened, the
    /// worker executable is missing, or epoll/signalfd fail.
    pub fn new(cfg: Config) -> anyhow::Result<Arbiter> {
        if cfg.workers > 0 && !cfg.worker_path.is_file() {
            bail!(
                "worker executable {} not found (build it with `cargo build --release`, or pass --worker-path)",
                cfg.worker_path.display()
            );
        }
        // Signals are blocked before any thread (the journal writer) starts,
        // so that every thread inherits the mask and only the signalfd sees them.
        let signals = Signals::install().context("cannot set up signal handling")?;
        let socket = crate::udp::bind(cfg.bind)?;
        let journal = match &cfg.journal {
            Some(path) => Some(Journal::open(path, cfg.journal_max_rows)?),
            None => None,
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
            signals,
            recv: RecvBatch::new(RECV_BATCH, cfg.max_datagram),
            responder: Responder::new(socket),
            ledger: Ledger::new(journal),
            slots: Vec::new(),
            backlog: VecDeque::new(),
            target: cfg.workers,
            next_serial: 0,
            next_seq: 0,
            rr: 0,
            phase: Phase::Booting {
                deadline: now + BOOT_TIMEOUT,
            },
            reap_due: false,
            early_deaths: VecDeque::new(),
            backoff: Duration::ZERO,
            next_spawn_at: None,
            started: now,
            rng: u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15,
            cfg,
        })
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
        for _ in 0..self.target {
            self.spawn_one().context("cannot start the worker pool")?;
        }
        if self.target == 0 {
            self.start_serving()?;
        }
        let mut events = vec![EpollEvent::empty(); 64];
        while self.phase != Phase::Stopped {
            let timeout = self.next_wakeup(Instant::now());
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => return Err(e).context("epoll_wait"),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_UDP => self.read_datagrams(),
                    TOKEN_SIGNALS => self.handle_signals(),
                    token => self.worker_event(token),
                }
            }
            let now = Instant::now();
            self.reap_workers(now)?;
            self.check_timeouts(now);
            self.check_phase_deadlines(now)?;
            self.manage_workers(now);
            self.dispatch_backlog(now);
            self.flush_requests();
            self.responder.send();
            self.ledger.flush_journal();
        }
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

    // ----- the loop's steps -------------------------------------------------

    /// Reads every queued datagram (up to a bound per wake-up) and hands each
    /// to a worker, or answers it inline.
    fn read_datagrams(&mut self) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        // Moved out while its datagrams are handled, which may start a
        // worker (`&mut self`); moving it back is a few pointer copies.
        let mut recv = std::mem::take(&mut self.recv);
        self.handle_datagrams(&mut recv);
        self.recv = recv;
    }

    fn handle_datagrams(&mut self, recv: &mut RecvBatch) {
        for _ in 0..RECV_ROUNDS {
            let got = match recv.recv(&self.responder.socket) {
                Ok(n) => n,
                Err(e) => {
                    log::warn!("recvmmsg: {e}");
                    return;
                }
            };
            if got == 0 {
                return;
            }
            let now = Instant::now();
            let now_us = journal::now_unix_us();
            self.ledger.totals.received += got as u64;
            for d in recv.iter() {
                if d.truncated {
                    self.responder
                        .too_large(d.payload, d.from, self.cfg.max_datagram);
                    self.ledger.record(
                        d.from,
                        now,
                        now_us,
                        Op::Invalid,
                        None,
                        Outcome::Error(ErrorCode::TooLarge),
                        b"",
                        now,
                    );
                    continue;
                }
                if protocol::request::may_be_stats(d.payload) {
                    if let Some(p) = protocol::parse(d.payload) {
                        if p.request == Ok(Request::Stats) {
                            self.answer_stats(d.from, p.id, now, now_us);
                            continue;
                        }
                    }
                }
                if self.cfg.workers == 0 {
                    answer_inline(
                        &mut self.responder,
                        &mut self.ledger,
                        self.master_pid,
                        d.from,
                        d.payload,
                        now,
                        now_us,
                    );
                    continue;
                }
                let req = InFlight {
                    seq: self.next_seq,
                    client: d.from,
                    received: now,
                    received_unix_us: now_us,
                    dispatched: now,
                    payload: self.ledger.keep_payload(d.payload),
                    redispatched: false,
                };
                self.next_seq += 1;
                self.place(req, now);
            }
            if got < RECV_BATCH {
                return;
            }
        }
    }

    /// `stats`: answered by the master at once, never queued behind work.
    fn answer_stats(&mut self, to: SocketAddr, id: Option<&str>, now: Instant, now_us: i64) {
        let body = stats_json(self, now);
        self.responder.ensure_room();
        protocol::reply::write_json_ok(Op::Stats, &body, id, self.responder.batch.next_buf());
        self.responder.batch.commit(to);
        let id = id.unwrap_or("").as_bytes();
        self.ledger
            .record(to, now, now_us, Op::Stats, None, Outcome::Ok, id, now);
    }

    /// Hands `req` to a worker. When none can take it, first brings the
    /// books and the pool up to date (completions not yet read make workers
    /// look fuller than they are; a worker retired by `--max-requests`
    /// leaves the pool short until `manage_workers` runs), then tries once
    /// more before answering `busy`.
    fn place(&mut self, req: InFlight, now: Instant) {
        let Err(req) = dispatch(
            &mut self.slots,
            &mut self.rr,
            self.cfg.max_inflight,
            req,
            now,
        ) else {
            return;
        };
        for i in 0..self.slots.len() {
            self.read_completions(i, false);
        }
        self.manage_workers(now);
        if let Err(req) = dispatch(
            &mut self.slots,
            &mut self.rr,
            self.cfg.max_inflight,
            req,
            now,
        ) {
            let msg = "every worker is full; try again shortly";
            self.ledger
                .fail(&mut self.responder, req, ErrorCode::Busy, msg, now);
        }
    }

    /// Acts on every pending signal, the way gunicorn does.
    fn handle_signals(&mut self) {
        while let Some(sig) = self.signals.take() {
            match sig {
                Signal::SIGCHLD => self.reap_due = true,
                Signal::SIGTERM | Signal::SIGINT => match self.phase {
                    Phase::Draining { .. } | Phase::Stopping { .. } => {
                        log::warn!("{sig} again: stopping at once");
                        self.stop_now();
                    }
                    _ => self.begin_drain(sig),
                },
                Signal::SIGQUIT => {
                    log::warn!("SIGQUIT: stopping at once");
                    self.stop_now();
                }
                Signal::SIGHUP => self.reload(),
                Signal::SIGTTIN if self.accepting() && self.cfg.workers > 0 => {
                    if self.target >= usize::from(crate::cli::MAX_WORKERS) {
                        log::info!(
                            "SIGTTIN ignored: the pool is at its maximum of {} workers",
                            crate::cli::MAX_WORKERS
                        );
                    } else {
                        self.target += 1;
                        log::info!("SIGTTIN: pool size {}", self.target);
                    }
                }
                Signal::SIGTTOU if self.accepting() && self.cfg.workers > 0 => {
                    if self.target <= 1 {
                        log::info!("SIGTTOU ignored: the pool keeps at least one worker");
                    } else {
                        self.target -= 1;
                        log::info!("SIGTTOU: pool size {}", self.target);
                        if let Some(i) = self.oldest_active() {
                            self.retire(i, ExitReason::Scaled);
                        }
                    }
                }
                other => log::debug!("ignoring {other}"),
            }
        }
    }

    /// Reads a worker's completion pipe, or flushes its request pipe.
    fn worker_event(&mut self, token: u64) {
        let serial = (token - FIRST_WORKER_TOKEN) / 2;
        let Some(i) = self.slots.iter().position(|s| s.serial == serial) else {
            return;
        };
        if (token - FIRST_WORKER_TOKEN) % 2 == 1 {
            flush_slot(&mut self.slots[i]);
        } else {
            self.read_completions(i, false);
        }
    }

    /// Reaps every exited child (`waitpid(-1, WNOHANG)` in a loop: signals
    /// coalesce) and settles what each one held.
    fn reap_workers(&mut self, now: Instant) -> anyhow::Result<()> {
        if !std::mem::take(&mut self.reap_due) {
            return Ok(());
        }
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waitpid"),
                Ok(s) => s,
            };
            let Some((pid, code, signal)) = exit_of(status) else {
                continue;
            };
            if let Some(i) = self.slots.iter().position(|s| s.pid == pid) {
                // Completions written before the death are still in the pipe.
                self.read_completions(i, true);
                self.settle_exit(i, code, signal, now)?;
            }
        }
    }

    /// Kills every worker whose oldest request has waited at it longer than
    /// the request timeout. Nothing is answered yet: once the worker is
    /// reaped and its completions read, that request gets `timeout` and the
    /// ones queued behind it go to other workers ([`Arbiter::settle_exit`]).
    fn check_timeouts(&mut self, now: Instant) {
        for slot in &mut self.slots {
            let expired = matches!(
                slot.state,
                SlotState::Booting | SlotState::Ready | SlotState::Retiring(_)
            ) && slot
                .inflight
                .front()
                .is_some_and(|r| now.duration_since(r.dispatched) >= self.cfg.request_timeout);
            if !expired {
                continue;
            }
            log::warn!(
                "worker {} holds a request older than {} ms: killing it ({} more queued behind it go to other workers)",
                slot.pid,
                self.cfg.request_timeout.as_millis(),
                slot.inflight.len() - 1
            );
            let _ = kill(slot.pid, Signal::SIGKILL);
            slot.state = SlotState::Killed(ExitReason::TimeoutKill);
            slot.timed_out = slot.inflight.front().map(|r| r.seq);
            close_requests(slot);
            self.ledger.totals.timeouts += 1;
        }
    }

    /// Ends the boot phase once every initial worker is ready, or fails the
    /// start if they are not ready in time; ends the drain at its deadline.
    fn check_phase_deadlines(&mut self, now: Instant) -> anyhow::Result<()> {
        match self.phase {
            Phase::Booting { deadline } => {
                if self.slots.iter().all(|s| s.state == SlotState::Ready) {
                    self.start_serving()?;
                } else if now >= deadline {
                    bail!(
                        "workers ({}) did not report ready within {} s",
                        self.cfg.worker_path.display(),
                        BOOT_TIMEOUT.as_secs()
                    );
                }
            }
            Phase::Draining { deadline } => {
                if self.slots.is_empty() {
                    self.phase = Phase::Stopped;
                } else if now >= deadline {
                    log::warn!(
                        "graceful timeout: stopping {} workers that are still busy",
                        self.slots.len()
                    );
                    self.stop_now();
                }
            }
            Phase::Stopping { kill_at } => {
                if self.slots.is_empty() {
                    self.phase = Phase::Stopped;
                } else if now >= kill_at {
                    log::warn!(
                        "killing {} workers that did not stop on SIGQUIT",
                        self.slots.len()
                    );
                    for slot in &self.slots {
                        let _ = kill(slot.pid, Signal::SIGKILL);
                    }
                    self.phase = Phase::Stopping {
                        kill_at: now + QUIT_GRACE,
                    };
                }
            }
            Phase::Running | Phase::Stopped => {}
        }
        Ok(())
    }

    /// Starts workers until the pool has its size, unless stopping or
    /// backing off after a crash loop.
    fn manage_workers(&mut self, now: Instant) {
        while self.spawn_allowed(now) {
            if let Err(e) = self.spawn_one() {
                log::error!("cannot start a worker: {e:#}");
                self.note_early_death(now);
                break;
            }
            self.ledger.totals.restarts += 1;
        }
    }

    /// Hands the requests taken back from stopped workers to live ones (a
    /// replacement started by `manage_workers` takes them as it boots); one
    /// that no worker can take gets its error, and while stopping every one
    /// gets `shutting_down`.
    fn dispatch_backlog(&mut self, now: Instant) {
        while let Some((req, code)) = self.backlog.pop_front() {
            if !self.accepting() {
                let msg = "the server is stopping";
                self.ledger
                    .fail(&mut self.responder, req, ErrorCode::ShuttingDown, msg, now);
                continue;
            }
            match dispatch(
                &mut self.slots,
                &mut self.rr,
                self.cfg.max_inflight,
                req,
                now,
            ) {
                Ok(()) => self.ledger.totals.redispatched += 1,
                Err(req) => {
                    let msg = match code {
                        ErrorCode::WorkerCrashed => {
                            "the worker answering this request died and no other worker is free"
                        }
                        _ => "every worker is full; try again shortly",
                    };
                    self.ledger.fail(&mut self.responder, req, code, msg, now);
                }
            }
        }
    }

    /// Writes queued frames to every worker whose request pipe has room.
    fn flush_requests(&mut self) {
        for slot in &mut self.slots {
            flush_slot(slot);
        }
    }

    // ----- helpers of the steps ---------------------------------------------

    /// Whether the pool is below its size and no crash-loop back-off holds.
    fn spawn_allowed(&self, now: Instant) -> bool {
        self.accepting()
            && self.slots.iter().filter(|s| s.is_active()).count() < self.target
            && self.next_spawn_at.is_none_or(|t| now >= t)
    }

    fn accepting(&self) -> bool {
        matches!(self.phase, Phase::Booting { .. } | Phase::Running)
    }

    fn start_serving(&mut self) -> anyhow::Result<()> {
        self.phase = Phase::Running;
        self.epoll
            .add(
                self.responder.socket.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UDP),
            )
            .context("epoll_ctl")?;
        let pids: Vec<String> = self.slots.iter().map(|s| s.pid.to_string()).collect();
        log::info!(
            "listening on {} with {} (pid {}{})",
            self.local_addr()
                .map_or_else(|_| self.cfg.bind.to_string(), |a| a.to_string()),
            match self.cfg.workers {
                0 => "no pool: answering inline".to_owned(),
                n => format!("{n} workers"),
            },
            self.master_pid,
            if pids.is_empty() {
                String::new()
            } else {
                format!("; workers {}", pids.join(" "))
            }
        );
        Ok(())
    }

    fn spawn_one(&mut self) -> anyhow::Result<()> {
        let spawned = spawn_worker(
            &self.cfg.worker_path,
            self.responder.socket.as_fd(),
            self.master_pid,
            self.cfg.fault_injection,
        )
        .with_context(|| format!("cannot start worker {}", self.cfg.worker_path.display()))?;
        let serial = self.next_serial;
        self.next_serial += 1;
        let token = FIRST_WORKER_TOKEN + 2 * serial;
        self.epoll
            .add(
                &spawned.completions,
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            )
            .context("epoll_ctl")?;
        self.epoll
            .add(
                &spawned.requests,
                EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, token + 1),
            )
            .context("epoll_ctl")?;
        let request_limit = match self.cfg.max_requests {
            0 => 0,
            n => n + self.jitter(),
        };
        log::info!("worker {} spawned", spawned.pid);
        if let Some(j) = &self.ledger.journal {
            j.worker_started(spawned.pid.as_raw() as u32, journal::now_unix_us());
        }
        self.slots.push(WorkerSlot {
            serial,
            pid: spawned.pid,
            started: Instant::now(),
            state: SlotState::Booting,
            replace_pending: false,
            requests: Some(spawned.requests),
            outbox: Vec::with_capacity(4096),
            outbox_sent: 0,
            completions: Some(spawned.completions),
            inbox: FrameBuf::with_capacity(16 * 1024),
            inflight: VecDeque::with_capacity(self.cfg.max_inflight.min(1024)),
            dispatched: 0,
            served: 0,
            request_limit,
            timed_out: None,
        });
        Ok(())
    }

    fn jitter(&mut self) -> u64 {
        if self.cfg.max_requests_jitter == 0 {
            return 0;
        }
        // xorshift: good enough to spread retirements; not for secrets.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % (self.cfg.max_requests_jitter + 1)
    }

    /// Reads and applies the worker's completions. `to_end`: the worker is
    /// dead, read until end of stream.
    fn read_completions(&mut self, i: usize, to_end: bool) {
        let now = Instant::now();
        let mut became_ready = 0;
        let mut stopping = false;
        let slot = &mut self.slots[i];
        let pid = slot.pid.as_raw() as u32;
        while let Some(fd) = slot.completions.as_ref() {
            match nix::unistd::read(fd.as_raw_fd(), slot.inbox.spare()) {
                Ok(0) => {
                    if let Err(e) = slot.inbox.finish() {
                        log::warn!("worker {pid}: completion pipe: {e}");
                    }
                    slot.completions = None;
                    self.reap_due = true;
                    break;
                }
                Ok(n) => slot.inbox.filled(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    log::warn!("worker {pid}: cannot read its completion pipe: {e}");
                    slot.completions = None;
                    break;
                }
            }
            loop {
                match slot.inbox.next_to_master() {
                    Ok(None) => break,
                    Ok(Some(ToMaster::Ready { .. })) => {
                        if slot.state == SlotState::Booting {
                            slot.state = SlotState::Ready;
                            became_ready += 1;
                            log::debug!("worker {pid} ready");
                        }
                    }
                    Ok(Some(ToMaster::Stopping { .. })) => {
                        log::info!("worker {pid} got SIGTERM: retiring it once it has answered what it holds");
                        stopping = true;
                    }
                    Ok(Some(ToMaster::Done {
                        seq,
                        op,
                        outcome,
                        id,
                    })) => {
                        let Some(pos) = slot.inflight.iter().position(|r| r.seq == seq) else {
                            log::warn!("worker {pid} reported unknown request {seq}");
                            continue;
                        };
                        let req = slot.inflight.remove(pos).expect("position is in range");
                        slot.served += 1;
                        self.ledger.record(
                            req.client,
                            req.received,
                            req.received_unix_us,
                            op,
                            Some(pid),
                            outcome,
                            id,
                            now,
                        );
                        self.ledger.recycle(req.payload);
                    }
                    Err(e) => {
                        log::error!("worker {pid} broke the completion framing ({e}): killing it");
                        let _ = kill(slot.pid, Signal::SIGKILL);
                        slot.completions = None;
                        break;
                    }
                }
            }
            if !to_end {
                break;
            }
        }
        if stopping {
            self.retire(i, ExitReason::Terminated);
        }
        // A new worker is up: a worker that SIGHUP asked to replace may go.
        for _ in 0..became_ready {
            if let Some(old) = self
                .slots
                .iter()
                .position(|s| s.replace_pending && s.state == SlotState::Ready)
            {
                self.retire(old, ExitReason::Reload);
            }
        }
    }

    /// Settles a reaped worker: re-dispatches or fails what it held, books
    /// its exit, and tracks crash loops. Fails the start during boot.
    fn settle_exit(
        &mut self,
        i: usize,
        code: Option<i32>,
        signal: Option<i32>,
        now: Instant,
    ) -> anyhow::Result<()> {
        let mut slot = self.slots.swap_remove(i);
        let status = journal::exit_status_text(code, signal);
        let clean = code == Some(0);
        let reason = match slot.state {
            SlotState::Booting => ExitReason::BootFailure,
            SlotState::Ready => ExitReason::Crash,
            SlotState::Retiring(r) if clean => r,
            SlotState::Retiring(_) => ExitReason::Crash,
            SlotState::Killed(r) => r,
        };
        self.journal_exit(&slot, code, signal, reason);
        if matches!(self.phase, Phase::Booting { .. }) && reason == ExitReason::BootFailure {
            bail!(
                "worker {} (pid {}) exited ({}) before it was ready: is --worker-path a udp-pool worker?",
                self.cfg.worker_path.display(),
                slot.pid,
                status
            );
        }
        let held = slot.inflight.len();
        let crashed = matches!(reason, ExitReason::Crash | ExitReason::BootFailure);
        if crashed {
            self.ledger.totals.crashes += 1;
            if slot.served == 0 {
                self.note_early_death(now);
            }
        }
        // Every completion the worker wrote has been read (it is reaped and
        // its pipe read to the end), so each request left here got no reply
        // from it: answering it now can never answer it twice.
        let mut again = 0;
        while let Some(mut req) = slot.inflight.pop_front() {
            let (code, msg) = match reason {
                ExitReason::TimeoutKill if slot.timed_out == Some(req.seq) => {
                    let msg = format!(
                        "no answer within {} ms",
                        self.cfg.request_timeout.as_millis()
                    );
                    self.ledger
                        .fail(&mut self.responder, req, ErrorCode::Timeout, &msg, now);
                    continue;
                }
                ExitReason::Stop if matches!(slot.state, SlotState::Killed(_)) => {
                    (ErrorCode::ShuttingDown, "the server is stopping")
                }
                _ if crashed && req.redispatched => (
                    ErrorCode::WorkerCrashed,
                    "the worker answering this request died",
                ),
                // Queued behind a hung request, or held by a worker that
                // stopped: it did nothing wrong, another worker answers it.
                _ => {
                    req.redispatched |= crashed;
                    let code = if crashed {
                        ErrorCode::WorkerCrashed
                    } else {
                        ErrorCode::Busy
                    };
                    self.backlog.push_back((req, code));
                    again += 1;
                    continue;
                }
            };
            self.ledger.fail(&mut self.responder, req, code, msg, now);
        }
        if crashed {
            log::warn!(
                "worker {} {} ({}, served {}): {} requests to re-dispatch, {} failed",
                slot.pid,
                if reason == ExitReason::BootFailure {
                    "failed to boot"
                } else {
                    "died"
                },
                status,
                slot.served,
                again,
                held - again
            );
        } else {
            log::info!(
                "worker {} exited: {} ({}, served {}{})",
                slot.pid,
                status,
                reason.as_str(),
                slot.served,
                if held > 0 {
                    format!(", {again} requests to re-dispatch")
                } else {
                    String::new()
                }
            );
        }
        Ok(())
    }

    fn journal_exit(
        &self,
        slot: &WorkerSlot,
        code: Option<i32>,
        signal: Option<i32>,
        reason: ExitReason,
    ) {
        if let Some(j) = &self.ledger.journal {
            let pid = slot.pid.as_raw() as u32;
            j.worker_exited(
                pid,
                journal::now_unix_us(),
                code,
                signal,
                slot.served,
                reason,
            );
        }
    }

    /// Counts a worker that died having served nothing; too many in the
    /// window start an exponential respawn back-off (Erlang's intensity and
    /// period, systemd's RestartSteps).
    fn note_early_death(&mut self, now: Instant) {
        self.early_deaths.push_back(now);
        while self
            .early_deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            self.early_deaths.pop_front();
        }
        if self.early_deaths.len() <= CRASH_INTENSITY.max(self.target) {
            self.backoff = Duration::ZERO;
            self.next_spawn_at = None;
            return;
        }
        self.backoff = if self.backoff.is_zero() {
            BACKOFF_FIRST
        } else {
            (self.backoff * 2).min(BACKOFF_CAP)
        };
        self.next_spawn_at = Some(now + self.backoff);
        log::error!(
            "crash loop: {} workers died before serving a request in the last {} s; next start in {} ms",
            self.early_deaths.len(),
            CRASH_WINDOW.as_secs(),
            self.backoff.as_millis()
        );
    }

    fn oldest_active(&self) -> Option<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_active())
            .min_by_key(|&i| self.slots[i].started)
    }

    /// Stops giving work to worker `i`; it exits once it has answered what
    /// it holds (its request pipe closes after the queued frames).
    fn retire(&mut self, i: usize, reason: ExitReason) {
        let slot = &mut self.slots[i];
        if matches!(slot.state, SlotState::Booting | SlotState::Ready) {
            log::debug!("retiring worker {} ({})", slot.pid, reason.as_str());
            slot.state = SlotState::Retiring(reason);
            slot.replace_pending = false;
            flush_slot(slot);
        }
    }

    /// SIGHUP: start a fresh worker for every current one; each old worker
    /// keeps serving until a new one is ready, then retires.
    fn reload(&mut self) {
        if !matches!(self.phase, Phase::Running) || self.cfg.workers == 0 {
            return;
        }
        let mut n = 0;
        for slot in &mut self.slots {
            if slot.is_active() {
                slot.replace_pending = true;
                n += 1;
            }
        }
        log::info!("SIGHUP: replacing {n} workers");
    }

    fn begin_drain(&mut self, sig: Signal) {
        log::info!(
            "{sig}: draining {} workers (graceful timeout {:?})",
            self.slots.len(),
            self.cfg.graceful_timeout
        );
        self.phase = Phase::Draining {
            deadline: Instant::now() + self.cfg.graceful_timeout,
        };
        let _ = self.epoll.delete(self.responder.socket.as_fd());
        for i in 0..self.slots.len() {
            self.retire(i, ExitReason::Stop);
        }
        if self.slots.is_empty() {
            self.phase = Phase::Stopped;
        }
    }

    /// QUIT, a second TERM/INT, or the graceful timeout: stop reading,
    /// close every request pipe, and send every worker `QUIT` (it finishes
    /// the batch of replies in progress, abandons the rest and exits). What
    /// each one held is answered as it is reaped; a worker still alive at
    /// the deadline gets `KILL`. Asked again while stopping: `KILL` now.
    fn stop_now(&mut self) {
        let now = Instant::now();
        if matches!(self.phase, Phase::Stopping { .. }) {
            for slot in &self.slots {
                let _ = kill(slot.pid, Signal::SIGKILL);
            }
            return;
        }
        if matches!(self.phase, Phase::Running) {
            let _ = self.epoll.delete(self.responder.socket.as_fd());
        }
        self.phase = Phase::Stopping {
            kill_at: now + QUIT_GRACE,
        };
        for slot in &mut self.slots {
            close_requests(slot);
            if !matches!(slot.state, SlotState::Killed(_)) {
                slot.state = SlotState::Killed(ExitReason::Stop);
                let _ = kill(slot.pid, Signal::SIGQUIT);
            }
        }
        if self.slots.is_empty() {
            self.phase = Phase::Stopped;
        }
    }

    /// How long `epoll_wait` may sleep: until the nearest deadline, at most 1 s.
    fn next_wakeup(&self, now: Instant) -> u16 {
        let mut until = now + Duration::from_secs(1);
        for slot in &self.slots {
            if matches!(slot.state, SlotState::Killed(_)) {
                continue; // settled when reaped, not timed
            }
            if let Some(r) = slot.inflight.front() {
                until = until.min(r.dispatched + self.cfg.request_timeout);
            }
        }
        if let Some(t) = self.next_spawn_at {
            until = until.min(t);
        }
        match self.phase {
            Phase::Booting { deadline } | Phase::Draining { deadline } => {
                until = until.min(deadline)
            }
            Phase::Stopping { kill_at } => until = until.min(kill_at),
            Phase::Running | Phase::Stopped => {}
        }
        // Round up so that a deadline is past when the loop wakes.
        let ms = until
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000);
        ms.min(1000) as u16
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

/// The pid, exit code and signal of a child that has ended; `None` for a
/// status that is not an end (stopped, continued).
fn exit_of(status: WaitStatus) -> Option<(Pid, Option<i32>, Option<i32>)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, Some(code), None)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, None, Some(sig as i32))),
        _ => None,
    }
}

/// Hands `req` to the worker with the fewest requests in flight
/// (round-robin among ties); gives it back when every worker is full.
fn dispatch(
    slots: &mut [WorkerSlot],
    rr: &mut usize,
    max_inflight: usize,
    mut req: InFlight,
    now: Instant,
) -> Result<(), InFlight> {
    let n = slots.len();
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (*rr + k) % n;
        if slots[i].takes_work(max_inflight)
            && best.is_none_or(|b| slots[i].inflight.len() < slots[b].inflight.len())
        {
            best = Some(i);
        }
    }
    let Some(i) = best else { return Err(req) };
    *rr = i + 1;
    let slot = &mut slots[i];
    req.dispatched = now;
    frame::encode_request(req.seq, req.client, &req.payload, &mut slot.outbox);
    slot.inflight.push_back(req);
    slot.dispatched += 1;
    if slot.request_limit > 0 && slot.dispatched >= slot.request_limit {
        log::debug!("worker {} reached --max-requests: retiring", slot.pid);
        slot.state = SlotState::Retiring(ExitReason::Retired);
        slot.replace_pending = false;
    }
    Ok(())
}

/// Writes as much of the slot's outbox as its pipe takes; closes the pipe
/// of a retiring worker once everything queued for it is written.
fn flush_slot(slot: &mut WorkerSlot) {
    while slot.outbox_sent < slot.outbox.len() {
        let Some(fd) = slot.requests.as_ref() else {
            break;
        };
        match nix::unistd::write(fd, &slot.outbox[slot.outbox_sent..]) {
            Ok(n) => slot.outbox_sent += n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return,
            Err(e) => {
                // EPIPE: the worker is dead; reaping settles its requests.
                log::debug!("worker {}: request pipe: {e}", slot.pid);
                close_requests(slot);
                return;
            }
        }
    }
    slot.outbox.clear();
    slot.outbox_sent = 0;
    if matches!(slot.state, SlotState::Retiring(_)) {
        slot.requests = None;
    }
}

fn close_requests(slot: &mut WorkerSlot) {
    slot.requests = None;
    slot.outbox.clear();
    slot.outbox_sent = 0;
}

/// `--workers 0`: the master answers with the same function a worker uses;
/// its loop never blocks and never aborts, so `sleep` and `crash` are
/// refused (`disabled`).
fn answer_inline(
    responder: &mut Responder,
    ledger: &mut Ledger,
    pid: u32,
    client: SocketAddr,
    payload: &[u8],
    now: Instant,
    now_us: i64,
) {
    let ctx = ReplyContext {
        worker_pid: pid,
        client,
    };
    // The inline host never fails and never abandons a request.
    let Ok(Some(done)) = answer::answer(payload, &ctx, &mut InlineHost(responder)) else {
        return;
    };
    if done.outcome != Outcome::NoReply {
        responder.batch.commit(client);
    }
    ledger.record(
        client,
        now,
        now_us,
        done.op,
        Some(pid),
        done.outcome,
        done.id,
        Instant::now(),
    );
}

/// The master as the host of inline answers.
struct InlineHost<'r>(&'r mut Responder);

impl answer::Host for InlineHost<'_> {
    type Error = std::convert::Infallible;

    fn perform(&mut self, effect: answer::Effect) -> Result<answer::Verdict, Self::Error> {
        Ok(answer::Verdict::Refused(match effect {
            answer::Effect::Sleep { .. } => {
                "op sleep would stall the master: it needs a worker pool (--workers 1 or more)"
            }
            answer::Effect::Crash => {
                "op crash is disabled with --workers 0: the master never aborts"
            }
        }))
    }

    fn reply_buf(&mut self) -> Result<&mut Vec<u8>, Self::Error> {
        self.0.ensure_room();
        Ok(self.0.batch.next_buf())
    }
}

/// The body of a `stats` reply.
fn stats_json(a: &Arbiter, now: Instant) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{json, Value};
    let t = &a.ledger.totals;
    let errors: serde_json::Map<String, Value> = ErrorCode::ALL
        .iter()
        .filter(|c| t.errors[**c as usize] > 0)
        .map(|c| (c.as_str().to_owned(), json!(t.errors[*c as usize])))
        .collect();
    let workers: Vec<Value> = a
        .slots
        .iter()
        .map(|s| {
            json!({
                "pid": s.pid.as_raw(),
                "age_s": (now.duration_since(s.started).as_secs_f64() * 1000.0).round() / 1000.0,
                "served": s.served,
                "in_flight": s.inflight.len(),
                "state": s.state_name(),
            })
        })
        .collect();
    let (shed, written) = a
        .ledger
        .journal
        .as_ref()
        .map_or((0, 0), |j| (j.shed_rows(), j.written_rows()));
    let body = json!({
        "master_pid": a.master_pid,
        "uptime_s": (now.duration_since(a.started).as_secs_f64() * 1000.0).round() / 1000.0,
        "pool": {
            "target": a.target,
            "active": a.slots.iter().filter(|s| s.is_active()).count(),
            "max_inflight": a.cfg.max_inflight,
        },
        "workers": workers,
        "totals": {
            "received": t.received,
            "answered": t.answered(),
            "ok": t.ok,
            "errors": errors,
            "busy": t.errors[ErrorCode::Busy as usize],
            "crashes": t.crashes,
            "timeouts": t.timeouts,
            "restarts": t.restarts,
            "redispatched": t.redispatched,
            "replies_dropped": a.responder.dropped,
            "journal_written": written,
            "journal_shed": shed,
        },
    });
    match body {
        Value::Object(m) => m,
        _ => unreachable!("json! of an object literal"),
    }
}
