//! The worker's loop: read request frames, answer, report completions.

use std::io::{self, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};
use netio::ReplyBatch;
use protocol::frame::{self, FrameBuf, ToWorker};
use protocol::ReplyContext;

use crate::signals;
use protocol::answer::{self, Effect, Host, Verdict};
use protocol::handoff::Handoff;

/// Replies sent per `sendmmsg`, and completions per pipe write.
const BATCH: usize = 64;

/// Serves requests from the master until it closes the request pipe.
/// Once it has started (signals set up) and before it writes READY, it
/// confines itself to its seccomp filter if the hand-off says so.
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
        sent_at: None,
    };
    // From here on a worker only reads, computes, sends, sleeps and stops:
    // everything it had to open or set up is done. It is confined before
    // it says READY, so a worker the master counts as ready is filtered.
    if handoff.seccomp {
        crate::sandbox::confine().context("cannot install the seccomp filter")?;
    }
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
                reply_limit,
                keep_reply,
                client,
                payload,
            }) = inbox.next_to_worker().context("request pipe")?
            else {
                break;
            };
            worker.answer(seq, client, reply_limit, keep_reply, payload)?;
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
    /// Where in `done` the batch's SENT_AT frame is, once it has a DONE.
    sent_at: Option<usize>,
}

impl Worker {
    /// Answers one request, its reply held to `reply_limit` bytes (the
    /// master's amplification bound for its source); with `keep_reply`
    /// the completion carries the reply back (the master's duplicate
    /// request cache keeps it). A request abandoned on `QUIT` gets neither
    /// a reply nor a completion, so the master answers it.
    fn answer(
        &mut self,
        seq: u64,
        client: std::net::SocketAddr,
        reply_limit: u32,
        keep_reply: bool,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let ctx = ReplyContext {
            worker_pid: self.pid,
            client,
        };
        let Some(done) = answer::answer(payload, &ctx, reply_limit as usize, self)? else {
            return Ok(());
        };
        if self.sent_at.is_none() {
            self.sent_at = Some(self.done.len());
            frame::encode_sent_at(0, &mut self.done);
        }
        let sent = done.outcome.sent();
        if sent {
            self.replies.commit(client);
        }
        if keep_reply {
            let reply = if sent { self.replies.last() } else { None };
            frame::encode_done_with_reply(
                seq,
                done.op,
                done.outcome,
                done.id,
                reply.unwrap_or_default(),
                &mut self.done,
            );
        } else {
            frame::encode_done(seq, done.op, done.outcome, done.id, &mut self.done);
        }
        Ok(())
    }

    /// Sends the waiting replies, then reports them done, with the time
    /// they left (SENT_AT): a completion never reaches the master before
    /// its reply has left, and the master may read it later without
    /// changing the request's latency.
    fn flush(&mut self) -> anyhow::Result<()> {
        self.replies
            .send(self.socket.as_fd())
            .context("cannot send replies")?;
        if let Some(at) = self.sent_at.take() {
            frame::stamp_sent_at(&mut self.done, at, netio::monotonic_us());
        }
        if !self.done.is_empty() {
            self.completions
                .write_all(&self.done)
                .context("cannot write the completion pipe")?;
            self.done.clear();
        }
        Ok(())
    }
}

impl Host for Worker {
    type Error = anyhow::Error;

    /// `sleep` blocks this worker (cut short by `QUIT`); `crash` aborts it
    /// when fault injection is on. Either way the replies gathered so far
    /// leave first.
    fn perform(&mut self, effect: Effect) -> anyhow::Result<Verdict> {
        Ok(match effect {
            // A sleep holds a worker's slot: anyone could fill the pool
            // with them, so it is a test operation like `crash`.
            Effect::Sleep { .. } if !self.fault_injection => Verdict::Refused(
                "op sleep is disabled (start master with --enable-fault-injection)",
            ),
            Effect::Sleep { ms } => {
                self.flush()?;
                if signals::sleep_unless_quit(std::time::Duration::from_millis(ms)) {
                    Verdict::Done
                } else {
                    Verdict::Abandoned
                }
            }
            Effect::Crash if self.fault_injection => {
                self.flush()?;
                log::warn!("crash requested (fault injection): aborting");
                std::process::abort();
            }
            Effect::Crash => Verdict::Refused(
                "op crash is disabled (start master with --enable-fault-injection)",
            ),
        })
    }

    fn reply_buf(&mut self) -> anyhow::Result<&mut Vec<u8>> {
        if self.replies.is_full() {
            self.flush()?;
        }
        Ok(self.replies.next_buf())
    }
}
