//! Where the server socket comes from, and replacing the master with
//! nothing lost (`USR2`, as nginx upgrades its binary).
//!
//! A master gets its socket one of three ways ([`take_listener`]): from
//! the master that started it on `USR2` (`UDP_POOL_HANDOVER`, see
//! `protocol::handover`), from systemd's socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`), or by binding `--bind`. An inherited
//! socket is never bound again: it is the same kernel socket, with the
//! same queue, so no datagram that reached it is lost.
//!
//! On `USR2` the old master starts the `master` executable found at that
//! moment ([`start_successor`]) with its own arguments, the socket and one
//! end of a channel. The new one starts its workers, says `ready`, and
//! waits; the old one stops reading and says `go`; only then does the new
//! one read. So at every moment exactly one master reads the socket (none,
//! for the few system calls between the two lines), the socket is never
//! closed, and a new master that fails or is too slow is killed before it
//! has read anything.

use std::ffi::OsString;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;
use protocol::handover::{self, Handover};

use crate::exit::ChildExit;

/// The server socket and where it came from.
pub struct Listener {
    /// The socket, bound or inherited.
    pub socket: UdpSocket,
    /// How this master got it.
    pub origin: Origin,
}

/// How a master got its socket.
pub enum Origin {
    /// It bound `--bind` itself.
    Bound,
    /// systemd passed it (`LISTEN_FDS`).
    Systemd,
    /// The master that started it on `USR2` passed it; that master still
    /// reads it until it says `go`.
    Predecessor(Predecessor),
}

impl Origin {
    /// For the `listening on` line.
    pub fn describe(&self) -> String {
        match self {
            Origin::Bound => "bound".to_owned(),
            Origin::Systemd => "socket from systemd (LISTEN_FDS)".to_owned(),
            Origin::Predecessor(p) => format!("socket from master {}", p.pid),
        }
    }
}

/// The socket this master serves on: inherited from its predecessor
/// (`UDP_POOL_HANDOVER`) or from systemd (`LISTEN_FDS`, fds from 3, for
/// this PID only), else bound to `bind`. The variables are removed from
/// the environment, so that workers and later masters never see them.
///
/// # Safety
/// Changes the process's environment: call it before any thread starts.
///
/// # Errors
/// A one-line error when a variable is malformed, names a parent that is
/// not this process's, passes a descriptor that is not a bound UDP
/// socket, passes more than one socket, or when `bind` cannot be bound.
pub unsafe fn take_listener(bind: SocketAddr, reuse_port: bool) -> anyhow::Result<Listener> {
    if let Some(value) = std::env::var_os(handover::ENV) {
        std::env::remove_var(handover::ENV);
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        return from_predecessor(&value);
    }
    let for_pid = std::env::var("LISTEN_PID").ok();
    let set = std::env::var_os("LISTEN_FDS").is_some();
    // SAFETY: the caller guarantees no other thread runs (the function's
    // contract), which is what `remove_var` needs.
    let fds = unsafe { sd_notify::listen_fds_and_unset_env() };
    std::env::remove_var("LISTEN_FDNAMES");
    let fds: Vec<RawFd> = fds.context("LISTEN_FDS/LISTEN_PID")?.collect();
    match fds.as_slice() {
        [] => {
            if set {
                log::warn!(
                    "LISTEN_FDS is set for pid {}, not this master ({}): binding {bind} instead",
                    for_pid.as_deref().unwrap_or("(none)"),
                    std::process::id()
                );
            }
            Ok(Listener {
                socket: crate::udp::bind(bind, reuse_port)?,
                origin: Origin::Bound,
            })
        }
        [fd] => {
            let fd = owned(*fd, "LISTEN_FDS")?;
            let socket = crate::udp::inherited(fd, "LISTEN_FDS")?;
            crate::udp::deepen_queue(&socket);
            if reuse_port {
                log::warn!(
                    "--reuse-port has no effect on a socket from systemd: set ReusePort=yes in its .socket unit"
                );
            }
            Ok(Listener {
                socket,
                origin: Origin::Systemd,
            })
        }
        more => bail!(
            "LISTEN_FDS: systemd passed {} sockets; the master serves exactly one (one ListenDatagram= in the .socket unit)",
            more.len()
        ),
    }
}

/// The socket and channel named by `UDP_POOL_HANDOVER`. The channel must
/// be one end of a socket pair made by the master the variable names
/// (`SO_PEERCRED`), so a value left in an environment by mistake is
/// refused; the old master need not be alive any more (it may have died
/// while this one started: then this one serves in its place).
fn from_predecessor(value: &std::ffi::OsStr) -> anyhow::Result<Listener> {
    let h: Handover = value
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("malformed {} value {value:?}", handover::ENV))?
        .parse()?;
    let channel = owned(h.channel, handover::ENV)?;
    let peer = nix::sys::socket::getsockopt(&channel, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|_| {
        anyhow::anyhow!(
            "{}: descriptor {} is not a hand-over channel (a Unix socket)",
            handover::ENV,
            h.channel
        )
    })?;
    if peer.pid() as u32 != h.from {
        bail!(
            "{} names master {}, but its channel was made by pid {}: \
             a value left in the environment? unset it",
            handover::ENV,
            h.from,
            peer.pid()
        );
    }
    let socket = crate::udp::inherited(owned(h.socket, handover::ENV)?, handover::ENV)?;
    fcntl(channel.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .and_then(|_| fcntl(channel.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)))
        .with_context(|| format!("{}: channel {}", handover::ENV, h.channel))?;
    Ok(Listener {
        socket,
        origin: Origin::Predecessor(Predecessor {
            pid: h.from,
            channel,
            heard: Vec::new(),
        }),
    })
}

/// Takes ownership of an inherited descriptor, once it is known to be open.
fn owned(fd: RawFd, what: &str) -> anyhow::Result<OwnedFd> {
    if fd < 0 || fcntl(fd, FcntlArg::F_GETFD).is_err() {
        bail!("{what}: descriptor {fd} is not open");
    }
    // SAFETY: `fd` is open (checked just above) and owned by nothing else
    // in this process: it was inherited across exec, named by the
    // variable this master reads once, at start, before anything else
    // could have taken it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The executable a `USR2` starts: the path this master was started as
/// (argv\[0\], when it names a path, as nginx re-executes it; made
/// absolute), else the file this master runs from. Resolved at start and
/// looked up again at each `USR2`, so replacing the file at that path
/// (an upgrade) takes effect.
///
/// # Errors
/// When neither is known.
pub fn own_executable() -> anyhow::Result<PathBuf> {
    if let Some(argv0) = std::env::args_os().next().map(PathBuf::from) {
        if argv0.as_os_str().as_bytes().contains(&b'/') {
            if argv0.is_absolute() {
                return Ok(argv0);
            }
            let cwd = std::env::current_dir().context("cannot read the working directory")?;
            return Ok(cwd.join(argv0));
        }
    }
    std::env::current_exe().context("cannot locate the master executable")
}

/// This master's own arguments, to start its successor with.
pub fn own_arguments() -> Vec<OsString> {
    std::env::args_os().skip(1).collect()
}

/// What came over a hand-over channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// Nothing yet.
    Nothing,
    /// The expected line.
    Line,
    /// The other end closed the channel first.
    Closed,
    /// Something else, or the channel failed.
    Broken(String),
}

/// Reads what is there on `channel` (non-blocking) into `heard`, and
/// tells whether it is `expected`.
fn hear(channel: &OwnedFd, heard: &mut Vec<u8>, expected: &[u8]) -> Heard {
    let mut buf = [0u8; 64];
    loop {
        match nix::unistd::read(channel.as_raw_fd(), &mut buf) {
            Ok(0) => {
                return if heard.as_slice() == expected {
                    Heard::Line
                } else {
                    Heard::Closed
                }
            }
            Ok(n) => {
                heard.extend_from_slice(&buf[..n]);
                if heard.as_slice() == expected {
                    return Heard::Line;
                }
                if !expected.starts_with(heard) {
                    return Heard::Broken(format!("said {:?}", String::from_utf8_lossy(heard)));
                }
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Heard::Nothing,
            // The other end closed with our line unread (it died).
            Err(Errno::ECONNRESET) => return Heard::Closed,
            Err(e) => return Heard::Broken(e.desc().to_owned()),
        }
    }
}

/// Writes `line` on the channel. It is the first and only thing written
/// to an empty socket buffer, so it never has to wait.
fn say(channel: &OwnedFd, line: &[u8]) -> io::Result<()> {
    loop {
        match nix::sys::socket::send(
            channel.as_raw_fd(),
            line,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) if n == line.len() => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The new master's side: the master that started it, until it says `go`.
pub struct Predecessor {
    /// The old master's PID.
    pub pid: u32,
    channel: OwnedFd,
    heard: Vec<u8>,
}

impl Predecessor {
    /// The channel, to wait on.
    pub fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Tells the old master this one's workers are ready.
    ///
    /// # Errors
    /// When the channel is closed (the old master is gone or gave up).
    pub fn say_ready(&self) -> io::Result<()> {
        say(&self.channel, handover::READY)
    }

    /// Whether the old master has said `go` ([`Heard::Line`]).
    pub fn hear(&mut self) -> Heard {
        hear(&self.channel, &mut self.heard, handover::GO)
    }
}

/// The old master's side: the master it started on `USR2`, until it is
/// ready (then it is told `go`) or given up (then it is killed).
pub struct Successor {
    /// Its PID.
    pub pid: Pid,
    /// When it was started.
    pub started: Instant,
    /// When it is given up if not ready.
    pub deadline: Instant,
    /// How it ended, once reaped.
    pub exit: Option<ChildExit>,
    /// It closed the channel (it is ending).
    pub closed: bool,
    channel: OwnedFd,
    heard: Vec<u8>,
}

impl Successor {
    /// The channel, to wait on.
    pub fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Whether it has said `ready` ([`Heard::Line`]).
    pub fn hear(&mut self) -> Heard {
        hear(&self.channel, &mut self.heard, handover::READY)
    }

    /// Tells it the socket is its own now.
    ///
    /// # Errors
    /// When the channel is closed (it is gone).
    pub fn say_go(&self) -> io::Result<()> {
        say(&self.channel, handover::GO)
    }
}

/// Starts `path` with `args` as this master's successor, handing it
/// `socket` and one end of a new channel (`UDP_POOL_HANDOVER`). It is not
/// confined like a worker and does not die with this master: it is to
/// outlive it.
///
/// # Errors
/// When the channel cannot be made or the executable cannot be started.
pub fn start_successor(
    path: &Path,
    args: &[OsString],
    socket: BorrowedFd<'_>,
    from: u32,
    deadline: Instant,
) -> io::Result<Successor> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    fcntl(ours.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    let inherited = [socket.as_raw_fd(), theirs.as_raw_fd()];
    let h = Handover {
        socket: inherited[0],
        channel: inherited[1],
        from,
    };
    let mut cmd = Command::new(path);
    cmd.args(args)
        .env(handover::ENV, h.to_string())
        .stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec and calls only
    // fcntl(2), which is async-signal-safe, on two integers copied before
    // the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for fd in inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    Ok(Successor {
        pid: Pid::from_raw(child.id() as i32),
        started: Instant::now(),
        deadline,
        exit: None,
        closed: false,
        channel: ours,
        heard: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (OwnedFd, OwnedFd) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (OwnedFd::from(a), OwnedFd::from(b))
    }

    #[test]
    fn a_handover_is_taken_only_from_the_master_that_made_the_channel() {
        use std::os::fd::IntoRawFd;
        let value = |from: u32| {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap().into_raw_fd();
            let (ours, _theirs) = UnixStream::pair().unwrap();
            let h = Handover {
                socket: udp,
                channel: ours.into_raw_fd(),
                from,
            };
            std::ffi::OsString::from(h.to_string())
        };
        // This process made the pair: it is the `from` that holds.
        assert!(from_predecessor(&value(std::process::id())).is_ok());
        let e = from_predecessor(&value(4_000_000))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("names master 4000000, but its channel was made by pid"),
            "{e}"
        );
        // A channel that is not a socket.
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap().into_raw_fd();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let h = format!("socket={udp},channel={},from=4242", r.into_raw_fd());
        let e = from_predecessor(std::ffi::OsStr::new(&h))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is not a hand-over channel"), "{e}");
        let e = from_predecessor(std::ffi::OsStr::new("socket=3"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("malformed UDP_POOL_HANDOVER"), "{e}");
    }

    #[test]
    fn hears_a_line_that_comes_in_pieces() {
        let (a, b) = pair();
        let mut heard = Vec::new();
        assert_eq!(hear(&a, &mut heard, b"ready\n"), Heard::Nothing);
        say(&b, b"rea").unwrap();
        assert_eq!(hear(&a, &mut heard, b"ready\n"), Heard::Nothing);
        say(&b, b"dy\n").unwrap();
        assert_eq!(hear(&a, &mut heard, b"ready\n"), Heard::Line);
    }

    #[test]
    fn a_closed_or_garbled_channel_is_not_the_line() {
        let (a, b) = pair();
        drop(b);
        assert_eq!(hear(&a, &mut Vec::new(), b"go\n"), Heard::Closed);
        let (a, b) = pair();
        say(&b, b"nope\n").unwrap();
        assert!(matches!(
            hear(&a, &mut Vec::new(), b"go\n"),
            Heard::Broken(_)
        ));
        // The line then the end of the stream: the line counts.
        let (a, b) = pair();
        say(&b, b"go\n").unwrap();
        drop(b);
        assert_eq!(hear(&a, &mut Vec::new(), b"go\n"), Heard::Line);
    }

    #[test]
    fn an_end_that_died_with_our_line_unread_has_closed() {
        let (a, b) = pair();
        say(&a, b"ready\n").unwrap();
        drop(b);
        assert_eq!(hear(&a, &mut Vec::new(), b"go\n"), Heard::Closed);
    }

    #[test]
    fn saying_to_a_closed_channel_fails_without_sigpipe() {
        let (a, b) = pair();
        drop(a);
        assert!(say(&b, b"go\n").is_err());
    }
}
