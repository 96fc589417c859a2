//! Integration tests of udp-pool with the real binaries (release build):
//! `master` serving on a free port with its `worker` pool, the `client`,
//! and the lecture's Python clients.
//!
//! # Layout
//! * [`harness`]: finds the binaries, starts and watches `master`, UDP
//!   client helpers, `/proc` helpers.
//! * [`serve`]: issue 2's acceptance: answers, errors, dialects, IPv6,
//!   inline mode, the `client` binary, the lecture's clients.
//! * [`faults`]: issue 3's acceptance: crashes, hangs, overload.
//! * [`lifecycle`]: signals (TERM, KILL of the master, HUP, TTIN/TTOU) and
//!   `--max-requests`.
//! * [`journal`]: the SQLite journal and `master report`.

mod faults;
mod harness;
mod journal;
mod lifecycle;
mod serve;
