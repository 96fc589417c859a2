//! Per-source response rate limiting, after BIND's response rate limiting
//! (RRL): replies per second per source *prefix* (/24 for IPv4, /56 for
//! IPv6, so that one network cannot spread a flood over its addresses),
//! each prefix a token bucket, in a table of fixed size.
//!
//! The table never grows: a prefix's bucket lives in the slot its keyed hash
//! picks (SipHash with a random key per process, so a client cannot aim at
//! another's slot), and a prefix that finds its slot taken by another takes
//! it over with a full bucket. A flood from a million forged sources
//! therefore costs the same memory as one from a single source, and can at
//! worst hand a real client a fresh bucket; a forged flood that names one
//! victim (the reflection attack this defends against) shares that victim's
//! bucket and is held to the limit.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Instant;

/// Buckets in the table: 2^16 of 24 bytes, 1.5 MiB.
const SLOTS: usize = 1 << 16;

/// What to do with one datagram from a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit: answer it.
    Pass,
    /// Over the limit: answer it with a short `rate_limited` error (every
    /// `slip`-th dropped datagram), so a real client learns why.
    Slip,
    /// Over the limit: no reply.
    Drop,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// The hash of the prefix that owns it; 0: free.
    tag: u64,
    /// Microseconds since the limiter started, at the last refill.
    at_us: u64,
    /// Tokens left (one per reply), up to the burst.
    tokens: f32,
    /// Datagrams dropped since the last slip.
    dropped: u32,
}

/// The rate limiter of one master.
pub struct RateLimiter {
    per_second: f32,
    burst: f32,
    slip: u32,
    started: Instant,
    hasher: RandomState,
    table: Box<[Bucket]>,
}

impl RateLimiter {
    /// `per_second` replies per second per prefix, up to `per_second` at
    /// once (one second's worth); every `slip`-th datagram over the limit
    /// gets a short reply (0: none does).
    pub fn new(per_second: u32, slip: u32) -> RateLimiter {
        RateLimiter {
            per_second: per_second as f32,
            burst: per_second.max(1) as f32,
            slip,
            started: Instant::now(),
            hasher: RandomState::new(),
            table: vec![Bucket::default(); SLOTS].into_boxed_slice(),
        }
    }

    /// Counts one datagram from `source` at `now` and says what to do.
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Verdict {
        let tag = self.hasher.hash_one(prefix(source)) | 1;
        let at_us = now.saturating_duration_since(self.started).as_micros() as u64;
        let b = &mut self.table[(tag >> 1) as usize % SLOTS];
        if b.tag != tag {
            *b = Bucket {
                tag,
                at_us,
                tokens: self.burst,
                dropped: 0,
            };
        } else {
            let elapsed = at_us.saturating_sub(b.at_us) as f32 / 1e6;
            b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
            b.at_us = at_us;
        }
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Pass;
        }
        b.dropped += 1;
        if self.slip > 0 && b.dropped >= self.slip {
            b.dropped = 0;
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    /// Bytes the table holds (fixed).
    pub fn memory(&self) -> usize {
        std::mem::size_of_val(&*self.table)
    }
}

/// The prefix a source is limited by: its /24 (IPv4) or /56 (IPv6).
fn prefix(source: IpAddr) -> (u8, u128) {
    match source {
        IpAddr::V4(a) => (4, u128::from(u32::from(a) & 0xffff_ff00)),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (4, u128::from(u32::from(v4) & 0xffff_ff00)),
            None => (6, u128::from(a) & !((1u128 << 72) - 1)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_gets_its_burst_then_is_limited_with_slips() {
        let mut r = RateLimiter::new(10, 2);
        let t = Instant::now();
        for _ in 0..10 {
            assert_eq!(r.check(ip("192.0.2.1"), t), Verdict::Pass);
        }
        let over: Vec<Verdict> = (0..4).map(|_| r.check(ip("192.0.2.1"), t)).collect();
        assert_eq!(
            over,
            vec![Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]
        );
        // Refilled at 10 per second.
        let later = t + Duration::from_millis(300);
        let passed = (0..10)
            .filter(|_| r.check(ip("192.0.2.1"), later) == Verdict::Pass)
            .count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn a_prefix_shares_one_bucket() {
        let mut r = RateLimiter::new(4, 0);
        let t = Instant::now();
        for last in 1..=4 {
            assert_eq!(r.check(ip(&format!("198.51.100.{last}")), t), Verdict::Pass);
        }
        assert_eq!(r.check(ip("198.51.100.200"), t), Verdict::Drop);
        assert_eq!(r.check(ip("198.51.101.1"), t), Verdict::Pass);
        // IPv6: the /56 is the unit.
        for _ in 0..4 {
            assert_eq!(r.check(ip("2001:db8:0:1::1"), t), Verdict::Pass);
        }
        assert_eq!(r.check(ip("2001:db8:0:ff::2"), t), Verdict::Drop);
        assert_eq!(r.check(ip("2001:db8:0:100::1"), t), Verdict::Pass);
    }

    #[test]
    fn a_million_sources_use_the_same_memory() {
        let mut r = RateLimiter::new(100, 2);
        let before = r.memory();
        let t = Instant::now();
        for i in 0..1_000_000u32 {
            r.check(IpAddr::V4(i.into()), t);
        }
        assert_eq!(r.memory(), before);
        assert!(before <= 2 * 1024 * 1024, "{before} bytes");
    }
}
