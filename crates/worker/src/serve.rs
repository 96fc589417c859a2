//! The worker's loop: read request frames, answer, report completions.

use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};
use netio::ReplyBatch;
use protocol::frame::{self, FrameBuf, ToWorker};
use protocol::{Op, Outcome, ReplyContext};

use crate::handoff::Handoff;
use crate::signals;

/// Replies sent per `sendmmsg`, and completions per pipe write.
const BATCH: usize = 64;

/// Serves requests from the master until it closes the request pipe.
///
/// # Errors
/// When the master is not this process's parent, when a pipe or the socket
/// fails, or when the request stream breaks the framing.
pub fn run(handoff: Handoff) -> anyhow::Result<()> {
    if nix::unistd::getppid().as_raw() as u32 != handoff.master {
        bail!("master {} is gone: exiting", handoff.master);
    }
    crate::signals::install().context("cannot set up signals")?;
    // SAFETY: the master cleared close-on-exec on exactly these three
    // descriptors for this process, and nothing else in it owns them.
    let (socket, requests, completions) = unsafe {
        (
            OwnedFd::from_raw_fd(handoff.socket),
            std::fs::File::from(OwnedFd::from_raw_fd(handoff.requests)),
            std::fs::File::from(OwnedFd::from_raw_fd(handoff.completions)),
        )
    };
    let pid = std::process::id();
    let mut worker = Worker {
        pid,
        fault_injection: handoff.fault_injection,
        socket,
        completions,
        replies: ReplyBatch::with_capacity(BATCH),
        done: Vec::with_capacity(BATCH * 32),
    };
    frame::encode_ready(pid, &mut worker.done);
    worker.flush()?;
    log::debug!("worker {pid} ready");

    let mut requests = requests;
    let mut inbox = FrameBuf::with_capacity(64 * 1024);
    let mut announced_stop = false;
    loop {
        if signals::quit_requested() {
            log::debug!(
                "worker {pid}: SIGQUIT, exiting with {} bytes of requests unread",
                inbox.pending()
            );
            return Ok(());
        }
        if signals::term_requested() && !announced_stop {
            // The master stops giving work and closes the pipe; everything
            // already in it is answered below before the end of stream.
            log::info!("worker {pid}: SIGTERM, answering what it holds, then exiting");
            frame::encode_stopping(pid, &mut worker.done);
            worker.flush()?;
            announced_stop = true;
        }
        let n = match io::Read::read(&mut requests, inbox.spare()) {
            Ok(n) => n,
            // A signal: the top of the loop looks at it.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read the request pipe"),
        };
        if n == 0 {
            inbox.finish().context("request pipe")?;
            log::debug!("worker {pid}: request pipe closed, exiting");
            return Ok(());
        }
        inbox.filled(n);
        while !signals::quit_requested() {
            let Some(ToWorker::Request {
                seq,
                client,
                payload,
            }) = inbox.next_to_worker().context("request pipe")?
            else {
                break;
            };
            worker.answer(seq, client, payload)?;
        }
        // Under QUIT too: replies already made leave with their completions.
        worker.flush()?;
    }
}

/// A worker's reusable state: the socket it replies on, its completion
/// pipe, and the replies and completions not yet sent.
struct Worker {
    pid: u32,
    fault_injection: bool,
    socket: OwnedFd,
    completions: std::fs::File,
    replies: ReplyBatch,
    done: Vec<u8>,
}

impl Worker {
    fn answer(
        &mut self,
        seq: u64,
        client: std::net::SocketAddr,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let Some(parsed) = protocol::parse(payload) else {
            frame::encode_done(seq, Op::Invalid, Outcome::NoReply, b"", &mut self.done);
            return Ok(());
        };
        if crate::blocks(&parsed, self.fault_injection) {
            self.flush()?;
            if !crate::perform_effect(&parsed, self.fault_injection) {
                // Cut short by QUIT: no reply and no completion; the master
                // answers it.
                return Ok(());
            }
        }
        if self.replies.is_full() {
            self.flush()?;
        }
        let ctx = ReplyContext {
            worker_pid: self.pid,
            client,
        };
        let outcome = protocol::write_reply(&parsed, &ctx, self.replies.next_buf());
        self.replies.commit(client);
        let id = parsed.id.unwrap_or("").as_bytes();
        frame::encode_done(seq, parsed.op(), outcome, id, &mut self.done);
        Ok(())
    }

    /// Sends the waiting replies, then reports them done: a completion never
    /// reaches the master before its reply has left.
    fn flush(&mut self) -> anyhow::Result<()> {
        self.replies
            .send(self.socket.as_fd())
            .context("cannot send replies")?;
        if !self.done.is_empty() {
            self.completions
                .write_all(&self.done)
                .context("cannot write the completion pipe")?;
            self.done.clear();
        }
        Ok(())
    }
}
