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
    // A quote, then the rarer letters first, as in [`may_carry_hlc`].
    datagram.contains(&b'\\')
        || datagram.iter().enumerate().any(|(i, &b)| {
            b == b'"'
                && match datagram.get(i + 1) {
                    Some(b's') => datagram[i + 1..].starts_with(b"stats\""),
                    Some(b'm') => datagram[i + 1..].starts_with(b"members\""),
                    _ => false,
                }
        })
}

/// Whether a datagram may carry a causal link (a JSON `"hlc"` field): the
/// same kind of cheap scan as [`may_be_stats`], with no false negatives
/// (a key spelled with escapes needs a backslash).
pub fn may_carry_hlc(datagram: &[u8]) -> bool {
    // Compares the bytes one by one, the rare `h` first: a slice comparison
    // per window costs a `memcmp` call each, five times as long in all.
    datagram.contains(&b'\\')
        || datagram
            .windows(5)
            .any(|w| w[1] == b'h' && w[2] == b'l' && w[3] == b'c' && w[0] == b'"' && w[4] == b'"')
}

/// The `hlc` field of a JSON request.
#[derive(Deserialize)]
struct WireLink<'a> {
    #[serde(borrow, default)]
    hlc: Option<&'a RawValue>,
}

/// A JSON request's causal link: the text of its `"hlc"` field, an HLC
/// stamp the client saw in an earlier reply (`stats`), which the master
/// passes to its clock without looking inside. `None` when the datagram is
/// not a well-formed JSON object with at most one `hlc` (such a request
/// carries no link), or has no such field, or it is `null`; `Some(Err(..))` when the field
/// is there but is not a plain string (without escapes).
pub fn peek_hlc(datagram: &[u8]) -> Option<Result<&str, ProtocolError>> {
    if dialect_of(datagram) != Dialect::Json {
        return None;
    }
    let text = std::str::from_utf8(datagram).ok()?;
    let bad = || {
        ProtocolError::new(
            ErrorCode::BadRequest,
            "field hlc must be a string without escapes",
        )
    };
    let wire: WireLink<'_> = serde_json::from_str(text).ok()?;
    let raw = wire.hlc?.get();
    Some(
        match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(s) if !s.contains('\\') => Ok(s),
            _ => Err(bad()),
        },
    )
}

/// Finds the `id` of a JSON datagram without caring whether the rest is a
/// valid request: what the master echoes in errors it answers itself.
pub fn peek_id(datagram: &[u8]) -> (Dialect, Option<&str>) {
    match parse(datagram) {
        Some(p) => (p.dialect, p.id),
        None => (Dialect::Text, None),
    }
}

/// Finds the raw `id` of a JSON datagram in one pass over its bytes,
/// without parsing the rest: what the master keys its duplicate request
/// cache on. No allocation, no recursion, linear in the datagram.
///
/// For every datagram [`parse`] reads as JSON, the answer is the parser's
/// [`Parsed::id`], byte for byte, with one exception: an `id` key spelled
/// with escapes (`"\u0069d"`) is not seen, and the answer is `None`. A
/// datagram the parser rejects as malformed JSON (or not UTF-8) may still
/// yield an id here; the cache is safe with that, because it answers a
/// retry only with the reply to the very same bytes. `None` also for the
/// text dialect, an id that is an object or array, and a repeated `id`
/// (the parser's `bad_request` cases, which echo no id).
pub fn scan_id(datagram: &[u8]) -> Option<&[u8]> {
    let mut s = Scanner { b: datagram, i: 0 };
    s.blank();
    if !s.eat(b'{') {
        return None;
    }
    let mut id = None;
    s.blank();
    if !s.eat(b'}') {
        loop {
            s.blank();
            let (key, escaped) = s.string()?;
            s.blank();
            if !s.eat(b':') {
                return None;
            }
            s.blank();
            let value = s.value()?;
            if !escaped && key == b"\"id\"" {
                if id.is_some() {
                    return None;
                }
                id = Some(value);
            }
            s.blank();
            if s.eat(b',') {
                continue;
            }
            if s.eat(b'}') {
                break;
            }
            return None;
        }
    }
    s.blank();
    if s.i != datagram.len() {
        return None;
    }
    id.filter(|v| !matches!(v.first(), Some(b'{' | b'[')))
}

/// [`CLASS`] bit: JSON whitespace.
const BLANK: u8 = 1;
/// [`CLASS`] bit: a byte that ends a scalar (whitespace, `,`, `}`, `]`).
const ENDS_SCALAR: u8 = 2;
/// [`CLASS`] bit: a byte that ends a run in a string (`"`, `\\`).
const ENDS_STRING: u8 = 4;
/// [`Scanner`]'s byte classes: one lookup a byte in its loops.
static CLASS: [u8; 256] = {
    let mut class = [0; 256];
    class[b' ' as usize] = BLANK | ENDS_SCALAR;
    class[b'\t' as usize] = BLANK | ENDS_SCALAR;
    class[b'\n' as usize] = BLANK | ENDS_SCALAR;
    class[b'\r' as usize] = BLANK | ENDS_SCALAR;
    class[b',' as usize] = ENDS_SCALAR;
    class[b'}' as usize] = ENDS_SCALAR;
    class[b']' as usize] = ENDS_SCALAR;
    class[b'"' as usize] = ENDS_STRING;
    class[b'\\' as usize] = ENDS_STRING;
    class
};

/// A cursor over a datagram for [`scan_id`]: lenient inside values (it
/// skips them by their brackets and quotes), exact on valid JSON.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    /// Skips JSON whitespace (space, tab, LF, CR).
    fn blank(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if CLASS[usize::from(c)] & BLANK == 0 {
                break;
            }
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.b.get(self.i) == Some(&byte);
        self.i += usize::from(hit);
        hit
    }

    /// A string at the cursor, quotes included, and whether it has escapes.
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        let start = self.i;
        if !self.eat(b'"') {
            return None;
        }
        let mut escaped = false;
        loop {
            let c = *self.b.get(self.i)?;
            if CLASS[usize::from(c)] & ENDS_STRING == 0 {
                self.i += 1;
            } else if c == b'"' {
                self.i += 1;
                return Some((&self.b[start..self.i], escaped));
            } else {
                escaped = true;
                self.i += 2;
            }
        }
    }

    /// A value at the cursor, as its raw text: a string, an object or array
    /// (skipped to its matching bracket), or a scalar (up to the next
    /// delimiter).
    fn value(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        match *self.b.get(self.i)? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *self.b.get(self.i)? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth -= 1,
                        _ => {}
                    }
                    self.i += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            _ => {
                while let Some(&c) = self.b.get(self.i) {
                    if CLASS[usize::from(c)] & ENDS_SCALAR != 0 {
                        break;
                    }
                    self.i += 1;
                }
                if self.i == start {
                    return None;
                }
            }
        }
        Some(&self.b[start..self.i])
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
        assert!(may_carry_hlc(br#"{"op":"hello","hlc":"1/2"}"#));
        assert!(may_carry_hlc(br#"{"op":"hello","h\u006cc":"1/2"}"#));
        assert!(!may_carry_hlc(br#"{"op":"hello","n":"hl"}"#));
        assert!(!may_be_stats(br#"{"op":"square","n":1}"#));
        assert!(may_be_stats(br#"{"op":"members","id":1}"#));
        assert!(!may_be_stats(br#"{"op":"square","n":1,"id":"stat"}"#));
        assert!(!may_be_stats(br#"{"op":"square","n":1,"id":"member"#));
        assert!(!may_be_stats(b"stats\""));
        assert!(!may_be_stats(b"\""));
        assert!(may_be_stats(br#"{"stats":1}"#));
        assert_eq!(req(r#"{"op":"members"}"#), Ok(Request::Members));
        assert_eq!(peek_id(br#"{"op":"x","id":[1]}"#), (Dialect::Json, None));
        assert_eq!(peek_id(br#"{"op":"x","id":9}"#), (Dialect::Json, Some("9")));
    }

    #[test]
    fn a_causal_link_is_peeked_as_its_text() {
        fn ok(d: &str) -> Option<Result<&str, ErrorCode>> {
            peek_hlc(d.as_bytes()).map(|r| r.map_err(|e| e.code))
        }
        assert_eq!(
            ok(r#"{"op":"hello","hlc":"7386690599959157260/1a"}"#),
            Some(Ok("7386690599959157260/1a"))
        );
        assert_eq!(ok(r#"{"op":"stats","h\u006cc":"1/2"}"#), Some(Ok("1/2")));
        for bad in [
            r#"{"hlc":7}"#,
            r#"{"hlc":"1\u002f2"}"#,
            r#"{"hlc":["1/2"]}"#,
        ] {
            assert_eq!(ok(bad), Some(Err(ErrorCode::BadRequest)), "{bad}");
        }
        for none in [
            r#"{"op":"hello"}"#,
            r#"{"hlc":null}"#,
            r#"{"hlc":"1/2","hlc":"1/2"}"#,
            r#"{"hlc":"1/2""#,
            "hlc",
            r#"["hlc"]"#,
            "",
        ] {
            assert_eq!(ok(none), None, "{none}");
        }
    }

    #[test]
    fn scan_id_finds_the_parsers_id() {
        let same = [
            r#"{"op":"square","n":2,"id":7}"#,
            r#" { "id" : "a\"b}" , "op":"hello" } "#,
            r#"{"n":{"id":1,"x":[1,{"y":"]"}]},"id":-1.5e3,"op":"x"}"#,
            "{\"op\":\"hello\",\n\"id\":null\r\n}\t",
            r#"{"op":"hello","id":true}"#,
            r#"{"op":"hello"}"#,
            r#"{}"#,
            r#"{"op":"hello","idx":1,"i":2}"#,
            r#"{"op":"hello","id":"\u00e9\\"}"#,
        ];
        for text in same {
            let want = parse(text.as_bytes()).unwrap().id.map(str::as_bytes);
            assert_eq!(scan_id(text.as_bytes()), want, "{text}");
        }
        // What the parser rejects without an id, the scanner has none for.
        for text in [
            r#"{"op":"hello","id":{"a":1}}"#,
            r#"{"op":"hello","id":[1]}"#,
            r#"{"id":1,"op":"hello","id":2}"#,
            r#"{"op":"hello","id":1} x"#,
            r#"{"op":"hello","id":1"#,
            r#"{"op":"hello","id":}"#,
            r#"{"op":"hello","id":"1}"#,
            r#"{"op" "hello"}"#,
            "7",
            "id 7",
            "",
            "\u{c}{\"id\":1}",
            "{\"id\":1,\"x\":[[[[[\"",
        ] {
            assert_eq!(scan_id(text.as_bytes()), None, "{text}");
        }
        // An escaped key is not seen (the parser does see it).
        assert_eq!(scan_id(br#"{"\u0069d":1}"#), None);
        // Deep nesting is skipped without recursion.
        let deep = format!(
            r#"{{"x":{}{},"id":3}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(scan_id(deep.as_bytes()), Some(&b"3"[..]));
    }

    /// The scanner as first written, a byte at a time: the reference
    /// for the one that skips runs.
    fn scan_id_bytewise(b: &[u8]) -> Option<&[u8]> {
        let mut i = 0;
        let blank = |i: &mut usize| {
            while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                *i += 1;
            }
        };
        let eat = |i: &mut usize, c: u8| {
            let hit = b.get(*i) == Some(&c);
            *i += usize::from(hit);
            hit
        };
        let string = |i: &mut usize| -> Option<(usize, bool)> {
            let start = *i;
            if !eat(i, b'"') {
                return None;
            }
            let mut escaped = false;
            loop {
                match *b.get(*i)? {
                    b'"' => {
                        *i += 1;
                        return Some((start, escaped));
                    }
                    b'\\' => {
                        escaped = true;
                        *i += 2;
                    }
                    _ => *i += 1,
                }
            }
        };
        let value = |i: &mut usize| -> Option<usize> {
            let start = *i;
            match *b.get(*i)? {
                b'"' => {
                    string(i)?;
                }
                b'{' | b'[' => {
                    let mut depth = 0usize;
                    loop {
                        match *b.get(*i)? {
                            b'"' => {
                                string(i)?;
                                continue;
                            }
                            b'{' | b'[' => depth += 1,
                            b'}' | b']' => depth -= 1,
                            _ => {}
                        }
                        *i += 1;
                        if depth == 0 {
                            break;
                        }
                    }
                }
                _ => {
                    while !matches!(
                        b.get(*i),
                        None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                    ) {
                        *i += 1;
                    }
                    if *i == start {
                        return None;
                    }
                }
            }
            Some(start)
        };
        blank(&mut i);
        if !eat(&mut i, b'{') {
            return None;
        }
        let mut id = None;
        blank(&mut i);
        if !eat(&mut i, b'}') {
            loop {
                blank(&mut i);
                let (key, escaped) = string(&mut i)?;
                let key = &b[key..i];
                blank(&mut i);
                if !eat(&mut i, b':') {
                    return None;
                }
                blank(&mut i);
                let value = &b[value(&mut i)?..i];
                if !escaped && key == b"\"id\"" {
                    if id.is_some() {
                        return None;
                    }
                    id = Some(value);
                }
                blank(&mut i);
                if eat(&mut i, b',') {
                    continue;
                }
                if eat(&mut i, b'}') {
                    break;
                }
                return None;
            }
        }
        blank(&mut i);
        if i != b.len() {
            return None;
        }
        id.filter(|v| !matches!(v.first(), Some(b'{' | b'[')))
    }

    #[test]
    fn scan_id_skipping_runs_answers_as_the_bytewise_scanner() {
        let seeds: [&[u8]; 6] = [
            br#"{"op":"square","n":-12345,"id":1234567}"#,
            br#" { "id" : "a\"b}" , "op":"hello" } "#,
            br#"{"n":{"id":1,"x":[1,{"y":"]"}]},"id":-1.5e3,"op":"x"}"#,
            b"{\"op\":\"hello\",\n\"id\":null\r\n}\t",
            br#"{"op":"hello","id":"\u00e9\\"}"#,
            br#"{"id":"x\"#,
        ];
        let alphabet = b" \t\r\n{}[]\",:\\id0-9ae\xff";
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for seed in seeds {
            assert_eq!(scan_id(seed), scan_id_bytewise(seed), "{seed:?}");
            for _ in 0..20_000 {
                let mut d = seed.to_vec();
                for _ in 0..=next() % 4 {
                    let at = (next() % (d.len() as u64 + 1)) as usize;
                    let c = alphabet[(next() % alphabet.len() as u64) as usize];
                    match next() % 3 {
                        0 if at < d.len() => d[at] = c,
                        1 if at < d.len() => {
                            d.remove(at);
                        }
                        _ => d.insert(at, c),
                    }
                }
                assert_eq!(
                    scan_id(&d),
                    scan_id_bytewise(&d),
                    "{:?}",
                    String::from_utf8_lossy(&d)
                );
            }
        }
    }
}
