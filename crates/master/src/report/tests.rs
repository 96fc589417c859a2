//! Unit tests of `master report` on journals written by the real writer.
use super::*;
use crate::exit::ExitReason;
use crate::journal::{Journal, RequestId, RequestRow};
use protocol::{ErrorCode, Op, Outcome};

fn row(ts: i64, pid: Option<u32>, outcome: Outcome, latency_us: u64) -> RequestRow {
    RequestRow {
        ts_unix_us: ts,
        client: "127.0.0.1:4000".parse().unwrap(),
        request_id: Some(RequestId::new(b"1")),
        op: Op::Square,
        worker_pid: pid,
        outcome,
        latency_us,
        hlc: crate::clock::ntp64_from_unix_us(ts).0,
    }
}

/// A journal with 100 old requests (two hours ago) and 300 recent ones
/// across workers 11, 12 and the master; worker 13 served nothing.
fn sample(dir: &Path) -> PathBuf {
    let path = dir.join("j.db");
    let now = now_unix_us();
    let old = now - 2 * 3600 * 1_000_000;
    let journal = Journal::open(&path, 0).unwrap();
    journal.worker_started(11, old - 1);
    journal.worker_started(12, old - 1);
    journal.worker_started(13, now - 1000);
    let mut rows = Vec::new();
    for i in 0..100 {
        rows.push(row(old + i, Some(11), Outcome::Ok, 100));
    }
    for i in 0..300i64 {
        let (pid, outcome) = match i % 3 {
            0 => (Some(11), Outcome::Ok),
            1 => (Some(12), Outcome::Ok),
            _ => (None, Outcome::Error(ErrorCode::Busy)),
        };
        rows.push(row(now - 300 + i, pid, outcome, 1 + i as u64));
    }
    journal.submit(&mut rows);
    journal.worker_exited(12, now, None, Some(9), 100, ExitReason::Crash);
    journal.close();
    path
}

#[test]
fn json_totals_match_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path());
    let json = Report::collect(&path, None).unwrap().to_json();
    assert_eq!(json["requests"], 400);
    assert_eq!(json["outcomes"]["ok"], 300);
    assert_eq!(json["outcomes"]["busy"], 100);
    assert_eq!(json["shed_rows"], 0);
    assert_eq!(json["latency_us"]["max"], 300);
    assert_eq!(json["master"]["requests"], 100);
    let workers = json["workers"].as_array().unwrap();
    let pids: Vec<u64> = workers.iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids, [11, 12, 13]);
    let served: Vec<u64> = workers
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(served, [200, 100, 0]);
    assert_eq!(workers[0]["share"], 0.5);
    assert_eq!(workers[1]["reason"], "crash");
    assert_eq!(workers[1]["exit_status"], "signal 9 (SIGKILL)");
    assert_eq!(workers[1]["state"], "exited");
    assert_eq!(
        workers[2]["state"], "unknown",
        "its master closed the journal"
    );
    assert!(json["span_s"].as_f64().unwrap() > 7000.0);
    assert!(json["rate_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_version_1_journal_is_read_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path());
    let version = |conn: &Connection| -> i32 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    };
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA user_version = 1").unwrap();
    let report = Report::collect(&path, None).unwrap();
    assert_eq!(report.requests, 400);
    assert_eq!(version(&conn), 1, "reading does not migrate");
    let newer = SCHEMA_VERSION + 1;
    conn.execute_batch(&format!("PRAGMA user_version = {newer}"))
        .unwrap();
    let msg = format!("{:#}", Report::collect(&path, None).unwrap_err());
    assert!(msg.contains(&format!("schema version {newer}")), "{msg}");
}

#[test]
fn since_limits_the_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path());
    let since = now_unix_us() - 3_600_000_000;
    let report = Report::collect(&path, Some(since)).unwrap();
    assert_eq!(report.requests, 300);
    assert_eq!(
        report.outcomes,
        [("ok".to_owned(), 200), ("busy".to_owned(), 100)]
    );
    let served: Vec<(Option<u32>, u64)> =
        report.workers.iter().map(|w| (w.pid, w.requests)).collect();
    assert_eq!(served, [(Some(11), 100), (Some(12), 100), (Some(13), 0)]);
    let l = report.latency.unwrap();
    assert_eq!(l.max, 300);
    assert!((148..=152).contains(&l.p50), "{l:?}");
    assert!((295..=300).contains(&l.p99), "{l:?}");
}

#[test]
fn text_names_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path());
    let mut out = Vec::new();
    Report::collect(&path, None)
        .unwrap()
        .write_text(&mut out)
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    for needle in [
        "requests   400",
        "busy",
        "11",
        "12",
        "13",
        "crash (signal 9 (SIGKILL))",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in\n{text}");
    }
    assert!(text.lines().any(|l| l.starts_with("master")), "{text}");
}

#[test]
fn large_latencies_are_not_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let journal = Journal::open(&path, 0).unwrap();
    let mut rows: Vec<RequestRow> = [1_000, 2_000_000, 3_000_000, 60_000_000]
        .into_iter()
        .map(|l| row(1_000, Some(9), Outcome::Ok, l))
        .collect();
    journal.submit(&mut rows);
    journal.close();
    let report = Report::collect(&path, None).unwrap();
    let l = report.latency.unwrap();
    assert!((1_998_000..=2_002_000).contains(&l.p50), "{l:?}");
    assert!((59_940_000..=60_000_000).contains(&l.p99), "{l:?}");
    assert_eq!(l.max, 60_000_000);
    let p99 = report.workers[0].p99_us.unwrap();
    assert!((59_400_000..=60_600_000).contains(&p99), "{p99}");
}

#[test]
fn a_reused_pid_is_two_workers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let journal = Journal::open(&path, 0).unwrap();
    journal.worker_started(5, 1_000);
    journal.worker_exited(5, 2_000, Some(0), None, 1, ExitReason::Retired);
    journal.worker_started(5, 3_000);
    let mut rows = vec![
        row(1_500, Some(5), Outcome::Ok, 1),
        row(3_500, Some(5), Outcome::Ok, 1),
        row(3_600, Some(5), Outcome::Ok, 1),
    ];
    journal.submit(&mut rows);
    journal.close();
    let report = Report::collect(&path, None).unwrap();
    let served: Vec<u64> = report.workers.iter().map(|w| w.requests).collect();
    assert_eq!(served, [1, 2]);
}

#[test]
fn missing_and_foreign_files_name_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let msg = format!("{:#}", Report::collect(&missing, None).unwrap_err());
    assert!(
        msg.starts_with(&format!("cannot read journal {}: ", missing.display())),
        "{msg}"
    );

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![7u8; 4096]).unwrap();
    let msg = format!("{:#}", Report::collect(&garbage, None).unwrap_err());
    assert!(
        msg.contains("garbage.db") && msg.contains("not a database"),
        "{msg}"
    );

    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t(x)")
        .unwrap();
    let msg = format!("{:#}", Report::collect(&other, None).unwrap_err());
    assert!(
        msg.contains("other.db") && msg.contains("not a udp-pool journal"),
        "{msg}"
    );
}

#[test]
fn since_durations_parse() {
    assert_eq!(parse_since("30s").unwrap(), Duration::from_secs(30));
    assert_eq!(parse_since("10m").unwrap(), Duration::from_secs(600));
    assert_eq!(parse_since("2h").unwrap(), Duration::from_secs(7200));
    assert_eq!(parse_since("1d").unwrap(), Duration::from_secs(86_400));
    assert_eq!(parse_since("1h30m").unwrap(), Duration::from_secs(5400));
    // The longest --since: u64::MAX seconds, as days and seconds.
    let max = parse_since("213503982334601d25215s").unwrap();
    assert_eq!(max, Duration::from_secs(u64::MAX));
    assert_eq!(window_start_us(0, max), -i64::MAX);
    assert_eq!(window_start_us(i64::MIN + 1, max), i64::MIN);
    for bad in [
        "",
        "10",
        "m",
        "10x",
        "-5m",
        "1.5h",
        "99999999999999999999d",
        "213503982334602d",
        "213503982334601d25216s",
    ] {
        let msg = parse_since(bad).unwrap_err().to_string();
        assert!(msg.starts_with("invalid --since"), "{bad:?}: {msg}");
    }
}

#[test]
fn utc_formatting_matches_sqlite() {
    assert_eq!(
        iso_utc(1_714_557_600_123_456),
        "2024-05-01T10:00:00.123456Z"
    );
    assert_eq!(iso_utc(0), "1970-01-01T00:00:00.000000Z");
    assert_eq!(iso_utc(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
    assert_eq!(short_utc(1_714_557_600_123_456), "2024-05-01 10:00:00.123");
}

/// `cargo test -p master --release --lib report::tests::million_rows -- --ignored --nocapture`
#[test]
#[ignore]
fn million_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let now = now_unix_us();
    let journal = Journal::open(&path, 0).unwrap();
    for pid in 1..=8 {
        journal.worker_started(pid, now - 2_000_000_000);
    }
    let mut batch = Vec::new();
    for i in 0..1_000_000i64 {
        let pid = (i % 9 != 0).then_some(1 + (i % 8) as u32);
        batch.push(row(
            now - 1_000_000_000 + i * 1000,
            pid,
            Outcome::Ok,
            (i % 5000) as u64,
        ));
        if batch.len() == 4096 {
            while journal.written_rows() + 32_768 < i as u64 {
                std::thread::sleep(Duration::from_millis(1));
            }
            journal.submit(&mut batch);
        }
    }
    journal.submit(&mut batch);
    journal.close();
    let start = std::time::Instant::now();
    Journal::open(&path, 0).unwrap().close();
    eprintln!(
        "reopening (quick_check) took {:.3} s",
        start.elapsed().as_secs_f64()
    );
    for since in [None, Some(now - 500_000_000), Some(now - 10_000_000)] {
        let start = std::time::Instant::now();
        let report = Report::collect(&path, since).unwrap();
        eprintln!(
            "since {since:?}: {} requests in {:.3} s",
            report.requests,
            start.elapsed().as_secs_f64()
        );
    }
}

// ----- several journals, merged in causal order ----------------------------

use crate::clock::{self, Clock};
use crate::journal::{ClusterEvent, ClusterEventKind, Origin};
use merge::{Limits, Merged};
use rusqlite::params;

fn real_clock() -> uhlc::NTP64 {
    clock::ntp64_from_unix_us(clock::unix_us(std::time::SystemTime::now()))
}

fn clock_2s_behind() -> uhlc::NTP64 {
    clock::ntp64_from_unix_us(clock::unix_us(std::time::SystemTime::now()) - 2_000_000)
}

/// A server: its journal, its clock, and its wall clock (the clock's own
/// physical time, so a skewed server writes skewed wall times).
struct Server {
    journal: Journal,
    clock: Clock,
    physical: fn() -> uhlc::NTP64,
}

impl Server {
    fn open(path: &Path, physical: fn() -> uhlc::NTP64, addr: &str) -> Server {
        let clock = Clock::with_physical(physical, Duration::from_secs(5));
        let origin = Origin {
            clock: clock.clone(),
            server: Some(addr.parse().unwrap()),
        };
        Server {
            journal: Journal::open_for(path, 0, &origin).unwrap(),
            clock,
            physical,
        }
    }

    /// Journals one request with this id, received now.
    fn request(&self, id: &str) {
        let mut r = row(
            clock::unix_us_from_ntp64((self.physical)()),
            Some(7),
            Outcome::Ok,
            10,
        );
        r.request_id = Some(RequestId::new(id.as_bytes()));
        r.hlc = self.clock.stamp();
        self.journal.submit(&mut vec![r]);
    }
}

fn listed(merged: &Merged) -> Vec<(String, String)> {
    merged.to_json()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["server"].as_str().unwrap().to_owned(),
                r["request_id"].to_string(),
            )
        })
        .collect()
}

const ALL: Limits = Limits {
    rows: 1000,
    timeline: 1000,
};

#[test]
fn a_causal_link_orders_a_slow_servers_rows_after_what_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let a = Server::open(&pa, real_clock, "127.0.0.1:1001");
    let b = Server::open(&pb, clock_2s_behind, "127.0.0.1:1002");
    a.request("1");
    // What a client carries from a's `stats` reply to b.
    let link = a.clock.now().to_string();
    b.clock.observe_text(&link).unwrap();
    b.request("2");
    a.request("3");
    // Without a second link, 3 and 4 would be concurrent, in either order.
    b.clock.observe(&a.clock.now()).unwrap();
    b.request("4");
    a.journal.close();
    b.journal.close();

    let merged = Merged::collect(&[pa.clone(), pb.clone()], None, ALL).unwrap();
    let order = listed(&merged);
    assert_eq!(
        order,
        [
            ("127.0.0.1:1001".to_owned(), "1".to_owned()),
            ("127.0.0.1:1002".to_owned(), "2".to_owned()),
            ("127.0.0.1:1001".to_owned(), "3".to_owned()),
            ("127.0.0.1:1002".to_owned(), "4".to_owned()),
        ]
    );
    // By wall clock, b's requests came 2 s before a's: the wrong order.
    let rows = &merged.rows;
    assert!(rows[1].ts_us < rows[0].ts_us - 1_500_000);
    // Per-server figures, and the servers named by their meta.
    let json = merged.to_json();
    assert_eq!(json["requests"], 4);
    let servers = json["servers"].as_array().unwrap();
    assert_eq!(servers[0]["server"], "127.0.0.1:1001");
    assert_eq!(servers[0]["hlc_id"], a.clock.id().to_string());
    assert_eq!(servers[1]["requests"], 2);
    assert_eq!(servers[1]["schema_version"], SCHEMA_VERSION);
    let mut text = Vec::new();
    merged.write_text(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    for needle in [
        "journals   ",
        "127.0.0.1:1002",
        "workers of 127.0.0.1:1001",
        "the last 4 requests",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in\n{text}");
    }
    // --rows keeps the last N in causal order.
    let two = Merged::collect(
        &[pa.clone(), pb],
        None,
        Limits {
            rows: 2,
            timeline: 0,
        },
    )
    .unwrap();
    assert_eq!(
        listed(&two).iter().map(|r| &*r.1).collect::<Vec<_>>(),
        ["3", "4"]
    );
    let again = Merged::collect(&[pa.clone(), pa], None, ALL).unwrap_err();
    assert!(format!("{again:#}").contains("given twice"), "{again:#}");
}

#[test]
fn one_journal_reports_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path());
    let merged = Merged::collect(
        std::slice::from_ref(&path),
        None,
        Limits {
            rows: 0,
            timeline: 50,
        },
    )
    .unwrap();
    let report = Report::collect(&path, None).unwrap();
    assert_eq!(merged.to_json(), report.to_json());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    merged.write_text(&mut a).unwrap();
    report.write_text(&mut b).unwrap();
    assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap());
}

#[test]
fn rows_without_stamps_merge_by_their_wall_time() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.db");
    {
        // A schema 2 journal (no stamps at all) and a schema 3 one with a
        // row whose stamp is missing.
        let conn = Connection::open(&old).unwrap();
        conn.execute_batch(crate::journal::SCHEMA_V2).unwrap();
        for (ts, id) in [(1_000_000_000_000_003i64, 3), (1_000_000_000_000_001, 1)] {
            conn.execute(
                "INSERT INTO requests (ts_us, client, request_id, op, outcome, latency_us) \
                 VALUES (?1, '127.0.0.1:5', ?2, 'square', 'ok', 1)",
                params![ts, id],
            )
            .unwrap();
        }
    }
    let new = dir.path().join("new.db");
    let journal = Journal::open(&new, 0).unwrap();
    let mut rows = vec![row(1_000_000_000_000_002, None, Outcome::Ok, 1)];
    rows[0].request_id = Some(RequestId::new(b"2"));
    rows[0].hlc = 0;
    journal.submit(&mut rows);
    let mut rows = vec![row(0, None, Outcome::Ok, 1)];
    rows[0].request_id = Some(RequestId::new(b"4"));
    // A stamp of 2038 or later is a negative INTEGER: still the latest.
    rows[0].hlc = (1 << 63) + 5;
    journal.submit(&mut rows);
    journal.close();
    let merged = Merged::collect(&[old.clone(), new], None, ALL).unwrap();
    let ids: Vec<String> = listed(&merged).into_iter().map(|r| r.1).collect();
    assert_eq!(ids, ["1", "2", "3", "4"]);
    assert!(!merged.rows[0].stamped && merged.rows[3].stamped);
    // The SQL key of an unstamped row is the Rust conversion of its wall time.
    let conn = Connection::open(&old).unwrap();
    for ts in [0i64, 1, 999_999, 1_000_000, 1_714_557_600_123_456] {
        let key: i64 = conn
            .query_row(
                &format!("SELECT {}", merge::hlc_key_sql(2).replace("ts_us", "?1")),
                [ts],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(key as u64, clock::ntp64_from_unix_us(ts).0, "{ts}");
    }
}

#[test]
fn views_timeline_and_the_one_coordinator_check() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let a = Server::open(&pa, real_clock, "127.0.0.1:1001");
    let b = Server::open(&pb, clock_2s_behind, "127.0.0.1:1002");
    let (ca, cb) = (a.journal.cluster_journal(), b.journal.cluster_journal());
    a.request("before any view");
    ca.record(
        ClusterEvent::new("a", ClusterEventKind::Coordinator)
            .term(1)
            .subject("a"),
    );
    ca.record(
        ClusterEvent::new("a", ClusterEventKind::View)
            .view(1)
            .detail("a,b"),
    );
    let link = a.clock.now();
    b.clock.observe(&link).unwrap();
    cb.record(
        ClusterEvent::new("b", ClusterEventKind::Coordinator)
            .term(1)
            .subject("a"),
    );
    cb.record(
        ClusterEvent::new("b", ClusterEventKind::View)
            .view(1)
            .detail("a,b"),
    );
    a.request("v1");
    b.request("v1");
    b.request("v1");
    // Term 2: each side believes it leads (a split the check must catch).
    ca.record(
        ClusterEvent::new("a", ClusterEventKind::Coordinator)
            .term(2)
            .subject("a"),
    );
    cb.record(
        ClusterEvent::new("b", ClusterEventKind::Coordinator)
            .term(2)
            .subject("b"),
    );
    ca.record(
        ClusterEvent::new("a", ClusterEventKind::View)
            .view(2)
            .detail("a"),
    );
    a.request("v2");
    a.journal.close();
    b.journal.close();

    let merged = Merged::collect(
        &[pa, pb],
        None,
        Limits {
            rows: 0,
            timeline: 3,
        },
    )
    .unwrap();
    let views: Vec<(u64, usize, u64)> = merged
        .views
        .iter()
        .map(|v| (v.view, v.sources.len(), v.requests))
        .collect();
    assert_eq!(views, [(1, 2, 3), (2, 1, 1)]);
    assert_eq!(merged.coordinators.terms, 2);
    assert_eq!(
        merged.coordinators.violations,
        [(2, vec!["a".to_owned(), "b".to_owned()])]
    );
    // The timeline is causal: b's events (its wall clock 2 s behind) come
    // after a's first view, which b had heard of.
    let kinds: Vec<(String, String)> = merged
        .cluster
        .iter()
        .map(|c| (c.node.clone(), c.kind.clone()))
        .collect();
    assert_eq!(
        kinds[..4].iter().map(|k| &*k.0).collect::<Vec<_>>(),
        ["a", "a", "b", "b"]
    );
    let json = merged.to_json();
    assert_eq!(json["cluster"]["events"], 7);
    assert_eq!(json["cluster"]["timeline"].as_array().unwrap().len(), 3);
    assert_eq!(json["cluster"]["one_coordinator_per_term"]["ok"], false);
    assert_eq!(
        json["views"][0]["servers"],
        json!(["127.0.0.1:1001", "127.0.0.1:1002"])
    );
    assert!(json.get("rows").is_none());
    let mut text = Vec::new();
    merged.write_text(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    for needle in [
        "cluster timeline: the last 3 of 7 events",
        "VIOLATED in 1 of 2 terms: term 2: a, b",
        "FIRST INSTALLED (HLC)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in\n{text}");
    }
}

#[test]
fn the_last_rows_of_batches_and_older_rows_are_those_the_view_sorts_last() {
    // Schema 6 searches request_batches itself and request_rows in SQL:
    // together they must list what the view, sorted, does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let journal = Journal::open(&path, 0).unwrap();
    let mut rows: Vec<RequestRow> = (0..600u64)
        .map(|i| RequestRow {
            ts_unix_us: 1_714_557_600_000_000 + (i * 7919 % 600) as i64,
            client: "127.0.0.1:9".parse().unwrap(),
            request_id: Some(RequestId::new(i.to_string().as_bytes())),
            op: Op::Square,
            worker_pid: Some(7),
            outcome: Outcome::Ok,
            latency_us: i,
            // Some unstamped: they sort by their wall time.
            hlc: if i % 3 == 0 {
                0
            } else {
                clock::ntp64_from_unix_us(1_714_557_600_000_000 + (i * 7919 % 600) as i64).0
            },
        })
        .collect();
    journal.submit(&mut rows);
    journal.close();
    // Rows as a schema-5 master writes them, stamped and not.
    Connection::open(&path)
        .unwrap()
        .execute_batch(&format!(
            "INSERT INTO request_rows (ts_us, client, request_id, op, worker_pid, outcome, latency_us, hlc) \
             VALUES (1714557600000590, 2130706433, 'old-a', 1, 7, 0, 1, {}), \
                    (1714557600000595, 2130706433, 'old-b', 1, 7, 0, 1, NULL)",
            clock::ntp64_from_unix_us(1_714_557_600_000_599).0 as i64
        ))
        .unwrap();
    let conn = Connection::open(&path).unwrap();
    for limit in [1, 5, 40] {
        let merged = Merged::collect(
            std::slice::from_ref(&path),
            None,
            Limits {
                rows: limit,
                timeline: 0,
            },
        )
        .unwrap();
        let got: Vec<String> = listed(&merged).into_iter().map(|r| r.1).collect();
        let want: Vec<String> = conn
            .prepare(&format!(
                "SELECT request_id FROM (SELECT request_id, {} AS k, id FROM requests \
                 ORDER BY k < 0 DESC, k DESC, id DESC LIMIT {limit}) ORDER BY k, id",
                merge::hlc_key_sql(6)
            ))
            .unwrap()
            .query_map([], |r| {
                Ok(match r.get::<_, rusqlite::types::Value>(0)? {
                    rusqlite::types::Value::Integer(n) => n.to_string(),
                    rusqlite::types::Value::Text(t) => format!("{t:?}"),
                    other => panic!("{other:?}"),
                })
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, want, "--rows {limit}");
    }
}
