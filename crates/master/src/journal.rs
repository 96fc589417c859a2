//! The SQLite journal: one row per answered request, one row per worker the
//! master started, written by a dedicated thread so the datagram path never
//! waits for the disk.
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

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::exit::{exit_status_text, ExitReason};
use anyhow::{bail, Context as _};
use protocol::frame::MAX_DONE_ID;
use protocol::{IdValue, Op, Outcome};
use rusqlite::types::Null;
use rusqlite::{params, Connection, OpenFlags, Statement, TransactionBehavior};

/// The schema version this code writes and reads, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i32 = 2;

/// How far the writer may fall behind, in queued rows, before batches are
/// shed: about 0.2 s of full load, and with the batch the writer holds,
/// about 6 MiB of a master that must stay under 20 MiB.
pub const MAX_QUEUED_ROWS: usize = 16 * 1024;

/// The longest the writer lets queued rows wait before committing them: at
/// most this much is lost when the master is killed. Short, so that each
/// commit is a small burst of CPU: 50 ms commits (a few ms of inserts at
/// once) put a 4 ms p99 on requests at 70k/s on two cores, 5 ms ones 2 ms.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(5);

/// Queued rows that wake the writer early, before [`COMMIT_INTERVAL`] is up,
/// so a burst is written in several moderate transactions instead of one
/// that approaches the shedding bound.
const FLUSH_ROWS: usize = 8 * 1024;

/// The most `workers` and `journal_events` rows kept: both tables grow only
/// with restarts and overloads, but a crash-looping pool runs for months too.
const MAX_AUX_ROWS: i64 = 100_000;

/// How often, at most, the writer records a `shed` event and logs shedding.
const SHED_EVENT_INTERVAL: Duration = Duration::from_secs(10);

/// An ISO-8601 UTC text (`2024-05-01T10:00:00.123456Z`) for a column of unix
/// microseconds; used by the generated `ts`/`*_at` columns so the `sqlite3`
/// shell shows readable times while the stored value stays a compact integer.
macro_rules! iso_utc {
    ($col:literal) => {
        concat!(
            "strftime('%Y-%m-%dT%H:%M:%S', ",
            $col,
            " / 1000000, 'unixepoch') || printf('.%06dZ', ",
            $col,
            " % 1000000)"
        )
    };
}

/// The `requests` table of schema version 2 and its index: made by
/// [`SCHEMA`], and by [`MIGRATE_FROM_1`] from a version 1 journal.
/// `request_id` has no declared type, so SQLite keeps each id as it is
/// bound: INTEGER, REAL or TEXT ([`bind_request_id`]).
macro_rules! requests_table {
    () => {
        concat!(
            "CREATE TABLE requests (
        id          INTEGER PRIMARY KEY,
        ts_us       INTEGER NOT NULL,
        ts          TEXT GENERATED ALWAYS AS (",
            iso_utc!("ts_us"),
            ") VIRTUAL,
        client      TEXT NOT NULL,
        request_id,
        op          TEXT NOT NULL,
        worker_pid  INTEGER,
        outcome     TEXT NOT NULL,
        latency_us  INTEGER NOT NULL
    );
    CREATE INDEX requests_ts ON requests(ts_us);
    "
        )
    };
}

/// Version 2 of the schema. `docs/JOURNAL.md` explains every column.
const SCHEMA: &str = concat!(
    requests_table!(),
    "    CREATE TABLE workers (
        id              INTEGER PRIMARY KEY,
        pid             INTEGER NOT NULL,
        started_us      INTEGER,
        started_at      TEXT GENERATED ALWAYS AS (",
    iso_utc!("started_us"),
    ") VIRTUAL,
        exited_us       INTEGER,
        exited_at       TEXT GENERATED ALWAYS AS (",
    iso_utc!("exited_us"),
    ") VIRTUAL,
        exit_code       INTEGER,
        signal          INTEGER,
        exit_status     TEXT,
        requests_served INTEGER,
        reason          TEXT
    );
    CREATE INDEX workers_pid ON workers(pid);
    CREATE TABLE journal_events (
        id      INTEGER PRIMARY KEY,
        ts_us   INTEGER NOT NULL,
        ts      TEXT GENERATED ALWAYS AS (",
    iso_utc!("ts_us"),
    ") VIRTUAL,
        kind    TEXT NOT NULL,
        count   INTEGER NOT NULL DEFAULT 0,
        detail  TEXT
    );
    PRAGMA user_version = 2;"
);

/// From schema version 1, whose `request_id` was TEXT holding the id's raw
/// JSON (`7`, `"abc"`), to version 2: the same rows, each id as the value
/// it denotes, decoded by SQLite's own JSON functions with the rule of
/// [`protocol::id_value`] (a string cut short loses its opening quote).
const MIGRATE_FROM_1: &str = concat!(
    "ALTER TABLE requests RENAME TO requests_v1;
    DROP INDEX requests_ts;
    ",
    requests_table!(),
    "INSERT INTO requests (id, ts_us, client, request_id, op, worker_pid, outcome, latency_us)
        SELECT id, ts_us, client,
            CASE WHEN json_valid(request_id) THEN json_extract(request_id, '$')
                 WHEN request_id LIKE '\"%' THEN substr(request_id, 2)
                 ELSE request_id END,
            op, worker_pid, outcome, latency_us
        FROM requests_v1;
    DROP TABLE requests_v1;
    PRAGMA user_version = 2;"
);

const INSERT_REQUEST: &str = "INSERT INTO requests \
     (ts_us, client, request_id, op, worker_pid, outcome, latency_us) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
/// The parameters per row of [`INSERT_REQUEST`].
const REQUEST_COLUMNS: usize = 7;
/// Rows per multi-row `INSERT` ([`insert_many_sql`]): one statement step
/// per this many rows instead of one per row, which took the writer from
/// about 500k to 620k rows/s (390k to 520k with retention) in
/// `journal::tests::writer_throughput`; 16 and 64 rows measured a little
/// slower, 128 clearly so. The rest of a batch goes through
/// [`INSERT_REQUEST`].
const INSERT_MANY_ROWS: usize = 32;

/// [`INSERT_REQUEST`] for [`INSERT_MANY_ROWS`] rows at once, built once.
fn insert_many_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let mut sql = String::from(
            "INSERT INTO requests \
             (ts_us, client, request_id, op, worker_pid, outcome, latency_us) VALUES ",
        );
        for i in 0..INSERT_MANY_ROWS {
            if i > 0 {
                sql.push(',');
            }
            sql.push('(');
            for c in 0..REQUEST_COLUMNS {
                if c > 0 {
                    sql.push(',');
                }
                sql.push('?');
            }
            sql.push(')');
        }
        sql
    })
}

const INSERT_WORKER: &str = "INSERT INTO workers (pid, started_us) VALUES (?1, ?2)";
/// Closes the newest open row of this pid: the OS reuses pids over months.
const UPDATE_WORKER_EXIT: &str = "UPDATE workers SET exited_us = ?2, exit_code = ?3, \
     signal = ?4, exit_status = ?5, requests_served = ?6, reason = ?7 \
     WHERE id = (SELECT max(id) FROM workers WHERE pid = ?1 AND exited_us IS NULL)";
const INSERT_WORKER_EXIT: &str = "INSERT INTO workers \
     (pid, exited_us, exit_code, signal, exit_status, requests_served, reason) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const INSERT_EVENT: &str = "INSERT INTO journal_events (ts_us, kind, count, detail) \
     VALUES (?1, ?2, ?3, ?4)";

/// The current time as unix microseconds (UTC), the journal's time unit.
pub fn now_unix_us() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        // A clock set before 1970: keep the sign rather than panic.
        Err(e) => -i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX),
    }
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
}

/// A worker lifecycle change, queued alongside request rows. Never shed:
/// there are few of them and each one matters.
#[derive(Debug)]
enum WorkerEvent {
    Started {
        pid: u32,
        at_us: i64,
    },
    Exited {
        pid: u32,
        at_us: i64,
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
    written: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panicked writer must not take the master down with it.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The master's handle on the journal: owns the writer thread.
pub struct Journal {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
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
        let file = PrivateFile::open(path)?;
        // Only the SQLite message: its chain repeats it as "Error code 14: ...".
        let db = WriterDb::open(path, max_rows)
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
        })
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

    /// Records that worker `pid` started.
    pub fn worker_started(&self, pid: u32, started_unix_us: i64) {
        self.push_worker(WorkerEvent::Started {
            pid,
            at_us: started_unix_us,
        });
    }

    /// Records that worker `pid` ended, how and why. The exit status text
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

/// The writer thread's side: the connection and the bookkeeping that saves
/// it from counting rows in SQL.
struct WriterDb {
    conn: Connection,
    path: PathBuf,
    max_rows: u64,
    /// Rows in `requests`, kept in memory; `None` after a failed transaction,
    /// when it is counted again.
    request_rows: Option<u64>,
    /// Worker and event rows inserted since the last trim of those tables.
    aux_inserted: u64,
    /// Shed rows already recorded in `journal_events`.
    shed_recorded: u64,
    last_shed_event: Option<Instant>,
    last_failure_log: Option<Instant>,
    failed_batches: u64,
}

/// The mode of the journal and its `-wal` and `-shm` files.
const PRIVATE_MODE: u32 = 0o600;

/// The journal's file as the master itself found or made it before SQLite
/// opens it: created with mode [`PRIVATE_MODE`], never through a symbolic
/// link, and a regular file.
///
/// It holds no descriptor: SQLite's locks are POSIX record locks, which a
/// process loses on a file when it closes *any* descriptor of that file,
/// so nothing here opens the files (other than with `O_PATH`) while SQLite
/// has them open.
struct PrivateFile {
    stat: nix::sys::stat::FileStat,
}

impl PrivateFile {
    /// Opens or creates `path` (mode [`PRIVATE_MODE`]) without following a
    /// symbolic link in its last component, checks that it is a regular
    /// file, and closes it again.
    fn open(path: &Path) -> anyhow::Result<PrivateFile> {
        use nix::fcntl::OFlag;
        use nix::sys::stat::Mode;
        use std::os::fd::{FromRawFd, OwnedFd};
        let flags = OFlag::O_RDWR
            | OFlag::O_CREAT
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NONBLOCK;
        let raw = match nix::fcntl::open(path, flags, Mode::from_bits_truncate(PRIVATE_MODE)) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ELOOP) => bail!(
                "journal {}: is a symbolic link; refusing to follow it (name the file itself)",
                path.display()
            ),
            Err(e) => bail!("cannot open journal {}: {}", path.display(), e.desc()),
        };
        // SAFETY: `open` just returned this descriptor, and nothing else
        // owns it; it closes at the end of this function.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let stat = nix::sys::stat::fstat(raw)
            .map_err(|e| anyhow::anyhow!("cannot open journal {}: {}", path.display(), e.desc()))?;
        drop(fd);
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("journal {}: not a regular file", path.display());
        }
        Ok(PrivateFile { stat })
    }

    /// Fails unless `path` still names the file [`PrivateFile::open`] saw
    /// (so SQLite opened that file, and not one swapped in meanwhile).
    fn check_still_at(&self, path: &Path) -> anyhow::Result<()> {
        let now = nix::sys::stat::lstat(path).ok();
        if now.is_none_or(|n| (n.st_dev, n.st_ino) != (self.stat.st_dev, self.stat.st_ino)) {
            bail!(
                "journal {}: the file was replaced while the master opened it",
                path.display()
            );
        }
        Ok(())
    }

    /// Makes the journal, and its `-wal` and `-shm` files, private to the
    /// master's user when they are not: a journal an older master created
    /// (0644), or one copied in, keeps clients' addresses from other users
    /// from now on. Says so, once, when it changed a mode. Runs once SQLite
    /// has accepted the file, so a file the master refuses is left as it
    /// was; changes modes by name without following a symbolic link
    /// (`fchmodat`, which opens only with `O_PATH`).
    fn tighten(&self, path: &Path) {
        use nix::sys::stat::{fchmodat, FchmodatFlags, Mode};
        let mut changed = Vec::new();
        let mut failed = Vec::new();
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let name = PathBuf::from(name);
            let Ok(st) = nix::sys::stat::lstat(&name) else {
                continue;
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_mode & 0o077 == 0 {
                continue;
            }
            let text = format!("{} ({:o})", name.display(), st.st_mode & 0o7777);
            let private = Mode::from_bits_truncate(PRIVATE_MODE);
            match fchmodat(None, &name, private, FchmodatFlags::NoFollowSymlink) {
                Ok(()) => changed.push(text),
                Err(e) => failed.push(format!("{text}: {}", e.desc())),
            }
        }
        if !changed.is_empty() {
            log::warn!(
                "journal files readable by other users made {PRIVATE_MODE:o}: {}",
                changed.join(", ")
            );
        }
        if !failed.is_empty() {
            log::warn!(
                "journal files readable by other users could not be made {PRIVATE_MODE:o}: {}",
                failed.join(", ")
            );
        }
    }
}

impl WriterDb {
    fn open(path: &Path, max_rows: u64) -> anyhow::Result<WriterDb> {
        // NOFOLLOW: SQLite refuses a symbolic link too (it would otherwise
        // resolve one), should the name change after `PrivateFile::open`.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // The first statement reads the header: a non-SQLite file fails here.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("cannot switch to WAL mode (journal_mode is {mode})");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Keep a WAL that grew during a burst from staying large forever.
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        let mut db = WriterDb {
            conn,
            path: path.to_owned(),
            max_rows,
            request_rows: None,
            aux_inserted: 0,
            shed_recorded: 0,
            last_shed_event: None,
            last_failure_log: None,
            failed_batches: 0,
        };
        db.prepare_schema()?;
        let check: String = db.conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            bail!("the database is corrupt: {check}");
        }
        db.request_rows = Some(db.count_requests()?);
        Ok(db)
    }

    /// Creates the schema on first use, or checks it is ours; either way it
    /// writes (the `open` event), so an unwritable file fails now and not on
    /// the first batch.
    fn prepare_schema(&mut self) -> anyhow::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        match version {
            0 => {
                let tables: i64 =
                    tx.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
                if tables != 0 {
                    bail!("not a udp-pool journal (a database with other tables)");
                }
                tx.execute_batch(SCHEMA)?;
            }
            1 => {
                log::info!("journal: schema version 1 -> 2 (request ids as values)");
                tx.execute_batch(MIGRATE_FROM_1)
                    .context("cannot migrate the journal from schema version 1")?;
            }
            SCHEMA_VERSION => {}
            v => bail!(
                "journal schema version {v} is newer than this master understands ({SCHEMA_VERSION})"
            ),
        }
        tx.execute(
            INSERT_EVENT,
            params![
                now_unix_us(),
                "open",
                0,
                format!("master pid {}", std::process::id())
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn count_requests(&self) -> rusqlite::Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM requests", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
    }

    /// The writer thread: take what is queued, write it, repeat; on close,
    /// write what is left and return.
    fn run(mut self, shared: &Shared) {
        let mut rows: Vec<RequestRow> = Vec::with_capacity(FLUSH_ROWS);
        let mut workers: Vec<WorkerEvent> = Vec::new();
        let mut last_commit: Option<Instant> = None;
        loop {
            let closing = {
                let mut q = shared.lock();
                loop {
                    if q.closing || q.rows.len() >= FLUSH_ROWS {
                        break;
                    }
                    if q.rows.is_empty() && q.workers.is_empty() {
                        q.writer_idle = true;
                        q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                        q.writer_idle = false;
                        continue;
                    }
                    // Something is queued: commit at most every COMMIT_INTERVAL,
                    // so a steady trickle still makes few, larger transactions.
                    let since = last_commit.map_or(COMMIT_INTERVAL, |t| t.elapsed());
                    if since >= COMMIT_INTERVAL {
                        break;
                    }
                    q = shared
                        .wake
                        .wait_timeout(q, COMMIT_INTERVAL - since)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                std::mem::swap(&mut q.rows, &mut rows);
                std::mem::swap(&mut q.workers, &mut workers);
                q.closing
            };
            self.write(&rows, &workers, shared, closing);
            last_commit = Some(Instant::now());
            rows.clear();
            workers.clear();
            if closing {
                // `close` takes the handle, so nothing can be queued after it.
                return;
            }
        }
    }

    /// Writes one batch in one transaction, keeping the counters right
    /// whether it commits or fails.
    fn write(
        &mut self,
        rows: &[RequestRow],
        workers: &[WorkerEvent],
        shared: &Shared,
        closing: bool,
    ) {
        let shed_total = shared.shed.load(Ordering::Relaxed);
        let record_shed = shed_total > self.shed_recorded
            && (closing || interval_passed(self.last_shed_event, SHED_EVENT_INTERVAL));
        let shed_now = if record_shed {
            shed_total - self.shed_recorded
        } else {
            0
        };
        match self.write_tx(rows, workers, shed_now, closing) {
            Ok(()) => {
                shared
                    .written
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                if record_shed {
                    log::warn!(
                        "journal {}: shed {shed_now} rows ({shed_total} in all): the writer fell behind",
                        self.path.display()
                    );
                    self.shed_recorded = shed_total;
                    self.last_shed_event = Some(Instant::now());
                }
            }
            Err(e) => {
                // The rows are lost: count them as shed so the loss is visible.
                shared.shed.fetch_add(rows.len() as u64, Ordering::Relaxed);
                self.request_rows = None;
                self.failed_batches += 1;
                let log_now =
                    closing || interval_passed(self.last_failure_log, SHED_EVENT_INTERVAL);
                if log_now {
                    log::error!(
                        "journal {}: cannot write {} rows ({} failed batches so far): {e:#}",
                        self.path.display(),
                        rows.len(),
                        self.failed_batches
                    );
                    self.last_failure_log = Some(Instant::now());
                }
            }
        }
    }

    fn write_tx(
        &mut self,
        rows: &[RequestRow],
        workers: &[WorkerEvent],
        shed_now: u64,
        closing: bool,
    ) -> anyhow::Result<()> {
        let mut request_rows = match self.request_rows {
            Some(n) => n,
            None => self.count_requests()?,
        };
        let mut aux_inserted = self.aux_inserted;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !rows.is_empty() {
            let mut client_buf = [0u8; 64];
            let mut chunks = rows.chunks_exact(INSERT_MANY_ROWS);
            if chunks.len() > 0 {
                let mut insert_many = tx.prepare_cached(insert_many_sql())?;
                for chunk in &mut chunks {
                    for (i, row) in chunk.iter().enumerate() {
                        bind_request(&mut insert_many, i * REQUEST_COLUMNS, row, &mut client_buf)?;
                    }
                    insert_many.raw_execute()?;
                }
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let mut insert = tx.prepare_cached(INSERT_REQUEST)?;
                for row in rest {
                    bind_request(&mut insert, 0, row, &mut client_buf)?;
                    insert.raw_execute()?;
                }
            }
            request_rows += rows.len() as u64;
        }
        for event in workers {
            match *event {
                WorkerEvent::Started { pid, at_us } => {
                    tx.prepare_cached(INSERT_WORKER)?
                        .execute(params![pid, at_us])?;
                    aux_inserted += 1;
                }
                WorkerEvent::Exited {
                    pid,
                    at_us,
                    exit_code,
                    signal,
                    requests_served,
                    reason,
                } => {
                    let values = params![
                        pid,
                        at_us,
                        exit_code,
                        signal,
                        exit_status_text(exit_code, signal),
                        i64::try_from(requests_served).unwrap_or(i64::MAX),
                        reason.as_str(),
                    ];
                    // A worker whose start was never recorded (shed by a
                    // failed write) still gets its exit recorded.
                    if tx.prepare_cached(UPDATE_WORKER_EXIT)?.execute(values)? == 0 {
                        tx.prepare_cached(INSERT_WORKER_EXIT)?.execute(values)?;
                        aux_inserted += 1;
                    }
                }
            }
        }
        let now = now_unix_us();
        if shed_now > 0 {
            tx.prepare_cached(INSERT_EVENT)?.execute(params![
                now,
                "shed",
                i64::try_from(shed_now).unwrap_or(i64::MAX),
                Option::<&str>::None
            ])?;
            aux_inserted += 1;
        }
        if closing {
            tx.prepare_cached(INSERT_EVENT)?.execute(params![
                now,
                "close",
                0,
                format!("master pid {}", std::process::id())
            ])?;
            aux_inserted += 1;
        }
        request_rows = apply_retention(&tx, self.max_rows, request_rows)?;
        if aux_inserted >= 1000 {
            trim_aux_tables(&tx)?;
            aux_inserted = 0;
        }
        tx.commit()?;
        self.request_rows = Some(request_rows);
        self.aux_inserted = aux_inserted;
        Ok(())
    }
}

/// Deletes the oldest requests once the table is more than a tenth (at
/// least 100 rows) over `max_rows`, back down to `max_rows`: old rows go
/// in batches, not one per insert. Returns the new row count.
fn apply_retention(tx: &Connection, max_rows: u64, request_rows: u64) -> rusqlite::Result<u64> {
    if max_rows == 0 {
        return Ok(request_rows);
    }
    let slack = (max_rows / 10).max(100);
    if request_rows <= max_rows + slack {
        return Ok(request_rows);
    }
    // Ids grow by one per insert and only the oldest are deleted, so the
    // newest `max_rows` rows are those above `max(id) - max_rows`.
    let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
    let deleted = tx
        .prepare_cached("DELETE FROM requests WHERE id <= (SELECT max(id) FROM requests) - ?1")?
        .execute([keep])? as u64;
    let left = request_rows.saturating_sub(deleted);
    if left > max_rows + slack {
        // Ids with gaps (rows deleted by hand): count for real.
        let n: i64 = tx.query_row("SELECT count(*) FROM requests", [], |r| r.get(0))?;
        return Ok(n.max(0) as u64);
    }
    Ok(left)
}

/// Whether `every` has passed since `last` (or it never happened).
fn interval_passed(last: Option<Instant>, every: Duration) -> bool {
    match last {
        Some(t) => t.elapsed() >= every,
        None => true,
    }
}

/// Keeps `workers` (exited ones) and `journal_events` to their newest
/// [`MAX_AUX_ROWS`] rows.
fn trim_aux_tables(tx: &Connection) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "DELETE FROM workers WHERE exited_us IS NOT NULL \
         AND id <= (SELECT max(id) FROM workers) - ?1",
    )?
    .execute([MAX_AUX_ROWS])?;
    tx.prepare_cached(
        "DELETE FROM journal_events WHERE id <= (SELECT max(id) FROM journal_events) - ?1",
    )?
    .execute([MAX_AUX_ROWS])?;
    Ok(())
}

/// Binds a request's id to parameter `index` as the value it denotes
/// ([`protocol::id_value`]): a string as TEXT without its quotes, an
/// integer as INTEGER, another number as REAL, `true`/`false` as 1/0 (as
/// SQLite reads them), and `null`, like no id, as NULL. Allocates only for
/// a string with escapes.
fn bind_request_id(
    stmt: &mut Statement<'_>,
    index: usize,
    id: Option<&RequestId>,
) -> rusqlite::Result<()> {
    let Some(id) = id else {
        return stmt.raw_bind_parameter(index, Null);
    };
    // Borrowed unless a cut left bytes that are not UTF-8.
    let raw = String::from_utf8_lossy(id.as_bytes());
    match protocol::id_value(&raw) {
        IdValue::Text(text) => stmt.raw_bind_parameter(index, &*text),
        IdValue::Integer(n) => stmt.raw_bind_parameter(index, n),
        IdValue::Real(x) => stmt.raw_bind_parameter(index, x),
        IdValue::Bool(b) => stmt.raw_bind_parameter(index, i64::from(b)),
        IdValue::Null => stmt.raw_bind_parameter(index, Null),
    }
}

/// Binds `row` to the parameters `offset + 1 ..= offset + REQUEST_COLUMNS`
/// of `stmt`, in the column order of [`INSERT_REQUEST`]. SQLite copies the
/// text it is given, so `client_buf` can be reused for the next row.
fn bind_request(
    stmt: &mut Statement<'_>,
    offset: usize,
    row: &RequestRow,
    client_buf: &mut [u8; 64],
) -> rusqlite::Result<()> {
    let client = format_client(row.client, client_buf);
    stmt.raw_bind_parameter(offset + 1, row.ts_unix_us)?;
    stmt.raw_bind_parameter(offset + 2, client.as_ref())?;
    bind_request_id(stmt, offset + 3, row.request_id.as_ref())?;
    stmt.raw_bind_parameter(offset + 4, row.op.as_str())?;
    stmt.raw_bind_parameter(offset + 5, row.worker_pid)?;
    stmt.raw_bind_parameter(offset + 6, row.outcome.as_str())?;
    stmt.raw_bind_parameter(
        offset + 7,
        i64::try_from(row.latency_us).unwrap_or(i64::MAX),
    )?;
    Ok(())
}

/// `ip:port` text for `addr`, written into `buf` (no allocation unless an
/// IPv6 address with a scope id does not fit).
fn format_client(addr: SocketAddr, buf: &mut [u8; 64]) -> std::borrow::Cow<'_, str> {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    if write!(cursor, "{addr}").is_ok() {
        let len = cursor.position() as usize;
        if let Ok(s) = std::str::from_utf8(&buf[..len]) {
            return std::borrow::Cow::Borrowed(s);
        }
    }
    std::borrow::Cow::Owned(addr.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::ErrorCode;
    use rusqlite::types::Value;

    /// A varied row: an id on every other one, the master answering every
    /// fifth, `busy` every seventh.
    fn row(i: u64) -> RequestRow {
        RequestRow {
            ts_unix_us: 1_714_557_600_000_000 + i as i64,
            client: format!("127.0.0.1:{}", 10_000 + i % 1000).parse().unwrap(),
            request_id: match i % 2 {
                0 => Some(RequestId::new(i.to_string().as_bytes())),
                _ => None,
            },
            op: Op::Square,
            worker_pid: match i % 5 {
                0 => None,
                _ => Some(100 + (i % 3) as u32),
            },
            outcome: match i % 7 {
                0 => Outcome::Error(ErrorCode::Busy),
                _ => Outcome::Ok,
            },
            latency_us: i,
        }
    }

    fn read_conn(path: &Path) -> Connection {
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn open_creates_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        Journal::open(&path, 1000).unwrap().close();
        let conn = read_conn(&path);
        assert_eq!(
            count(&conn, "PRAGMA user_version"),
            i64::from(SCHEMA_VERSION)
        );
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        for table in ["requests", "workers", "journal_events"] {
            let n = count(
                &conn,
                &format!(
                    "SELECT count(*) FROM sqlite_schema WHERE type='table' AND name='{table}'"
                ),
            );
            assert_eq!(n, 1, "table {table}");
        }
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM journal_events WHERE kind IN ('open','close')"
            ),
            2
        );
        // Reopening an existing journal works and keeps the schema.
        Journal::open(&path, 1000).unwrap().close();
        assert_eq!(
            count(&conn, "PRAGMA user_version"),
            i64::from(SCHEMA_VERSION)
        );
    }

    #[test]
    fn submitted_rows_are_written_with_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let journal = Journal::open(&path, 1_000_000).unwrap();
        let mut batch = Vec::new();
        for i in 0..1000 {
            batch.push(row(i));
            if batch.len() == 37 {
                let cap = batch.capacity();
                journal.submit(&mut batch);
                assert!(batch.is_empty());
                assert_eq!(batch.capacity(), cap, "submit keeps the caller's capacity");
            }
        }
        journal.submit(&mut batch);
        journal.worker_started(101, 1_714_557_600_000_000);
        journal.worker_exited(
            101,
            1_714_557_601_000_000,
            None,
            Some(9),
            12,
            ExitReason::Crash,
        );
        journal.close();

        let conn = read_conn(&path);
        assert_eq!(count(&conn, "SELECT count(*) FROM requests"), 1000);
        let mut stmt = conn
            .prepare(
                "SELECT ts_us, ts, client, request_id, op, worker_pid, outcome, latency_us \
                 FROM requests ORDER BY id",
            )
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        let mut i = 0u64;
        while let Some(r) = rows.next().unwrap() {
            let want = row(i);
            assert_eq!(r.get::<_, i64>(0).unwrap(), want.ts_unix_us);
            assert_eq!(
                r.get::<_, String>(1).unwrap(),
                format!("2024-05-01T10:00:00.{:06}Z", i)
            );
            assert_eq!(r.get::<_, String>(2).unwrap(), want.client.to_string());
            assert_eq!(
                r.get::<_, Option<i64>>(3).unwrap(),
                want.request_id.map(|_| i as i64)
            );
            assert_eq!(r.get::<_, String>(4).unwrap(), "square");
            assert_eq!(r.get::<_, Option<u32>>(5).unwrap(), want.worker_pid);
            assert_eq!(r.get::<_, String>(6).unwrap(), want.outcome.as_str());
            assert_eq!(r.get::<_, i64>(7).unwrap(), i as i64);
            i += 1;
        }
        assert_eq!(i, 1000);
        let (status, reason, served, started): (String, String, i64, i64) = conn
            .query_row(
                "SELECT exit_status, reason, requests_served, started_us FROM workers WHERE pid = 101",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(status, "signal 9 (SIGKILL)");
        assert_eq!(reason, "crash");
        assert_eq!(served, 12);
        assert_eq!(started, 1_714_557_600_000_000);
    }

    #[test]
    fn a_reused_pid_updates_only_its_latest_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let journal = Journal::open(&path, 100).unwrap();
        journal.worker_started(7, 1);
        journal.worker_exited(7, 2, Some(0), None, 5, ExitReason::Retired);
        journal.worker_started(7, 3);
        journal.worker_exited(7, 4, None, Some(15), 6, ExitReason::Stop);
        // An exit whose start was never recorded still gets a row.
        journal.worker_exited(8, 5, Some(2), None, 0, ExitReason::BootFailure);
        journal.close();
        let conn = read_conn(&path);
        let mut stmt = conn
            .prepare(
                "SELECT pid, started_us, exited_us, exit_status, reason FROM workers ORDER BY id",
            )
            .unwrap();
        let got: Vec<(u32, Option<i64>, i64, String, String)> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got,
            vec![
                (7, Some(1), 2, "exit 0".into(), "retired".into()),
                (7, Some(3), 4, "signal 15 (SIGTERM)".into(), "stop".into()),
                (8, None, 5, "exit 2".into(), "boot_failure".into()),
            ]
        );
    }

    #[test]
    fn retention_keeps_the_table_near_max_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let journal = Journal::open(&path, 1000).unwrap();
        let mut batch = Vec::new();
        for i in 0..5000 {
            batch.push(row(i));
            if batch.len() == 50 {
                journal.submit(&mut batch);
            }
        }
        journal.submit(&mut batch);
        journal.close();
        let conn = read_conn(&path);
        let n = count(&conn, "SELECT count(*) FROM requests");
        assert!((1000..=1100).contains(&n), "{n} rows");
        // The newest rows are the ones kept.
        assert_eq!(count(&conn, "SELECT max(latency_us) FROM requests"), 4999);
        assert_eq!(
            count(&conn, "SELECT max(id) - min(id) + 1 FROM requests"),
            n,
            "no gaps"
        );

        // A reopened journal counts what is there and keeps trimming.
        let journal = Journal::open(&path, 1000).unwrap();
        for i in 5000..5200 {
            batch.push(row(i));
        }
        journal.submit(&mut batch);
        journal.close();
        let n = count(&conn, "SELECT count(*) FROM requests");
        assert!((1000..=1100).contains(&n), "{n} rows after reopening");
    }

    #[test]
    fn an_unwritable_path_names_the_journal() {
        let err = Journal::open(Path::new("/proc/nope/j.db"), 10).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("journal"), "{msg}");
        assert!(msg.contains("/proc/nope/j.db"), "{msg}");
        assert!(
            msg.starts_with("cannot open journal /proc/nope/j.db: "),
            "{msg}"
        );
    }

    #[test]
    fn a_garbage_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let msg = format!("{:#}", Journal::open(&path, 10).unwrap_err());
        assert!(msg.contains("journal"), "{msg}");
        assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
        assert!(msg.contains("not a database"), "{msg}");
    }

    #[test]
    fn another_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t(x)")
            .unwrap();
        let msg = format!("{:#}", Journal::open(&path, 10).unwrap_err());
        assert!(msg.contains("not a udp-pool journal"), "{msg}");
    }

    #[test]
    fn a_full_queue_sheds_whole_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let journal = Journal::open(&path, 0).unwrap();
        // A batch that alone is over the bound cannot be queued.
        let mut batch: Vec<RequestRow> = (0..MAX_QUEUED_ROWS as u64 + 1).map(row).collect();
        journal.submit(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(journal.shed_rows(), MAX_QUEUED_ROWS as u64 + 1);
        journal.close();
        let conn = read_conn(&path);
        assert_eq!(count(&conn, "SELECT count(*) FROM requests"), 0);
        assert_eq!(
            count(
                &conn,
                "SELECT coalesce(sum(count), 0) FROM journal_events WHERE kind = 'shed'"
            ),
            MAX_QUEUED_ROWS as i64 + 1
        );
    }

    /// Raw JSON ids, as completions carry them, and the value each is
    /// stored as.
    fn ids_and_values() -> Vec<(String, Value)> {
        let cut = format!("\"{}", "x".repeat(MAX_DONE_ID - 1));
        vec![
            (r#""abc""#.into(), Value::Text("abc".into())),
            (r#""7""#.into(), Value::Text("7".into())),
            (r#""""#.into(), Value::Text(String::new())),
            (r#""a\"b\u00e9""#.into(), Value::Text("a\"bé".into())),
            ("7".into(), Value::Integer(7)),
            ("-12".into(), Value::Integer(-12)),
            ("9223372036854775807".into(), Value::Integer(i64::MAX)),
            (
                "9223372036854775808".into(),
                Value::Real(9.223_372_036_854_776e18),
            ),
            ("1.50".into(), Value::Real(1.5)),
            ("2e3".into(), Value::Real(2000.0)),
            ("true".into(), Value::Integer(1)),
            ("false".into(), Value::Integer(0)),
            ("null".into(), Value::Null),
            (cut.clone(), Value::Text(cut[1..].to_owned())),
        ]
    }

    fn stored_ids(conn: &Connection) -> Vec<Value> {
        let mut stmt = conn
            .prepare("SELECT request_id FROM requests ORDER BY id")
            .unwrap();
        let ids = stmt.query_map([], |r| r.get::<_, Value>(0)).unwrap();
        ids.map(Result::unwrap).collect()
    }

    #[test]
    fn request_ids_are_stored_as_the_values_they_denote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let journal = Journal::open(&path, 1000).unwrap();
        let cases = ids_and_values();
        let mut batch: Vec<RequestRow> = cases
            .iter()
            .enumerate()
            .map(|(i, (raw, _))| RequestRow {
                request_id: Some(RequestId::new(raw.as_bytes())),
                ..row(i as u64)
            })
            .collect();
        batch.push(RequestRow {
            request_id: None,
            ..row(99)
        });
        journal.submit(&mut batch);
        journal.close();
        let conn = read_conn(&path);
        let mut want: Vec<Value> = cases.into_iter().map(|(_, v)| v).collect();
        want.push(Value::Null);
        assert_eq!(stored_ids(&conn), want);
        // So an operator finds them as written.
        assert_eq!(
            count(
                &conn,
                "SELECT count(*) FROM requests WHERE request_id = 'abc'"
            ),
            1
        );
        assert_eq!(
            count(&conn, "SELECT count(*) FROM requests WHERE request_id = 7"),
            1
        );
    }

    #[test]
    fn a_version_1_journal_is_migrated_with_its_ids_as_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let cases = ids_and_values();
        {
            // Version 1: the same tables, but `request_id TEXT` holding the
            // id's raw JSON.
            let conn = Connection::open(&path).unwrap();
            let v1 = SCHEMA
                .replace("request_id,", "request_id  TEXT,")
                .replace("user_version = 2", "user_version = 1");
            conn.execute_batch(&v1).unwrap();
            for (i, (raw, _)) in cases.iter().enumerate() {
                conn.execute(
                    "INSERT INTO requests (ts_us, client, request_id, op, outcome, latency_us) \
                     VALUES (?1, '127.0.0.1:5', ?2, 'square', 'ok', 1)",
                    params![i as i64, raw],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO requests (ts_us, client, request_id, op, outcome, latency_us) \
                 VALUES (99, '127.0.0.1:5', NULL, 'hello', 'ok', 1)",
                [],
            )
            .unwrap();
        }
        Journal::open(&path, 1000).unwrap().close();
        let conn = read_conn(&path);
        assert_eq!(count(&conn, "PRAGMA user_version"), 2);
        let mut want: Vec<Value> = cases.into_iter().map(|(_, v)| v).collect();
        want.push(Value::Null);
        // SQLite's JSON functions read each id as protocol::id_value does.
        assert_eq!(stored_ids(&conn), want);
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_schema ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            tables,
            [
                "journal_events",
                "requests",
                "requests_ts",
                "workers",
                "workers_pid"
            ]
        );
        let ts: String = conn
            .query_row("SELECT ts FROM requests WHERE ts_us = 99", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ts, "1970-01-01T00:00:00.000099Z");
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn request_ids_are_cut_inline() {
        let id = RequestId::new(br#""abc""#);
        assert_eq!(id.as_str(), Some(r#""abc""#));
        let long = vec![b'7'; 300];
        assert_eq!(RequestId::new(&long).as_bytes().len(), MAX_DONE_ID);
        // A cut inside a multi-byte character backs off to its start.
        let mut s = "x".repeat(MAX_DONE_ID - 1);
        s.push('é');
        let id = RequestId::new(s.as_bytes());
        assert_eq!(id.as_str(), Some(&s[..MAX_DONE_ID - 1]));
        assert_eq!(RequestId::new(&[0xff, 0xfe]).as_str(), None);
    }

    #[test]
    fn clients_format_without_allocating() {
        let mut buf = [0u8; 64];
        let v6: SocketAddr = "[fe80::1:2:3:4%4294967295]:65535".parse().unwrap();
        assert_eq!(format_client(v6, &mut buf), v6.to_string());
        let v4: SocketAddr = "10.0.0.1:53".parse().unwrap();
        assert!(matches!(
            format_client(v4, &mut buf),
            std::borrow::Cow::Borrowed("10.0.0.1:53")
        ));
    }

    /// Re-runs this test binary as a child that writes rows until it is
    /// SIGKILLed; the database it leaves must be sound and reopen.
    #[test]
    fn a_sigkilled_writer_leaves_a_sound_database() {
        const CHILD_ENV: &str = "UDP_POOL_JOURNAL_KILL_CHILD";
        if let Some(path) = std::env::var_os(CHILD_ENV) {
            let journal = Journal::open(Path::new(&path), 5_000).unwrap();
            let mut batch = Vec::new();
            for i in 0.. {
                batch.push(row(i));
                if batch.len() == 64 {
                    journal.submit(&mut batch);
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            unreachable!();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        /// Kills the child on every way out, so a failed test leaves nothing running.
        struct Child(std::process::Child);
        impl Drop for Child {
            fn drop(&mut self) {
                let _ = self.0.kill(); // SIGKILL
                let _ = self.0.wait();
            }
        }
        let mut child = Child(
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "journal::tests::a_sigkilled_writer_leaves_a_sound_database",
                ])
                .env(CHILD_ENV, &path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Wait until retention has run a few times, then kill it mid-load.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let written = path.exists()
                && Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .and_then(|c| {
                        c.query_row("SELECT coalesce(max(id), 0) FROM requests", [], |r| {
                            r.get(0)
                        })
                    })
                    .is_ok_and(|n: i64| n >= 20_000);
            if written {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the child wrote too little in 20 s"
            );
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "the child exited early"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(child);

        let conn = Connection::open(&path).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let n = count(&conn, "SELECT count(*) FROM requests");
        assert!((5_000..=5_500).contains(&n), "{n} rows");
        drop(conn);
        let report = crate::report::Report::collect(&path, None).unwrap();
        assert_eq!(report.requests, n as u64);
        Journal::open(&path, 5_000).unwrap().close();
    }

    /// Measures the writer's sustained throughput, without and with retention:
    /// `cargo test -p master --release --lib journal::tests::writer_throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn writer_throughput() {
        for max_rows in [0, 50_000] {
            measure_writer(max_rows);
        }
    }

    fn measure_writer(max_rows: u64) {
        const N: u64 = 200_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let journal = Journal::open(&path, max_rows).unwrap();
        let rows: Vec<RequestRow> = (0..N).map(row).collect();
        let start = Instant::now();
        let mut batch = Vec::with_capacity(256);
        let mut submitted = 0u64;
        for chunk in rows.chunks(256) {
            // Pace like a loaded master rather than flooding the queue.
            while submitted - journal.written_rows() > MAX_QUEUED_ROWS as u64 / 2 {
                std::thread::sleep(Duration::from_micros(200));
            }
            batch.extend_from_slice(chunk);
            submitted += chunk.len() as u64;
            journal.submit(&mut batch);
        }
        assert_eq!(journal.shed_rows(), 0);
        journal.close();
        let elapsed = start.elapsed();
        let conn = read_conn(&path);
        let kept = count(&conn, "SELECT count(*) FROM requests");
        if max_rows == 0 {
            assert_eq!(kept, N as i64);
        } else {
            assert!(kept as u64 <= max_rows + max_rows / 10, "{kept} rows kept");
        }
        eprintln!(
            "max_rows {max_rows}: wrote {N} rows in {:.3} s: {:.0} rows/s",
            elapsed.as_secs_f64(),
            N as f64 / elapsed.as_secs_f64()
        );
    }
}
