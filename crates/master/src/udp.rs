//! The master's UDP socket; datagrams are read from it with
//! `netio::RecvBatch`.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use anyhow::Context;

/// Binds the server socket. It stays blocking, so that workers, which
/// share its open file description, send replies without `EAGAIN`; the
/// master's own receives pass `MSG_DONTWAIT`.
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}"))?;
    // A deep receive queue absorbs bursts while the master is busy; raising
    // it past rmem_max needs CAP_NET_ADMIN, so fall back quietly.
    let want = 8 * 1024 * 1024;
    let fd = socket.as_fd();
    if nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBufForce, &want).is_err() {
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &want);
    }
    Ok(socket)
}
