//! The core every batch shares: message headers pointed at buffers, and the
//! `recvmmsg` and `sendmmsg` calls themselves. The public types in
//! [`crate::recv`] and [`crate::send`] decide what to do with the results.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::sockaddr::{empty_storage, read_sockaddr};

/// A message header with every field zero.
fn empty_header() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data (integers and raw pointers); all-zero
    // is a valid value, with null pointers and zero lengths.
    unsafe { mem::zeroed() }
}

/// Room for one control message carrying a `timespec` (`SCM_TIMESTAMPNS`),
/// with the alignment control messages need.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Whether a receive batch records who sent each datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Senders {
    /// An unconnected socket: the sender is where the reply goes.
    Record,
    /// A connected socket: the sender is always the peer.
    Skip,
}

/// Whether a receive batch keeps room for the kernel's arrival timestamp
/// of each datagram (the socket must have `SO_TIMESTAMPNS` on).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timestamps {
    /// Room for one `SCM_TIMESTAMPNS` per datagram.
    Keep,
    /// No control messages.
    Skip,
}

/// `capacity` receive slots of `slot` bytes each, with the headers the
/// kernel reads and fills.
///
/// The headers are pointed at the buffers once, in [`RecvSlots::new`]. That
/// holds because every vector here is allocated at its final length there
/// and never grows or shrinks afterwards: moving the struct moves only the
/// vectors' handles, never the heap memory the headers point into.
#[derive(Default)]
pub(crate) struct RecvSlots {
    slot: usize,
    bufs: Vec<u8>,
    iovecs: Vec<libc::iovec>,
    senders: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    headers: Vec<libc::mmsghdr>,
    /// Datagrams the last receive took.
    count: usize,
}

impl RecvSlots {
    pub(crate) fn new(
        capacity: usize,
        slot: usize,
        senders: Senders,
        timestamps: Timestamps,
    ) -> Self {
        let capacity = if slot == 0 { 0 } else { capacity };
        let mut s = RecvSlots {
            slot,
            bufs: vec![0; capacity * slot],
            iovecs: Vec::with_capacity(capacity),
            senders: match senders {
                Senders::Record => vec![empty_storage(); capacity],
                Senders::Skip => Vec::new(),
            },
            controls: match timestamps {
                Timestamps::Keep => vec![Control([0; 64]); capacity],
                Timestamps::Skip => Vec::new(),
            },
            headers: vec![empty_header(); capacity],
            count: 0,
        };
        for chunk in s.bufs.chunks_exact_mut(slot.max(1)) {
            s.iovecs.push(libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            });
        }
        for (i, (h, iov)) in s.headers.iter_mut().zip(s.iovecs.iter_mut()).enumerate() {
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(addr) = s.senders.get_mut(i) {
                h.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            }
            if let Some(c) = s.controls.get_mut(i) {
                h.msg_hdr.msg_control = c.0.as_mut_ptr().cast();
            }
        }
        s
    }

    /// Receives whatever is queued on `socket`, up to the capacity, without
    /// blocking, and returns how many datagrams arrived (0 when none was
    /// waiting). An interrupted call is retried.
    pub(crate) fn recv(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        self.count = 0;
        if self.headers.is_empty() {
            return Ok(0);
        }
        // The kernel overwrote these lengths with the ones it used last time.
        let name_len = if self.senders.is_empty() {
            0
        } else {
            mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t
        };
        let control_len = if self.controls.is_empty() {
            0
        } else {
            mem::size_of::<Control>()
        };
        for h in &mut self.headers {
            h.msg_hdr.msg_namelen = name_len;
            h.msg_hdr.msg_controllen = control_len as _;
        }
        loop {
            // SAFETY: each header points at its own iovec, sender storage and
            // control buffer, each iovec at its own `slot` bytes of `bufs`,
            // with lengths that match (see `new`); all of it is owned by
            // `self`, which the `&mut` keeps alive and untouched for the
            // call. The count is the headers vector's length; no timeout.
            let got = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    self.headers.len() as libc::c_uint,
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
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(err),
            }
        }
    }

    /// Datagrams the last [`RecvSlots::recv`] took.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The bytes of datagram `i`, cut at the slot size.
    pub(crate) fn payload(&self, i: usize) -> &[u8] {
        let len = (self.headers[i].msg_len as usize).min(self.slot);
        let start = i * self.slot;
        &self.bufs[start..start + len]
    }

    /// Whether datagram `i` was longer than its slot.
    pub(crate) fn truncated(&self, i: usize) -> bool {
        self.headers[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }

    /// Who sent datagram `i`, if senders are recorded and it is IPv4 or
    /// IPv6.
    pub(crate) fn sender(&self, i: usize) -> Option<SocketAddr> {
        if self.headers[i].msg_hdr.msg_namelen == 0 {
            return None;
        }
        read_sockaddr(self.senders.get(i)?)
    }

    /// When datagram `i` arrived as the kernel stamped it
    /// (`CLOCK_REALTIME`, nanoseconds), if timestamps are kept and it did.
    pub(crate) fn arrival_ns(&self, i: usize) -> Option<u64> {
        if self.controls.is_empty() {
            return None;
        }
        let h = &self.headers[i].msg_hdr;
        // SAFETY: `h` is a header the last recvmmsg filled in; its control
        // pointer and length describe `controls[i]`, owned by `self` and
        // borrowed here, and the CMSG macros stay within msg_controllen.
        // The data is read unaligned, as it may be.
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
}

/// One datagram to send: its bytes and, on an unconnected socket, where to
/// (a C address and its length).
pub(crate) struct Outgoing<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) to: Option<(&'a libc::sockaddr_storage, libc::socklen_t)>,
}

/// The headers of one `sendmmsg`, kept between calls so that building them
/// allocates nothing.
#[derive(Default)]
pub(crate) struct SendHeaders {
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl SendHeaders {
    /// Room for `capacity` datagrams per call.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        SendHeaders {
            iovecs: Vec::with_capacity(capacity),
            headers: Vec::with_capacity(capacity),
        }
    }

    /// Sends `msgs`, in order, with one `sendmmsg` and returns how many the
    /// kernel took; 0 only when there was nothing to send.
    ///
    /// # Errors
    /// The error that stopped the first datagram, interruptions included.
    pub(crate) fn send<'a>(
        &mut self,
        socket: BorrowedFd<'_>,
        msgs: impl IntoIterator<Item = Outgoing<'a>>,
        flags: libc::c_int,
    ) -> io::Result<usize> {
        self.iovecs.clear();
        self.headers.clear();
        for m in msgs {
            self.iovecs.push(libc::iovec {
                iov_base: m.bytes.as_ptr().cast_mut().cast(),
                iov_len: m.bytes.len(),
            });
            let mut h = empty_header();
            if let Some((addr, len)) = m.to {
                h.msg_hdr.msg_name = (addr as *const libc::sockaddr_storage).cast_mut().cast();
                h.msg_hdr.msg_namelen = len;
            }
            h.msg_hdr.msg_iovlen = 1;
            self.headers.push(h);
        }
        if self.headers.is_empty() {
            return Ok(0);
        }
        // Only now that no iovec moves any more can the headers point at them.
        for (h, iov) in self.headers.iter_mut().zip(self.iovecs.iter_mut()) {
            h.msg_hdr.msg_iov = iov;
        }
        // SAFETY: each header points at its own iovec in `self.iovecs`, and
        // its address (if any) at storage `msgs` borrows for 'a; each iovec
        // points at bytes `msgs` borrows for 'a. 'a outlives this call and
        // `self` is borrowed exclusively, so all of it stays valid and
        // unchanged while the kernel reads it (it only reads). The count is
        // the headers vector's length.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                flags,
            )
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }
}
