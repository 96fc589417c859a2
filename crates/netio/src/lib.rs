//! Batched datagram I/O for udp-pool: `recvmmsg` and `sendmmsg` over
//! buffers allocated once and reused, and the conversion between Rust's
//! socket addresses and the kernel's. The master, the workers and the load
//! generator all send and receive through this crate, so every raw pointer
//! handed to the kernel is built, and its validity argued, in one place.
//!
//! # Layout
//! * [`sockaddr`]: `SocketAddr` to and from `sockaddr_storage`
//!   ([`write_sockaddr`], [`read_sockaddr`]).
//! * [`recv`]: [`RecvBatch`], datagrams from a server socket with their
//!   senders and truncation flagged; [`ConnectedRecvBatch`], replies on a
//!   connected socket with the kernel's arrival times.
//! * [`send`]: [`ReplyBatch`], replies each to its own destination;
//!   [`ConnectedSendBatch`], fixed slots sent on a connected socket.
//! * `mmsg` (private): what both directions share: message headers
//!   pointed at the buffers, and the system calls themselves.
//!
//! Sending or receiving a datagram allocates nothing: every buffer and
//! header keeps its memory from one batch to the next.

mod mmsg;
pub mod recv;
pub mod send;
pub mod sockaddr;

pub use recv::{ConnectedRecvBatch, Datagram, RecvBatch};
pub use send::{ConnectedSendBatch, ReplyBatch};
pub use sockaddr::{read_sockaddr, write_sockaddr};

/// `CLOCK_MONOTONIC` in microseconds: one clock for every process of the
/// host, the one Rust's `Instant` reads on Linux. A worker stamps its
/// replies' departure with it (the SENT_AT frame) and the master places
/// that time on its own `Instant`s. 0 if the clock cannot be read (it
/// cannot fail on Linux).
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};

    /// Collects the `.rs` files under `dir`.
    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The architecture invariant: no code outside this crate calls
    /// `recvmmsg` or `sendmmsg`, builds a message header or handles a C
    /// socket address.
    #[test]
    fn only_netio_does_batched_socket_io() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut files = Vec::new();
        for entry in fs::read_dir(crates).unwrap() {
            let dir = entry.unwrap().path();
            if dir.is_dir() && dir.file_name().is_some_and(|n| n != "netio") {
                rust_files(&dir, &mut files);
            }
        }
        let tests = crates.parent().unwrap().join("tests");
        if tests.is_dir() {
            rust_files(&tests, &mut files);
        }
        assert!(files.len() > 10, "too few sources found under {crates:?}");
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            for needle in ["recvmmsg(", "sendmmsg(", "mmsghdr", "sockaddr_storage"] {
                assert!(
                    !text.contains(needle),
                    "{} uses `{needle}`: batched socket I/O belongs in netio",
                    file.display()
                );
            }
        }
    }
}
