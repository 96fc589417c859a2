//! Datagrams in, and the answers the master gives itself: `stats`,
//! `members`, `too_large`, replays from the duplicate request cache,
//! inline mode, and the errors of requests it cannot place; the causal
//! links (`"hlc"`) trusted datagrams carry.

use std::net::SocketAddr;
use std::time::Instant;

use netio::RecvBatch;
use protocol::answer::{self, Effect, Verdict};
use protocol::{ErrorCode, Op, Outcome, ReplyContext, Request};

use super::{Arbiter, QUEUE_CAP, RECV_BATCH, RECV_ROUNDS};
use crate::clock::Clock;
use crate::dedup::Check;
use crate::guard::Admission;
use crate::journal;
use crate::ledger::{Ledger, Responder, Totals};
use crate::pool::{InFlight, Receipt};

impl Arbiter {
    /// Reads queued datagrams (a bounded number per turn, and none while
    /// [`QUEUE_CAP`] requests wait for a worker: the kernel's queue holds
    /// the rest). `stats`, oversized datagrams, retries the duplicate
    /// request cache knows (dropped while their request runs, answered
    /// from the cache after) and, with `--workers 0`, every request are
    /// answered here; the others are queued for dispatch.
    ///
    /// The datagrams of one `recvmmsg` share one receipt: one wall time and
    /// one HLC stamp. A trusted datagram carrying a causal link moves the
    /// clock past it first ([`follow_link`]); it and those after it in the
    /// batch get a new stamp.
    ///
    /// Completions are read lazily ([`crate::pool::completions_due`]):
    /// before a `stats` reply (which counts what was answered) and before
    /// dropping a retry as still in progress, every worker's are read
    /// first, once a turn.
    pub(super) fn read_datagrams(&mut self, now: Instant) {
        if !self.ready.datagrams || !self.reading() {
            return;
        }
        // Out of `self` while its datagrams are handled, which may read
        // completions (`&mut self`).
        let Some(mut recv) = self.recv.take() else {
            return;
        };
        self.read_datagrams_with(&mut recv, now);
        self.recv = Some(recv);
    }

    fn read_datagrams_with(&mut self, recv: &mut RecvBatch, now: Instant) {
        // Whether every worker's completions were read this turn.
        let mut completions_read = false;
        for _ in 0..RECV_ROUNDS {
            if self.dispatcher.len() >= QUEUE_CAP {
                return;
            }
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
            let mut receipt = Receipt {
                at: now,
                unix_us: journal::now_unix_us(),
                hlc: self.cfg.clock.stamp(),
            };
            self.ledger.totals.received += got as u64;
            for d in recv.iter() {
                let reply_limit = match self.guard.admit(d.from, d.payload.len(), now) {
                    Admission::Answer { reply_limit } => reply_limit,
                    over_the_limit => {
                        let outcome = match over_the_limit {
                            Admission::Slip { reply_limit } => {
                                let (dialect, id) = protocol::parse(d.payload)
                                    .map_or((protocol::Dialect::Text, None), |p| (p.dialect, p.id));
                                self.responder.error(
                                    dialect,
                                    id,
                                    ErrorCode::RateLimited,
                                    "",
                                    reply_limit,
                                    d.from,
                                )
                            }
                            _ => Outcome::Dropped,
                        };
                        self.ledger
                            .record(d.from, receipt, Op::Invalid, None, outcome, b"", now);
                        continue;
                    }
                };
                if d.truncated {
                    let outcome = self.responder.too_large(
                        d.payload,
                        d.from,
                        self.cfg.max_datagram,
                        reply_limit,
                    );
                    self.ledger
                        .record(d.from, receipt, Op::Invalid, None, outcome, b"", now);
                    continue;
                }
                let trusted = reply_limit == u32::MAX;
                if trusted
                    && protocol::request::may_carry_hlc(d.payload)
                    && follow_link(&self.cfg.clock, &mut self.ledger.totals, d.payload)
                {
                    // Received after the stamp it carried, as is all that follows.
                    receipt.hlc = self.cfg.clock.stamp();
                }
                if protocol::request::may_be_stats(d.payload) {
                    if let Some(p) = protocol::parse(d.payload) {
                        if p.request == Ok(Request::Stats) {
                            let outcome = if trusted {
                                if !std::mem::replace(&mut completions_read, true) {
                                    self.read_completions(true);
                                }
                                let body = super::stats::stats_json(self, now);
                                answer_stats(&mut self.responder, &body, d.from, p.id)
                            } else {
                                self.responder.error(
                                    p.dialect,
                                    p.id,
                                    ErrorCode::Forbidden,
                                    "stats is for --trusted sources",
                                    reply_limit,
                                    d.from,
                                )
                            };
                            let id = p.id.unwrap_or("").as_bytes();
                            self.ledger
                                .record(d.from, receipt, Op::Stats, None, outcome, id, now);
                            continue;
                        }
                        if p.request == Ok(Request::Members) {
                            // Anyone may ask (clients discover servers
                            // with it), held to the amplification bound:
                            // a client pads its request.
                            let body = crate::group::members_json(&self.group, self.service_addr());
                            let outcome = answer_members(
                                &mut self.responder,
                                &body,
                                d.from,
                                (p.dialect, p.id),
                                reply_limit,
                            );
                            let id = p.id.unwrap_or("").as_bytes();
                            self.ledger.record(
                                d.from,
                                receipt,
                                Op::Members,
                                None,
                                outcome,
                                id,
                                now,
                            );
                            continue;
                        }
                    }
                }
                // The duplicate request cache: a retry is dropped while its
                // request runs, and gets the kept reply once it has run.
                let dedup = match self.dedup.enabled() {
                    true => protocol::request::scan_id(d.payload),
                    false => None,
                };
                let mut check = dedup.map(|id| (id, self.dedup.check(d.from, id, d.payload, now)));
                if matches!(check, Some((_, Check::InProgress)))
                    && !std::mem::replace(&mut completions_read, true)
                {
                    // Its request may be answered already, unread.
                    self.read_completions(true);
                    check = dedup.map(|id| (id, self.dedup.check(d.from, id, d.payload, now)));
                }
                let dedup = match check {
                    None | Some((_, Check::Uncached)) => None,
                    Some((_, Check::New(token))) => Some(token),
                    Some((id, Check::InProgress)) => {
                        self.ledger.record(
                            d.from,
                            receipt,
                            Op::Invalid,
                            None,
                            Outcome::Duplicate,
                            id,
                            now,
                        );
                        continue;
                    }
                    Some((id, Check::Replay { op, reply })) => {
                        let outcome = self.responder.replay(reply, reply_limit, d.from);
                        self.ledger
                            .record(d.from, receipt, op, None, outcome, id, now);
                        continue;
                    }
                };
                if self.cfg.workers == 0 {
                    let done = answer_inline(
                        &mut self.responder,
                        &mut self.ledger,
                        self.master_pid,
                        (d.from, receipt),
                        d.payload,
                        reply_limit,
                    );
                    if let Some(token) = dedup {
                        match (done, self.responder.batch.last()) {
                            (Some((op, outcome)), Some(reply)) if outcome.sent() => {
                                self.dedup.complete(token, op, outcome, reply, now)
                            }
                            _ => self.dedup.forget(token),
                        }
                    }
                    continue;
                }
                let req = InFlight {
                    seq: self.next_seq,
                    client: d.from,
                    received: receipt,
                    dispatched: now,
                    reply_limit,
                    payload: self.ledger.keep_payload(d.payload),
                    redispatched: false,
                    dedup,
                };
                self.next_seq += 1;
                self.dispatcher.push(req, ErrorCode::Busy);
            }
            if got < RECV_BATCH {
                return;
            }
        }
    }

    /// Places queued requests on workers ([`crate::pool::Dispatcher::place`]);
    /// answers those that found no room, and while stopping answers every
    /// one `shutting_down`.
    pub(super) fn dispatch(&mut self, now: Instant) {
        let mut refused = std::mem::take(&mut self.refused);
        if self.accepting() {
            let growing = std::mem::take(&mut self.spawned_this_turn) > 0;
            self.dispatcher.place(
                &mut self.slots,
                self.cfg.max_inflight,
                now,
                growing,
                &mut refused,
            );
        } else {
            self.dispatcher.drain(&mut refused);
            for p in &mut refused {
                p.if_unplaced = ErrorCode::ShuttingDown;
            }
        }
        for p in refused.drain(..) {
            self.fail(p.req, p.if_unplaced, now);
        }
        self.refused = refused;
    }

    /// Answers `req` with an error made by the master, counts and journals
    /// it, and recycles its buffer. The duplicate request cache keeps a
    /// `timeout` or `worker_crashed` reply (the request ran, at least in
    /// part: a retry gets the same answer rather than running it again,
    /// and crashing or hanging a worker again); it forgets a `busy` or
    /// `shutting_down` one, which asks the client to try again.
    pub(super) fn fail(&mut self, req: InFlight, code: ErrorCode, now: Instant) {
        let token = req.dedup;
        let (op, outcome) = self.fail_reply(req, code, now);
        if let Some(token) = token {
            let keep = matches!(code, ErrorCode::Timeout | ErrorCode::WorkerCrashed);
            match self.responder.batch.last() {
                Some(reply) if keep && outcome.sent() => {
                    self.dedup.complete(token, op, outcome, reply, now)
                }
                _ => self.dedup.forget(token),
            }
        }
    }

    fn fail_reply(&mut self, req: InFlight, code: ErrorCode, now: Instant) -> (Op, Outcome) {
        let timeout_msg;
        let msg = match code {
            ErrorCode::Busy => "every worker is full; try again shortly",
            ErrorCode::WorkerCrashed => "the worker answering this request died",
            ErrorCode::ShuttingDown => "the server is stopping",
            ErrorCode::Timeout => {
                timeout_msg = format!(
                    "no answer within {} ms",
                    self.cfg.request_timeout.as_millis()
                );
                &timeout_msg
            }
            _ => code.as_str(),
        };
        self.ledger.fail(&mut self.responder, req, code, msg, now)
    }
}

/// Follows the causal link of a trusted datagram that may carry one: a
/// JSON `"hlc"` field, an HLC stamp its client saw in another server's
/// `stats` reply. The clock moves past it unless it is malformed or more
/// than `--hlc-max-delta-ms` ahead (counted as refused, and otherwise
/// ignored: the request is answered as if it carried none). Returns whether
/// the clock moved.
fn follow_link(clock: &Clock, totals: &mut Totals, payload: &[u8]) -> bool {
    let result = match protocol::request::peek_hlc(payload) {
        None => return false,
        Some(Ok(text)) => clock.observe_text(text),
        Some(Err(_)) => Err(crate::clock::Refusal::Malformed),
    };
    match result {
        Ok(()) => {
            totals.hlc_links += 1;
            true
        }
        Err(why) => {
            totals.hlc_refused += 1;
            log::debug!("causal link refused: {why}");
            false
        }
    }
}

/// `stats`: answered by the master at once, never queued behind work.
fn answer_stats(
    responder: &mut Responder,
    body: &serde_json::Map<String, serde_json::Value>,
    to: SocketAddr,
    id: Option<&str>,
) -> Outcome {
    responder.ensure_room();
    protocol::reply::write_json_ok(Op::Stats, body, id, responder.batch.next_buf());
    responder.batch.commit(to);
    Outcome::Ok
}

/// `members`: answered by the master at once, held to the source's bound.
fn answer_members(
    responder: &mut Responder,
    body: &serde_json::Map<String, serde_json::Value>,
    to: SocketAddr,
    (dialect, id): (protocol::Dialect, Option<&str>),
    reply_limit: u32,
) -> Outcome {
    responder.ensure_room();
    let buf = responder.batch.next_buf();
    protocol::reply::write_json_ok(Op::Members, body, id, buf);
    let outcome = protocol::bound_reply(Outcome::Ok, dialect, id, reply_limit as usize, buf);
    if outcome.sent() {
        responder.batch.commit(to);
    }
    outcome
}

/// `--workers 0`: the master answers with the same function a worker uses
/// (the reply held to its source's bound), and says how (the reply is the
/// batch's last when it was sent);
/// its loop never blocks and never aborts, so `sleep` and `crash` are
/// refused (`disabled`).
fn answer_inline(
    responder: &mut Responder,
    ledger: &mut Ledger,
    pid: u32,
    (client, receipt): (SocketAddr, Receipt),
    payload: &[u8],
    reply_limit: u32,
) -> Option<(Op, Outcome)> {
    let ctx = ReplyContext {
        worker_pid: pid,
        client,
    };
    // The inline host never fails and never abandons a request.
    let host = &mut InlineHost(responder);
    let Ok(Some(done)) = answer::answer(payload, &ctx, reply_limit as usize, host) else {
        return None;
    };
    if done.outcome.sent() {
        responder.batch.commit(client);
    }
    ledger.record(
        client,
        receipt,
        done.op,
        Some(pid),
        done.outcome,
        done.id,
        Instant::now(),
    );
    Some((done.op, done.outcome))
}

/// The master as the host of inline answers.
struct InlineHost<'r>(&'r mut Responder);

impl answer::Host for InlineHost<'_> {
    type Error = std::convert::Infallible;

    fn perform(&mut self, effect: Effect) -> Result<Verdict, Self::Error> {
        Ok(Verdict::Refused(match effect {
            Effect::Sleep { .. } => {
                "op sleep would stall the master: it needs a worker pool (--workers 1 or more)"
            }
            Effect::Crash => "op crash is disabled with --workers 0: the master never aborts",
        }))
    }

    fn reply_buf(&mut self) -> Result<&mut Vec<u8>, Self::Error> {
        self.0.ensure_room();
        Ok(self.0.batch.next_buf())
    }
}
