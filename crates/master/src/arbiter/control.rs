//! Signals and phases: boot, stand by (a master started by `USR2`), serve,
//! drain (TERM/INT, or handed over), stop (QUIT, a second TERM/INT, the
//! graceful timeout), and their deadlines.

use std::os::fd::AsFd;
use std::time::Instant;

use anyhow::{bail, Context};
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};

use super::{Arbiter, Phase, BOOT_TIMEOUT, QUIT_GRACE, TOKEN_HANDOVER, TOKEN_UDP};
use crate::cli::MAX_WORKERS;
use crate::exit::ExitReason;
use crate::notify;
use crate::pool::SlotState;

/// What a TERM, INT or QUIT asks of the master in its current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopAction {
    /// Stop reading; workers answer what they hold, then exit.
    Drain,
    /// Workers stop after the batch in progress; `KILL` after a grace.
    StopNow,
    /// Already stopping: `KILL` every worker now.
    KillNow,
}

/// TERM and INT drain, and stop at once when repeated; QUIT stops at once;
/// any of them while already stopping kills.
fn stop_action(phase: Phase, sig: Signal) -> StopAction {
    match (phase, sig) {
        (Phase::Stopping { .. } | Phase::Stopped, _) => StopAction::KillNow,
        (_, Signal::SIGQUIT) | (Phase::Draining { .. }, _) => StopAction::StopNow,
        _ => StopAction::Drain,
    }
}

/// The pool size after TTIN (one more) or TTOU (one fewer), within 1 and
/// [`MAX_WORKERS`] (the bounds of `--workers` with a pool); `None` at a bound.
fn resized(target: usize, sig: Signal) -> Option<usize> {
    match sig {
        Signal::SIGTTIN if target < usize::from(MAX_WORKERS) => Some(target + 1),
        Signal::SIGTTOU if target > 1 => Some(target - 1),
        _ => None,
    }
}

impl Arbiter {
    /// Starts the initial workers; without a pool, boot is done at once.
    pub(super) fn start_pool(&mut self) -> anyhow::Result<()> {
        for _ in 0..self.target {
            self.spawn_one().context("cannot start the worker pool")?;
        }
        if self.target == 0 {
            self.boot_done()?;
        }
        Ok(())
    }

    /// Acts on every pending signal, the way gunicorn does. Stopping sends
    /// workers their signals; reaping and retiring are other steps' work.
    pub(super) fn handle_signals(&mut self) {
        if !self.ready.signals {
            return;
        }
        while let Some(sig) = self.signals.take() {
            match sig {
                Signal::SIGCHLD => self.reap_due = true,
                Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => {
                    match stop_action(self.phase, sig) {
                        StopAction::Drain => {
                            self.notify(&[notify::State::Stopping]);
                            self.begin_drain(sig.as_ref());
                        }
                        StopAction::StopNow => {
                            log::warn!("{sig}: stopping at once");
                            self.notify(&[notify::State::Stopping]);
                            self.stop_now();
                        }
                        StopAction::KillNow => {
                            log::warn!("{sig} while stopping: killing every worker");
                            for slot in &self.slots {
                                let _ = kill(slot.pid, Signal::SIGKILL);
                            }
                        }
                    }
                }
                Signal::SIGHUP => self.reload(),
                // The hand-over step starts the new master.
                Signal::SIGUSR2 => self.replace_requested = true,
                Signal::SIGTTIN | Signal::SIGTTOU if self.accepting() && self.cfg.workers > 0 => {
                    // manage_workers starts one, or retires the oldest.
                    match resized(self.target, sig) {
                        Some(n) => {
                            self.target = n;
                            log::info!("{sig}: pool size {n}");
                        }
                        None => log::info!(
                            "{sig} ignored: the pool stays within 1 and {MAX_WORKERS} workers"
                        ),
                    }
                }
                other => log::debug!("ignoring {other}"),
            }
        }
    }

    /// SIGHUP: start a fresh worker for every current one; each old worker
    /// keeps serving until a new one is ready, then retires.
    fn reload(&mut self) {
        if !matches!(self.phase, Phase::Running) || self.cfg.workers == 0 {
            return;
        }
        let mut n = 0;
        for slot in &mut self.slots {
            if slot.is_active() {
                slot.replace_pending = true;
                n += 1;
            }
        }
        log::info!("SIGHUP: replacing {n} workers");
    }

    /// TERM/INT, or handed over to a new master: stop reading, and let
    /// every worker answer what it holds (its request pipe closes once its
    /// queued frames are written). `why` starts the log line.
    pub(super) fn begin_drain(&mut self, why: &str) {
        log::info!(
            "{why}: draining {} workers (graceful timeout {:?})",
            self.slots.len(),
            self.cfg.graceful_timeout
        );
        self.stop_reading();
        self.group.leave();
        self.phase = Phase::Draining {
            deadline: Instant::now() + self.cfg.graceful_timeout,
        };
        for i in 0..self.slots.len() {
            self.retire(i, ExitReason::Stop);
        }
    }

    /// QUIT, a second TERM/INT, or the graceful timeout: stop reading, close
    /// every request pipe, and send every worker `QUIT` (it finishes the
    /// batch of replies in progress, abandons the rest and exits). What
    /// each one held is answered as it is reaped; a worker still alive at
    /// the deadline gets `KILL`.
    fn stop_now(&mut self) {
        self.stop_reading();
        self.group.leave();
        self.phase = Phase::Stopping {
            kill_at: Instant::now() + QUIT_GRACE,
        };
        for slot in &mut self.slots {
            slot.close_requests();
            if !matches!(slot.state, SlotState::Killed(_)) {
                slot.state = SlotState::Killed(ExitReason::Stop);
                let _ = kill(slot.pid, Signal::SIGQUIT);
            }
        }
    }

    /// Takes the socket out of the loop's wait set (it may be out already:
    /// a master that handed over took it out then).
    pub(super) fn stop_reading(&mut self) {
        if matches!(self.phase, Phase::Running) {
            let _ = self.epoll.delete(self.responder.socket.as_fd());
        }
    }

    /// Tells the service manager `states`, unless this master is not the
    /// service's main process: it has handed over, or (started by `USR2`)
    /// has not taken over yet.
    pub(super) fn notify(&self, states: &[notify::State]) {
        if self.handed_over_to.is_none() && self.predecessor.is_none() {
            notify::send(states);
        }
    }

    /// Ends the boot phase once every initial worker is ready, or fails the
    /// start if they are not ready in time; ends a drain at its deadline;
    /// kills workers that did not stop on `QUIT`; ends the loop when no
    /// worker is left.
    pub(super) fn check_phase_deadlines(&mut self, now: Instant) -> anyhow::Result<()> {
        match self.phase {
            Phase::Booting { deadline } => {
                if self.slots.iter().all(|s| s.state == SlotState::Ready) {
                    self.boot_done()?;
                } else if now >= deadline {
                    bail!(
                        "workers ({}) did not report ready within {} s",
                        self.cfg.worker_path.display(),
                        BOOT_TIMEOUT.as_secs()
                    );
                }
            }
            Phase::Draining { deadline } => {
                if self.slots.is_empty() {
                    self.phase = Phase::Stopped;
                } else if now >= deadline {
                    log::warn!(
                        "graceful timeout: stopping {} workers that are still busy",
                        self.slots.len()
                    );
                    self.stop_now();
                }
            }
            Phase::Stopping { kill_at } => {
                if self.slots.is_empty() {
                    self.phase = Phase::Stopped;
                } else if now >= kill_at {
                    log::warn!(
                        "killing {} workers that did not stop on SIGQUIT",
                        self.slots.len()
                    );
                    for slot in &self.slots {
                        let _ = kill(slot.pid, Signal::SIGKILL);
                    }
                    self.phase = Phase::Stopping {
                        kill_at: now + QUIT_GRACE,
                    };
                }
            }
            Phase::Standby { deadline } => {
                if now >= deadline {
                    bail!(
                        "master {} did not hand over the socket within {:?} of this one's workers \
                         being ready",
                        self.predecessor.as_ref().map_or(0, |p| p.pid),
                        self.cfg.handover_timeout
                    );
                }
            }
            Phase::Running | Phase::Stopped => {}
        }
        Ok(())
    }

    /// The initial workers are ready: serve, or, in a master started by
    /// `USR2`, tell the old master and wait for its `go`.
    fn boot_done(&mut self) -> anyhow::Result<()> {
        let Some(predecessor) = &self.predecessor else {
            return self.start_serving();
        };
        let from = predecessor.pid;
        if let Err(e) = predecessor.say_ready() {
            // It is gone, or gave up on this one: the hand-over step reads
            // the closed channel and finds out which.
            log::warn!("cannot tell master {from} this one is ready: {e}");
        }
        self.epoll
            .add(
                predecessor.channel(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_HANDOVER),
            )
            .context("epoll_ctl")?;
        self.phase = Phase::Standby {
            deadline: Instant::now() + self.cfg.handover_timeout,
        };
        log::info!(
            "{}; waiting for master {from} to hand over the socket",
            match self.slots.len() {
                0 => "ready (no pool)".to_owned(),
                n => format!("{n} workers ready"),
            }
        );
        Ok(())
    }

    /// Starts reading the socket.
    pub(super) fn start_serving(&mut self) -> anyhow::Result<()> {
        self.phase = Phase::Running;
        self.epoll
            .add(
                self.responder.socket.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UDP),
            )
            .context("epoll_ctl")?;
        self.group.start()?;
        let pids: Vec<String> = self.slots.iter().map(|s| s.pid.to_string()).collect();
        let addr = self
            .local_addr()
            .map_or_else(|_| self.cfg.bind.to_string(), |a| a.to_string());
        let pool = match self.cfg.workers {
            0 => "no pool: answering inline".to_owned(),
            n => format!("{n} workers"),
        };
        log::info!(
            "listening on {addr} with {pool} (pid {}{}; {})",
            self.master_pid,
            if pids.is_empty() {
                String::new()
            } else {
                format!("; workers {}", pids.join(" "))
            },
            self.socket_origin
        );
        self.notify(&[
            notify::State::Ready,
            notify::State::Status(&format!("listening on {addr} with {pool}")),
        ]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn term_drains_then_stops_then_kills() {
        let t = Instant::now();
        let running = Phase::Running;
        let draining = Phase::Draining { deadline: t };
        let stopping = Phase::Stopping { kill_at: t };
        assert_eq!(stop_action(running, Signal::SIGTERM), StopAction::Drain);
        assert_eq!(stop_action(running, Signal::SIGINT), StopAction::Drain);
        assert_eq!(
            stop_action(Phase::Booting { deadline: t }, Signal::SIGTERM),
            StopAction::Drain
        );
        assert_eq!(stop_action(draining, Signal::SIGTERM), StopAction::StopNow);
        assert_eq!(stop_action(stopping, Signal::SIGTERM), StopAction::KillNow);
    }

    #[test]
    fn ttin_and_ttou_stop_at_the_bounds_of_workers() {
        let max = usize::from(MAX_WORKERS);
        assert_eq!(resized(4, Signal::SIGTTIN), Some(5));
        assert_eq!(resized(max - 1, Signal::SIGTTIN), Some(max));
        assert_eq!(resized(max, Signal::SIGTTIN), None);
        assert_eq!(resized(2, Signal::SIGTTOU), Some(1));
        assert_eq!(resized(1, Signal::SIGTTOU), None);
    }

    #[test]
    fn quit_stops_at_once_in_any_phase() {
        let t = Instant::now();
        assert_eq!(
            stop_action(Phase::Running, Signal::SIGQUIT),
            StopAction::StopNow
        );
        assert_eq!(
            stop_action(Phase::Draining { deadline: t }, Signal::SIGQUIT),
            StopAction::StopNow
        );
        assert_eq!(
            stop_action(Phase::Stopping { kill_at: t }, Signal::SIGQUIT),
            StopAction::KillNow
        );
    }
}
