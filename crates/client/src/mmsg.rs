//! Batched datagram I/O on connected, non-blocking UDP sockets: one
//! `sendmmsg` sends a batch of requests, one `recvmmsg` takes a batch of
//! replies. The buffers are allocated once and reused, so the load
//! generator's hot path makes no allocation and few system calls.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Datagrams per system call.
pub const BATCH: usize = 64;

/// Room for one request; the longest load request is under 100 bytes.
pub const SEND_SLOT: usize = 128;

/// Room for one reply; larger replies are counted as unmatched.
pub const RECV_SLOT: usize = 2048;

/// Batch buffers for one direction: `BATCH` slots of `slot` bytes each, and
/// the headers the kernel reads or fills.
struct Slots {
    bufs: Box<[u8]>,
    lens: [usize; BATCH],
    slot: usize,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Slots {
    fn new(slot: usize) -> Slots {
        Slots {
            bufs: vec![0u8; BATCH * slot].into_boxed_slice(),
            lens: [0; BATCH],
            slot,
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
        }
    }

    /// Points `n` headers at the first `n` slots, each `len(i)` bytes long.
    fn prepare(&mut self, n: usize, len: impl Fn(usize) -> usize) {
        let base = self.bufs.as_mut_ptr();
        self.iovs.clear();
        for i in 0..n {
            self.iovs.push(libc::iovec {
                // SAFETY: i < BATCH, so the offset stays inside `bufs`.
                iov_base: unsafe { base.add(i * self.slot) }.cast(),
                iov_len: len(i),
            });
        }
        self.hdrs.clear();
        for iov in self.iovs.iter_mut() {
            // SAFETY: mmsghdr is a plain C struct; all zeroes is a valid value
            // (no address, no control data, no flags).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
    }
}

/// Requests waiting to be sent in one `sendmmsg`.
pub struct SendBatch {
    slots: Slots,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            slots: Slots::new(SEND_SLOT),
        }
    }
}

impl SendBatch {
    /// The buffer of slot `i`, to render a request into.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        let s = self.slots.slot;
        &mut self.slots.bufs[i * s..(i + 1) * s]
    }

    /// Sets how many bytes of slot `i` are the request.
    pub fn set_len(&mut self, i: usize, len: usize) {
        self.slots.lens[i] = len;
    }

    /// Sends slots `0..n` on the connected socket `fd`, in order, and returns
    /// how many were sent; the rest stay for a later call.
    ///
    /// # Errors
    /// The socket's error when nothing was sent: `WouldBlock` when its send
    /// buffer is full, `ConnectionRefused` for a pending port-unreachable.
    pub fn send(&mut self, fd: BorrowedFd<'_>, n: usize) -> io::Result<usize> {
        let n = n.min(BATCH);
        if n == 0 {
            return Ok(0);
        }
        let lens = self.slots.lens;
        self.slots.prepare(n, |i| lens[i]);
        // SAFETY: `hdrs` holds n headers, each pointing at one iovec that
        // points inside `bufs`; all of them live until the call returns.
        let r = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                self.slots.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

/// Room for one `SCM_TIMESTAMPNS` control message (a `timespec`), with the
/// alignment control messages need.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Replies taken by one `recvmmsg`, with the kernel's arrival time of each
/// when the socket has `SO_TIMESTAMPNS` on.
pub struct RecvBatch {
    slots: Slots,
    truncated: [bool; BATCH],
    controls: Box<[Control; BATCH]>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            slots: Slots::new(RECV_SLOT),
            truncated: [false; BATCH],
            controls: Box::new([Control([0; 64]); BATCH]),
        }
    }
}

impl RecvBatch {
    /// Receives up to [`BATCH`] datagrams from `fd` without waiting and
    /// returns how many arrived.
    ///
    /// # Errors
    /// `WouldBlock` when none is queued; `ConnectionRefused` for a pending
    /// port-unreachable (which the call also clears).
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        // The headers only change where the kernel writes (lengths, flags),
        // so they are pointed at the buffers once; the control lengths,
        // which the kernel overwrites, are reset every time.
        if self.slots.hdrs.len() != BATCH {
            let slot = self.slots.slot;
            self.slots.prepare(BATCH, |_| slot);
        }
        for (h, c) in self.slots.hdrs.iter_mut().zip(self.controls.iter_mut()) {
            h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = c.0.len() as _;
        }
        // SAFETY: `hdrs` holds BATCH headers, each pointing at one iovec of
        // `slot` writable bytes inside `bufs`; no timeout is passed.
        let r = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.slots.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = r as usize;
        for (i, h) in self.slots.hdrs.iter().take(n).enumerate() {
            self.slots.lens[i] = h.msg_len as usize;
            self.truncated[i] = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        Ok(n)
    }

    /// When datagram `i` of the last [`RecvBatch::recv`] arrived, as the
    /// kernel stamped it (`CLOCK_REALTIME`, nanoseconds), if it did.
    pub fn arrival_ns(&self, i: usize) -> Option<u64> {
        let h = &self.slots.hdrs[i].msg_hdr;
        // SAFETY: `h` is a header the kernel filled in the last recvmmsg; its
        // control pointer and length describe `controls[i]`, and the CMSG
        // macros stay within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_TIMESTAMPNS {
                    let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    return u64::try_from(ts.tv_sec)
                        .ok()?
                        .checked_mul(1_000_000_000)?
                        .checked_add(u64::try_from(ts.tv_nsec).ok()?);
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }

    /// Datagram `i` of the last [`RecvBatch::recv`], or `None` if it did not
    /// fit in its slot.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        if self.truncated[i] {
            return None;
        }
        let s = self.slots.slot;
        Some(&self.slots.bufs[i * s..i * s + self.slots.lens[i]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn batches_cross_a_loopback_pair() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        let mut out = SendBatch::default();
        for i in 0..3 {
            let msg = format!("msg {i}");
            out.slot_mut(i)[..msg.len()].copy_from_slice(msg.as_bytes());
            out.set_len(i, msg.len());
        }
        assert_eq!(out.send(a.as_fd(), 3).unwrap(), 3);
        let mut inb = RecvBatch::default();
        let mut got = Vec::new();
        for _ in 0..100 {
            match inb.recv(b.as_fd()) {
                Ok(n) => got.extend((0..n).map(|i| inb.get(i).unwrap().to_vec())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if got.len() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            got,
            [b"msg 0".to_vec(), b"msg 1".to_vec(), b"msg 2".to_vec()]
        );
        let err = inb.recv(b.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
            .unwrap();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert_eq!(out.send(a.as_fd(), 1).unwrap(), 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(inb.recv(b.as_fd()).unwrap(), 1);
        let at = inb.arrival_ns(0).expect("a kernel timestamp");
        assert!(
            at >= before && at < before + 10_000_000_000,
            "{at} vs {before}"
        );
    }
}
