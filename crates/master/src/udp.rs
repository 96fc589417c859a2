//! The master's UDP socket; datagrams are read from it with
//! `netio::RecvBatch`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use anyhow::Context;

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
    // A deep receive queue absorbs bursts while the master is busy; raising
    // it past rmem_max needs CAP_NET_ADMIN, so fall back quietly.
    let want = 8 * 1024 * 1024;
    let fd = socket.as_fd();
    if nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBufForce, &want).is_err() {
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &want);
    }
    Ok(socket)
}

/// A UDP socket with `SO_REUSEPORT` set before it is bound (close-on-exec,
/// as every descriptor of the master).
fn bind_reusing_port(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
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
