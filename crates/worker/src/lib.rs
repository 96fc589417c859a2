//! The udp-pool worker: reads request frames from its pipe, computes each
//! reply, sends it straight to the client on the UDP socket it inherited
//! from the master, and reports each completion back over a second pipe.
//!
//! # Layout
//! * [`serve`]: the worker's loop; its replies go out through
//!   `netio::ReplyBatch`, one `sendmmsg` per batch.
//! * [`signals`]: what `TERM` (finish what it holds), `QUIT` (stop after
//!   the batch in progress) and the terminal's signals mean to a worker.
//! * [`sandbox`]: the seccomp filter a worker installs once started: the
//!   few system calls it needs from then on, and death for any other.
//!
//! A worker stops cleanly when its request pipe reaches end of stream (the
//! master closed it: retire, reload, shutdown, or its own `TERM`) after
//! answering everything it read. It dies with its master through `PR_SET_PDEATHSIG`, set by the
//! master between fork and exec, where it also gets its user, group and
//! resource limits; its seccomp filter it installs itself ([`sandbox`]).

pub mod sandbox;
pub mod serve;
pub mod signals;
