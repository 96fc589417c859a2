//! The udp-pool wire formats, and nothing else: no sockets, no pipes, no
//! clocks. Every byte a client, the master or a worker sends is defined here.
//!
//! Three formats live in this crate:
//!
//! * the **client datagram** protocol, in two dialects told apart by the
//!   first non-blank byte: JSON (`{"op":"square","n":12,"id":7}`) and the
//!   lecture's plain text (`12`, `Hi server!`);
//! * the **pipe frames** the master and its workers exchange: length-prefixed
//!   binary frames carrying a request sequence number, the client address and
//!   the payload one way, readiness and completions the other way;
//! * the **hand-over** from a master to the master it starts on `USR2`:
//!   two lines on a Unix socket pair.
//!
//! # Layout
//! * [`request`]: one place that parses a datagram into a [`request::Parsed`].
//! * [`reply`]: one place that computes and renders a reply into a buffer.
//! * [`frame`]: the master <-> worker pipe framing.
//! * [`answer`]: the one function that answers a datagram, in a worker or
//!   in the master's inline mode, with a [`answer::Host`] for the effects.
//! * [`handoff`]: the `UDP_POOL_WORKER` environment variable that tells a
//!   worker which inherited descriptors are its own.
//! * [`handover`]: the `UDP_POOL_HANDOVER` environment variable and the
//!   two lines with which a master hands its socket to the master it
//!   started on `USR2`.
//! * [`cluster`]: the cluster port's envelope (`master --cluster-addr`),
//!   and the coordinator's view and the entries that change it.
//!
//! The shared vocabulary ([`Op`], [`ErrorCode`], [`Outcome`], [`Dialect`])
//! is defined below; `docs/PROTOCOL.md` documents all of it for users.

pub mod answer;
pub mod cluster;
pub mod frame;
pub mod handoff;
pub mod handover;
pub mod reply;
pub mod request;

pub use reply::{bound_reply, write_error, write_reply, ReplyContext};
pub use request::{id_value, parse, IdValue, Parsed, ProtocolError, Request};

/// The largest UDP payload that fits in one IPv4 datagram; a reply longer
/// than this cannot be sent and becomes a `too_large` error instead.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// The longest `sleep` a client may ask for, in milliseconds.
pub const MAX_SLEEP_MS: u64 = 10_000;

/// Which of the two client dialects a datagram (and so its reply) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The datagram's first non-blank byte is `{`: JSON in, JSON out.
    Json,
    /// Anything else: the lecture's plain text in, plain text out.
    Text,
}

/// What a request asked for, as recorded in completions and the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// The request could not be parsed far enough to know its op.
    Invalid = 0,
    /// Square a number (JSON `square`, or a text number).
    Square = 1,
    /// A greeting naming the worker (JSON `hello`, or any other text).
    Hello = 2,
    /// Sleep, then reply: a stand-in for slow work.
    Sleep = 3,
    /// Fault injection: the worker aborts mid-request.
    Crash = 4,
    /// Pool statistics, answered by the master itself.
    Stats = 5,
    /// The group of servers (`members`), answered by the master itself.
    Members = 6,
}

impl Op {
    /// Every op, in wire order.
    pub const ALL: [Op; 7] = [
        Op::Invalid,
        Op::Square,
        Op::Hello,
        Op::Sleep,
        Op::Crash,
        Op::Stats,
        Op::Members,
    ];

    /// The op's name as it appears in JSON requests and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Invalid => "invalid",
            Op::Square => "square",
            Op::Hello => "hello",
            Op::Sleep => "sleep",
            Op::Crash => "crash",
            Op::Stats => "stats",
            Op::Members => "members",
        }
    }

    /// The op with this wire byte, if any.
    pub fn from_u8(b: u8) -> Option<Op> {
        Op::ALL.get(usize::from(b)).copied()
    }
}

/// The stable error codes of `{"ok":false,"error":CODE,...}` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// Malformed JSON, a missing or mistyped field, or bytes that are not UTF-8.
    BadRequest = 1,
    /// The `op` is not one this server knows.
    UnknownOp = 2,
    /// A value is outside what the op accepts, or its result is not finite.
    OutOfRange = 3,
    /// The datagram is over `--max-datagram`, or the reply would not fit in one datagram.
    TooLarge = 4,
    /// Every worker already holds `--max-inflight` requests.
    Busy = 5,
    /// The request's worker died twice while holding it.
    WorkerCrashed = 6,
    /// The request's worker did not answer within `--request-timeout-ms`.
    Timeout = 7,
    /// The op exists but is switched off (`crash` without `--enable-fault-injection`).
    Disabled = 8,
    /// The server stopped before a worker could answer.
    ShuttingDown = 9,
    /// The op is answered to trusted sources only (`stats` outside `--trusted`).
    Forbidden = 10,
    /// The source sent more than `--rate-limit` requests per second: most
    /// get no reply, every `--rate-limit-slip`-th gets this one.
    RateLimited = 11,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::OutOfRange,
        ErrorCode::TooLarge,
        ErrorCode::Busy,
        ErrorCode::WorkerCrashed,
        ErrorCode::Timeout,
        ErrorCode::Disabled,
        ErrorCode::ShuttingDown,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
    ];

    /// The code as it appears in replies and in the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Busy => "busy",
            ErrorCode::WorkerCrashed => "worker_crashed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Disabled => "disabled",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
        }
    }

    /// The code with this wire byte, if any.
    pub fn from_u8(b: u8) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| *c as u8 == b)
    }
}

/// How a request ended: what a completion frame and a journal row record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A successful reply was sent.
    Ok,
    /// An error reply with this code was sent.
    Error(ErrorCode),
    /// Nothing was sent, by design (an empty datagram).
    NoReply,
    /// A reply was made but not sent: it was larger than the amplification
    /// bound of a source outside `--trusted`.
    Withheld,
    /// Not answered: the source was over `--rate-limit`.
    Dropped,
    /// A retry of a request already answered (same client address, same
    /// `id`, same bytes, within `--dedup-window`): the master sent the
    /// first reply again, byte for byte, without running the request.
    Replayed,
    /// Not answered: a retry of a request still being answered (same
    /// client address, `id` and bytes); the first request's reply answers
    /// it.
    Duplicate,
}

impl Outcome {
    /// Every outcome, in wire-byte order.
    pub const ALL: [Outcome; 17] = [
        Outcome::Ok,
        Outcome::Error(ErrorCode::BadRequest),
        Outcome::Error(ErrorCode::UnknownOp),
        Outcome::Error(ErrorCode::OutOfRange),
        Outcome::Error(ErrorCode::TooLarge),
        Outcome::Error(ErrorCode::Busy),
        Outcome::Error(ErrorCode::WorkerCrashed),
        Outcome::Error(ErrorCode::Timeout),
        Outcome::Error(ErrorCode::Disabled),
        Outcome::Error(ErrorCode::ShuttingDown),
        Outcome::Error(ErrorCode::Forbidden),
        Outcome::Error(ErrorCode::RateLimited),
        Outcome::Duplicate,
        Outcome::Replayed,
        Outcome::Dropped,
        Outcome::Withheld,
        Outcome::NoReply,
    ];

    /// The outcome as one wire byte: 0 ok, 255 no reply, 254 withheld,
    /// 253 dropped, 252 replayed, 251 duplicate, else the error code.
    pub fn to_u8(self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::Error(c) => c as u8,
            Outcome::NoReply => 255,
            Outcome::Withheld => 254,
            Outcome::Dropped => 253,
            Outcome::Replayed => 252,
            Outcome::Duplicate => 251,
        }
    }

    /// Whether a reply went out.
    pub fn sent(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Error(_) | Outcome::Replayed)
    }

    /// The outcome with this wire byte, if any.
    pub fn from_u8(b: u8) -> Option<Outcome> {
        match b {
            0 => Some(Outcome::Ok),
            255 => Some(Outcome::NoReply),
            254 => Some(Outcome::Withheld),
            253 => Some(Outcome::Dropped),
            252 => Some(Outcome::Replayed),
            251 => Some(Outcome::Duplicate),
            _ => ErrorCode::from_u8(b).map(Outcome::Error),
        }
    }

    /// `ok`, `no_reply`, `withheld`, `dropped`, `replayed`, `duplicate` or
    /// the error code, as the journal stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(c) => c.as_str(),
            Outcome::NoReply => "no_reply",
            Outcome::Withheld => "withheld",
            Outcome::Dropped => "dropped",
            Outcome::Replayed => "replayed",
            Outcome::Duplicate => "duplicate",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_bytes_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::from_u8(op as u8), Some(op));
        }
        for code in ErrorCode::ALL {
            let o = Outcome::Error(code);
            assert_eq!(Outcome::from_u8(o.to_u8()), Some(o));
        }
        assert_eq!(Outcome::from_u8(0), Some(Outcome::Ok));
        assert_eq!(Outcome::from_u8(255), Some(Outcome::NoReply));
        assert_eq!(Outcome::from_u8(254), Some(Outcome::Withheld));
        assert_eq!(Outcome::from_u8(253), Some(Outcome::Dropped));
        assert_eq!(Outcome::from_u8(252), Some(Outcome::Replayed));
        assert_eq!(Outcome::from_u8(251), Some(Outcome::Duplicate));
        assert_eq!(Outcome::from_u8(200), None);
        // `ALL` holds every outcome a byte can name, once, in byte order.
        let named: Vec<Outcome> = (0..=255u8).filter_map(Outcome::from_u8).collect();
        assert_eq!(named, Outcome::ALL);
        for code in ErrorCode::ALL {
            assert!(Outcome::ALL.contains(&Outcome::Error(code)));
        }
    }
}
