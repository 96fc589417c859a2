//! Rendering requests and reading replies, as the client tools see them.
//!
//! The wire format itself is defined by the `protocol` crate; this module
//! only writes the few requests the client tools send and reads replies
//! without losing precision: every field of a JSON reply is kept as its raw
//! JSON text, so a `result` of any size is printed and compared exactly.

use std::borrow::Cow;
use std::io::Write;
use std::net::SocketAddr;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The one-shot requests the `client` binary sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `{"op":"hello","pid":PID}`: a greeting that names the worker.
    Hello,
    /// `{"op":"square","n":N}` with N written exactly as the user typed it.
    Square(String),
    /// `{"op":"sleep","ms":MS}`: the worker sleeps, then replies.
    Sleep(u64),
    /// `{"op":"stats"}`: pool statistics, answered by the master.
    Stats,
    /// TEXT sent as is (usually the text dialect): no id, the first reply wins.
    Send(String),
}

/// Why a number typed on the command line cannot be sent as a JSON number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a number (expected digits, optionally with a sign, a fraction and an exponent)"
)]
pub struct NotANumber(pub String);

/// Turns a number as typed (`12`, `+7`, `-1.5e3`, 40 digits...) into a JSON
/// number literal without going through `f64`, so any size stays exact.
///
/// A leading `+` is dropped, and so are redundant leading zeros of the
/// integer part, which JSON does not allow (`007` -> `7`).
///
/// # Errors
/// [`NotANumber`] when the text is not a decimal number.
pub fn json_number_literal(typed: &str) -> Result<String, NotANumber> {
    let bad = || NotANumber(typed.to_string());
    let s = typed.trim();
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'-') => ("-", &s[1..]),
        Some(b'+') => ("", &s[1..]),
        _ => ("", s),
    };
    let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (int, mut tail) = rest.split_at(int_len);
    let mut frac = "";
    if let Some(t) = tail.strip_prefix('.') {
        let n = t.bytes().take_while(u8::is_ascii_digit).count();
        frac = &t[..n];
        tail = &t[n..];
    }
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    let mut exp = "";
    if let Some(t) = tail.strip_prefix(['e', 'E']) {
        let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        exp = t;
        tail = "";
    }
    if !tail.is_empty() {
        return Err(bad());
    }
    let int = int.trim_start_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let mut out = format!("{sign}{int}");
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if !exp.is_empty() {
        out.push('e');
        out.push_str(exp);
    }
    Ok(out)
}

/// Renders a one-shot request. JSON requests carry `id` (raw JSON text);
/// [`Command::Send`] is sent as typed and ignores it.
pub fn render_command(cmd: &Command, id: &str, pid: u32) -> Vec<u8> {
    match cmd {
        Command::Hello => format!(r#"{{"op":"hello","pid":{pid},"id":{id}}}"#),
        Command::Square(n) => format!(r#"{{"op":"square","n":{n},"id":{id}}}"#),
        Command::Sleep(ms) => format!(r#"{{"op":"sleep","ms":{ms},"id":{id}}}"#),
        Command::Stats => format!(r#"{{"op":"stats","id":{id}}}"#),
        Command::Send(text) => text.clone(),
    }
    .into_bytes()
}

/// What one load-generator request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// JSON square of a number whose square fits in an `i128`.
    Square = 0,
    /// JSON hello carrying the load generator's pid.
    Hello = 1,
    /// JSON sleep of `--sleep-ms`.
    Sleep = 2,
    /// Text-dialect square; the number itself encodes the request id.
    Text = 3,
}

impl Kind {
    /// Every kind, in `--mix` order.
    pub const ALL: [Kind; 4] = [Kind::Square, Kind::Hello, Kind::Sleep, Kind::Text];

    /// The kind's name in `--mix`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Square => "square",
            Kind::Hello => "hello",
            Kind::Sleep => "sleep",
            Kind::Text => "text",
        }
    }
}

/// Text requests have no id, so the number sent is `TEXT_BASE + id`: the
/// square that comes back tells which request it answers.
pub const TEXT_BASE: u64 = 1_000_000_000_000;

/// Writes one load-generator request into `buf` and returns its length.
///
/// `arg` is the number to square (`Square`), the pid (`Hello`) or the
/// milliseconds (`Sleep`); `Text` derives its number from `id`. Writing into
/// a caller-owned slice keeps the send path free of allocations.
///
/// # Panics
/// If `buf` is too small for the request (callers use 128-byte slots; the
/// longest request is well under 100 bytes).
pub fn render_load_request(kind: Kind, id: u64, arg: i64, buf: &mut [u8]) -> usize {
    let cap = buf.len();
    let mut w = &mut buf[..];
    let r = match kind {
        Kind::Square => write!(w, r#"{{"op":"square","n":{arg},"id":{id}}}"#),
        Kind::Hello => write!(w, r#"{{"op":"hello","pid":{arg},"id":{id}}}"#),
        Kind::Sleep => write!(w, r#"{{"op":"sleep","ms":{arg},"id":{id}}}"#),
        Kind::Text => write!(w, "{}", TEXT_BASE + id),
    };
    r.expect("request slot is large enough");
    cap - w.len()
}

/// A JSON reply with each field kept as raw JSON text. Unknown fields (such
/// as those of `stats`) are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct JsonReply<'a> {
    /// `true` or `false`.
    #[serde(borrow, default)]
    pub ok: Option<&'a RawValue>,
    /// The op answered, as a JSON string.
    #[serde(borrow, default)]
    pub op: Option<&'a RawValue>,
    /// The square: a number literal of any size.
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    /// The PID of the process that answered.
    #[serde(borrow, default)]
    pub worker_pid: Option<&'a RawValue>,
    /// The request's id, echoed unchanged.
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    /// The error code of an error reply.
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
    /// The greeting, or the human sentence of an error reply.
    #[serde(borrow, default)]
    pub message: Option<&'a RawValue>,
    /// What a `sleep` slept.
    #[serde(borrow, default)]
    pub slept_ms: Option<&'a RawValue>,
    /// The pid a `hello` carried.
    #[serde(borrow, default)]
    pub client_pid: Option<&'a RawValue>,
}

impl<'a> JsonReply<'a> {
    /// Parses a JSON reply datagram, or `None` if it is not a JSON object.
    pub fn parse(datagram: &'a [u8]) -> Option<JsonReply<'a>> {
        serde_json::from_slice(datagram).ok()
    }

    /// Whether the reply says `"ok":true`.
    pub fn is_ok(&self) -> bool {
        raw(self.ok) == Some("true")
    }

    /// The id's raw JSON text.
    pub fn id_raw(&self) -> Option<&'a str> {
        raw(self.id)
    }

    /// The id as a `u64`, as the load generator numbers its requests.
    pub fn id_u64(&self) -> Option<u64> {
        raw(self.id)?.parse().ok()
    }

    /// The answering process.
    pub fn worker_pid(&self) -> Option<u32> {
        raw(self.worker_pid)?.parse().ok()
    }

    /// The error code of an error reply.
    pub fn error_code(&self) -> Option<Cow<'a, str>> {
        json_str(self.error?)
    }

    /// The op, unescaped.
    pub fn op(&self) -> Option<Cow<'a, str>> {
        json_str(self.op?)
    }

    /// The message (greeting or error sentence), unescaped.
    pub fn message(&self) -> Option<Cow<'a, str>> {
        json_str(self.message?)
    }
}

fn raw(v: Option<&RawValue>) -> Option<&str> {
    v.map(RawValue::get)
}

/// A raw JSON string, unescaped (borrowed when it has no escapes).
fn json_str(v: &RawValue) -> Option<Cow<'_, str>> {
    let s = v.get();
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(s).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// Renders a reply the way a person wants to read it: `144  (worker 4242)`,
/// the greeting, or `error: busy: all workers are full`, and says which
/// server sent it when `from` is given: `144  (worker 4242 at 127.0.0.1:10001)`,
/// `49  (from 127.0.0.1:10001)`. Replies that are not JSON (the text dialect)
/// are shown as they came.
pub fn readable(datagram: &[u8], from: Option<SocketAddr>) -> String {
    let text = String::from_utf8_lossy(datagram);
    let at = from.map_or(String::new(), |s| format!("  (from {s})"));
    let Some(reply) = JsonReply::parse(datagram) else {
        return format!("{text}{at}");
    };
    let worker = match (reply.worker_pid(), from) {
        (Some(pid), Some(s)) => format!("  (worker {pid} at {s})"),
        (Some(pid), None) => format!("  (worker {pid})"),
        (None, _) => at.clone(),
    };
    if !reply.is_ok() {
        let code = reply.error_code().unwrap_or(Cow::Borrowed("unknown"));
        return match reply.message() {
            Some(m) => format!("error: {code}: {m}{at}"),
            None => format!("error: {code}{at}"),
        };
    }
    match (
        reply.op().as_deref(),
        reply.result,
        reply.message(),
        reply.slept_ms,
    ) {
        (Some("square"), Some(result), _, _) => format!("{}{worker}", result.get()),
        (Some("hello"), _, Some(message), _) => format!("{message}{worker}"),
        (Some("sleep"), _, _, Some(ms)) => format!("slept {} ms{worker}", ms.get()),
        _ => match serde_json::from_slice::<serde_json::Value>(datagram) {
            Ok(v) => format!(
                "{}{at}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| text.into_owned())
            ),
            Err(_) => format!("{text}{at}"),
        },
    }
}

/// The reply with `"server":"ADDR"` added as its last field, the rest kept
/// byte for byte (a `result` of any size stays exact). A reply that is not
/// a JSON object becomes `{"reply":TEXT,"server":ADDR}`.
pub fn with_server_field(datagram: &[u8], server: SocketAddr) -> String {
    let server = serde_json::Value::String(server.to_string());
    let text = String::from_utf8_lossy(datagram);
    let body = text.trim();
    let is_object = body.starts_with('{')
        && body.ends_with('}')
        && serde_json::from_str::<&RawValue>(body).is_ok();
    if !is_object {
        let reply = serde_json::Value::String(text.into_owned());
        return format!(r#"{{"reply":{reply},"server":{server}}}"#);
    }
    let inner = body[1..body.len() - 1].trim_end();
    if inner.trim_start().is_empty() {
        format!(r#"{{"server":{server}}}"#)
    } else {
        format!(r#"{{{inner},"server":{server}}}"#)
    }
}

/// How a reply datagram relates to the load generator's requests.
#[derive(Debug, PartialEq, Eq)]
pub enum Matched<'a> {
    /// A JSON reply to request `id`.
    Json {
        /// The echoed id.
        id: u64,
        /// The reply itself, for validation.
        reply: JsonReply<'a>,
    },
    /// A text square whose root names request `id`.
    Text {
        /// The id encoded in the squared number.
        id: u64,
    },
    /// A text `error: CODE: ...` reply, which cannot name its request.
    TextError(&'a str),
    /// Anything that names no request: no id, a non-numeric id, a text reply
    /// that is not a perfect square of an encoded id, bytes that are not UTF-8.
    Unmatched,
}

impl PartialEq for JsonReply<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.fields() == other.fields()
    }
}

impl<'a> JsonReply<'a> {
    fn fields(&self) -> [Option<&'a str>; 9] {
        [
            self.ok,
            self.op,
            self.result,
            self.worker_pid,
            self.id,
            self.error,
            self.message,
            self.slept_ms,
            self.client_pid,
        ]
        .map(raw)
    }
}

impl Eq for JsonReply<'_> {}

/// Finds which load request a reply datagram answers.
pub fn match_reply(datagram: &[u8]) -> Matched<'_> {
    if protocol::request::dialect_of(datagram) == protocol::Dialect::Json {
        return match JsonReply::parse(datagram) {
            Some(reply) => match reply.id_u64() {
                Some(id) => Matched::Json { id, reply },
                None => Matched::Unmatched,
            },
            None => Matched::Unmatched,
        };
    }
    let Ok(text) = std::str::from_utf8(datagram) else {
        return Matched::Unmatched;
    };
    let text = text.trim();
    if let Some(rest) = text.strip_prefix("error: ") {
        return Matched::TextError(rest.split(':').next().unwrap_or(rest));
    }
    let Ok(square) = text.parse::<u128>() else {
        return Matched::Unmatched;
    };
    match isqrt(square) {
        Some(root) if root >= u128::from(TEXT_BASE) => match u64::try_from(root) {
            Ok(root) => Matched::Text {
                id: root - TEXT_BASE,
            },
            Err(_) => Matched::Unmatched,
        },
        _ => Matched::Unmatched,
    }
}

/// The exact integer square root of `n`, if `n` is a perfect square.
fn isqrt(n: u128) -> Option<u128> {
    // An f64 estimate is within a few units of the root for any u128; fix it up.
    let mut r = (n as f64).sqrt() as u128;
    while match r.checked_mul(r) {
        Some(sq) => sq > n,
        None => true,
    } {
        r -= 1;
    }
    while (r + 1).checked_mul(r + 1).is_some_and(|sq| sq <= n) {
        r += 1;
    }
    (r * r == n).then_some(r)
}

/// Checks an `"ok":true` JSON reply against the request it answers: the
/// square is exact, the greeting names the worker and our address, the sleep
/// slept what was asked. `greeting_prefix` is `"Hi <our addr>. This is server `
/// (with the opening quote) for the socket the reply came on.
pub fn reply_is_right(kind: Kind, arg: i64, reply: &JsonReply<'_>, greeting_prefix: &str) -> bool {
    match kind {
        Kind::Square => {
            let want = i128::from(arg) * i128::from(arg);
            raw(reply.result).and_then(|r| r.parse::<i128>().ok()) == Some(want)
        }
        Kind::Hello => {
            let Some(pid) = raw(reply.worker_pid) else {
                return false;
            };
            let Some(msg) = raw(reply.message) else {
                return false;
            };
            let named = msg
                .strip_prefix(greeting_prefix)
                .and_then(|m| m.strip_suffix('"'))
                == Some(pid);
            named && raw(reply.client_pid).and_then(|p| p.parse::<i64>().ok()) == Some(arg)
        }
        Kind::Sleep => raw(reply.slept_ms).and_then(|m| m.parse::<i64>().ok()) == Some(arg),
        // Text replies are matched by their value: a match is right by construction.
        Kind::Text => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::request::{Number, Request};
    use protocol::{parse, Dialect};

    #[test]
    fn numbers_pass_through_exactly() {
        let big = "1234567890123456789012345678901234567890";
        assert_eq!(json_number_literal(big).unwrap(), big);
        assert_eq!(json_number_literal("+7").unwrap(), "7");
        assert_eq!(json_number_literal("-007").unwrap(), "-7");
        assert_eq!(json_number_literal("0").unwrap(), "0");
        assert_eq!(json_number_literal("1.5").unwrap(), "1.5");
        assert_eq!(json_number_literal(".5").unwrap(), "0.5");
        assert_eq!(json_number_literal("-2.50e+3").unwrap(), "-2.50e+3");
        assert_eq!(json_number_literal("1E400").unwrap(), "1e400");
        for bad in [
            "", "abc", "1.2.3", "1e", "--1", "0x10", "1 2", "inf", "NaN", ".",
        ] {
            assert!(json_number_literal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn commands_parse_as_intended() {
        let sq = render_command(&Command::Square("-1.5".into()), "\"9-1\"", 9);
        let p = parse(&sq).unwrap();
        assert_eq!(p.id, Some("\"9-1\""));
        assert_eq!(p.request, Ok(Request::Square(Number::Decimal(-1.5))));
        let hello = render_command(&Command::Hello, "7", 123);
        assert_eq!(
            parse(&hello).unwrap().request,
            Ok(Request::Hello {
                client_pid: Some(123)
            })
        );
        assert_eq!(
            parse(&render_command(&Command::Stats, "1", 1))
                .unwrap()
                .request,
            Ok(Request::Stats)
        );
        let text = render_command(&Command::Send("Hi server!".into()), "1", 1);
        assert_eq!(text, b"Hi server!");
        assert_eq!(parse(&text).unwrap().dialect, Dialect::Text);
    }

    #[test]
    fn load_requests_render_without_allocating() {
        let mut buf = [0u8; 128];
        let n = render_load_request(Kind::Square, 42, -3_000_000_000, &mut buf);
        let p = parse(&buf[..n]).unwrap();
        assert_eq!(p.id, Some("42"));
        assert_eq!(
            p.request,
            Ok(Request::Square(Number::Integer("-3000000000")))
        );
        let n = render_load_request(Kind::Hello, u64::MAX, 4_194_304, &mut buf);
        assert_eq!(
            parse(&buf[..n]).unwrap().request,
            Ok(Request::Hello {
                client_pid: Some(4_194_304)
            })
        );
        let n = render_load_request(Kind::Sleep, 1, 10, &mut buf);
        assert_eq!(
            parse(&buf[..n]).unwrap().request,
            Ok(Request::Sleep { ms: 10 })
        );
        let n = render_load_request(Kind::Text, 5, 0, &mut buf);
        assert_eq!(&buf[..n], b"1000000000005");
    }

    #[test]
    fn big_results_stay_exact() {
        let d = br#"{"ok":true,"op":"square","result":1524157875323883675049535156256668194500838287337600975522511782677488187881,"worker_pid":4242,"id":"1-1"}"#;
        let r = JsonReply::parse(d).unwrap();
        assert_eq!(r.id_raw(), Some("\"1-1\""));
        assert_eq!(
            readable(d, None),
            "1524157875323883675049535156256668194500838287337600975522511782677488187881  (worker 4242)"
        );
    }

    #[test]
    fn readable_replies() {
        assert_eq!(
            readable(br#"{"ok":true,"op":"hello","message":"Hi 127.0.0.1:5555. This is server 4242","client_pid":1,"worker_pid":4242,"id":7}"#, None),
            "Hi 127.0.0.1:5555. This is server 4242  (worker 4242)"
        );
        assert_eq!(
            readable(
                br#"{"ok":false,"error":"busy","message":"all workers are full","id":7}"#,
                None
            ),
            "error: busy: all workers are full"
        );
        assert_eq!(
            readable(
                br#"{"ok":true,"op":"sleep","slept_ms":5,"worker_pid":1,"id":7}"#,
                None
            ),
            "slept 5 ms  (worker 1)"
        );
        assert_eq!(readable(b"49", None), "49");
        assert!(
            readable(br#"{"ok":true,"op":"stats","workers":[1,2]}"#, None).contains("\"workers\"")
        );
    }

    #[test]
    fn replies_name_the_server_that_sent_them() {
        let s: SocketAddr = "127.0.0.1:10001".parse().unwrap();
        let sq = br#"{"ok":true,"op":"square","result":144,"worker_pid":4242,"id":"1-1"}"#;
        assert_eq!(
            readable(sq, Some(s)),
            "144  (worker 4242 at 127.0.0.1:10001)"
        );
        assert_eq!(readable(b"49", Some(s)), "49  (from 127.0.0.1:10001)");
        assert_eq!(
            readable(
                br#"{"ok":false,"error":"busy","message":"full","id":7}"#,
                Some(s)
            ),
            "error: busy: full  (from 127.0.0.1:10001)"
        );
        let big = br#" {"ok":true,"op":"square","result":15241578753238836750495351562536198787501905199875019052100,"id":1} "#;
        let j = with_server_field(big, s);
        assert_eq!(
            j,
            r#"{"ok":true,"op":"square","result":15241578753238836750495351562536198787501905199875019052100,"id":1,"server":"127.0.0.1:10001"}"#
        );
        let v6: SocketAddr = "[::1]:7".parse().unwrap();
        assert_eq!(with_server_field(b"{ }", v6), r#"{"server":"[::1]:7"}"#);
        assert_eq!(
            with_server_field(b"Hi \"x\"", v6),
            r#"{"reply":"Hi \"x\"","server":"[::1]:7"}"#
        );
        assert_eq!(
            with_server_field(b"{not json}", v6),
            r#"{"reply":"{not json}","server":"[::1]:7"}"#
        );
    }

    #[test]
    fn replies_are_matched_by_id() {
        let d = br#"{"ok":true,"op":"square","result":9,"worker_pid":3,"id":17}"#;
        match match_reply(d) {
            Matched::Json { id, reply } => {
                assert_eq!(id, 17);
                assert!(reply.is_ok());
                assert_eq!(reply.worker_pid(), Some(3));
                assert!(reply_is_right(Kind::Square, -3, &reply, ""));
                assert!(!reply_is_right(Kind::Square, 4, &reply, ""));
            }
            other => panic!("{other:?}"),
        }
        let e = br#"{"ok":false,"error":"busy","message":"m","id":2}"#;
        match match_reply(e) {
            Matched::Json { id: 2, reply } => {
                assert_eq!(reply.error_code().as_deref(), Some("busy"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(match_reply(br#"{"ok":true,"id":"x"}"#), Matched::Unmatched);
        assert_eq!(match_reply(br#"{"ok":true"#), Matched::Unmatched);
        let n = u128::from(TEXT_BASE + 99);
        assert_eq!(
            match_reply((n * n).to_string().as_bytes()),
            Matched::Text { id: 99 }
        );
        assert_eq!(match_reply(b"50"), Matched::Unmatched);
        assert_eq!(
            match_reply(b"Hi 1.2.3.4:5. This is server 9"),
            Matched::Unmatched
        );
        assert_eq!(
            match_reply(b"error: too_large: nope"),
            Matched::TextError("too_large")
        );
    }

    #[test]
    fn greetings_and_sleeps_are_checked() {
        let prefix = "\"Hi 127.0.0.1:5555. This is server ";
        let good = br#"{"ok":true,"op":"hello","message":"Hi 127.0.0.1:5555. This is server 42","client_pid":7,"worker_pid":42,"id":1}"#;
        let r = JsonReply::parse(good).unwrap();
        assert!(reply_is_right(Kind::Hello, 7, &r, prefix));
        assert!(!reply_is_right(Kind::Hello, 8, &r, prefix));
        assert!(!reply_is_right(
            Kind::Hello,
            7,
            &r,
            "\"Hi [::1]:5555. This is server "
        ));
        let liar = br#"{"ok":true,"op":"hello","message":"Hi 127.0.0.1:5555. This is server 43","client_pid":7,"worker_pid":42,"id":1}"#;
        assert!(!reply_is_right(
            Kind::Hello,
            7,
            &JsonReply::parse(liar).unwrap(),
            prefix
        ));
        let s = JsonReply::parse(br#"{"ok":true,"op":"sleep","slept_ms":3,"id":1}"#).unwrap();
        assert!(reply_is_right(Kind::Sleep, 3, &s, prefix));
        assert!(!reply_is_right(Kind::Sleep, 4, &s, prefix));
    }

    #[test]
    fn integer_square_roots() {
        for n in [0u128, 1, 2, 3, 4, 99, 100, u128::from(u64::MAX)] {
            let sq = n * n;
            assert_eq!(isqrt(sq), Some(n));
            if n > 1 {
                assert_eq!(isqrt(sq + 1), None);
            }
        }
        assert_eq!(isqrt(u128::MAX), None);
    }
}
