//! How a worker's life ended: the one place that decodes a child's exit
//! status and names the reason the master records for it.

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// A child that has ended, as `waitpid` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    /// Its PID.
    pub pid: Pid,
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
}

impl ChildExit {
    /// The end a wait status reports; `None` for a status that is not an
    /// end (stopped, continued, still alive).
    pub fn from_wait_status(status: WaitStatus) -> Option<ChildExit> {
        match status {
            WaitStatus::Exited(pid, code) => Some(ChildExit {
                pid,
                code: Some(code),
                signal: None,
            }),
            WaitStatus::Signaled(pid, sig, _) => Some(ChildExit {
                pid,
                code: None,
                signal: Some(sig as i32),
            }),
            _ => None,
        }
    }

    /// Whether it exited with status 0.
    pub fn clean(&self) -> bool {
        self.code == Some(0)
    }

    /// `exit 0`, `signal 9 (SIGKILL)`.
    pub fn text(&self) -> String {
        exit_status_text(self.code, self.signal)
    }
}

/// Why a worker's life ended, as recorded in `workers.reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// It died on its own (a signal or a non-zero exit the master did not ask for).
    Crash,
    /// The master killed it for holding a request past the timeout.
    TimeoutKill,
    /// It served its request budget and was replaced.
    Retired,
    /// Replaced on SIGHUP.
    Reload,
    /// Stopped because the pool shrank (SIGTTOU).
    Scaled,
    /// Stopped because the master shut down.
    Stop,
    /// It got SIGTERM from outside the master, answered what it held and
    /// exited; the master replaced it.
    Terminated,
    /// It failed before becoming ready.
    BootFailure,
}

impl ExitReason {
    /// Whether the worker died without being asked to (its requests are
    /// re-dispatched once, and an early death counts toward a crash loop).
    pub fn is_crash(self) -> bool {
        matches!(self, ExitReason::Crash | ExitReason::BootFailure)
    }

    /// The reason as the journal stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Crash => "crash",
            ExitReason::TimeoutKill => "timeout_kill",
            ExitReason::Retired => "retired",
            ExitReason::Reload => "reload",
            ExitReason::Scaled => "scaled_down",
            ExitReason::Stop => "stop",
            ExitReason::Terminated => "terminated",
            ExitReason::BootFailure => "boot_failure",
        }
    }
}

/// A human exit status: `exit 0`, `signal 9 (SIGKILL)`, or `unknown`.
pub fn exit_status_text(exit_code: Option<i32>, signal: Option<i32>) -> String {
    match (signal, exit_code) {
        (Some(sig), _) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        },
        (None, Some(code)) => format!("exit {code}"),
        (None, None) => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn wait_statuses_decode_to_exits() {
        let pid = Pid::from_raw(7);
        let exited = ChildExit::from_wait_status(WaitStatus::Exited(pid, 0)).unwrap();
        assert!(exited.clean());
        assert_eq!(exited.text(), "exit 0");
        let killed =
            ChildExit::from_wait_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)).unwrap();
        assert!(!killed.clean());
        assert_eq!(killed.text(), "signal 9 (SIGKILL)");
        assert_eq!(ChildExit::from_wait_status(WaitStatus::StillAlive), None);
        assert_eq!(exit_status_text(None, None), "unknown");
    }
}
