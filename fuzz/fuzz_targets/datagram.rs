//! Fuzz target: any bytes as a client datagram, through `parse` and
//! `write_reply`, checked by the same reply oracle as the property tests
//! (`crates/protocol/tests/oracle/datagram.rs`): the empty datagram and only
//! it gets no reply; the dialect follows the first non-blank byte; a reply is
//! never empty and fits in one datagram (a square that would not is a
//! `too_large` error); a text error is one line; a JSON reply is one valid
//! JSON object with no repeated keys, a documented error code, the worker's
//! PID, and the request's `id` byte for byte exactly when the request carried
//! one; `request::scan_id`, the master's cache key, finds the parser's id.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/protocol/tests/oracle/mod.rs"]
#[allow(dead_code)]
mod oracle;

fuzz_target!(|datagram: &[u8]| {
    oracle::datagram::check_datagram(datagram, &oracle::datagram::EXAMPLE_CTX);
});
