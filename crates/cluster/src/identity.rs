//! Who a member is on the SWIM side: its cluster address (foca's unique
//! address), its service address, its node id (the Raft id) and its
//! generation, carried in every SWIM message header.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A member's identity in SWIM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Id {
    /// Its cluster port: what foca treats as the unique address.
    pub cluster: SocketAddr,
    /// Where it serves clients.
    pub service: SocketAddr,
    /// Its node id (the Raft id): random, fixed for the life of the process;
    /// 0 for a seed not heard from yet.
    pub node: u64,
    /// Its generation: the start time in ms, bumped when the member finds
    /// itself declared down and rejoins (foca's `renew`).
    pub gen: u64,
}

impl Id {
    /// A seed given with `--join`: only its cluster address is known.
    pub fn seed(cluster: SocketAddr) -> Id {
        Id {
            cluster,
            service: cluster,
            node: 0,
            gen: 0,
        }
    }
}

impl foca::Identity for Id {
    type Addr = SocketAddr;

    /// Declared down by the others while alive: come back at once with the
    /// next generation, which wins over the old one.
    fn renew(&self) -> Option<Self> {
        Some(Id {
            gen: self.gen + 1,
            ..*self
        })
    }

    fn addr(&self) -> SocketAddr {
        self.cluster
    }

    /// Two identities at one address: the later generation (a restarted or
    /// rejoined member) wins; a seed placeholder always loses.
    fn win_addr_conflict(&self, other: &Self) -> bool {
        (self.gen, self.node) > (other.gen, other.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn later_generations_win() {
        let a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let real = Id {
            cluster: a,
            service: "127.0.0.1:10001".parse().unwrap(),
            node: 5,
            gen: 100,
        };
        assert!(real.win_addr_conflict(&Id::seed(a)));
        assert!(!Id::seed(a).win_addr_conflict(&real));
        let renewed = real.renew().unwrap();
        assert!(renewed.win_addr_conflict(&real));
        assert_eq!((renewed.node, renewed.addr()), (5, a));
    }
}
