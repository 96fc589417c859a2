//! The reply oracle: everything a reply to any datagram must be. The
//! dialect rule and which `id` a JSON object carries are restated here
//! instead of called from `src/`, so that a check tests the code.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use num_bigint::BigInt;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use protocol::request::{may_be_stats, peek_id, scan_id};
use protocol::{
    parse, write_reply, Dialect, ErrorCode, Op, Outcome, ReplyContext, Request, MAX_UDP_PAYLOAD,
};

/// The context of docs/PROTOCOL.md's examples, worker 4242 answering
/// 127.0.0.1:5555: what the fuzz target and the corpus replay reply with.
pub const EXAMPLE_CTX: ReplyContext = ReplyContext {
    worker_pid: 4242,
    client: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5555)),
};

/// A JSON object as its entries in order, duplicates kept, values raw: what
/// the properties need to see a reply (or request) exactly as written.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'a> Entries<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.get())
    }
    fn count(&self, key: &str) -> usize {
        self.0.iter().filter(|(k, _)| k == key).count()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, &'de RawValue>()? {
                    entries.push((k, v));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(EntriesVisitor)
    }
}

/// The dialect rule, restated: the first non-blank byte is `{`.
fn expected_dialect(datagram: &[u8]) -> Dialect {
    match datagram.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Dialect::Json,
        _ => Dialect::Text,
    }
}

/// The `id` a JSON request carries, if it parses far enough to have one: a
/// well-formed object whose request fields are not repeated, with a scalar id.
fn expected_id(datagram: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(datagram).ok()?;
    let entries: Entries<'_> = serde_json::from_str(text).ok()?;
    if ["op", "id", "n", "pid", "ms"]
        .iter()
        .any(|k| entries.count(k) > 1)
    {
        return None;
    }
    let id = entries.get("id")?;
    if id.starts_with('{') || id.starts_with('[') {
        return None;
    }
    Some(id)
}

fn code_named(name: &str) -> Option<ErrorCode> {
    ErrorCode::ALL.iter().copied().find(|c| c.as_str() == name)
}

fn json_string(raw: &str) -> String {
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("{raw} is not a JSON string: {e}"))
}

/// A parsed JSON reply, checked for what every JSON reply must be.
pub struct JsonReply {
    pub ok: bool,
    pub error: Option<ErrorCode>,
    pub id: Option<String>,
    pub result: Option<String>,
    pub worker_pid: Option<u32>,
}

/// Checks that `out` is one JSON object with an `ok` boolean, an `error`
/// that is a documented code and a `message` string when `ok` is false,
/// and no repeated keys.
pub fn check_json_reply(out: &[u8]) -> JsonReply {
    let text = std::str::from_utf8(out).expect("JSON reply is UTF-8");
    let entries: Entries<'_> =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("reply {text:?} is not JSON: {e}"));
    for (k, _) in &entries.0 {
        assert_eq!(entries.count(k), 1, "key {k} repeated in {text}");
    }
    let ok = match entries.get("ok") {
        Some("true") => true,
        Some("false") => false,
        other => panic!("reply {text} has ok = {other:?}"),
    };
    let error = if ok {
        assert!(entries.get("error").is_none(), "{text}");
        let op = json_string(entries.get("op").expect("ok reply names its op"));
        assert!(Op::ALL.iter().any(|o| o.as_str() == op), "{text}");
        None
    } else {
        let name = json_string(entries.get("error").expect("error reply has error"));
        let code = code_named(&name).unwrap_or_else(|| panic!("undocumented code in {text}"));
        json_string(entries.get("message").expect("error reply has message"));
        Some(code)
    };
    JsonReply {
        ok,
        error,
        id: entries.get("id").map(str::to_owned),
        result: entries.get("result").map(str::to_owned),
        worker_pid: entries
            .get("worker_pid")
            .map(|p| p.parse().expect("worker_pid is a u32")),
    }
}

/// Runs one datagram through `parse` + `write_reply` and checks every
/// property a reply has; returns the reply bytes (empty for no reply).
pub fn check_datagram(datagram: &[u8], ctx: &ReplyContext) -> Vec<u8> {
    let Some(parsed) = parse(datagram) else {
        assert!(datagram.is_empty(), "only the empty datagram gets no reply");
        assert_eq!(peek_id(datagram), (Dialect::Text, None));
        return Vec::new();
    };
    assert!(!datagram.is_empty());
    let dialect = expected_dialect(datagram);
    assert_eq!(parsed.dialect, dialect);
    assert_eq!(peek_id(datagram), (parsed.dialect, parsed.id));
    if let Ok(r) = &parsed.request {
        assert_eq!(parsed.op(), r.op());
        if matches!(r, Request::Stats | Request::Members) {
            assert!(
                may_be_stats(datagram),
                "stats or members request missed by may_be_stats"
            );
        }
    }
    if dialect == Dialect::Text {
        assert_eq!(parsed.id, None);
    }
    check_scan_id(datagram, parsed.id, &parsed.request);

    let mut out = vec![b'x'; 3];
    let outcome = write_reply(&parsed, ctx, &mut out);
    assert!(!out.is_empty(), "empty reply to {datagram:?}");
    assert!(out.len() <= MAX_UDP_PAYLOAD, "reply of {} bytes", out.len());
    assert_ne!(outcome, Outcome::NoReply);
    if let Err(e) = &parsed.request {
        assert_eq!(outcome, Outcome::Error(e.code));
    }

    match dialect {
        Dialect::Text => {
            let text = std::str::from_utf8(&out).expect("text reply is UTF-8");
            match outcome {
                Outcome::Error(code) => {
                    let head = format!("error: {}: ", code.as_str());
                    assert!(text.starts_with(&head), "{text}");
                    assert!(!text.contains('\n'), "one line: {text:?}");
                }
                _ => {
                    let greeting = format!("Hi {}. This is server {}", ctx.client, ctx.worker_pid);
                    let is_number = text.parse::<BigInt>().is_ok()
                        || text.parse::<f64>().is_ok_and(f64::is_finite);
                    assert!(text == greeting || is_number, "text reply {text:?}");
                }
            }
            if std::str::from_utf8(datagram).is_err() {
                assert_eq!(outcome, Outcome::Error(ErrorCode::BadRequest));
            }
        }
        Dialect::Json => {
            let reply = check_json_reply(&out);
            match outcome {
                Outcome::Ok => assert!(reply.ok),
                Outcome::Error(code) => assert_eq!(reply.error, Some(code)),
                Outcome::NoReply
                | Outcome::Withheld
                | Outcome::Dropped
                | Outcome::Replayed
                | Outcome::Duplicate => unreachable!(),
            }
            assert_eq!(reply.worker_pid, Some(ctx.worker_pid));
            let want = expected_id(datagram);
            assert_eq!(parsed.id, want, "parsed id of {datagram:?}");
            match (want, reply.id.as_deref()) {
                (Some(w), Some(got)) => assert_eq!(got, w),
                (None, got) => assert_eq!(got, None),
                // The only reply without its id: an error the id itself
                // would push over the datagram limit.
                (Some(w), None) => {
                    assert!(!reply.ok);
                    assert!(out.len() + r#","id":"#.len() + w.len() > MAX_UDP_PAYLOAD);
                }
            }
        }
    }
    out
}

/// `scan_id` (the master's cache key) against the parser: the same id
/// whenever both have one; none only where the key is spelled with escapes;
/// one the parser lacks only where the parser gave up on the JSON itself.
fn check_scan_id(
    datagram: &[u8],
    parsed_id: Option<&str>,
    request: &Result<Request<'_>, protocol::ProtocolError>,
) {
    let scanned = scan_id(datagram);
    if let Some(x) = scanned {
        let range = datagram.as_ptr_range();
        assert!(
            range.contains(&x.as_ptr()) && x.as_ptr_range().end <= range.end,
            "scan_id must return a part of the datagram"
        );
        assert!(!x.is_empty());
    }
    match (scanned, parsed_id) {
        (Some(x), Some(y)) => assert_eq!(x, y.as_bytes(), "scan_id of {datagram:?}"),
        (None, Some(y)) => assert!(
            datagram.contains(&b'\\'),
            "scan_id missed the id {y} of {datagram:?}"
        ),
        (Some(x), None) => {
            let gave_up = matches!(request, Err(e) if e.code == ErrorCode::BadRequest
                && (e.message.starts_with("malformed JSON") || e.message.contains("UTF-8")));
            assert!(
                gave_up,
                "scan_id found {:?} in {datagram:?}, which the parser read without an id",
                String::from_utf8_lossy(x)
            );
        }
        (None, None) => {}
    }
}
