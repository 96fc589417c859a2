//! Worker slots: what the master knows of each worker process and the
//! requests each one holds, and the pure decisions made over them: which
//! worker takes a request, which workers retire and how many start, which
//! deadline is next, and what becomes of the requests a dead worker held.
//! Nothing here starts, signals or reads a process; the arbiter does, and
//! these functions are unit-tested without any.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use protocol::frame::{self, FrameBuf};
use protocol::ErrorCode;

use crate::exit::{ChildExit, ExitReason};

/// When the master received a datagram: for its deadlines, its latency, and
/// its journal row's wall time and HLC stamp.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    /// The monotonic instant.
    pub at: Instant,
    /// The same moment as wall-clock microseconds.
    pub unix_us: i64,
    /// The HLC stamp (NTP64 time) of the `recvmmsg` batch it came in.
    pub hlc: u64,
}

impl Receipt {
    /// A receipt at `at` with no wall time or stamp (for tests and
    /// decisions that only need the instant).
    pub fn at(at: Instant) -> Receipt {
        Receipt {
            at,
            unix_us: 0,
            hlc: 0,
        }
    }
}

/// A request handed to a worker and not yet reported done.
#[derive(Debug)]
pub struct InFlight {
    /// The master's sequence number, echoed in the worker's completion.
    pub seq: u64,
    /// Where the reply goes.
    pub client: SocketAddr,
    /// When the master received it.
    pub received: Receipt,
    /// When it was handed to its current worker: the request timeout runs
    /// from here, so a request re-dispatched after its worker was killed
    /// gets a whole timeout at the next one.
    pub dispatched: Instant,
    /// The largest reply its source may get (`u32::MAX`: trusted, no bound).
    pub reply_limit: u32,
    /// The datagram, kept so it can be re-dispatched if the worker dies.
    pub payload: Vec<u8>,
    /// Already re-dispatched once after a crash: a second crash fails it.
    pub redispatched: bool,
    /// Its entry in the duplicate request cache, if it has one: its worker
    /// is then asked to send the reply back, and its end is reported to
    /// the cache.
    pub dedup: Option<crate::dedup::Token>,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Started; its READY frame has not arrived yet. It already takes work:
    /// requests wait in its pipe.
    Booting,
    /// Serving.
    Ready,
    /// Takes no new work; its request pipe is closed once the bytes already
    /// queued for it are written, so it exits after answering what it holds.
    Retiring(ExitReason),
    /// Sent a stop signal (`QUIT`, then `KILL`; or `KILL` at once for a
    /// timeout). It takes no work; what it holds is settled when it has been
    /// reaped and its completion pipe read to the end, so that a request it
    /// answered is never answered again.
    Killed(ExitReason),
}

/// One worker process, as the master tracks it.
pub struct WorkerSlot {
    /// A number unique over the master's life: epoll tokens use it, since
    /// PIDs and slot positions are reused.
    pub serial: u64,
    /// The worker's PID.
    pub pid: Pid,
    /// When it was started.
    pub started: Instant,
    /// Where it is in its life.
    pub state: SlotState,
    /// Still serving, but a SIGHUP asked for its replacement: it retires as
    /// soon as a new worker reports ready.
    pub replace_pending: bool,
    /// It sent STOPPING (it got SIGTERM): it retires at the next turn.
    pub stop_requested: bool,
    /// Write end of its request pipe; `None` once closed.
    pub requests: Option<OwnedFd>,
    /// Frames queued for the request pipe that did not fit in it yet.
    pub outbox: Vec<u8>,
    /// How much of `outbox` is already written.
    pub outbox_sent: usize,
    /// Read end of its completion pipe; `None` after end of stream.
    pub completions: Option<OwnedFd>,
    /// Completion bytes read but not yet decoded.
    pub inbox: FrameBuf,
    /// Requests it holds, oldest first; workers answer in order.
    pub inflight: VecDeque<InFlight>,
    /// Requests handed to it over its life.
    pub dispatched: u64,
    /// Requests it reported done.
    pub served: u64,
    /// Retire after this many requests (0: never).
    pub request_limit: u64,
    /// The request it was killed for holding past `--request-timeout-ms`.
    pub timed_out: Option<u64>,
    /// How it ended, once reaped; it is settled when its completions have
    /// also been read to the end.
    pub exit: Option<ChildExit>,
    /// Whether its completion pipe wakes the master ([`completions_wake`]).
    pub wakes: bool,
    /// When the replies of the completions being read left the worker
    /// (its last SENT_AT frame, on the master's clock).
    pub sent_at: Option<Instant>,
}

impl WorkerSlot {
    /// A worker just started, with the master's ends of its pipes.
    pub fn new(
        serial: u64,
        pid: Pid,
        requests: OwnedFd,
        completions: OwnedFd,
        max_inflight: usize,
        request_limit: u64,
        now: Instant,
    ) -> WorkerSlot {
        WorkerSlot {
            serial,
            pid,
            started: now,
            state: SlotState::Booting,
            replace_pending: false,
            stop_requested: false,
            requests: Some(requests),
            outbox: Vec::with_capacity(4096),
            outbox_sent: 0,
            completions: Some(completions),
            inbox: FrameBuf::with_capacity(16 * 1024),
            inflight: VecDeque::with_capacity(max_inflight.min(1024)),
            dispatched: 0,
            served: 0,
            request_limit,
            timed_out: None,
            exit: None,
            wakes: true,
            sent_at: None,
        }
    }

    /// Whether it has been handed its `--max-requests` budget.
    pub fn budget_spent(&self) -> bool {
        self.request_limit > 0 && self.dispatched >= self.request_limit
    }

    /// Whether new requests may go to this worker.
    pub fn takes_work(&self, max_inflight: usize) -> bool {
        matches!(self.state, SlotState::Booting | SlotState::Ready)
            && self.requests.is_some()
            && !self.budget_spent()
            && !self.stop_requested
            && self.inflight.len() < max_inflight
    }

    /// Whether it counts toward the pool size: not on its way out.
    pub fn is_active(&self) -> bool {
        matches!(self.state, SlotState::Booting | SlotState::Ready)
            && !self.replace_pending
            && !self.budget_spent()
            && !self.stop_requested
    }

    /// Whether it is reaped and its completion stream has ended: what it
    /// still holds got no reply from it.
    pub fn settled(&self) -> bool {
        self.exit.is_some() && self.completions.is_none()
    }

    /// Closes its request pipe and forgets the frames not yet written (the
    /// requests stay in `inflight`, to be settled).
    pub fn close_requests(&mut self) {
        self.requests = None;
        self.outbox.clear();
        self.outbox_sent = 0;
    }

    /// Queues `req` for this worker (a REQUEST frame in its outbox).
    pub fn assign(&mut self, mut req: InFlight, now: Instant) {
        req.dispatched = now;
        frame::encode_request(
            req.seq,
            req.reply_limit,
            req.dedup.is_some(),
            req.client,
            &req.payload,
            &mut self.outbox,
        );
        self.inflight.push_back(req);
        self.dispatched += 1;
    }

    /// Its state as `stats` shows it.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            SlotState::Booting => "booting",
            SlotState::Ready if self.replace_pending => "replacing",
            SlotState::Ready if self.inflight.is_empty() => "idle",
            SlotState::Ready => "busy",
            SlotState::Retiring(_) => "retiring",
            SlotState::Killed(_) => "killed",
        }
    }
}

/// Whether a worker's completion pipe should wake the master from
/// `epoll_wait`. Not while it simply serves: the master reads the pipe of
/// a worker holding requests at its turns anyway ([`completions_due`]),
/// and is woken by the datagrams that keep it busy, so a completion costs
/// the worker no wake-up of the master (and the master no extra turn); an
/// idle worker's pipe is read at turns woken by a signal or a timeout, and
/// at least every 100 ms. It does wake the master while the master waits for it:
/// `master_waits` (requests queued for room, or the master is not
/// reading: booting, draining, stopping, handed over), and for a worker
/// booting (READY), retiring or killed (its end of stream), asked to stop
/// (STOPPING) or reaped.
pub fn completions_wake(slot: &WorkerSlot, master_waits: bool) -> bool {
    master_waits || slot.state != SlotState::Ready || slot.stop_requested || slot.exit.is_some()
}

/// How long a serving worker's oldest request may be held before the
/// master reads its completion pipe at a turn where nothing else asks for
/// it ([`completions_due`]).
pub const READ_AFTER: Duration = Duration::from_millis(1);

/// Whether the master reads the completion pipe of a worker that does not
/// wake it ([`completions_wake`]) this turn: at a turn that reads them
/// all (`all`: a sweep, requests waiting for room, a `stats` request;
/// a sweep reads idle workers too),
/// and otherwise once the worker holds half of `max_inflight` or has held
/// its oldest request for `after` ([`READ_AFTER`], at most half the
/// request timeout, so a request is never found expired unread).
///
/// At peak the master turns every 20-30 µs with a few datagrams each;
/// reading every serving worker's pipe at each of them was 2.6 reads a
/// turn, most finding the pipe empty (docs/PERFORMANCE.md). Read late,
/// a completion changes nothing a client sees: its reply has left, the
/// journal's latency ends at the worker's SENT_AT, and a retry of its
/// request is held as in flight meanwhile.
pub fn completions_due(
    slot: &WorkerSlot,
    now: Instant,
    after: Duration,
    max_inflight: usize,
    all: bool,
) -> bool {
    all || slot.inflight.front().is_some_and(|oldest| {
        slot.inflight.len() * 2 >= max_inflight
            || now.saturating_duration_since(oldest.dispatched) >= after
    })
}

// ----- dispatch ---------------------------------------------------------------

/// The worker that takes the next request: the one with the fewest
/// requests in flight, the first from `start` among ties (round-robin);
/// `None` when every worker is full or on its way out.
pub fn choose(slots: &[WorkerSlot], start: usize, max_inflight: usize) -> Option<usize> {
    let n = slots.len();
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if slots[i].takes_work(max_inflight)
            && best.is_none_or(|b| slots[i].inflight.len() < slots[b].inflight.len())
        {
            best = Some(i);
        }
    }
    best
}

/// A request the master has read (or taken back from a worker that
/// stopped) and not yet placed.
#[derive(Debug)]
pub struct Pending {
    /// The request.
    pub req: InFlight,
    /// The error it gets if no worker can take it.
    pub if_unplaced: ErrorCode,
    /// When it first found every worker full.
    pub since: Option<Instant>,
}

/// How long a request may wait in the master for a worker with room
/// before it is answered `busy` (or its error), unless the pool is growing
/// (HAProxy's `timeout queue`, much shorter). Long enough that a moment's
/// stall of the workers (the scheduler giving a core to something else for
/// a few ms) does not turn into `busy` replies at a load the pool sustains:
/// with 2 ms, 80% of the journal configuration's peak got hundreds to
/// thousands of them per 4 s run on two cores, with 10 ms none
/// (docs/PERFORMANCE.md). Under overload clients still hear `busy`, this
/// much later, and the master holds at most `QUEUE_CAP` requests meanwhile
/// (the kernel's queue the rest).
pub const BUSY_AFTER: Duration = Duration::from_millis(20);

/// How many requests of one turn go to the same worker before the next
/// one is chosen. Each worker that gets work is a pipe write, a wake-up
/// and a `sendmmsg` of its own: a short batch kept together costs one of
/// each instead of one per worker, and a long batch is still spread in
/// runs of this size, so every worker gets its share under load.
///
/// Only where every request is short work: with `--enable-fault-injection`
/// a `sleep` would hold the requests kept behind it in the same worker
/// while others sit idle, so there each request goes to the least-loaded
/// worker on its own ([`Dispatcher::spreading`]).
pub const KEEP_TOGETHER: usize = 16;

/// Requests waiting for a worker, oldest first, and the round-robin cursor.
#[derive(Debug)]
pub struct Dispatcher {
    queue: VecDeque<Pending>,
    rr: usize,
    /// Requests of one turn placed on one worker before the next is
    /// chosen: [`KEEP_TOGETHER`], or 1 when requests may be long.
    run: usize,
}

impl Default for Dispatcher {
    fn default() -> Dispatcher {
        Dispatcher {
            queue: VecDeque::new(),
            rr: 0,
            run: KEEP_TOGETHER,
        }
    }
}

impl Dispatcher {
    /// A dispatcher that gives each request to the least-loaded worker
    /// on its own (requests may block: `sleep` with fault injection).
    pub fn spreading() -> Dispatcher {
        Dispatcher {
            run: 1,
            ..Dispatcher::default()
        }
    }

    /// Queues `req`; `if_unplaced` is the error it gets if no worker takes it.
    pub fn push(&mut self, req: InFlight, if_unplaced: ErrorCode) {
        self.queue.push_back(Pending {
            req,
            if_unplaced,
            since: None,
        });
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Places waiting requests, oldest first, while some worker has room,
    /// in runs of up to [`KEEP_TOGETHER`] (or 1: [`Dispatcher::spreading`])
    /// on the least-loaded worker;
    /// returns how many were placed. The rest found every worker full: each
    /// waits up to [`BUSY_AFTER`] for room (completions free slots within
    /// microseconds under normal load), longer only while the pool is
    /// `growing` (workers were started this turn, as `--max-requests 1`
    /// does for every request); after that it goes to `refused`, to be
    /// answered with its error.
    pub fn place(
        &mut self,
        slots: &mut [WorkerSlot],
        max_inflight: usize,
        now: Instant,
        growing: bool,
        refused: &mut Vec<Pending>,
    ) -> usize {
        let mut placed = 0;
        // The worker of the current run and how many it got in it.
        let mut run: Option<(usize, usize)> = None;
        while !self.queue.is_empty() {
            let i = match run {
                Some((i, n)) if n < self.run && slots[i].takes_work(max_inflight) => i,
                _ => match choose(slots, self.rr, max_inflight) {
                    Some(i) => i,
                    None => break,
                },
            };
            let p = self.queue.pop_front().expect("not empty");
            slots[i].assign(p.req, now);
            run = Some(match run {
                Some((j, n)) if j == i => (i, n + 1),
                _ => (i, 1),
            });
            self.rr = i + 1;
            placed += 1;
        }
        if !growing {
            while self
                .queue
                .front()
                .is_some_and(|p| p.since.is_some_and(|t| now >= t + BUSY_AFTER))
            {
                refused.push(self.queue.pop_front().expect("not empty"));
            }
        }
        for p in &mut self.queue {
            p.since.get_or_insert(now);
        }
        placed
    }

    /// When the oldest waiting request's wait for room ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue
            .front()
            .map(|p| p.since.map_or(Instant::now(), |t| t + BUSY_AFTER))
    }

    /// Takes every waiting request out (the server is stopping).
    pub fn drain(&mut self, out: &mut Vec<Pending>) {
        out.extend(self.queue.drain(..));
    }
}

// ----- the pool's size ---------------------------------------------------------

/// What `manage_workers` does this turn.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PoolPlan {
    /// Workers to retire (slot index and why), each after its queued work.
    pub retire: Vec<(usize, ExitReason)>,
    /// Workers to start.
    pub spawn: usize,
}

/// Brings the pool toward `target` workers: retires the workers that asked
/// to stop (STOPPING) or spent their `--max-requests` budget; retires the
/// oldest when there are more than `target` (TTOU); lets a worker replaced
/// by SIGHUP go once a new one is ready to take its place; and starts as
/// many as are missing.
pub fn plan(slots: &[WorkerSlot], target: usize) -> PoolPlan {
    let mut plan = PoolPlan::default();
    let serving = |s: &WorkerSlot| matches!(s.state, SlotState::Booting | SlotState::Ready);
    // The common turn changes nothing: count first, allocate only to act.
    let active = slots.iter().filter(|s| s.is_active()).count();
    let replaced = slots
        .iter()
        .filter(|s| serving(s) && s.replace_pending)
        .count();
    for (i, s) in slots.iter().enumerate().filter(|(_, s)| serving(s)) {
        if s.stop_requested {
            plan.retire.push((i, ExitReason::Terminated));
        } else if s.budget_spent() {
            plan.retire.push((i, ExitReason::Retired));
        }
    }
    let mut kept = active;
    if active > target {
        let mut oldest: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_active()).collect();
        oldest.sort_by_key(|&i| slots[i].started);
        let excess = active - target;
        plan.retire
            .extend(oldest[..excess].iter().map(|&i| (i, ExitReason::Scaled)));
        kept = target;
    }
    if replaced > 0 {
        let mut old: Vec<usize> = (0..slots.len())
            .filter(|&i| serving(&slots[i]) && slots[i].replace_pending)
            .collect();
        old.sort_by_key(|&i| slots[i].started);
        let fresh_ready = slots
            .iter()
            .filter(|s| s.is_active() && s.state == SlotState::Ready)
            .count()
            .min(kept);
        let keep_old = target.saturating_sub(fresh_ready).min(old.len());
        plan.retire.extend(
            old[..old.len() - keep_old]
                .iter()
                .map(|&i| (i, ExitReason::Reload)),
        );
    }
    plan.spawn = target.saturating_sub(kept);
    plan
}

// ----- deadlines ---------------------------------------------------------------

/// Whether the worker's oldest request has waited at it for `timeout`.
pub fn expired(slot: &WorkerSlot, now: Instant, timeout: Duration) -> bool {
    !matches!(slot.state, SlotState::Killed(_))
        && slot
            .inflight
            .front()
            .is_some_and(|r| now.duration_since(r.dispatched) >= timeout)
}

/// The earliest moment some worker's oldest request times out.
pub fn next_timeout(slots: &[WorkerSlot], timeout: Duration) -> Option<Instant> {
    slots
        .iter()
        .filter(|s| !matches!(s.state, SlotState::Killed(_)))
        .filter_map(|s| s.inflight.front().map(|r| r.dispatched + timeout))
        .min()
}

// ----- settling a dead worker's requests ----------------------------------------

/// What becomes of a request a worker held when it ended unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Answered now with this error.
    Answer(ErrorCode),
    /// Handed to another worker; this error if none can take it.
    Redispatch(ErrorCode),
}

/// Decides for one request left with a worker that ended for `reason`:
/// the request a hung worker was killed for gets `timeout`; a stop gives
/// `shutting_down`; a crash re-dispatches once (a second crash fails the
/// request `worker_crashed`: it may be a poison request); anything else
/// (queued behind a hung request, held by a worker that stopped) did
/// nothing wrong and goes to another worker.
pub fn settle(reason: ExitReason, timed_out: Option<u64>, req: &InFlight) -> Settlement {
    match reason {
        ExitReason::TimeoutKill if timed_out == Some(req.seq) => {
            Settlement::Answer(ErrorCode::Timeout)
        }
        ExitReason::Stop => Settlement::Answer(ErrorCode::ShuttingDown),
        r if r.is_crash() && req.redispatched => Settlement::Answer(ErrorCode::WorkerCrashed),
        r if r.is_crash() => Settlement::Redispatch(ErrorCode::WorkerCrashed),
        _ => Settlement::Redispatch(ErrorCode::Busy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::OFlag;

    fn slot(serial: u64, state: SlotState, held: usize) -> WorkerSlot {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
        let t0 = Instant::now();
        let mut s = WorkerSlot::new(
            serial,
            Pid::from_raw(1000 + serial as i32),
            w,
            r,
            128,
            0,
            t0 + Duration::from_millis(serial),
        );
        s.state = state;
        for k in 0..held {
            s.inflight.push_back(req(k as u64, t0));
        }
        s
    }

    /// `n` ready, idle workers.
    fn ready_slots(n: u64) -> Vec<WorkerSlot> {
        (0..n).map(|s| slot(s, SlotState::Ready, 0)).collect()
    }

    /// How many requests each worker holds.
    fn held(slots: &[WorkerSlot]) -> Vec<usize> {
        slots.iter().map(|s| s.inflight.len()).collect()
    }

    fn req(seq: u64, at: Instant) -> InFlight {
        InFlight {
            seq,
            client: "127.0.0.1:9".parse().unwrap(),
            received: Receipt::at(at),
            dispatched: at,
            reply_limit: u32::MAX,
            payload: b"7".to_vec(),
            redispatched: false,
            dedup: None,
        }
    }

    #[test]
    fn a_serving_workers_completions_are_read_once_due() {
        let after = READ_AFTER;
        let idle = slot(0, SlotState::Ready, 0);
        let busy = slot(1, SlotState::Ready, 3);
        let sent = busy.inflight.front().unwrap().dispatched;
        // Not while its oldest request is younger than `after`...
        assert!(!completions_due(&busy, sent, after, 128, false));
        assert!(!completions_due(&busy, sent + after / 2, after, 128, false));
        // ...then at every turn.
        assert!(completions_due(&busy, sent + after, after, 128, false));
        // At once when it holds half its room, or the turn reads them all.
        assert!(completions_due(&busy, sent, after, 6, false));
        assert!(!completions_due(&busy, sent, after, 7, false));
        assert!(completions_due(&busy, sent, after, 128, true));
        // An idle worker's only when all are read (a sweep).
        assert!(!completions_due(
            &idle,
            sent + after * 10,
            after,
            128,
            false
        ));
        assert!(completions_due(&idle, sent, after, 128, true));
        // With `--max-inflight 1` a worker holding one is always due.
        assert!(completions_due(
            &slot(2, SlotState::Ready, 1),
            Instant::now(),
            after,
            1,
            false
        ));
    }

    #[test]
    fn completions_wake_the_master_only_when_it_waits_for_them() {
        // A ready worker, idle or busy, does not wake a master that serves.
        assert!(!completions_wake(&slot(0, SlotState::Ready, 0), false));
        assert!(!completions_wake(&slot(0, SlotState::Ready, 5), false));
        // It does while requests wait for room, or the master does not read.
        assert!(completions_wake(&slot(0, SlotState::Ready, 5), true));
        // Booting (READY), retiring or killed (their end of stream).
        assert!(completions_wake(&slot(0, SlotState::Booting, 0), false));
        let retiring = SlotState::Retiring(ExitReason::Retired);
        assert!(completions_wake(&slot(0, retiring, 3), false));
        let killed = SlotState::Killed(ExitReason::TimeoutKill);
        assert!(completions_wake(&slot(0, killed, 1), false));
        // Asked to stop (STOPPING), or reaped.
        let mut stopping = slot(0, SlotState::Ready, 0);
        stopping.stop_requested = true;
        assert!(completions_wake(&stopping, false));
        let mut reaped = slot(0, SlotState::Ready, 2);
        reaped.exit = Some(ChildExit {
            pid: reaped.pid,
            code: None,
            signal: Some(9),
        });
        assert!(completions_wake(&reaped, false));
    }

    #[test]
    fn choose_takes_the_least_loaded_round_robin_among_ties() {
        let slots = vec![
            slot(0, SlotState::Ready, 2),
            slot(1, SlotState::Ready, 1),
            slot(2, SlotState::Booting, 1),
        ];
        assert_eq!(choose(&slots, 0, 8), Some(1));
        assert_eq!(choose(&slots, 2, 8), Some(2));
        assert_eq!(choose(&slots, 2, 1), None, "every worker is full");
    }

    #[test]
    fn choose_skips_workers_on_their_way_out() {
        let mut slots = vec![
            slot(0, SlotState::Retiring(ExitReason::Reload), 0),
            slot(1, SlotState::Killed(ExitReason::TimeoutKill), 0),
            slot(2, SlotState::Ready, 5),
        ];
        assert_eq!(choose(&slots, 0, 8), Some(2));
        slots[2].stop_requested = true;
        assert_eq!(choose(&slots, 0, 8), None);
    }

    #[test]
    fn a_spent_budget_takes_no_more_work() {
        let mut s = slot(0, SlotState::Ready, 0);
        s.request_limit = 1;
        assert!(s.takes_work(8) && s.is_active());
        s.assign(req(9, Instant::now()), Instant::now());
        assert!(!s.takes_work(8) && !s.is_active());
    }

    #[test]
    fn busy_comes_after_a_short_wait_for_room() {
        let t = Instant::now();
        let mut slots = vec![slot(0, SlotState::Ready, 1)];
        let mut d = Dispatcher::default();
        let mut refused = Vec::new();
        d.push(req(1, t), ErrorCode::Busy);
        // Full: it waits.
        assert_eq!(d.place(&mut slots, 1, t, false, &mut refused), 0);
        assert!(refused.is_empty() && d.len() == 1);
        assert_eq!(d.next_deadline(), Some(t + BUSY_AFTER));
        // The worker answered within the wait: placed.
        slots[0].inflight.clear();
        assert_eq!(d.place(&mut slots, 1, t, false, &mut refused), 1);
        // Full again, and still full after the wait: refused.
        d.push(req(2, t), ErrorCode::Busy);
        assert_eq!(d.place(&mut slots, 1, t, false, &mut refused), 0);
        let later = t + BUSY_AFTER;
        assert_eq!(d.place(&mut slots, 1, later, true, &mut refused), 0);
        assert!(refused.is_empty(), "a growing pool keeps it waiting");
        assert_eq!(d.place(&mut slots, 1, later, false, &mut refused), 0);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].req.seq, 2);
        assert!(d.is_empty());
    }

    #[test]
    fn a_short_batch_stays_on_one_worker_and_a_long_one_is_spread_in_runs() {
        let t = Instant::now();
        let mut slots = ready_slots(4);
        let mut d = Dispatcher::default();
        let mut refused = Vec::new();
        for seq in 0..5 {
            d.push(req(seq, t), ErrorCode::Busy);
        }
        assert_eq!(d.place(&mut slots, 128, t, false, &mut refused), 5);
        assert_eq!(held(&slots), [5, 0, 0, 0]);
        // The next turn starts at the least-loaded worker after the last one.
        for seq in 5..(5 + 3 * KEEP_TOGETHER as u64) {
            d.push(req(seq, t), ErrorCode::Busy);
        }
        d.place(&mut slots, 128, t, false, &mut refused);
        assert_eq!(
            held(&slots),
            [5, KEEP_TOGETHER, KEEP_TOGETHER, KEEP_TOGETHER]
        );
        // A full worker ends its run early.
        for seq in 100..104 {
            d.push(req(seq, t), ErrorCode::Busy);
        }
        d.place(&mut slots, 6, t, false, &mut refused);
        assert_eq!(
            held(&slots),
            [6, KEEP_TOGETHER, KEEP_TOGETHER, KEEP_TOGETHER]
        );
        assert_eq!(d.len(), 3);
    }

    #[test]
    fn a_spreading_dispatcher_gives_each_request_the_least_loaded_worker() {
        let t = Instant::now();
        let mut slots = ready_slots(4);
        let mut d = Dispatcher::spreading();
        let mut refused = Vec::new();
        for seq in 0..6 {
            d.push(req(seq, t), ErrorCode::Busy);
        }
        assert_eq!(d.place(&mut slots, 128, t, false, &mut refused), 6);
        assert_eq!(held(&slots), [2, 2, 1, 1]);
    }

    #[test]
    fn requests_are_placed_in_order_as_room_appears() {
        let t = Instant::now();
        let mut slots = vec![slot(0, SlotState::Ready, 0)];
        let mut d = Dispatcher::default();
        let mut refused = Vec::new();
        for seq in 0..3 {
            d.push(req(seq, t), ErrorCode::Busy);
        }
        for seq in 0..3 {
            assert_eq!(d.place(&mut slots, 1, t, false, &mut refused), 1);
            assert_eq!(slots[0].inflight[0].seq, seq);
            slots[0].inflight.clear();
        }
        assert!(refused.is_empty() && d.is_empty());
    }

    #[test]
    fn the_plan_fills_the_pool_and_retires_the_oldest_extra() {
        let mut slots = vec![slot(0, SlotState::Ready, 0), slot(1, SlotState::Ready, 0)];
        assert_eq!(plan(&slots, 3).spawn, 1);
        let p = plan(&slots, 1);
        assert_eq!(p.retire, vec![(0, ExitReason::Scaled)]);
        assert_eq!(p.spawn, 0);
        slots[1].stop_requested = true;
        let p = plan(&slots, 2);
        assert_eq!(p.retire, vec![(1, ExitReason::Terminated)]);
        assert_eq!(p.spawn, 1);
    }

    #[test]
    fn a_reloaded_worker_goes_only_once_a_new_one_is_ready() {
        let mut slots = vec![slot(0, SlotState::Ready, 0), slot(1, SlotState::Ready, 0)];
        for s in &mut slots {
            s.replace_pending = true;
        }
        let p = plan(&slots, 2);
        assert_eq!((p.retire.len(), p.spawn), (0, 2));
        slots.push(slot(2, SlotState::Booting, 0));
        slots.push(slot(3, SlotState::Booting, 0));
        assert!(plan(&slots, 2).retire.is_empty());
        slots[2].state = SlotState::Ready;
        assert_eq!(plan(&slots, 2).retire, vec![(0, ExitReason::Reload)]);
        slots[3].state = SlotState::Ready;
        assert_eq!(
            plan(&slots, 2).retire,
            vec![(0, ExitReason::Reload), (1, ExitReason::Reload)]
        );
    }

    #[test]
    fn deadlines_skip_killed_workers() {
        let timeout = Duration::from_millis(100);
        let mut slots = vec![slot(0, SlotState::Ready, 1), slot(1, SlotState::Ready, 0)];
        let t = slots[0].inflight[0].dispatched;
        assert_eq!(next_timeout(&slots, timeout), Some(t + timeout));
        assert!(!expired(&slots[0], t, timeout));
        assert!(expired(&slots[0], t + timeout, timeout));
        slots[0].state = SlotState::Killed(ExitReason::TimeoutKill);
        assert!(!expired(&slots[0], t + timeout, timeout));
        assert_eq!(next_timeout(&slots, timeout), None);
    }

    #[test]
    fn only_the_hung_request_gets_timeout() {
        let t = Instant::now();
        let hung = req(1, t);
        let queued = req(2, t);
        assert_eq!(
            settle(ExitReason::TimeoutKill, Some(1), &hung),
            Settlement::Answer(ErrorCode::Timeout)
        );
        assert_eq!(
            settle(ExitReason::TimeoutKill, Some(1), &queued),
            Settlement::Redispatch(ErrorCode::Busy)
        );
        assert_eq!(
            settle(ExitReason::Stop, None, &queued),
            Settlement::Answer(ErrorCode::ShuttingDown)
        );
        assert_eq!(
            settle(ExitReason::Crash, None, &queued),
            Settlement::Redispatch(ErrorCode::WorkerCrashed)
        );
        let mut again = req(3, t);
        again.redispatched = true;
        assert_eq!(
            settle(ExitReason::Crash, None, &again),
            Settlement::Answer(ErrorCode::WorkerCrashed)
        );
        assert_eq!(
            settle(ExitReason::Terminated, None, &queued),
            Settlement::Redispatch(ErrorCode::Busy)
        );
    }
}
