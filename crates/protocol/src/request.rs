//! Parsing a client datagram into a [`Parsed`] request: the one place that
//! knows what a request looks like on the wire.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::{Dialect, ErrorCode, Op, MAX_SLEEP_MS};

/// A request that could not be understood: the error reply's code and sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ProtocolError {
    /// The stable code of the error reply.
    pub code: ErrorCode,
    /// A human sentence: lowercase, no final period.
    pub message: Cow<'static, str>,
}

impl ProtocolError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

/// A number to square, as it was written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number<'a> {
    /// An integer of any size: an optional `-` then ASCII digits (a leading
    /// `+` is already stripped). Squared exactly.
    Integer(&'a str),
    /// A number with a fraction or an exponent, squared as an f64.
    Decimal(f64),
}

/// What the client asked for, once understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Request<'a> {
    /// Square this number.
    Square(Number<'a>),
    /// Greet the client, naming the worker that answers.
    Hello {
        /// The client's own process id, when it sent one (JSON `pid`).
        client_pid: Option<u64>,
    },
    /// Sleep this many milliseconds, then reply.
    Sleep {
        /// At most [`MAX_SLEEP_MS`].
        ms: u64,
    },
    /// Abort the worker (fault injection).
    Crash,
    /// Pool statistics (answered by the master).
    Stats,
    /// The group of servers: this one alone, or the cluster's view
    /// (answered by the master).
    Members,
}

impl Request<'_> {
    /// The op this request is.
    pub fn op(&self) -> Op {
        match self {
            Request::Square(_) => Op::Square,
            Request::Hello { .. } => Op::Hello,
            Request::Sleep { .. } => Op::Sleep,
            Request::Crash => Op::Crash,
            Request::Stats => Op::Stats,
            Request::Members => Op::Members,
        }
    }
}

/// A datagram, parsed: its dialect, its id, and the request or why it is bad.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed<'a> {
    /// The dialect the reply must use.
    pub dialect: Dialect,
    /// The JSON `id`, as its raw JSON text, to echo back unchanged.
    pub id: Option<&'a str>,
    /// The request, or the error reply it earns.
    pub request: Result<Request<'a>, ProtocolError>,
    /// The op named by a request that is otherwise bad, for the journal.
    pub(crate) op_hint: Op,
}

impl Parsed<'_> {
    /// The op, or [`Op::Invalid`] when the request is bad. A bad request
    /// whose op was recognised still reports that op.
    pub fn op(&self) -> Op {
        match &self.request {
            Ok(r) => r.op(),
            Err(_) => self.op_hint,
        }
    }
}

/// Parses one datagram.
///
/// Returns `None` for an empty datagram, which gets no reply (as in the
/// lecture's servers); every other datagram yields a [`Parsed`] whose
/// `request` is either understood or carries the error reply it earns.
pub fn parse(datagram: &[u8]) -> Option<Parsed<'_>> {
    if datagram.is_empty() {
        return None;
    }
    Some(match dialect_of(datagram) {
        Dialect::Json => parse_json(datagram),
        Dialect::Text => parse_text(datagram),
    })
}

/// The dialect of a datagram, from its first non-blank byte: `{` is JSON,
/// anything else text. Works on any prefix of the datagram, so a datagram
/// cut at `--max-datagram` still gets its error in its own dialect.
pub fn dialect_of(datagram: &[u8]) -> Dialect {
    match datagram.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Dialect::Json,
        _ => Dialect::Text,
    }
}

/// Whether a datagram may be a `stats` or `members` request: a cheap byte
/// scan that lets the master parse only the datagrams it must answer
/// itself. It has no false negatives: an op spelled with escapes
/// (`"st\u0061ts"`) is only possible in a datagram with a backslash, which
/// is always a maybe.
pub fn may_be_stats(datagram: &[u8]) -> bool {
    datagram.contains(&b'\\')
        || datagram.windows(7).any(|w| w == b"\"stats\"")
        || datagram.windows(9).any(|w| w == b"\"members\"")
}

/// Finds the `id` of a JSON datagram without caring whether the rest is a
/// valid request: what the master echoes in errors it answers itself.
pub fn peek_id(datagram: &[u8]) -> (Dialect, Option<&str>) {
    match parse(datagram) {
        Some(p) => (p.dialect, p.id),
        None => (Dialect::Text, None),
    }
}

fn parse_text(datagram: &[u8]) -> Parsed<'_> {
    let request = match std::str::from_utf8(datagram) {
        Err(_) => Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "payload is not valid UTF-8",
        )),
        Ok(text) => Ok(match text_number(text.trim()) {
            Some(n) => Request::Square(n),
            None => Request::Hello { client_pid: None },
        }),
    };
    Parsed {
        dialect: Dialect::Text,
        id: None,
        request,
        op_hint: Op::Invalid,
    }
}

/// A trimmed text payload as a number, if it is one: an optional sign,
/// digits with an optional fraction, and an optional exponent.
fn text_number(s: &str) -> Option<Number<'_>> {
    let b = s.as_bytes();
    let mut i = 0;
    let sign = matches!(b.first(), Some(b'+' | b'-'));
    if sign {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    let mut decimal = false;
    if i < b.len() && b[i] == b'.' {
        decimal = true;
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = i - start;
    }
    if int_digits + frac_digits == 0 {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        decimal = true;
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    if decimal {
        s.parse().ok().map(Number::Decimal)
    } else {
        Some(Number::Integer(s.strip_prefix('+').unwrap_or(s)))
    }
}

/// The JSON request object. Every field is kept raw so that a mistyped
/// field is reported by name (and the id still echoed) instead of failing
/// the whole object.
#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pid: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ms: Option<&'a RawValue>,
}

/// Keeps a present field as `Some` even when its value is `null`, so that
/// `"id":null` is echoed like any other scalar.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn parse_json(datagram: &[u8]) -> Parsed<'_> {
    let mut parsed = Parsed {
        dialect: Dialect::Json,
        id: None,
        request: Err(ProtocolError::new(ErrorCode::BadRequest, "")),
        op_hint: Op::Invalid,
    };
    let text = match std::str::from_utf8(datagram) {
        Ok(t) => t,
        Err(_) => {
            parsed.request = Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "payload is not valid UTF-8",
            ));
            return parsed;
        }
    };
    let wire: WireRequest<'_> = match serde_json::from_str(text) {
        Ok(w) => w,
        Err(e) => {
            parsed.request = Err(ProtocolError::new(
                ErrorCode::BadRequest,
                format!("malformed JSON request: {e}"),
            ));
            return parsed;
        }
    };
    if let Some(id) = wire.id {
        let raw = id.get();
        if raw.starts_with('{') || raw.starts_with('[') {
            parsed.request = Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "field id must be a JSON scalar, not an object or array",
            ));
            return parsed;
        }
        parsed.id = Some(raw);
    }
    parsed.request = json_request(&wire, &mut parsed.op_hint);
    parsed
}

fn json_request<'a>(
    wire: &WireRequest<'a>,
    op_hint: &mut Op,
) -> Result<Request<'a>, ProtocolError> {
    let op_raw = wire
        .op
        .ok_or_else(|| ProtocolError::new(ErrorCode::BadRequest, "missing field op"))?;
    let op: Cow<'_, str> =
        match serde_json::from_str::<&str>(op_raw.get()) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(serde_json::from_str::<String>(op_raw.get()).map_err(|_| {
                ProtocolError::new(ErrorCode::BadRequest, "field op must be a string")
            })?),
        };
    let op = match &*op {
        "square" => Op::Square,
        "hello" => Op::Hello,
        "sleep" => Op::Sleep,
        "crash" => Op::Crash,
        "stats" => Op::Stats,
        "members" => Op::Members,
        other => {
            let shown: String = other.chars().take(40).collect();
            return Err(ProtocolError::new(
                ErrorCode::UnknownOp,
                format!(
                    "unknown op {shown:?} (known: square, hello, sleep, crash, stats, members)"
                ),
            ));
        }
    };
    *op_hint = op;
    match op {
        Op::Square => {
            let n = wire.n.ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::BadRequest,
                    "missing field n (the number to square)",
                )
            })?;
            json_number(n.get()).map(Request::Square)
        }
        Op::Hello => {
            let client_pid = match wire.pid {
                None => None,
                Some(raw) if raw.get() == "null" => None,
                Some(raw) => Some(json_u64(raw.get()).ok_or_else(|| {
                    ProtocolError::new(
                        ErrorCode::BadRequest,
                        "field pid must be a non-negative integer",
                    )
                })?),
            };
            Ok(Request::Hello { client_pid })
        }
        Op::Sleep => {
            let raw = wire.ms.ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::BadRequest,
                    "missing field ms (milliseconds to sleep)",
                )
            })?;
            let raw = raw.get();
            if !is_json_integer(raw) {
                return Err(ProtocolError::new(
                    ErrorCode::BadRequest,
                    "field ms must be an integer number of milliseconds",
                ));
            }
            match json_u64(raw) {
                Some(ms) if ms <= MAX_SLEEP_MS => Ok(Request::Sleep { ms }),
                _ => Err(ProtocolError::new(
                    ErrorCode::OutOfRange,
                    format!("field ms must be between 0 and {MAX_SLEEP_MS}"),
                )),
            }
        }
        Op::Crash => Ok(Request::Crash),
        Op::Stats => Ok(Request::Stats),
        Op::Members => Ok(Request::Members),
        Op::Invalid => unreachable!("op names map to real ops"),
    }
}

/// Whether raw JSON text (already validated by serde_json) is an integer literal.
fn is_json_integer(raw: &str) -> bool {
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn json_u64(raw: &str) -> Option<u64> {
    if raw.starts_with('-') || !is_json_integer(raw) {
        return None;
    }
    raw.parse().ok()
}

fn json_number(raw: &str) -> Result<Number<'_>, ProtocolError> {
    match raw.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => {}
        _ => {
            return Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "field n must be a number",
            ))
        }
    }
    if is_json_integer(raw) {
        return Ok(Number::Integer(raw));
    }
    match raw.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(Number::Decimal(x)),
        _ => Err(ProtocolError::new(
            ErrorCode::OutOfRange,
            "field n is too large for a decimal number",
        )),
    }
}

/// The value a request's `id` denotes, for storing and comparing it (the
/// journal): strings unescaped, numbers as numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum IdValue<'a> {
    /// A string, its escapes decoded. A string cut short (a completion
    /// carries at most [`crate::frame::MAX_DONE_ID`] bytes of the id) is its
    /// text after the opening quote, as it is.
    Text(Cow<'a, str>),
    /// An integer that fits in an `i64`.
    Integer(i64),
    /// Any other number (a fraction, an exponent, a larger integer), to the
    /// nearest `f64`.
    Real(f64),
    /// `true` or `false`.
    Bool(bool),
    /// `null`.
    Null,
}

/// The value an id's raw JSON text (as in [`Parsed::id`]) denotes. Borrows
/// from `raw` unless a string has escapes to decode.
pub fn id_value(raw: &str) -> IdValue<'_> {
    match raw {
        "true" => return IdValue::Bool(true),
        "false" => return IdValue::Bool(false),
        "null" => return IdValue::Null,
        _ => {}
    }
    if let Some(body) = raw.strip_prefix('"') {
        if !body.contains('\\') {
            // Without escapes a quote can only be the closing one.
            return IdValue::Text(Cow::Borrowed(body.strip_suffix('"').unwrap_or(body)));
        }
        return match serde_json::from_str::<String>(raw) {
            Ok(text) => IdValue::Text(Cow::Owned(text)),
            Err(_) => IdValue::Text(Cow::Borrowed(body)),
        };
    }
    if let Ok(n) = raw.parse::<i64>() {
        return IdValue::Integer(n);
    }
    match raw.parse::<f64>() {
        Ok(x) => IdValue::Real(x),
        // Not a JSON scalar: ids are checked before they get here.
        Err(_) => IdValue::Text(Cow::Borrowed(raw)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<Request<'_>, ProtocolError> {
        parse(s.as_bytes()).unwrap().request
    }

    #[test]
    fn empty_datagram_gets_no_reply() {
        assert!(parse(b"").is_none());
    }

    #[test]
    fn text_numbers_and_greetings() {
        assert_eq!(req("7"), Ok(Request::Square(Number::Integer("7"))));
        assert_eq!(req(" -12\n"), Ok(Request::Square(Number::Integer("-12"))));
        assert_eq!(req("+5"), Ok(Request::Square(Number::Integer("5"))));
        assert_eq!(req("1.5"), Ok(Request::Square(Number::Decimal(1.5))));
        assert_eq!(req("1e3"), Ok(Request::Square(Number::Decimal(1000.0))));
        for greeting in ["Hi server!", "inf", "NaN", "1.2.3", "-", ".", "1e", "  "] {
            assert_eq!(
                req(greeting),
                Ok(Request::Hello { client_pid: None }),
                "{greeting}"
            );
        }
        let bad = parse(b"\xff\xfe").unwrap();
        assert_eq!(bad.dialect, Dialect::Text);
        assert_eq!(bad.request.unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn json_requests() {
        let p =
            parse(br#" {"op":"square","n":123456789012345678901234567890,"id":"a\"b"}"#).unwrap();
        assert_eq!(p.dialect, Dialect::Json);
        assert_eq!(p.id, Some(r#""a\"b""#));
        assert_eq!(
            p.request,
            Ok(Request::Square(Number::Integer(
                "123456789012345678901234567890"
            )))
        );
        assert_eq!(
            req(r#"{"op":"hello","pid":42}"#),
            Ok(Request::Hello {
                client_pid: Some(42)
            })
        );
        assert_eq!(
            req(r#"{"op":"sleep","ms":5}"#),
            Ok(Request::Sleep { ms: 5 })
        );
        assert_eq!(req(r#"{"op":"st\u0061ts"}"#), Ok(Request::Stats));
        assert_eq!(
            parse(br#"{"op":"hello","id":null}"#).unwrap().id,
            Some("null")
        );
    }

    #[test]
    fn json_errors_keep_the_id() {
        let cases = [
            (r#"{"op":"square","id":1}"#, ErrorCode::BadRequest),
            (r#"{"op":"square","n":"7","id":1}"#, ErrorCode::BadRequest),
            (r#"{"op":"square","n":1e400,"id":1}"#, ErrorCode::OutOfRange),
            (r#"{"op":"nope","id":1}"#, ErrorCode::UnknownOp),
            (r#"{"op":7,"id":1}"#, ErrorCode::BadRequest),
            (r#"{"op":"sleep","ms":-1,"id":1}"#, ErrorCode::OutOfRange),
            (
                r#"{"op":"sleep","ms":99999999,"id":1}"#,
                ErrorCode::OutOfRange,
            ),
            (r#"{"op":"sleep","ms":1.5,"id":1}"#, ErrorCode::BadRequest),
            (r#"{"op":"hello","pid":-3,"id":1}"#, ErrorCode::BadRequest),
        ];
        for (text, code) in cases {
            let p = parse(text.as_bytes()).unwrap();
            assert_eq!(p.id, Some("1"), "{text}");
            assert_eq!(p.request.unwrap_err().code, code, "{text}");
        }
        let p = parse(br#"{"op":"square","n":2"#).unwrap();
        assert_eq!(p.id, None);
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn ids_denote_their_values() {
        use super::{id_value, IdValue};
        fn text(s: &str) -> IdValue<'_> {
            IdValue::Text(Cow::Borrowed(s))
        }
        assert_eq!(id_value(r#""abc""#), text("abc"));
        assert_eq!(id_value(r#""""#), text(""));
        assert_eq!(id_value(r#""7""#), text("7"));
        assert_eq!(
            id_value(r#""a\"b\u0041\\""#),
            IdValue::Text(Cow::Owned("a\"bA\\".to_owned()))
        );
        // Cut short by a completion frame: the text as it is.
        assert_eq!(id_value(r#""abc"#), text("abc"));
        assert_eq!(id_value(r#""a\u00"#), text("a\\u00"));
        assert_eq!(id_value("7"), IdValue::Integer(7));
        assert_eq!(id_value("-0"), IdValue::Integer(0));
        assert_eq!(id_value("-9223372036854775808"), IdValue::Integer(i64::MIN));
        assert_eq!(
            id_value("9223372036854775808"),
            IdValue::Real(9.223_372_036_854_776e18)
        );
        assert_eq!(id_value("1.50"), IdValue::Real(1.5));
        assert_eq!(id_value("1e3"), IdValue::Real(1000.0));
        assert_eq!(id_value("1e999"), IdValue::Real(f64::INFINITY));
        assert_eq!(id_value("true"), IdValue::Bool(true));
        assert_eq!(id_value("false"), IdValue::Bool(false));
        assert_eq!(id_value("null"), IdValue::Null);
    }

    #[test]
    fn stats_scan_and_peek_id() {
        assert!(may_be_stats(br#"{"op":"stats"}"#));
        assert!(!may_be_stats(br#"{"op":"square","n":1}"#));
        assert!(may_be_stats(br#"{"op":"members","id":1}"#));
        assert_eq!(req(r#"{"op":"members"}"#), Ok(Request::Members));
        assert_eq!(peek_id(br#"{"op":"x","id":[1]}"#), (Dialect::Json, None));
        assert_eq!(peek_id(br#"{"op":"x","id":9}"#), (Dialect::Json, Some("9")));
    }
}
