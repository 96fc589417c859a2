//! The workers: what they wrote, how they ended, how long they take, how
//! many there are, and starting them.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use protocol::frame::ToMaster;

use super::{Arbiter, Phase, FIRST_WORKER_TOKEN};
use crate::exit::{ChildExit, ExitReason};
use crate::journal;
use crate::pool::{self, Settlement, SlotState, WorkerSlot};
use crate::spawn::spawn_worker;

impl Arbiter {
    /// Reads what the workers whose completion pipe is readable wrote:
    /// READY (the worker serves), STOPPING (it got TERM: `manage_workers`
    /// retires it), DONE (a request answered: counted and journaled, its
    /// reply kept by the duplicate request cache if it came back), and
    /// the end of the stream (the worker is gone: reaping settles it).
    ///
    /// Read: the pipes epoll reported, and those that do not wake the
    /// master ([`pool::completions_wake`]) when they are due
    /// ([`pool::completions_due`]): a busy worker's once it holds a
    /// request for [`pool::READ_AFTER`] or half its room, all of them at a
    /// sweep, while requests wait for room, or with `all` (before a
    /// `stats` reply, which counts what was answered).
    pub(super) fn read_completions(&mut self, all: bool) {
        let now = Instant::now();
        let reported = &self.ready.completions;
        let all = all || self.ready.sweep || !self.dispatcher.is_empty();
        let after = pool::READ_AFTER.min(self.cfg.request_timeout / 2);
        let max_inflight = self.cfg.max_inflight;
        for slot in self.slots.iter_mut() {
            let due = reported.contains(&slot.serial)
                || (!slot.wakes && pool::completions_due(slot, now, after, max_inflight, all));
            if !due {
                continue;
            }
            let pid = slot.pid.as_raw() as u32;
            let Some(fd) = slot.completions.as_ref() else {
                continue;
            };
            match nix::unistd::read(fd.as_raw_fd(), slot.inbox.spare()) {
                Ok(0) => {
                    if let Err(e) = slot.inbox.finish() {
                        log::warn!("worker {pid}: completion pipe: {e}");
                    }
                    slot.completions = None;
                    self.reap_due = true;
                    continue;
                }
                Ok(n) => slot.inbox.filled(n),
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(e) => {
                    log::warn!("worker {pid}: cannot read its completion pipe: {e}");
                    slot.completions = None;
                    continue;
                }
            }
            loop {
                match slot.inbox.next_to_master() {
                    Ok(None) => break,
                    Ok(Some(ToMaster::Ready { .. })) => {
                        if slot.state == SlotState::Booting {
                            slot.state = SlotState::Ready;
                            log::debug!("worker {pid} ready");
                        }
                    }
                    Ok(Some(ToMaster::Stopping { .. })) => {
                        log::info!(
                            "worker {pid} got SIGTERM: retiring it once it has answered what it holds"
                        );
                        slot.stop_requested = true;
                    }
                    Ok(Some(ToMaster::SentAt { mono_us })) => {
                        slot.sent_at = self.monotonic.instant_of(mono_us);
                    }
                    Ok(Some(ToMaster::Done {
                        seq,
                        op,
                        outcome,
                        id,
                        reply,
                    })) => {
                        let Some(pos) = slot.inflight.iter().position(|r| r.seq == seq) else {
                            log::warn!("worker {pid} reported unknown request {seq}");
                            continue;
                        };
                        let req = slot.inflight.remove(pos).expect("position is in range");
                        slot.served += 1;
                        if let Some(token) = req.dedup {
                            match reply {
                                Some(reply) => self.dedup.complete(token, op, outcome, reply, now),
                                None => self.dedup.forget(token),
                            }
                        }
                        // The request ended when its reply left the
                        // worker, however late the master reads this.
                        let ended = slot.sent_at.map_or(now, |t| t.min(now));
                        self.ledger.record(
                            req.client,
                            req.received,
                            op,
                            Some(pid),
                            outcome,
                            id,
                            ended,
                        );
                        self.ledger.recycle(req.payload);
                    }
                    Err(e) => {
                        log::error!("worker {pid} broke the completion framing ({e}): killing it");
                        let _ = kill(slot.pid, Signal::SIGKILL);
                        slot.completions = None;
                        break;
                    }
                }
            }
        }
    }

    /// Reaps every exited child (`waitpid(-1, WNOHANG)` in a loop: signals
    /// coalesce), then settles each worker that is both reaped and read to
    /// the end of its completion stream; one still being read is settled
    /// on a later turn, when its pipe has reached its end.
    pub(super) fn reap_workers(&mut self, now: Instant) -> anyhow::Result<()> {
        if std::mem::take(&mut self.reap_due) {
            loop {
                let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("waitpid"),
                    Ok(s) => s,
                };
                let Some(exit) = ChildExit::from_wait_status(status) else {
                    continue;
                };
                if let Some(slot) = self.slots.iter_mut().find(|s| s.pid == exit.pid) {
                    slot.exit = Some(exit);
                } else if let Some(s) = self.successor.as_mut().filter(|s| s.pid == exit.pid) {
                    // A master started by USR2 that ended before it was
                    // ready: the hand-over step rolls back.
                    s.exit = Some(exit);
                }
            }
        }
        while let Some(i) = self.slots.iter().position(WorkerSlot::settled) {
            self.settle_exit(i, now)?;
        }
        Ok(())
    }

    /// Settles a reaped worker whose completions are all read: books its
    /// exit, answers or re-queues what it still held ([`pool::settle`]),
    /// and tracks crash loops. Fails the start during boot.
    fn settle_exit(&mut self, i: usize, now: Instant) -> anyhow::Result<()> {
        let mut slot = self.slots.swap_remove(i);
        let exit = slot.exit.expect("a settled slot is reaped");
        let reason = match slot.state {
            SlotState::Booting => ExitReason::BootFailure,
            SlotState::Ready => ExitReason::Crash,
            SlotState::Retiring(r) if exit.clean() => r,
            SlotState::Retiring(_) => ExitReason::Crash,
            SlotState::Killed(r) => r,
        };
        self.journal_exit(&slot, exit, reason);
        if matches!(self.phase, Phase::Booting { .. }) && reason == ExitReason::BootFailure {
            bail!(
                "worker {} (pid {}) exited ({}) before it was ready: is --worker-path a udp-pool worker?",
                self.cfg.worker_path.display(),
                slot.pid,
                exit.text()
            );
        }
        if reason.is_crash() {
            self.ledger.totals.crashes += 1;
            if slot.served == 0 {
                if let Some(delay) = self.crash_loop.note_early_death(now, self.target) {
                    log::error!(
                        "crash loop: {} workers died before serving a request in the last {} s; next start in {} ms",
                        self.crash_loop.recent(),
                        crate::backoff::WINDOW.as_secs(),
                        delay.as_millis()
                    );
                }
            }
        }
        // Every completion the worker wrote has been read, so each request
        // left here got no reply from it: answering it now, or handing it to
        // another worker, never answers it twice.
        let held = slot.inflight.len();
        let mut again = 0;
        while let Some(mut req) = slot.inflight.pop_front() {
            match pool::settle(reason, slot.timed_out, &req) {
                Settlement::Answer(code) => self.fail(req, code, now),
                Settlement::Redispatch(if_unplaced) => {
                    req.redispatched |= reason.is_crash();
                    self.dispatcher.push(req, if_unplaced);
                    again += 1;
                }
            }
        }
        self.ledger.totals.redispatched += again;
        let what = match reason {
            ExitReason::BootFailure => "failed to boot",
            r if r.is_crash() => "died",
            _ => "exited",
        };
        let level = if reason.is_crash() {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        log::log!(
            level,
            "worker {} {what}: {} ({}, served {}; {} held: {again} to re-dispatch, {} answered by the master)",
            slot.pid,
            exit.text(),
            reason.as_str(),
            slot.served,
            held,
            held as u64 - again
        );
        Ok(())
    }

    fn journal_exit(&self, slot: &WorkerSlot, exit: ChildExit, reason: ExitReason) {
        if let Some(j) = &self.ledger.journal {
            j.worker_exited(
                slot.pid.as_raw() as u32,
                journal::now_unix_us(),
                exit.code,
                exit.signal,
                slot.served,
                reason,
            );
        }
    }

    /// Kills every worker whose oldest request has waited at it longer than
    /// the request timeout. Nothing is answered yet: once the worker is
    /// reaped and its completions read, that request gets `timeout` and the
    /// ones queued behind it go to other workers.
    pub(super) fn check_timeouts(&mut self, now: Instant) {
        for slot in &mut self.slots {
            if !pool::expired(slot, now, self.cfg.request_timeout) {
                continue;
            }
            log::warn!(
                "worker {} holds a request older than {} ms: killing it ({} more queued behind it go to other workers)",
                slot.pid,
                self.cfg.request_timeout.as_millis(),
                slot.inflight.len() - 1
            );
            let _ = kill(slot.pid, Signal::SIGKILL);
            slot.state = SlotState::Killed(ExitReason::TimeoutKill);
            slot.timed_out = slot.inflight.front().map(|r| r.seq);
            slot.close_requests();
            self.ledger.totals.timeouts += 1;
        }
    }

    /// Brings the pool toward its size ([`pool::plan`]): retires the
    /// workers that asked to stop, spent their budget, were replaced by a
    /// ready worker after SIGHUP, or are one too many after TTOU; starts
    /// the missing ones unless stopping or backing off after a crash loop.
    pub(super) fn manage_workers(&mut self, now: Instant) {
        if !self.accepting() || self.cfg.workers == 0 {
            return;
        }
        let plan = pool::plan(&self.slots, self.target);
        for (i, reason) in plan.retire {
            self.retire(i, reason);
        }
        for _ in 0..plan.spawn {
            if !self.crash_loop.allows_spawn(now) {
                break;
            }
            if let Err(e) = self.spawn_one() {
                log::error!("cannot start a worker: {e:#}");
                self.crash_loop.note_early_death(now, self.target);
                break;
            }
            self.ledger.totals.restarts += 1;
            self.spawned_this_turn += 1;
        }
    }

    /// Stops giving work to worker `i`; it exits once it has answered what
    /// it holds (the flush step closes its request pipe after the frames
    /// already queued for it).
    pub(super) fn retire(&mut self, i: usize, reason: ExitReason) {
        let slot = &mut self.slots[i];
        if matches!(slot.state, SlotState::Booting | SlotState::Ready) {
            log::debug!("retiring worker {} ({})", slot.pid, reason.as_str());
            slot.state = SlotState::Retiring(reason);
            slot.replace_pending = false;
        }
    }

    /// Sets which completion pipes wake the master ([`pool::completions_wake`]):
    /// an `epoll_ctl` only when a worker's answer changes (it starts
    /// serving, is asked to stop, exits) or the master starts or stops
    /// waiting for room.
    pub(super) fn arm_completions(&mut self) {
        let master_waits = !self.reading() || !self.dispatcher.is_empty();
        for slot in &mut self.slots {
            let wakes = pool::completions_wake(slot, master_waits);
            if wakes == slot.wakes {
                continue;
            }
            let Some(fd) = slot.completions.as_ref() else {
                continue;
            };
            let flags = if wakes {
                EpollFlags::EPOLLIN
            } else {
                EpollFlags::empty()
            };
            let mut event = EpollEvent::new(flags, FIRST_WORKER_TOKEN + 2 * slot.serial);
            match self.epoll.modify(fd, &mut event) {
                Ok(()) => slot.wakes = wakes,
                Err(e) => log::warn!("worker {}: epoll_ctl on its completion pipe: {e}", slot.pid),
            }
        }
    }

    /// Writes queued frames to every worker whose request pipe has room, and
    /// closes the pipe of a retiring worker once everything queued for it
    /// is written.
    pub(super) fn flush_requests(&mut self) {
        for slot in &mut self.slots {
            flush_slot(slot);
        }
    }

    pub(super) fn spawn_one(&mut self) -> anyhow::Result<()> {
        let spawned = spawn_worker(
            &self.cfg.worker_path,
            self.responder.socket.as_fd(),
            self.master_pid,
            self.cfg.fault_injection,
            &self.cfg.confinement,
        )
        .with_context(|| {
            let path = self.cfg.worker_path.display();
            match self.cfg.confinement.credentials {
                Some(c) => format!(
                    "cannot start worker {path} as uid {} gid {} (that user must be able to \
                     execute it and reach its directory)",
                    c.uid, c.gid
                ),
                None => format!("cannot start worker {path}"),
            }
        })?;
        let serial = self.next_serial;
        self.next_serial += 1;
        let token = FIRST_WORKER_TOKEN + 2 * serial;
        self.epoll
            .add(
                &spawned.completions,
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            )
            .context("epoll_ctl")?;
        self.epoll
            .add(
                &spawned.requests,
                EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, token + 1),
            )
            .context("epoll_ctl")?;
        let request_limit = match self.cfg.max_requests {
            0 => 0,
            n => n.saturating_add(self.jitter()),
        };
        log::info!("worker {} spawned", spawned.pid);
        if let Some(j) = &self.ledger.journal {
            j.worker_started(spawned.pid.as_raw() as u32, journal::now_unix_us());
        }
        self.slots.push(WorkerSlot::new(
            serial,
            spawned.pid,
            spawned.requests,
            spawned.completions,
            self.cfg.max_inflight,
            request_limit,
            Instant::now(),
        ));
        Ok(())
    }

    fn jitter(&mut self) -> u64 {
        if self.cfg.max_requests_jitter == 0 {
            return 0;
        }
        // xorshift: good enough to spread retirements; not for secrets.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % self.cfg.max_requests_jitter.saturating_add(1).max(1)
    }
}

/// Writes as much of the slot's outbox as its pipe takes; closes the pipe
/// of a retiring worker once everything queued for it is written.
fn flush_slot(slot: &mut WorkerSlot) {
    while slot.outbox_sent < slot.outbox.len() {
        let Some(fd) = slot.requests.as_ref() else {
            break;
        };
        match nix::unistd::write(fd, &slot.outbox[slot.outbox_sent..]) {
            Ok(n) => slot.outbox_sent += n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return,
            Err(e) => {
                // EPIPE: the worker is dead; reaping settles its requests.
                log::debug!("worker {}: request pipe: {e}", slot.pid);
                slot.close_requests();
                return;
            }
        }
    }
    slot.outbox.clear();
    slot.outbox_sent = 0;
    if matches!(slot.state, SlotState::Retiring(_)) {
        slot.requests = None;
    }
}

/// Places a worker's `CLOCK_MONOTONIC` time (a SENT_AT frame) on the
/// master's `Instant`s, which read the same clock: one pair of readings
/// taken together when the master starts.
pub(super) struct Monotonic {
    at: Instant,
    us: u64,
}

impl Monotonic {
    pub(super) fn now() -> Monotonic {
        Monotonic {
            at: Instant::now(),
            us: netio::monotonic_us(),
        }
    }

    /// The instant of `mono_us`; `None` for a time the master cannot
    /// place (0: the worker could not read its clock).
    pub(super) fn instant_of(&self, mono_us: u64) -> Option<Instant> {
        if mono_us == 0 {
            return None;
        }
        if mono_us >= self.us {
            self.at
                .checked_add(Duration::from_micros(mono_us - self.us))
        } else {
            self.at
                .checked_sub(Duration::from_micros(self.us - mono_us))
        }
    }
}
