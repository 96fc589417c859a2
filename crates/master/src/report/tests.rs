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
    conn.execute_batch("PRAGMA user_version = 4").unwrap();
    let msg = format!("{:#}", Report::collect(&path, None).unwrap_err());
    assert!(msg.contains("schema version 4"), "{msg}");
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
