//! The worker's loop: read request frames, answer, report completions.

use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};
use netio::ReplyBatch;
use protocol::frame::{self, FrameBuf, ToWorker};
use protocol::{Op, Outcome, ReplyContext};

use crate::handoff::Handoff;

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
    ignore_terminal_signals();
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
    loop {
        let n = match io::Read::read(&mut requests, inbox.spare()) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot read the request pipe"),
        };
        if n == 0 {
            inbox.finish().context("request pipe")?;
            log::debug!("worker {pid}: request pipe closed, exiting");
            return Ok(());
        }
        inbox.filled(n);
        while let Some(ToWorker::Request {
            seq,
            client,
            payload,
        }) = inbox.next_to_worker().context("request pipe")?
        {
            worker.answer(seq, client, payload)?;
        }
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
            crate::perform_effect(&parsed, self.fault_injection);
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

/// Terminal signals reach the whole process group; the master decides what
/// they mean (drain on SIGINT, reload on SIGHUP, scale on SIGTTIN/SIGTTOU),
/// so a worker ignores them and waits for its pipe to close.
fn ignore_terminal_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code, so nothing runs in
        // signal context.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
}
