//! The master's UDP socket and its batched receive (`recvmmsg`).

use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

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

/// One received datagram, borrowed from a [`RecvBatch`].
pub struct Datagram<'a> {
    /// Who sent it.
    pub from: SocketAddr,
    /// Its bytes, cut at the slot size when `truncated`.
    pub payload: &'a [u8],
    /// The datagram was longer than the slot (`--max-datagram`).
    pub truncated: bool,
}

/// Preallocated buffers for receiving up to `capacity` datagrams per call.
#[derive(Default)]
pub struct RecvBatch {
    slot: usize,
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    count: usize,
}

impl RecvBatch {
    /// Room for `capacity` datagrams of up to `slot` bytes each.
    pub fn new(capacity: usize, slot: usize) -> Self {
        RecvBatch {
            slot,
            bufs: vec![0; capacity * slot],
            // SAFETY: plain old data; all-zero is a valid value.
            addrs: vec![unsafe { mem::zeroed() }; capacity],
            iovecs: Vec::with_capacity(capacity),
            // SAFETY: as above.
            headers: vec![unsafe { mem::zeroed() }; capacity],
            count: 0,
        }
    }

    /// Receives whatever is queued, up to the capacity, without blocking.
    /// Returns how many datagrams arrived (0 when none was waiting).
    ///
    /// # Errors
    /// Socket errors other than "nothing to read" and interruptions.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let n = self.headers.len();
        self.iovecs.clear();
        for chunk in self.bufs.chunks_exact_mut(self.slot) {
            self.iovecs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            });
        }
        for i in 0..n {
            let h = &mut self.headers[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovecs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        loop {
            // SAFETY: the headers point into `self.iovecs`, `self.addrs` and
            // `self.bufs`, which live as long as `self` and are not touched
            // during the call; the count matches the headers vector.
            let got = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if got >= 0 {
                self.count = got as usize;
                return Ok(self.count);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    self.count = 0;
                    return Ok(0);
                }
                _ => return Err(err),
            }
        }
    }

    /// The datagrams of the last [`RecvBatch::recv`] (an address the
    /// kernel reports in another family is skipped).
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> {
        (0..self.count).filter_map(move |i| {
            let h = &self.headers[i];
            let from = worker::batch::read_sockaddr(&self.addrs[i])?;
            let len = (h.msg_len as usize).min(self.slot);
            let start = i * self.slot;
            Some(Datagram {
                from,
                payload: &self.bufs[start..start + len],
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            })
        })
    }
}
