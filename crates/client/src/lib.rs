//! The client side of udp-pool: `client`, which sends one request and prints
//! its reply, and `loadgen`, which loads a server on this machine and
//! reports throughput, latency, loss and the spread of replies over worker
//! PIDs.
//!
//! The wire format is the `protocol` crate's; this crate only renders the
//! requests its tools send and reads replies without losing precision.
//!
//! # Layout
//! * [`cli`]: the command lines of both binaries.
//! * [`addr`]: server addresses (loopback only for load).
//! * [`failover`]: several servers: where a request starts, where it goes
//!   when one fails it, which are skipped for a while (no sockets).
//! * [`discover`]: `--discover SEED`: the servers of a group, from `members`.
//! * [`wire`]: requests rendered, replies read, matched and checked.
//! * [`oneshot`]: the `client` binary's work: ask, retry, fail over, print.
//! * [`mix`]: the load generator's request mix.
//! * [`load`]: the load generator's poll loop and its `--processes` parent;
//!   its sockets are read and written in batches with `netio`.
//! * [`report`]: what a run counted, as text or JSON.
//! * [`plot`]: `--plot`'s SVG.

pub mod addr;
pub mod cli;
pub mod discover;
pub mod failover;
pub mod load;
pub mod mix;
pub mod oneshot;
pub mod plot;
pub mod report;
pub mod wire;
