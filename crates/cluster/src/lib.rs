//! The cluster thread of a `master` started with `--cluster-addr`: several
//! servers (each a master with its own pool) form a group over a private UDP
//! *cluster port*. Nothing here runs without that option.
//!
//! * Membership and failure detection: SWIM gossip (the `foca` crate). A
//!   server joins through any one member (`--join`); the others learn of it
//!   by gossip; a crashed one is suspected, then declared down.
//! * The coordinator: the Raft leader (the `raft` crate, tikv/raft-rs). It
//!   admits servers into a numbered *view* of the group (the view number is
//!   the Raft log index of the last change), gives each a server number,
//!   marks servers down and up from what SWIM says, keeps `--voters` voters
//!   and promotes a learner when a voter stays dead. Every server applies
//!   the same log, so every server has the same view for a view number.
//! * Causal time: every cluster datagram carries a hybrid-logical-clock
//!   stamp (the `uhlc` crate), and every [`Event`] is stamped.
//!
//! All three crates are sans-I/O: one thread ([`node`]) owns the socket,
//! the timers, foca and the Raft node, and publishes a [`Published`]
//! snapshot that the master's loop reads to answer `{"op":"members"}`.
//!
//! # Layout
//! * [`timing`]: the `lan` and `test` timer profiles.
//! * [`identity`]: a member's SWIM identity.
//! * [`storage`]: the Raft log in memory, the applied view as snapshot.
//! * [`view`]: committed entries applied to the view (pure).
//! * [`reconcile`]: the coordinator's decisions (pure).
//! * [`node`]: the thread: socket, envelope, foca, Raft, events.

pub mod identity;
pub mod node;
pub mod reconcile;
pub mod storage;
pub mod timing;
pub mod view;

use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context;

pub use protocol::cluster::{ClusterKey, Role, Status, View, ViewMember};
pub use reconcile::SwimState;
pub use timing::{Profile, Timing};

/// Everything the cluster thread is started with.
pub struct Config {
    /// The cluster port to bind.
    pub cluster_addr: SocketAddr,
    /// Where this server serves clients (told to the others).
    pub service_addr: SocketAddr,
    /// Members to join through (none: found a new group).
    pub join: Vec<SocketAddr>,
    /// The timers.
    pub timing: Timing,
    /// Voters wanted (the coordinator promotes learners up to this).
    pub voters: usize,
    /// The shared key: datagrams without its MAC are dropped unread.
    pub key: Option<ClusterKey>,
    /// The master's hybrid logical clock.
    pub hlc: Arc<uhlc::HLC>,
    /// Called with every event (the master logs them; its journal can
    /// record them).
    pub on_event: Box<dyn FnMut(&Event) + Send>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("cluster_addr", &self.cluster_addr)
            .field("service_addr", &self.service_addr)
            .field("join", &self.join)
            .field("voters", &self.voters)
            .field("key", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

/// What happened in the cluster, as one server saw it.
#[derive(Debug, Clone)]
pub struct Event {
    /// The HLC stamp (causal order across servers' journals).
    pub hlc: uhlc::Timestamp,
    /// What happened.
    pub kind: EventKind,
    /// The Raft term then.
    pub term: u64,
    /// The view number then.
    pub view: u64,
    /// The node the event is about (0: this one, or none).
    pub subject: u64,
    /// A readable sentence.
    pub detail: String,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// SWIM: a member is up (joined, or back).
    SwimUp,
    /// SWIM: a member was declared down.
    SwimDown,
    /// SWIM: a member rejoined with a new generation.
    SwimRename,
    /// SWIM: this server sees no member alive, or some again.
    SwimIdle,
    /// This server became the coordinator.
    BecameCoordinator,
    /// This server stopped being the coordinator.
    SteppedDown,
    /// A change of the view was applied here.
    ViewApplied,
    /// The coordinator admitted a server (on the coordinator).
    Admitted,
    /// The cluster thread restarted after a failure, as a new member.
    Restarted,
}

impl EventKind {
    /// The kind's name (for logs and the journal).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SwimUp => "swim_up",
            EventKind::SwimDown => "swim_down",
            EventKind::SwimRename => "swim_rename",
            EventKind::SwimIdle => "swim_idle",
            EventKind::BecameCoordinator => "became_coordinator",
            EventKind::SteppedDown => "stepped_down",
            EventKind::ViewApplied => "view_applied",
            EventKind::Admitted => "admitted",
            EventKind::Restarted => "restarted",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster: {} (term {}, view {}): {}",
            self.kind.as_str(),
            self.term,
            self.view,
            self.detail
        )
    }
}

/// This server's place in the election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// Not in the Raft configuration yet (waiting to be admitted).
    Joining,
    /// The coordinator.
    Coordinator,
    /// A voter following the coordinator.
    Follower,
    /// A voter asking for votes (or pre-votes).
    Candidate,
    /// A non-voting member.
    Learner,
}

impl NodeRole {
    /// As `members` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Joining => "joining",
            NodeRole::Coordinator => "coordinator",
            NodeRole::Follower => "follower",
            NodeRole::Candidate => "candidate",
            NodeRole::Learner => "learner",
        }
    }
}

/// Counters of the cluster port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams dropped: bad envelope, wrong MAC, unparsable or refused
    /// SWIM or Raft message.
    pub bad: u64,
    /// HLC stamps refused (too far ahead of this clock).
    pub hlc_refused: u64,
    /// Times the cluster thread restarted after a failure.
    pub restarts: u64,
}

/// What the cluster thread publishes for the master: read to answer
/// `members`. Replaced whole (an `Arc` swap), never mutated.
#[derive(Debug, Clone)]
pub struct Published {
    /// This server's node id.
    pub node: u64,
    /// Its cluster port.
    pub cluster: SocketAddr,
    /// Its service address.
    pub service: SocketAddr,
    /// The Raft term it is in.
    pub term: u64,
    /// The coordinator's node id, when one is known.
    pub coordinator: Option<u64>,
    /// Its role.
    pub role: NodeRole,
    /// The view may be out of date: no coordinator is known (no quorum
    /// here), or this server is not admitted yet.
    pub stale: bool,
    /// The view as applied here.
    pub view: View,
    /// SWIM's state of each member, by node id.
    pub swim: Vec<(u64, SwimState)>,
    /// The cluster port's counters.
    pub counters: Counters,
}

impl Published {
    /// What is known before the thread has run.
    fn initial(cluster: SocketAddr, service: SocketAddr) -> Published {
        Published {
            node: 0,
            cluster,
            service,
            term: 0,
            coordinator: None,
            role: NodeRole::Joining,
            stale: true,
            view: View::default(),
            swim: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// The SWIM state of `node`, if SWIM knows it.
    pub fn swim_of(&self, node: u64) -> Option<SwimState> {
        if node == self.node {
            return Some(SwimState::Alive);
        }
        self.swim.iter().find(|(n, _)| *n == node).map(|(_, s)| *s)
    }
}

/// Shared between the cluster thread and the master.
#[derive(Debug)]
struct Shared {
    published: Mutex<Arc<Published>>,
    stop: AtomicBool,
}

/// The cluster socket, bound, and the thread not started yet.
pub struct Bound {
    cfg: Config,
    socket: UdpSocket,
    shared: Arc<Shared>,
}

/// Binds the cluster port (so that a bad address fails the start at once).
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(cfg: Config) -> anyhow::Result<Bound> {
    let socket = UdpSocket::bind(cfg.cluster_addr)
        .with_context(|| format!("cannot bind the cluster port {}", cfg.cluster_addr))?;
    let cluster = socket.local_addr()?;
    let shared = Arc::new(Shared {
        published: Mutex::new(Arc::new(Published::initial(cluster, cfg.service_addr))),
        stop: AtomicBool::new(false),
    });
    Ok(Bound {
        cfg,
        socket,
        shared,
    })
}

impl Bound {
    /// The cluster port's address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Starts the cluster thread.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(self) -> anyhow::Result<Handle> {
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || node::run(self.cfg, self.socket, &self.shared))
            .context("cannot start the cluster thread")?;
        Ok(Handle {
            shared,
            thread: Some(thread),
        })
    }

    /// The snapshot before the thread runs (for `members` while booting).
    pub fn published(&self) -> Arc<Published> {
        self.shared.published()
    }
}

impl Shared {
    fn published(&self) -> Arc<Published> {
        self.published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, p: Published) {
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(p);
    }
}

/// The running cluster thread.
pub struct Handle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Handle {
    /// The latest snapshot (a lock held for one `Arc` clone).
    pub fn published(&self) -> Arc<Published> {
        self.shared.published()
    }

    /// Asks the thread to leave the group (SWIM tells the others at once)
    /// and stop; returns without waiting.
    pub fn leave(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    /// Leaves, and waits for the thread to end (one loop turn, < 100 ms).
    pub fn stop(mut self) {
        self.leave();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.leave();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
