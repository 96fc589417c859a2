//! The master's UDP socket: bound here, or inherited (from systemd, or from
//! the master that started this one on `USR2`) and checked here; datagrams
//! are read from it with `netio::RecvBatch`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use anyhow::{bail, Context};
use nix::sys::socket::{self, sockopt};

/// The receive queue asked for: it absorbs bursts while the master is busy,
/// and the datagrams that arrive while a replacement master takes over.
const RECEIVE_QUEUE: usize = 8 * 1024 * 1024;

/// Binds the server socket. It stays blocking, so that workers, which
/// share its open file description, send replies without `EAGAIN`; the
/// master's own receives pass `MSG_DONTWAIT`. With `reuse_port`
/// (`SO_REUSEPORT`), several masters may bind the same address, and the
/// kernel spreads clients over them by a hash of their address.
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> anyhow::Result<UdpSocket> {
    let socket = if reuse_port {
        bind_reusing_port(addr)
    } else {
        UdpSocket::bind(addr)
    }
    .with_context(|| format!("cannot bind UDP {addr}"))?;
    deepen_queue(&socket);
    Ok(socket)
}

/// Raises the socket's receive queue to [`RECEIVE_QUEUE`] unless it is
/// that deep already (a systemd `.socket` unit may have set it):
/// raising it past `rmem_max` needs `CAP_NET_ADMIN`, so fall back quietly.
pub fn deepen_queue(socket: &UdpSocket) {
    let fd = socket.as_fd();
    // The kernel reports twice what was set (its bookkeeping overhead).
    if socket::getsockopt(&fd, sockopt::RcvBuf).is_ok_and(|n| n >= 2 * RECEIVE_QUEUE) {
        return;
    }
    if socket::setsockopt(&fd, sockopt::RcvBufForce, &RECEIVE_QUEUE).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_QUEUE);
    }
}

/// Takes an inherited descriptor as the server socket, after checking
/// that it is what a master serves on: a bound UDP socket (IPv4 or IPv6).
/// `what` names where it came from, for the error. The descriptor is made
/// close-on-exec (as every descriptor of the master) and blocking (see
/// [`bind`]).
///
/// # Errors
/// When the descriptor is not a socket, not a UDP one, or not bound.
pub fn inherited(fd: OwnedFd, what: &str) -> anyhow::Result<UdpSocket> {
    let raw = fd.as_raw_fd();
    let not_udp =
        |why: String| anyhow::anyhow!("{what}: descriptor {raw} is not a UDP socket ({why})");
    let ty = socket::getsockopt(&fd, sockopt::SockType).map_err(|e| not_udp(e.desc().into()))?;
    if ty != socket::SockType::Datagram {
        return Err(not_udp(format!("a {ty:?} socket")));
    }
    match protocol_of(&fd) {
        Ok(p) if p == libc::IPPROTO_UDP => {}
        Ok(p) => return Err(not_udp(format!("protocol {p}"))),
        Err(e) => return Err(not_udp(e.to_string())),
    }
    let socket = UdpSocket::from(fd);
    // Only an IPv4 or IPv6 address converts: a Unix datagram socket fails here.
    let addr = socket
        .local_addr()
        .map_err(|e| not_udp(format!("no IP address: {e}")))?;
    if addr.port() == 0 {
        bail!("{what}: the UDP socket at descriptor {raw} is not bound to a port");
    }
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .with_context(|| format!("{what}: descriptor {raw}: fcntl"))?;
    socket
        .set_nonblocking(false)
        .with_context(|| format!("{what}: descriptor {raw}: fcntl"))?;
    Ok(socket)
}

/// The socket's protocol (`SO_PROTOCOL`), which nix does not wrap.
fn protocol_of(fd: &OwnedFd) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals of the sizes getsockopt(2)
    // is told; `fd` is an open descriptor borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// A UDP socket with `SO_REUSEPORT` set before it is bound (close-on-exec,
/// as every descriptor of the master).
fn bind_reusing_port(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, socket::sockopt::ReusePort, &true)?;
    if addr.is_ipv6() {
        // As std binds: an IPv6 socket serves IPv6 only.
        socket::setsockopt(&fd, socket::sockopt::Ipv6V6Only, &true)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn takes_a_bound_udp_socket_and_refuses_anything_else() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let taken = inherited(OwnedFd::from(udp), "test").unwrap();
        assert_eq!(taken.local_addr().unwrap(), addr);

        let (unix, _) = UnixDatagram::pair().unwrap();
        let e = inherited(OwnedFd::from(unix), "LISTEN_FDS")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("LISTEN_FDS: descriptor ") && e.contains("not a UDP socket"),
            "{e}"
        );

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = inherited(OwnedFd::from(tcp), "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a UDP socket (a Stream socket)"), "{e}");

        let (r, _w) = nix::unistd::pipe().unwrap();
        let e = inherited(r, "test").unwrap_err().to_string();
        assert!(e.contains("not a UDP socket"), "{e}");

        let unbound = socket::socket(
            socket::AddressFamily::Inet,
            socket::SockType::Datagram,
            socket::SockFlag::empty(),
            None,
        )
        .unwrap();
        let e = inherited(unbound, "test").unwrap_err().to_string();
        assert!(e.contains("not bound"), "{e}");
    }
}
