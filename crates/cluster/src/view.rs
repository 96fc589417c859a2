//! Applying committed Raft entries to the view: pure functions, the same on
//! every server, so that equal logs give equal views.

use protocol::cluster::{Admission, Command, Role, Status, View, ViewMember, MAX_MEMBERS};

/// What an entry changed in the view (for events and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A server entered the view with this number.
    Admitted {
        /// Its node id.
        node: u64,
        /// Its server number.
        server: u32,
    },
    /// A server was marked down.
    MarkedDown {
        /// Its node id.
        node: u64,
        /// Its server number.
        server: u32,
    },
    /// A server was marked up again.
    MarkedUp {
        /// Its node id.
        node: u64,
        /// Its server number.
        server: u32,
    },
    /// A learner became a voter.
    Promoted {
        /// Its node id.
        node: u64,
        /// Its server number.
        server: u32,
    },
    /// A server left the view.
    Removed {
        /// Its node id.
        node: u64,
        /// Its server number.
        server: u32,
    },
}

/// A configuration change, as the view sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfChange {
    /// A new learner (with what it brings to its admission).
    AddLearner(Option<Admission>),
    /// A voter (a promoted learner).
    AddVoter(Option<Admission>),
    /// Out of the configuration.
    Remove,
}

/// Applies a normal entry's command at log `index`.
pub fn apply_command(view: &mut View, index: u64, cmd: &Command) -> Option<Change> {
    match *cmd {
        Command::Admit { node, admission } => admit(view, index, node, admission, Role::Voter),
        Command::MarkDown { node } => {
            let m = view.members.iter_mut().find(|m| m.node == node)?;
            if m.status == Status::Down {
                return None;
            }
            m.status = Status::Down;
            m.since = index;
            let server = m.server;
            view.view = index;
            Some(Change::MarkedDown { node, server })
        }
        Command::MarkUp { node, gen } => {
            let m = view.members.iter_mut().find(|m| m.node == node)?;
            if m.status == Status::Up {
                return None;
            }
            m.status = Status::Up;
            m.gen = gen;
            m.since = index;
            let server = m.server;
            view.view = index;
            Some(Change::MarkedUp { node, server })
        }
    }
}

/// Applies a configuration change of `node` at log `index`.
pub fn apply_conf_change(
    view: &mut View,
    index: u64,
    node: u64,
    change: ConfChange,
) -> Option<Change> {
    match change {
        ConfChange::AddLearner(admission) => match (view.member(node).is_some(), admission) {
            (false, Some(a)) => admit(view, index, node, a, Role::Learner),
            (true, _) => set_role(view, index, node, Role::Learner).map(|_| Change::Admitted {
                node,
                server: view.member(node).map_or(0, |m| m.server),
            }),
            (false, None) => None,
        },
        ConfChange::AddVoter(admission) => match (view.member(node).is_some(), admission) {
            (false, Some(a)) => admit(view, index, node, a, Role::Voter),
            (true, _) => {
                let server = set_role(view, index, node, Role::Voter)?;
                Some(Change::Promoted { node, server })
            }
            (false, None) => None,
        },
        ConfChange::Remove => {
            let at = view.members.iter().position(|m| m.node == node)?;
            let m = view.members.remove(at);
            view.view = index;
            Some(Change::Removed {
                node,
                server: m.server,
            })
        }
    }
}

fn set_role(view: &mut View, index: u64, node: u64, role: Role) -> Option<u32> {
    let m = view.members.iter_mut().find(|m| m.node == node)?;
    if m.role == role {
        return None;
    }
    m.role = role;
    let server = m.server;
    view.view = index;
    Some(server)
}

fn admit(view: &mut View, index: u64, node: u64, a: Admission, role: Role) -> Option<Change> {
    if let Some(m) = view.members.iter_mut().find(|m| m.node == node) {
        // Admitted again (its entry raced another): refresh, keep its number.
        m.service = a.service;
        m.cluster = a.cluster;
        m.gen = a.gen;
        m.status = Status::Up;
        m.role = role;
        m.since = index;
        let server = m.server;
        view.view = index;
        return Some(Change::Admitted { node, server });
    }
    if view.members.len() >= MAX_MEMBERS {
        return None;
    }
    let server = view.next_server.max(1);
    view.next_server = server + 1;
    view.members.push(ViewMember {
        node,
        server,
        service: a.service,
        cluster: a.cluster,
        gen: a.gen,
        status: Status::Up,
        role,
        since: index,
    });
    view.view = index;
    Some(Change::Admitted { node, server })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adm(i: u8) -> Admission {
        Admission {
            service: format!("127.0.0.{i}:10001").parse().unwrap(),
            cluster: format!("127.0.0.{i}:7000").parse().unwrap(),
            gen: u64::from(i),
        }
    }

    #[test]
    fn servers_are_numbered_in_order_of_admission() {
        let mut v = View::default();
        let c = apply_command(
            &mut v,
            2,
            &Command::Admit {
                node: 10,
                admission: adm(1),
            },
        );
        assert_eq!(
            c,
            Some(Change::Admitted {
                node: 10,
                server: 1
            })
        );
        let c = apply_conf_change(&mut v, 4, 20, ConfChange::AddLearner(Some(adm(2))));
        assert_eq!(
            c,
            Some(Change::Admitted {
                node: 20,
                server: 2
            })
        );
        assert_eq!((v.view, v.next_server), (4, 3));
        assert_eq!(v.member(20).unwrap().role, Role::Learner);
        let c = apply_conf_change(&mut v, 5, 20, ConfChange::AddVoter(None));
        assert_eq!(
            c,
            Some(Change::Promoted {
                node: 20,
                server: 2
            })
        );
        assert_eq!(v.member(20).unwrap().role, Role::Voter);
        // Removed, then a new server gets a new number.
        let c = apply_conf_change(&mut v, 9, 20, ConfChange::Remove);
        assert_eq!(
            c,
            Some(Change::Removed {
                node: 20,
                server: 2
            })
        );
        let c = apply_conf_change(&mut v, 11, 30, ConfChange::AddLearner(Some(adm(3))));
        assert_eq!(
            c,
            Some(Change::Admitted {
                node: 30,
                server: 3
            })
        );
        assert_eq!(v.view, 11);
    }

    #[test]
    fn down_and_up_change_the_view_once() {
        let mut v = View::default();
        apply_command(
            &mut v,
            1,
            &Command::Admit {
                node: 10,
                admission: adm(1),
            },
        );
        let down = Command::MarkDown { node: 10 };
        assert!(apply_command(&mut v, 2, &down).is_some());
        assert_eq!(apply_command(&mut v, 3, &down), None);
        assert_eq!(
            v.view, 2,
            "a command that changes nothing leaves the view number"
        );
        assert_eq!(v.member(10).unwrap().status, Status::Down);
        let up = Command::MarkUp { node: 10, gen: 9 };
        assert_eq!(
            apply_command(&mut v, 4, &up),
            Some(Change::MarkedUp {
                node: 10,
                server: 1
            })
        );
        assert_eq!((v.member(10).unwrap().gen, v.view), (9, 4));
        // Unknown nodes change nothing.
        assert_eq!(
            apply_command(&mut v, 5, &Command::MarkDown { node: 99 }),
            None
        );
        assert_eq!(
            apply_conf_change(&mut v, 5, 99, ConfChange::AddVoter(None)),
            None
        );
    }

    #[test]
    fn the_view_holds_at_most_max_members() {
        let mut v = View::default();
        for i in 0..MAX_MEMBERS as u64 + 3 {
            apply_conf_change(&mut v, i + 1, 100 + i, ConfChange::AddLearner(Some(adm(1))));
        }
        assert_eq!(v.members.len(), MAX_MEMBERS);
    }
}
