//! Choosing among several servers: where a request starts (`--policy`),
//! where it goes when a server fails it, and which servers are skipped for
//! a while. Pure decisions over server indexes and nanosecond clocks, with
//! no sockets, so that `client` and `loadgen` share them and the tests need
//! no network.
//!
//! The rules, as `client --help` and docs/PROTOCOL.md state them:
//! * A request starts at its preferred server ([`Policy`]), or at the first
//!   one after it (in the order given, wrapping round) that is not skipped.
//! * A timed-out attempt is sent again to the same server, with the same id
//!   and from the same socket, `--retries` times; then the request fails
//!   over to the next server. A `busy` or `shutting_down` reply and an ICMP
//!   port-unreachable fail over at once.
//! * Each server is tried at most once per request, and a request fails
//!   over only to servers that are not skipped; when none is left, it fails.
//! * A server whose attempts timed out [`SkipRule::after_timeouts`] times in
//!   a row, that refused (nothing listens) or that said `shutting_down` is
//!   skipped for [`SkipRule::cool_down_ns`]. Any other reply from it ends its
//!   run of timeouts. When every server is skipped, requests start at the
//!   preferred one anyway.

use std::fmt;

/// How requests are spread over the servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Every request starts at the first server given that is not skipped.
    First,
    /// Successive requests (`client --processes`), or successive sockets
    /// (`loadgen`), start at successive servers.
    RoundRobin,
}

impl Policy {
    /// The name `--policy` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::First => "first",
            Policy::RoundRobin => "round-robin",
        }
    }

    /// The server that request (or socket) number `k` prefers, of `n`.
    pub fn preferred(self, k: usize, n: usize) -> usize {
        match self {
            Policy::First => 0,
            Policy::RoundRobin => k % n.max(1),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a server did not answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No reply within the timeout, after every retry.
    Timeout,
    /// ICMP port unreachable: nothing listens there.
    Refused,
    /// It replied `busy`: every worker was full.
    Busy,
    /// It replied `shutting_down`: it is stopping.
    ShuttingDown,
}

impl Failure {
    /// The word used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Refused => "refused",
            Failure::Busy => "busy",
            Failure::ShuttingDown => "shutting_down",
        }
    }

    /// The failure an error reply with this code means, if it is one that
    /// moves a request on at once.
    pub fn from_error_code(code: &str) -> Option<Failure> {
        match code {
            "busy" => Some(Failure::Busy),
            "shutting_down" => Some(Failure::ShuttingDown),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Timeouts in a row after which a server is skipped.
pub const SKIP_AFTER_TIMEOUTS: u32 = 3;

/// How long a skipped server is left alone: 5 s.
pub const COOL_DOWN_NS: u64 = 5_000_000_000;

/// When a server is skipped, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkipRule {
    /// Timed-out attempts in a row that make a server skipped.
    pub after_timeouts: u32,
    /// How long it stays skipped, in nanoseconds.
    pub cool_down_ns: u64,
}

impl Default for SkipRule {
    fn default() -> Self {
        SkipRule {
            after_timeouts: SKIP_AFTER_TIMEOUTS,
            cool_down_ns: COOL_DOWN_NS,
        }
    }
}

/// One server's recent record.
#[derive(Debug, Clone, Copy, Default)]
struct Record {
    /// Attempts that timed out since its last reply.
    timeouts_in_a_row: u32,
    /// Skipped until this time (ns on the caller's clock); 0: not skipped.
    skipped_until_ns: u64,
}

/// What one client process knows of its servers' health, and the route a
/// request takes through them. Times are nanoseconds on the caller's
/// monotonic clock.
#[derive(Debug, Clone)]
pub struct Health {
    records: Vec<Record>,
    rule: SkipRule,
}

impl Health {
    /// `n` servers, none skipped.
    pub fn new(n: usize, rule: SkipRule) -> Health {
        Health {
            records: vec![Record::default(); n],
            rule,
        }
    }

    /// How many servers there are.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether `server` is skipped at `now_ns`.
    pub fn is_skipped(&self, server: usize, now_ns: u64) -> bool {
        now_ns < self.records[server].skipped_until_ns
    }

    /// The server `hop` places after `start`, wrapping round.
    pub fn server_at(&self, start: usize, hop: usize) -> usize {
        (start + hop) % self.len()
    }

    /// Where a request that prefers `preferred` starts: the first server
    /// from there on that is not skipped, or `preferred` itself when every
    /// server is.
    pub fn start(&self, preferred: usize, now_ns: u64) -> usize {
        (0..self.len())
            .map(|hop| self.server_at(preferred, hop))
            .find(|&s| !self.is_skipped(s, now_ns))
            .unwrap_or(preferred)
    }

    /// Where a request that started at `start` and is at hop `hop` fails
    /// over to: the next hop whose server is not skipped, or `None` when
    /// every server is tried or skipped.
    pub fn next_hop(&self, start: usize, hop: usize, now_ns: u64) -> Option<usize> {
        (hop + 1..self.len()).find(|&h| !self.is_skipped(self.server_at(start, h), now_ns))
    }

    /// Notes that `server` answered (any reply but `shutting_down`).
    pub fn replied(&mut self, server: usize) {
        self.records[server].timeouts_in_a_row = 0;
    }

    /// Notes that an attempt to `server` failed at `now_ns`. Returns whether
    /// this made the server skipped (it was not before).
    pub fn failed(&mut self, server: usize, why: Failure, now_ns: u64) -> bool {
        let was = self.is_skipped(server, now_ns);
        let rule = self.rule;
        let r = &mut self.records[server];
        let skip = match why {
            Failure::Busy => {
                // Alive, only full: a busy server is not skipped.
                r.timeouts_in_a_row = 0;
                false
            }
            Failure::Timeout => {
                r.timeouts_in_a_row = r.timeouts_in_a_row.saturating_add(1);
                r.timeouts_in_a_row >= rule.after_timeouts
            }
            // Nothing listens, or it is stopping: it will not be back in a
            // millisecond either.
            Failure::Refused | Failure::ShuttingDown => true,
        };
        if skip {
            r.timeouts_in_a_row = 0;
            r.skipped_until_ns = r
                .skipped_until_ns
                .max(now_ns.saturating_add(rule.cool_down_ns));
        }
        skip && !was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn rule() -> SkipRule {
        SkipRule {
            after_timeouts: 3,
            cool_down_ns: 5_000 * MS,
        }
    }

    #[test]
    fn policies_prefer_as_documented() {
        assert_eq!(
            (0..5)
                .map(|k| Policy::First.preferred(k, 3))
                .collect::<Vec<_>>(),
            [0, 0, 0, 0, 0]
        );
        assert_eq!(
            (0..5)
                .map(|k| Policy::RoundRobin.preferred(k, 3))
                .collect::<Vec<_>>(),
            [0, 1, 2, 0, 1]
        );
        assert_eq!(Policy::RoundRobin.preferred(7, 1), 0);
    }

    /// Every server a request visits, failing at each, from `preferred`.
    fn route(h: &Health, preferred: usize, now: u64) -> Vec<usize> {
        let start = h.start(preferred, now);
        let mut hops = vec![0];
        while let Some(next) = h.next_hop(start, *hops.last().unwrap(), now) {
            hops.push(next);
        }
        hops.into_iter()
            .map(|hop| h.server_at(start, hop))
            .collect()
    }

    #[test]
    fn a_request_visits_each_server_once_in_order() {
        let h = Health::new(3, rule());
        assert_eq!(route(&h, 0, 0), [0, 1, 2]);
        assert_eq!(route(&h, 1, 0), [1, 2, 0]);
        assert_eq!(route(&h, 2, 0), [2, 0, 1]);
        assert_eq!(route(&Health::new(1, rule()), 0, 0), [0]);
    }

    #[test]
    fn three_timeouts_in_a_row_skip_a_server_for_the_cool_down() {
        let mut h = Health::new(3, rule());
        assert!(!h.failed(0, Failure::Timeout, 0));
        assert!(!h.failed(0, Failure::Timeout, MS));
        // A reply in between starts the count again.
        h.replied(0);
        assert!(!h.failed(0, Failure::Timeout, 2 * MS));
        assert!(!h.failed(0, Failure::Timeout, 3 * MS));
        assert!(!h.is_skipped(0, 3 * MS));
        assert!(h.failed(0, Failure::Timeout, 4 * MS), "the third in a row");
        assert!(h.is_skipped(0, 4 * MS));
        // Skipped: requests start at the next server and never visit it.
        assert_eq!(route(&h, 0, 5 * MS), [1, 2]);
        assert_eq!(route(&h, 2, 5 * MS), [2, 1]);
        // Until the cool-down is over.
        assert!(h.is_skipped(0, 5_003 * MS));
        assert!(!h.is_skipped(0, 5_004 * MS));
        assert_eq!(route(&h, 0, 5_004 * MS), [0, 1, 2]);
    }

    #[test]
    fn refused_and_shutting_down_skip_at_once_busy_never() {
        let mut h = Health::new(3, rule());
        assert!(h.failed(1, Failure::Refused, 0));
        assert!(!h.failed(1, Failure::Refused, MS), "already skipped");
        assert!(h.failed(2, Failure::ShuttingDown, 0));
        for _ in 0..10 {
            assert!(!h.failed(0, Failure::Busy, 0));
        }
        assert!(!h.is_skipped(0, MS));
        assert_eq!(route(&h, 1, MS), [0]);
        // Busy also ends a run of timeouts: the server is alive.
        h.failed(0, Failure::Timeout, MS);
        h.failed(0, Failure::Timeout, MS);
        h.failed(0, Failure::Busy, MS);
        assert!(!h.failed(0, Failure::Timeout, MS));
    }

    #[test]
    fn when_every_server_is_skipped_requests_start_anyway() {
        let mut h = Health::new(2, rule());
        h.failed(0, Failure::Refused, 0);
        h.failed(1, Failure::Refused, 0);
        assert_eq!(h.start(0, MS), 0);
        assert_eq!(h.start(1, MS), 1);
        // ...but do not fail over to another skipped one.
        assert_eq!(route(&h, 1, MS), [1]);
    }

    #[test]
    fn a_later_refusal_does_not_shorten_a_skip() {
        let mut h = Health::new(1, rule());
        h.failed(0, Failure::Refused, 1_000 * MS);
        h.failed(0, Failure::Refused, 0);
        assert!(h.is_skipped(0, 5_999 * MS));
    }

    #[test]
    fn error_codes_that_move_on() {
        assert_eq!(Failure::from_error_code("busy"), Some(Failure::Busy));
        assert_eq!(
            Failure::from_error_code("shutting_down"),
            Some(Failure::ShuttingDown)
        );
        assert_eq!(Failure::from_error_code("timeout"), None);
        assert_eq!(Failure::from_error_code("bad_request"), None);
    }
}
