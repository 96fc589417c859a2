//! The SQLite journal: one row per answered request (in the view
//! `requests`; written 256 to a row of `request_batches`), one row per
//! worker the master started, written by a dedicated thread so the
//! datagram path never waits for the disk.
//!
//! The master builds [`RequestRow`]s (no heap allocation per row) and hands
//! them over in batches with [`Journal::submit`], which only takes a lock
//! and copies the rows into a bounded queue. The writer thread wakes when the
//! queue fills or at most every [`COMMIT_INTERVAL`], and writes everything
//! queued in one transaction with cached prepared statements. If the writer
//! ever falls more than [`MAX_QUEUED_ROWS`] behind, whole batches are shed and
//! counted instead of letting memory grow; the count is visible through
//! [`Journal::shed_rows`] and is recorded in the `journal_events` table.
//!
//! The database runs in WAL mode with `synchronous=NORMAL`: a killed master
//! loses at most the last uncommitted batch and leaves a database that passes
//! `PRAGMA integrity_check`. The schema, retention and example queries are
//! documented in `docs/JOURNAL.md`; [`SCHEMA_VERSION`] is kept in
//! `PRAGMA user_version`.
//!
//! Every row carries an HLC stamp ([`crate::clock`]) besides its wall time:
//! a request the stamp of the `recvmmsg` batch it came in (one stamp per
//! batch, not per request), a worker's start and exit, a journal event and
//! a cluster event their own. The `meta` table names the server (its
//! address and HLC id), so `master report` can merge several journals in
//! causal order. Cluster events come from the cluster thread through a
//! [`ClusterJournal`] (`cluster.rs`).

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::clock::{self, Clock};
use crate::exit::{exit_status_text, ExitReason};
use anyhow::{bail, Context as _};
use protocol::frame::MAX_DONE_ID;
use protocol::{IdValue, Op, Outcome};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _, TransactionBehavior};

mod cluster;
#[cfg(test)]
mod tests;
mod writer;

pub use cluster::{ClusterEvent, ClusterEventKind, ClusterJournal, MAX_QUEUED_CLUSTER_EVENTS};
/// Schema version 2, to make old journals in tests.
#[cfg(test)]
pub(crate) use writer::SCHEMA_V2;
pub use writer::SINCE_FLOOR;
use writer::*;
pub(crate) use writer::{requests_source_sql, BatchedRequest, Tables, BATCH_ROWS};

/// The schema version this code writes and reads, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i32 = 6;

/// How far the writer may fall behind, in queued rows, before batches are
/// shed: about 0.2 s of full load, and with the batch the writer holds,
/// about 6 MiB of a master that must stay under 20 MiB.
pub const MAX_QUEUED_ROWS: usize = 16 * 1024;

/// The longest the writer lets queued rows wait before committing them: at
/// most this much is lost when the master is killed. Short, so that each
/// commit is a small burst of CPU: 50 ms commits (a few ms of inserts at
/// once) put a 4 ms p99 on requests at 70k/s on two cores, 5 ms ones 2 ms
/// (schema 4). Each commit also costs about 0.1 ms whatever it holds, so
/// with schema 5's cheaper rows 10 ms commits took the writer from 1.53
/// to 1.20 µs per request at 50k/s (1.05 to 0.95 at peak), and the p99
/// there did not move (2.20 against 2.27 ms, medians of 5 runs).
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(10);

/// WAL pages after which a commit copies the WAL back into the database
/// (`PRAGMA wal_autocheckpoint`; SQLite's default is 1,000). A checkpoint
/// is one burst of CPU on the writer thread, in proportion to the pages it
/// copies: at 50k requests/s, 1,000 pages made a burst of about 20 ms
/// every 2 s, which took one of two cores from the request path for about
/// 1% of the time, the requests' p99. 100 pages make bursts of about 2 ms:
/// p99 at 50k/s over 8 runs each 1.0-2.9 ms (median 2.0) against 1.9-26
/// ms (median 4.2), for 0.1 µs more of the writer's CPU per request (a
/// checkpoint ends with an `fsync`).
const CHECKPOINT_PAGES: i64 = 100;

/// Queued rows that wake the writer early, before [`COMMIT_INTERVAL`] is up,
/// so a burst is written in several moderate transactions instead of one
/// that approaches the shedding bound.
const FLUSH_ROWS: usize = 8 * 1024;

/// The most `workers` and `journal_events` rows kept: both tables grow only
/// with restarts and overloads, but a crash-looping pool runs for months too.
const MAX_AUX_ROWS: i64 = 100_000;

/// How often, at most, the writer records a `shed` event and logs shedding.
const SHED_EVENT_INTERVAL: Duration = Duration::from_secs(10);

/// The current time as unix microseconds (UTC), the journal's time unit:
/// the system clock plus `--debug-clock-skew-ms` ([`clock::skew_us`]), the
/// same physical time the HLC reads.
pub fn now_unix_us() -> i64 {
    clock::unix_us(SystemTime::now()).saturating_add(clock::skew_us())
}

/// A request's raw JSON id (`7`, `"abc"`), kept inline so a
/// [`RequestRow`] needs no heap allocation. Longer ids are cut at
/// [`MAX_DONE_ID`] bytes, as in the worker's completion frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    bytes: [u8; MAX_DONE_ID],
    len: u8,
}

// `len` is a u8: the inline buffer must stay addressable by it.
const _: () = assert!(MAX_DONE_ID <= u8::MAX as usize);

impl RequestId {
    /// The id with these raw bytes, cut at [`MAX_DONE_ID`]. A cut that would
    /// split a UTF-8 character backs off to the character boundary, so an id
    /// that was text stays text.
    pub fn new(raw: &[u8]) -> RequestId {
        let mut len = raw.len().min(MAX_DONE_ID);
        if len < raw.len() {
            if let Err(e) = std::str::from_utf8(&raw[..len]) {
                // `error_len() == None`: only an incomplete character at the end.
                if e.error_len().is_none() {
                    len = e.valid_up_to();
                }
            }
        }
        let mut bytes = [0; MAX_DONE_ID];
        bytes[..len].copy_from_slice(&raw[..len]);
        RequestId {
            bytes,
            len: len as u8,
        }
    }

    /// The raw bytes, as given (after the cut).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The id as text, or `None` if its bytes are not UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(self.as_bytes()).ok()
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => write!(f, "RequestId({s})"),
            None => write!(f, "RequestId({:?})", self.as_bytes()),
        }
    }
}

/// One answered request, as the master hands it to the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRow {
    /// When the master received the request (UTC, unix microseconds).
    pub ts_unix_us: i64,
    /// The client's address, stored as `ip:port` text.
    pub client: SocketAddr,
    /// The raw JSON id text (`7`, `"abc"`), or `None` for text-dialect requests
    /// and JSON requests without an id; stored as the value it denotes
    /// (`7`, `abc`).
    pub request_id: Option<RequestId>,
    /// What the request asked for.
    pub op: Op,
    /// The worker that answered, or `None` when the master answered itself
    /// (busy, stats, timeout, too_large, ...).
    pub worker_pid: Option<u32>,
    /// `ok`, `no_reply` or the error code sent.
    pub outcome: Outcome,
    /// From the master's receipt of the datagram to the request's completion.
    pub latency_us: u64,
    /// The HLC stamp (NTP64 time) of the datagram's receipt: shared by the
    /// datagrams of one `recvmmsg` batch. 0: none (stored as NULL).
    pub hlc: u64,
}

/// A worker lifecycle change, queued alongside request rows. Never shed:
/// there are few of them and each one matters.
#[derive(Debug)]
enum WorkerEvent {
    Started {
        pid: u32,
        at_us: i64,
        hlc: u64,
    },
    Exited {
        pid: u32,
        at_us: i64,
        hlc: u64,
        exit_code: Option<i32>,
        signal: Option<i32>,
        requests_served: u64,
        reason: ExitReason,
    },
}

/// What the master has handed over and the writer has not yet taken.
#[derive(Default)]
struct Queue {
    rows: Vec<RequestRow>,
    workers: Vec<WorkerEvent>,
    cluster: Vec<ClusterEvent>,
    /// Set by [`Journal::close`]: write what is left, then stop.
    closing: bool,
    /// The writer is asleep with nothing queued and must be woken; while it is
    /// busy or pacing its commits, `submit` does not pay for a wake-up.
    writer_idle: bool,
}

/// State shared by the master's [`Journal`] handle and the writer thread.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    shed: AtomicU64,
    cluster_shed: AtomicU64,
    written: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panicked writer must not take the master down with it.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Who writes a journal: its clock stamps the rows, and the `meta` table
/// names the server, so that a report merging several journals can tell
/// them apart.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The master's clock.
    pub clock: Clock,
    /// The address the master serves on, if it serves.
    pub server: Option<SocketAddr>,
}

/// The master's handle on the journal: owns the writer thread.
pub struct Journal {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    clock: Clock,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("written_rows", &self.written_rows())
            .field("shed_rows", &self.shed_rows())
            .finish()
    }
}

impl Journal {
    /// Opens the journal at `path`, creating it and its schema on first use,
    /// and starts the writer thread. `requests` is kept near `max_rows` rows
    /// (0: no limit).
    ///
    /// The file is private to the master's user: created with mode 0600
    /// (SQLite gives its `-wal` and `-shm` files the database's mode), an
    /// existing one readable by others is made 0600, with a warning. It is
    /// never reached through a symbolic link, so no one who can write its
    /// directory can point the master (often root) at another file.
    ///
    /// # Errors
    /// An error naming the journal and its path when the file is a symbolic
    /// link or not a regular file, cannot be opened or written, is not
    /// SQLite, is corrupt, holds some other database, or has a newer schema
    /// version.
    pub fn open(path: &Path, max_rows: u64) -> anyhow::Result<Journal> {
        let clock = Clock::with_physical(clock::physical_now, clock::DEFAULT_MAX_DELTA);
        Journal::open_for(
            path,
            max_rows,
            &Origin {
                clock,
                server: None,
            },
        )
    }

    /// [`Journal::open`] for a master: `origin`'s clock stamps the rows, and
    /// the journal's `meta` names its server and HLC id.
    ///
    /// # Errors
    /// As [`Journal::open`].
    pub fn open_for(path: &Path, max_rows: u64, origin: &Origin) -> anyhow::Result<Journal> {
        let file = PrivateFile::open(path)?;
        // Only the SQLite message: its chain repeats it as "Error code 14: ...".
        let db = WriterDb::open(path, max_rows, origin)
            .map_err(|e| anyhow::anyhow!("cannot open journal {}: {e}", path.display()))?;
        file.check_still_at(path)?;
        file.tighten(path);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                rows: Vec::with_capacity(FLUSH_ROWS),
                ..Queue::default()
            }),
            wake: Condvar::new(),
            shed: AtomicU64::new(0),
            cluster_shed: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        let writer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("journal".to_owned())
                .spawn(move || db.run(&shared))
                .with_context(|| format!("cannot start the writer of journal {}", path.display()))?
        };
        Ok(Journal {
            shared,
            writer: Some(writer),
            path: path.to_owned(),
            clock: origin.clock.clone(),
        })
    }

    /// A handle the cluster thread records its events through.
    pub fn cluster_journal(&self) -> ClusterJournal {
        ClusterJournal {
            shared: Arc::clone(&self.shared),
            clock: self.clock.clone(),
        }
    }

    /// Cluster events dropped so far (see [`ClusterJournal::shed`]).
    pub fn shed_cluster_events(&self) -> u64 {
        self.shared.cluster_shed.load(Ordering::Relaxed)
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands a batch of rows to the writer, leaving `rows` empty with its
    /// capacity kept. Never waits for the disk: it copies the rows into the
    /// queue under a short lock. When more than [`MAX_QUEUED_ROWS`] would be
    /// queued, the whole batch is shed and counted instead.
    pub fn submit(&self, rows: &mut Vec<RequestRow>) {
        if rows.is_empty() {
            return;
        }
        let mut q = self.shared.lock();
        if q.closing || q.rows.len() + rows.len() > MAX_QUEUED_ROWS {
            drop(q);
            self.shared
                .shed
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            rows.clear();
            return;
        }
        let before = q.rows.len();
        q.rows.append(rows);
        let wake = q.writer_idle || (before < FLUSH_ROWS && q.rows.len() >= FLUSH_ROWS);
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Records that worker `pid` started, stamped now.
    pub fn worker_started(&self, pid: u32, started_unix_us: i64) {
        self.push_worker(WorkerEvent::Started {
            pid,
            at_us: started_unix_us,
            hlc: self.clock.stamp(),
        });
    }

    /// Records that worker `pid` ended, how and why, stamped now. The exit status text
    /// (`exit 0`, `signal 9 (SIGKILL)`) is derived from `exit_code`/`signal`.
    pub fn worker_exited(
        &self,
        pid: u32,
        exited_unix_us: i64,
        exit_code: Option<i32>,
        signal: Option<i32>,
        requests_served: u64,
        reason: ExitReason,
    ) {
        self.push_worker(WorkerEvent::Exited {
            pid,
            at_us: exited_unix_us,
            hlc: self.clock.stamp(),
            exit_code,
            signal,
            requests_served,
            reason,
        });
    }

    fn push_worker(&self, event: WorkerEvent) {
        let mut q = self.shared.lock();
        q.workers.push(event);
        let wake = q.writer_idle;
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Request rows shed so far because the writer was too far behind (or a
    /// write failed).
    pub fn shed_rows(&self) -> u64 {
        self.shared.shed.load(Ordering::Relaxed)
    }

    /// Request rows committed to the database so far.
    pub fn written_rows(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Writes everything queued and stops the writer thread. Dropping the
    /// journal does the same.
    pub fn close(self) {
        drop(self);
    }

    fn stop_writer(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if writer.join().is_err() {
            log::error!(
                "journal {}: the writer thread panicked",
                self.path.display()
            );
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop_writer();
    }
}
