//! Signals, read through a `signalfd` so that no handler code ever runs:
//! the arbiter's loop sees them as one more readable descriptor.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The signals the master acts on.
pub const HANDLED: [Signal; 8] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
];

/// The master's signal inbox.
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Resets [`HANDLED`] to their default dispositions (a supervisor or a
    /// shell may have started the master with some ignored: an ignored
    /// SIGCHLD would make the kernel reap workers behind the master's back,
    /// and an ignored signal never reaches a signalfd), blocks them for this
    /// thread (and the threads it starts later) and opens a non-blocking
    /// signalfd for them. Workers get an empty mask back: `spawn` clears it
    /// between fork and exec.
    ///
    /// # Errors
    /// When a disposition, the mask or the signalfd cannot be set up.
    pub fn install() -> nix::Result<Signals> {
        let mut mask = SigSet::empty();
        for sig in HANDLED {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            // SAFETY: SIG_DFL installs no handler code.
            unsafe { nix::sys::signal::sigaction(sig, &default) }?;
            mask.add(sig);
        }
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Signals { fd })
    }

    /// The next pending signal, if any.
    pub fn take(&mut self) -> Option<Signal> {
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(sig) => return Some(sig),
                    Err(_) => continue,
                },
                Ok(None) => return None,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("cannot read the signalfd: {e}");
                    return None;
                }
            }
        }
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
