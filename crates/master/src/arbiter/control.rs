//! Signals and phases: boot, serve, drain (TERM/INT), stop (QUIT, a second
//! TERM/INT, the graceful timeout), and their deadlines.

use std::os::fd::AsFd;
use std::time::Instant;

use anyhow::{bail, Context};
use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};

use super::{Arbiter, Phase, BOOT_TIMEOUT, QUIT_GRACE, TOKEN_UDP};
use crate::cli::MAX_WORKERS;
use crate::exit::ExitReason;
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
    /// Starts the initial workers; serves at once without a pool.
    pub(super) fn start_pool(&mut self) -> anyhow::Result<()> {
        for _ in 0..self.target {
            self.spawn_one().context("cannot start the worker pool")?;
        }
        if self.target == 0 {
            self.start_serving()?;
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
                        StopAction::Drain => self.begin_drain(sig),
                        StopAction::StopNow => {
                            log::warn!("{sig}: stopping at once");
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

    /// TERM/INT: stop reading, and let every worker answer what it holds
    /// (its request pipe closes once its queued frames are written).
    fn begin_drain(&mut self, sig: Signal) {
        log::info!(
            "{sig}: draining {} workers (graceful timeout {:?})",
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

    fn stop_reading(&mut self) {
        if matches!(self.phase, Phase::Running) {
            let _ = self.epoll.delete(self.responder.socket.as_fd());
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
                    self.start_serving()?;
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
            Phase::Running | Phase::Stopped => {}
        }
        Ok(())
    }

    fn start_serving(&mut self) -> anyhow::Result<()> {
        self.phase = Phase::Running;
        self.epoll
            .add(
                self.responder.socket.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_UDP),
            )
            .context("epoll_ctl")?;
        self.group.start()?;
        let pids: Vec<String> = self.slots.iter().map(|s| s.pid.to_string()).collect();
        log::info!(
            "listening on {} with {} (pid {}{})",
            self.local_addr()
                .map_or_else(|_| self.cfg.bind.to_string(), |a| a.to_string()),
            match self.cfg.workers {
                0 => "no pool: answering inline".to_owned(),
                n => format!("{n} workers"),
            },
            self.master_pid,
            if pids.is_empty() {
                String::new()
            } else {
                format!("; workers {}", pids.join(" "))
            }
        );
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
