//! Worker slots: what the master knows of each worker process, and the
//! requests each one holds.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Instant;

use nix::unistd::Pid;
use protocol::frame::FrameBuf;

use crate::journal::ExitReason;

/// A request handed to a worker and not yet reported done.
#[derive(Debug)]
pub struct InFlight {
    /// The master's sequence number, echoed in the worker's completion.
    pub seq: u64,
    /// Where the reply goes.
    pub client: SocketAddr,
    /// When the master received it.
    pub received: Instant,
    /// The same moment as wall-clock microseconds, for the journal.
    pub received_unix_us: i64,
    /// When it was handed to its current worker: the request timeout runs
    /// from here, so a request re-dispatched after its worker was killed
    /// gets a whole timeout at the next one.
    pub dispatched: Instant,
    /// The datagram, kept so it can be re-dispatched if the worker dies.
    pub payload: Vec<u8>,
    /// Already re-dispatched once after a crash: a second crash fails it.
    pub redispatched: bool,
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Started; its READY frame has not arrived yet. It already takes work:
    /// requests wait in its pipe.
    Booting,
    /// Serving.
    Ready,
    /// Takes no new work; its request pipe is closed (or will be once the
    /// bytes already queued for it are written), so it exits after
    /// answering what it holds.
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
}

impl WorkerSlot {
    /// Whether new requests may go to this worker.
    pub fn takes_work(&self, max_inflight: usize) -> bool {
        matches!(self.state, SlotState::Booting | SlotState::Ready)
            && self.requests.is_some()
            && self.inflight.len() < max_inflight
    }

    /// Whether it counts toward the pool size: not on its way out.
    pub fn is_active(&self) -> bool {
        matches!(self.state, SlotState::Booting | SlotState::Ready) && !self.replace_pending
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
