//! `master report` over several journals, one per server: their figures
//! side by side and merged, the cluster's views and timeline, and the
//! requests in causal order.
//!
//! Every row of a schema 3 journal carries an HLC stamp (`crate::clock`).
//! Within one journal the stamps only grow; across journals, a stamp that
//! travelled from one server to another (a request's causal link, a
//! cluster datagram) made everything the receiver stamped afterwards sort
//! after it. So ordering the union of the rows by stamp (ties broken by
//! the order of `--journal`, then by row) respects happens-before along
//! those links, whatever the servers' wall clocks say. Rows without a stamp
//! (journals older than schema 3, and the rows written before a journal was
//! migrated) are placed by their wall time, converted to a stamp.
//!
//! Given one journal, the report is [`Report`]'s, unchanged, followed by
//! the sections this module adds when they have anything to show.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use rusqlite::types::Value as SqlValue;

use super::*;
use crate::clock::unix_us_from_ntp64;

/// The most rows `--rows` and `--timeline` list.
pub const MAX_LISTED: u32 = 100_000;

/// How much of the merged journals is listed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests (`--rows`).
    pub rows: usize,
    /// Cluster events (`--timeline`).
    pub timeline: usize,
}

/// The SQL of a request's HLC key in a journal of schema `version`: its
/// stamp, or for a row without one its wall time as an NTP64 (as
/// [`crate::clock::ntp64_from_unix_us`] computes it).
pub(super) fn hlc_key_sql(version: i32) -> String {
    let from_wall =
        "(max(ts_us, 0) / 1000000 << 32) + ((max(ts_us, 0) % 1000000 << 32) + 999999) / 1000000";
    if version >= 3 {
        format!("coalesce(hlc, {from_wall})")
    } else {
        format!("({from_wall})")
    }
}

/// The view a server was in at HLC `key`: that of its last view mark at or
/// before it (`marks` sorted).
pub(super) fn view_at(marks: &[ViewMark], key: u64) -> Option<u64> {
    let after = marks.partition_point(|m| m.hlc <= key);
    after.checked_sub(1).map(|i| marks[i].view)
}

/// An HLC stamp for people: its physical time, to the microsecond, UTC.
fn hlc_text(hlc: u64) -> String {
    let us = unix_us_from_ntp64(uhlc::NTP64(hlc));
    let (y, mo, d, h, mi, s, micros) = utc_parts(us);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{micros:06}")
}

/// One journal, as the merge sees it.
#[derive(Debug)]
pub struct Source {
    pub path: PathBuf,
    pub version: i32,
    /// `meta`'s `server`: the address its master served on.
    pub server: Option<String>,
    /// `meta`'s `hlc_id`: its (latest) master's HLC id.
    pub hlc_id: Option<String>,
    /// How the report names it: the server, or the journal when there is
    /// none or two journals name the same server.
    pub label: String,
    /// Its own report: per-server figures.
    pub report: Report,
    /// Where it installed each view.
    pub marks: Vec<ViewMark>,
}

/// One `cluster_events` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterLine {
    pub hlc: u64,
    pub ts_us: i64,
    /// Index of its journal in [`Merged::sources`].
    pub source: usize,
    pub id: i64,
    pub node: String,
    pub kind: String,
    pub term: Option<i64>,
    pub view: Option<i64>,
    pub subject: Option<String>,
    pub detail: Option<String>,
}

/// One `requests` row, for the causal listing.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLine {
    /// The HLC key: its stamp, or its wall time as one.
    pub hlc: u64,
    /// Whether `hlc` is a real stamp.
    pub stamped: bool,
    pub ts_us: i64,
    pub source: usize,
    pub id: i64,
    pub client: String,
    pub request_id: SqlValue,
    pub op: String,
    pub worker_pid: Option<u32>,
    pub outcome: String,
    pub latency_us: i64,
}

/// Requests in one view, over every server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewLine {
    pub view: u64,
    /// The earliest stamp at which a server installed it.
    pub first_hlc: u64,
    /// The servers that installed it (indices into [`Merged::sources`]).
    pub sources: BTreeSet<usize>,
    pub requests: u64,
    pub ok: u64,
}

/// "At most one coordinator per term" over every `coordinator` event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CoordinatorCheck {
    /// Terms with a coordinator event.
    pub terms: usize,
    /// Terms with more than one coordinator, and who.
    pub violations: Vec<(i64, Vec<String>)>,
}

/// Several journals read together.
#[derive(Debug)]
pub struct Merged {
    pub sources: Vec<Source>,
    pub since: Option<String>,
    pub since_us: Option<i64>,
    /// Every cluster event in the period, in causal order.
    pub cluster: Vec<ClusterLine>,
    pub coordinators: CoordinatorCheck,
    pub views: Vec<ViewLine>,
    /// The last `--rows` requests, in causal order.
    pub rows: Vec<RequestLine>,
    limits: Limits,
}

impl Merged {
    /// Reads every journal of `paths` (each in its own snapshot).
    ///
    /// # Errors
    /// A journal given twice, or one that cannot be read (see
    /// [`Report::collect`]).
    pub fn collect(
        paths: &[PathBuf],
        since_us: Option<i64>,
        limits: Limits,
    ) -> anyhow::Result<Merged> {
        let mut seen = BTreeSet::new();
        for path in paths {
            let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            if !seen.insert(key) {
                bail!("journal {} is given twice", path.display());
            }
        }
        let mut merged = Merged {
            sources: Vec::new(),
            since: None,
            since_us,
            cluster: Vec::new(),
            coordinators: CoordinatorCheck::default(),
            views: Vec::new(),
            rows: Vec::new(),
            limits,
        };
        let mut all_cluster = Vec::new();
        for (index, path) in paths.iter().enumerate() {
            let snapshot = Snapshot::open(path)?;
            let read = |snapshot: &Snapshot, all_cluster: &mut Vec<ClusterLine>| {
                let (server, hlc_id) = read_meta(snapshot)?;
                let cluster = read_cluster(snapshot, index)?;
                let mut marks: Vec<ViewMark> = cluster
                    .iter()
                    .filter(|c| c.kind == "view")
                    .filter_map(|c| {
                        let view = u64::try_from(c.view?).ok()?;
                        Some(ViewMark { hlc: c.hlc, view })
                    })
                    .collect();
                marks.sort();
                all_cluster.extend(cluster);
                let rows = read_rows(snapshot, index, since_us, limits.rows)?;
                anyhow::Ok((server, hlc_id, marks, rows))
            };
            let (server, hlc_id, marks, rows) =
                read(&snapshot, &mut all_cluster).map_err(|e| snapshot.error(&format!("{e:#}")))?;
            let report = Report::collect_with(&snapshot, since_us, &marks)?;
            merged.rows.extend(rows);
            merged.sources.push(Source {
                path: path.clone(),
                version: snapshot.version,
                label: String::new(),
                server,
                hlc_id,
                report,
                marks,
            });
        }
        merged.label_sources();
        merged.coordinators = check_coordinators(&all_cluster);
        if let Some(since) = since_us {
            all_cluster.retain(|c| c.ts_us >= since);
        }
        all_cluster.sort_by_key(|c| (c.hlc, c.source, c.id));
        merged.cluster = all_cluster;
        merged.views = merged.view_lines();
        merged.rows.sort_by_key(|r| (r.hlc, r.source, r.id));
        let extra = merged.rows.len().saturating_sub(limits.rows);
        merged.rows.drain(..extra);
        Ok(merged)
    }

    /// Records the `--since` text.
    pub fn set_since(&mut self, since: Option<&str>) {
        self.since = since.map(str::to_owned);
        for s in &mut self.sources {
            s.report.since = self.since.clone();
        }
    }

    /// Names each source by its server, or by its journal when it has none
    /// or shares it with another.
    fn label_sources(&mut self) {
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for s in &self.sources {
            if let Some(server) = &s.server {
                *count.entry(server.clone()).or_default() += 1;
            }
        }
        for s in &mut self.sources {
            s.label = match &s.server {
                Some(server) if count[server] == 1 => server.clone(),
                Some(server) => format!("{server} ({})", s.path.display()),
                None => s.path.display().to_string(),
            };
        }
    }

    fn view_lines(&self) -> Vec<ViewLine> {
        let mut views: BTreeMap<u64, ViewLine> = BTreeMap::new();
        for (index, s) in self.sources.iter().enumerate() {
            for m in &s.marks {
                let line = views.entry(m.view).or_insert_with(|| ViewLine {
                    view: m.view,
                    first_hlc: m.hlc,
                    sources: BTreeSet::new(),
                    requests: 0,
                    ok: 0,
                });
                line.first_hlc = line.first_hlc.min(m.hlc);
                line.sources.insert(index);
            }
            for (view, count) in &s.report.views {
                if let Some(line) = views.get_mut(view) {
                    line.requests += count.requests;
                    line.ok += count.ok;
                }
            }
        }
        views.into_values().collect()
    }

    /// Requests over every journal.
    fn requests(&self) -> u64 {
        self.sources.iter().map(|s| s.report.requests).sum()
    }

    /// Outcome counts over every journal, most frequent first.
    fn outcomes(&self) -> Vec<(String, u64)> {
        let mut all: HashMap<String, u64> = HashMap::new();
        for s in &self.sources {
            for (code, n) in &s.report.outcomes {
                *all.entry(code.clone()).or_default() += n;
            }
        }
        sorted_outcomes(all)
    }

    /// Latency over every journal.
    fn latency(&self) -> Option<Latency> {
        let mut all = new_histogram(3);
        let mut max = 0;
        for s in &self.sources {
            let _ = all.add(&s.report.latency_histogram);
            max = max.max(s.report.max_latency_us);
        }
        (self.requests() > 0).then(|| {
            let q = |q: f64| all.value_at_quantile(q).min(max);
            Latency {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                max,
            }
        })
    }

    /// The earliest and latest receipt, by each server's wall clock.
    fn span_us(&self) -> (Option<i64>, Option<i64>) {
        let first = self.sources.iter().filter_map(|s| s.report.first_us).min();
        let last = self.sources.iter().filter_map(|s| s.report.last_us).max();
        (first, last)
    }

    fn share(&self, n: u64) -> f64 {
        match self.requests() {
            0 => 0.0,
            all => n as f64 / all as f64,
        }
    }

    /// The cluster events the timeline shows: the last `--timeline`.
    fn timeline(&self) -> &[ClusterLine] {
        let skip = self.cluster.len().saturating_sub(self.limits.timeline);
        &self.cluster[skip..]
    }

    fn label(&self, source: usize) -> &str {
        &self.sources[source].label
    }

    /// The report as JSON: one journal's [`Report::to_json`] with these
    /// sections added when they have anything; several journals' merged
    /// (documented in `docs/JOURNAL.md`).
    pub fn to_json(&self) -> Value {
        let mut json = if let [only] = &self.sources[..] {
            only.report.to_json()
        } else {
            self.merged_json()
        };
        let map = json.as_object_mut().expect("reports are JSON objects");
        if !self.views.is_empty() {
            let views: Vec<Value> = self
                .views
                .iter()
                .map(|v| {
                    json!({
                        "view": v.view,
                        "first_hlc": v.first_hlc.to_string(),
                        "first_hlc_at": iso_utc(unix_us_from_ntp64(uhlc::NTP64(v.first_hlc))),
                        "servers": v.sources.iter().map(|&i| self.label(i)).collect::<Vec<_>>(),
                        "requests": v.requests,
                        "ok": v.ok,
                    })
                })
                .collect();
            map.insert("views".to_owned(), Value::Array(views));
        }
        if !self.cluster.is_empty() {
            let timeline: Vec<Value> = self
                .timeline()
                .iter()
                .map(|c| {
                    json!({
                        "hlc": c.hlc.to_string(),
                        "hlc_at": iso_utc(unix_us_from_ntp64(uhlc::NTP64(c.hlc))),
                        "ts": iso_utc(c.ts_us),
                        "server": self.label(c.source),
                        "node": c.node,
                        "kind": c.kind,
                        "term": c.term,
                        "view": c.view,
                        "subject": c.subject,
                        "detail": c.detail,
                    })
                })
                .collect();
            let violations: Vec<Value> = self
                .coordinators
                .violations
                .iter()
                .map(|(term, who)| json!({ "term": term, "coordinators": who }))
                .collect();
            map.insert(
                "cluster".to_owned(),
                json!({
                    "events": self.cluster.len(),
                    "timeline": timeline,
                    "one_coordinator_per_term": {
                        "ok": violations.is_empty(),
                        "terms": self.coordinators.terms,
                        "violations": violations,
                    },
                }),
            );
        }
        if self.limits.rows > 0 {
            let rows: Vec<Value> = self
                .rows
                .iter()
                .map(|r| {
                    json!({
                        "hlc": r.stamped.then(|| r.hlc.to_string()),
                        "hlc_at": r.stamped.then(|| iso_utc(unix_us_from_ntp64(uhlc::NTP64(r.hlc)))),
                        "ts": iso_utc(r.ts_us),
                        "server": self.label(r.source),
                        "client": r.client,
                        "request_id": sql_json(&r.request_id),
                        "op": r.op,
                        "worker_pid": r.worker_pid,
                        "outcome": r.outcome,
                        "latency_us": r.latency_us,
                    })
                })
                .collect();
            map.insert("rows".to_owned(), Value::Array(rows));
        }
        json
    }

    fn merged_json(&self) -> Value {
        let outcomes: serde_json::Map<String, Value> = self
            .outcomes()
            .into_iter()
            .map(|(code, n)| (code, json!(n)))
            .collect();
        let latency = match self.latency() {
            Some(l) => json!({ "p50": l.p50, "p90": l.p90, "p99": l.p99, "max": l.max }),
            None => json!({ "p50": null, "p90": null, "p99": null, "max": null }),
        };
        let servers: Vec<Value> = self
            .sources
            .iter()
            .map(|s| {
                let mut v = s.report.to_json();
                let map = v.as_object_mut().expect("reports are JSON objects");
                map.insert("server".to_owned(), json!(s.label));
                map.insert("address".to_owned(), json!(s.server));
                map.insert("hlc_id".to_owned(), json!(s.hlc_id));
                map.insert("schema_version".to_owned(), json!(s.version));
                map.insert(
                    "share_of_all".to_owned(),
                    json!(self.share(s.report.requests)),
                );
                v
            })
            .collect();
        let (first, last) = self.span_us();
        json!({
            "journals": self.sources.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>(),
            "since": self.since,
            "since_ts": self.since_us.map(iso_utc),
            "first_ts": first.map(iso_utc),
            "last_ts": last.map(iso_utc),
            "requests": self.requests(),
            "outcomes": outcomes,
            "latency_us": latency,
            "shed_rows": self.sources.iter().map(|s| s.report.shed_rows).sum::<u64>(),
            "servers": servers,
        })
    }

    /// The report as aligned text: one journal's [`Report::write_text`], or
    /// several journals' merged totals and a table per server; then the
    /// views, the cluster timeline and the listed requests, when there are.
    ///
    /// # Errors
    /// A failed write to `out`.
    pub fn write_text(&self, out: &mut dyn Write) -> io::Result<()> {
        if let [only] = &self.sources[..] {
            only.report.write_text(out)?;
        } else {
            self.write_merged(out)?;
        }
        if !self.views.is_empty() {
            writeln!(out)?;
            let mut table = Table::new(
                ["VIEW", "FIRST INSTALLED (HLC)", "SERVERS", "REQUESTS", "OK"],
                [true, false, false, true, true],
            );
            for v in &self.views {
                let servers: Vec<&str> = v.sources.iter().map(|&i| self.label(i)).collect();
                table.push([
                    v.view.to_string(),
                    hlc_text(v.first_hlc),
                    servers.join(","),
                    v.requests.to_string(),
                    v.ok.to_string(),
                ]);
            }
            table.write(out)?;
        }
        if !self.cluster.is_empty() {
            let shown = self.timeline();
            writeln!(out)?;
            writeln!(
                out,
                "cluster timeline: the last {} of {} events, in causal (HLC) order",
                shown.len(),
                self.cluster.len()
            )?;
            let mut table = Table::new(
                [
                    "HLC",
                    "WALL CLOCK",
                    "SERVER",
                    "NODE",
                    "KIND",
                    "TERM",
                    "VIEW",
                    "SUBJECT",
                    "DETAIL",
                ],
                [false, false, false, false, false, true, true, false, false],
            );
            let dash = || "-".to_owned();
            for c in shown {
                table.push([
                    hlc_text(c.hlc),
                    short_utc(c.ts_us),
                    self.label(c.source).to_owned(),
                    c.node.clone(),
                    c.kind.clone(),
                    c.term.map_or_else(dash, |t| t.to_string()),
                    c.view.map_or_else(dash, |v| v.to_string()),
                    c.subject.clone().unwrap_or_else(dash),
                    c.detail.clone().unwrap_or_else(dash),
                ]);
            }
            table.write(out)?;
            let check = &self.coordinators;
            if check.violations.is_empty() {
                writeln!(
                    out,
                    "at most one coordinator per term: holds ({} terms)",
                    check.terms
                )?;
            } else {
                let terms: Vec<String> = check
                    .violations
                    .iter()
                    .map(|(term, who)| format!("term {term}: {}", who.join(", ")))
                    .collect();
                writeln!(
                    out,
                    "at most one coordinator per term: VIOLATED in {} of {} terms: {}",
                    check.violations.len(),
                    check.terms,
                    terms.join("; ")
                )?;
            }
        }
        if self.limits.rows > 0 {
            writeln!(out)?;
            writeln!(
                out,
                "the last {} requests, in causal (HLC) order",
                self.rows.len()
            )?;
            let mut table = Table::new(
                [
                    "HLC",
                    "WALL CLOCK",
                    "SERVER",
                    "CLIENT",
                    "ID",
                    "OP",
                    "PID",
                    "OUTCOME",
                    "LATENCY",
                ],
                [false, false, false, false, false, false, true, false, true],
            );
            for r in &self.rows {
                let hlc = if r.stamped {
                    hlc_text(r.hlc)
                } else {
                    "- (no stamp)".to_owned()
                };
                table.push([
                    hlc,
                    short_utc(r.ts_us),
                    self.label(r.source).to_owned(),
                    r.client.clone(),
                    sql_text(&r.request_id),
                    r.op.clone(),
                    r.worker_pid
                        .map_or_else(|| "master".to_owned(), |p| p.to_string()),
                    r.outcome.clone(),
                    human_us(u64::try_from(r.latency_us).unwrap_or(0)),
                ]);
            }
            table.write(out)?;
        }
        Ok(())
    }

    fn write_merged(&self, out: &mut dyn Write) -> io::Result<()> {
        let paths: Vec<String> = self
            .sources
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        writeln!(out, "journals   {}", paths.join(", "))?;
        if let (Some(text), Some(us)) = (&self.since, self.since_us) {
            writeln!(out, "since      {text} ({} UTC)", short_utc(us))?;
        }
        match self.span_us() {
            (Some(f), Some(l)) => writeln!(
                out,
                "span       {} .. {} UTC (by each server's wall clock)",
                short_utc(f),
                short_utc(l)
            )?,
            _ => writeln!(out, "span       -")?,
        }
        writeln!(out, "requests   {}", self.requests())?;
        let shed: u64 = self.sources.iter().map(|s| s.report.shed_rows).sum();
        writeln!(out, "shed rows  {shed}")?;
        write_latency_and_outcomes(out, self.latency(), &self.outcomes(), |n| self.share(n))?;
        writeln!(out)?;
        let mut table = Table::new(
            [
                "SERVER", "HLC ID", "REQUESTS", "SHARE", "OK", "NOT OK", "P99", "WORKERS", "DIED",
                "JOURNAL",
            ],
            [
                false, false, true, true, true, true, true, true, true, false,
            ],
        );
        for s in &self.sources {
            let r = &s.report;
            let ok = r
                .outcomes
                .iter()
                .find(|(code, _)| code == "ok")
                .map_or(0, |(_, n)| *n);
            let died = r
                .workers
                .iter()
                .filter(|w| {
                    matches!(
                        w.reason.as_deref(),
                        Some("crash" | "timeout_kill" | "boot_failure")
                    )
                })
                .count();
            let p99 = r
                .latency
                .map_or_else(|| "-".to_owned(), |l| human_us(l.p99));
            table.push([
                s.label.clone(),
                s.hlc_id.clone().unwrap_or_else(|| "-".to_owned()),
                r.requests.to_string(),
                percent(self.share(r.requests)),
                ok.to_string(),
                (r.requests - ok).to_string(),
                p99,
                r.workers.len().to_string(),
                died.to_string(),
                s.path.display().to_string(),
            ]);
        }
        table.write(out)?;
        for s in &self.sources {
            writeln!(out)?;
            writeln!(out, "workers of {}", s.label)?;
            s.report.write_workers(out)?;
        }
        Ok(())
    }
}

/// `meta`'s server and HLC id (schema 3; none before).
fn read_meta(snapshot: &Snapshot) -> rusqlite::Result<(Option<String>, Option<String>)> {
    if snapshot.version < 3 {
        return Ok((None, None));
    }
    let get = |key: &str| -> rusqlite::Result<Option<String>> {
        let mut stmt = snapshot
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
        let mut rows = stmt.query([key])?;
        match rows.next()? {
            Some(r) => r.get(0),
            None => Ok(None),
        }
    };
    Ok((get("server")?, get("hlc_id")?))
}

/// Every cluster event of a journal (schema 3; none before).
fn read_cluster(snapshot: &Snapshot, source: usize) -> rusqlite::Result<Vec<ClusterLine>> {
    if snapshot.version < 3 {
        return Ok(Vec::new());
    }
    let mut stmt = snapshot.conn.prepare(
        "SELECT id, hlc, ts_us, node, kind, term, view, subject, detail FROM cluster_events",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ClusterLine {
            id: r.get(0)?,
            hlc: r.get::<_, i64>(1)? as u64,
            ts_us: r.get(2)?,
            source,
            node: r.get(3)?,
            kind: r.get(4)?,
            term: r.get(5)?,
            view: r.get(6)?,
            subject: r.get(7)?,
            detail: r.get(8)?,
        })
    })?;
    rows.collect()
}

/// The last `limit` requests of a journal by HLC key (as unsigned numbers:
/// a stamp from 2038 on is a negative INTEGER), then id.
fn read_rows(
    snapshot: &Snapshot,
    source: usize,
    since_us: Option<i64>,
    limit: usize,
) -> anyhow::Result<Vec<RequestLine>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let since = since_us.unwrap_or(i64::MIN);
    let version = snapshot.version;
    // Schema 6 on, the batches are searched apart (below): the view would
    // unpack every column of every request to sort them.
    let tables = if version >= 6 {
        Tables::Rows
    } else {
        Tables::Both
    };
    let (scan, floor) = requests_scan_sql(&snapshot.conn, version, Some(since), tables)?;
    let mut lines = request_lines(snapshot, source, &scan, since, limit)?;
    if version >= 6 {
        // The newest `limit` (key, id) of the batches, smallest on top:
        // keys from the JSON decoded here, not every column through SQL.
        let mut newest: BinaryHeap<Reverse<(u64, i64)>> = BinaryHeap::new();
        scan_batches(&snapshot.conn, floor, Some(since), |id, _, key, _| {
            newest.push(Reverse((key, id)));
            if newest.len() > limit {
                newest.pop();
            }
        })?;
        // Then their columns, in one query from the oldest of them on:
        // usually a few batches at the end, at worst (keys far out of id
        // order) what the view would have read.
        if let Some(oldest) = newest.iter().map(|Reverse((_, id))| *id).min() {
            let from = format!(
                "({}) WHERE ts_us >= ?1",
                requests_source_sql(Some(oldest - 1), Tables::Batches)
            );
            lines.extend(request_lines(snapshot, source, &from, since, limit)?);
        }
        lines.sort_by_key(|l| Reverse((l.hlc, l.id)));
        lines.truncate(limit);
    }
    Ok(lines)
}

/// The rows of `scan` (what follows `FROM`, with `?1` the earliest time)
/// as request lines, the last `limit` by HLC key, then id.
fn request_lines(
    snapshot: &Snapshot,
    source: usize,
    scan: &str,
    since: i64,
    limit: usize,
) -> rusqlite::Result<Vec<RequestLine>> {
    let stamp = if snapshot.version >= 3 { "hlc" } else { "NULL" };
    let sql = format!(
        "SELECT {key} AS k, {stamp}, id, ts_us, client, request_id, op, worker_pid, outcome, \
         latency_us FROM {scan} \
         ORDER BY k < 0 DESC, k DESC, id DESC LIMIT ?2",
        key = hlc_key_sql(snapshot.version)
    );
    let mut stmt = snapshot.conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params![since, limit as i64], |r| {
        Ok(RequestLine {
            hlc: r.get::<_, i64>(0)? as u64,
            stamped: r.get::<_, Option<i64>>(1)?.is_some(),
            id: r.get(2)?,
            ts_us: r.get(3)?,
            source,
            client: r.get(4)?,
            request_id: r.get(5)?,
            op: r.get(6)?,
            worker_pid: r.get(7)?,
            outcome: r.get(8)?,
            latency_us: r.get(9)?,
        })
    })?;
    rows.collect()
}

/// Terms with a `coordinator` event, and those with more than one
/// coordinator (over every event, whatever `--since`).
fn check_coordinators(events: &[ClusterLine]) -> CoordinatorCheck {
    let mut by_term: BTreeMap<i64, BTreeSet<&str>> = BTreeMap::new();
    for e in events {
        if let (true, Some(term), Some(subject)) = (e.kind == "coordinator", e.term, &e.subject) {
            by_term.entry(term).or_default().insert(subject);
        }
    }
    CoordinatorCheck {
        terms: by_term.len(),
        violations: by_term
            .into_iter()
            .filter(|(_, who)| who.len() > 1)
            .map(|(term, who)| (term, who.into_iter().map(str::to_owned).collect()))
            .collect(),
    }
}

/// A request id as JSON: the value SQLite holds.
fn sql_json(v: &SqlValue) -> Value {
    match v {
        SqlValue::Null | SqlValue::Blob(_) => Value::Null,
        SqlValue::Integer(n) => json!(n),
        SqlValue::Real(x) => json!(x),
        SqlValue::Text(t) => json!(t),
    }
}

/// A request id for the terminal.
fn sql_text(v: &SqlValue) -> String {
    match v {
        SqlValue::Null | SqlValue::Blob(_) => "-".to_owned(),
        SqlValue::Integer(n) => n.to_string(),
        SqlValue::Real(x) => x.to_string(),
        SqlValue::Text(t) => t.clone(),
    }
}
