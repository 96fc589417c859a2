//! The master's side of a group of servers (`--cluster-addr`): the cluster
//! thread's options and key, its life along the master's phases, and the
//! body of a `members` reply. Without `--cluster-addr` the group is
//! [`Group::Off`]: no thread, no socket, and `members` names this server
//! alone.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use cluster::{ClusterKey, Published};

use crate::journal::{ClusterEvent, ClusterEventKind, ClusterJournal};

/// How the master joins a group.
#[derive(Clone)]
pub struct GroupOptions {
    /// The cluster port.
    pub cluster_addr: SocketAddr,
    /// Seeds (none: found a group).
    pub join: Vec<SocketAddr>,
    /// Timer profile.
    pub profile: cluster::Profile,
    /// The shared key, read at start.
    pub key: Option<ClusterKey>,
    /// Voters wanted.
    pub voters: usize,
    /// The master's hybrid logical clock (cluster datagrams and events are
    /// stamped with it).
    pub hlc: Arc<uhlc::HLC>,
}

impl std::fmt::Debug for GroupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupOptions")
            .field("cluster_addr", &self.cluster_addr)
            .field("join", &self.join)
            .field("profile", &self.profile)
            .field("key", &self.key.is_some())
            .field("voters", &self.voters)
            .finish_non_exhaustive()
    }
}

/// Reads `--cluster-key`: a regular file (not a symlink), readable by its
/// owner only, holding at least 16 bytes.
///
/// # Errors
/// One line saying what is wrong with the file.
pub fn read_key(path: &Path) -> anyhow::Result<ClusterKey> {
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open the cluster key {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("the cluster key {} is not a regular file", path.display());
    }
    if meta.mode() & 0o077 != 0 {
        bail!(
            "the cluster key {} is readable by others (mode {:o}): chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        );
    }
    let mut bytes = Vec::new();
    file.by_ref()
        .take(4096)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read the cluster key {}", path.display()))?;
    ClusterKey::new(&bytes).with_context(|| {
        format!(
            "the cluster key {} is shorter than {} bytes",
            path.display(),
            protocol::cluster::MIN_KEY_LEN
        )
    })
}

/// Where this server tells the group it serves: its bound address, or,
/// bound to a wildcard, that port on the cluster address's IP.
pub fn advertised(service: SocketAddr, cluster: SocketAddr) -> SocketAddr {
    if service.ip().is_unspecified() {
        SocketAddr::new(cluster.ip(), service.port())
    } else {
        service
    }
}

/// The journal's row for a cluster event, recorded by `node` (this
/// server's cluster address); `None` for events the journal does not keep.
fn journal_row(node: &str, e: &cluster::Event) -> Option<ClusterEvent> {
    use cluster::EventKind as E;
    let kind = match e.kind {
        E::SwimUp | E::SwimRename => ClusterEventKind::MemberUp,
        E::SwimDown => ClusterEventKind::MemberDown,
        E::BecameCoordinator => ClusterEventKind::Coordinator,
        E::SteppedDown => ClusterEventKind::StepDown,
        E::ViewApplied | E::Admitted => ClusterEventKind::View,
        E::SwimIdle | E::Restarted => return None,
    };
    let subject = match (e.kind, e.subject) {
        // The coordinator names itself by its cluster address, as `node`.
        (E::BecameCoordinator, _) | (_, 0) => node.to_owned(),
        (_, id) => format!("{id:016x}"),
    };
    Some(
        ClusterEvent::new(node, kind)
            .stamped(&e.hlc)
            .term(e.term)
            .view(e.view)
            .subject(subject)
            .detail(format!("{}: {}", e.kind.as_str(), e.detail)),
    )
}

/// The group along the master's life.
pub enum Group {
    /// No `--cluster-addr`.
    Off,
    /// The cluster port is bound; the thread starts once the pool serves.
    Bound(Box<cluster::Bound>),
    /// The cluster thread runs.
    Running(cluster::Handle),
    /// Told to leave (draining or stopping); the thread ends within one
    /// of its turns.
    Leaving(cluster::Handle),
    /// Gone.
    Left,
}

impl Group {
    /// Binds the cluster port for `opts`, told that this server serves at
    /// `service`.
    ///
    /// # Errors
    /// When the cluster port cannot be bound.
    pub fn bind(
        opts: GroupOptions,
        service: SocketAddr,
        journal: Option<ClusterJournal>,
    ) -> anyhow::Result<Group> {
        // The journal names this server by its bound cluster port (with
        // `--cluster-addr IP:0`, the port the kernel chose), known once
        // bound and before the thread, the only source of events, starts.
        let node = Arc::new(OnceLock::new());
        let named = node.clone();
        let cfg = cluster::Config {
            cluster_addr: opts.cluster_addr,
            service_addr: advertised(service, opts.cluster_addr),
            join: opts.join,
            timing: cluster::Timing::of(opts.profile),
            voters: opts.voters,
            key: opts.key,
            hlc: opts.hlc,
            // Lifecycle lines, and the journal's `cluster_events`.
            on_event: Box::new(move |e| {
                log::info!("{e}");
                let node = named.get().map_or("", String::as_str);
                if let Some((j, row)) = journal.as_ref().zip(journal_row(node, e)) {
                    j.record(row);
                }
            }),
        };
        let bound = cluster::bind(cfg)?;
        let _ = node.set(bound.local_addr()?.to_string());
        Ok(Group::Bound(Box::new(bound)))
    }

    /// Starts the cluster thread (once the pool serves: a member is
    /// always ready to answer).
    ///
    /// # Errors
    /// When the thread cannot start.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if let Group::Bound(_) = self {
            let Group::Bound(b) = std::mem::replace(self, Group::Off) else {
                unreachable!("matched above")
            };
            *self = Group::Running(b.start()?);
        }
        Ok(())
    }

    /// Leaves the group (draining or stopping): the others learn it at
    /// once and stop sending clients here. Does not wait for the thread.
    pub fn leave(&mut self) {
        match std::mem::replace(self, Group::Left) {
            Group::Running(h) => {
                h.leave();
                *self = Group::Leaving(h);
            }
            Group::Off => *self = Group::Off,
            other => *self = other,
        }
    }

    /// Leaves, and waits for the cluster thread to end (the master's last
    /// step).
    pub fn finish(&mut self) {
        match std::mem::replace(self, Group::Left) {
            Group::Running(h) | Group::Leaving(h) => h.stop(),
            Group::Off => *self = Group::Off,
            Group::Bound(_) | Group::Left => {}
        }
    }

    /// What the cluster thread last published, in cluster mode.
    pub fn published(&self) -> Option<Arc<Published>> {
        match self {
            Group::Bound(b) => Some(b.published()),
            Group::Running(h) | Group::Leaving(h) => Some(h.published()),
            Group::Off | Group::Left => None,
        }
    }
}

/// The body of a `members` reply. Alone (`mode` `single`), this server is
/// server 1 and always up; in a group (`mode` `cluster`), the view as
/// applied here, the term, the coordinator, and each member's SWIM state
/// as seen from here.
pub fn members_json(group: &Group, service: SocketAddr) -> Map<String, Value> {
    let body = match group.published() {
        None => json!({
            "mode": if matches!(group, Group::Left) { "leaving" } else { "single" },
            "view": 0,
            "term": 0,
            "coordinator": Value::Null,
            "stale": matches!(group, Group::Left),
            "members": [{
                "server": 1,
                "addr": service.to_string(),
                "status": if matches!(group, Group::Left) { "down" } else { "up" },
                "role": "single",
            }],
        }),
        Some(p) => cluster_body(&p),
    };
    match body {
        Value::Object(m) => m,
        _ => unreachable!("json! of an object literal"),
    }
}

fn cluster_body(p: &Published) -> Value {
    let server_of = |node: u64| p.view.member(node).map(|m| m.server);
    let members: Vec<Value> = p
        .view
        .members
        .iter()
        .map(|m| {
            json!({
                "server": m.server,
                "node": format!("{:016x}", m.node),
                "addr": m.service.to_string(),
                "cluster": m.cluster.to_string(),
                "status": m.status.as_str(),
                "role": m.role.as_str(),
                "swim": p.swim_of(m.node).map_or("unknown", |s| s.as_str()),
                "since_view": m.since,
            })
        })
        .collect();
    json!({
        "mode": "cluster",
        "node": format!("{:016x}", p.node),
        "server": server_of(p.node),
        "role": p.role.as_str(),
        "view": p.view.view,
        "term": p.term,
        "coordinator": p.coordinator.and_then(server_of),
        "coordinator_node": p.coordinator.map(|n| format!("{n:016x}")),
        "stale": p.stale,
        "members": members,
        "cluster_port": {
            "received": p.counters.received,
            "sent": p.counters.sent,
            "bad": p.counters.bad,
            "hlc_refused": p.counters.hlc_refused,
            "restarts": p.counters.restarts,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_wildcard_service_is_advertised_on_the_cluster_ip() {
        let c: SocketAddr = "10.1.2.3:7000".parse().unwrap();
        assert_eq!(
            advertised("0.0.0.0:10001".parse().unwrap(), c),
            "10.1.2.3:10001".parse().unwrap()
        );
        let s: SocketAddr = "127.0.0.2:10001".parse().unwrap();
        assert_eq!(advertised(s, c), s);
    }

    #[test]
    fn keys_must_be_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_key(&path).is_ok());
        std::fs::write(&path, b"short").unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(e.contains("shorter than 16 bytes"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(read_key(&link).is_err(), "a symlink is refused");
        assert!(read_key(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn alone_members_names_this_server() {
        let m = members_json(&Group::Off, "127.0.0.1:10001".parse().unwrap());
        assert_eq!(m["mode"], "single");
        assert_eq!(m["members"][0]["addr"], "127.0.0.1:10001");
        assert_eq!(m["members"][0]["status"], "up");
    }
}
