//! The hand-over from a running master to the master it starts on `USR2`
//! (nginx's binary upgrade): which inherited descriptors carry the server
//! socket and the channel between the two, and the two lines said on that
//! channel.
//!
//! The old master passes them in one environment variable,
//! `UDP_POOL_HANDOVER=socket=3,channel=7,from=4242`, and clears
//! close-on-exec on exactly those two descriptors in the child. The
//! channel is one end of a Unix stream socket pair:
//!
//! 1. the new master, once its workers are ready, writes [`READY`];
//! 2. the old master stops reading the socket and writes [`GO`];
//! 3. the new master starts reading the socket.
//!
//! Until [`GO`] the new master reads nothing, so the old one may still
//! kill it (a timeout, a stop) without losing a datagram.

use std::fmt;

/// The environment variable that carries a [`Handover`].
pub const ENV: &str = "UDP_POOL_HANDOVER";

/// The new master's line once its workers are ready.
pub const READY: &[u8] = b"ready\n";

/// The old master's answer: it has stopped reading; the socket is yours.
pub const GO: &[u8] = b"go\n";

/// What a master started by `USR2` learns from the one that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// The server's UDP socket, inherited: never bound again.
    pub socket: i32,
    /// The new master's end of the channel.
    pub channel: i32,
    /// The old master's PID: it must be the process that made the
    /// channel (the new master checks with `SO_PEERCRED`), so a value left
    /// in an environment by mistake is refused.
    pub from: u32,
}

/// Why a hand-over string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {ENV} value {0:?}")]
pub struct HandoverError(String);

impl fmt::Display for Handover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "socket={},channel={},from={}",
            self.socket, self.channel, self.from
        )
    }
}

impl std::str::FromStr for Handover {
    type Err = HandoverError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HandoverError(s.to_owned());
        let (mut socket, mut channel, mut from) = (None, None, None);
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(err)?;
            match k {
                "socket" => socket = v.parse().ok().filter(|fd: &i32| *fd >= 0),
                "channel" => channel = v.parse().ok().filter(|fd: &i32| *fd >= 0),
                "from" => from = v.parse().ok().filter(|pid: &u32| *pid > 1),
                _ => return Err(err()),
            }
        }
        let h = Handover {
            socket: socket.ok_or_else(err)?,
            channel: channel.ok_or_else(err)?,
            from: from.ok_or_else(err)?,
        };
        if h.socket == h.channel {
            return Err(err());
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let h = Handover {
            socket: 3,
            channel: 7,
            from: 4242,
        };
        assert_eq!(h.to_string(), "socket=3,channel=7,from=4242");
        assert_eq!(h.to_string().parse::<Handover>(), Ok(h));
    }

    #[test]
    fn refuses_what_is_not_a_handover() {
        for bad in [
            "",
            "socket=3",
            "socket=3,channel=7",
            "socket=3,channel=3,from=4242",
            "socket=-1,channel=7,from=4242",
            "socket=3,channel=7,from=1",
            "socket=3,channel=7,from=x",
            "socket=3,channel=7,from=4242,extra=1",
            "socket=3;channel=7;from=4242",
        ] {
            assert!(
                bad.parse::<Handover>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
