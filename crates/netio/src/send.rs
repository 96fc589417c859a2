//! Datagrams sent in batches with as few `sendmmsg` calls as the kernel
//! allows, from buffers that keep their memory between batches:
//! [`ReplyBatch`] on a server socket, each reply to its own destination,
//! and [`ConnectedSendBatch`], fixed slots on a connected socket.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};

use crate::mmsg::{Outgoing, SendHeaders};
use crate::sockaddr::{empty_storage, read_sockaddr, write_sockaddr};

/// A fixed number of reusable reply buffers and their destinations, sent
/// together. Buffers keep their capacity between batches, so a steady
/// stream of replies allocates nothing.
pub struct ReplyBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    /// The length of each address; 0 sends to the socket's peer.
    addr_lens: Vec<libc::socklen_t>,
    len: usize,
    headers: SendHeaders,
}

impl ReplyBatch {
    /// A batch of at most `capacity` replies (at least one).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        ReplyBatch {
            bufs: (0..capacity).map(|_| Vec::with_capacity(256)).collect(),
            addrs: vec![empty_storage(); capacity],
            addr_lens: vec![0; capacity],
            len: 0,
            headers: SendHeaders::with_capacity(capacity),
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

    /// The reply committed last, while it waits to be sent (`None` when
    /// the batch is empty): what a duplicate request cache keeps.
    pub fn last(&self) -> Option<&[u8]> {
        self.len.checked_sub(1).map(|i| &self.bufs[i][..])
    }

    /// Queues the buffer last returned by [`ReplyBatch::next_buf`] for the
    /// socket's peer: the tests fill a connected socket with it.
    #[cfg(test)]
    fn commit_to_peer(&mut self) {
        self.addr_lens[self.len] = 0;
        self.len += 1;
    }

    /// Sends every waiting reply, with as few `sendmmsg` calls as the kernel
    /// allows, and empties the batch. A reply the kernel refuses (an
    /// unreachable address, say) is logged and skipped: one bad destination
    /// never holds up the others. On a blocking socket this waits for room
    /// in the socket's send buffer.
    ///
    /// # Errors
    /// Only errors that concern the socket itself (`EBADF`, `ENOTSOCK`).
    pub fn send(&mut self, socket: impl AsFd) -> io::Result<()> {
        self.send_with(socket.as_fd(), 0).map(|_dropped| ())
    }

    /// Sends every waiting reply like [`ReplyBatch::send`], and empties the
    /// batch, but never waits (`MSG_DONTWAIT`): when the socket's send buffer
    /// is full (`EAGAIN`), the replies not yet sent are dropped. Returns how
    /// many were dropped that way.
    ///
    /// # Errors
    /// Only errors that concern the socket itself (`EBADF`, `ENOTSOCK`).
    pub fn send_nonblocking(&mut self, socket: impl AsFd) -> io::Result<usize> {
        self.send_with(socket.as_fd(), libc::MSG_DONTWAIT)
    }

    /// Sends the batch with `flags`; returns how many replies were dropped
    /// for a full send buffer (only with `MSG_DONTWAIT`).
    fn send_with(&mut self, socket: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<usize> {
        let mut start = 0;
        let mut dropped = 0;
        while start < self.len {
            let (bufs, addrs, lens) = (&self.bufs, &self.addrs, &self.addr_lens);
            let msgs = (start..self.len).map(|i| Outgoing {
                bytes: &bufs[i],
                to: (lens[i] > 0).then(|| (&addrs[i], lens[i])),
            });
            match self.headers.send(socket, msgs, flags) {
                Ok(sent) => start += sent,
                Err(err) => match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EBADF | libc::ENOTSOCK) => {
                        self.len = 0;
                        return Err(err);
                    }
                    Some(libc::EAGAIN) if flags & libc::MSG_DONTWAIT != 0 => {
                        // The send buffer is full: so it is for the rest.
                        dropped += self.len - start;
                        break;
                    }
                    _ => {
                        log::debug!(
                            "reply to {:?} not sent: {err}",
                            read_sockaddr(&self.addrs[start])
                        );
                        start += 1;
                    }
                },
            }
        }
        self.len = 0;
        Ok(dropped)
    }
}

/// `capacity` fixed slots of `slot` bytes, sent in order on a connected,
/// non-blocking socket. Slots are filled by index and kept until
/// overwritten, so a batch that went out only in part can be sent again.
pub struct ConnectedSendBatch {
    slot: usize,
    bufs: Vec<u8>,
    lens: Vec<usize>,
    headers: SendHeaders,
}

impl ConnectedSendBatch {
    /// Room for `capacity` datagrams of up to `slot` bytes each.
    pub fn new(capacity: usize, slot: usize) -> Self {
        ConnectedSendBatch {
            slot,
            bufs: vec![0; capacity * slot],
            lens: vec![0; capacity],
            headers: SendHeaders::with_capacity(capacity),
        }
    }

    /// How many slots the batch has.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// The buffer of slot `i`, to render a datagram into.
    ///
    /// # Panics
    /// When `i` is not below the capacity.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * self.slot..(i + 1) * self.slot]
    }

    /// Sets how many bytes of slot `i` are the datagram.
    ///
    /// # Panics
    /// When `len` is larger than a slot.
    pub fn set_len(&mut self, i: usize, len: usize) {
        assert!(
            len <= self.slot,
            "{len} bytes do not fit a {} byte slot",
            self.slot
        );
        self.lens[i] = len;
    }

    /// Sends slots `0..n` (at most the capacity) on the connected socket, in
    /// order, with one `sendmmsg`, and returns how many were sent; the rest
    /// stay for a later call.
    ///
    /// # Errors
    /// The socket's error when nothing was sent: `WouldBlock` when its send
    /// buffer is full, `ConnectionRefused` for a pending port-unreachable,
    /// `Interrupted`.
    pub fn send(&mut self, socket: impl AsFd, n: usize) -> io::Result<usize> {
        let n = n.min(self.capacity());
        let (bufs, lens, slot) = (&self.bufs, &self.lens, self.slot);
        let msgs = (0..n).map(|i| Outgoing {
            bytes: &bufs[i * slot..i * slot + lens[i]],
            to: None,
        });
        self.headers.send(socket.as_fd(), msgs, libc::MSG_DONTWAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    /// A connected datagram pair whose sender's buffer fills after a few
    /// kilobytes: Unix datagrams stay charged to the sender until read.
    fn small_unix_pair() -> (UnixDatagram, UnixDatagram) {
        let (tx, rx) = UnixDatagram::pair().unwrap();
        nix::sys::socket::setsockopt(&tx, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
        (tx, rx)
    }

    /// Reads what is queued on `rx` without waiting.
    fn drain(rx: &UnixDatagram) -> Vec<Vec<u8>> {
        rx.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0; 2048];
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
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
        assert_eq!(batch.len(), 3);
        batch.send(&server).unwrap();
        assert!(batch.is_empty());
        let mut buf = [0; 16];
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"three");
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"two");
    }

    #[test]
    fn a_refused_destination_is_skipped() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = ReplyBatch::with_capacity(4);
        // An IPv6 destination on an IPv4 socket: EAFNOSUPPORT.
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        for (to, text) in [(a.local_addr().unwrap(), "one"), (v6, "lost")] {
            batch.next_buf().extend_from_slice(text.as_bytes());
            batch.commit(to);
        }
        batch.next_buf().extend_from_slice(b"two");
        batch.commit(a.local_addr().unwrap());
        assert!(!batch.is_full());
        batch.next_buf().extend_from_slice(b"three");
        batch.commit(v6);
        assert!(batch.is_full());
        assert_eq!(batch.send_nonblocking(&server).unwrap(), 0);
        assert!(batch.is_empty());
        let mut buf = [0; 16];
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"one");
        let n = a.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"two");
    }

    #[test]
    fn sending_without_blocking_counts_what_a_full_buffer_dropped() {
        let (tx, rx) = small_unix_pair();
        let mut batch = ReplyBatch::with_capacity(64);
        for i in 0..64 {
            let buf = batch.next_buf();
            buf.extend_from_slice(format!("reply {i:02} ").as_bytes());
            buf.resize(1000, b'.');
            batch.commit_to_peer();
        }
        let dropped = batch.send_nonblocking(&tx).unwrap();
        assert!(batch.is_empty());
        let got = drain(&rx);
        assert!(dropped > 0, "the buffer never filled");
        assert_eq!(got.len() + dropped, 64);
        // What went out went in order, from the first.
        for (i, d) in got.iter().enumerate() {
            assert!(d.starts_with(format!("reply {i:02} ").as_bytes()));
        }
        // Once drained, the socket takes replies again.
        batch.next_buf().extend_from_slice(b"again");
        batch.commit_to_peer();
        assert_eq!(batch.send_nonblocking(&tx).unwrap(), 0);
        assert_eq!(drain(&rx), [b"again".to_vec()]);
    }

    #[test]
    fn a_socket_error_is_returned_and_empties_the_batch() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let mut batch = ReplyBatch::with_capacity(2);
        batch.next_buf().push(b'x');
        batch.commit("127.0.0.1:9".parse().unwrap());
        let err = batch.send(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTSOCK));
        assert!(batch.is_empty());
    }

    #[test]
    fn slots_cross_a_connected_loopback_pair() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = ConnectedSendBatch::new(4, 16);
        assert_eq!(out.send(&a, 0).unwrap(), 0);
        for i in 0..3 {
            let msg = format!("msg {i}");
            out.slot_mut(i)[..msg.len()].copy_from_slice(msg.as_bytes());
            out.set_len(i, msg.len());
        }
        assert_eq!(out.send(&a, 3).unwrap(), 3);
        // Slots are kept: the first one again.
        assert_eq!(out.send(&a, 1).unwrap(), 1);
        let mut buf = [0; 16];
        for want in ["msg 0", "msg 1", "msg 2", "msg 0"] {
            let n = b.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want.as_bytes());
        }
    }

    #[test]
    fn a_full_connected_socket_sends_part_then_would_block() {
        let (tx, rx) = small_unix_pair();
        let mut out = ConnectedSendBatch::new(64, 1000);
        for i in 0..64 {
            out.set_len(i, 1000);
        }
        let sent = out.send(&tx, 64).unwrap();
        assert!(sent > 0 && sent < 64, "sent {sent}");
        let err = out.send(&tx, 64 - sent).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(drain(&rx).len(), sent);
    }
}
