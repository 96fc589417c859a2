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
//! * [`hostile`]: issue 9's acceptance: untrusted sources (127.0.0.2 and
//!   the rest of 127/8 with `--trusted 127.0.0.1`): the amplification bound,
//!   `stats` forbidden, the rate limit, `sleep` off by default, a flood from
//!   100,000 addresses.
//! * [`failover`]: issue 10 item 4, the client side: `client` and
//!   `loadgen` with several servers: retries, failover on a timeout, a
//!   closed port or `busy`, and no loss when one of two servers is killed.
//! * [`several`]: several masters on one port (`--reuse-port`).
//! * [`causal`]: issue 11 item 7: two masters whose clocks disagree by 2 s,
//!   a request carrying a causal link (`"hlc"`) from one to the other, and
//!   `master report` merging their journals in causal order.
//! * [`dedup`]: issue 10 item 3, retries answered once: the duplicate
//!   request cache (a retry in progress dropped, one after the reply
//!   replayed byte for byte, its bounds under 100,000 ids).
//! * [`replace`]: issue 10 item 2: `USR2` replaces the master under load
//!   with nothing lost, a failed replacement rolls back; systemd's
//!   `LISTEN_FDS` and `NOTIFY_SOCKET`.
//! * [`cluster`]: issue 11, a group of servers on 127.0.0.1-4: formation,
//!   discovery, a server or the coordinator SIGKILLed, a server joining
//!   under load, garbage and keys on the cluster port.
//! * [`netns`]: issue 11 across network namespaces (root only): the
//!   coordinator cut off from the majority, and the partition healed.
//! * [`one_reply`]: exactly one reply per request on every stop path and
//!   timeout; signals as documented; a loop that never stalls.
//! * [`privileges`]: issue 9's least privilege: workers as `--user nobody`,
//!   their resource limits and seccomp filter, the warning of a root master.

mod causal;
mod cluster;
mod dedup;
mod failover;
mod faults;
mod harness;
mod hostile;
mod journal;
mod lifecycle;
mod netns;
mod one_reply;
mod privileges;
mod replace;
mod serve;
mod several;
