//! The hand-off between master and worker: which inherited descriptors the
//! worker owns, whose worker it is, whether fault injection is on, and
//! whether it installs its seccomp filter.
//!
//! The master passes them in one environment variable,
//! `UDP_POOL_WORKER=socket=5,requests=9,completions=12,master=4242,fault_injection=0,seccomp=1`,
//! and clears close-on-exec on exactly those three descriptors in the child.

use std::fmt;

/// The environment variable that carries a [`Handoff`].
pub const ENV: &str = "UDP_POOL_WORKER";

/// Everything a worker learns from its master at exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handoff {
    /// The master's UDP socket, inherited: replies are sent on it.
    pub socket: i32,
    /// The read end of this worker's request pipe.
    pub requests: i32,
    /// The write end of this worker's completion pipe.
    pub completions: i32,
    /// The master's PID: a worker whose parent is not it exits at once.
    pub master: u32,
    /// Whether `{"op":"crash"}` really aborts.
    pub fault_injection: bool,
    /// Whether the worker confines itself to its steady-state system calls
    /// once it has started (`master --no-seccomp` turns it off).
    pub seccomp: bool,
}

/// Whether workers of this build can install their seccomp filter: their
/// allow-list is written for these architectures. Elsewhere the master
/// says so once and hands every worker `seccomp=0`.
pub const SECCOMP_AVAILABLE: bool = cfg!(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
));

/// Why a hand-off string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {ENV} value {0:?}")]
pub struct HandoffError(String);

impl fmt::Display for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket={},requests={},completions={},master={},fault_injection={},seccomp={}",
            self.socket,
            self.requests,
            self.completions,
            self.master,
            u8::from(self.fault_injection),
            u8::from(self.seccomp)
        )
    }
}

impl std::str::FromStr for Handoff {
    type Err = HandoffError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HandoffError(s.to_owned());
        let (mut socket, mut requests, mut completions, mut master, mut fault, mut seccomp) =
            (None, None, None, None, None, None);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(err)?;
            match k {
                "socket" => socket = v.parse().ok(),
                "requests" => requests = v.parse().ok(),
                "completions" => completions = v.parse().ok(),
                "master" => master = v.parse().ok(),
                "fault_injection" => fault = flag(v),
                "seccomp" => seccomp = flag(v),
                _ => return Err(err()),
            }
        }
        Ok(Handoff {
            socket: socket.ok_or_else(err)?,
            requests: requests.ok_or_else(err)?,
            completions: completions.ok_or_else(err)?,
            master: master.ok_or_else(err)?,
            fault_injection: fault.ok_or_else(err)?,
            seccomp: seccomp.ok_or_else(err)?,
        })
    }
}

/// A `0` or `1` switch; anything else is malformed (a filter must not be
/// turned off by a typo).
fn flag(v: &str) -> Option<bool> {
    match v {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for (fault_injection, seccomp) in [(true, false), (false, true), (true, true)] {
            let h = Handoff {
                socket: 5,
                requests: 9,
                completions: 12,
                master: 4242,
                fault_injection,
                seccomp,
            };
            assert_eq!(h.to_string().parse::<Handoff>(), Ok(h));
        }
        let text = "socket=5,requests=9,completions=12,master=4242,fault_injection=0,seccomp=1";
        let h: Handoff = text.parse().unwrap();
        assert!(h.seccomp && !h.fault_injection);
        assert_eq!(h.to_string(), text);
        assert!("socket=5".parse::<Handoff>().is_err());
        assert!("".parse::<Handoff>().is_err());
        // Without the seccomp field (an older master), or with a value that
        // is not 0 or 1, the hand-off is refused rather than read as "off".
        let old = "socket=5,requests=9,completions=12,master=4242,fault_injection=0";
        assert!(old.parse::<Handoff>().is_err());
        assert!(format!("{old},seccomp=yes").parse::<Handoff>().is_err());
        assert!(format!("{old},seccomp=").parse::<Handoff>().is_err());
    }
}
