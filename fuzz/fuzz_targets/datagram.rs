//! Fuzz target: any bytes as a client datagram, through `parse` and
//! `write_reply`, checked by the same reply oracle as the property tests
//! (`crates/protocol/tests/oracle/`): the empty datagram and only it gets no
//! reply; the dialect follows the first non-blank byte; a reply is never
//! empty and fits in one datagram (a square that would not is a `too_large`
//! error); a text error is one line; a JSON reply is one valid JSON object
//! with no repeated keys, a documented error code, the worker's PID, and the
//! request's `id` byte for byte exactly when the request carried one.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use libfuzzer_sys::fuzz_target;
use protocol::ReplyContext;

#[path = "../../crates/protocol/tests/oracle/mod.rs"]
#[allow(dead_code)]
mod oracle;

/// The context of PROTOCOL.md's examples: worker 4242 answering 127.0.0.1:5555.
const CTX: ReplyContext = ReplyContext {
    worker_pid: 4242,
    client: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 5555)),
};

fuzz_target!(|datagram: &[u8]| {
    oracle::check_datagram(datagram, &CTX);
});
