//! Datagrams received in batches with one `recvmmsg` each, into slots
//! allocated once: [`RecvBatch`] on a server socket, where each datagram's
//! sender matters, and [`ConnectedRecvBatch`] on a connected socket, where
//! the sender is always the peer and the arrival time matters instead.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use crate::mmsg::{RecvSlots, Senders, Timestamps};

/// One received datagram, borrowed from a [`RecvBatch`].
pub struct Datagram<'a> {
    /// Who sent it.
    pub from: SocketAddr,
    /// Its bytes, cut at the slot size when `truncated`.
    pub payload: &'a [u8],
    /// The datagram was longer than the slot.
    pub truncated: bool,
}

/// Preallocated slots for receiving up to `capacity` datagrams per call on
/// an unconnected socket, each with its sender. The default batch has no
/// room and receives nothing.
#[derive(Default)]
pub struct RecvBatch {
    slots: RecvSlots,
}

impl RecvBatch {
    /// Room for `capacity` datagrams of up to `slot` bytes each; a longer
    /// datagram is cut and flagged `truncated`.
    pub fn new(capacity: usize, slot: usize) -> Self {
        RecvBatch {
            slots: RecvSlots::new(capacity, slot, Senders::Record, Timestamps::Skip),
        }
    }

    /// Receives whatever is queued, up to the capacity, without blocking.
    /// Returns how many datagrams arrived (0 when none was waiting).
    ///
    /// # Errors
    /// Socket errors other than "nothing to read" and interruptions.
    pub fn recv(&mut self, socket: impl AsFd) -> io::Result<usize> {
        self.slots.recv(socket.as_fd())
    }

    /// How many datagrams the last [`RecvBatch::recv`] took.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the last [`RecvBatch::recv`] took nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The datagrams of the last [`RecvBatch::recv`] (one whose sender is
    /// not an IPv4 or IPv6 address is skipped).
    pub fn iter(&self) -> impl Iterator<Item = Datagram<'_>> {
        (0..self.slots.len()).filter_map(move |i| {
            Some(Datagram {
                from: self.slots.sender(i)?,
                payload: self.slots.payload(i),
                truncated: self.slots.truncated(i),
            })
        })
    }
}

/// Preallocated slots for receiving up to `capacity` datagrams per call on
/// a connected socket: no senders are recorded, and each datagram keeps
/// the kernel's arrival time when the socket has `SO_TIMESTAMPNS` on.
pub struct ConnectedRecvBatch {
    slots: RecvSlots,
}

impl ConnectedRecvBatch {
    /// Room for `capacity` datagrams of up to `slot` bytes each.
    pub fn new(capacity: usize, slot: usize) -> Self {
        ConnectedRecvBatch {
            slots: RecvSlots::new(capacity, slot, Senders::Skip, Timestamps::Keep),
        }
    }

    /// Receives whatever is queued, up to the capacity, without blocking.
    /// Returns how many datagrams arrived (0 when none was waiting).
    ///
    /// # Errors
    /// Socket errors other than "nothing to read" and interruptions:
    /// `ConnectionRefused` for a pending port-unreachable (which the call
    /// also clears).
    pub fn recv(&mut self, socket: impl AsFd) -> io::Result<usize> {
        self.slots.recv(socket.as_fd())
    }

    /// How many datagrams the last [`ConnectedRecvBatch::recv`] took.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the last [`ConnectedRecvBatch::recv`] took nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Datagram `i` of the last [`ConnectedRecvBatch::recv`], or `None` if
    /// it did not fit in its slot (or there is no such datagram).
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        if i >= self.len() || self.slots.truncated(i) {
            return None;
        }
        Some(self.slots.payload(i))
    }

    /// When datagram `i` of the last [`ConnectedRecvBatch::recv`] arrived,
    /// as the kernel stamped it (`CLOCK_REALTIME`, nanoseconds), if it did.
    pub fn arrival_ns(&self, i: usize) -> Option<u64> {
        if i >= self.len() {
            return None;
        }
        self.slots.arrival_ns(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Receives until `want` datagrams came or a second passed.
    fn recv_until(want: usize, mut recv: impl FnMut() -> usize) -> usize {
        let mut got = 0;
        for _ in 0..200 {
            got += recv();
            if got >= want {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    }

    #[test]
    fn nothing_queued_is_zero_not_an_error() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = RecvBatch::new(4, 64);
        assert_eq!(batch.recv(&s).unwrap(), 0);
        assert!(batch.is_empty());
        assert_eq!(batch.iter().count(), 0);
        let mut default = RecvBatch::default();
        assert_eq!(default.recv(&s).unwrap(), 0);
    }

    #[test]
    fn datagrams_come_with_senders_and_truncation_flagged() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = server.local_addr().unwrap();
        a.send_to(b"short", to).unwrap();
        b.send_to(b"exactly8", to).unwrap();
        a.send_to(b"longer than eight bytes", to).unwrap();
        let mut batch = RecvBatch::new(4, 8);
        let mut got = Vec::new();
        recv_until(3, || {
            let n = batch.recv(&server).unwrap();
            assert_eq!(batch.len(), n);
            got.extend(
                batch
                    .iter()
                    .map(|d| (d.from, d.payload.to_vec(), d.truncated)),
            );
            n
        });
        let (a, b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        assert_eq!(
            got,
            [
                (a, b"short".to_vec(), false),
                (b, b"exactly8".to_vec(), false),
                (a, b"longer t".to_vec(), true),
            ]
        );
    }

    #[test]
    fn a_connected_batch_flags_truncation_and_keeps_arrival_times() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        nix::sys::socket::setsockopt(&b, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
            .unwrap();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        a.send(b"fits").unwrap();
        a.send(b"does not fit").unwrap();
        let mut batch = ConnectedRecvBatch::new(4, 8);
        let mut got = Vec::new();
        recv_until(2, || {
            let n = batch.recv(&b).unwrap();
            for i in 0..n {
                let at = batch.arrival_ns(i).expect("a kernel timestamp");
                assert!(
                    at >= before && at < before + 10_000_000_000,
                    "{at} vs {before}"
                );
                got.push(batch.get(i).map(<[u8]>::to_vec));
            }
            n
        });
        assert_eq!(got, [Some(b"fits".to_vec()), None]);
        assert_eq!(batch.get(2), None);
        assert_eq!(batch.arrival_ns(2), None);
    }
}
