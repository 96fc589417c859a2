//! Property tests for the wire formats: random and mutated client datagrams
//! through `parse` + `write_reply`, and random and mutated pipe streams
//! through the frame decoders and `FrameBuf`.
//!
//! The oracles here are written independently of `src/` where that is cheap
//! (the dialect rule, which `id` a JSON object carries, the squares through
//! `num-bigint`), so that a property checks the code instead of restating it.
//! The oracles live in `tests/oracle/`, shared with the fuzz targets, whose
//! committed corpus is replayed here. Case counts are kept moderate so the
//! whole file runs in a few seconds in a debug build.

mod oracle;

use std::fs;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};

use num_bigint::BigInt;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

use protocol::frame::{
    decode_to_master, decode_to_worker, encode_done, encode_done_with_reply, encode_ready,
    encode_request, encode_sent_at, encode_stopping, FrameBuf, FrameError, ToMaster, ToWorker,
    MAX_DONE_ID,
};
use protocol::request::scan_id;
use protocol::{
    parse, write_error, Dialect, ErrorCode, Op, Outcome, ReplyContext, MAX_SLEEP_MS,
    MAX_UDP_PAYLOAD,
};

use oracle::datagram::{check_datagram, check_json_reply, EXAMPLE_CTX};
use oracle::frames::feed;

// ---------------------------------------------------------------------------
// Oracles

fn square_of(digits: &str) -> String {
    let v: BigInt = digits.parse().expect("test digits are an integer");
    (&v * &v).to_string()
}

/// The text of a reply, for the exactness properties.
fn reply_to(datagram: &[u8], ctx: &ReplyContext) -> String {
    String::from_utf8(check_datagram(datagram, ctx)).expect("UTF-8 reply")
}

/// The raw `result` of a successful JSON reply.
fn json_result(datagram: &str, ctx: &ReplyContext) -> String {
    let out = check_datagram(datagram.as_bytes(), ctx);
    let reply = check_json_reply(&out);
    assert!(reply.ok, "{}", String::from_utf8_lossy(&out));
    reply.result.expect("square reply has a result")
}

// ---------------------------------------------------------------------------
// Datagram strategies

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(ip.into(), port))),
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
            |(ip, port, flow, scope)| SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                flow,
                scope
            ))
        ),
    ]
}

fn reply_ctx() -> impl Strategy<Value = ReplyContext> {
    (any::<u32>(), socket_addr())
        .prop_map(|(worker_pid, client)| ReplyContext { worker_pid, client })
}

/// JSON whitespace between tokens.
fn json_ws() -> impl Strategy<Value = String> {
    "[ \t\r\n]{0,2}"
}

/// A JSON integer literal: small, at the i64/u64/i128 edges, or many digits.
fn json_integer() -> BoxedStrategy<String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        any::<i128>().prop_map(|v| v.to_string()),
        select(vec![
            "0",
            "-0",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551616",
            "170141183460469231731687303715884105728",
        ])
        .prop_map(str::to_owned),
        "-?[1-9][0-9]{0,120}",
    ]
    .boxed()
}

/// A JSON number with a fraction or exponent, finite or not as an f64.
fn json_decimal() -> BoxedStrategy<String> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(|x| format!("{x:?}")),
        "-?[0-9]\\.[0-9]{1,6}",
        "-?[1-9][0-9]{0,2}(\\.[0-9]{1,3})?[eE][+-]?[0-9]{1,4}",
    ]
    .boxed()
}

fn json_string_literal() -> BoxedStrategy<String> {
    prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        select(vec![
            r#""square""#,
            r#""hello""#,
            r#""sleep""#,
            r#""crash""#,
            r#""stats""#,
            r#""st\u0061ts""#,
            r#""\ud800""#,
            r#""""#,
            r#""a\"b""#,
        ])
        .prop_map(str::to_owned),
    ]
    .boxed()
}

fn json_scalar() -> BoxedStrategy<String> {
    prop_oneof![
        select(vec!["null", "true", "false"]).prop_map(str::to_owned),
        json_integer(),
        json_decimal(),
        json_string_literal(),
    ]
    .boxed()
}

/// Any JSON value, nested a little.
fn json_value() -> BoxedStrategy<String> {
    json_scalar()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
                vec((json_key(), inner), 0..4).prop_map(|kv| render_object(&kv, "")),
            ]
        })
        .boxed()
}

/// An object key as raw JSON text, biased to the request's fields.
fn json_key() -> BoxedStrategy<String> {
    prop_oneof![
        select(vec![
            r#""op""#,
            r#""id""#,
            r#""n""#,
            r#""pid""#,
            r#""ms""#,
            r#""\u0069d""#,
        ])
        .prop_map(str::to_owned),
        "\"[a-z]{1,4}\"",
    ]
    .boxed()
}

fn render_object(fields: &[(String, String)], ws: &str) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{ws}{k}{ws}:{ws}{v}{ws}"))
        .collect();
    format!("{{{}}}", body.join(","))
}

/// A well-formed request of every op, with or without an id.
fn valid_request() -> impl Strategy<Value = String> {
    let q = |s: &str| format!("\"{s}\"");
    let body = prop_oneof![
        prop_oneof![json_integer(), json_decimal()]
            .prop_map(move |n| vec![(q("op"), q("square")), (q("n"), n)]),
        option::of(prop_oneof![
            any::<u32>().prop_map(|p| p.to_string()),
            Just("null".to_owned())
        ])
        .prop_map(move |pid| {
            let mut f = vec![(q("op"), q("hello"))];
            f.extend(pid.map(|p| (q("pid"), p)));
            f
        }),
        (0..=2 * MAX_SLEEP_MS)
            .prop_map(move |ms| vec![(q("op"), q("sleep")), (q("ms"), ms.to_string())]),
        Just(vec![(q("op"), q("crash"))]),
        Just(vec![(q("op"), q("stats"))]),
    ];
    (body, option::of(json_scalar()), any::<bool>(), json_ws()).prop_map(
        |(mut fields, id, id_first, ws)| {
            if let Some(id) = id {
                let id = ("\"id\"".to_owned(), id);
                if id_first {
                    fields.insert(0, id);
                } else {
                    fields.push(id);
                }
            }
            render_object(&fields, &ws)
        },
    )
}

/// A JSON object of random fields with random value types.
fn random_object() -> impl Strategy<Value = String> {
    (vec((json_key(), json_value()), 0..6), json_ws()).prop_map(|(f, ws)| render_object(&f, &ws))
}

/// What the lecture's clients send: numbers in many spellings, or words.
fn text_payload() -> impl Strategy<Value = String> {
    prop_oneof![
        "[+-]?[0-9]{1,40}",
        "[+-]?[0-9]{0,5}\\.[0-9]{0,5}([eE][+-]?[0-9]{0,4})?",
        "[ \t\r\n]{0,3}[+-]?[0-9]{1,10}[ \t\r\n]{0,3}",
        any::<String>(),
        select(vec![
            "Hi server!",
            "inf",
            "NaN",
            "-",
            ".",
            "1e",
            "  ",
            "\u{a0}7\u{3000}"
        ])
        .prop_map(str::to_owned),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize, usize),
    Truncate(usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![
        any::<u8>(),
        select(b"{}[]\":,\\ 0-e.".to_vec()),
        0x80..=0xffu8,
    ];
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..8usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip(i, x) if len > 0 => bytes[i % len] ^= x,
            Mutation::Insert(i, b) => bytes.insert(i % (len + 1), b),
            Mutation::Delete(i, n) if len > 0 => {
                let s = i % len;
                bytes.drain(s..(s + n).min(len));
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            Mutation::Duplicate(i, n) if len > 0 => {
                let s = i % len;
                let e = (s + n).min(len);
                let chunk = bytes[s..e].to_vec();
                bytes.splice(e..e, chunk);
            }
            _ => {}
        }
    }
}

/// Any datagram worth sending, before mutation.
fn seed_datagram() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..128),
        valid_request().prop_map(String::into_bytes),
        random_object().prop_map(String::into_bytes),
        text_payload().prop_map(String::into_bytes),
        "[ \t\r\n\x0b\x0c]{0,4}".prop_map(String::into_bytes),
    ]
}

// ---------------------------------------------------------------------------
// Datagram properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_get_a_reply(bytes in vec(any::<u8>(), 0..256), ctx in reply_ctx()) {
        check_datagram(&bytes, &ctx);
        // The same bytes behind a `{`, so that they reach the JSON parser.
        let mut json = b"{".to_vec();
        json.extend_from_slice(&bytes);
        check_datagram(&json, &ctx);
    }

    #[test]
    fn mutated_datagrams_get_a_reply(
        seed in seed_datagram(),
        mutations in vec(mutation(), 0..4),
        ws in ("[ \t\r\n]{0,2}", "[ \t\r\n]{0,2}"),
        ctx in reply_ctx(),
    ) {
        let mut datagram = seed;
        mutate(&mut datagram, &mutations);
        check_datagram(&datagram, &ctx);
        let mut padded = ws.0.into_bytes();
        padded.extend_from_slice(&datagram);
        padded.extend_from_slice(ws.1.as_bytes());
        check_datagram(&padded, &ctx);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn random_objects_get_a_reply(object in random_object(), ctx in reply_ctx()) {
        check_datagram(object.as_bytes(), &ctx);
    }

    #[test]
    fn valid_requests_keep_their_id_and_ignore_outer_whitespace(
        request in valid_request(),
        ws in ("[ \t\r\n]{1,3}", "[ \t\r\n]{0,3}"),
        ctx in reply_ctx(),
    ) {
        let parsed = parse(request.as_bytes()).expect("a request is not empty");
        prop_assert!(parsed.request.is_ok() || parsed.op() == Op::Square || parsed.op() == Op::Sleep,
            "{request}: {:?}", parsed.request);
        let plain = check_datagram(request.as_bytes(), &ctx);
        let padded = format!("{}{request}{}", ws.0, ws.1);
        prop_assert_eq!(check_datagram(padded.as_bytes(), &ctx), plain);
        // The master's cache key is the parser's id, exactly.
        let id = parsed.id.map(str::as_bytes);
        prop_assert_eq!(scan_id(request.as_bytes()), id);
        prop_assert_eq!(scan_id(padded.as_bytes()), id);
    }

    #[test]
    fn text_payloads_get_a_reply(text in text_payload(), ctx in reply_ctx()) {
        check_datagram(text.as_bytes(), &ctx);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash(depth in 0usize..3000, open in select(vec!['[', '{'])) {
        let ctx = ReplyContext { worker_pid: 1, client: "127.0.0.1:1".parse().unwrap() };
        let inner = (if open == '[' { "[" } else { "{\"a\":" }).repeat(depth);
        check_datagram(format!(r#"{{"op":"square","id":1,"n":{inner}"#).as_bytes(), &ctx);
    }

    #[test]
    fn i64_squares_are_exact(v in any::<i64>(), ws in "[ \t\r\n]{0,2}", id in json_scalar(), ctx in reply_ctx()) {
        let want = (i128::from(v) * i128::from(v)).to_string();
        prop_assert_eq!(reply_to(format!("{ws}{v}{ws}").as_bytes(), &ctx), want.clone());
        let request = format!(r#"{{"op":"square","n":{v},"id":{id}}}"#);
        prop_assert_eq!(json_result(&request, &ctx), want);
    }

    #[test]
    fn i128_squares_are_exact(v in any::<i128>(), ctx in reply_ctx()) {
        let want = square_of(&v.to_string());
        prop_assert_eq!(reply_to(v.to_string().as_bytes(), &ctx), want.clone());
        prop_assert_eq!(json_result(&format!(r#"{{"op":"square","n":{v}}}"#), &ctx), want);
    }

    #[test]
    fn big_integer_squares_are_exact(
        sign in select(vec!["", "-", "+"]),
        digits in prop_oneof!["[0-9]{1,60}", "[0-9]{1,1500}"],
        ctx in reply_ctx(),
    ) {
        // Text allows a `+` and leading zeros; JSON allows neither.
        let text = format!("{sign}{digits}");
        let want = square_of(&digits);
        prop_assert_eq!(reply_to(text.as_bytes(), &ctx), want.clone());
        let json_digits = digits.trim_start_matches('0');
        let json_digits = if json_digits.is_empty() { "0" } else { json_digits };
        let json_sign = if sign == "-" { "-" } else { "" };
        let request = format!(r#"{{"op":"square","n":{json_sign}{json_digits}}}"#);
        prop_assert_eq!(json_result(&request, &ctx), want);
    }

    #[test]
    fn decimal_squares_are_f64_squares(x in any::<f64>(), ctx in reply_ctx()) {
        prop_assume!(x.is_finite());
        let written = format!("{x:?}");
        let text = reply_to(written.as_bytes(), &ctx);
        let out = check_datagram(format!(r#"{{"op":"square","n":{written}}}"#).as_bytes(), &ctx);
        let json = check_json_reply(&out);
        let square = x * x;
        if square.is_finite() {
            prop_assert_eq!(text.parse::<f64>().unwrap(), square);
            let result = json.result.expect("result");
            // A decimal stays a decimal: `2.0` squares to `4.0`, not `4`.
            prop_assert!(result.contains(['.', 'e', 'E']), "{}", result);
            prop_assert_eq!(result.parse::<f64>().unwrap(), square);
        } else {
            prop_assert!(text.starts_with("error: out_of_range: "), "{}", text);
            prop_assert_eq!(json.error, Some(ErrorCode::OutOfRange));
        }
    }

    #[test]
    fn error_replies_are_well_formed(
        dialect in select(vec![Dialect::Json, Dialect::Text]),
        id in option::of(json_scalar()),
        code in select(ErrorCode::ALL.to_vec()),
        message in any::<String>(),
        worker_pid in option::of(any::<u32>()),
    ) {
        let mut out = Vec::new();
        let outcome = write_error(dialect, id.as_deref(), code, &message, worker_pid, &mut out);
        prop_assert_eq!(outcome, Outcome::Error(code));
        match dialect {
            Dialect::Text => {
                let text = String::from_utf8(out).unwrap();
                prop_assert_eq!(text, format!("error: {}: {message}", code.as_str()));
            }
            Dialect::Json => {
                let reply = check_json_reply(&out);
                prop_assert_eq!(reply.error, Some(code));
                prop_assert_eq!(reply.id, id);
                prop_assert_eq!(reply.worker_pid, worker_pid);
            }
        }
    }
}

#[test]
fn huge_numbers_are_too_large_or_exact() {
    let ctx = ReplyContext {
        worker_pid: 7,
        client: "[::1]:9".parse().unwrap(),
    };
    let nines = "9".repeat(MAX_UDP_PAYLOAD / 2 + 1);
    let text = reply_to(nines.as_bytes(), &ctx);
    assert!(text.starts_with("error: too_large: "), "{text}");
    let out = check_datagram(
        format!(r#"{{"op":"square","n":-{nines},"id":3}}"#).as_bytes(),
        &ctx,
    );
    let reply = check_json_reply(&out);
    assert_eq!(reply.error, Some(ErrorCode::TooLarge));
    assert_eq!(reply.id.as_deref(), Some("3"));

    // Leading zeros do not make a small square too large.
    let zeros = format!("-{}12", "0".repeat(MAX_UDP_PAYLOAD - 10));
    assert_eq!(reply_to(zeros.as_bytes(), &ctx), "144");
}

#[test]
fn an_id_too_long_to_echo_still_gets_an_error_reply() {
    let ctx = ReplyContext {
        worker_pid: 7,
        client: "127.0.0.1:9".parse().unwrap(),
    };
    let id = format!("\"{}\"", "x".repeat(MAX_UDP_PAYLOAD - 40));
    for (request, code) in [
        (
            format!(r#"{{"op":"hello","id":{id}}}"#),
            ErrorCode::TooLarge,
        ),
        (
            format!(r#"{{"op":"square","n":7,"id":{id}}}"#),
            ErrorCode::TooLarge,
        ),
        (
            format!(r#"{{"op":"nope","id":{id}}}"#),
            ErrorCode::UnknownOp,
        ),
    ] {
        assert!(request.len() <= MAX_UDP_PAYLOAD);
        let out = check_datagram(request.as_bytes(), &ctx);
        let reply = check_json_reply(&out);
        assert_eq!(reply.error, Some(code), "{request:.40}");
        assert_eq!(reply.id, None);
    }
    // An id that fits is echoed even in the too_large error.
    let id = format!("\"{}\"", "x".repeat(MAX_UDP_PAYLOAD / 2));
    let out = check_datagram(format!(r#"{{"op":"hello","id":{id}}}"#).as_bytes(), &ctx);
    assert_eq!(check_json_reply(&out).id.as_deref(), Some(id.as_str()));
}

#[test]
fn escaped_stats_is_seen_by_may_be_stats() {
    let ctx = ReplyContext {
        worker_pid: 7,
        client: "127.0.0.1:9".parse().unwrap(),
    };
    check_datagram(br#"{"op":"st\u0061ts","id":1}"#, &ctx);
    check_datagram(br#"{"op":"\u0073tats"}"#, &ctx);
}

// ---------------------------------------------------------------------------
// Frame strategies and properties

#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestFrame {
    seq: u64,
    reply_limit: u32,
    keep_reply: bool,
    client: SocketAddr,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MasterFrame {
    Ready(u32),
    Stopping(u32),
    Done(u64, Op, Outcome, Vec<u8>, Option<Vec<u8>>),
    SentAt(u64),
}

fn all_outcomes() -> Vec<Outcome> {
    let mut all = vec![
        Outcome::Ok,
        Outcome::NoReply,
        Outcome::Withheld,
        Outcome::Dropped,
        Outcome::Replayed,
        Outcome::Duplicate,
    ];
    all.extend(ErrorCode::ALL.iter().map(|c| Outcome::Error(*c)));
    all
}

fn request_frame() -> impl Strategy<Value = RequestFrame> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<bool>(),
        socket_addr(),
        vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(seq, reply_limit, keep_reply, client, payload)| RequestFrame {
                seq,
                reply_limit,
                keep_reply,
                client,
                payload,
            },
        )
}

fn master_frame() -> impl Strategy<Value = MasterFrame> {
    prop_oneof![
        any::<u32>().prop_map(MasterFrame::Ready),
        any::<u32>().prop_map(MasterFrame::Stopping),
        any::<u64>().prop_map(MasterFrame::SentAt),
        (
            any::<u64>(),
            select(Op::ALL.to_vec()),
            select(all_outcomes()),
            vec(any::<u8>(), 0..=MAX_DONE_ID + 40),
            option::of(vec(any::<u8>(), 0..300)),
        )
            .prop_map(|(seq, op, outcome, id, reply)| MasterFrame::Done(
                seq, op, outcome, id, reply
            )),
    ]
}

/// Encodes frames into one stream, returning it and where each frame ends.
fn encode_requests(frames: &[RequestFrame]) -> (Vec<u8>, Vec<usize>) {
    let mut wire = Vec::new();
    let mut ends = Vec::new();
    for f in frames {
        encode_request(
            f.seq,
            f.reply_limit,
            f.keep_reply,
            f.client,
            &f.payload,
            &mut wire,
        );
        ends.push(wire.len());
    }
    (wire, ends)
}

fn encode_master(frames: &[MasterFrame]) -> (Vec<u8>, Vec<usize>) {
    let mut wire = Vec::new();
    let mut ends = Vec::new();
    for f in frames {
        match f {
            MasterFrame::Ready(pid) => encode_ready(*pid, &mut wire),
            MasterFrame::Stopping(pid) => encode_stopping(*pid, &mut wire),
            MasterFrame::Done(seq, op, outcome, id, None) => {
                encode_done(*seq, *op, *outcome, id, &mut wire)
            }
            MasterFrame::Done(seq, op, outcome, id, Some(reply)) => {
                encode_done_with_reply(*seq, *op, *outcome, id, reply, &mut wire)
            }
            MasterFrame::SentAt(mono_us) => encode_sent_at(*mono_us, &mut wire),
        }
        ends.push(wire.len());
    }
    (wire, ends)
}

/// What a master frame decodes to: a DONE id is cut at `MAX_DONE_ID`.
fn as_decoded(f: &MasterFrame) -> MasterFrame {
    match f {
        MasterFrame::Done(seq, op, outcome, id, reply) => MasterFrame::Done(
            *seq,
            *op,
            *outcome,
            id[..id.len().min(MAX_DONE_ID)].to_vec(),
            reply.clone(),
        ),
        other => other.clone(),
    }
}

fn take_request(fb: &mut FrameBuf) -> Result<Option<RequestFrame>, FrameError> {
    Ok(fb.next_to_worker()?.map(
        |ToWorker::Request {
             seq,
             reply_limit,
             keep_reply,
             client,
             payload,
         }| RequestFrame {
            seq,
            reply_limit,
            keep_reply,
            client,
            payload: payload.to_vec(),
        },
    ))
}

fn take_master(fb: &mut FrameBuf) -> Result<Option<MasterFrame>, FrameError> {
    Ok(fb.next_to_master()?.map(|f| match f {
        ToMaster::Ready { pid } => MasterFrame::Ready(pid),
        ToMaster::Stopping { pid } => MasterFrame::Stopping(pid),
        ToMaster::Done {
            seq,
            op,
            outcome,
            id,
            reply,
        } => MasterFrame::Done(seq, op, outcome, id.to_vec(), reply.map(<[u8]>::to_vec)),
        ToMaster::SentAt { mono_us } => MasterFrame::SentAt(mono_us),
    }))
}

/// Decodes a whole buffer frame by frame with the plain decoders, checking
/// that each frame's length is within the buffer.
fn decode_all(buf: &[u8]) {
    let mut at = 0;
    while let Ok(Some((_, used))) = decode_to_worker(&buf[at..]) {
        assert!(used >= 5 && at + used <= buf.len());
        at += used;
    }
    let mut at = 0;
    while let Ok(Some((_, used))) = decode_to_master(&buf[at..]) {
        assert!(used >= 5 && at + used <= buf.len());
        at += used;
    }
}

fn reads() -> impl Strategy<Value = Vec<usize>> {
    vec(1..400usize, 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn request_frames_round_trip(
        frames in vec(request_frame(), 0..8),
        reads in reads(),
        capacity in 0..200usize,
    ) {
        let (wire, _) = encode_requests(&frames);
        let (got, end) = feed(&wire, &reads, capacity, take_request);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(&got, &frames);
        let mut at = 0;
        for f in &frames {
            let (ToWorker::Request { seq, reply_limit, keep_reply, client, payload }, used) =
                decode_to_worker(&wire[at..]).unwrap().unwrap();
            prop_assert_eq!(
                (seq, reply_limit, keep_reply, client, payload),
                (f.seq, f.reply_limit, f.keep_reply, f.client, &f.payload[..])
            );
            at += used;
        }
        prop_assert_eq!(at, wire.len());
    }

    #[test]
    fn master_frames_round_trip(
        frames in vec(master_frame(), 0..8),
        reads in reads(),
        capacity in 0..200usize,
    ) {
        let (wire, _) = encode_master(&frames);
        let (got, end) = feed(&wire, &reads, capacity, take_master);
        prop_assert_eq!(end, Ok(()));
        let want: Vec<MasterFrame> = frames.iter().map(as_decoded).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn truncated_streams_end_in_an_error(
        frames in vec(request_frame(), 1..6),
        master in vec(master_frame(), 1..6),
        cut in any::<usize>(),
        reads in reads(),
    ) {
        let (wire, ends) = encode_requests(&frames);
        let cut = cut % (wire.len() + 1);
        let whole = ends.iter().filter(|e| **e <= cut).count();
        let boundary = if whole == 0 { 0 } else { ends[whole - 1] };
        let (got, end) = feed(&wire[..cut], &reads, 64, take_request);
        prop_assert_eq!(&got[..], &frames[..whole]);
        prop_assert_eq!(end, if cut == boundary { Ok(()) } else { Err(FrameError::Truncated(cut - boundary)) });

        let (wire, ends) = encode_master(&master);
        let cut = cut % (wire.len() + 1);
        let whole = ends.iter().filter(|e| **e <= cut).count();
        let boundary = if whole == 0 { 0 } else { ends[whole - 1] };
        let (got, end) = feed(&wire[..cut], &reads, 64, take_master);
        let want: Vec<MasterFrame> = master[..whole].iter().map(as_decoded).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(end, if cut == boundary { Ok(()) } else { Err(FrameError::Truncated(cut - boundary)) });
    }

    #[test]
    fn random_pipe_bytes_never_panic(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..600),
            // A plausible length prefix, so that bodies get decoded.
            (0..60u32, 1..=6u8, vec(any::<u8>(), 0..80)).prop_map(|(len, kind, rest)| {
                let mut b = len.to_be_bytes().to_vec();
                b.push(kind);
                b.extend(rest);
                b
            }),
        ],
        reads in reads(),
    ) {
        decode_all(&bytes);
        let _ = feed(&bytes, &reads, 64, take_request);
        let _ = feed(&bytes, &reads, 64, take_master);
    }

    #[test]
    fn mutated_pipe_streams_never_panic(
        requests in vec(request_frame(), 1..5),
        master in vec(master_frame(), 1..5),
        mutations in vec(mutation(), 1..4),
        reads in reads(),
    ) {
        // Frames wholly before the first changed byte still decode as sent.
        let (wire, ends) = encode_requests(&requests);
        let mut bad = wire.clone();
        mutate(&mut bad, &mutations);
        decode_all(&bad);
        let same = wire.iter().zip(&bad).take_while(|(a, b)| a == b).count();
        let intact = ends.iter().filter(|e| **e <= same).count();
        let (got, _) = feed(&bad, &reads, 64, take_request);
        prop_assert!(got.len() >= intact);
        prop_assert_eq!(&got[..intact], &requests[..intact]);

        let (wire, ends) = encode_master(&master);
        let mut bad = wire.clone();
        mutate(&mut bad, &mutations);
        decode_all(&bad);
        let same = wire.iter().zip(&bad).take_while(|(a, b)| a == b).count();
        let intact = ends.iter().filter(|e| **e <= same).count();
        let (got, _) = feed(&bad, &reads, 64, take_master);
        let want: Vec<MasterFrame> = master[..intact].iter().map(as_decoded).collect();
        prop_assert!(got.len() >= intact);
        prop_assert_eq!(&got[..intact], &want[..]);
    }
}

#[test]
fn a_maximal_datagram_fits_in_a_frame() {
    let client: SocketAddr = "[ff02::1%3]:65535".parse().unwrap();
    // The largest UDP payload over IPv6, a little over the IPv4 limit.
    let frames = vec![
        RequestFrame {
            seq: 1,
            reply_limit: u32::MAX,
            keep_reply: true,
            client,
            payload: vec![0xab; 65_527],
        },
        RequestFrame {
            seq: 2,
            reply_limit: 3,
            keep_reply: false,
            client,
            payload: vec![b'7'],
        },
    ];
    let (wire, _) = encode_requests(&frames);
    let (got, end) = feed(&wire, &[4096, 1, 65_536], 64, take_request);
    assert_eq!(end, Ok(()));
    assert_eq!(got, frames);
    // And a maximal reply, with the longest id, comes back in a DONE_REPLY.
    let done = vec![MasterFrame::Done(
        7,
        Op::Square,
        Outcome::Ok,
        vec![b'1'; MAX_DONE_ID],
        Some(vec![b'9'; MAX_UDP_PAYLOAD]),
    )];
    let (wire, _) = encode_master(&done);
    let (got, end) = feed(&wire, &[4096, 1, 65_536], 64, take_master);
    assert_eq!(end, Ok(()));
    assert_eq!(got, done);
}

// ---------------------------------------------------------------------------
// The fuzz corpus, replayed

/// The files of `fuzz/corpus/<target>/`: the fuzz targets' committed corpus,
/// which covers what a long fuzzing run reached (docs/FUZZING.md).
fn fuzz_corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "{} is empty", dir.display());
    paths
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

/// Runs every file of a corpus through `check`, naming the file that fails.
fn replay(target: &str, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    for (path, bytes) in fuzz_corpus(target) {
        if catch_unwind(|| check(&bytes)).is_err() {
            panic!("{} fails the {target} oracle", path.display());
        }
    }
}

#[test]
fn the_datagram_fuzz_corpus_gets_replies() {
    replay("datagram", |datagram| {
        check_datagram(datagram, &EXAMPLE_CTX);
    });
}

#[test]
fn the_frames_fuzz_corpus_decodes_alike_however_split() {
    replay("frames", oracle::frames::check_input);
}
