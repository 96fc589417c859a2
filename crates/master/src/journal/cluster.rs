//! Cluster events in the journal: what the cluster thread saw (members up
//! and down, views, elections, coordinators), each with its HLC stamp, so
//! that `master report` can merge the timelines of several servers and
//! check that no term had two coordinators.
//!
//! The cluster thread records through a [`ClusterJournal`], a cloneable
//! handle on the journal's queue: it never waits for the disk, and beyond
//! [`MAX_QUEUED_CLUSTER_EVENTS`] waiting events it drops and counts them.

use super::*;

/// Cluster events that may wait for the writer; beyond, they are dropped
/// and counted ([`ClusterJournal::shed`]). A cluster makes a few events per
/// second, the writer commits every 10 ms: only a stalled disk reaches it.
pub const MAX_QUEUED_CLUSTER_EVENTS: usize = 4096;

/// What happened in the cluster. The journal stores [`ClusterEventKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterEventKind {
    /// `subject` became a member (the membership protocol saw it alive).
    MemberUp,
    /// `subject` was declared down and left the membership.
    MemberDown,
    /// This node installed view number `view`; `detail` lists its members.
    View,
    /// This node started an election for `term`.
    Election,
    /// `subject` is the coordinator (raft leader) of `term`, as this node
    /// learned it (it won, or heard from the winner).
    Coordinator,
    /// This node stopped being coordinator of `term`.
    StepDown,
}

impl ClusterEventKind {
    /// Every kind.
    pub const ALL: [ClusterEventKind; 6] = [
        ClusterEventKind::MemberUp,
        ClusterEventKind::MemberDown,
        ClusterEventKind::View,
        ClusterEventKind::Election,
        ClusterEventKind::Coordinator,
        ClusterEventKind::StepDown,
    ];

    /// The kind as the journal's `cluster_events.kind` stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterEventKind::MemberUp => "member_up",
            ClusterEventKind::MemberDown => "member_down",
            ClusterEventKind::View => "view",
            ClusterEventKind::Election => "election",
            ClusterEventKind::Coordinator => "coordinator",
            ClusterEventKind::StepDown => "step_down",
        }
    }
}

/// One `cluster_events` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    /// The HLC stamp (its NTP64 time) of the event; 0: stamp it when it is
    /// recorded. The cluster thread passes the stamp it already took (the
    /// one on the datagram that told it, or the one it sent).
    pub hlc: u64,
    /// Wall time, unix microseconds; 0: when it is recorded.
    pub ts_unix_us: i64,
    /// The node that recorded it (this server's cluster node id).
    pub node: String,
    /// What happened.
    pub kind: ClusterEventKind,
    /// The raft term, where there is one.
    pub term: Option<u64>,
    /// The view number, where there is one.
    pub view: Option<u64>,
    /// The node the event is about (a member, a coordinator).
    pub subject: Option<String>,
    /// Anything else, for humans (a view's members).
    pub detail: Option<String>,
}

impl ClusterEvent {
    /// An event of `kind` recorded by `node`, stamped when recorded, with
    /// no term, view, subject or detail.
    pub fn new(node: impl Into<String>, kind: ClusterEventKind) -> ClusterEvent {
        ClusterEvent {
            hlc: 0,
            ts_unix_us: 0,
            node: node.into(),
            kind,
            term: None,
            view: None,
            subject: None,
            detail: None,
        }
    }

    /// With this term.
    pub fn term(mut self, term: u64) -> ClusterEvent {
        self.term = Some(term);
        self
    }

    /// With this view number.
    pub fn view(mut self, view: u64) -> ClusterEvent {
        self.view = Some(view);
        self
    }

    /// About this node.
    pub fn subject(mut self, subject: impl Into<String>) -> ClusterEvent {
        self.subject = Some(subject.into());
        self
    }

    /// With this detail.
    pub fn detail(mut self, detail: impl Into<String>) -> ClusterEvent {
        self.detail = Some(detail.into());
        self
    }

    /// With this HLC stamp (instead of one taken when recorded).
    pub fn stamped(mut self, stamp: &uhlc::Timestamp) -> ClusterEvent {
        self.hlc = stamp.get_time().0;
        self
    }
}

/// The cluster thread's handle on the journal: `Send`, `Sync`, cheap to
/// clone, usable from any thread while the journal is open; events
/// recorded after it closed are counted as shed.
#[derive(Clone)]
pub struct ClusterJournal {
    pub(super) shared: Arc<Shared>,
    pub(super) clock: Clock,
}

impl fmt::Debug for ClusterJournal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterJournal")
            .field("shed", &self.shed())
            .finish()
    }
}

impl ClusterJournal {
    /// Queues `event` for the writer, stamping it now (HLC and wall time)
    /// where it carries no stamp. Never waits for the disk.
    pub fn record(&self, mut event: ClusterEvent) {
        if event.hlc == 0 {
            event.hlc = self.clock.stamp();
        }
        if event.ts_unix_us == 0 {
            event.ts_unix_us = now_unix_us();
        }
        let mut q = self.shared.lock();
        if q.closing || q.cluster.len() >= MAX_QUEUED_CLUSTER_EVENTS {
            drop(q);
            self.shared.cluster_shed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.cluster.push(event);
        let wake = q.writer_idle;
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Cluster events dropped so far (the queue was full, or the journal
    /// closed).
    pub fn shed(&self) -> u64 {
        self.shared.cluster_shed.load(Ordering::Relaxed)
    }
}
