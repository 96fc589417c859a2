//! The master's hybrid logical clock (HLC, the `uhlc` crate): the causal
//! time that orders the journals of several servers.
//!
//! An HLC stamp is a 64-bit NTP time (32 bits of seconds since the Unix
//! epoch, 32 of fraction) whose lowest 4 bits are a counter. Within one
//! master, stamps only grow (`uhlc` keeps the last one under a mutex). A
//! stamp another server made, and which reached this master through a
//! message, moves this master's clock past it ([`Clock::observe`]), so
//! everything this master stamps afterwards sorts after it, whatever the
//! two wall clocks say. The journal stamps rows with [`Clock::stamp`]; the
//! cluster thread stamps its datagrams with the same clock
//! ([`Clock::hlc`]) and observes the stamps of those it receives.
//!
//! One clock per master, built once at start with [`Clock::for_master`]:
//! a random id (`uhlc::ID::rand`) tells masters apart; the hidden test
//! option `--debug-clock-skew-ms` shifts this process's wall clock (the
//! HLC's physical time and the journal's `ts_us` alike); `--hlc-max-delta-ms`
//! is how far ahead of its own physical time a stamp from elsewhere may be
//! before it is refused.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use uhlc::{HLCBuilder, Timestamp, HLC, ID, NTP64};

/// How far ahead of this master's physical time a remote stamp may be by
/// default: `uhlc`'s own default.
pub const DEFAULT_MAX_DELTA: Duration = Duration::from_millis(500);

/// The largest `--hlc-max-delta-ms`: an hour. A larger delta lets one bad
/// clock drag every server's stamps that far from real time.
pub const MAX_MAX_DELTA_MS: u64 = 3_600_000;

/// The largest `--debug-clock-skew-ms`, either way: a day.
pub const MAX_SKEW_MS: i64 = 86_400_000;

/// Added to this process's wall clock, in microseconds; set once by
/// [`Clock::for_master`]. A static because `uhlc` takes its physical clock
/// as a plain `fn`.
static SKEW_US: AtomicI64 = AtomicI64::new(0);

/// The skew added to this process's wall clock, in microseconds (0 unless
/// `--debug-clock-skew-ms`).
pub fn skew_us() -> i64 {
    SKEW_US.load(Ordering::Relaxed)
}

/// This process's physical time as an NTP64: the system clock plus the
/// debug skew. The physical clock of every [`Clock::for_master`].
pub fn physical_now() -> NTP64 {
    let us = unix_us(SystemTime::now()).saturating_add(skew_us());
    ntp64_from_unix_us(us)
}

/// Unix microseconds of `t` (negative before 1970).
pub(crate) fn unix_us(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
}

/// The NTP64 time of unix microseconds, clamped to what NTP64 can hold
/// (1970 to 2106). Used for rows that carry no stamp (journals older than
/// schema version 3), so they can be merged by their wall time.
pub fn ntp64_from_unix_us(us: i64) -> NTP64 {
    let us = u64::try_from(us).unwrap_or(0);
    let secs = (us / 1_000_000).min(u64::from(u32::MAX));
    // Rounded up, so that converting back gives the same microsecond.
    let frac = ((us % 1_000_000) << 32).div_ceil(1_000_000);
    NTP64((secs << 32) | frac)
}

/// Unix microseconds of an NTP64 time (rounded down).
pub fn unix_us_from_ntp64(t: NTP64) -> i64 {
    let secs = (t.0 >> 32) as i64;
    let frac = ((t.0 & 0xffff_ffff) * 1_000_000) >> 32;
    secs * 1_000_000 + frac as i64
}

/// Why a stamp from elsewhere did not move the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not `uhlc`'s text form `<time>/<id>` (decimal NTP64, hex id).
    #[error("not an HLC stamp (expected <ntp64>/<hex id>, as in a stats reply)")]
    Malformed,
    /// More than the clock's max delta ahead of its physical time.
    #[error("the stamp is {ahead_ms} ms ahead of this clock, more than its max delta ({max_delta_ms} ms)")]
    TooFarAhead {
        /// How far ahead.
        ahead_ms: u64,
        /// The clock's `--hlc-max-delta-ms`.
        max_delta_ms: u64,
    },
}

/// The master's hybrid logical clock: an `Arc<uhlc::HLC>` (shared with the
/// journal's writer thread and the cluster thread) and its physical clock.
#[derive(Clone)]
pub struct Clock {
    hlc: Arc<HLC>,
    physical: fn() -> NTP64,
    max_delta: Duration,
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clock")
            .field("id", &self.id())
            .field("max_delta", &self.max_delta)
            .finish()
    }
}

impl Clock {
    /// The master's clock: a random id, the system clock shifted by
    /// `skew_ms` (which also shifts the journal's wall times: see
    /// [`skew_us`]), and remote stamps accepted up to `max_delta` ahead.
    /// Call once per process: the skew is process-wide.
    ///
    /// # Errors
    /// A skew beyond [`MAX_SKEW_MS`], or a `UHLC_MAX_DELTA_MS` environment
    /// variable that is not a number (`uhlc` would panic on it; its value
    /// is otherwise overridden by `max_delta`).
    pub fn for_master(skew_ms: i64, max_delta: Duration) -> anyhow::Result<Clock> {
        if skew_ms.unsigned_abs() > MAX_SKEW_MS as u64 {
            bail!("--debug-clock-skew-ms {skew_ms}: at most {MAX_SKEW_MS} either way");
        }
        if let Some(v) = std::env::var_os("UHLC_MAX_DELTA_MS") {
            if v.to_str().and_then(|s| s.parse::<u64>().ok()).is_none() {
                bail!(
                    "environment variable UHLC_MAX_DELTA_MS={v:?} is not a number of milliseconds \
                     (the HLC library reads it; use --hlc-max-delta-ms instead)"
                );
            }
        }
        SKEW_US.store(skew_ms * 1000, Ordering::Relaxed);
        Ok(Clock::with_physical(physical_now, max_delta))
    }

    /// A clock over the physical clock `physical`, with a random id; no
    /// process-wide state (tests give each clock its own skewed `fn`).
    pub fn with_physical(physical: fn() -> NTP64, max_delta: Duration) -> Clock {
        let hlc = HLCBuilder::new()
            .with_id(ID::rand())
            .with_clock(physical)
            .with_max_delta(max_delta)
            .build();
        Clock {
            hlc: Arc::new(hlc),
            physical,
            max_delta,
        }
    }

    /// The `uhlc` clock itself, for the cluster thread: stamp each datagram
    /// with `new_timestamp`, and pass each received stamp to
    /// [`Clock::observe`] (rather than to `update_with_timestamp`, which
    /// logs a warning for every refusal: a log line per hostile datagram).
    pub fn hlc(&self) -> &Arc<HLC> {
        &self.hlc
    }

    /// This master's HLC id (lowercase hex, as in its stamps' text form).
    pub fn id(&self) -> ID {
        *self.hlc.get_id()
    }

    /// How far ahead of this clock a remote stamp may be.
    pub fn max_delta(&self) -> Duration {
        self.max_delta
    }

    /// A new stamp: later than every stamp this clock made or observed.
    pub fn now(&self) -> Timestamp {
        self.hlc.new_timestamp()
    }

    /// [`Clock::now`]'s time part, as the journal stores it.
    pub fn stamp(&self) -> u64 {
        self.now().get_time().0
    }

    /// Moves the clock past `stamp`, a stamp made by another server, unless
    /// it is more than the max delta ahead of this clock's physical time.
    ///
    /// # Errors
    /// [`Refusal::TooFarAhead`]; the clock is unchanged.
    pub fn observe(&self, stamp: &Timestamp) -> Result<(), Refusal> {
        // The same test `update_with_timestamp` makes, made first so that a
        // refusal is counted by the caller instead of logged by `uhlc`. Time
        // only moves forward, so a stamp this lets through, uhlc accepts.
        let now = NTP64((self.physical)().0 & !0xf);
        let msg = *stamp.get_time();
        let delta = NTP64::from(self.max_delta);
        if msg > now && msg - now > delta {
            return Err(Refusal::TooFarAhead {
                ahead_ms: (msg - now).to_duration().as_millis() as u64,
                max_delta_ms: self.max_delta.as_millis() as u64,
            });
        }
        // The check above is uhlc's own, so this cannot fail.
        self.hlc
            .update_with_timestamp(stamp)
            .map_err(|_| Refusal::TooFarAhead {
                ahead_ms: 0,
                max_delta_ms: self.max_delta.as_millis() as u64,
            })
    }

    /// [`Clock::observe`] for a stamp in `uhlc`'s text form
    /// (`7386690599959157260/1a2b`), as `stats` replies give it and
    /// requests carry it back.
    ///
    /// # Errors
    /// [`Refusal::Malformed`] or [`Refusal::TooFarAhead`].
    pub fn observe_text(&self, text: &str) -> Result<(), Refusal> {
        let stamp: Timestamp = text.parse().map_err(|_| Refusal::Malformed)?;
        self.observe(&stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behind_2s() -> NTP64 {
        let now = unix_us(SystemTime::now());
        ntp64_from_unix_us(now - 2_000_000)
    }

    fn real() -> NTP64 {
        ntp64_from_unix_us(unix_us(SystemTime::now()))
    }

    #[test]
    fn stamps_grow_within_one_clock() {
        let c = Clock::with_physical(real, DEFAULT_MAX_DELTA);
        let mut last = 0;
        for _ in 0..10_000 {
            let s = c.stamp();
            assert!(s > last, "{s} after {last}");
            last = s;
        }
    }

    #[test]
    fn an_observed_stamp_orders_a_slow_clock_after_it() {
        let a = Clock::with_physical(real, DEFAULT_MAX_DELTA);
        let b = Clock::with_physical(behind_2s, Duration::from_secs(5));
        let sent = a.now();
        // Without the link, b's stamps sort 2 s before a's.
        assert!(b.stamp() < sent.get_time().0);
        b.observe_text(&sent.to_string()).unwrap();
        assert!(b.stamp() > sent.get_time().0);
    }

    #[test]
    fn a_stamp_beyond_the_max_delta_is_refused_and_changes_nothing() {
        let a = Clock::with_physical(real, DEFAULT_MAX_DELTA);
        let b = Clock::with_physical(behind_2s, DEFAULT_MAX_DELTA);
        let sent = a.now();
        let before = b.stamp();
        match b.observe(&sent) {
            Err(Refusal::TooFarAhead {
                ahead_ms,
                max_delta_ms: 500,
            }) => assert!((1500..2500).contains(&ahead_ms), "{ahead_ms}"),
            other => panic!("{other:?}"),
        }
        let after = b.stamp();
        assert!(after < sent.get_time().0);
        assert!(after > before);
        for bad in ["", "12", "x/1", "12/0", "12/", "-1/1", "12/zz", "1/1/1"] {
            assert_eq!(b.observe_text(bad), Err(Refusal::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn ntp64_and_unix_microseconds_convert_both_ways() {
        for us in [0, 1, 999_999, 1_000_000, 1_714_557_600_123_456] {
            let t = ntp64_from_unix_us(us);
            assert_eq!(unix_us_from_ntp64(t), us, "{us}");
        }
        assert_eq!(ntp64_from_unix_us(-5), NTP64(0));
        let now = unix_us(SystemTime::now());
        let hlc_now = Clock::with_physical(real, DEFAULT_MAX_DELTA).stamp();
        let diff = unix_us_from_ntp64(NTP64(hlc_now)) - now;
        assert!(diff.abs() < 1_000_000, "{diff}");
    }

    /// What the hot path pays: a stamp (one per `recvmmsg` batch), the scan
    /// for a link (every trusted datagram), and following a link:
    /// `cargo test -p master --release --lib clock::tests::hot_path_cost -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn hot_path_cost() {
        use std::hint::black_box;
        use std::time::Instant;
        const N: u32 = 2_000_000;
        let c = Clock::with_physical(physical_now, DEFAULT_MAX_DELTA);
        let per_op = |start: Instant| start.elapsed().as_nanos() as f64 / f64::from(N);
        let start = Instant::now();
        for _ in 0..N {
            black_box(c.stamp());
        }
        eprintln!("stamp: {:.1} ns", per_op(start));
        let plain = br#"{"op":"square","n":12345,"id":67}"#;
        let start = Instant::now();
        for _ in 0..N {
            black_box(protocol::request::may_carry_hlc(black_box(plain)));
        }
        eprintln!(
            "scan of a {}-byte request without a link: {:.1} ns",
            plain.len(),
            per_op(start)
        );
        let start = Instant::now();
        for _ in 0..N {
            black_box(protocol::request::may_be_stats(black_box(plain)));
        }
        eprintln!(
            "(the stats scan every datagram already pays, for comparison: {:.1} ns)",
            per_op(start)
        );
        let linked = format!(r#"{{"op":"square","n":12345,"id":67,"hlc":"{}"}}"#, c.now());
        let start = Instant::now();
        for _ in 0..N {
            let d = black_box(linked.as_bytes());
            if protocol::request::may_carry_hlc(d) {
                if let Some(Ok(text)) = protocol::request::peek_hlc(d) {
                    black_box(c.observe_text(text).is_ok());
                }
            }
        }
        eprintln!(
            "scan, peek and observe of a {}-byte linked request: {:.1} ns",
            linked.len(),
            per_op(start)
        );
    }
}
