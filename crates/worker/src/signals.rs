//! The worker's signals: what each one means, set up once at start.
//!
//! A worker starts with an empty signal mask (whatever its parent had
//! blocked) and gives every signal a deliberate meaning:
//!
//! * `TERM`: stop gracefully. The worker tells the master (a STOPPING
//!   frame), which gives it no new work and closes its request pipe; the
//!   worker answers everything it holds, then exits 0 and the master starts
//!   a replacement.
//! * `QUIT`: stop at once. The worker finishes sending the batch of replies
//!   in progress (with their completions, so no request is answered twice),
//!   abandons the rest, and exits 0; the master answers what it abandoned.
//!   A `sleep` in progress is cut short.
//! * `INT`, `HUP`, `TTIN`, `TTOU`: ignored. The terminal sends them to the
//!   whole process group, and the master decides what they mean.
//!
//! The handlers only set a flag. They are installed without `SA_RESTART`,
//! so a blocking read of the request pipe returns `EINTR` and the loop sees
//! the flag at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

static TERM: AtomicBool = AtomicBool::new(false);
static QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: nix::libc::c_int) {
    TERM.store(true, Ordering::Relaxed);
}

extern "C" fn on_quit(_: nix::libc::c_int) {
    QUIT.store(true, Ordering::Relaxed);
}

/// Clears the signal mask and installs the dispositions described above.
///
/// # Errors
/// When a disposition or the mask cannot be set.
pub fn install() -> nix::Result<()> {
    for sig in [
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
        // SAFETY: SIG_IGN installs no handler code.
        unsafe { signal::sigaction(sig, &ignore) }?;
    }
    for (sig, handler) in [
        (Signal::SIGTERM, on_term as extern "C" fn(nix::libc::c_int)),
        (Signal::SIGQUIT, on_quit),
    ] {
        let action = SigAction::new(
            SigHandler::Handler(handler),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; it touches no other state.
        unsafe { signal::sigaction(sig, &action) }?;
    }
    signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Whether `TERM` has arrived: stop gracefully.
pub fn term_requested() -> bool {
    TERM.load(Ordering::Relaxed)
}

/// Whether `QUIT` has arrived: stop at once.
pub fn quit_requested() -> bool {
    QUIT.load(Ordering::Relaxed)
}

/// Sleeps for `d` unless `QUIT` arrives first; returns whether the whole
/// sleep happened. Sleeps in short slices so that a signal arriving just
/// before a slice delays the stop by one slice at most.
pub fn sleep_unless_quit(d: Duration) -> bool {
    const SLICE: Duration = Duration::from_millis(20);
    let deadline = Instant::now() + d;
    loop {
        if quit_requested() {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        // Interrupted early by a signal: the loop looks at the flag again.
        let ts = nix::sys::time::TimeSpec::from_duration(left.min(SLICE));
        let _ = nix::time::clock_nanosleep(
            nix::time::ClockId::CLOCK_MONOTONIC,
            nix::time::ClockNanosleepFlags::empty(),
            &ts,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_sleep_is_reported() {
        let t = Instant::now();
        assert!(sleep_unless_quit(Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
