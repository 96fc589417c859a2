//! Oracles shared by the property tests (`tests/props.rs`) and the fuzz
//! targets (`fuzz/fuzz_targets/`, which include this module with `#[path]`):
//! what the output of the wire-format code must be for any input, so that
//! random, mutated and fuzzed inputs are all held to the same checks.
//!
//! * [`datagram`]: `parse` + `write_reply` on a client datagram.
//! * [`frames`]: the pipe-frame decoders and `FrameBuf` on a byte stream.

pub mod datagram;
pub mod frames;
