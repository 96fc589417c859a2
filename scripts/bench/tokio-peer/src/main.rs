//! tokio-peer: the benchmark's outside reference point.
//!
//! The server a Rust user could write in an afternoon instead of udp-pool:
//! a tokio runtime reads the UDP socket and hands every datagram to
//! `spawn_blocking`, whose pool is capped at `--threads` (4) threads; the
//! blocking task answers with `protocol::answer` (the same function the
//! udp-pool workers call) and sends the reply itself, carrying its thread
//! id where udp-pool puts a worker pid. No isolation: one panic or one
//! `crash` would take the whole server down, so `crash` and `sleep` are
//! refused like udp-pool's inline mode does.
//!
//! usage: tokio-peer --bind 127.0.0.1:PORT [--threads 4]

use std::net::SocketAddr;
use std::sync::Arc;

use protocol::answer::{self, Effect, Host, Verdict};
use protocol::ReplyContext;
use tokio::net::UdpSocket;

struct Blocking {
    buf: Vec<u8>,
}

impl Host for Blocking {
    type Error = std::convert::Infallible;

    fn perform(&mut self, effect: Effect) -> Result<Verdict, Self::Error> {
        Ok(Verdict::Refused(match effect {
            Effect::Sleep { .. } => "sleep is not offered by this peer",
            Effect::Crash => "crash is not offered by this peer",
        }))
    }

    fn reply_buf(&mut self) -> Result<&mut Vec<u8>, Self::Error> {
        self.buf.clear();
        Ok(&mut self.buf)
    }
}

fn args() -> Result<(SocketAddr, usize), String> {
    let mut bind = None;
    let mut threads = 4;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--bind" => bind = Some(v.parse().map_err(|e| format!("--bind {v}: {e}"))?),
            "--threads" => threads = v.parse().map_err(|e| format!("--threads {v}: {e}"))?,
            _ => return Err(format!("unknown option {a}")),
        }
    }
    Ok((bind.ok_or("--bind ADDR:PORT is required")?, threads))
}

fn main() {
    let (bind, threads) = args().unwrap_or_else(|e| {
        eprintln!("tokio-peer: {e}");
        std::process::exit(2);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(bind));
}

async fn serve(bind: SocketAddr) {
    let sock = Arc::new(UdpSocket::bind(bind).await.expect("bind"));
    eprintln!("tokio-peer: listening on {}", sock.local_addr().expect("addr"));
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            got = sock.recv_from(&mut buf) => {
                let Ok((n, client)) = got else { continue };
                let datagram = buf[..n].to_vec();
                let sock = Arc::clone(&sock);
                tokio::task::spawn_blocking(move || reply(&sock, &datagram, client));
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
}

fn reply(sock: &UdpSocket, datagram: &[u8], client: SocketAddr) {
    thread_local! {
        static HOST: std::cell::RefCell<Blocking> =
            std::cell::RefCell::new(Blocking { buf: Vec::with_capacity(2048) });
    }
    let ctx = ReplyContext {
        worker_pid: thread_id(),
        client,
    };
    HOST.with(|h| {
        let host = &mut *h.borrow_mut();
        if let Ok(Some(done)) = answer::answer(datagram, &ctx, usize::MAX, host) {
            if done.outcome.sent() {
                let _ = sock.try_send_to(&host.buf, client);
            }
        }
    });
}

/// The kernel's id of this thread (what `ps -L` shows), where udp-pool
/// names the worker's pid.
fn thread_id() -> u32 {
    // SAFETY: gettid takes no arguments, cannot fail and touches no memory.
    unsafe { libc_gettid() as u32 }
}

extern "C" {
    #[link_name = "gettid"]
    fn libc_gettid() -> i32;
}
