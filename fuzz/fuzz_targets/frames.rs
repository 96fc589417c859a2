//! Fuzz target: any bytes as a pipe stream, read with the frame decoders and
//! a `FrameBuf` in fuzzer-chosen read sizes, checked by the same oracle as
//! the corpus replay in the property tests
//! (`crates/protocol/tests/oracle/frames.rs`, which says what is checked and
//! how an input is laid out): no panic, decode then encode gives the same
//! bytes, and a `FrameBuf` agrees with the plain decoders however the stream
//! is split.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/protocol/tests/oracle/mod.rs"]
#[allow(dead_code)]
mod oracle;

fuzz_target!(|data: &[u8]| {
    oracle::frames::check_input(data);
});
