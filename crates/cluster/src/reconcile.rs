//! The coordinator's decisions: compare what SWIM says with the view and
//! the Raft configuration, and say what to propose. Pure (no Raft, no
//! sockets, the clock passed in), so the rules are unit-tested.
//!
//! The rules, in the order they are tried each round (Consul's leader
//! "reconcile" loop over Serf members, with Raft learners and voters):
//! 1. a server in the configuration but not in the view (the founder) is
//!    admitted by a normal entry;
//! 2. a server SWIM reports down for `mark_down_after` is marked down; one
//!    marked down that SWIM reports alive again is marked up;
//! 3. at most one configuration change at a time (Raft's rule): admit a
//!    live server SWIM knows and the configuration does not (as a learner,
//!    with the next server number); else promote a live learner while there
//!    are fewer voters than wanted; else remove a server down for
//!    `remove_after` (never the coordinator itself, never the last voter).
//!
//! A proposal that is not applied within `repropose_after` is proposed
//! again (a proposal can be lost with a change of coordinator).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use protocol::cluster::{Admission, Role, Status, View, MAX_MEMBERS};

use crate::identity::Id;

/// A member's state as SWIM (foca) sees it from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwimState {
    /// Answering probes.
    Alive,
    /// Missed probes; may still refute.
    Suspect,
    /// Declared down.
    Down,
}

impl SwimState {
    /// `alive`, `suspect` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            SwimState::Alive => "alive",
            SwimState::Suspect => "suspect",
            SwimState::Down => "down",
        }
    }
}

/// The Raft configuration, as applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conf {
    /// Voting members.
    pub voters: Vec<u64>,
    /// Non-voting members.
    pub learners: Vec<u64>,
}

impl Conf {
    fn contains(&self, node: u64) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

/// What the coordinator proposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A normal entry admitting a server already in the configuration.
    Admit(u64, Admission),
    /// A normal entry marking a server down.
    MarkDown(u64),
    /// A normal entry marking a server up again, with its generation.
    MarkUp(u64, u64),
    /// A configuration change adding a learner (admitting a new server).
    AddLearner(u64, Admission),
    /// A configuration change making a learner a voter.
    Promote(u64),
    /// A configuration change removing a server from the group.
    Remove(u64),
}

impl Action {
    /// Whether it is a Raft configuration change (one at a time).
    pub fn is_conf_change(&self) -> bool {
        matches!(
            self,
            Action::AddLearner(..) | Action::Promote(_) | Action::Remove(_)
        )
    }

    fn key(&self) -> (u8, u64) {
        match *self {
            Action::Admit(n, _) => (0, n),
            Action::MarkDown(n) => (1, n),
            Action::MarkUp(n, _) => (2, n),
            Action::AddLearner(n, _) => (3, n),
            Action::Promote(n) => (4, n),
            Action::Remove(n) => (5, n),
        }
    }
}

/// What a round looks at.
#[derive(Debug)]
pub struct Round<'a> {
    /// This server's node id (the coordinator's).
    pub me: u64,
    /// The applied view.
    pub view: &'a View,
    /// The applied configuration.
    pub conf: &'a Conf,
    /// SWIM's state of every member it knows, by node id (this server
    /// included, as alive).
    pub swim: &'a HashMap<u64, (SwimState, Id)>,
    /// A configuration change is proposed and not applied yet.
    pub conf_pending: bool,
    /// Voters wanted (`--voters`).
    pub voters_wanted: usize,
    /// Now.
    pub now: Instant,
}

/// The coordinator's memory between rounds.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// Since when each server in the view has been down for SWIM.
    down_since: HashMap<u64, Instant>,
    /// When each action was last proposed.
    proposed: HashMap<(u8, u64), Instant>,
}

/// The timers a round uses.
#[derive(Debug, Clone, Copy)]
pub struct Graces {
    /// SWIM down this long: marked down.
    pub mark_down_after: Duration,
    /// Marked down this long: removed.
    pub remove_after: Duration,
    /// Proposed this long ago and not applied: proposed again.
    pub repropose_after: Duration,
}

impl Reconciler {
    /// Forgets what only a coordinator remembers (when it steps down).
    pub fn reset(&mut self) {
        self.down_since.clear();
        self.proposed.clear();
    }

    /// What to propose this round.
    pub fn plan(&mut self, r: &Round<'_>, g: Graces) -> Vec<Action> {
        let alive = |node: u64| {
            node == r.me
                || r.swim
                    .get(&node)
                    .is_some_and(|(s, _)| *s != SwimState::Down)
        };
        // Since when each server in the view has been down for SWIM.
        self.down_since
            .retain(|node, _| r.view.member(*node).is_some() && !alive(*node));
        for m in &r.view.members {
            if !alive(m.node) {
                self.down_since.entry(m.node).or_insert(r.now);
            }
        }
        let down_for = |node: u64| {
            self.down_since
                .get(&node)
                .map_or(Duration::ZERO, |t| r.now.saturating_duration_since(*t))
        };

        let mut wanted = Vec::new();
        // 1. In the configuration, not in the view.
        for &node in r.conf.voters.iter().chain(&r.conf.learners) {
            if r.view.member(node).is_none() && alive(node) {
                if let Some((_, id)) = r.swim.get(&node) {
                    wanted.push(Action::Admit(node, admission(id)));
                }
            }
        }
        // 2. Down and up.
        for m in &r.view.members {
            if m.node == r.me {
                continue;
            }
            match m.status {
                Status::Up if down_for(m.node) >= g.mark_down_after => {
                    wanted.push(Action::MarkDown(m.node));
                }
                Status::Down => {
                    if let Some((SwimState::Alive, id)) = r.swim.get(&m.node) {
                        wanted.push(Action::MarkUp(m.node, id.gen));
                    }
                }
                _ => {}
            }
        }
        // 3. One configuration change.
        if !r.conf_pending {
            if let Some(a) = self.conf_change(r, g, &down_for) {
                wanted.push(a);
            }
        }
        // Each action once per repropose_after.
        self.proposed
            .retain(|_, at| r.now.saturating_duration_since(*at) < g.repropose_after);
        wanted.retain(|a| !self.proposed.contains_key(&a.key()));
        for a in &wanted {
            self.proposed.insert(a.key(), r.now);
        }
        wanted
    }

    fn conf_change(
        &self,
        r: &Round<'_>,
        g: Graces,
        down_for: &dyn Fn(u64) -> Duration,
    ) -> Option<Action> {
        // Admit: alive in SWIM, unknown to the configuration; by node id so
        // that every coordinator picks the same one first.
        let mut newcomers: Vec<&Id> = r
            .swim
            .iter()
            .filter(|(node, (s, _))| {
                **node != 0 && *s == SwimState::Alive && !r.conf.contains(**node)
            })
            .map(|(_, (_, id))| id)
            .collect();
        newcomers.sort_by_key(|id| id.node);
        if let Some(id) = newcomers.first() {
            if r.view.members.len() < MAX_MEMBERS {
                return Some(Action::AddLearner(id.node, admission(id)));
            }
        }
        // Promote: fewer voters than wanted, and a live learner.
        if r.conf.voters.len() < r.voters_wanted {
            let learner = r
                .view
                .members
                .iter()
                .filter(|m| {
                    m.role == Role::Learner
                        && m.status == Status::Up
                        && r.conf.learners.contains(&m.node)
                        && matches!(r.swim.get(&m.node), Some((SwimState::Alive, _)))
                })
                .min_by_key(|m| m.server);
            if let Some(m) = learner {
                return Some(Action::Promote(m.node));
            }
        }
        // Remove: down for long enough.
        r.view
            .members
            .iter()
            .filter(|m| {
                m.node != r.me
                    && m.status == Status::Down
                    && down_for(m.node) >= g.remove_after
                    && r.conf.voters != [m.node]
            })
            .min_by_key(|m| m.server)
            .map(|m| Action::Remove(m.node))
    }
}

fn admission(id: &Id) -> Admission {
    Admission {
        service: id.service,
        cluster: id.cluster,
        gen: id.gen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::cluster::ViewMember;

    const G: Graces = Graces {
        mark_down_after: Duration::from_millis(200),
        remove_after: Duration::from_millis(3000),
        repropose_after: Duration::from_millis(1000),
    };

    fn id(node: u64) -> Id {
        Id {
            cluster: format!("127.0.0.{node}:7000").parse().unwrap(),
            service: format!("127.0.0.{node}:10001").parse().unwrap(),
            node,
            gen: 100 + node,
        }
    }

    fn member(node: u64, role: Role, status: Status) -> ViewMember {
        let i = id(node);
        ViewMember {
            node,
            server: node as u32,
            service: i.service,
            cluster: i.cluster,
            gen: i.gen,
            status,
            role,
            since: 1,
        }
    }

    fn swim(states: &[(u64, SwimState)]) -> HashMap<u64, (SwimState, Id)> {
        states.iter().map(|&(n, s)| (n, (s, id(n)))).collect()
    }

    fn round<'a>(
        view: &'a View,
        conf: &'a Conf,
        swim: &'a HashMap<u64, (SwimState, Id)>,
        now: Instant,
    ) -> Round<'a> {
        Round {
            me: 1,
            view,
            conf,
            swim,
            conf_pending: false,
            voters_wanted: 3,
            now,
        }
    }

    #[test]
    fn the_founder_admits_itself_then_newcomers_one_at_a_time() {
        let mut rec = Reconciler::default();
        let view = View::default();
        let conf = Conf {
            voters: vec![1],
            learners: vec![],
        };
        let sw = swim(&[
            (1, SwimState::Alive),
            (3, SwimState::Alive),
            (2, SwimState::Alive),
        ]);
        let now = Instant::now();
        let plan = rec.plan(&round(&view, &conf, &sw, now), G);
        assert_eq!(
            plan,
            [
                Action::Admit(1, admission(&id(1))),
                Action::AddLearner(2, admission(&id(2)))
            ]
        );
        // Not applied yet: nothing is proposed twice within repropose_after.
        assert!(rec.plan(&round(&view, &conf, &sw, now), G).is_empty());
        let later = now + G.repropose_after;
        assert_eq!(rec.plan(&round(&view, &conf, &sw, later), G).len(), 2);
    }

    #[test]
    fn learners_are_promoted_up_to_the_voters_wanted() {
        let mut rec = Reconciler::default();
        let view = View {
            view: 5,
            next_server: 4,
            members: vec![
                member(1, Role::Voter, Status::Up),
                member(2, Role::Learner, Status::Up),
                member(3, Role::Learner, Status::Up),
            ],
        };
        let conf = Conf {
            voters: vec![1],
            learners: vec![2, 3],
        };
        let sw = swim(&[
            (1, SwimState::Alive),
            (2, SwimState::Alive),
            (3, SwimState::Alive),
        ]);
        let plan = rec.plan(&round(&view, &conf, &sw, Instant::now()), G);
        assert_eq!(plan, [Action::Promote(2)]);
        let mut pending = round(&view, &conf, &sw, Instant::now());
        pending.conf_pending = true;
        assert!(Reconciler::default().plan(&pending, G).is_empty());
        // Enough voters: no promotion.
        let full = Conf {
            voters: vec![1, 2, 3],
            learners: vec![],
        };
        assert!(Reconciler::default()
            .plan(&round(&view, &full, &sw, Instant::now()), G)
            .is_empty());
    }

    #[test]
    fn a_dead_server_is_marked_down_then_removed_and_replaced() {
        let mut rec = Reconciler::default();
        let mut view = View {
            view: 5,
            next_server: 5,
            members: vec![
                member(1, Role::Voter, Status::Up),
                member(2, Role::Voter, Status::Up),
                member(3, Role::Voter, Status::Up),
                member(4, Role::Learner, Status::Up),
            ],
        };
        let conf = Conf {
            voters: vec![1, 2, 3],
            learners: vec![4],
        };
        let t0 = Instant::now();
        let sw = swim(&[
            (1, SwimState::Alive),
            (2, SwimState::Down),
            (3, SwimState::Alive),
            (4, SwimState::Alive),
        ]);
        assert!(rec.plan(&round(&view, &conf, &sw, t0), G).is_empty());
        let t1 = t0 + G.mark_down_after;
        assert_eq!(
            rec.plan(&round(&view, &conf, &sw, t1), G),
            [Action::MarkDown(2)]
        );
        view.members[1].status = Status::Down;
        let t2 = t0 + G.remove_after;
        assert_eq!(
            rec.plan(&round(&view, &conf, &sw, t2), G),
            [Action::Remove(2)]
        );
        view.members.remove(1);
        let conf = Conf {
            voters: vec![1, 3],
            learners: vec![4],
        };
        let t3 = t2 + Duration::from_millis(10);
        assert_eq!(
            rec.plan(&round(&view, &conf, &sw, t3), G),
            [Action::Promote(4)]
        );
    }

    #[test]
    fn suspects_are_not_down_and_the_coordinator_never_removes_itself() {
        let mut rec = Reconciler::default();
        let view = View {
            view: 2,
            next_server: 3,
            members: vec![
                member(1, Role::Voter, Status::Up),
                member(2, Role::Voter, Status::Down),
            ],
        };
        let conf = Conf {
            voters: vec![1, 2],
            learners: vec![],
        };
        let t0 = Instant::now();
        let sw = swim(&[(1, SwimState::Down), (2, SwimState::Suspect)]);
        let later = t0 + G.remove_after * 2;
        assert!(rec.plan(&round(&view, &conf, &sw, t0), G).is_empty());
        assert!(rec.plan(&round(&view, &conf, &sw, later), G).is_empty());
        // Alive again: marked up, with its generation.
        let sw = swim(&[(2, SwimState::Alive)]);
        assert_eq!(
            rec.plan(&round(&view, &conf, &sw, later), G),
            [Action::MarkUp(2, 102)]
        );
    }
}
