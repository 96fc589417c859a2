//! What the master does with a datagram before anything else, so that a
//! server on a public address cannot be turned against a third party (UDP
//! sources are forged at will): sources inside `--trusted` pass untouched;
//! any other source is held to `--rate-limit` replies per second per
//! prefix ([`crate::ratelimit`]), and no reply to it may be larger than
//! `--amplification-factor` times the datagram it sent (QUIC's rule for
//! unvalidated addresses, RFC 9000 section 8).

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipnet::IpNet;

use crate::ratelimit::{RateLimiter, Verdict};

/// What becomes of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Answer it; no reply may be longer than this many bytes.
    Answer {
        /// The largest reply that may be sent (`u32::MAX`: no bound).
        reply_limit: u32,
    },
    /// Over the rate limit: a short `rate_limited` error, within this bound.
    Slip {
        /// The largest reply that may be sent.
        reply_limit: u32,
    },
    /// Over the rate limit: no reply.
    Drop,
}

/// The master's policy for sources.
pub struct Guard {
    trusted: Vec<IpNet>,
    factor: u32,
    limiter: Option<RateLimiter>,
}

impl Guard {
    /// Trusts `trusted`; bounds replies to other sources at `factor` times
    /// their request, and limits them to `rate_limit` replies per second
    /// per prefix (0: no limit) with every `slip`-th over it answered.
    pub fn new(trusted: Vec<IpNet>, factor: u32, rate_limit: u32, slip: u32) -> Guard {
        Guard {
            trusted,
            factor,
            limiter: (rate_limit > 0).then(|| RateLimiter::new(rate_limit, slip)),
        }
    }

    /// Whether `ip` is inside `--trusted` (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Decides for a datagram of `len` bytes from `from`.
    pub fn admit(&mut self, from: SocketAddr, len: usize, now: Instant) -> Admission {
        if self.trusts(from.ip()) {
            return Admission::Answer {
                reply_limit: u32::MAX,
            };
        }
        let reply_limit = u32::try_from(len)
            .unwrap_or(u32::MAX)
            .saturating_mul(self.factor);
        match self.limiter.as_mut().map(|l| l.check(from.ip(), now)) {
            None | Some(Verdict::Pass) => Admission::Answer { reply_limit },
            Some(Verdict::Slip) => Admission::Slip { reply_limit },
            Some(Verdict::Drop) => Admission::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(rate: u32) -> Guard {
        let trusted = vec!["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()];
        Guard::new(trusted, 3, rate, 2)
    }

    #[test]
    fn trusted_sources_have_no_bound() {
        let mut g = guard(1);
        let now = Instant::now();
        for from in ["127.0.0.1:5", "[::1]:5", "[::ffff:127.0.0.1]:5"] {
            for _ in 0..5 {
                assert_eq!(
                    g.admit(from.parse().unwrap(), 1, now),
                    Admission::Answer {
                        reply_limit: u32::MAX
                    }
                );
            }
        }
    }

    #[test]
    fn other_sources_get_three_times_their_bytes_and_a_rate_limit() {
        let mut g = guard(2);
        let now = Instant::now();
        let from: SocketAddr = "127.0.0.2:9".parse().unwrap();
        assert_eq!(
            g.admit(from, 10, now),
            Admission::Answer { reply_limit: 30 }
        );
        assert_eq!(g.admit(from, 1, now), Admission::Answer { reply_limit: 3 });
        assert_eq!(g.admit(from, 1, now), Admission::Drop);
        assert_eq!(g.admit(from, 5, now), Admission::Slip { reply_limit: 15 });
        // No limit configured: only the bound.
        let mut g = guard(0);
        for _ in 0..100 {
            assert_eq!(g.admit(from, 4, now), Admission::Answer { reply_limit: 12 });
        }
    }
}
