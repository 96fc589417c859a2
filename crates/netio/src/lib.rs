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
