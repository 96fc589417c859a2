//! The Raft log in memory, with the applied view as its snapshot.
//!
//! raft-rs leaves storage to the application (its `MemStorage` keeps no
//! snapshot data and does not keep the term of a compacted index). This
//! one keeps the hard state, the log since the last compaction, and the
//! state applied so far (index, term, configuration, view): a snapshot is
//! that state, so a new learner or a lagging follower gets the whole view
//! in one message. The log is compacted up to the applied index once it
//! holds [`COMPACT_AT`] entries, so memory stays bounded.
//!
//! Nothing is written to disk: a restarted server has a new node id and
//! joins as a new server (docs/CLUSTER.md).

use protobuf::Message as _;
use raft::prelude::*;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use protocol::cluster::View;

/// Entries kept before the log is compacted.
pub const COMPACT_AT: usize = 256;

/// What has been applied: a snapshot's content.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The last applied index.
    pub index: u64,
    /// Its term.
    pub term: u64,
    /// The configuration as of that index.
    pub conf: ConfState,
    /// The view as of that index.
    pub view: View,
}

/// The Raft log and the applied state of one server.
#[derive(Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    /// The configuration the node starts with.
    initial_conf: ConfState,
    /// The last compacted index and its term.
    snap_index: u64,
    snap_term: u64,
    /// `entries[i].index == snap_index + 1 + i`.
    entries: Vec<Entry>,
    /// The applied state.
    pub applied: Applied,
}

impl LogStore {
    /// A store for a founder (`voters` = itself) or a joiner (no voters).
    ///
    /// A founder's log starts as if compacted at index 1, term 1, with
    /// itself as the only voter and an empty view: a joiner (whose log is
    /// empty) then always starts from a snapshot, which carries the
    /// configuration and the view, instead of replaying entries that
    /// assume a configuration it never saw (raft-rs's advice).
    pub fn new(voters: Vec<u64>) -> LogStore {
        let mut conf = ConfState::default();
        let founder = !voters.is_empty();
        conf.set_voters(voters);
        if !founder {
            return LogStore::default();
        }
        let hard_state = HardState {
            term: 1,
            commit: 1,
            ..HardState::default()
        };
        LogStore {
            hard_state,
            initial_conf: conf.clone(),
            snap_index: 1,
            snap_term: 1,
            entries: Vec::new(),
            applied: Applied {
                index: 1,
                term: 1,
                conf,
                view: View::default(),
            },
        }
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snap_index, |e| e.index)
    }

    /// Appends entries from a Ready, replacing any conflicting tail.
    pub fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first().map(|e| e.index) else {
            return;
        };
        // Entries at or below the compacted index are already applied.
        let skip = ents
            .iter()
            .take_while(|e| e.index <= self.snap_index)
            .count();
        let ents = &ents[skip..];
        if ents.is_empty() {
            return;
        }
        let first = first.max(ents[0].index);
        if first > self.last() + 1 {
            log::warn!(
                "raft log gap: last {}, appending from {first}; entries dropped",
                self.last()
            );
            return;
        }
        let keep = (first - self.snap_index - 1) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
    }

    /// Sets the hard state from a Ready.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Sets the commit index from a LightReady.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    /// Installs a snapshot from the coordinator: the view it carries
    /// replaces ours (a view that does not decode is replaced by an empty
    /// one, so that the log and Raft stay in step). `false` when it is
    /// older than the log's compacted part.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> bool {
        let meta = snap.get_metadata();
        if meta.index < self.snap_index {
            return false;
        }
        let view = View::decode(snap.get_data()).unwrap_or_else(|e| {
            log::warn!("raft snapshot at {} carries no view: {e}", meta.index);
            View::default()
        });
        self.snap_index = meta.index;
        self.snap_term = meta.term;
        self.entries.clear();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.applied = Applied {
            index: meta.index,
            term: meta.term,
            conf: meta.get_conf_state().clone(),
            view,
        };
        true
    }

    /// Drops applied entries once the log is long.
    pub fn maybe_compact(&mut self) {
        if self.entries.len() < COMPACT_AT || self.applied.index <= self.snap_index {
            return;
        }
        let upto = self.applied.index.min(self.last());
        let drop = (upto - self.snap_index) as usize;
        self.snap_term = self.entries[drop - 1].term;
        self.snap_index = upto;
        self.entries.drain(..drop);
    }

    /// Entries in the log now (for tests and stats).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.initial_conf.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.snap_index - 1) as usize;
        let hi = (high - self.snap_index - 1) as usize;
        let mut ents = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index {
            return Ok(self.snap_term);
        }
        if idx < self.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.snap_index - 1) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snap_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.applied.index < request_index || self.applied.index < self.snap_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        snap.set_data(self.applied.view.encode().into());
        let meta = snap.mut_metadata();
        meta.index = self.applied.index;
        meta.term = self.applied.term;
        meta.set_conf_state(self.applied.conf.clone());
        debug_assert!(snap.compute_size() > 0);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Entry::default()
        }
    }

    #[test]
    fn appends_replace_a_conflicting_tail() {
        let mut s = LogStore::new(vec![]);
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]);
        s.append(&[entry(2, 2)]);
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        assert_eq!(s.term(0).unwrap(), 0);
        assert!(s.term(3).is_err());
        let founder = LogStore::new(vec![7]);
        assert_eq!(founder.first_index().unwrap(), 2);
        assert_eq!(founder.term(1).unwrap(), 1);
        assert_eq!(founder.initial_state().unwrap().conf_state.voters, [7]);
        // A gap is refused.
        s.append(&[entry(9, 2)]);
        assert_eq!(s.last_index().unwrap(), 2);
    }

    #[test]
    fn compaction_keeps_the_term_of_the_compacted_index() {
        let mut s = LogStore::new(vec![]);
        let ents: Vec<Entry> = (1..=COMPACT_AT as u64 + 10).map(|i| entry(i, 3)).collect();
        s.append(&ents);
        s.applied.index = 200;
        s.applied.term = 3;
        s.maybe_compact();
        assert_eq!(s.first_index().unwrap(), 201);
        assert_eq!(s.term(200).unwrap(), 3);
        assert!(matches!(
            s.entries(5, 10, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            s.entries(201, 203, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            2
        );
        let snap = s.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 200);
        assert_eq!(View::decode(snap.get_data()).unwrap(), View::default());
        assert!(s.snapshot(201, 2).is_err());
    }

    #[test]
    fn a_snapshot_replaces_the_log_and_the_view() {
        let mut leader = LogStore::new(vec![1]);
        leader.applied.index = 7;
        leader.applied.term = 2;
        leader.applied.view.view = 7;
        leader.applied.view.next_server = 4;
        let snap = leader.snapshot(0, 2).unwrap();
        let mut joiner = LogStore::new(vec![]);
        assert!(joiner.apply_snapshot(&snap));
        assert_eq!(joiner.applied.view.next_server, 4);
        assert_eq!(joiner.first_index().unwrap(), 8);
        assert_eq!(joiner.term(7).unwrap(), 2);
        let mut junk = snap.clone();
        junk.mut_metadata().index = 9;
        junk.set_data(b"\xff\xff\xff\xff".to_vec().into());
        assert!(joiner.apply_snapshot(&junk));
        assert_eq!(joiner.applied.view, View::default());
        let mut old = snap.clone();
        old.mut_metadata().index = 3;
        assert!(!joiner.apply_snapshot(&old), "older than the compacted log");
    }
}
