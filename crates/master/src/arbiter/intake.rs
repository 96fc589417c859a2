//! Datagrams in, and the answers the master gives itself: `stats`,
//! `members`, `too_large`, inline mode, and the errors of requests it
//! cannot place.

use std::net::SocketAddr;
use std::time::Instant;

use protocol::answer::{self, Effect, Verdict};
use protocol::{ErrorCode, Op, Outcome, ReplyContext, Request};

use super::{Arbiter, Phase, QUEUE_CAP, RECV_BATCH, RECV_ROUNDS};
use crate::guard::Admission;
use crate::journal;
use crate::ledger::{Ledger, Responder};
use crate::pool::InFlight;

impl Arbiter {
    /// Reads queued datagrams (a bounded number per turn, and none while
    /// [`QUEUE_CAP`] requests wait for a worker: the kernel's queue holds
    /// the rest). `stats`, oversized datagrams and, with `--workers 0`,
    /// every request are answered here; the others are queued for dispatch.
    pub(super) fn read_datagrams(&mut self, now: Instant) {
        if !self.ready.datagrams || !matches!(self.phase, Phase::Running) {
            return;
        }
        for _ in 0..RECV_ROUNDS {
            if self.dispatcher.len() >= QUEUE_CAP {
                return;
            }
            let got = match self.recv.recv(&self.responder.socket) {
                Ok(n) => n,
                Err(e) => {
                    log::warn!("recvmmsg: {e}");
                    return;
                }
            };
            if got == 0 {
                return;
            }
            let now_us = journal::now_unix_us();
            self.ledger.totals.received += got as u64;
            for d in self.recv.iter() {
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
                        self.ledger.record(
                            d.from,
                            now,
                            now_us,
                            Op::Invalid,
                            None,
                            outcome,
                            b"",
                            now,
                        );
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
                        .record(d.from, now, now_us, Op::Invalid, None, outcome, b"", now);
                    continue;
                }
                if protocol::request::may_be_stats(d.payload) {
                    if let Some(p) = protocol::parse(d.payload) {
                        if p.request == Ok(Request::Stats) {
                            let outcome = if reply_limit == u32::MAX {
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
                            self.ledger.record(
                                d.from,
                                now,
                                now_us,
                                Op::Stats,
                                None,
                                outcome,
                                id,
                                now,
                            );
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
                                now,
                                now_us,
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
                if self.cfg.workers == 0 {
                    answer_inline(
                        &mut self.responder,
                        &mut self.ledger,
                        self.master_pid,
                        (d.from, now, now_us),
                        d.payload,
                        reply_limit,
                    );
                    continue;
                }
                let req = InFlight {
                    seq: self.next_seq,
                    client: d.from,
                    received: now,
                    received_unix_us: now_us,
                    dispatched: now,
                    reply_limit,
                    payload: self.ledger.keep_payload(d.payload),
                    redispatched: false,
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
    /// it, and recycles its buffer.
    pub(super) fn fail(&mut self, req: InFlight, code: ErrorCode, now: Instant) {
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
        self.ledger.fail(&mut self.responder, req, code, msg, now);
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
/// (the reply held to its source's bound);
/// its loop never blocks and never aborts, so `sleep` and `crash` are
/// refused (`disabled`).
fn answer_inline(
    responder: &mut Responder,
    ledger: &mut Ledger,
    pid: u32,
    (client, now, now_us): (SocketAddr, Instant, i64),
    payload: &[u8],
    reply_limit: u32,
) {
    let ctx = ReplyContext {
        worker_pid: pid,
        client,
    };
    // The inline host never fails and never abandons a request.
    let host = &mut InlineHost(responder);
    let Ok(Some(done)) = answer::answer(payload, &ctx, reply_limit as usize, host) else {
        return;
    };
    if done.outcome.sent() {
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
