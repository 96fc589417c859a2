//! One load process's engine: connected UDP sockets ([`Link`]s), the
//! request streams that send through them ([`Flow`]s, one per `--sockets`),
//! and one poll loop that sends, receives, matches, retries, fails over and
//! expires, in closed loop (a window of outstanding requests per flow) or
//! open loop (a fixed send schedule, wrk2-style).
//!
//! Every request carries a `u64` id: its flow's sequence number with the
//! flow's index in the low bits (`seq << flow_bits | flow`; with one socket
//! the id is the sequence number), so a reply on any socket finds its
//! request, whichever server it went to. Text requests encode the id in
//! the number they square. Each reply is counted answered, duplicate,
//! resent reply, late, wrong or unmatched.
//!
//! Servers ([`failover`](crate::failover)): each flow has a home link to
//! its home server (`--policy`) and sends its new requests there, or, while
//! that server is skipped, through the spare link of the next one. With
//! several servers each process has one spare link per server, which
//! failed-over requests use. An attempt without a reply within
//! `--timeout-ms` is sent again on the same link (`--retries`), then fails
//! over; a `busy` or `shutting_down` reply fails it over at once, and a
//! port unreachable on a link fails over every request at that server. A
//! request is lost when no server is left to try.
//!
//! Where a request lives: in its flow's ring, indexed by sequence number,
//! while on its first attempt (a slow one moves to `stragglers` when the
//! ring comes round to its slot); once sent again, in `retrying`, with its
//! deadlines in a queue in send order. Sending, receiving and expiring a
//! first attempt allocate nothing; retries and failovers may.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use log::{debug, warn};
use netio::{ConnectedRecvBatch, ConnectedSendBatch};
use nix::sys::socket::{setsockopt, sockopt};

use super::{stop_requested, time_bar, Pacing, Plan, PROGRESS_EVERY};
use crate::addr;
use crate::failover::{Failure, Health};
use crate::report::{ServerTally, Tally};
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

/// One request: in a ring slot indexed by its sequence number, among its
/// flow's stragglers, or (once sent more than once) among its retrying.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Its sequence number in its flow.
    seq: u64,
    state: State,
    kind: Kind,
    /// The link its latest attempt went out on.
    link: u16,
    /// The server it started at.
    start: u8,
    /// How far past `start` it has failed over.
    hop: u8,
    /// Attempts at its current server: 1, then 2 after one retry...
    attempt: u8,
    /// Datagrams sent for it, to every server.
    sends: u8,
    arg: i64,
    /// When it was first sent.
    sent_ns: u64,
    /// When it was meant to be sent: latency counts from here.
    intended_ns: u64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            seq: 0,
            state: State::Free,
            kind: Kind::Square,
            link: 0,
            start: 0,
            hop: 0,
            attempt: 0,
            sends: 0,
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
    /// A ring slot whose request was sent again: it lives in `retrying`.
    Moved,
}

/// When a resent request's latest attempt times out. A deadline whose
/// `sends` is not the request's any more was overtaken by a later send.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    seq: u64,
    at_ns: u64,
    sends: u8,
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

/// One connected socket, to one server.
struct Link {
    socket: UdpSocket,
    /// The server's index.
    server: usize,
    /// `"Hi <our address>. This is server `, as a greeting to us starts.
    greeting_prefix: String,
    /// The last send found the socket buffer full: wait for POLLOUT.
    blocked: bool,
}

impl Link {
    fn open(server: usize, to: SocketAddr) -> Result<Link> {
        let socket = UdpSocket::bind(addr::local_wildcard(to)).context("binding a load socket")?;
        socket
            .connect(to)
            .with_context(|| format!("connecting a load socket to {to}"))?;
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
        Ok(Link {
            socket,
            server,
            greeting_prefix: format!("\"Hi {local}. This is server "),
            blocked: false,
        })
    }
}

/// One stream of requests (one of `--sockets`): its schedule, and every
/// request it sent until answered or lost.
struct Flow {
    /// Its index: the low bits of its requests' ids.
    index: u64,
    /// The server its requests start at, unless skipped, and its link there.
    home_server: usize,
    home_link: usize,
    slots: Vec<Slot>,
    mask: u64,
    /// First attempts still outstanding when the ring came round to their
    /// slot again (slow replies at a high rate), by sequence number.
    stragglers: BTreeMap<u64, Slot>,
    /// Requests sent more than once, by sequence number, until their last
    /// deadline has passed.
    retrying: BTreeMap<u64, Slot>,
    /// The deadlines of `retrying`'s attempts, in send order.
    deadlines: VecDeque<Deadline>,
    /// The sequence number the next request gets (they start at 1).
    next_seq: u64,
    /// The lowest sequence number that may still be outstanding in the ring.
    oldest: u64,
    outstanding: usize,
    rng: Rng,
    /// Our pid, as hello requests carry it.
    pid: i64,
    /// Open loop: when request `i` (counting from 0) should go, in ns since
    /// the start: `phase_ns + i * interval_ns`.
    phase_ns: f64,
    interval_ns: f64,
    /// Sent-but-uncommitted request descriptions, parallel to the batch slots.
    pending: [(Kind, i64); BATCH],
}

impl Flow {
    fn new(
        plan: &Plan,
        index: usize,
        capacity: usize,
        home_server: usize,
        home_link: usize,
    ) -> Flow {
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
        Flow {
            index: index as u64,
            home_server,
            home_link,
            slots: vec![Slot::default(); capacity],
            mask: capacity as u64 - 1,
            stragglers: BTreeMap::new(),
            retrying: BTreeMap::new(),
            deadlines: VecDeque::new(),
            next_seq: 1,
            oldest: 1,
            outstanding: 0,
            rng: Rng(seed | 1),
            pid: i64::from(pid),
            phase_ns,
            interval_ns,
            pending: [(Kind::Square, 0); BATCH],
        }
    }

    fn intended_ns(&self, seq: u64) -> u64 {
        (self.phase_ns + (seq - 1) as f64 * self.interval_ns) as u64
    }

    /// Request `seq`, wherever it lives, if it is still remembered.
    fn find_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let i = (seq & self.mask) as usize;
        if self.slots[i].seq == seq && self.slots[i].state != State::Moved {
            return Some(&mut self.slots[i]);
        }
        if let Some(s) = self.retrying.get_mut(&seq) {
            return Some(s);
        }
        self.stragglers.get_mut(&seq)
    }

    /// Moves request `seq` to `retrying` (where requests sent more than once
    /// live) if it is not there yet, and returns it.
    fn relocate(&mut self, seq: u64) -> Option<&mut Slot> {
        if !self.retrying.contains_key(&seq) {
            let ring = &mut self.slots[(seq & self.mask) as usize];
            let slot = if ring.seq == seq && ring.state != State::Moved {
                let s = *ring;
                ring.state = State::Moved;
                s
            } else {
                self.stragglers.remove(&seq)?
            };
            self.retrying.insert(seq, slot);
        }
        self.retrying.get_mut(&seq)
    }

    /// Forgets request `seq` outside the ring once it is answered or lost:
    /// it goes back to its ring slot if that is still its own, so that a
    /// later reply is still told apart (a reply to a resent request, or a
    /// late one); else such a reply counts as late.
    fn retire(&mut self, seq: u64) {
        let slot = self
            .retrying
            .remove(&seq)
            .or_else(|| self.stragglers.remove(&seq));
        let ring = &mut self.slots[(seq & self.mask) as usize];
        if let Some(slot) = slot {
            if ring.seq == seq && ring.state == State::Moved {
                *ring = slot;
            }
        }
    }

    /// Sequence numbers of the outstanding requests whose latest attempt
    /// went out on a link for which `at` says yes, into `out`.
    fn outstanding_at(&self, at: impl Fn(usize) -> bool, out: &mut Vec<u64>) {
        let wanted = |s: &Slot| s.state == State::Outstanding && at(usize::from(s.link));
        let first = self
            .oldest
            .max(self.next_seq.saturating_sub(self.slots.len() as u64));
        for seq in first..self.next_seq {
            let s = &self.slots[(seq & self.mask) as usize];
            if s.seq == seq && wanted(s) {
                out.push(seq);
            }
        }
        let others = self.stragglers.values().chain(self.retrying.values());
        out.extend(others.filter(|s| wanted(s)).map(|s| s.seq));
    }
}

/// Everything one load process runs: its links and flows, what it knows of
/// the servers' health, and what it counted.
struct Engine {
    flows: Vec<Flow>,
    links: Vec<Link>,
    /// Per server, the link failed-over requests take (none with one server).
    spares: Vec<usize>,
    health: Health,
    tally: Tally,
    /// Servers newly skipped for refusing since the last
    /// [`Engine::handle_refusals`], one bit each.
    refused: u32,
    /// Bits of a request id that hold its flow's index.
    flow_bits: u32,
    retries: u8,
    timeout_ns: u64,
    /// One datagram at a time, for retries and failovers.
    resend: ConnectedSendBatch,
    /// Requests found by a refusal, reused.
    scratch: Vec<u64>,
}

impl Engine {
    fn new(plan: &Plan) -> Result<Engine> {
        let n = plan.servers.len();
        let capacity = ring_capacity(plan);
        let mut links = Vec::with_capacity(plan.sockets + n);
        let mut flows = Vec::with_capacity(plan.sockets);
        for i in 0..plan.sockets {
            // Round robin spreads sockets over servers, across processes too.
            let home = plan
                .policy
                .preferred(plan.process_index * plan.sockets + i, n);
            links.push(Link::open(home, plan.servers[home])?);
            flows.push(Flow::new(plan, i, capacity, home, links.len() - 1));
        }
        let mut spares = Vec::new();
        if n > 1 {
            for (s, &to) in plan.servers.iter().enumerate() {
                links.push(Link::open(s, to)?);
                spares.push(links.len() - 1);
            }
        }
        let tally = Tally {
            servers: plan
                .servers
                .iter()
                .map(|s| ServerTally::new(s.to_string()))
                .collect(),
            ..Tally::default()
        };
        Ok(Engine {
            flows,
            links,
            spares,
            health: Health::new(n, plan.skip),
            tally,
            refused: 0,
            flow_bits: plan.sockets.next_power_of_two().trailing_zeros(),
            retries: plan.retries,
            timeout_ns: plan.timeout.as_nanos() as u64,
            resend: ConnectedSendBatch::new(1, SEND_SLOT),
            scratch: Vec::new(),
        })
    }

    /// The id request `seq` of flow `flow` carries on the wire.
    fn wire_id(&self, flow: usize, seq: u64) -> u64 {
        (seq << self.flow_bits) | flow as u64
    }

    fn outstanding(&self) -> usize {
        self.flows.iter().map(|f| f.outstanding).sum()
    }

    /// Sends what flow `fi` has due: up to the window in closed loop,
    /// everything whose time has come in open loop; at most `budget`.
    /// Returns how many went.
    fn send(
        &mut self,
        fi: usize,
        plan: &Plan,
        batch: &mut ConnectedSendBatch,
        now_ns: u64,
        budget: u64,
    ) -> u64 {
        let mut sent = 0;
        let mut refusals = 0;
        while sent < budget {
            let flow = &mut self.flows[fi];
            let due = match plan.pacing {
                Pacing::Closed { window } => window.saturating_sub(flow.outstanding),
                Pacing::Open { .. } => {
                    // Everything due within the next tick goes now, so
                    // that the loop wakes at most once per tick.
                    let horizon = now_ns + OPEN_LOOP_TICK_NS;
                    let mut n = 0;
                    while n < BATCH && flow.intended_ns(flow.next_seq + n as u64) <= horizon {
                        n += 1;
                    }
                    n
                }
            };
            let n = due.min(BATCH).min((budget - sent) as usize);
            if n == 0 {
                break;
            }
            // New requests start at the home server, or past it while it
            // is skipped.
            let server = self.health.start(flow.home_server, now_ns);
            let li = if server == flow.home_server {
                flow.home_link
            } else {
                self.spares[server]
            };
            for i in 0..n {
                let id = (flow.next_seq + i as u64) << self.flow_bits | flow.index;
                let kind = plan.mix.pick(flow.rng.next());
                let arg = match kind {
                    Kind::Square => {
                        (flow.rng.next() % (2 * SQUARE_RANGE as u64 + 1)) as i64 - SQUARE_RANGE
                    }
                    Kind::Hello => flow.pid,
                    Kind::Sleep => plan.sleep_ms as i64,
                    Kind::Text => 0,
                };
                flow.pending[i] = (kind, arg);
                let len = wire::render_load_request(kind, id, arg, batch.slot_mut(i));
                batch.set_len(i, len);
            }
            let went = match batch.send(self.links[li].socket.as_fd(), n) {
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.links[li].blocked = true;
                    0
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // A port unreachable left by an earlier datagram:
                    // reporting it cleared it, and the batch did not go.
                    // Try again, elsewhere if the server is now skipped.
                    self.note_refused(server, now_ns);
                    refusals += 1;
                    if refusals > 2 {
                        break;
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("send: {e}");
                    0
                }
            };
            let flow = &mut self.flows[fi];
            for i in 0..went {
                let seq = flow.next_seq;
                flow.next_seq += 1;
                // Latency counts from the intended time when the send ran
                // late (no coordinated omission), from the send itself when
                // it went ahead of time (no credit for sending early).
                let intended_ns = match plan.pacing {
                    Pacing::Open { .. } => flow.intended_ns(seq).min(now_ns),
                    Pacing::Closed { .. } => now_ns,
                };
                self.tally.max_send_lag_ns = self
                    .tally
                    .max_send_lag_ns
                    .max(now_ns.saturating_sub(intended_ns));
                let slot = &mut flow.slots[(seq & flow.mask) as usize];
                if slot.state == State::Outstanding {
                    // The ring wrapped around a request that is still
                    // waiting: it moves aside until answered or expired.
                    flow.stragglers.insert(slot.seq, *slot);
                }
                let (kind, arg) = flow.pending[i];
                *slot = Slot {
                    seq,
                    state: State::Outstanding,
                    kind,
                    link: li as u16,
                    start: server as u8,
                    hop: 0,
                    attempt: 1,
                    sends: 1,
                    arg,
                    sent_ns: now_ns,
                    intended_ns,
                };
                flow.outstanding += 1;
            }
            self.tally.sent += went as u64;
            self.tally.servers[server].sent += went as u64;
            sent += went as u64;
            if went < n {
                break;
            }
        }
        sent
    }

    /// Takes every queued reply on link `li` (a bounded number of batches)
    /// and matches it. Returns how many datagrams arrived, and whether more
    /// may be queued.
    fn receive(
        &mut self,
        li: usize,
        batch: &mut ConnectedRecvBatch,
        clock: &Clock,
    ) -> (usize, bool) {
        let mut got = 0;
        for _ in 0..MAX_RECV_ROUNDS {
            let n = match batch.recv(self.links[li].socket.as_fd()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    self.note_refused(self.links[li].server, clock.now_ns());
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
                    Some(d) => self.settle(li, d, at_ns, now_ns),
                    None => self.tally.unmatched += 1,
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

    /// Matches one reply, which arrived on link `li` at `at_ns`, to its
    /// request and counts it; a `busy` or `shutting_down` reply from the
    /// server the request is at fails it over instead, when it can.
    fn settle(&mut self, li: usize, datagram: &[u8], at_ns: u64, now_ns: u64) {
        let (id, reply) = match wire::match_reply(datagram) {
            Matched::Json { id, reply } => (id, Some(reply)),
            Matched::Text { id } => (id, None),
            Matched::TextError(code) => {
                self.tally.error(code);
                self.tally.unmatched += 1;
                return;
            }
            Matched::Unmatched => {
                self.tally.unmatched += 1;
                return;
            }
        };
        let fi = (id & ((1 << self.flow_bits) - 1)) as usize;
        let seq = id >> self.flow_bits;
        let server = self.links[li].server;
        let Some(flow) = self.flows.get_mut(fi) else {
            self.tally.unmatched += 1;
            return;
        };
        if seq == 0 || seq >= flow.next_seq {
            self.tally.unmatched += 1;
            return;
        }
        let Some(slot) = flow.find_mut(seq) else {
            // Lost, or expired and its slot reused since: a very late reply.
            self.tally.late += 1;
            return;
        };
        match slot.state {
            State::Outstanding => {}
            State::Answered | State::Late => {
                // A request sent twice may well be answered twice.
                if slot.sends > 1 {
                    self.tally.resent_replies += 1;
                } else {
                    self.tally.duplicates += 1;
                }
                return;
            }
            State::Lost => {
                slot.state = State::Late;
                self.tally.late += 1;
                return;
            }
            State::Free | State::Moved => {
                self.tally.unmatched += 1;
                return;
            }
        }
        let failure = reply
            .as_ref()
            .filter(|r| !r.is_ok())
            .and_then(|r| Failure::from_error_code(&r.error_code()?));
        match failure {
            Some(why) => {
                self.health.failed(server, why, now_ns);
                if self.links[usize::from(slot.link)].server != server {
                    // From a server the request has already left: it waits
                    // for the one it is at now.
                    return;
                }
                let (start, hop) = (usize::from(slot.start), usize::from(slot.hop));
                if self.health.next_hop(start, hop, now_ns).is_some() {
                    self.fail_over(fi, seq, now_ns);
                    return;
                }
                // Nowhere left to go: the error is its answer.
            }
            None => self.health.replied(server),
        }
        slot.state = State::Answered;
        let slot = *slot;
        flow.outstanding -= 1;
        let tally = &mut self.tally;
        tally.answer(at_ns, at_ns.saturating_sub(slot.intended_ns));
        tally.servers[server].answered += 1;
        if flow.interval_ns > 0.0 {
            // Open loop: also from the actual send, to tell the server's
            // delays from the load generator's own.
            tally.service(at_ns.saturating_sub(slot.sent_ns));
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
                    || !wire::reply_is_right(
                        slot.kind,
                        slot.arg,
                        &reply,
                        &self.links[li].greeting_prefix,
                    )
                {
                    tally.wrong += 1;
                }
            }
        }
    }

    /// Counts an ICMP port unreachable on a link to `server`; a server that
    /// it makes skipped has its requests failed over by
    /// [`Engine::handle_refusals`].
    fn note_refused(&mut self, server: usize, now_ns: u64) {
        self.tally.refused += 1;
        self.tally.servers[server].refused += 1;
        if self.health.failed(server, Failure::Refused, now_ns) {
            debug!("server {server} refused: skipped for a while");
            self.refused |= 1 << server;
        }
    }

    /// Fails over every request at a server that refused (nothing listens
    /// there), where another server is left for it; the others wait out
    /// their timeout.
    fn handle_refusals(&mut self, now_ns: u64) {
        while self.refused != 0 {
            let server = self.refused.trailing_zeros() as usize;
            self.refused &= !(1 << server);
            let mut seqs = std::mem::take(&mut self.scratch);
            for fi in 0..self.flows.len() {
                seqs.clear();
                let links = &self.links;
                self.flows[fi].outstanding_at(|l| links[l].server == server, &mut seqs);
                for &seq in &seqs {
                    let Some(at) = self.flows[fi].find_mut(seq).map(|s| *s) else {
                        continue;
                    };
                    let (start, hop) = (usize::from(at.start), usize::from(at.hop));
                    if self.health.next_hop(start, hop, now_ns).is_some() {
                        self.fail_over(fi, seq, now_ns);
                    }
                }
            }
            self.scratch = seqs;
        }
    }

    /// Request `seq` of flow `fi` timed out at its current server: it is
    /// sent there again, or fails over.
    fn timed_out(&mut self, fi: usize, seq: u64, now_ns: u64) {
        let Some(at) = self.flows[fi].find_mut(seq).map(|s| *s) else {
            return;
        };
        let server = self.links[usize::from(at.link)].server;
        if self.health.failed(server, Failure::Timeout, now_ns) {
            debug!("server {server} timed out repeatedly: skipped for a while");
        }
        if at.attempt <= self.retries {
            self.tally.servers[server].retried += 1;
            self.resend(
                fi,
                seq,
                usize::from(at.link),
                at.hop,
                at.attempt + 1,
                now_ns,
            );
        } else {
            self.fail_over(fi, seq, now_ns);
        }
    }

    /// Sends request `seq` of flow `fi` to the next server left for it, on
    /// that server's spare link, or counts it lost when there is none.
    fn fail_over(&mut self, fi: usize, seq: u64, now_ns: u64) {
        let Some(at) = self.flows[fi].find_mut(seq).map(|s| *s) else {
            return;
        };
        let from = self.links[usize::from(at.link)].server;
        let start = usize::from(at.start);
        match self.health.next_hop(start, usize::from(at.hop), now_ns) {
            Some(hop) => {
                let to = self.health.server_at(start, hop);
                self.tally.servers[from].failed_over += 1;
                self.resend(fi, seq, self.spares[to], hop as u8, 1, now_ns);
            }
            None => self.lose(fi, seq),
        }
    }

    /// Sends request `seq` of flow `fi` again, with the same id, on link
    /// `li`, as attempt `attempt` at hop `hop`.
    fn resend(&mut self, fi: usize, seq: u64, li: usize, hop: u8, attempt: u8, now_ns: u64) {
        let id = self.wire_id(fi, seq);
        let flow = &mut self.flows[fi];
        let Some(slot) = flow.relocate(seq) else {
            return;
        };
        slot.link = li as u16;
        slot.hop = hop;
        slot.attempt = attempt;
        slot.sends = slot.sends.saturating_add(1);
        let (kind, arg, sends) = (slot.kind, slot.arg, slot.sends);
        flow.deadlines.push_back(Deadline {
            seq,
            at_ns: now_ns + self.timeout_ns,
            sends,
        });
        let len = wire::render_load_request(kind, id, arg, self.resend.slot_mut(0));
        self.resend.set_len(0, len);
        let server = self.links[li].server;
        for _ in 0..3 {
            match self.resend.send(self.links[li].socket.as_fd(), 1) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // Left by an earlier datagram; this one did not go yet.
                    self.note_refused(server, now_ns);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Not sent with a full buffer: like a datagram lost on the
                // way, it times out.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("send: {e}");
                    break;
                }
                Ok(_) => break,
            }
        }
        self.tally.servers[server].sent += 1;
    }

    /// Counts request `seq` of flow `fi` lost, at the server it was at last.
    fn lose(&mut self, fi: usize, seq: u64) {
        let flow = &mut self.flows[fi];
        let Some(slot) = flow.find_mut(seq) else {
            return;
        };
        if slot.state != State::Outstanding {
            return;
        }
        slot.state = State::Lost;
        let server = self.links[usize::from(slot.link)].server;
        flow.outstanding -= 1;
        self.tally.lost += 1;
        self.tally.servers[server].lost += 1;
        flow.retire(seq);
    }

    /// Times out, in flow `fi`, every attempt sent at least `--timeout-ms`
    /// ago. Returns when the next one would time out, if any is outstanding.
    fn expire(&mut self, fi: usize, now_ns: u64) -> Option<u64> {
        let timeout_ns = self.timeout_ns;
        let mut next: Option<u64> = None;
        let mut sooner = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        // First attempts in the ring, in send order.
        loop {
            let flow = &mut self.flows[fi];
            if flow.oldest >= flow.next_seq {
                break;
            }
            let seq = flow.oldest;
            let slot = &flow.slots[(seq & flow.mask) as usize];
            if slot.seq == seq && slot.state == State::Outstanding {
                let expires = slot.sent_ns + timeout_ns;
                if expires > now_ns {
                    sooner(expires);
                    break;
                }
                flow.oldest += 1;
                self.timed_out(fi, seq, now_ns);
            } else {
                flow.oldest += 1;
            }
        }
        // Stragglers are first attempts in sequence order, so in send
        // order: the first is the oldest.
        loop {
            let flow = &mut self.flows[fi];
            let Some((&seq, slot)) = flow.stragglers.first_key_value() else {
                break;
            };
            let expires = slot.sent_ns + timeout_ns;
            if expires > now_ns {
                sooner(expires);
                break;
            }
            if slot.state == State::Outstanding {
                self.timed_out(fi, seq, now_ns);
            }
            // Resent (now in `retrying`), lost or answered: gone from here.
            self.flows[fi].stragglers.remove(&seq);
        }
        // Later attempts, in send order.
        loop {
            let flow = &mut self.flows[fi];
            let Some(d) = flow.deadlines.front().copied() else {
                break;
            };
            if d.at_ns > now_ns {
                sooner(d.at_ns);
                break;
            }
            flow.deadlines.pop_front();
            let Some(slot) = flow.retrying.get(&d.seq) else {
                continue;
            };
            if slot.sends != d.sends {
                // Sent again since: a later deadline stands.
                continue;
            }
            if slot.state == State::Outstanding {
                self.timed_out(fi, d.seq, now_ns);
            } else {
                // Answered a while ago: back to the ring, if it can.
                flow.retire(d.seq);
            }
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
    let mut engine = Engine::new(plan)?;
    let mut send_batch = ConnectedSendBatch::new(BATCH, SEND_SLOT);
    let mut recv_batch = ConnectedRecvBatch::new(BATCH, RECV_SLOT);
    let send_end_ns = plan.duration.as_nanos() as u64;
    // A hard stop, whatever happens: the sending, then every attempt a
    // request may make at every server, then a second.
    let attempts = (u64::from(plan.retries) + 1) * plan.servers.len() as u64;
    let hard_end_ns = send_end_ns + engine.timeout_ns * attempts + 1_000_000_000;
    let mut remaining = plan.requests.unwrap_or(u64::MAX);
    let bar = plan.progress.then(|| time_bar(plan.duration));
    let mut next_progress = Instant::now();
    let mut pollfds: Vec<libc::pollfd> = engine
        .links
        .iter()
        .map(|l| libc::pollfd {
            fd: l.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Sockets worth a receive call: poll said so, or the last call left
    // datagrams behind. Receiving only from these saves empty system calls.
    let mut readable = vec![true; engine.links.len()];
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
        for (li, r) in readable.iter_mut().enumerate() {
            if *r {
                let (got, more) = engine.receive(li, &mut recv_batch, &clock);
                busy |= got > 0;
                *r = more;
            }
        }
        engine.handle_refusals(clock.now_ns());
        let now_ns = clock.now_ns();
        if sending && now_ns >= send_end_ns {
            sending = false;
            engine.tally.send_ns = send_end_ns;
        } else if sending && (remaining == 0 || stop_requested()) {
            sending = false;
            engine.tally.send_ns = now_ns;
            engine.tally.interrupted = remaining > 0;
        }
        if sending {
            for fi in 0..engine.flows.len() {
                if remaining == 0 {
                    break;
                }
                let n = engine.send(fi, plan, &mut send_batch, now_ns, remaining);
                remaining -= n;
                busy |= n > 0;
            }
            engine.handle_refusals(now_ns);
        }
        let mut next_expiry = u64::MAX;
        for fi in 0..engine.flows.len() {
            if let Some(t) = engine.expire(fi, now_ns) {
                next_expiry = next_expiry.min(t);
            }
        }
        engine.handle_refusals(now_ns);
        let outstanding = engine.outstanding();
        if !sending && outstanding == 0 {
            break;
        }
        if now_ns >= hard_end_ns {
            warn!("stopping with {outstanding} requests still outstanding");
            engine.tally.lost += outstanding as u64;
            break;
        }
        if let Some(b) = &bar {
            if Instant::now() >= next_progress {
                next_progress += PROGRESS_EVERY;
                b.set_position(now_ns / 1_000_000);
                let t = &engine.tally;
                b.set_message(format!(
                    "{} sent, {} answered, {} lost",
                    t.sent, t.answered, t.lost
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
            if open {
                // Wake when the next request comes within a tick, but not
                // before the tick sent ahead is used up.
                for f in &engine.flows {
                    let due = f
                        .intended_ns(f.next_seq)
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
        for (p, l) in pollfds.iter_mut().zip(&engine.links) {
            p.events =
                if lazy { 0 } else { libc::POLLIN } | if l.blocked { libc::POLLOUT } else { 0 };
            p.revents = 0;
        }
        longest_pass_ns = longest_pass_ns.max(now_ns - pass_start_ns);
        poll_for(&mut pollfds, wake_ns - now_ns)?;
        slept = true;
        let woke_ns = clock.now_ns();
        if woke_ns > wake_ns {
            oversleep_ns = oversleep_ns.max(woke_ns - wake_ns);
        }
        for ((p, l), r) in pollfds
            .iter()
            .zip(engine.links.iter_mut())
            .zip(readable.iter_mut())
        {
            if p.revents & libc::POLLOUT != 0 {
                l.blocked = false;
            }
            // POLLERR: a port-unreachable waits to be read as an error.
            *r = lazy || p.revents & (libc::POLLIN | libc::POLLERR) != 0;
        }
    }
    if sending {
        engine.tally.send_ns = clock.now_ns();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    debug!(
        "loop: longest pass {} µs, latest wake-up {} µs after its time",
        longest_pass_ns / 1000,
        oversleep_ns / 1000
    );
    Ok(engine.tally)
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
    use crate::failover::{Policy, SkipRule};
    use crate::mix::Mix;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

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
            servers: vec![server],
            policy: Policy::First,
            process_index: 0,
            retries: 0,
            skip: SkipRule::default(),
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

    /// A plan over several servers: requests in closed loop, two sockets,
    /// attempts of `timeout_ms`.
    fn plan_over(servers: &[SocketAddr], policy: Policy, requests: u64, timeout_ms: u64) -> Plan {
        let mut p = plan(servers[0], Pacing::Closed { window: 8 }, requests);
        p.servers = servers.to_vec();
        p.policy = policy;
        p.timeout = Duration::from_millis(timeout_ms);
        p
    }

    /// A server that never answers.
    fn silent_server() -> FakeServer {
        FakeServer::start(|_, _, _, _| {})
    }

    /// A server that answers every JSON request `busy`, with its id.
    fn busy_server() -> FakeServer {
        FakeServer::start(|sock, datagram, from, _| {
            let v: serde_json::Value = serde_json::from_slice(datagram).unwrap();
            let reply = format!(
                r#"{{"ok":false,"error":"busy","message":"full","id":{}}}"#,
                v["id"]
            );
            sock.send_to(reply.as_bytes(), from).unwrap();
        })
    }

    fn counts(t: &Tally) -> Vec<(u64, u64, u64, u64, u64)> {
        t.servers
            .iter()
            .map(|s| (s.sent, s.answered, s.retried, s.failed_over, s.lost))
            .collect()
    }

    #[test]
    fn round_robin_spreads_sockets_first_does_not() {
        let a = square_server(0, 0);
        let b = square_server(0, 0);
        let servers = [a.addr, b.addr];
        let t = run_flows(&plan_over(&servers, Policy::RoundRobin, 200, 30_000)).unwrap();
        assert_eq!((t.sent, t.answered, t.lost), (200, 200, 0));
        // Two sockets, one per server (how the requests split depends on
        // which socket's replies come first).
        let [sa, sb] = &t.servers[..] else { panic!() };
        assert!(sa.answered > 0 && sb.answered > 0, "{:?}", t.servers);
        assert_eq!((sa.sent, sb.sent), (sa.answered, sb.answered));
        let t = run_flows(&plan_over(&servers, Policy::First, 200, 30_000)).unwrap();
        assert_eq!(counts(&t), [(200, 200, 0, 0, 0), (0, 0, 0, 0, 0)]);
        a.stop();
        b.stop();
    }

    #[test]
    fn a_silent_server_is_failed_over_then_skipped() {
        let a = silent_server();
        let b = square_server(0, 0);
        let mut p = plan_over(&[a.addr, b.addr], Policy::First, 100, 200);
        p.retries = 1;
        let t = run_flows(&p).unwrap();
        assert_eq!((t.sent, t.answered, t.lost, t.duplicates), (100, 100, 0, 0));
        let [sa, sb] = &t.servers[..] else { panic!() };
        // The first window of 2 x 8 goes to A, is retried once there, then
        // fails over; A timed out three times in a row long before, so the
        // rest start at B.
        assert_eq!((sa.answered, sa.lost), (0, 0));
        assert_eq!(sa.failed_over, 16, "{sa:?}");
        assert_eq!(sa.retried, 16, "{sa:?}");
        assert_eq!(sa.sent, 32, "{sa:?}");
        assert_eq!(
            (sb.sent, sb.answered, sb.failed_over),
            (100, 100, 0),
            "{sb:?}"
        );
        a.stop();
        b.stop();
    }

    #[test]
    fn a_retry_goes_to_the_same_server_from_the_same_socket() {
        // Drops each request the first time, answers it the second; notes
        // when a copy comes from another address than the first did.
        let moved = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let moved2 = moved.clone();
        let mut first = std::collections::HashMap::new();
        let server = FakeServer::start(move |sock, datagram, from, _| {
            let key = datagram.to_vec();
            match first.get(&key) {
                None => {
                    first.insert(key, from);
                }
                Some(was) => {
                    if *was != from {
                        moved2.fetch_add(1, Ordering::Relaxed);
                    }
                    sock.send_to(square_reply(datagram).as_bytes(), from)
                        .unwrap();
                }
            }
        });
        let mut p = plan(server.addr, Pacing::Closed { window: 8 }, 50);
        p.timeout = Duration::from_millis(100);
        p.retries = 2;
        let t = run_flows(&p).unwrap();
        server.stop();
        assert_eq!((t.sent, t.answered, t.lost), (50, 50, 0));
        assert_eq!(counts(&t), [(100, 50, 50, 0, 0)]);
        assert_eq!(
            moved.load(Ordering::Relaxed),
            0,
            "a retry came from another socket"
        );
    }

    #[test]
    fn busy_and_refused_fail_over_at_once() {
        let busy = busy_server();
        let b = square_server(0, 0);
        let closed = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let started = Instant::now();
        // Round robin: one socket starts at the closed port, one at the busy
        // server; every request ends at B, long before any timeout.
        let mut p = plan_over(
            &[closed, busy.addr, b.addr],
            Policy::RoundRobin,
            200,
            20_000,
        );
        p.retries = 3;
        let t = run_flows(&p).unwrap();
        let took = started.elapsed();
        busy.stop();
        b.stop();
        assert!(took < Duration::from_secs(10), "{took:?}");
        assert_eq!((t.sent, t.answered, t.lost), (200, 200, 0));
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        let [sc, sbusy, sb] = &t.servers[..] else {
            panic!()
        };
        assert_eq!(sb.answered, 200, "{sb:?}");
        assert_eq!((sc.answered, sbusy.answered), (0, 0));
        assert!(sc.refused > 0, "{sc:?}");
        assert_eq!(sc.retried + sbusy.retried, 0);
        assert!(sbusy.failed_over > 0, "{sbusy:?}");
    }

    #[test]
    fn a_late_reply_from_a_server_left_behind_answers_once() {
        // Both servers answer 300 ms late; attempts time out after 200 ms.
        // A's reply answers at 300 ms, after the failover to B (the run ends
        // then, before B's replies come).
        fn slow_server() -> FakeServer {
            FakeServer::start(|sock, datagram, from, _| {
                let sock = sock.try_clone().unwrap();
                let reply = square_reply(datagram);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    sock.send_to(reply.as_bytes(), from).unwrap();
                });
            })
        }
        let a = slow_server();
        let b = slow_server();
        let mut p = plan_over(&[a.addr, b.addr], Policy::First, 8, 200);
        p.sockets = 1;
        let t = run_flows(&p).unwrap();
        a.stop();
        b.stop();
        assert_eq!((t.sent, t.answered, t.lost, t.duplicates), (8, 8, 0, 0));
        assert_eq!(counts(&t), [(8, 8, 0, 8, 0), (8, 0, 0, 0, 0)]);
    }
}
