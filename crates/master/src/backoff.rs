//! Crash-loop detection and the respawn back-off (Erlang's restart
//! intensity and period, systemd's `RestartSteps`): workers that die before
//! serving a single request, too many of them in a window, mean a broken
//! build or environment, and starting more at once only burns the CPU.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// More early deaths than this (or than the pool size, if larger) within
/// [`WINDOW`] start the back-off.
pub const INTENSITY: usize = 5;
/// How far back early deaths count.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The first delay; each further early death doubles it.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest delay.
pub const CAP: Duration = Duration::from_secs(10);

/// The crash-loop detector.
#[derive(Debug, Default)]
pub struct CrashLoop {
    early_deaths: VecDeque<Instant>,
    backoff: Duration,
    next_spawn_at: Option<Instant>,
}

impl CrashLoop {
    /// Counts a worker that died having served nothing, in a pool of
    /// `pool_size`. Returns the new delay when this death starts or extends
    /// a back-off.
    pub fn note_early_death(&mut self, now: Instant, pool_size: usize) -> Option<Duration> {
        self.early_deaths.push_back(now);
        while self
            .early_deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > WINDOW)
        {
            self.early_deaths.pop_front();
        }
        if self.early_deaths.len() <= INTENSITY.max(pool_size) {
            self.backoff = Duration::ZERO;
            self.next_spawn_at = None;
            return None;
        }
        self.backoff = if self.backoff.is_zero() {
            FIRST
        } else {
            (self.backoff * 2).min(CAP)
        };
        self.next_spawn_at = Some(now + self.backoff);
        Some(self.backoff)
    }

    /// Early deaths within the window, as last counted.
    pub fn recent(&self) -> usize {
        self.early_deaths.len()
    }

    /// Whether a worker may be started now.
    pub fn allows_spawn(&self, now: Instant) -> bool {
        self.next_spawn_at.is_none_or(|t| now >= t)
    }

    /// When the back-off ends, if one holds.
    pub fn next_spawn_at(&self) -> Option<Instant> {
        self.next_spawn_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_early_deaths_start_no_backoff() {
        let mut c = CrashLoop::default();
        let t = Instant::now();
        for _ in 0..INTENSITY {
            assert_eq!(c.note_early_death(t, 4), None);
        }
        assert!(c.allows_spawn(t));
    }

    #[test]
    fn the_backoff_doubles_to_its_cap() {
        let mut c = CrashLoop::default();
        let t = Instant::now();
        for _ in 0..INTENSITY {
            c.note_early_death(t, 1);
        }
        let mut delays = Vec::new();
        for _ in 0..10 {
            delays.extend(c.note_early_death(t, 1));
        }
        assert_eq!(delays[0], FIRST);
        assert_eq!(delays[1], FIRST * 2);
        assert_eq!(*delays.last().unwrap(), CAP);
        assert!(!c.allows_spawn(t));
        assert!(c.allows_spawn(t + CAP));
    }

    #[test]
    fn a_large_pool_tolerates_as_many_deaths_as_workers() {
        let mut c = CrashLoop::default();
        let t = Instant::now();
        for _ in 0..8 {
            assert_eq!(c.note_early_death(t, 8), None);
        }
        assert_eq!(c.note_early_death(t, 8), Some(FIRST));
    }

    #[test]
    fn deaths_outside_the_window_are_forgotten() {
        let mut c = CrashLoop::default();
        let t = Instant::now();
        for _ in 0..=INTENSITY {
            c.note_early_death(t, 1);
        }
        assert!(!c.allows_spawn(t));
        let later = t + WINDOW + Duration::from_secs(1);
        assert_eq!(c.note_early_death(later, 1), None);
        assert_eq!(c.recent(), 1);
        assert!(c.allows_spawn(later));
    }
}
