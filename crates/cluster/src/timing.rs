//! The cluster's timers, in two profiles: `lan` (the production default,
//! foca's `new_lan` and etcd's Raft timings) and `test` (short timers, so
//! that the tests of failures take seconds, not minutes).

use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

/// Which timers a cluster runs with (`--cluster-timing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Production: SWIM probes every second, Raft elections in 1-2 s.
    Lan,
    /// Tests: SWIM probes every 300 ms, Raft elections in 0.5-1 s.
    Test,
}

/// Every timer of the cluster thread.
#[derive(Debug, Clone)]
pub struct Timing {
    /// SWIM: how often a member probes another.
    pub probe_period: Duration,
    /// SWIM: how long a direct probe waits for its ack.
    pub probe_rtt: Duration,
    /// SWIM: members asked to probe indirectly.
    pub indirect_probes: usize,
    /// SWIM: how long a suspect has to refute before it is down.
    pub suspect_to_down: Duration,
    /// SWIM: how often updates are gossiped, and to how many.
    pub gossip_every: Duration,
    /// SWIM: members gossiped to each time.
    pub gossip_to: usize,
    /// SWIM: how often a member announces itself to a live one (and so
    /// learns of members it missed).
    pub announce_every: Duration,
    /// SWIM: how often a member knocks at members it believes down (seeds
    /// at start, the other side of a healed partition).
    pub announce_to_down_every: Duration,
    /// Raft: one tick.
    pub tick: Duration,
    /// Raft: ticks between the coordinator's heartbeats.
    pub heartbeat_ticks: usize,
    /// Raft: ticks without a coordinator before an election (randomized
    /// up to twice this).
    pub election_ticks: usize,
    /// The coordinator marks a server down once SWIM has said it is down
    /// for this long (so that flaps at a partition's heal do not churn the
    /// view).
    pub mark_down_after: Duration,
    /// The coordinator removes a server that has been down this long from
    /// the view (and from the voters, which a live learner then replaces).
    pub remove_after: Duration,
    /// How often the coordinator compares SWIM with the view.
    pub reconcile_every: Duration,
    /// A proposal not seen applied after this long is proposed again.
    pub repropose_after: Duration,
}

impl Timing {
    /// The timers of a profile.
    pub fn of(profile: Profile) -> Timing {
        let ms = Duration::from_millis;
        match profile {
            Profile::Lan => Timing {
                probe_period: ms(1000),
                probe_rtt: ms(500),
                indirect_probes: 3,
                suspect_to_down: ms(4000),
                gossip_every: ms(200),
                gossip_to: 3,
                announce_every: ms(30_000),
                announce_to_down_every: ms(10_000),
                tick: ms(100),
                heartbeat_ticks: 1,
                election_ticks: 10,
                mark_down_after: ms(2000),
                remove_after: ms(60_000),
                reconcile_every: ms(500),
                repropose_after: ms(3000),
            },
            Profile::Test => Timing {
                probe_period: ms(300),
                probe_rtt: ms(100),
                indirect_probes: 2,
                suspect_to_down: ms(600),
                gossip_every: ms(100),
                gossip_to: 2,
                announce_every: ms(1000),
                announce_to_down_every: ms(500),
                tick: ms(50),
                heartbeat_ticks: 2,
                election_ticks: 10,
                mark_down_after: ms(200),
                remove_after: ms(3000),
                reconcile_every: ms(100),
                repropose_after: ms(1000),
            },
        }
    }

    /// foca's configuration for these timers; `max_packet` is the room an
    /// envelope leaves for a SWIM message.
    pub(crate) fn foca(&self, max_packet: usize) -> foca::Config {
        let every = |frequency, n: usize| {
            Some(foca::PeriodicParams {
                frequency,
                num_members: NonZeroUsize::new(n.max(1)).expect("at least 1"),
            })
        };
        let mut c = foca::Config::simple();
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes = NonZeroUsize::new(self.indirect_probes.max(1)).expect("at least 1");
        c.suspect_to_down_after = self.suspect_to_down;
        c.max_transmissions = NonZeroU8::new(6).expect("6");
        c.max_packet_size = NonZeroUsize::new(max_packet).expect("room for SWIM");
        c.notify_down_members = true;
        // Down members are remembered long enough to heal a partition.
        c.remove_down_after = self.remove_after.max(Duration::from_secs(15));
        c.periodic_gossip = every(self.gossip_every, self.gossip_to);
        c.periodic_announce = every(self.announce_every, 1);
        c.periodic_announce_to_down_members = every(self.announce_to_down_every, 2);
        c
    }

    /// raft-rs's configuration for node `id`.
    pub(crate) fn raft(&self, id: u64) -> raft::Config {
        raft::Config {
            id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            // A coordinator cut off from the majority steps down after an
            // election timeout; a server cut off does not disturb the group
            // when it comes back (it must win a pre-vote first).
            check_quorum: true,
            pre_vote: true,
            // Appends stay well inside one datagram.
            max_size_per_msg: 800,
            max_inflight_msgs: 64,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_make_valid_configurations() {
        for p in [Profile::Lan, Profile::Test] {
            let t = Timing::of(p);
            t.raft(1).validate().unwrap();
            let f = t.foca(1372);
            assert!(f.probe_rtt < f.probe_period);
            // A server is marked down well after SWIM's own suspicion.
            assert!(t.remove_after > t.mark_down_after);
            assert!(t.election_ticks > t.heartbeat_ticks);
        }
    }
}
