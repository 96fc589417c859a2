//! Replies gathered into a batch and sent with one `sendmmsg` call.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A fixed number of reusable reply buffers and their destinations, sent
/// together. Buffers keep their capacity between batches, so a steady
/// stream of replies allocates nothing.
pub struct ReplyBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    len: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl ReplyBatch {
    /// A batch of at most `capacity` replies.
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        ReplyBatch {
            bufs: (0..capacity).map(|_| Vec::with_capacity(256)).collect(),
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            addrs: vec![unsafe { mem::zeroed() }; capacity],
            addr_lens: vec![0; capacity],
            len: 0,
            iovecs: Vec::with_capacity(capacity),
            headers: Vec::with_capacity(capacity),
        }
    }

    /// Number of replies waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no reply is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the batch must be sent before another reply fits.
    pub fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    /// The buffer for the next reply, cleared. Fill it, then call
    /// [`ReplyBatch::commit`]; a buffer left uncommitted is simply reused.
    ///
    /// # Panics
    /// When the batch is full; send it first.
    pub fn next_buf(&mut self) -> &mut Vec<u8> {
        let buf = &mut self.bufs[self.len];
        buf.clear();
        buf
    }

    /// Queues the buffer last returned by [`ReplyBatch::next_buf`] for `to`.
    pub fn commit(&mut self, to: SocketAddr) {
        self.addr_lens[self.len] = write_sockaddr(to, &mut self.addrs[self.len]);
        self.len += 1;
    }

    /// Sends every waiting reply, with as few `sendmmsg` calls as the kernel
    /// allows, and empties the batch. A reply the kernel refuses (an
    /// unreachable address, say) is logged and skipped: one bad destination
    /// never holds up the others.
    ///
    /// # Errors
    /// Only errors that concern the socket itself (`EBADF`, `ENOTSOCK`).
    pub fn send(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        let mut start = 0;
        while start < self.len {
            self.iovecs.clear();
            self.headers.clear();
            for i in start..self.len {
                self.iovecs.push(libc::iovec {
                    iov_base: self.bufs[i].as_mut_ptr().cast(),
                    iov_len: self.bufs[i].len(),
                });
            }
            for (k, i) in (start..self.len).enumerate() {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
                let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
                h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = self.addr_lens[i];
                h.msg_hdr.msg_iov = &mut self.iovecs[k];
                h.msg_hdr.msg_iovlen = 1;
                self.headers.push(h);
            }
            // SAFETY: every header points into `self.iovecs`, `self.addrs`
            // and `self.bufs`, which outlive the call and are not touched
            // during it; the count matches the headers vector.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    self.headers.len() as libc::c_uint,
                    0,
                )
            };
            if sent < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EBADF | libc::ENOTSOCK) => {
                        self.len = 0;
                        return Err(err);
                    }
                    _ => {
                        log::debug!(
                            "reply to {:?} not sent: {err}",
                            read_sockaddr(&self.addrs[start])
                        );
                        start += 1;
                    }
                }
            } else {
                start += sent as usize;
            }
        }
        self.len = 0;
        Ok(())
    }
}

/// Writes `addr` as a C socket address; returns its length.
fn write_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // socket address type, sockaddr_in included.
            let sin =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            sin.sin_zero = [0; 8];
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a C socket address filled in by the kernel, if it is IPv4 or IPv6.
pub fn read_sockaddr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn sockaddr_round_trips() {
        for a in ["127.0.0.1:5555", "[::1]:6666", "[fe80::1%2]:7"] {
            let a: SocketAddr = a.parse().unwrap();
            // SAFETY: all-zero sockaddr_storage is valid.
            let mut s = unsafe { mem::zeroed() };
            write_sockaddr(a, &mut s);
            assert_eq!(read_sockaddr(&s), Some(a));
        }
    }

    #[test]
    fn a_batch_reaches_its_destinations() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = ReplyBatch::with_capacity(4);
        for (sock, text) in [(&a, "one"), (&b, "two"), (&a, "three")] {
            batch.next_buf().extend_from_slice(text.as_bytes());
            batch.commit(sock.local_addr().unwrap());
        }
        batch.send(server.as_fd()).unwrap();
        assert!(batch.is_empty());
        let mut buf = [0; 16];
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"three");
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"two");
    }
}
