//! Writes the seed corpus of the fuzz targets into `fuzz/corpus/<target>/`:
//! the request examples of docs/PROTOCOL.md for `datagram`, and pipe streams
//! made by the frame encoders (the byte-level examples of PROTOCOL.md and a
//! few more) for `frames`. Existing files are overwritten; nothing is
//! deleted.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus
//! ```
//!
//! A long run's `cargo fuzz cmin` renames what it keeps by content hash, so
//! the committed corpus need not contain these names; running this again
//! puts the seeds back beside it.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use protocol::frame::{encode_done, encode_done_with_reply, encode_ready, encode_request};
use protocol::{ErrorCode, Op, Outcome};

/// Client datagrams, from the text and JSON sections of docs/PROTOCOL.md.
const DATAGRAMS: &[(&str, &[u8])] = &[
    // The text dialect.
    ("text-int", b"7"),
    ("text-negative-newline", b"-12\n"),
    ("text-plus", b"+5"),
    ("text-leading-zeros", b"007"),
    ("text-decimal", b"1.5"),
    ("text-decimal-two", b"2.0"),
    ("text-exponent", b"1e3"),
    ("text-tenth", b"0.1"),
    ("text-not-finite", b"1e200"),
    ("text-big", b"123456789012345678901234567890"),
    ("text-greeting", b"Hi server!"),
    ("text-stats", b"stats"),
    ("text-inf", b"inf"),
    ("text-hex", b"0x10"),
    ("text-underscore", b"1_000"),
    ("text-two-dots", b"1.2.3"),
    ("text-not-utf8", b"\xff\xfe"),
    ("text-blank", b"  \t\n"),
    // The JSON dialect: one of each op, then the documented errors.
    ("json-square", br#"{"op":"square","n":12,"id":7}"#),
    (
        "json-square-big",
        br#"{"op":"square","n":-18446744073709551616,"id":"a"}"#,
    ),
    ("json-square-decimal", br#"{"op":"square","n":1.5}"#),
    ("json-square-tiny", br#"{"op":"square","n":1e-5}"#),
    ("json-hello", br#"{"op":"hello","pid":99,"id":"x"}"#),
    ("json-hello-null-pid", br#" {"op":"hello","pid":null} "#),
    ("json-sleep", br#"{"op":"sleep","ms":250,"id":3}"#),
    ("json-crash", br#"{"op":"crash","id":1}"#),
    ("json-stats", br#"{"op":"stats"}"#),
    ("json-stats-escaped", br#"{"op":"st\u0061ts","id":null}"#),
    ("json-unknown-op", br#"{"op":"nope","id":1}"#),
    ("json-n-string", br#"{"op":"square","n":"7","id":1}"#),
    ("json-truncated", br#"{"op":"square","n":2"#),
    ("json-n-huge", br#"{"op":"square","n":1e400,"id":1}"#),
    (
        "json-n-square-huge",
        br#"{"op":"square","n":1e200,"id":1.50}"#,
    ),
    ("json-op-number", br#"{"op":7,"id":1}"#),
    ("json-ms-negative", br#"{"op":"sleep","ms":-1,"id":1}"#),
    ("json-ms-over", br#"{"op":"sleep","ms":99999999,"id":1}"#),
    ("json-ms-decimal", br#"{"op":"sleep","ms":1.5,"id":1}"#),
    ("json-pid-negative", br#"{"op":"hello","pid":-3,"id":1}"#),
    ("json-id-array", br#"{"op":"hello","id":[1]}"#),
    (
        "json-id-escaped",
        br#"{"op":"hello","id":"\u0041","n":[{}]}"#,
    ),
    ("json-id-repeated", br#"{"op":"hello","id":1,"id":2}"#),
    ("json-missing-op", br#"{"id":true}"#),
    ("json-not-utf8", b"{\"op\":\"hello\",\"id\":\"\xff\"}"),
];

/// A frames input: the `FrameBuf` capacity / 8, the read sizes, the stream.
fn frames_input(capacity: u8, reads: &[u8], stream: &[u8]) -> Vec<u8> {
    assert!((1..=8).contains(&reads.len()));
    let mut input = vec![capacity, (reads.len() - 1) as u8];
    input.extend_from_slice(reads);
    input.extend_from_slice(stream);
    input
}

fn frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let v4: SocketAddr = "127.0.0.1:5555".parse().unwrap();
    let v6: SocketAddr = "[::1]:5555".parse().unwrap();
    let v6_scoped: SocketAddr = "[ff02::1%3]:65535".parse().unwrap();
    let mut seeds = Vec::new();

    // PROTOCOL.md's byte-level examples, one frame per stream.
    let mut s = Vec::new();
    encode_request(1, u32::MAX, false, v4, b"7", &mut s);
    seeds.push(("request-v4", frames_input(0, &[255], &s)));
    let mut s = Vec::new();
    encode_request(2, u32::MAX, false, v6, br#"{"op":"hello"}"#, &mut s);
    seeds.push(("request-v6", frames_input(0, &[255], &s)));
    let mut s = Vec::new();
    encode_ready(4242, &mut s);
    seeds.push(("ready", frames_input(0, &[255], &s)));
    let mut s = Vec::new();
    encode_done(1, Op::Square, Outcome::Ok, b"", &mut s);
    seeds.push(("done-no-id", frames_input(0, &[255], &s)));
    let mut s = Vec::new();
    encode_done(7, Op::Square, Outcome::Ok, br#""a""#, &mut s);
    seeds.push(("done-id", frames_input(0, &[255], &s)));

    // Several frames in one stream, read a few bytes at a time.
    let mut s = Vec::new();
    encode_request(1, u32::MAX, false, v4, b"7", &mut s);
    encode_request(
        u64::MAX,
        24,
        true,
        v6_scoped,
        br#"{"op":"square","n":12,"id":7}"#,
        &mut s,
    );
    encode_request(3, u32::MAX, false, v4, b"", &mut s);
    seeds.push(("requests-split", frames_input(8, &[0, 2, 6, 40], &s)));
    let mut s = Vec::new();
    encode_ready(1, &mut s);
    encode_done(9, Op::Sleep, Outcome::Error(ErrorCode::Busy), b"3", &mut s);
    encode_done(10, Op::Invalid, Outcome::NoReply, b"", &mut s);
    encode_done(11, Op::Hello, Outcome::Ok, &[b'9'; 128], &mut s);
    encode_done_with_reply(
        12,
        Op::Square,
        Outcome::Ok,
        b"7",
        br#"{"ok":true,"op":"square","result":144,"worker_pid":4242,"id":7}"#,
        &mut s,
    );
    encode_done_with_reply(13, Op::Sleep, Outcome::Withheld, b"8", b"", &mut s);
    seeds.push(("master-split", frames_input(0, &[3, 0, 17], &s)));

    // Streams that end inside a frame, or break the framing.
    let mut s = Vec::new();
    encode_ready(4242, &mut s);
    encode_done(1, Op::Square, Outcome::Ok, b"", &mut s);
    s.truncate(s.len() - 3);
    seeds.push(("master-truncated", frames_input(1, &[4], &s)));
    seeds.push((
        "too-long",
        frames_input(0, &[1], &[0x00, 0x01, 0x00, 0x24, 1]),
    ));
    seeds.push(("empty-frame", frames_input(0, &[1], &[0, 0, 0, 0])));
    seeds.push((
        "bad-family",
        frames_input(0, &[9], &[0, 0, 0, 10, 1, 0, 0, 0, 0, 0, 0, 0, 1, 5]),
    ));
    seeds
}

fn write_all(dir: &Path, seeds: &[(&str, Vec<u8>)]) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let datagrams: Vec<(&str, Vec<u8>)> = DATAGRAMS.iter().map(|(n, b)| (*n, b.to_vec())).collect();
    write_all(&corpus.join("datagram"), &datagrams);
    write_all(&corpus.join("frames"), &frame_seeds());
}
