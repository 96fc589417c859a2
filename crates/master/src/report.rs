//! `master report`: a summary of a journal for an operator (aligned text)
//! or a script (`--json`); given several journals (one per server), their
//! merge in causal order (`merge.rs`).
//!
//! [`Report::collect`] reads the journal read-only inside one read
//! transaction (a consistent snapshot even while a master is writing) with a
//! single pass over `requests`: totals, outcome counts and latency
//! histograms (overall, per worker, for the master's own answers) are all
//! accumulated in that pass. Requests are attributed to a `workers` row by pid
//! and start time, so a pid the OS reused is reported as two workers.

mod merge;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};

use crate::journal::{
    now_unix_us, requests_source_sql, BatchedRequest, Tables, BATCH_ROWS, SCHEMA_VERSION,
    SINCE_FLOOR,
};

/// `master report --journal PATH [--journal PATH ...] [--since DURATION]
/// [--rows N] [--timeline N] [--json]`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// The journal database to read. Give it once per server to merge the
    /// servers' journals in causal (HLC) order, with figures per server.
    #[arg(long, required = true, value_name = "PATH")]
    pub journal: Vec<PathBuf>,
    /// Only requests received in this last stretch of time: 30s, 10m, 2h, 1d
    /// (or combined, 1h30m).
    #[arg(long)]
    pub since: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also list the last N requests of the journals, merged in causal
    /// (HLC) order.
    #[arg(long, default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=merge::MAX_LISTED as i64))]
    pub rows: u32,
    /// How many cluster events, the last ones in causal order, the cluster
    /// timeline shows (when the journals hold any).
    #[arg(long, default_value_t = 50, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=merge::MAX_LISTED as i64))]
    pub timeline: u32,
}

/// Prints the report for `args` to stdout.
///
/// # Errors
/// An unreadable, missing or foreign journal, a bad `--since`, or a failed
/// write to stdout (a closed pipe is not an error).
pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let since = match &args.since {
        Some(s) => Some(parse_since(s)?),
        None => None,
    };
    let since_us = since.map(|d| window_start_us(now_unix_us(), d));
    let limits = merge::Limits {
        rows: args.rows as usize,
        timeline: args.timeline as usize,
    };
    let mut merged = merge::Merged::collect(&args.journal, since_us, limits)?;
    merged.set_since(args.since.as_deref());
    let mut out = io::stdout().lock();
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &merged.to_json())
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        merged.write_text(&mut out)
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the report")
        }
        _ => Ok(()),
    }
}

/// What a scan of `requests` reads, to follow `FROM`: all of the view, or
/// with `since_us` the rows received at or after `?1`, starting at the
/// first id that can be one, from the journal's `request_marks`
/// ([`SINCE_FLOOR`], schema version 4 on; older journals' index on
/// `ts_us` serves `ts_us >= ?` without one). Schema version 6 on,
/// a view cannot start there (a batched request's id is computed), so
/// the same rows come from [`requests_source_sql`] with the floor, from
/// `tables`. Also returns the floor (0: none).
pub(crate) fn requests_scan_sql(
    conn: &Connection,
    version: i32,
    since_us: Option<i64>,
    tables: Tables,
) -> rusqlite::Result<(String, i64)> {
    let floor = match since_us {
        Some(s) if version >= 4 => conn.query_row(SINCE_FLOOR, [s], |r| r.get(0))?,
        _ => 0,
    };
    let filter = if since_us.is_some() {
        " WHERE ts_us >= ?1"
    } else {
        ""
    };
    if version < 6 {
        let floor_sql = if version >= 4 && since_us.is_some() {
            format!(" AND id > {floor}")
        } else {
            String::new()
        };
        return Ok((format!("requests{filter}{floor_sql}"), floor));
    }
    if since_us.is_none() && tables == Tables::Both {
        return Ok(("requests".to_owned(), 0));
    }
    let source = requests_source_sql(since_us.map(|_| floor), tables);
    Ok((format!("({source}){filter}"), floor))
}

/// Calls `f` with the id, receipt time, HLC key (its stamp, or its wall
/// time as one: `merge::hlc_key_sql`) and the rest of every request of
/// `request_batches` (schema version 6 on) with an id above `floor` and,
/// with `since_us`, received at or after it: the rows the view would
/// give, decoded here ([`BatchedRequest`]).
///
/// # Errors
/// SQLite's, or a batch that is not one, named by its `first_id`.
pub(crate) fn scan_batches(
    conn: &Connection,
    floor: i64,
    since_us: Option<i64>,
    mut f: impl FnMut(i64, i64, u64, &BatchedRequest),
) -> anyhow::Result<()> {
    let mut stmt = conn.prepare(&format!(
        "SELECT first_id, ts_us, hlc, rows FROM request_batches WHERE first_id > {}",
        floor.saturating_sub(BATCH_ROWS as i64)
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let first_id: i64 = r.get(0)?;
        let base_ts: i64 = r.get(1)?;
        let base_hlc: Option<i64> = r.get(2)?;
        let requests: Vec<BatchedRequest> = serde_json::from_str(r.get_ref(3)?.as_str()?)
            .with_context(|| format!("request batch {first_id}: not a batch of requests"))?;
        for (id, q) in (first_id..).zip(&requests) {
            let ts = base_ts.saturating_add(q.ts_offset_us);
            if id <= floor || since_us.is_some_and(|s| ts < s) {
                continue;
            }
            // As the view: b.hlc + offset, null if either is.
            let key = match base_hlc.zip(q.hlc_offset) {
                Some((b, o)) => b.wrapping_add(o) as u64,
                None => crate::clock::ntp64_from_unix_us(ts).0,
            };
            f(id, ts, key, q);
        }
    }
    Ok(())
}

/// The first instant (unix µs) of the window of length `since` that ends
/// at `now_us`; any `--since`, however long, reaches back at most to the
/// earliest time there is.
fn window_start_us(now_us: i64, since: Duration) -> i64 {
    now_us.saturating_sub(i64::try_from(since.as_micros()).unwrap_or(i64::MAX))
}

/// Parses a `--since` duration: one or more `<number><unit>` with units
/// `s`, `m`, `h`, `d` (`30s`, `10m`, `1h30m`).
///
/// # Errors
/// Anything else, with an example of what is expected.
pub fn parse_since(text: &str) -> anyhow::Result<Duration> {
    let bad =
        || anyhow::anyhow!("invalid --since {text:?}: expected a duration like 30s, 10m, 2h or 1d");
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = match rest.as_bytes().get(digits) {
            Some(b's') => 1,
            Some(b'm') => 60,
            Some(b'h') => 3600,
            Some(b'd') => 86_400,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
        rest = &rest[digits + 1..];
    }
    Ok(Duration::from_secs(total))
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

/// Requests and latency for one worker (one `workers` row), or for the
/// requests the master answered itself.
#[derive(Debug)]
pub struct WorkerLine {
    /// `None` for the master's own answers.
    pub pid: Option<u32>,
    pub requests: u64,
    pub p99_us: Option<u64>,
    pub started_us: Option<i64>,
    pub exited_us: Option<i64>,
    pub reason: Option<String>,
    pub exit_status: Option<String>,
    /// No exit is recorded although a master has opened or closed the
    /// journal since the worker started: its master did not stop cleanly.
    pub exit_unrecorded: bool,
    latency: Histogram<u64>,
    /// The exact largest latency: the histogram rounds up within a bucket,
    /// so its quantiles are capped at this.
    max_latency_us: u64,
}

impl WorkerLine {
    fn new(pid: Option<u32>) -> WorkerLine {
        WorkerLine {
            pid,
            requests: 0,
            p99_us: None,
            started_us: None,
            exited_us: None,
            reason: None,
            exit_status: None,
            exit_unrecorded: false,
            latency: new_histogram(2),
            max_latency_us: 0,
        }
    }

    /// `running`, `exited`, or `unknown` (see `exit_unrecorded`).
    pub fn state(&self) -> &'static str {
        if self.exited_us.is_some() {
            "exited"
        } else if self.exit_unrecorded {
            "unknown"
        } else {
            "running"
        }
    }
}

/// Everything `master report` shows.
#[derive(Debug)]
pub struct Report {
    pub journal: PathBuf,
    /// The `--since` text, if any.
    pub since: Option<String>,
    pub since_us: Option<i64>,
    pub requests: u64,
    /// Receipt times of the first and last request in the report.
    pub first_us: Option<i64>,
    pub last_us: Option<i64>,
    /// Outcome codes and their counts, most frequent first.
    pub outcomes: Vec<(String, u64)>,
    pub latency: Option<Latency>,
    pub shed_rows: u64,
    /// Workers in start order: those alive during the period, whether or not
    /// they served a request.
    pub workers: Vec<WorkerLine>,
    /// Requests the master answered itself (busy, stats, timeouts...).
    pub master: WorkerLine,
    /// Requests by the cluster view their server was in when it received
    /// them (empty unless views were given to [`Report::collect_with`]).
    pub views: BTreeMap<u64, ViewCount>,
    /// All the latencies, for merging several reports.
    latency_histogram: Histogram<u64>,
    max_latency_us: u64,
}

/// Requests received in one cluster view.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ViewCount {
    pub requests: u64,
    pub ok: u64,
}

/// Where a server installed a cluster view: the HLC stamp of its `view`
/// event, and the view's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ViewMark {
    pub hlc: u64,
    pub view: u64,
}

/// Records `value`, growing the histogram as needed (`saturating_record`
/// alone would clamp at the initial, small, highest trackable value).
fn record(histogram: &mut Histogram<u64>, value: u64) {
    if histogram.record(value).is_err() {
        histogram.saturating_record(value);
    }
}

fn new_histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new(sigfig).expect("2 or 3 significant figures is a valid histogram")
}

impl Report {
    /// Reads the journal at `path`: everything, or only requests received
    /// at or after `since_us` (unix microseconds).
    ///
    /// # Errors
    /// An error naming the journal when it is missing, unreadable, or not a
    /// udp-pool journal.
    pub fn collect(path: &Path, since_us: Option<i64>) -> anyhow::Result<Report> {
        let snapshot = Snapshot::open(path)?;
        Report::collect_with(&snapshot, since_us, &[])
    }

    /// [`Report::collect`] from a journal already open, counting requests
    /// by the view (`views`, sorted) their server was in at their receipt.
    ///
    /// # Errors
    /// As [`Report::collect`].
    pub(crate) fn collect_with(
        snapshot: &Snapshot,
        since_us: Option<i64>,
        views: &[ViewMark],
    ) -> anyhow::Result<Report> {
        let path = &snapshot.path;
        let mut report = Report {
            journal: path.to_owned(),
            since: None,
            since_us,
            requests: 0,
            first_us: None,
            last_us: None,
            outcomes: Vec::new(),
            latency: None,
            shed_rows: 0,
            workers: Vec::new(),
            master: WorkerLine::new(None),
            views: BTreeMap::new(),
            latency_histogram: new_histogram(3),
            max_latency_us: 0,
        };
        report
            .read(&snapshot.conn, snapshot.version, views)
            .map_err(|e| snapshot.error(&e))?;
        Ok(report)
    }

    fn read(&mut self, conn: &Connection, version: i32, views: &[ViewMark]) -> anyhow::Result<()> {
        let since = self.since_us.unwrap_or(i64::MIN);
        let last_boundary: Option<i64> = conn.query_row(
            "SELECT max(ts_us) FROM journal_events WHERE kind IN ('open', 'close')",
            [],
            |r| r.get(0),
        )?;

        // Workers alive at some point in the period, and where to find each
        // pid's rows (a pid the OS reused has several, in start order).
        let mut by_pid: HashMap<u32, Vec<usize>> = HashMap::new();
        let mut stmt = conn.prepare(
            "SELECT pid, started_us, exited_us, reason, exit_status FROM workers \
             WHERE exited_us IS NULL OR exited_us >= ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query([since])?;
        while let Some(r) = rows.next()? {
            let mut w = WorkerLine::new(Some(r.get(0)?));
            w.started_us = r.get(1)?;
            w.exited_us = r.get(2)?;
            w.reason = r.get(3)?;
            w.exit_status = r.get(4)?;
            w.exit_unrecorded = w.exited_us.is_none()
                && matches!((w.started_us, last_boundary), (Some(s), Some(b)) if s < b);
            by_pid
                .entry(w.pid.unwrap_or(0))
                .or_default()
                .push(self.workers.len());
            self.workers.push(w);
        }
        drop(rows);
        drop(stmt);

        // The one pass over `requests`.
        let mut outcomes: HashMap<String, u64> = HashMap::new();
        let mut latency = new_histogram(3);
        let mut max_latency = 0u64;
        // The HLC key only when it is needed, to place requests in views.
        let key = if views.is_empty() {
            "NULL".to_owned()
        } else {
            merge::hlc_key_sql(version)
        };
        // Schema 6 on, the batches are read apart, their JSON decoded here.
        let batched = version >= 6;
        // No WHERE without --since: a plain table scan beats walking an index.
        let tables = if batched { Tables::Rows } else { Tables::Both };
        let (scan, floor) = requests_scan_sql(conn, version, self.since_us, tables)?;
        let mut visit = |ts: i64, pid: Option<u32>, outcome: &str, lat: u64, key: u64| {
            self.requests += 1;
            self.first_us = Some(self.first_us.map_or(ts, |f| f.min(ts)));
            self.last_us = Some(self.last_us.map_or(ts, |l| l.max(ts)));
            match outcomes.get_mut(outcome) {
                Some(n) => *n += 1,
                None => {
                    outcomes.insert(outcome.to_owned(), 1);
                }
            }
            record(&mut latency, lat);
            max_latency = max_latency.max(lat);
            if let Some(view) = merge::view_at(views, key) {
                let count = self.views.entry(view).or_default();
                count.requests += 1;
                count.ok += u64::from(outcome == "ok");
            }

            let line = match pid {
                None => &mut self.master,
                Some(pid) => {
                    let index = match by_pid.get(&pid) {
                        Some(ws) => attribute(&self.workers, ws, ts),
                        None => {
                            // Its `workers` row is gone (trimmed, or never written).
                            by_pid.insert(pid, vec![self.workers.len()]);
                            self.workers.push(WorkerLine::new(Some(pid)));
                            self.workers.len() - 1
                        }
                    };
                    &mut self.workers[index]
                }
            };
            line.requests += 1;
            record(&mut line.latency, lat);
            line.max_latency_us = line.max_latency_us.max(lat);
        };
        let sql = format!("SELECT ts_us, worker_pid, outcome, latency_us, {key} FROM {scan}");
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = if self.since_us.is_some() {
            stmt.query([since])?
        } else {
            stmt.query([])?
        };
        while let Some(r) = rows.next()? {
            let lat = u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0);
            // No views: no key (NULL).
            let key = r.get::<_, Option<i64>>(4)?.unwrap_or(0) as u64;
            visit(r.get(0)?, r.get(1)?, r.get_ref(2)?.as_str()?, lat, key);
        }
        drop(rows);
        drop(stmt);
        if batched {
            scan_batches(conn, floor, self.since_us, |_, ts, key, q| {
                let lat = u64::try_from(q.latency_us).unwrap_or(0);
                visit(ts, q.worker_pid, &q.outcome_text(), lat, key);
            })?;
        }

        if self.since_us.is_some() {
            // A worker whose master was killed never gets an exit row: keep
            // it only if it started in the period or served requests in it.
            self.workers.retain(|w| {
                !w.exit_unrecorded || w.requests > 0 || w.started_us.is_some_and(|s| s >= since)
            });
        }
        if self.requests > 0 {
            let q = |q: f64| latency.value_at_quantile(q).min(max_latency);
            self.latency = Some(Latency {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                max: max_latency,
            });
        }
        for line in self.workers.iter_mut().chain(Some(&mut self.master)) {
            if line.requests > 0 {
                line.p99_us = Some(
                    line.latency
                        .value_at_quantile(0.99)
                        .min(line.max_latency_us),
                );
            }
        }
        self.outcomes = sorted_outcomes(outcomes);
        self.latency_histogram = latency;
        self.max_latency_us = max_latency;

        let shed: i64 = conn.query_row(
            "SELECT coalesce(sum(count), 0) FROM journal_events \
             WHERE kind = 'shed' AND ts_us >= ?1",
            [since],
            |r| r.get(0),
        )?;
        self.shed_rows = u64::try_from(shed).unwrap_or(0);
        Ok(())
    }

    /// The time between the first and the last request, in seconds.
    pub fn span_s(&self) -> f64 {
        match (self.first_us, self.last_us) {
            (Some(f), Some(l)) => (l - f) as f64 / 1e6,
            _ => 0.0,
        }
    }

    /// Requests per second over the span, when there is one.
    pub fn rate_per_s(&self) -> Option<f64> {
        let span = self.span_s();
        (span > 0.0).then(|| self.requests as f64 / span)
    }

    fn share(&self, requests: u64) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            requests as f64 / self.requests as f64
        }
    }

    /// The report as one JSON object (documented in `docs/JOURNAL.md`).
    pub fn to_json(&self) -> Value {
        let outcomes: serde_json::Map<String, Value> = self
            .outcomes
            .iter()
            .map(|(code, n)| (code.clone(), json!(n)))
            .collect();
        let latency = match self.latency {
            Some(l) => json!({ "p50": l.p50, "p90": l.p90, "p99": l.p99, "max": l.max }),
            None => json!({ "p50": null, "p90": null, "p99": null, "max": null }),
        };
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|w| {
                json!({
                    "pid": w.pid,
                    "requests": w.requests,
                    "share": self.share(w.requests),
                    "p99_us": w.p99_us,
                    "started_at": w.started_us.map(iso_utc),
                    "exited_at": w.exited_us.map(iso_utc),
                    "state": w.state(),
                    "reason": w.reason,
                    "exit_status": w.exit_status,
                })
            })
            .collect();
        json!({
            "journal": self.journal.display().to_string(),
            "since": self.since,
            "since_ts": self.since_us.map(iso_utc),
            "first_ts": self.first_us.map(iso_utc),
            "last_ts": self.last_us.map(iso_utc),
            "requests": self.requests,
            "span_s": self.span_s(),
            "rate_per_s": self.rate_per_s(),
            "outcomes": outcomes,
            "latency_us": latency,
            "shed_rows": self.shed_rows,
            "master": {
                "requests": self.master.requests,
                "share": self.share(self.master.requests),
                "p99_us": self.master.p99_us,
            },
            "workers": workers,
        })
    }

    /// The report as aligned text for a terminal. Times are UTC.
    ///
    /// # Errors
    /// A failed write to `out`.
    pub fn write_text(&self, out: &mut dyn Write) -> io::Result<()> {
        self.write_summary(out)?;
        writeln!(out)?;
        self.write_workers(out)
    }

    /// The head of [`Report::write_text`]: the journal, span, totals and
    /// outcomes.
    fn write_summary(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(out, "journal    {}", self.journal.display())?;
        if let (Some(text), Some(us)) = (&self.since, self.since_us) {
            writeln!(out, "since      {text} ({} UTC)", short_utc(us))?;
        }
        match (self.first_us, self.last_us) {
            (Some(f), Some(l)) => writeln!(
                out,
                "span       {} .. {} UTC ({:.1} s)",
                short_utc(f),
                short_utc(l),
                self.span_s()
            )?,
            _ => writeln!(out, "span       -")?,
        }
        match self.rate_per_s() {
            Some(rate) => writeln!(out, "requests   {} ({rate:.1}/s)", self.requests)?,
            None => writeln!(out, "requests   {}", self.requests)?,
        }
        writeln!(out, "shed rows  {}", self.shed_rows)?;
        write_latency_and_outcomes(out, self.latency, &self.outcomes, |n| self.share(n))
    }

    /// The worker table of [`Report::write_text`].
    fn write_workers(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.workers.is_empty() && self.master.requests == 0 {
            return writeln!(out, "no workers in this period");
        }
        let mut table = Table::new(
            [
                "PID", "REQUESTS", "SHARE", "P99", "STARTED", "ENDED", "REASON",
            ],
            [true, true, true, true, false, false, false],
        );
        let lines = self
            .workers
            .iter()
            .chain((self.master.requests > 0).then_some(&self.master));
        for w in lines {
            let reason = match (w.pid, &w.reason, &w.exit_status) {
                (None, _, _) => "answered by the master".to_owned(),
                (_, Some(r), Some(s)) => format!("{r} ({s})"),
                (_, Some(r), None) => r.clone(),
                (_, None, _) if w.exit_unrecorded => {
                    "not recorded (master did not stop cleanly)".to_owned()
                }
                (_, None, _) if w.started_us.is_none() => "-".to_owned(),
                (_, None, _) => "running".to_owned(),
            };
            table.push([
                w.pid.map_or_else(|| "master".to_owned(), |p| p.to_string()),
                w.requests.to_string(),
                percent(self.share(w.requests)),
                w.p99_us.map_or_else(|| "-".to_owned(), human_us),
                w.started_us.map_or_else(|| "-".to_owned(), short_utc),
                w.exited_us.map_or_else(|| "-".to_owned(), short_utc),
                reason,
            ]);
        }
        table.write(out)
    }
}

/// Attributes a request received at `ts` to one of a pid's `workers` rows:
/// the latest one started at or before it.
fn attribute(workers: &[WorkerLine], rows: &[usize], ts: i64) -> usize {
    rows.iter()
        .rev()
        .copied()
        .find(|&i| match workers[i].started_us {
            Some(started) => started <= ts,
            None => true,
        })
        .unwrap_or(rows[0])
}

/// The latency line and the outcome table of a text report (one journal's
/// or the merged one's).
fn write_latency_and_outcomes(
    out: &mut dyn Write,
    latency: Option<Latency>,
    outcomes: &[(String, u64)],
    share: impl Fn(u64) -> f64,
) -> io::Result<()> {
    if let Some(l) = latency {
        writeln!(
            out,
            "latency    p50 {}  p90 {}  p99 {}  max {}",
            human_us(l.p50),
            human_us(l.p90),
            human_us(l.p99),
            human_us(l.max)
        )?;
    }
    if !outcomes.is_empty() {
        writeln!(out)?;
        let mut table = Table::new(["OUTCOME", "COUNT", "SHARE"], [false, true, true]);
        for (code, n) in outcomes {
            table.push([code.clone(), n.to_string(), percent(share(*n))]);
        }
        table.write(out)?;
    }
    Ok(())
}

/// Outcome counts, most frequent first.
fn sorted_outcomes(outcomes: HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut outcomes: Vec<(String, u64)> = outcomes.into_iter().collect();
    outcomes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    outcomes
}

/// A journal open read-only inside one read transaction: everything read
/// through it is one consistent snapshot, even while a master writes.
pub(crate) struct Snapshot {
    conn: Connection,
    path: PathBuf,
    /// Its schema version (1 to [`SCHEMA_VERSION`]).
    version: i32,
}

impl Snapshot {
    /// Opens the journal at `path` and starts its read transaction.
    ///
    /// # Errors
    /// An error naming the journal when it is missing, unreadable, or not
    /// a udp-pool journal.
    pub(crate) fn open(path: &Path) -> anyhow::Result<Snapshot> {
        let context = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("cannot read journal {}: {e}", path.display())
        };
        std::fs::metadata(path).map_err(|e| context(&e))?;
        let (conn, version) = open_read_only(path).map_err(|e| context(&e))?;
        // A deferred transaction: the snapshot is taken at the first read.
        conn.execute_batch("BEGIN").map_err(|e| context(&e))?;
        Ok(Snapshot {
            conn,
            path: path.to_owned(),
            version,
        })
    }

    /// An error reading this journal. Only the first message of `e`: a
    /// SQLite error's chain repeats it as "Error code 26: ...".
    fn error(&self, e: &dyn std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("cannot read journal {}: {e}", self.path.display())
    }
}

fn open_read_only(path: &Path) -> anyhow::Result<(Connection, i32)> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // The first read of the header: a non-SQLite file fails here.
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    // Version 1 differs only in how `request_id` is stored, which the
    // report does not read; version 2 has no HLC stamps (the report uses
    // wall times instead). Reading must not migrate either.
    if !(1..=SCHEMA_VERSION).contains(&version) {
        bail!("not a udp-pool journal (schema version {version}, expected 1 to {SCHEMA_VERSION})");
    }
    Ok((conn, version))
}

/// A column-aligned table; the last column is never padded.
struct Table<const N: usize> {
    rows: Vec<[String; N]>,
    right: [bool; N],
}

impl<const N: usize> Table<N> {
    fn new(header: [&str; N], right: [bool; N]) -> Table<N> {
        Table {
            rows: vec![header.map(str::to_owned)],
            right,
        }
    }

    fn push(&mut self, row: [String; N]) {
        self.rows.push(row);
    }

    fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths = [0; N];
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - cell.chars().count());
                if self.right[i] {
                    line.push_str(&pad);
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if i + 1 < N {
                        line.push_str(&pad);
                    }
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// `850 µs`, `12.3 ms`, `1.50 s`.
fn human_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.1} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

/// The UTC calendar date and time of unix microseconds:
/// (year, month, day, hour, minute, second, microsecond).
fn utc_parts(us: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        micros,
    )
}

/// `2024-05-01T10:00:00.123456Z`, as the journal's generated `ts` columns.
pub fn iso_utc(us: i64) -> String {
    let (y, mo, d, h, mi, s, micros) = utc_parts(us);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{micros:06}Z")
}

/// `2024-05-01 10:00:00.123`, for the terminal.
fn short_utc(us: i64) -> String {
    let (y, mo, d, h, mi, s, micros) = utc_parts(us);
    format!(
        "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{:03}",
        micros / 1000
    )
}

#[cfg(test)]
mod tests;
