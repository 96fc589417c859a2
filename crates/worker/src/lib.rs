//! The udp-pool worker: reads request frames from its pipe, computes each
//! reply, sends it straight to the client on the UDP socket it inherited
//! from the master, and reports each completion back over a second pipe.
//!
//! # Layout
//! * [`handoff`]: how the master tells a worker which descriptors are its
//!   own (the `UDP_POOL_WORKER` environment variable).
//! * [`serve`]: the worker's loop; its replies go out through
//!   `netio::ReplyBatch`, one `sendmmsg` per batch.
//! * [`signals`]: what `TERM` (finish what it holds), `QUIT` (stop after
//!   the batch in progress) and the terminal's signals mean to a worker.
//!
//! A worker stops cleanly when its request pipe reaches end of stream (the
//! master closed it: retire, reload, shutdown, or its own `TERM`) after
//! answering everything it read. It dies with its master through `PR_SET_PDEATHSIG`, set by the
//! master between fork and exec.

pub mod handoff;
pub mod serve;
pub mod signals;

use protocol::{Parsed, Request};

/// Whether a request blocks the process that serves it (`sleep`, or
/// `crash` with fault injection on): replies gathered so far are sent
/// before it runs, so that fast requests never wait behind a slow one.
pub fn blocks(parsed: &Parsed<'_>, fault_injection: bool) -> bool {
    match parsed.request {
        Ok(Request::Sleep { ms }) => ms > 0,
        Ok(Request::Crash) => fault_injection,
        _ => false,
    }
}

/// Performs a request's side effect, if it has one: sleeping for `sleep`,
/// aborting the whole process for `crash` when fault injection is on.
/// Returns `false` when `QUIT` cut a sleep short: the request is abandoned.
pub fn perform_effect(parsed: &Parsed<'_>, fault_injection: bool) -> bool {
    match parsed.request {
        Ok(Request::Sleep { ms }) => {
            signals::sleep_unless_quit(std::time::Duration::from_millis(ms))
        }
        Ok(Request::Crash) if fault_injection => {
            log::warn!("crash requested (fault injection): aborting");
            std::process::abort();
        }
        _ => true,
    }
}
