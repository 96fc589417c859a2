//! Computing and rendering replies: the one place that writes reply bytes.
//!
//! Every function appends to (after clearing) a caller-owned buffer, so the
//! per-datagram path reuses its buffers instead of allocating.

use std::io::Write;
use std::net::SocketAddr;

use num_bigint::BigInt;

use crate::request::{Number, Parsed, Request};
use crate::{Dialect, ErrorCode, Op, Outcome, MAX_UDP_PAYLOAD};

/// What a reply needs to know about where it is computed.
#[derive(Debug, Clone, Copy)]
pub struct ReplyContext {
    /// The PID of the process answering (a worker, or the master inline).
    pub worker_pid: u32,
    /// The client the reply goes to, named in greetings.
    pub client: SocketAddr,
}

/// Renders the reply to `parsed` into `out` (cleared first) and says how it
/// ended.
///
/// Squares and greetings are computed here. Side effects are the caller's:
/// a `sleep` is acknowledged here after the caller has slept, and a `crash`
/// reaches this function only when fault injection is off, so it earns a
/// `disabled` error. `stats` is the master's; a worker asked for it answers
/// `unknown_op`. A reply that would not fit in one datagram is replaced by a
/// `too_large` error.
pub fn write_reply(parsed: &Parsed<'_>, ctx: &ReplyContext, out: &mut Vec<u8>) -> Outcome {
    out.clear();
    let request = match &parsed.request {
        Ok(r) => r,
        Err(e) => {
            return write_error(
                parsed.dialect,
                parsed.id,
                e.code,
                &e.message,
                Some(ctx.worker_pid),
                out,
            )
        }
    };
    let fail = |code, msg: &str, out: &mut Vec<u8>| {
        write_error(
            parsed.dialect,
            parsed.id,
            code,
            msg,
            Some(ctx.worker_pid),
            out,
        )
    };
    match request {
        Request::Square(n) => {
            if let Number::Integer(digits) = n {
                // Leading zeros do not make the square longer.
                let len = digits.trim_start_matches('-').trim_start_matches('0').len();
                if len.saturating_mul(2) > MAX_UDP_PAYLOAD {
                    return fail(
                        ErrorCode::TooLarge,
                        "the square would not fit in one datagram",
                        out,
                    );
                }
            }
            if let Number::Decimal(x) = n {
                if !(x * x).is_finite() {
                    return fail(
                        ErrorCode::OutOfRange,
                        "the square is not a finite number",
                        out,
                    );
                }
            }
            match parsed.dialect {
                Dialect::Text => write_square(n, out),
                Dialect::Json => {
                    out.extend_from_slice(br#"{"ok":true,"op":"square","result":"#);
                    write_square(n, out);
                    close_ok(parsed.id, ctx.worker_pid, out);
                }
            }
        }
        Request::Hello { client_pid } => match parsed.dialect {
            Dialect::Text => write_greeting(ctx, out),
            Dialect::Json => {
                out.extend_from_slice(br#"{"ok":true,"op":"hello","message":""#);
                write_greeting(ctx, out);
                out.push(b'"');
                if let Some(pid) = client_pid {
                    let _ = write!(out, r#","client_pid":{pid}"#);
                }
                close_ok(parsed.id, ctx.worker_pid, out);
            }
        },
        Request::Sleep { ms } => {
            let _ = write!(out, r#"{{"ok":true,"op":"sleep","slept_ms":{ms}"#);
            close_ok(parsed.id, ctx.worker_pid, out);
        }
        Request::Crash => {
            return fail(
                ErrorCode::Disabled,
                "op crash is disabled (start master with --enable-fault-injection)",
                out,
            )
        }
        Request::Stats | Request::Members => {
            return fail(
                ErrorCode::UnknownOp,
                "op stats and op members are answered by the master only",
                out,
            )
        }
    }
    if out.len() > MAX_UDP_PAYLOAD {
        return fail(
            ErrorCode::TooLarge,
            "the reply would not fit in one datagram",
            out,
        );
    }
    Outcome::Ok
}

/// Renders an error reply into `out` (cleared first): JSON
/// `{"ok":false,"error":CODE,"message":...,"id":...}` or the text line
/// `error: CODE: message`. `worker_pid` is named when a worker answered.
/// An id so long that the JSON error would not fit in one datagram is left
/// out.
pub fn write_error(
    dialect: Dialect,
    id: Option<&str>,
    code: ErrorCode,
    message: &str,
    worker_pid: Option<u32>,
    out: &mut Vec<u8>,
) -> Outcome {
    out.clear();
    match dialect {
        Dialect::Text => {
            let _ = write!(out, "error: {}: {}", code.as_str(), message);
        }
        Dialect::Json => {
            write_json_error(code, message, worker_pid, id, out);
            if out.len() > MAX_UDP_PAYLOAD && id.is_some() {
                // Only a huge id can push an error over the limit: the client
                // gets the error without its id rather than no reply at all.
                out.clear();
                write_json_error(code, message, worker_pid, None, out);
            }
        }
    }
    Outcome::Error(code)
}

/// Holds a reply to `limit` bytes: the amplification bound for a source
/// outside `--trusted` (QUIC's rule, RFC 9000 section 8: at most 3 times
/// what the source sent). An error reply over the bound is written again
/// in its compact form (its code only, then without its id too); a reply
/// that still does not fit is withdrawn: `out` is cleared and the outcome
/// becomes [`Outcome::Withheld`].
pub fn bound_reply(
    outcome: Outcome,
    dialect: Dialect,
    id: Option<&str>,
    limit: usize,
    out: &mut Vec<u8>,
) -> Outcome {
    if out.len() <= limit {
        return outcome;
    }
    if let Outcome::Error(code) = outcome {
        for id in [id, None] {
            out.clear();
            match dialect {
                Dialect::Text => {
                    let _ = write!(out, "error: {}", code.as_str());
                }
                Dialect::Json => {
                    let _ = write!(out, r#"{{"ok":false,"error":"{}""#, code.as_str());
                    close_id(id, out);
                }
            }
            if out.len() <= limit {
                return outcome;
            }
        }
    }
    out.clear();
    Outcome::Withheld
}

fn write_json_error(
    code: ErrorCode,
    message: &str,
    worker_pid: Option<u32>,
    id: Option<&str>,
    out: &mut Vec<u8>,
) {
    let _ = write!(
        out,
        r#"{{"ok":false,"error":"{}","message":"#,
        code.as_str()
    );
    let _ = serde_json::to_writer(&mut *out, message);
    if let Some(pid) = worker_pid {
        let _ = write!(out, r#","worker_pid":{pid}"#);
    }
    close_id(id, out);
}

/// Renders a successful JSON reply built by the master (such as `stats`):
/// `{"ok":true,"op":OP,<fields>,"id":...}`.
pub fn write_json_ok(
    op: Op,
    fields: &serde_json::Map<String, serde_json::Value>,
    id: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.clear();
    let _ = write!(out, r#"{{"ok":true,"op":"{}""#, op.as_str());
    for (k, v) in fields {
        out.push(b',');
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        let _ = serde_json::to_writer(&mut *out, v);
    }
    close_id(id, out);
}

fn close_ok(id: Option<&str>, worker_pid: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(br#","worker_pid":"#);
    out.extend_from_slice(itoa::Buffer::new().format(worker_pid).as_bytes());
    close_id(id, out);
}

fn close_id(id: Option<&str>, out: &mut Vec<u8>) {
    if let Some(id) = id {
        out.extend_from_slice(br#","id":"#);
        out.extend_from_slice(id.as_bytes());
    }
    out.push(b'}');
}

/// The lecture's greeting: `Hi <ip>:<port>. This is server <pid>`.
fn write_greeting(ctx: &ReplyContext, out: &mut Vec<u8>) {
    let _ = write!(out, "Hi {}. This is server {}", ctx.client, ctx.worker_pid);
}

/// Writes n*n: exact for integers of any size (an i128 fast path below
/// 10^18, big integers above), shortest round-trip f64 for decimals.
fn write_square(n: &Number<'_>, out: &mut Vec<u8>) {
    match *n {
        Number::Integer(digits) => {
            if digits.trim_start_matches('-').len() <= 18 {
                if let Ok(v) = digits.parse::<i64>() {
                    let v = i128::from(v);
                    // itoa, not `write!`: a square is every worker's
                    // hottest reply, and `core::fmt` costs twice as much.
                    out.extend_from_slice(itoa::Buffer::new().format(v * v).as_bytes());
                    return;
                }
            }
            match digits.parse::<BigInt>() {
                Ok(v) => {
                    let _ = write!(out, "{}", &v * &v);
                }
                // Unreachable for parsed requests, whose digits are validated.
                Err(_) => out.extend_from_slice(b"0"),
            }
        }
        Number::Decimal(x) => {
            let mut buf = ryu::Buffer::new();
            out.extend_from_slice(buf.format_finite(x * x).as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse;

    fn reply(datagram: &str) -> (String, Outcome) {
        let ctx = ReplyContext {
            worker_pid: 4242,
            client: "127.0.0.1:5555".parse().unwrap(),
        };
        let mut out = Vec::new();
        let outcome = write_reply(&parse(datagram.as_bytes()).unwrap(), &ctx, &mut out);
        (String::from_utf8(out).unwrap(), outcome)
    }

    #[test]
    fn text_replies() {
        assert_eq!(reply("7").0, "49");
        assert_eq!(reply("-12").0, "144");
        assert_eq!(reply("1.5").0, "2.25");
        assert_eq!(reply("2.0").0, "4.0");
        assert_eq!(
            reply("12345678901234567890").0,
            "152415787532388367501905199875019052100"
        );
        assert_eq!(
            reply("Hi server!").0,
            "Hi 127.0.0.1:5555. This is server 4242"
        );
        let (text, outcome) = reply("1e200");
        assert_eq!(outcome, Outcome::Error(ErrorCode::OutOfRange));
        assert!(text.starts_with("error: out_of_range: "), "{text}");
    }

    #[test]
    fn json_replies() {
        assert_eq!(
            reply(r#"{"op":"square","n":12,"id":7}"#).0,
            r#"{"ok":true,"op":"square","result":144,"worker_pid":4242,"id":7}"#
        );
        assert_eq!(
            reply(r#"{"op":"square","n":-18446744073709551616}"#).0,
            r#"{"ok":true,"op":"square","result":340282366920938463463374607431768211456,"worker_pid":4242}"#
        );
        assert_eq!(
            reply(r#"{"op":"hello","pid":99,"id":"x"}"#).0,
            r#"{"ok":true,"op":"hello","message":"Hi 127.0.0.1:5555. This is server 4242","client_pid":99,"worker_pid":4242,"id":"x"}"#
        );
        let (text, outcome) = reply(r#"{"op":"crash","id":1}"#);
        assert_eq!(outcome, Outcome::Error(ErrorCode::Disabled));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], "disabled");
        assert_eq!(v["id"], 1);
    }

    #[test]
    fn oversized_squares_are_too_large() {
        let big = format!(r#"{{"op":"square","n":{},"id":1}}"#, "9".repeat(40_000));
        let (text, outcome) = reply(&big);
        assert_eq!(outcome, Outcome::Error(ErrorCode::TooLarge));
        assert!(text.contains(r#""id":1"#));
        let fits = "9".repeat(30_000);
        let (text, outcome) = reply(&fits);
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(text.len(), 60_000);
    }

    #[test]
    fn bound_reply_compacts_errors_then_withholds() {
        let mut out = Vec::new();
        let o = write_error(
            Dialect::Json,
            Some("7"),
            ErrorCode::Busy,
            "every worker is full; try again shortly",
            None,
            &mut out,
        );
        assert_eq!(bound_reply(o, Dialect::Json, Some("7"), 1000, &mut out), o);
        assert!(out.len() > 40);
        assert_eq!(bound_reply(o, Dialect::Json, Some("7"), 40, &mut out), o);
        assert_eq!(out, br#"{"ok":false,"error":"busy","id":7}"#);
        assert_eq!(bound_reply(o, Dialect::Json, Some("7"), 30, &mut out), o);
        assert_eq!(out, br#"{"ok":false,"error":"busy"}"#);
        assert_eq!(
            bound_reply(o, Dialect::Json, Some("7"), 10, &mut out),
            Outcome::Withheld
        );
        assert!(out.is_empty());
        let mut out = b"error: busy: every worker is full".to_vec();
        assert_eq!(
            bound_reply(
                Outcome::Error(ErrorCode::Busy),
                Dialect::Text,
                None,
                12,
                &mut out
            ),
            Outcome::Error(ErrorCode::Busy)
        );
        assert_eq!(out, b"error: busy");
        let mut out = b"Hi 127.0.0.1:5555. This is server 42".to_vec();
        assert_eq!(
            bound_reply(Outcome::Ok, Dialect::Text, None, 3, &mut out),
            Outcome::Withheld
        );
    }
}
