//! Socket addresses between Rust and the kernel: a [`SocketAddr`] written
//! into a `sockaddr_storage` for `sendmmsg`, and one the kernel filled in
//! for `recvmmsg` read back.

use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV6};

/// A `sockaddr_storage` of all zeros (family `AF_UNSPEC`).
pub(crate) fn empty_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

/// Writes `addr` into `out` as a C socket address and returns its length,
/// the `msg_namelen` to send it with.
pub fn write_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // socket address type, sockaddr_in included, and the borrow of
            // `out` is exclusive.
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

/// Reads a C socket address, as the kernel fills it in; `None` unless it is
/// IPv4 or IPv6.
pub fn read_sockaddr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for one.
            let sin =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
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

    #[test]
    fn addresses_round_trip() {
        for a in ["127.0.0.1:5555", "0.0.0.0:0", "[::1]:6666", "[fe80::1%2]:7"] {
            let a: SocketAddr = a.parse().unwrap();
            let mut s = empty_storage();
            let len = write_sockaddr(a, &mut s);
            let want = match a {
                SocketAddr::V4(_) => mem::size_of::<libc::sockaddr_in>(),
                SocketAddr::V6(_) => mem::size_of::<libc::sockaddr_in6>(),
            };
            assert_eq!(len as usize, want);
            assert_eq!(read_sockaddr(&s), Some(a));
        }
    }

    #[test]
    fn flow_info_survives() {
        let a = SocketAddr::V6(SocketAddrV6::new("::1".parse().unwrap(), 9, 0x12345, 0));
        let mut s = empty_storage();
        write_sockaddr(a, &mut s);
        assert_eq!(read_sockaddr(&s), Some(a));
    }

    #[test]
    fn other_families_are_not_read() {
        let mut s = empty_storage();
        assert_eq!(read_sockaddr(&s), None);
        s.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(read_sockaddr(&s), None);
    }
}
