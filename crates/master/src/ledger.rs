//! Accounting: counters for `stats`, journal rows, recycled payload
//! buffers, and the replies the master sends itself.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Instant;

use netio::ReplyBatch;
use protocol::{ErrorCode, Op, Outcome};

use crate::journal::{Journal, RequestId, RequestRow};
use crate::pool::{InFlight, Receipt};

/// Counters over the master's life, shown by `stats`.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Datagrams read from the socket.
    pub received: u64,
    /// Requests that ended with a successful reply.
    pub ok: u64,
    /// Requests that ended with an error reply, by code (indexed by the code's byte).
    pub errors: [u64; 16],
    /// Empty datagrams (no reply by design).
    pub no_reply: u64,
    /// Workers that died without being asked to.
    pub crashes: u64,
    /// Workers killed for holding a request past `--request-timeout-ms`.
    pub timeouts: u64,
    /// Workers started after the initial pool (replacements, reloads, scaling).
    pub restarts: u64,
    /// Requests taken back from a worker that ended without answering them,
    /// to be handed to another.
    pub redispatched: u64,
    /// Replies not sent: larger than the amplification bound of a source
    /// outside `--trusted`.
    pub withheld: u64,
    /// Datagrams not answered: their source was over `--rate-limit`.
    pub dropped: u64,
    /// Causal links (`"hlc"` in a trusted request) that moved the clock.
    pub hlc_links: u64,
    /// Causal links refused: malformed, or too far ahead of the clock.
    pub hlc_refused: u64,
    /// Retries answered from the duplicate request cache.
    pub replayed: u64,
    /// Retries dropped because their request was still running.
    pub duplicates: u64,
}

impl Totals {
    /// Replies sent, successful or not, replays included.
    pub fn answered(&self) -> u64 {
        self.ok + self.errors.iter().sum::<u64>() + self.replayed
    }
}

/// Where every finished request is counted and journaled.
pub struct Ledger {
    /// The counters.
    pub totals: Totals,
    /// The journal, unless `--journal none`.
    pub journal: Option<Journal>,
    rows: Vec<RequestRow>,
    spare: Vec<Vec<u8>>,
}

impl Ledger {
    /// A ledger writing to `journal`, if any.
    pub fn new(journal: Option<Journal>) -> Self {
        Ledger {
            totals: Totals::default(),
            journal,
            rows: Vec::with_capacity(1024),
            spare: Vec::new(),
        }
    }

    /// A copy of `payload` in a recycled buffer.
    pub fn keep_payload(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(payload);
        buf
    }

    /// Takes back a buffer from [`Ledger::keep_payload`] for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        // Bounded by the in-flight limit in steady state; the cap only
        // guards against a burst of huge payloads pinning memory.
        if self.spare.len() < 4096 && buf.capacity() <= 2048 {
            self.spare.push(buf);
        }
    }

    /// Counts one finished request and queues its journal row.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        client: SocketAddr,
        received: Receipt,
        op: Op,
        worker_pid: Option<u32>,
        outcome: Outcome,
        id: &[u8],
        now: Instant,
    ) {
        match outcome {
            Outcome::Ok => self.totals.ok += 1,
            Outcome::Error(code) => self.totals.errors[code as usize] += 1,
            Outcome::NoReply => self.totals.no_reply += 1,
            Outcome::Withheld => self.totals.withheld += 1,
            Outcome::Dropped => self.totals.dropped += 1,
            Outcome::Replayed => self.totals.replayed += 1,
            Outcome::Duplicate => self.totals.duplicates += 1,
        }
        if self.journal.is_some() {
            self.rows.push(RequestRow {
                ts_unix_us: received.unix_us,
                client,
                request_id: (!id.is_empty()).then(|| RequestId::new(id)),
                op,
                worker_pid,
                outcome,
                latency_us: now.saturating_duration_since(received.at).as_micros() as u64,
                hlc: received.hlc,
            });
        }
    }

    /// Hands the queued rows to the journal's writer thread.
    pub fn flush_journal(&mut self) {
        if let Some(j) = &self.journal {
            if !self.rows.is_empty() {
                j.submit(&mut self.rows);
            }
        }
    }

    /// Answers `req` with an error made by the master (busy, timeout,
    /// worker_crashed, shutting_down), counts it, and recycles its buffer.
    /// Returns the request's op and the outcome (when sent, the reply is
    /// the responder's last).
    pub fn fail(
        &mut self,
        responder: &mut Responder,
        req: InFlight,
        code: ErrorCode,
        message: &str,
        now: Instant,
    ) -> (Op, Outcome) {
        let (op, id, outcome) =
            responder.error_for(&req.payload, req.client, code, message, req.reply_limit);
        self.record(
            req.client,
            req.received,
            op,
            None,
            outcome,
            id.as_bytes(),
            now,
        );
        self.recycle(req.payload);
        (op, outcome)
    }
}

/// The master's own replies, batched on the server socket.
pub struct Responder {
    /// The server socket (shared with every worker).
    pub socket: UdpSocket,
    /// Replies waiting to be sent.
    pub batch: ReplyBatch,
    /// Replies dropped because the socket's send buffer was full: the loop
    /// never waits for the socket (`stats` shows this count).
    pub dropped: u64,
}

impl Responder {
    /// A responder sending on `socket`.
    pub fn new(socket: UdpSocket) -> Self {
        Responder {
            socket,
            batch: ReplyBatch::with_capacity(64),
            dropped: 0,
        }
    }

    /// Queues the error reply `code` for the datagram `payload` from
    /// `client` (in its dialect, echoing its id), held to `reply_limit`
    /// bytes. An empty datagram gets no reply. Returns the request's op, id
    /// and outcome for the books.
    pub fn error_for<'p>(
        &mut self,
        payload: &'p [u8],
        client: SocketAddr,
        code: ErrorCode,
        message: &str,
        reply_limit: u32,
    ) -> (Op, &'p str, Outcome) {
        let Some(parsed) = protocol::parse(payload) else {
            return (Op::Invalid, "", Outcome::NoReply);
        };
        let outcome = self.error(
            parsed.dialect,
            parsed.id,
            code,
            message,
            reply_limit,
            client,
        );
        (parsed.op(), parsed.id.unwrap_or(""), outcome)
    }

    /// Queues `reply`, kept by the duplicate request cache, again for `to`:
    /// [`Outcome::Replayed`], or [`Outcome::Withheld`] if it is over
    /// `reply_limit` (the same bound as the first reply had: the request's
    /// bytes are the same).
    pub fn replay(&mut self, reply: &[u8], reply_limit: u32, to: SocketAddr) -> Outcome {
        if reply.len() > reply_limit as usize {
            return Outcome::Withheld;
        }
        self.ensure_room();
        self.batch.next_buf().extend_from_slice(reply);
        self.batch.commit(to);
        Outcome::Replayed
    }

    /// Queues a `too_large` reply for a datagram cut at `--max-datagram`:
    /// its id cannot be trusted, so none is echoed.
    pub fn too_large(
        &mut self,
        first_bytes: &[u8],
        client: SocketAddr,
        max_datagram: usize,
        reply_limit: u32,
    ) -> Outcome {
        let dialect = protocol::request::dialect_of(first_bytes);
        let msg = format!("datagram is over the limit of {max_datagram} bytes (--max-datagram)");
        self.error(
            dialect,
            None,
            ErrorCode::TooLarge,
            &msg,
            reply_limit,
            client,
        )
    }

    /// Queues an error reply held to `reply_limit` bytes (compact, or not
    /// sent at all, past it); returns its outcome.
    pub fn error(
        &mut self,
        dialect: protocol::Dialect,
        id: Option<&str>,
        code: ErrorCode,
        message: &str,
        reply_limit: u32,
        client: SocketAddr,
    ) -> Outcome {
        self.ensure_room();
        let out = self.batch.next_buf();
        let outcome = protocol::write_error(dialect, id, code, message, None, out);
        let outcome = protocol::bound_reply(outcome, dialect, id, reply_limit as usize, out);
        if outcome.sent() {
            self.batch.commit(client);
        }
        outcome
    }

    /// Makes room for one more reply, sending the batch if it is full.
    pub fn ensure_room(&mut self) {
        if self.batch.is_full() {
            self.send();
        }
    }

    /// Sends every queued reply without blocking; a reply that finds the
    /// send buffer full is dropped and counted, as the kernel would drop it
    /// on a full receive queue.
    pub fn send(&mut self) {
        match self.batch.send_nonblocking(self.socket.as_fd()) {
            Ok(0) => {}
            Ok(n) => {
                self.dropped += n as u64;
                log::debug!("{n} replies dropped: the socket's send buffer is full");
            }
            Err(e) => log::error!("cannot send replies: {e}"),
        }
    }
}
