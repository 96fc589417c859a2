//! The cluster thread: one blocking loop over the cluster socket that
//! drives foca (SWIM) and a raft-rs `RawNode`, both sans-I/O.
//!
//! Each turn: wait for a datagram until the nearest deadline (a foca timer,
//! the Raft tick, the coordinator's reconcile round, a publish), accept it
//! (envelope, MAC, HLC) and hand it to foca or Raft; fire due foca timers
//! and Raft ticks; send what foca wrote; turn foca's notifications into
//! events; on the coordinator, reconcile SWIM with the view and propose;
//! handle Raft's Ready (send, persist in memory, apply committed entries to
//! the view); note role changes; publish the snapshot the master reads.
//!
//! A panic inside foca or raft-rs (raft-rs panics on some inconsistent
//! input that only a forged message can carry; we drop the ones we know
//! of) ends that member, not the process: the thread starts again as a
//! new member (new node id), and the master serves throughout.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use foca::{Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use protobuf::Message as _;
use raft::prelude::*;
use raft::{SnapshotStatus, StateRole};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use protocol::cluster::{self as wire, Admission, Command, Kind};

use crate::identity::Id;
use crate::reconcile::{Action, Conf, Graces, Reconciler, Round, SwimState};
use crate::storage::LogStore;
use crate::view::{self, Change};
use crate::{Config, Counters, Event, EventKind, NodeRole, Published, Shared};

/// The longest the loop sleeps (so that a stop is seen promptly).
const MAX_WAIT: Duration = Duration::from_millis(50);
/// How often the snapshot is published even when nothing changed (SWIM
/// states move without notifications).
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often a run of bad datagrams is logged.
const BAD_LOG_EVERY: Duration = Duration::from_secs(10);
/// After a failure, how long before the member starts again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

type Swim = Foca<Id, PostcardCodec, StdRng, NoCustomBroadcast>;

/// Runs members until a stop is asked; a member that panics is replaced.
pub(crate) fn run(mut cfg: Config, socket: UdpSocket, shared: &Shared) {
    let mut counters = Counters::default();
    loop {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let mut member = Member::new(&mut cfg, &socket, shared, counters)?;
            member.run()
        }));
        match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => log::error!("cluster: {e:#}"),
            Err(_) => log::error!("cluster: the member failed (a panic in foca or raft)"),
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        counters = shared.published().counters;
        counters.restarts += 1;
        std::thread::sleep(RESTART_PAUSE);
        let event = Event {
            hlc: cfg.hlc.new_timestamp(),
            kind: EventKind::Restarted,
            term: 0,
            view: 0,
            subject: 0,
            detail: format!(
                "the cluster thread starts again as a new member (restart {})",
                counters.restarts
            ),
        };
        (cfg.on_event)(&event);
    }
}

/// foca's runtime: what it sends, the timers it sets, what it notifies.
#[derive(Default)]
struct Io {
    out: Vec<(SocketAddr, Vec<u8>)>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: HashMap<u64, Timer<Id>>,
    seq: u64,
    notes: Vec<OwnedNotification<Id>>,
}

impl foca::Runtime<Id> for Io {
    fn notify(&mut self, n: foca::Notification<'_, Id>) {
        self.notes.push(n.to_owned());
    }

    fn send_to(&mut self, to: Id, data: &[u8]) {
        self.out.push((to.cluster, data.to_vec()));
    }

    fn submit_after(&mut self, timer: Timer<Id>, after: Duration) {
        self.seq += 1;
        self.pending.insert(self.seq, timer);
        self.timers
            .push(Reverse((Instant::now() + after, self.seq)));
    }
}

/// Forwards raft-rs's slog records to `log` at debug level.
struct LogDrain;

impl slog::Drain for LogDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        log::debug!(target: "cluster::raft", "{}", record.msg());
        Ok(())
    }
}

/// One member's life: its identity, foca, its Raft node, and the loop.
struct Member<'a> {
    cfg: &'a mut Config,
    socket: &'a UdpSocket,
    shared: &'a Shared,
    node: u64,
    foca: Swim,
    io: Io,
    raft: RawNode<LogStore>,
    reconciler: Reconciler,
    counters: Counters,
    next_tick: Instant,
    next_reconcile: Instant,
    next_publish: Instant,
    last_state: StateRole,
    last_leader: u64,
    bad_since_log: u64,
    bad_logged_at: Option<Instant>,
    last_bad: String,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
    payload_buf: Vec<u8>,
}

impl<'a> Member<'a> {
    fn new(
        cfg: &'a mut Config,
        socket: &'a UdpSocket,
        shared: &'a Shared,
        counters: Counters,
    ) -> anyhow::Result<Member<'a>> {
        let mut rng = StdRng::from_os_rng();
        let node = loop {
            let n = rng.next_u64();
            if n != 0 {
                break n;
            }
        };
        let gen = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64)
            + counters.restarts;
        let cluster = socket.local_addr()?;
        let me = Id {
            cluster,
            service: cfg.service_addr,
            node,
            gen,
        };
        let max_swim = wire::max_payload(cfg.key.as_ref());
        let mut foca = Foca::new(me, cfg.timing.foca(max_swim), rng, PostcardCodec);
        let mut io = Io::default();
        let seeds: Vec<SocketAddr> = cfg.join.iter().copied().filter(|s| *s != cluster).collect();
        // Seeds are taught as down members: foca keeps knocking at them
        // (periodic announce to down members) until one answers.
        foca.apply_many(
            seeds
                .iter()
                .map(|s| foca::Member::new(Id::seed(*s), 0, foca::State::Down)),
            false,
            &mut io,
        )
        .map_err(|e| anyhow::anyhow!("foca: {e}"))?;
        for s in &seeds {
            let _ = foca.announce(Id::seed(*s), &mut io);
        }
        let founder = cfg.join.is_empty();
        let storage = LogStore::new(if founder { vec![node] } else { vec![] });
        let logger = slog::Logger::root(LogDrain, slog::o!());
        let mut raft = RawNode::new(&cfg.timing.raft(node), storage, &logger)
            .map_err(|e| anyhow::anyhow!("raft: {e}"))?;
        if founder {
            // A group of one elects itself at once.
            let _ = raft.campaign();
        }
        log::info!(
            "cluster: node {node:016x} on {cluster} (service {}), {}",
            cfg.service_addr,
            if founder {
                "founding a new group".to_owned()
            } else {
                format!(
                    "joining through {}",
                    seeds
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        let now = Instant::now();
        Ok(Member {
            node,
            foca,
            io,
            raft,
            reconciler: Reconciler::default(),
            counters,
            next_tick: now + cfg.timing.tick,
            next_reconcile: now,
            next_publish: now,
            last_state: StateRole::Follower,
            last_leader: 0,
            bad_since_log: 0,
            bad_logged_at: None,
            last_bad: String::new(),
            recv_buf: vec![0u8; wire::MAX_CLUSTER_DATAGRAM + 1],
            send_buf: Vec::with_capacity(wire::MAX_CLUSTER_DATAGRAM),
            payload_buf: Vec::with_capacity(wire::MAX_CLUSTER_DATAGRAM),
            cfg,
            socket,
            shared,
        })
    }

    fn run(&mut self) -> anyhow::Result<()> {
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                self.leave();
                return Ok(());
            }
            self.receive();
            let now = Instant::now();
            self.fire_timers(now);
            self.tick(now);
            self.flush_swim();
            self.notifications();
            if self.raft.raft.state == StateRole::Leader && now >= self.next_reconcile {
                self.next_reconcile = now + self.cfg.timing.reconcile_every;
                self.reconcile(now);
            }
            self.handle_ready();
            self.watch_role(now);
            if now >= self.next_publish {
                self.next_publish = now + PUBLISH_EVERY;
                self.publish();
            }
        }
    }

    /// Waits for one datagram until the nearest deadline, and handles it.
    fn receive(&mut self) {
        let now = Instant::now();
        let mut until = self.next_tick.min(self.next_publish);
        if self.raft.raft.state == StateRole::Leader {
            until = until.min(self.next_reconcile);
        }
        if let Some(Reverse((t, _))) = self.io.timers.peek() {
            until = until.min(*t);
        }
        let wait = until
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), MAX_WAIT);
        let _ = self.socket.set_read_timeout(Some(wait));
        let n = match self.socket.recv_from(&mut self.recv_buf) {
            Ok((n, _from)) => n,
            Err(_) => return, // timed out (or an error worth nothing here)
        };
        self.counters.received += 1;
        let datagram = std::mem::take(&mut self.recv_buf);
        self.on_datagram(&datagram[..n]);
        self.recv_buf = datagram;
    }

    fn on_datagram(&mut self, datagram: &[u8]) {
        let env = match wire::decode_envelope(datagram, self.cfg.key.as_ref()) {
            Ok(e) => e,
            Err(e) => return self.bad(&e.to_string()),
        };
        let stamp = uhlc::Timestamp::new(uhlc::NTP64(env.hlc), *self.cfg.hlc.get_id());
        if self.cfg.hlc.update_with_timestamp(&stamp).is_err() {
            self.counters.hlc_refused += 1;
        }
        match env.kind {
            Kind::Swim => {
                if let Err(e) = self.foca.handle_data(env.payload, &mut self.io) {
                    self.bad(&format!("SWIM message refused: {e}"));
                }
            }
            Kind::Raft => match Message::parse_from_bytes(env.payload) {
                Ok(m) => match self.refuse(&m) {
                    Some(why) => self.bad(why),
                    None => {
                        if let Err(e) = self.raft.step(m) {
                            log::debug!("cluster: raft step: {e}");
                        }
                    }
                },
                Err(e) => self.bad(&format!("Raft message does not parse: {e}")),
            },
        }
    }

    /// Why a Raft message from the network is not stepped: not for us, a
    /// type that only a node makes for itself (or a proposal: only the
    /// coordinator proposes), or content raft-rs would panic on.
    fn refuse(&self, m: &Message) -> Option<&'static str> {
        use MessageType::*;
        if m.to != self.node || m.from == 0 || m.from == self.node {
            return Some("Raft message not addressed to this node");
        }
        let log = &self.raft.raft.raft_log;
        match m.get_msg_type() {
            MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
            | MsgHeartbeatResponse
            | MsgSnapshot
            | MsgTimeoutNow => None,
            MsgHeartbeat if m.commit > log.last_index() => {
                Some("Raft heartbeat commits past this log")
            }
            MsgHeartbeat => None,
            MsgAppendResponse if !m.reject && m.index > log.last_index() => {
                Some("Raft append response past this log")
            }
            MsgAppendResponse => None,
            MsgAppend => {
                let conflicts = m.entries.iter().any(|e| {
                    e.index <= log.committed && log.term(e.index).is_ok_and(|t| t != e.term)
                });
                conflicts.then_some("Raft append conflicts with committed entries")
            }
            _ => Some("Raft message of a type not taken from the network"),
        }
    }

    fn bad(&mut self, why: &str) {
        self.counters.bad += 1;
        self.bad_since_log += 1;
        let now = Instant::now();
        if self
            .bad_logged_at
            .is_none_or(|t| now.duration_since(t) >= BAD_LOG_EVERY)
        {
            log::warn!(
                "cluster: dropped {} bad datagram(s) on the cluster port (last: {why})",
                self.bad_since_log
            );
            self.bad_since_log = 0;
            self.bad_logged_at = Some(now);
        } else {
            self.last_bad.clear();
            self.last_bad.push_str(why);
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((t, id))) = self.io.timers.peek().copied() {
            if t > now {
                break;
            }
            self.io.timers.pop();
            if let Some(timer) = self.io.pending.remove(&id) {
                if let Err(e) = self.foca.handle_timer(timer, &mut self.io) {
                    log::debug!("cluster: foca timer: {e}");
                }
            }
        }
    }

    /// Raft ticks due; after a stall, at most an election's worth.
    fn tick(&mut self, now: Instant) {
        let mut n = 0;
        while now >= self.next_tick {
            self.raft.tick();
            self.next_tick += self.cfg.timing.tick;
            n += 1;
            if n >= self.cfg.timing.election_ticks {
                self.next_tick = now + self.cfg.timing.tick;
            }
        }
    }

    fn flush_swim(&mut self) {
        let out = std::mem::take(&mut self.io.out);
        for (to, data) in &out {
            self.send(Kind::Swim, *to, data);
        }
        let mut out = out;
        out.clear();
        self.io.out = out;
    }

    /// Sends one payload in an envelope, stamped with the HLC.
    fn send(&mut self, kind: Kind, to: SocketAddr, payload: &[u8]) {
        let hlc = self.cfg.hlc.new_timestamp().get_time().as_u64();
        if wire::encode_envelope(
            kind,
            hlc,
            payload,
            self.cfg.key.as_ref(),
            &mut self.send_buf,
        )
        .is_none()
        {
            log::warn!(
                "cluster: a {kind:?} message of {} bytes does not fit a cluster datagram; not sent",
                payload.len()
            );
            return;
        }
        match self.socket.send_to(&self.send_buf, to) {
            Ok(_) => self.counters.sent += 1,
            Err(e) => log::debug!("cluster: send to {to}: {e}"),
        }
    }

    fn event(&mut self, kind: EventKind, subject: u64, detail: String) {
        let e = Event {
            hlc: self.cfg.hlc.new_timestamp(),
            kind,
            term: self.raft.raft.term,
            view: self.raft.store().applied.view.view,
            subject,
            detail,
        };
        (self.cfg.on_event)(&e);
    }

    fn notifications(&mut self) {
        let notes = std::mem::take(&mut self.io.notes);
        for n in notes {
            match n {
                OwnedNotification::MemberUp(id) if id.node != 0 => self.event(
                    EventKind::SwimUp,
                    id.node,
                    format!("{} is up (service {})", describe(&id), id.service),
                ),
                OwnedNotification::MemberDown(id) if id.node != 0 => self.event(
                    EventKind::SwimDown,
                    id.node,
                    format!("{} is down", describe(&id)),
                ),
                OwnedNotification::Rename(old, new) if old.node != 0 && new.node != 0 => self
                    .event(
                        EventKind::SwimRename,
                        new.node,
                        format!(
                            "{} is back as generation {} (was {})",
                            describe(&new),
                            new.gen,
                            old.gen
                        ),
                    ),
                OwnedNotification::Rejoin(id) => self.event(
                    EventKind::SwimRename,
                    id.node,
                    format!(
                        "this server was declared down; rejoined as generation {}",
                        id.gen
                    ),
                ),
                OwnedNotification::Idle => self.event(
                    EventKind::SwimIdle,
                    0,
                    "no other member is alive as far as SWIM can tell".into(),
                ),
                OwnedNotification::Defunct => self.event(
                    EventKind::SwimIdle,
                    0,
                    "this server was declared down by the others".into(),
                ),
                _ => {}
            }
        }
    }

    /// SWIM's state of every member it knows (and this one, alive).
    fn swim_states(&self) -> HashMap<u64, (SwimState, Id)> {
        let mut m: HashMap<u64, (SwimState, Id)> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().node != 0)
            .map(|m| {
                let s = match m.state() {
                    foca::State::Alive => SwimState::Alive,
                    foca::State::Suspect => SwimState::Suspect,
                    foca::State::Down => SwimState::Down,
                };
                (m.id().node, (s, *m.id()))
            })
            .collect();
        m.insert(self.node, (SwimState::Alive, *self.foca.identity()));
        m
    }

    /// The coordinator's round: compare SWIM with the view, propose.
    fn reconcile(&mut self, now: Instant) {
        let swim = self.swim_states();
        let applied = &self.raft.store().applied;
        let conf = Conf {
            voters: applied.conf.voters.clone(),
            learners: applied.conf.learners.clone(),
        };
        let view = applied.view.clone();
        let round = Round {
            me: self.node,
            view: &view,
            conf: &conf,
            swim: &swim,
            conf_pending: self.raft.raft.has_pending_conf(),
            voters_wanted: self.cfg.voters,
            now,
        };
        let t = &self.cfg.timing;
        let graces = Graces {
            mark_down_after: t.mark_down_after,
            remove_after: t.remove_after,
            repropose_after: t.repropose_after,
        };
        for action in self.reconciler.plan(&round, graces) {
            self.propose(action, &view);
        }
    }

    fn propose(&mut self, action: Action, view: &protocol::cluster::View) {
        let name = |node: u64| match view.member(node) {
            Some(m) => format!("s{} ({})", m.server, m.service),
            None => format!("node {node:016x}"),
        };
        log::info!(
            "cluster: coordinator proposes {}",
            match action {
                Action::Admit(n, a) => format!("to admit {} (service {})", name(n), a.service),
                Action::MarkDown(n) => format!("to mark {} down", name(n)),
                Action::MarkUp(n, _) => format!("to mark {} up", name(n)),
                Action::AddLearner(n, a) => format!(
                    "to admit node {n:016x} (service {}) as a learner",
                    a.service
                ),
                Action::Promote(n) => format!("to promote {} to voter", name(n)),
                Action::Remove(n) => format!("to remove {}", name(n)),
            }
        );
        let result = match action {
            Action::Admit(node, admission) => self
                .raft
                .propose(vec![], Command::Admit { node, admission }.encode()),
            Action::MarkDown(node) => self
                .raft
                .propose(vec![], Command::MarkDown { node }.encode()),
            Action::MarkUp(node, gen) => self
                .raft
                .propose(vec![], Command::MarkUp { node, gen }.encode()),
            Action::AddLearner(node, a) => {
                self.conf_change(ConfChangeType::AddLearnerNode, node, a.encode())
            }
            Action::Promote(node) => self.conf_change(ConfChangeType::AddNode, node, vec![]),
            Action::Remove(node) => self.conf_change(ConfChangeType::RemoveNode, node, vec![]),
        };
        if let Err(e) = result {
            log::debug!("cluster: proposal dropped: {e}");
        }
    }

    fn conf_change(&mut self, t: ConfChangeType, node: u64, context: Vec<u8>) -> raft::Result<()> {
        let mut cc = ConfChange::default();
        cc.set_change_type(t);
        cc.node_id = node;
        cc.context = context.into();
        self.raft.propose_conf_change(vec![], cc)
    }

    /// Raft's Ready: send, keep the log and hard state, apply what is
    /// committed (the in-memory log needs no sync, so messages that wait
    /// for persistence go out in the same turn).
    fn handle_ready(&mut self) {
        if !self.raft.has_ready() {
            return;
        }
        let mut rd = self.raft.ready();
        let mut snapshots_to = Vec::new();
        self.send_raft(rd.take_messages(), &mut snapshots_to);
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            if self.raft.mut_store().apply_snapshot(&snap) {
                let v = self.raft.store().applied.view.view;
                self.event(
                    EventKind::ViewApplied,
                    0,
                    format!(
                        "view {v} from the coordinator's snapshot: {}",
                        members_line(&self.raft.store().applied.view)
                    ),
                );
            }
        }
        self.apply(rd.take_committed_entries());
        self.raft.mut_store().append(rd.entries());
        if let Some(hs) = rd.hs() {
            self.raft.mut_store().set_hard_state(hs.clone());
        }
        self.send_raft(rd.take_persisted_messages(), &mut snapshots_to);
        let mut light = self.raft.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raft.mut_store().set_commit(commit);
        }
        self.send_raft(light.take_messages(), &mut snapshots_to);
        self.apply(light.take_committed_entries());
        self.raft.advance_apply();
        self.raft.mut_store().maybe_compact();
        // Over UDP a snapshot is fire-and-forget: the follower's answer (or
        // its silence, then a probe) tells the coordinator what it has.
        for to in snapshots_to {
            self.raft.report_snapshot(to, SnapshotStatus::Finish);
        }
    }

    fn send_raft(&mut self, msgs: Vec<Message>, snapshots_to: &mut Vec<u64>) {
        for m in msgs {
            let Some(to) = self.address_of(m.to) else {
                log::debug!("cluster: no address for raft node {:016x}", m.to);
                continue;
            };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                snapshots_to.push(m.to);
            }
            self.payload_buf.clear();
            if m.write_to_vec(&mut self.payload_buf).is_err() {
                continue;
            }
            let payload = std::mem::take(&mut self.payload_buf);
            self.send(Kind::Raft, to, &payload);
            self.payload_buf = payload;
        }
    }

    /// A node's cluster address: from the view, else from SWIM.
    fn address_of(&self, node: u64) -> Option<SocketAddr> {
        if let Some(m) = self.raft.store().applied.view.member(node) {
            return Some(m.cluster);
        }
        self.foca
            .iter_membership_state()
            .find(|m| m.id().node == node)
            .map(|m| m.id().cluster)
    }

    fn apply(&mut self, entries: Vec<Entry>) {
        for e in entries {
            let change = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => None,
                EntryType::EntryNormal => match Command::decode(&e.data) {
                    Ok(cmd) => {
                        view::apply_command(&mut self.raft.mut_store().applied.view, e.index, &cmd)
                    }
                    Err(err) => {
                        log::warn!("cluster: entry {} ignored: {err}", e.index);
                        None
                    }
                },
                EntryType::EntryConfChange => self.apply_conf_change(&e),
                EntryType::EntryConfChangeV2 => {
                    // Never proposed here; applied so that Raft stays whole.
                    if let Ok(cc) = ConfChangeV2::parse_from_bytes(&e.data) {
                        if let Ok(cs) = self.raft.apply_conf_change(&cc) {
                            self.raft.mut_store().applied.conf = cs;
                        }
                    }
                    None
                }
            };
            let store = self.raft.mut_store();
            store.applied.index = e.index;
            store.applied.term = e.term;
            if let Some(change) = change {
                self.changed(change);
            }
        }
    }

    fn apply_conf_change(&mut self, e: &Entry) -> Option<Change> {
        let cc = match ConfChange::parse_from_bytes(&e.data) {
            Ok(cc) => cc,
            Err(err) => {
                log::warn!("cluster: configuration change {} ignored: {err}", e.index);
                return None;
            }
        };
        match self.raft.apply_conf_change(&cc) {
            Ok(cs) => self.raft.mut_store().applied.conf = cs,
            Err(err) => {
                log::warn!("cluster: configuration change {} refused: {err}", e.index);
                return None;
            }
        }
        let admission = Admission::decode(&cc.context).ok();
        let change = match cc.get_change_type() {
            ConfChangeType::AddLearnerNode => view::ConfChange::AddLearner(admission),
            ConfChangeType::AddNode => view::ConfChange::AddVoter(admission),
            ConfChangeType::RemoveNode => view::ConfChange::Remove,
        };
        view::apply_conf_change(
            &mut self.raft.mut_store().applied.view,
            e.index,
            cc.node_id,
            change,
        )
    }

    fn changed(&mut self, change: Change) {
        let view = &self.raft.store().applied.view;
        let v = view.view;
        let (what, node, server) = match change {
            Change::Admitted { node, server } => ("admitted", node, server),
            Change::MarkedDown { node, server } => ("marked down", node, server),
            Change::MarkedUp { node, server } => ("marked up", node, server),
            Change::Promoted { node, server } => ("promoted to voter", node, server),
            Change::Removed { node, server } => ("removed", node, server),
        };
        let addr = view
            .member(node)
            .map(|m| format!(" ({})", m.service))
            .unwrap_or_default();
        let detail = format!("view {v}: s{server}{addr} {what}; {}", members_line(view));
        let leader = self.raft.raft.state == StateRole::Leader;
        if leader && matches!(change, Change::Admitted { .. }) {
            self.event(
                EventKind::Admitted,
                node,
                format!("s{server}{addr} admitted"),
            );
        }
        self.event(EventKind::ViewApplied, node, detail);
        self.publish();
    }

    fn watch_role(&mut self, now: Instant) {
        let (state, leader) = (self.raft.raft.state, self.raft.raft.leader_id);
        if state == StateRole::Leader && self.last_state != StateRole::Leader {
            self.reconciler.reset();
            self.next_reconcile = now;
            self.event(
                EventKind::BecameCoordinator,
                self.node,
                format!("this server (node {:016x}) is the coordinator", self.node),
            );
        } else if self.last_state == StateRole::Leader && state != StateRole::Leader {
            self.event(
                EventKind::SteppedDown,
                self.node,
                format!("this server is no longer the coordinator ({state:?})"),
            );
        }
        let changed = state != self.last_state || leader != self.last_leader;
        self.last_state = state;
        self.last_leader = leader;
        if changed {
            self.publish();
        }
    }

    fn publish(&mut self) {
        let applied = &self.raft.store().applied;
        let r = &self.raft.raft;
        let role = match r.state {
            StateRole::Leader => NodeRole::Coordinator,
            StateRole::Candidate | StateRole::PreCandidate => NodeRole::Candidate,
            StateRole::Follower if applied.conf.voters.contains(&self.node) => NodeRole::Follower,
            StateRole::Follower if applied.conf.learners.contains(&self.node) => NodeRole::Learner,
            StateRole::Follower => NodeRole::Joining,
        };
        let swim = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().node != 0)
            .map(|m| {
                (
                    m.id().node,
                    match m.state() {
                        foca::State::Alive => SwimState::Alive,
                        foca::State::Suspect => SwimState::Suspect,
                        foca::State::Down => SwimState::Down,
                    },
                )
            })
            .collect();
        let p = Published {
            node: self.node,
            cluster: self.foca.identity().cluster,
            service: self.cfg.service_addr,
            term: r.term,
            coordinator: (r.leader_id != 0).then_some(r.leader_id),
            role,
            stale: r.leader_id == 0 || role == NodeRole::Joining,
            view: applied.view.clone(),
            swim,
            counters: self.counters,
        };
        self.shared.publish(p);
    }

    /// Tells the others at once (SWIM) that this server leaves.
    fn leave(&mut self) {
        let _ = self.foca.leave_cluster(&mut self.io);
        self.flush_swim();
        log::info!("cluster: left the group");
    }
}

fn describe(id: &Id) -> String {
    format!("node {:016x} at {}", id.node, id.cluster)
}

/// `s1 up voter, s2 down learner, ...`
fn members_line(view: &protocol::cluster::View) -> String {
    view.members
        .iter()
        .map(|m| {
            format!(
                "s{} {} {} {}",
                m.server,
                m.service,
                m.status.as_str(),
                m.role.as_str()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
