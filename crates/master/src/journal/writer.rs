//! The journal's writer thread: the SQLite connection, the schema and its
//! migrations, the private file it is kept in, and the batched, paced
//! writes with retention.

use super::*;

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
/// [`SCHEMA_V2`], and by [`MIGRATE_FROM_1`] from a version 1 journal.
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

/// Version 2 of the schema. A new journal is made with it, then migrated
/// to version 3 ([`MIGRATE_FROM_2`]), so that a new journal and a
/// migrated one are the same. `docs/JOURNAL.md` explains every column.
pub(crate) const SCHEMA_V2: &str = concat!(
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
pub(super) const MIGRATE_FROM_1: &str = concat!(
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

/// The NTP64 `hlc` column (32 bits of seconds, 32 of fraction) as unix
/// microseconds, for its generated `hlc_at` text.
macro_rules! hlc_at {
    () => {
        iso_utc!("(((hlc >> 32) & 4294967295) * 1000000 + (((hlc & 4294967295) * 1000000) >> 32))")
    };
}

/// From schema version 2 to version 3: HLC stamps on every row (null on
/// the rows written before), `cluster_events`, and `meta`, which names the
/// server; and the request rows move to the table `request_rows`, without
/// the generated `ts` text, read through the view `requests` (the same
/// columns as before, plus `hlc` and its text `hlc_at`).
///
/// Why a view: SQLite computes every generated column, `VIRTUAL` ones
/// too, on each `INSERT` (for its constraint checks). The `ts` column's
/// `strftime` was a third of the writer's work: `writer_throughput` under
/// cachegrind took 6.42 billion instructions with it and 4.32 billion
/// without (a second one, `hlc_at`, would have taken it to 8.6). A view
/// computes them only when a query reads them. Dropping the column
/// rewrites the table once, at the migration.
pub(super) const MIGRATE_FROM_2: &str = concat!(
    "ALTER TABLE requests ADD COLUMN hlc INTEGER;
    ALTER TABLE requests RENAME TO request_rows;
    ALTER TABLE request_rows DROP COLUMN ts;
    CREATE VIEW requests AS SELECT
        id, ts_us, ",
    iso_utc!("ts_us"),
    " AS ts,
        client, request_id, op, worker_pid, outcome, latency_us, hlc,
        CASE WHEN hlc IS NULL THEN NULL ELSE ",
    hlc_at!(),
    " END AS hlc_at
        FROM request_rows;
    ALTER TABLE workers ADD COLUMN started_hlc INTEGER;
    ALTER TABLE workers ADD COLUMN exited_hlc INTEGER;
    ALTER TABLE journal_events ADD COLUMN hlc INTEGER;
    CREATE TABLE cluster_events (
        id      INTEGER PRIMARY KEY,
        hlc     INTEGER NOT NULL,
        hlc_at  TEXT GENERATED ALWAYS AS (",
    hlc_at!(),
    ") VIRTUAL,
        ts_us   INTEGER NOT NULL,
        ts      TEXT GENERATED ALWAYS AS (",
    iso_utc!("ts_us"),
    ") VIRTUAL,
        node    TEXT NOT NULL,
        kind    TEXT NOT NULL,
        term    INTEGER,
        view    INTEGER,
        subject TEXT,
        detail  TEXT
    );
    CREATE TABLE meta (
        key     TEXT PRIMARY KEY,
        value   TEXT
    );
    PRAGMA user_version = 3;"
);

/// From schema version 3 to 4: the index `requests_ts` gives way to the
/// table `request_marks`, a sparse index of time over ids. The index
/// cost every insert a second B-tree insert, and every retention delete
/// a second delete: a fifth of `writer_throughput`'s instructions (3.73
/// billion with it, 2.79 without). A mark `(last_id, max_ts_us)`, one per
/// [`MARK_ROWS`] rows, says that no row up to `last_id` has a `ts_us`
/// above `max_ts_us` (the writer keeps a running maximum, so the marks
/// hold however far `ts_us` order strays from `id` order), so the rows at
/// or after an instant `t` all have ids above
/// `(SELECT coalesce(max(last_id), 0) FROM request_marks WHERE max_ts_us < t)`,
/// a range of the rows' own B-tree ([`SINCE_FLOOR`]). The rows there
/// already get one mark for all of them, read from the index before it
/// goes.
pub(super) const MIGRATE_FROM_3: &str = "CREATE TABLE request_marks (
        last_id   INTEGER PRIMARY KEY,
        max_ts_us INTEGER NOT NULL
    );
    INSERT INTO request_marks (last_id, max_ts_us)
        SELECT (SELECT max(id) FROM request_rows), (SELECT max(ts_us) FROM request_rows)
        WHERE EXISTS (SELECT 1 FROM request_rows);
    DROP INDEX requests_ts;
    PRAGMA user_version = 4;";

/// From schema version 4 to 5: `client`, `op` and `outcome` hold numbers,
/// which the view `requests` ([`requests_view_sql`]) turns back into the
/// same text as before. An IPv4 client is the integer `ip << 16 | port`,
/// any other its `[ip]:port` text; `op` is the op's wire byte
/// ([`Op::from_u8`]), `outcome` the outcome's ([`Outcome::to_u8`]).
/// Binding the three as text cost an allocation and a copy each in
/// SQLite, and their text was a quarter of a row's bytes.
///
/// The three columns lose their `TEXT` type (whose affinity would store a
/// number as text), which SQLite can only do by copying the table. The
/// rows written before keep their text, and the view passes text through,
/// so a master of schema 4 still writing during a `USR2` hand-over writes
/// rows the view reads right too. The view goes first: renaming a table
/// would rewrite the view's reference to it.
pub(super) const MIGRATE_FROM_4: &str = "DROP VIEW requests;
    ALTER TABLE request_rows RENAME TO request_rows_v4;
    CREATE TABLE request_rows (
        id          INTEGER PRIMARY KEY,
        ts_us       INTEGER NOT NULL,
        client      NOT NULL,
        request_id,
        op          NOT NULL,
        worker_pid  INTEGER,
        outcome     NOT NULL,
        latency_us  INTEGER NOT NULL,
        hlc         INTEGER
    );
    INSERT INTO request_rows
        (id, ts_us, client, request_id, op, worker_pid, outcome, latency_us, hlc)
        SELECT id, ts_us, client, request_id, op, worker_pid, outcome, latency_us, hlc
        FROM request_rows_v4;
    DROP TABLE request_rows_v4;
    PRAGMA user_version = 5;";

/// From schema version 5 to version 6: request rows are written in
/// batches, one row of `request_batches` for up to [`BATCH_ROWS`]
/// requests, whose `rows` is a JSON array with one array per request
/// ([`encode_batch`]). A SQLite row costs the writer about 1 µs to
/// insert and as much again to delete when retention drops it; a batch
/// row costs that once per batch, and its requests a few dozen
/// nanoseconds each to encode. `request_rows` stays: it keeps the rows
/// written before, and those of a schema-5 master still writing during a
/// `USR2` hand-over; the view `requests` reads both
/// ([`requests_source_sql`]).
pub(super) const MIGRATE_FROM_5: &str = "CREATE TABLE request_batches (
        first_id    INTEGER PRIMARY KEY,
        n           INTEGER NOT NULL,
        ts_us       INTEGER NOT NULL,
        max_ts_us   INTEGER NOT NULL,
        hlc         INTEGER,
        rows        TEXT NOT NULL
    );
    PRAGMA user_version = 6;";

/// Requests per `request_batches` row ([`MIGRATE_FROM_5`]): their JSON is
/// about 16 KiB, four pages.
pub(crate) const BATCH_ROWS: usize = 256;

/// The rows of `requests` (schema version 6) as a `SELECT`: those of
/// `request_rows` and, one per element of its JSON, those of
/// `request_batches`, with readable text for what is stored as numbers
/// ([`MIGRATE_FROM_4`]) and the times (`ts`, `hlc_at`), computed only
/// when a query reads them. The names of ops and outcomes come from
/// [`Op::ALL`] and [`Outcome::ALL`], so a journal opened by a master that
/// knows more of them gets a view that names them too
/// ([`WriterDb::prepare_schema`]); a number the view does not name, and
/// text, read as they are stored.
///
/// With `after_id`, only the requests with a greater id, found through
/// each table's primary key: a query on the view cannot find them so,
/// since a batched request's id is computed (`master report --since`
/// reads through this).
///
/// `tables` picks the tables read: `master report` reads the batches
/// itself ([`BatchedRequest`]), and `request_rows` through SQL.
pub(crate) fn requests_source_sql(after_id: Option<i64>, tables: Tables) -> String {
    let mut op = String::from("CASE op");
    for o in Op::ALL {
        op.push_str(&format!(" WHEN {} THEN '{}'", o as u8, o.as_str()));
    }
    op.push_str(" ELSE op END");
    let mut outcome = String::from("CASE outcome");
    for o in Outcome::ALL {
        outcome.push_str(&format!(" WHEN {} THEN '{}'", o.to_u8(), o.as_str()));
    }
    outcome.push_str(" ELSE outcome END");
    let client = "CASE WHEN typeof(client) = 'integer' THEN \
         ((client >> 40) & 255) || '.' || ((client >> 32) & 255) || '.' || \
         ((client >> 24) & 255) || '.' || ((client >> 16) & 255) || ':' || (client & 65535) \
         ELSE client END";
    let (rows_where, batches_where) = match after_id {
        None => (String::new(), String::new()),
        Some(id) => (
            format!(" WHERE id > {id}"),
            // A batch holds at most BATCH_ROWS ids from its first_id.
            format!(
                " WHERE b.first_id > {} AND b.first_id + r.key > {id}",
                id.saturating_sub(BATCH_ROWS as i64)
            ),
        ),
    };
    let rows = format!(
        "SELECT id, ts_us, client, request_id, op, worker_pid, outcome, latency_us, hlc
            FROM request_rows{rows_where}"
    );
    let batches = format!(
        "SELECT b.first_id + r.key AS id, b.ts_us + (r.value ->> 0) AS ts_us,
            r.value ->> 1 AS client, r.value ->> 2 AS request_id, r.value ->> 3 AS op,
            r.value ->> 4 AS worker_pid, r.value ->> 5 AS outcome, r.value ->> 6 AS latency_us,
            b.hlc + (r.value ->> 7) AS hlc
            FROM request_batches AS b, json_each(b.rows) AS r{batches_where}"
    );
    let source = match tables {
        Tables::Both => format!("{rows}\n        UNION ALL\n        {batches}"),
        Tables::Rows => rows,
        Tables::Batches => batches,
    };
    format!(
        "SELECT
        id, ts_us, {ts} AS ts,
        {client} AS client,
        request_id,
        {op} AS op,
        worker_pid,
        {outcome} AS outcome,
        latency_us, hlc,
        CASE WHEN hlc IS NULL THEN NULL ELSE {hlc_at} END AS hlc_at
        FROM ({source})",
        ts = iso_utc!("ts_us"),
        hlc_at = hlc_at!(),
    )
}

/// The tables behind `requests` that [`requests_source_sql`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tables {
    /// Both, as the view does.
    Both,
    /// `request_rows` only.
    Rows,
    /// `request_batches` only.
    Batches,
}

/// The view `requests` of schema version 6 ([`requests_source_sql`]).
pub(super) fn requests_view_sql() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        format!(
            "CREATE VIEW requests AS {}",
            requests_source_sql(None, Tables::Both)
        )
    })
}

/// The `client` column's integer for an IPv4 client, `ip << 16 | port`
/// ([`MIGRATE_FROM_4`]); `None` for any other, stored as text.
pub(super) fn client_integer(addr: SocketAddr) -> Option<i64> {
    match addr {
        SocketAddr::V4(v4) => Some(i64::from(u32::from(*v4.ip())) << 16 | i64::from(v4.port())),
        SocketAddr::V6(_) => None,
    }
}

/// Request rows per `request_marks` row: a time window's scan reads at most
/// this many rows, plus one batch, before its first, and the marks are a
/// thousandth of the rows.
pub(super) const MARK_ROWS: u64 = 1024;

/// The highest id below every request row at or after `?1` (unix µs),
/// from `request_marks`: 0 when no mark is that old. Schema version 4 on.
pub const SINCE_FLOOR: &str =
    "SELECT coalesce(max(last_id), 0) FROM request_marks WHERE max_ts_us < ?1";

/// Sets one `meta` row.
pub(super) const UPSERT_META: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// One `request_batches` row ([`MIGRATE_FROM_5`]).
pub(super) const INSERT_BATCH: &str =
    "INSERT INTO request_batches (first_id, n, ts_us, max_ts_us, hlc, rows) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The id the next request gets: one above the highest in either table,
/// read inside the writing transaction, so that another master writing
/// the same journal (while `USR2` replaces one) never gets the same ids.
pub(super) const NEXT_REQUEST_ID: &str = "SELECT max(
        coalesce((SELECT max(id) FROM request_rows), 0),
        coalesce((SELECT first_id + n - 1 FROM request_batches ORDER BY first_id DESC LIMIT 1), 0)
    ) + 1";

pub(super) const INSERT_WORKER: &str =
    "INSERT INTO workers (pid, started_us, started_hlc) VALUES (?1, ?2, ?3)";
/// Closes the newest open row of this pid: the OS reuses pids over months.
pub(super) const UPDATE_WORKER_EXIT: &str = "UPDATE workers SET exited_us = ?2, exit_code = ?3, \
     signal = ?4, exit_status = ?5, requests_served = ?6, reason = ?7, exited_hlc = ?8 \
     WHERE id = (SELECT max(id) FROM workers WHERE pid = ?1 AND exited_us IS NULL)";
pub(super) const INSERT_WORKER_EXIT: &str = "INSERT INTO workers \
     (pid, exited_us, exit_code, signal, exit_status, requests_served, reason, exited_hlc) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
pub(super) const INSERT_EVENT: &str =
    "INSERT INTO journal_events (ts_us, kind, count, detail, hlc) \
     VALUES (?1, ?2, ?3, ?4, ?5)";
pub(super) const INSERT_CLUSTER_EVENT: &str = "INSERT INTO cluster_events \
     (hlc, ts_us, node, kind, term, view, subject, detail) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// An HLC stamp (NTP64 bits) as the journal stores it: the same 64 bits as
/// an SQLite INTEGER (so negative from 2038 on; `ORDER BY hlc < 0, hlc`
/// sorts them as unsigned), or NULL for 0, no stamp.
pub(super) fn hlc_value(hlc: u64) -> Option<i64> {
    (hlc != 0).then_some(hlc as i64)
}

/// The writer thread's side: the connection and the bookkeeping that saves
/// it from counting rows in SQL.
pub(super) struct WriterDb {
    conn: Connection,
    path: PathBuf,
    max_rows: u64,
    /// Stamps the journal's own events.
    clock: Clock,
    /// Rows in `requests`, kept in memory; `None` after a failed transaction,
    /// when it is counted again.
    request_rows: Option<u64>,
    /// The running maximum of `ts_us` and the rows not yet marked, for
    /// `request_marks`; `None` after a failed transaction, when they are
    /// read again.
    marks: Option<Marks>,
    /// Worker and event rows inserted since the last trim of those tables.
    aux_inserted: u64,
    /// Shed rows already recorded in `journal_events`.
    shed_recorded: u64,
    last_shed_event: Option<Instant>,
    last_failure_log: Option<Instant>,
    failed_batches: u64,
    /// The JSON of the batch being inserted, reused ([`encode_batch`]).
    batch_text: Vec<u8>,
}

/// Where the writer is in `request_marks` ([`MIGRATE_FROM_3`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Marks {
    /// The highest `ts_us` of any row written (`i64::MIN`: none).
    max_ts_us: i64,
    /// Rows written after the newest mark.
    unmarked: u64,
    /// The id this writer's next row gets unless someone else wrote rows
    /// meanwhile or deleted the newest ones: then the state is read again.
    next_id: i64,
}

impl Marks {
    /// Reads the newest mark and the rows after it: at most about
    /// [`MARK_ROWS`] of them, unless marks were deleted by hand.
    pub(super) fn read(conn: &Connection) -> rusqlite::Result<Marks> {
        let (last_id, marked_max): (i64, Option<i64>) = conn
            .query_row(
                "SELECT last_id, max_ts_us FROM request_marks ORDER BY last_id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok((0, None)),
                e => Err(e),
            })?;
        // A batch that straddles the mark counts whole: its own
        // max_ts_us is the most its rows after the mark can have.
        let (unmarked, tail_max): (i64, Option<i64>) = conn.query_row(
            &format!(
                "SELECT (SELECT count(*) FROM request_rows WHERE id > ?1) \
                 + (SELECT coalesce(sum(n), 0) FROM request_batches \
                    WHERE first_id > ?1 - {BATCH_ROWS} AND first_id + n - 1 > ?1), \
                 (SELECT max(m) FROM (SELECT max(ts_us) AS m FROM request_rows WHERE id > ?1 \
                    UNION ALL SELECT max(max_ts_us) FROM request_batches \
                    WHERE first_id > ?1 - {BATCH_ROWS} AND first_id + n - 1 > ?1))"
            ),
            [last_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let top: i64 = conn.query_row(NEXT_REQUEST_ID, [], |r| r.get::<_, i64>(0))? - 1;
        Ok(Marks {
            max_ts_us: marked_max.max(tail_max).unwrap_or(i64::MIN),
            unmarked: unmarked.max(0) as u64,
            // A mark above the newest row (deleted by hand) makes the
            // first insert read the state again, dropping that mark.
            next_id: top.max(last_id).saturating_add(1),
        })
    }

    /// Accounts for `rows`, just inserted with ids up to `last_id`, and
    /// adds a mark when [`MARK_ROWS`] rows are unmarked.
    pub(super) fn after_insert(
        &mut self,
        tx: &Connection,
        rows: &[RequestRow],
        last_id: i64,
    ) -> rusqlite::Result<()> {
        let first_id = last_id - rows.len() as i64 + 1;
        if first_id == self.next_id {
            for row in rows {
                self.max_ts_us = self.max_ts_us.max(row.ts_unix_us);
            }
            self.unmarked += rows.len() as u64;
            self.next_id = last_id + 1;
        } else {
            // Rows this writer did not write came in between (another
            // master's, while USR2 replaces this one: its times are not in
            // the running maximum), or the newest rows were deleted by hand
            // and their ids came again (any mark over them no longer
            // holds). The database knows: its marks up to the rows before
            // ours, and at most about MARK_ROWS rows after them.
            tx.prepare_cached("DELETE FROM request_marks WHERE last_id >= ?1")?
                .execute([first_id])?;
            *self = Marks::read(tx)?;
        }
        if self.unmarked >= MARK_ROWS {
            tx.prepare_cached("INSERT INTO request_marks (last_id, max_ts_us) VALUES (?1, ?2)")?
                .execute([last_id, self.max_ts_us])?;
            self.unmarked = 0;
        }
        Ok(())
    }
}

/// The mode of the journal and its `-wal` and `-shm` files.
pub(super) const PRIVATE_MODE: u32 = 0o600;

/// The journal's file as the master itself found or made it before SQLite
/// opens it: created with mode [`PRIVATE_MODE`], never through a symbolic
/// link, and a regular file.
///
/// It holds no descriptor: SQLite's locks are POSIX record locks, which a
/// process loses on a file when it closes *any* descriptor of that file,
/// so nothing here opens the files (other than with `O_PATH`) while SQLite
/// has them open.
pub(super) struct PrivateFile {
    stat: nix::sys::stat::FileStat,
}

impl PrivateFile {
    /// Opens or creates `path` (mode [`PRIVATE_MODE`]) without following a
    /// symbolic link in its last component, checks that it is a regular
    /// file, and closes it again.
    pub(super) fn open(path: &Path) -> anyhow::Result<PrivateFile> {
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
    pub(super) fn check_still_at(&self, path: &Path) -> anyhow::Result<()> {
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
    pub(super) fn tighten(&self, path: &Path) {
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
    pub(super) fn open(path: &Path, max_rows: u64, origin: &Origin) -> anyhow::Result<WriterDb> {
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
        conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
        let mut db = WriterDb {
            conn,
            path: path.to_owned(),
            max_rows,
            clock: origin.clock.clone(),
            request_rows: None,
            marks: None,
            aux_inserted: 0,
            shed_recorded: 0,
            last_shed_event: None,
            last_failure_log: None,
            failed_batches: 0,
            batch_text: Vec::new(),
        };
        db.prepare_schema(origin)?;
        let check: String = db.conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            bail!("the database is corrupt: {check}");
        }
        db.request_rows = Some(db.count_requests()?);
        db.marks = Some(Marks::read(&db.conn)?);
        Ok(db)
    }

    /// Creates the schema on first use, or checks it is ours and migrates
    /// it; either way it writes (`meta` and the `open` event), so an
    /// unwritable file fails now and not on the first batch.
    pub(super) fn prepare_schema(&mut self, origin: &Origin) -> anyhow::Result<()> {
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
                tx.execute_batch(SCHEMA_V2)?;
                tx.execute_batch(MIGRATE_FROM_2)?;
                tx.execute_batch(MIGRATE_FROM_3)?;
            }
            1 => {
                log::info!(
                    "journal: schema version 1 -> 6 (request ids as values, HLC stamps, time marks, numbers for client, op and outcome, requests in batches)"
                );
                tx.execute_batch(MIGRATE_FROM_1)
                    .context("cannot migrate the journal from schema version 1")?;
                tx.execute_batch(MIGRATE_FROM_2)
                    .context("cannot migrate the journal from schema version 2")?;
                tx.execute_batch(MIGRATE_FROM_3)
                    .context("cannot migrate the journal from schema version 3")?;
            }
            2 => {
                log::info!(
                    "journal: schema version 2 -> 6 (HLC stamps, cluster events, time marks, numbers for client, op and outcome, requests in batches)"
                );
                tx.execute_batch(MIGRATE_FROM_2)
                    .context("cannot migrate the journal from schema version 2")?;
                tx.execute_batch(MIGRATE_FROM_3)
                    .context("cannot migrate the journal from schema version 3")?;
            }
            3 => {
                log::info!("journal: schema version 3 -> 6 (time marks, numbers for client, op and outcome, requests in batches)");
                tx.execute_batch(MIGRATE_FROM_3)
                    .context("cannot migrate the journal from schema version 3")?;
            }
            4 | 5 | SCHEMA_VERSION => {}
            v => bail!(
                "journal schema version {v} is newer than this master understands ({SCHEMA_VERSION})"
            ),
        }
        if version < 5 {
            if version == 4 {
                log::info!("journal: schema version 4 -> 6 (numbers for client, op and outcome, requests in batches)");
            }
            tx.execute_batch(MIGRATE_FROM_4)
                .context("cannot migrate the journal from schema version 4")?;
        }
        if version < SCHEMA_VERSION {
            if version == 5 {
                log::info!("journal: schema version 5 -> 6 (requests in batches)");
            }
            tx.execute_batch(MIGRATE_FROM_5)
                .context("cannot migrate the journal from schema version 5")?;
        }
        // The view names the ops and outcomes this master knows.
        let view: Option<String> = tx
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'view' AND name = 'requests'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if view.as_deref() != Some(requests_view_sql()) {
            if view.is_some() {
                tx.execute_batch("DROP VIEW requests")?;
            }
            tx.execute_batch(requests_view_sql())?;
        }
        let server = origin.server.map(|a| a.to_string());
        let meta = [
            ("server", server),
            ("hlc_id", Some(origin.clock.id().to_string())),
            ("master_pid", Some(std::process::id().to_string())),
        ];
        for (key, value) in meta {
            tx.execute(UPSERT_META, params![key, value])?;
        }
        tx.execute(
            INSERT_EVENT,
            params![
                now_unix_us(),
                "open",
                0,
                format!("master pid {}", std::process::id()),
                hlc_value(self.clock.stamp()),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub(super) fn count_requests(&self) -> rusqlite::Result<u64> {
        count_requests(&self.conn)
    }

    /// The writer thread: take what is queued, write it, repeat; on close,
    /// write what is left and return.
    pub(super) fn run(mut self, shared: &Shared) {
        let mut rows: Vec<RequestRow> = Vec::with_capacity(FLUSH_ROWS);
        let mut workers: Vec<WorkerEvent> = Vec::new();
        let mut cluster: Vec<ClusterEvent> = Vec::new();
        let mut last_commit: Option<Instant> = None;
        loop {
            let closing = {
                let mut q = shared.lock();
                loop {
                    if q.closing || q.rows.len() >= FLUSH_ROWS {
                        break;
                    }
                    if q.rows.is_empty() && q.workers.is_empty() && q.cluster.is_empty() {
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
                std::mem::swap(&mut q.cluster, &mut cluster);
                q.closing
            };
            self.write(&rows, &workers, &cluster, shared, closing);
            last_commit = Some(Instant::now());
            rows.clear();
            workers.clear();
            cluster.clear();
            if closing {
                // `close` takes the handle, so nothing can be queued after it.
                return;
            }
        }
    }

    /// Writes one batch in one transaction, keeping the counters right
    /// whether it commits or fails.
    pub(super) fn write(
        &mut self,
        rows: &[RequestRow],
        workers: &[WorkerEvent],
        cluster: &[ClusterEvent],
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
        match self.write_tx(rows, workers, cluster, shed_now, closing) {
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
                self.marks = None;
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

    pub(super) fn write_tx(
        &mut self,
        rows: &[RequestRow],
        workers: &[WorkerEvent],
        cluster: &[ClusterEvent],
        shed_now: u64,
        closing: bool,
    ) -> anyhow::Result<()> {
        let mut request_rows = match self.request_rows {
            Some(n) => n,
            None => self.count_requests()?,
        };
        let mut marks = match self.marks {
            Some(m) => m,
            None => Marks::read(&self.conn)?,
        };
        let mut aux_inserted = self.aux_inserted;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !rows.is_empty() {
            let mut next_id: i64 = tx
                .prepare_cached(NEXT_REQUEST_ID)?
                .query_row([], |r| r.get(0))?;
            let mut insert = tx.prepare_cached(INSERT_BATCH)?;
            for batch in rows.chunks(BATCH_ROWS) {
                self.batch_text.clear();
                let (ts_us, max_ts_us, hlc) = encode_batch(batch, &mut self.batch_text);
                // All ASCII but the JSON strings, which are UTF-8.
                let text = std::str::from_utf8(&self.batch_text)?;
                let n = batch.len() as i64;
                insert.execute(params![next_id, n, ts_us, max_ts_us, hlc, text])?;
                next_id += n;
            }
            request_rows += rows.len() as u64;
            marks.after_insert(&tx, rows, next_id - 1)?;
        }
        for event in workers {
            match *event {
                WorkerEvent::Started { pid, at_us, hlc } => {
                    tx.prepare_cached(INSERT_WORKER)?.execute(params![
                        pid,
                        at_us,
                        hlc_value(hlc)
                    ])?;
                    aux_inserted += 1;
                }
                WorkerEvent::Exited {
                    pid,
                    at_us,
                    hlc,
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
                        hlc_value(hlc),
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
        for e in cluster {
            tx.prepare_cached(INSERT_CLUSTER_EVENT)?.execute(params![
                hlc_value(e.hlc),
                e.ts_unix_us,
                e.node,
                e.kind.as_str(),
                e.term.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                e.view.map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
                e.subject,
                e.detail,
            ])?;
            aux_inserted += 1;
        }
        let now = now_unix_us();
        if shed_now > 0 {
            tx.prepare_cached(INSERT_EVENT)?.execute(params![
                now,
                "shed",
                i64::try_from(shed_now).unwrap_or(i64::MAX),
                Option::<&str>::None,
                hlc_value(self.clock.stamp()),
            ])?;
            aux_inserted += 1;
        }
        if closing {
            tx.prepare_cached(INSERT_EVENT)?.execute(params![
                now,
                "close",
                0,
                format!("master pid {}", std::process::id()),
                hlc_value(self.clock.stamp()),
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
        self.marks = Some(marks);
        self.aux_inserted = aux_inserted;
        Ok(())
    }
}

/// The requests in both tables: a full count, for startup and after
/// deletions by hand.
fn count_requests(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT (SELECT count(*) FROM request_rows) \
         + (SELECT coalesce(sum(n), 0) FROM request_batches)",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n.max(0) as u64)
}

/// Deletes the oldest requests once the table is more than a tenth (at
/// least [`BATCH_ROWS`] rows) over `max_rows`, back down to `max_rows`,
/// or up to `BATCH_ROWS - 1` more (a batch goes whole): old rows go in
/// batches, not one per insert. Returns the new row count.
pub(super) fn apply_retention(
    tx: &Connection,
    max_rows: u64,
    request_rows: u64,
) -> rusqlite::Result<u64> {
    if max_rows == 0 {
        return Ok(request_rows);
    }
    let slack = (max_rows / 10).max(BATCH_ROWS as u64);
    if request_rows <= max_rows + slack {
        return Ok(request_rows);
    }
    // Ids grow by one per request and only the oldest are deleted, so the
    // newest `max_rows` rows are those above `top - max_rows`; a batch
    // goes when all its rows do, so up to BATCH_ROWS - 1 more stay.
    let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
    let top = tx
        .prepare_cached(NEXT_REQUEST_ID)?
        .query_row([], |r| r.get::<_, i64>(0))?
        - 1;
    let last_old = top.saturating_sub(keep);
    let mut deleted = tx
        .prepare_cached("DELETE FROM request_rows WHERE id <= ?1")?
        .execute([last_old])? as u64;
    let old_batches = "FROM request_batches WHERE first_id <= ?1 AND first_id + n - 1 <= ?1";
    let batched: i64 = tx
        .prepare_cached(&format!("SELECT coalesce(sum(n), 0) {old_batches}"))?
        .query_row([last_old], |r| r.get(0))?;
    tx.prepare_cached(&format!("DELETE {old_batches}"))?
        .execute([last_old])?;
    deleted += batched.max(0) as u64;
    // The marks of deleted rows only: a mark covers the rows up to its id.
    tx.prepare_cached(
        "DELETE FROM request_marks WHERE last_id < (SELECT min(coalesce( \
             (SELECT min(id) FROM request_rows), ?1), coalesce( \
             (SELECT first_id FROM request_batches ORDER BY first_id LIMIT 1), ?1)))",
    )?
    .execute([top.saturating_add(1)])?;
    let left = request_rows.saturating_sub(deleted);
    if left > max_rows + slack {
        // Ids with gaps (rows deleted by hand): count for real.
        return count_requests(tx);
    }
    Ok(left)
}

/// Whether `every` has passed since `last` (or it never happened).
pub(super) fn interval_passed(last: Option<Instant>, every: Duration) -> bool {
    match last {
        Some(t) => t.elapsed() >= every,
        None => true,
    }
}

/// Keeps `workers` (exited ones), `journal_events` and `cluster_events` to
/// their newest [`MAX_AUX_ROWS`] rows.
pub(super) fn trim_aux_tables(tx: &Connection) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "DELETE FROM workers WHERE exited_us IS NOT NULL \
         AND id <= (SELECT max(id) FROM workers) - ?1",
    )?
    .execute([MAX_AUX_ROWS])?;
    tx.prepare_cached(
        "DELETE FROM journal_events WHERE id <= (SELECT max(id) FROM journal_events) - ?1",
    )?
    .execute([MAX_AUX_ROWS])?;
    tx.prepare_cached(
        "DELETE FROM cluster_events WHERE id <= (SELECT max(id) FROM cluster_events) - ?1",
    )?
    .execute([MAX_AUX_ROWS])?;
    Ok(())
}

/// Appends a request's id to `out` as the JSON value that `->>` reads as
/// the SQL value it denotes ([`protocol::id_value`]): a string as TEXT
/// without its quotes, an integer as INTEGER, another number as REAL,
/// `true`/`false` as 1/0 (as SQLite reads them), and `null`, like no id,
/// as NULL. Allocates only for a string with escapes.
pub(super) fn encode_request_id(out: &mut Vec<u8>, id: Option<&RequestId>) {
    let Some(id) = id else {
        out.extend_from_slice(b"null");
        return;
    };
    let mut digits = itoa::Buffer::new();
    if let Some(n) = small_integer(id.as_bytes()) {
        out.extend_from_slice(digits.format(n).as_bytes());
        return;
    }
    // Borrowed unless a cut left bytes that are not UTF-8.
    let raw = String::from_utf8_lossy(id.as_bytes());
    match protocol::id_value(&raw) {
        IdValue::Text(text) => json_string(out, &text),
        IdValue::Integer(n) => out.extend_from_slice(digits.format(n).as_bytes()),
        // serde_json writes the shortest text that reads back as `x`
        // (`null` for a value JSON has no text for).
        IdValue::Real(x) => {
            let _ = serde_json::to_writer(&mut *out, &x);
        }
        IdValue::Bool(b) => out.push(if b { b'1' } else { b'0' }),
        IdValue::Null => out.extend_from_slice(b"null"),
    }
}

/// Appends `text` to `out` as a JSON string.
fn json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// The integer of an id of at most 18 decimal digits after an optional
/// `-` (which cannot overflow an `i64`), the commonest id, read without
/// the UTF-8 and JSON checks of [`protocol::id_value`], which reads it the
/// same; `None` for anything else.
pub(super) fn small_integer(raw: &[u8]) -> Option<i64> {
    let (negative, digits) = match raw {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, raw),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(if negative { -n } else { n })
}

/// Appends `rows` to `out` as the JSON of one `request_batches` row
/// ([`MIGRATE_FROM_5`]): an array with, per request, `[ts, client, id,
/// op, worker_pid, outcome, latency_us, hlc]`, where `ts` counts
/// microseconds from the batch's `ts_us` (its first request's) and `hlc`
/// from the batch's `hlc` (its first stamp; left out when the request has
/// none), `client` is a number for IPv4 ([`client_integer`]) and text
/// otherwise, and `op` and `outcome` are numbers. The offsets keep a
/// request's JSON near 40 bytes instead of 60: the writer's CPU goes
/// mostly to writing pages, twice (the WAL, then its checkpoint).
/// Returns the batch's `ts_us`, `max_ts_us` and `hlc`.
pub(super) fn encode_batch(rows: &[RequestRow], out: &mut Vec<u8>) -> (i64, i64, Option<i64>) {
    let mut digits = itoa::Buffer::new();
    let mut client_buf = [0u8; 64];
    let base = rows.first().map_or(0, |r| r.ts_unix_us);
    let base_hlc = rows.iter().find_map(|r| hlc_value(r.hlc));
    let mut max_ts = base;
    out.push(b'[');
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        max_ts = max_ts.max(row.ts_unix_us);
        out.push(b'[');
        out.extend_from_slice(
            digits
                .format(row.ts_unix_us.saturating_sub(base))
                .as_bytes(),
        );
        out.push(b',');
        match client_integer(row.client) {
            Some(n) => out.extend_from_slice(digits.format(n).as_bytes()),
            None => json_string(out, &format_client(row.client, &mut client_buf)),
        }
        out.push(b',');
        encode_request_id(out, row.request_id.as_ref());
        out.push(b',');
        out.extend_from_slice(digits.format(row.op as u8).as_bytes());
        out.push(b',');
        match row.worker_pid {
            Some(pid) => out.extend_from_slice(digits.format(pid).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b',');
        out.extend_from_slice(digits.format(row.outcome.to_u8()).as_bytes());
        out.push(b',');
        let latency = i64::try_from(row.latency_us).unwrap_or(i64::MAX);
        out.extend_from_slice(digits.format(latency).as_bytes());
        if let (Some(hlc), Some(base_hlc)) = (hlc_value(row.hlc), base_hlc) {
            out.push(b',');
            // Stamps within a batch are milliseconds apart. Only a batch
            // that straddles the instant stamps turn negative (2038,
            // hlc_value) reads back wrong: SQLite's sum overflows to REAL.
            out.extend_from_slice(digits.format(hlc.wrapping_sub(base_hlc)).as_bytes());
        }
        out.push(b']');
    }
    out.push(b']');
    (base, max_ts, base_hlc)
}

/// A request of a `request_batches` row as `master report` reads it,
/// without the client, id and op it does not count ([`encode_batch`]).
/// Decoding the JSON here takes a fifth of the time of the view's `->>`
/// per column.
#[derive(Debug, PartialEq)]
pub(crate) struct BatchedRequest {
    /// Microseconds from the batch's `ts_us`.
    pub ts_offset_us: i64,
    pub worker_pid: Option<u32>,
    /// The outcome's number, or text as it is stored.
    pub outcome: serde_json::Value,
    pub latency_us: i64,
    /// From the batch's `hlc`; `None`: no stamp.
    pub hlc_offset: Option<i64>,
}

impl BatchedRequest {
    /// The outcome as the view names it: a number it does not know, or
    /// text, as it is stored.
    pub(crate) fn outcome_text(&self) -> std::borrow::Cow<'_, str> {
        use std::borrow::Cow;
        match &self.outcome {
            serde_json::Value::String(text) => Cow::Borrowed(text),
            other => match other
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .and_then(Outcome::from_u8)
            {
                Some(o) => Cow::Borrowed(o.as_str()),
                None => Cow::Owned(other.to_string()),
            },
        }
    }
}

impl<'de> serde::Deserialize<'de> for BatchedRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, IgnoredAny, SeqAccess, Visitor};
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = BatchedRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[ts, client, id, op, worker_pid, outcome, latency_us, hlc]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BatchedRequest, A::Error> {
                let short = |n| A::Error::invalid_length(n, &self);
                let ts_offset_us = seq.next_element()?.ok_or_else(|| short(0))?;
                for n in 1..=3 {
                    seq.next_element::<IgnoredAny>()?.ok_or_else(|| short(n))?;
                }
                let worker_pid = seq.next_element()?.ok_or_else(|| short(4))?;
                let outcome = seq.next_element()?.ok_or_else(|| short(5))?;
                let latency_us = seq.next_element()?.ok_or_else(|| short(6))?;
                let hlc_offset = seq.next_element::<Option<i64>>()?.flatten();
                // Columns a later schema may add.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(BatchedRequest {
                    ts_offset_us,
                    worker_pid,
                    outcome,
                    latency_us,
                    hlc_offset,
                })
            }
        }
        d.deserialize_seq(Fields)
    }
}

/// `ip:port` text for `addr`, written into `buf` (no allocation unless an
/// IPv6 address with a scope id does not fit): the `client` of a client
/// that has no integer ([`client_integer`]).
pub(super) fn format_client(addr: SocketAddr, buf: &mut [u8; 64]) -> std::borrow::Cow<'_, str> {
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    if write!(cursor, "{addr}").is_ok() {
        let len = cursor.position() as usize;
        if let Ok(s) = std::str::from_utf8(&buf[..len]) {
            return std::borrow::Cow::Borrowed(s);
        }
    }
    std::borrow::Cow::Owned(addr.to_string())
}
