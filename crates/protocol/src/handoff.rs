//! The hand-off between master and worker: which inherited descriptors the
//! worker owns, whose worker it is, and whether fault injection is on.
//!
//! The master passes them in one environment variable,
//! `UDP_POOL_WORKER=socket=5,requests=9,completions=12,master=4242,fault_injection=0`,
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
}

/// Why a hand-off string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {ENV} value {0:?}")]
pub struct HandoffError(String);

impl fmt::Display for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket={},requests={},completions={},master={},fault_injection={}",
            self.socket,
            self.requests,
            self.completions,
            self.master,
            u8::from(self.fault_injection)
        )
    }
}

impl std::str::FromStr for Handoff {
    type Err = HandoffError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HandoffError(s.to_owned());
        let (mut socket, mut requests, mut completions, mut master, mut fault) =
            (None, None, None, None, None);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(err)?;
            match k {
                "socket" => socket = v.parse().ok(),
                "requests" => requests = v.parse().ok(),
                "completions" => completions = v.parse().ok(),
                "master" => master = v.parse().ok(),
                "fault_injection" => fault = Some(v == "1"),
                _ => return Err(err()),
            }
        }
        Ok(Handoff {
            socket: socket.ok_or_else(err)?,
            requests: requests.ok_or_else(err)?,
            completions: completions.ok_or_else(err)?,
            master: master.ok_or_else(err)?,
            fault_injection: fault.ok_or_else(err)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let h = Handoff {
            socket: 5,
            requests: 9,
            completions: 12,
            master: 4242,
            fault_injection: true,
        };
        assert_eq!(h.to_string().parse::<Handoff>(), Ok(h));
        assert!("socket=5".parse::<Handoff>().is_err());
        assert!("".parse::<Handoff>().is_err());
    }
}
