//! `USR2`: replacing this master with nothing lost, as nginx upgrades its
//! binary ([`crate::replace`] has the protocol).
//!
//! In the old master: start the new one, keep serving while it boots; when
//! it says `ready`, stop reading, tell it `go`, and drain (every worker
//! answers what it holds; the journal gets every row), then exit 0. When it
//! fails, closes the channel, or is not ready within `--handover-timeout`,
//! kill it (it has read nothing) and keep serving. In the new master:
//! after `ready`, wait for `go`, then read.

use std::os::fd::AsFd;
use std::time::Instant;

use anyhow::bail;
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};

use super::{Arbiter, Phase, TOKEN_HANDOVER, TOKEN_UDP};
use crate::notify;
use crate::replace::{self, Heard};

impl Arbiter {
    /// The hand-over step: in a new master, the old one's `go`; in an old
    /// one, a `USR2` to act on, the new master's readiness or failure, and
    /// the drain once it has taken over.
    ///
    /// # Errors
    /// In a new master, when the old one said something else than `go`,
    /// or closed the channel and still runs (it gave up on this one).
    pub(super) fn hand_over(&mut self, now: Instant) -> anyhow::Result<()> {
        self.await_go()?;
        if std::mem::take(&mut self.replace_requested) {
            self.start_replacement(now);
        }
        self.watch_successor(now);
        self.retire_after_handover();
        Ok(())
    }

    /// A new master on stand-by: on `go`, read the socket. An old master
    /// that is gone without a word (it crashed) leaves the socket to this
    /// one too; one that is alive and closed the channel has given up on it.
    fn await_go(&mut self) -> anyhow::Result<()> {
        if !matches!(self.phase, Phase::Booting { .. } | Phase::Standby { .. }) {
            // Stopped before the hand-over (TERM): the old master sees the
            // channel close and keeps serving.
            if let Some(p) = self.predecessor.take() {
                let _ = self.epoll.delete(p.channel());
            }
            return Ok(());
        }
        if !self.ready.handover || !matches!(self.phase, Phase::Standby { .. }) {
            return Ok(());
        }
        let Some(p) = self.predecessor.as_mut() else {
            return Ok(());
        };
        let from = p.pid;
        match p.hear() {
            Heard::Nothing => return Ok(()),
            Heard::Line => log::info!("master {from} handed over the socket"),
            Heard::Closed => {
                if nix::unistd::getppid().as_raw() as u32 == from {
                    bail!("master {from} closed the hand-over channel: it keeps serving");
                }
                log::warn!("master {from} is gone without handing over: serving in its place");
                notify::send(&[notify::State::MainPid(self.master_pid)]);
            }
            Heard::Broken(why) => bail!("master {from} broke the hand-over ({why})"),
        }
        if let Some(p) = self.predecessor.take() {
            let _ = self.epoll.delete(p.channel());
        }
        self.start_serving()
    }

    /// `USR2`: start the `master` executable found now, with this master's
    /// arguments, the socket and a channel; it has `--handover-timeout` to
    /// be ready. Meanwhile this master serves as before.
    fn start_replacement(&mut self, now: Instant) {
        if let Some(s) = &self.successor {
            log::warn!(
                "SIGUSR2 ignored: master {} is already starting to replace this one",
                s.pid
            );
            return;
        }
        if let Some(to) = self.handed_over_to {
            log::warn!("SIGUSR2 ignored: this master has handed over to master {to}");
            return;
        }
        if self.phase != Phase::Running {
            log::warn!("SIGUSR2 ignored: this master is not serving");
            return;
        }
        // A successor would bind this master's cluster port (held) or
        // another one (and, with no --join, found a group of its own), and
        // would be a new member with an empty Raft log either way: a member
        // is upgraded by stopping it and starting the new binary.
        if let Some(g) = &self.cfg.group {
            let port = self.group.published().map_or(g.cluster_addr, |p| p.cluster);
            log::warn!(
                "SIGUSR2 ignored: a member of a group (cluster port {port}) is not replaced in \
                 place; stop it (TERM) and start the new binary, the group admits it again \
                 (docs/CLUSTER.md); this master keeps serving"
            );
            return;
        }
        let path = &self.cfg.master_path;
        let started = replace::start_successor(
            path,
            &self.cfg.master_args,
            self.responder.socket.as_fd(),
            self.master_pid,
            now + self.cfg.handover_timeout,
        );
        let successor = match started {
            Ok(s) => s,
            Err(e) => {
                log::error!(
                    "SIGUSR2: cannot start a new master {}: {e}; this one keeps serving",
                    path.display()
                );
                return;
            }
        };
        if let Err(e) = self.epoll.add(
            successor.channel(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_HANDOVER),
        ) {
            log::error!("SIGUSR2: epoll_ctl: {e}; this master keeps serving");
            let _ = kill(successor.pid, Signal::SIGKILL);
            return;
        }
        log::info!(
            "SIGUSR2: started master {} ({}); it has {:?} to be ready, this one serves meanwhile",
            successor.pid,
            path.display(),
            self.cfg.handover_timeout
        );
        notify::reloading();
        self.successor = Some(successor);
    }

    /// The new master's progress: `ready` hands over; a garbled line, its
    /// end (once reaped, so that the log says how it ended), the deadline
    /// or a stop of this master roll back.
    fn watch_successor(&mut self, now: Instant) {
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        if self.phase != Phase::Running {
            return self.roll_back("was abandoned: this master is stopping");
        }
        let heard = if self.ready.handover && !s.closed {
            s.hear()
        } else {
            Heard::Nothing
        };
        let why = match heard {
            Heard::Line => return self.commit_handover(now),
            Heard::Broken(why) => format!("broke the hand-over ({why})"),
            Heard::Closed | Heard::Nothing => {
                if heard == Heard::Closed {
                    // It is ending: wait for its exit status, without
                    // waking on the closed channel meanwhile.
                    let _ = self.epoll.delete(s.channel());
                    s.closed = true;
                }
                match s.exit {
                    Some(exit) => format!("ended ({}) before it was ready", exit.text()),
                    None if now < s.deadline => return,
                    None if s.closed => "closed the hand-over channel and did not exit".to_owned(),
                    None => format!(
                        "was not ready within {:?} (--handover-timeout)",
                        self.cfg.handover_timeout
                    ),
                }
            }
        };
        self.roll_back(&why);
    }

    /// The replacement failed: kill the new master (it has read nothing:
    /// it waits for `go` before it reads) and keep serving.
    fn roll_back(&mut self, why: &str) {
        let Some(s) = self.successor.take() else {
            return;
        };
        // Not reaped yet, so its PID is still its own.
        if s.exit.is_none() {
            let _ = kill(s.pid, Signal::SIGKILL);
        }
        let _ = self.epoll.delete(s.channel());
        log::warn!(
            "SIGUSR2: new master {} {why}; this master ({}) keeps serving",
            s.pid,
            self.master_pid
        );
        if self.phase == Phase::Running {
            self.notify(&[
                notify::State::Ready,
                notify::State::Status(&format!("replacement failed: master {} {why}", s.pid)),
            ]);
        }
    }

    /// The new master is ready: stop reading, name it to the service
    /// manager, then tell it `go`. From here on it reads the socket and
    /// this master only finishes what it read. `MAINPID` goes before `go`
    /// because the new master says `READY=1` once it has heard `go`, and
    /// systemd must know it as the main process by then (with
    /// `NotifyAccess=main` it would drop that `READY=1`).
    fn commit_handover(&mut self, now: Instant) {
        let Some(s) = self.successor.take() else {
            return;
        };
        let _ = self.epoll.delete(s.channel());
        self.stop_reading();
        self.notify(&[notify::State::MainPid(s.pid.as_raw() as u32)]);
        if let Err(e) = s.say_go() {
            // It is gone: this master is the main process again, and reads
            // again, as if nothing happened.
            self.notify(&[notify::State::MainPid(self.master_pid)]);
            self.successor = Some(s);
            if let Err(add) = self.epoll.add(
                self.responder.socket.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UDP),
            ) {
                log::error!("epoll_ctl: {add}");
            }
            self.roll_back(&format!("could not be told to take over ({e})"));
            return;
        }
        self.handed_over_to = Some(s.pid);
        let held: usize = self.slots.iter().map(|w| w.inflight.len()).sum();
        log::info!(
            "handed over to master {} in {} ms: this master reads no more and stops once its \
             workers have answered the {held} requests they hold ({} queued)",
            s.pid,
            now.duration_since(s.started).as_millis(),
            self.dispatcher.len()
        );
    }

    /// Once handed over and every request read is placed on a worker,
    /// drain: the workers answer what they hold and exit, then this master.
    fn retire_after_handover(&mut self) {
        if let Some(to) = self.handed_over_to {
            if self.phase == Phase::Running && self.dispatcher.is_empty() {
                self.begin_drain(&format!("handed over to master {to}"));
            }
        }
    }
}
