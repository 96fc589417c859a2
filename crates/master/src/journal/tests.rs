//! Unit tests of the journal: schema, rows, retention, shedding, errors.

use super::*;
use protocol::ErrorCode;
use rusqlite::types::Value;

/// A varied row: an id on every other one, the master answering every
/// fifth, `busy` every seventh, no HLC stamp every eleventh.
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
        hlc: match i % 11 {
            0 => 0,
            _ => clock::ntp64_from_unix_us(1_714_557_600_000_000 + 2 * i as i64).0,
        },
    }
}

fn read_conn(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The journal is at this master's schema version.
fn assert_schema_is_current(conn: &Connection) {
    assert_eq!(
        count(conn, "PRAGMA user_version"),
        i64::from(SCHEMA_VERSION)
    );
}

#[test]
fn open_creates_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    Journal::open(&path, 1000).unwrap().close();
    let conn = read_conn(&path);
    assert_schema_is_current(&conn);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    for table in [
        "request_batches",
        "request_rows",
        "workers",
        "journal_events",
    ] {
        let n = count(
            &conn,
            &format!("SELECT count(*) FROM sqlite_schema WHERE type='table' AND name='{table}'"),
        );
        assert_eq!(n, 1, "table {table}");
    }
    // Requests are read through a view that adds the readable times.
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_schema WHERE type='view' AND name='requests'"
        ),
        1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM journal_events WHERE kind IN ('open','close')"
        ),
        2
    );
    // Reopening an existing journal works and keeps the schema.
    Journal::open(&path, 1000).unwrap().close();
    assert_schema_is_current(&conn);
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
            "SELECT ts_us, ts, client, request_id, op, worker_pid, outcome, latency_us, \
             hlc FROM requests ORDER BY id",
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
        let hlc = r.get::<_, Option<i64>>(8).unwrap();
        if want.hlc == 0 {
            assert_eq!(hlc, None);
        } else {
            assert_eq!(hlc, Some(want.hlc as i64));
        }
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
    // Worker events are stamped when they are recorded, in order.
    let (started_hlc, exited_hlc): (i64, i64) = conn
        .query_row(
            "SELECT started_hlc, exited_hlc FROM workers WHERE pid = 101",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(0 < started_hlc && started_hlc < exited_hlc);
    let unstamped = count(
        &conn,
        "SELECT count(*) FROM journal_events WHERE hlc IS NULL",
    );
    assert_eq!(unstamped, 0);
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
        .prepare("SELECT pid, started_us, exited_us, exit_status, reason FROM workers ORDER BY id")
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
    // Trimmed back to 1000 rows, or up to a batch more, once 1000 + 256
    // are exceeded.
    let most = 1000 + BATCH_ROWS as i64;
    assert!((1000..=most).contains(&n), "{n} rows");
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
    assert!((1000..=most).contains(&n), "{n} rows after reopening");
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
        let v1 = SCHEMA_V2
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
    assert_schema_is_current(&conn);
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
            "cluster_events",
            "journal_events",
            "meta",
            "request_batches",
            "request_marks",
            "request_rows",
            "requests",
            "sqlite_autoindex_meta_1",
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

/// The `CREATE` statements of a journal, by name: what makes two schemas
/// the same.
fn schema_sql(conn: &Connection) -> Vec<(String, Option<String>)> {
    pairs(conn, "SELECT name, sql FROM sqlite_schema ORDER BY name")
}

/// A migrated journal has the schema of a new one (made in `dir`) and is
/// sound.
fn assert_migrated_like_a_new_journal(conn: &Connection, dir: &Path) {
    let fresh = dir.join("fresh.db");
    Journal::open(&fresh, 1000).unwrap().close();
    assert_eq!(schema_sql(conn), schema_sql(&read_conn(&fresh)));
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_version_2_journal_is_migrated_to_the_schema_of_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA_V2).unwrap();
        for i in 0..100i64 {
            conn.execute(
                "INSERT INTO requests (ts_us, client, request_id, op, worker_pid, outcome, latency_us) \
                 VALUES (?1, '127.0.0.1:5', ?1, 'square', 7, 'ok', 1)",
                [i],
            )
            .unwrap();
        }
        conn.execute("INSERT INTO workers (pid, started_us) VALUES (7, 0)", [])
            .unwrap();
        conn.execute(
            "INSERT INTO journal_events (ts_us, kind, count, detail) VALUES (0, 'open', 0, 'master pid 1')",
            [],
        )
        .unwrap();
    }
    let clock = Clock::with_physical(clock::physical_now, clock::DEFAULT_MAX_DELTA);
    let origin = Origin {
        clock: clock.clone(),
        server: Some("127.0.0.1:10001".parse().unwrap()),
    };
    let journal = Journal::open_for(&path, 1000, &origin).unwrap();
    let mut rows: Vec<RequestRow> = (1..=3).map(row).collect();
    journal.submit(&mut rows);
    journal.close();

    let conn = read_conn(&path);
    assert_schema_is_current(&conn);
    // The old rows are all there, without stamps; the new ones have theirs.
    assert_eq!(count(&conn, "SELECT count(*) FROM requests"), 103);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM requests WHERE hlc IS NULL"),
        100
    );
    assert_eq!(
        count(
            &conn,
            "SELECT sum(request_id) FROM requests WHERE id <= 100"
        ),
        4950
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM workers WHERE started_hlc IS NULL"
        ),
        1
    );
    let meta: Vec<(String, String)> = pairs(&conn, "SELECT key, value FROM meta ORDER BY key");
    assert_eq!(
        meta,
        [
            ("hlc_id".to_owned(), clock.id().to_string()),
            ("master_pid".to_owned(), std::process::id().to_string()),
            ("server".to_owned(), "127.0.0.1:10001".to_owned()),
        ]
    );
    assert_migrated_like_a_new_journal(&conn, dir.path());
}

#[test]
fn cluster_events_are_written_stamped_and_shed_once_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let journal = Journal::open(&path, 1000).unwrap();
    let cluster = journal.cluster_journal();
    let before = journal.clock.stamp();
    let from_thread = {
        let cluster = cluster.clone();
        std::thread::spawn(move || {
            cluster.record(
                ClusterEvent::new("n1", ClusterEventKind::View)
                    .view(2)
                    .detail("n1,n2"),
            );
        })
    };
    from_thread.join().unwrap();
    cluster.record(
        ClusterEvent::new("n1", ClusterEventKind::Coordinator)
            .term(3)
            .subject("n2"),
    );
    let given = journal.clock.now();
    cluster.record(
        ClusterEvent::new("n1", ClusterEventKind::MemberDown)
            .subject("n3")
            .stamped(&given),
    );
    journal.close();
    // After the close, nothing more is written: counted instead.
    cluster.record(ClusterEvent::new("n1", ClusterEventKind::MemberUp));
    assert_eq!(cluster.shed(), 1);

    let conn = read_conn(&path);
    type Row = (
        i64,
        String,
        String,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = conn
        .prepare(
            "SELECT hlc, node, kind, term, view, subject, detail FROM cluster_events ORDER BY id",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(rows[0].0 as u64 > before && rows[0].0 < rows[1].0);
    assert_eq!(rows[2].0 as u64, given.get_time().0);
    let shape: Vec<_> = rows
        .iter()
        .map(|r| (&*r.2, r.3, r.4, r.5.as_deref(), r.6.as_deref()))
        .collect();
    assert_eq!(
        shape,
        [
            ("view", None, Some(2), None, Some("n1,n2")),
            ("coordinator", Some(3), None, Some("n2"), None),
            ("member_down", None, None, Some("n3"), None),
        ]
    );
    assert!(rows.iter().all(|r| r.1 == "n1"));
    let hlc_at: String = conn
        .query_row("SELECT hlc_at FROM cluster_events WHERE id = 3", [], |r| {
            r.get(0)
        })
        .unwrap();
    let want = crate::report::iso_utc(clock::unix_us_from_ntp64(*given.get_time()));
    assert_eq!(hlc_at, want);
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

/// Rows of every op and outcome, from IPv4 clients at the edges of the
/// integer encoding and from IPv6 ones.
fn varied_rows() -> Vec<RequestRow> {
    let clients: Vec<SocketAddr> = [
        "0.0.0.0:0",
        "255.255.255.255:65535",
        "127.0.0.1:9",
        "192.168.10.100:10000",
        "1.20.255.3:65000",
        "[::1]:5",
        "[fe80::1:2:3:4%4294967295]:65535",
        "[::ffff:10.0.0.1]:53",
    ]
    .iter()
    .map(|t| t.parse().unwrap())
    .collect();
    let mut rows = Vec::new();
    for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
        for (j, op) in Op::ALL.into_iter().enumerate() {
            let mut r = row((i * 10 + j) as u64);
            r.client = clients[(i + j) % clients.len()];
            r.op = op;
            r.outcome = outcome;
            rows.push(r);
        }
    }
    rows
}

/// The rows of `sql`, two columns each.
fn pairs<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql>(
    conn: &Connection,
    sql: &str,
) -> Vec<(A, B)> {
    conn.prepare(sql)
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// The rows of `sql`, three text columns each.
fn text_triples(conn: &Connection, sql: &str) -> Vec<(String, String, String)> {
    conn.prepare(sql)
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn clients_ops_and_outcomes_are_numbers_the_view_reads_as_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let journal = Journal::open(&path, 0).unwrap();
    let want = varied_rows();
    journal.submit(&mut want.clone());
    journal.close();
    let conn = read_conn(&path);
    let got = text_triples(
        &conn,
        "SELECT client, op, outcome FROM requests ORDER BY id",
    );
    let texts: Vec<(String, String, String)> = want
        .iter()
        .map(|r| {
            (
                r.client.to_string(),
                r.op.as_str().to_owned(),
                r.outcome.as_str().to_owned(),
            )
        })
        .collect();
    assert_eq!(got, texts);
    // Stored as numbers in the batches' JSON: an IPv4 client, every op
    // and every outcome.
    let stored = text_triples(
        &conn,
        "SELECT json_type(r.value, '$[1]'), json_type(r.value, '$[3]'), \
         json_type(r.value, '$[5]') \
         FROM request_batches AS b, json_each(b.rows) AS r ORDER BY b.first_id + r.key",
    );
    assert_eq!(stored.len(), want.len());
    for (r, (client, op, outcome)) in want.iter().zip(&stored) {
        let client_type = if r.client.is_ipv4() {
            "integer"
        } else {
            "text"
        };
        assert_eq!(
            (client.as_str(), op.as_str(), outcome.as_str()),
            (client_type, "integer", "integer")
        );
    }
}

#[test]
fn an_ipv6_client_formats_without_allocating() {
    let mut buf = [0u8; 64];
    let v6: SocketAddr = "[fe80::1:2:3:4%4294967295]:65535".parse().unwrap();
    assert!(matches!(
        format_client(v6, &mut buf),
        std::borrow::Cow::Borrowed(t) if t == v6.to_string()
    ));
    for octet in 0..=255u8 {
        for port in [0u16, 7, 99, 65535] {
            let v4 = SocketAddr::from(([octet, 0, 10, octet], port));
            let n = client_integer(v4).unwrap();
            assert_eq!(
                n >> 16,
                i64::from(u32::from_be_bytes([octet, 0, 10, octet]))
            );
            assert_eq!(n & 0xffff, i64::from(port));
        }
    }
}

#[test]
fn small_integer_ids_read_as_id_value_reads_them() {
    let mut cases: Vec<String> = [
        "0",
        "-0",
        "7",
        "-7",
        "007",
        "123456789012345678",
        "-123456789012345678",
        "1234567890123456789",
        "9223372036854775807",
        "-",
        "",
        "1e3",
        "1.5",
        "+5",
        "12a",
        "\"12\"",
        "true",
        "null",
        " 1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cases.extend((0..2000).map(|i: i64| (i * 7919 - 5000).to_string()));
    for raw in &cases {
        let fast = small_integer(raw.as_bytes());
        if let Some(n) = fast {
            assert_eq!(protocol::id_value(raw), IdValue::Integer(n), "{raw}");
        } else {
            // Left to id_value: none of these is 18 digits or fewer.
            let digits = raw.strip_prefix('-').unwrap_or(raw);
            assert!(
                digits.is_empty()
                    || digits.len() > 18
                    || !digits.bytes().all(|b| b.is_ascii_digit()),
                "{raw}"
            );
        }
    }
}

/// A journal of schema version 4: text for the client, op and outcome.
fn make_v4(path: &Path, rows: usize) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(SCHEMA_V2).unwrap();
    conn.execute_batch(MIGRATE_FROM_2).unwrap();
    conn.execute_batch(MIGRATE_FROM_3).unwrap();
    for i in 0..rows as i64 {
        conn.execute(
            "INSERT INTO request_rows (ts_us, client, request_id, op, worker_pid, outcome, latency_us) \
             VALUES (?1, '127.0.0.1:5', ?1, 'hello', 7, 'busy', 1)",
            [i],
        )
        .unwrap();
    }
    assert_eq!(count(&conn, "PRAGMA user_version"), 4);
}

#[test]
fn a_version_4_journal_keeps_its_text_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    make_v4(&path, 100);
    let journal = Journal::open(&path, 0).unwrap();
    let mut rows = varied_rows();
    let n_new = rows.len() as i64;
    journal.submit(&mut rows);
    journal.close();
    {
        // A master of schema 4 still writing during a USR2 hand-over.
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO request_rows (ts_us, client, request_id, op, worker_pid, outcome, latency_us) \
             VALUES (1, '10.0.0.1:53', 'x', 'square', 8, 'ok', 2)",
            [],
        )
        .unwrap();
    }
    let conn = read_conn(&path);
    assert_schema_is_current(&conn);
    assert_eq!(
        count(&conn, "SELECT count(*) FROM requests"),
        100 + n_new + 1
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM requests WHERE client = '127.0.0.1:5' AND op = 'hello' \
             AND outcome = 'busy' AND request_id = ts_us AND id <= 100"
        ),
        100
    );
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM requests WHERE client = '10.0.0.1:53' AND op = 'square' \
             AND outcome = 'ok' AND request_id = 'x'"
        ),
        1
    );
    let marks = count(&conn, "SELECT count(*) FROM request_marks");
    assert_eq!(marks, 0, "no mark before 1,024 rows");
    assert_migrated_like_a_new_journal(&conn, dir.path());
}

#[test]
fn the_view_is_made_again_when_it_names_other_codes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    Journal::open(&path, 0).unwrap().close();
    {
        // The view of a master that knew fewer outcomes.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP VIEW requests; CREATE VIEW requests AS SELECT id, outcome FROM request_rows;",
        )
        .unwrap();
    }
    let mut rows = vec![row(1)];
    rows[0].outcome = Outcome::Duplicate;
    let journal = Journal::open(&path, 0).unwrap();
    journal.submit(&mut rows);
    journal.close();
    let conn = read_conn(&path);
    let outcome: String = conn
        .query_row("SELECT outcome FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outcome, "duplicate");
    // Opened again with the same view: the schema is not written.
    let before = count(&conn, "PRAGMA schema_version");
    Journal::open(&path, 0).unwrap().close();
    assert_eq!(count(&read_conn(&path), "PRAGMA schema_version"), before);
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

/// A journal of schema version 3: its `requests_ts` index and no marks.
fn make_v3(path: &Path, rows: &[(i64, i64)]) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(SCHEMA_V2).unwrap();
    conn.execute_batch(MIGRATE_FROM_2).unwrap();
    for (id, ts) in rows {
        conn.execute(
            "INSERT INTO request_rows (id, ts_us, client, op, outcome, latency_us) \
             VALUES (?1, ?2, '127.0.0.1:5', 'square', 'ok', 1)",
            [id, ts],
        )
        .unwrap();
    }
    assert_eq!(count(&conn, "PRAGMA user_version"), 3);
}

/// Requests at or after `since`, counted through the marks (as `master
/// report` reads them) and by a scan of every row: always the same.
fn window_counts(conn: &Connection, since: i64) -> (i64, i64) {
    let floor: i64 = conn.query_row(SINCE_FLOOR, [since], |r| r.get(0)).unwrap();
    // As `master report --since` reads them (report::requests_scan_sql).
    let marked: i64 = conn
        .query_row(
            &format!(
                "SELECT count(*) FROM ({}) WHERE ts_us >= ?1",
                requests_source_sql(Some(floor), Tables::Both)
            ),
            [since],
            |r| r.get(0),
        )
        .unwrap();
    let scanned: i64 = conn
        .query_row(
            "SELECT count(*) FROM requests WHERE ts_us >= ?1",
            [since],
            |r| r.get(0),
        )
        .unwrap();
    (marked, scanned)
}

#[test]
fn a_version_3_journal_is_migrated_to_time_marks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    // Ids in completion order, times out of order by up to 50 µs.
    let old: Vec<(i64, i64)> = (1..=500).map(|i| (i, 1000 + i * 10 - i % 7 * 8)).collect();
    make_v3(&path, &old);
    let journal = Journal::open(&path, 0).unwrap();
    let mut rows: Vec<RequestRow> = (0..3).map(row).collect();
    for (i, r) in rows.iter_mut().enumerate() {
        r.ts_unix_us = 20_000 + i as i64;
    }
    journal.submit(&mut rows);
    journal.close();

    let conn = read_conn(&path);
    assert_schema_is_current(&conn);
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM sqlite_schema WHERE name = 'requests_ts'"
        ),
        0
    );
    // One mark for the rows there were: the highest id, the latest time.
    let max_ts = old.iter().map(|r| r.1).max().unwrap();
    let marks: Vec<(i64, i64)> = pairs(&conn, "SELECT last_id, max_ts_us FROM request_marks");
    assert_eq!(marks, [(500, max_ts)]);
    for since in [
        0,
        1000,
        1500,
        3000,
        5000,
        max_ts,
        max_ts + 1,
        20_001,
        30_000,
    ] {
        let (marked, scanned) = window_counts(&conn, since);
        assert_eq!(marked, scanned, "since {since}");
    }
    assert_eq!(window_counts(&conn, max_ts + 1), (3, 3));
    assert_migrated_like_a_new_journal(&conn, dir.path());
}

#[test]
fn time_windows_through_the_marks_find_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    // Received up to 40 ms before they completed (ids are completion order).
    let ts = |i: u64| 1_000_000_000 + i as i64 * 100 - (i * 7919 % 400) as i64 * 100;
    let write = |range: std::ops::Range<u64>, max_rows: u64| {
        let journal = Journal::open(&path, max_rows).unwrap();
        let all: Vec<u64> = range.collect();
        let mut submitted = 0;
        for chunk in all.chunks(700) {
            let mut rows: Vec<RequestRow> = chunk
                .iter()
                .map(|&i| {
                    let mut r = row(i);
                    r.ts_unix_us = ts(i);
                    r
                })
                .collect();
            journal.submit(&mut rows);
            submitted += chunk.len() as u64;
            // Several transactions, so that marks fall between them.
            let deadline = Instant::now() + Duration::from_secs(60);
            while journal.written_rows() < submitted && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(journal.shed_rows(), 0);
        journal.close();
    };
    let check = |label: &str| {
        let conn = read_conn(&path);
        let rows = count(&conn, "SELECT count(*) FROM requests");
        let marks = count(&conn, "SELECT count(*) FROM request_marks");
        assert!(
            marks <= rows / MARK_ROWS as i64 + 1,
            "{label}: {marks} marks for {rows} rows"
        );
        let (lo, hi): (i64, i64) = conn
            .query_row("SELECT min(ts_us), max(ts_us) FROM requests", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        let mut skipped = false;
        for k in 0..=40 {
            let since = lo - 1 + (hi - lo + 2) * k / 40;
            let (marked, scanned) = window_counts(&conn, since);
            assert_eq!(marked, scanned, "{label}: since {since}");
            let report = crate::report::Report::collect(&path, Some(since)).unwrap();
            assert_eq!(
                report.requests as i64, scanned,
                "{label}: report since {since}"
            );
            let floor: i64 = conn.query_row(SINCE_FLOOR, [since], |r| r.get(0)).unwrap();
            skipped |= floor > 0;
        }
        assert!(skipped, "{label}: the marks never skipped a row");
        // The window's scan is a range of each table's own B-tree.
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT count(*) FROM ({}) WHERE ts_us >= 5",
                requests_source_sql(Some(7), Tables::Both)
            ))
            .unwrap()
            .query_map([], |r| r.get(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for table in ["request_rows", "b"] {
            assert!(
                plan.iter()
                    .any(|p| p.starts_with(&format!("SEARCH {table} USING INTEGER PRIMARY KEY"))),
                "{label}: {plan:?}"
            );
        }
    };
    write(0..10_000, 0);
    check("one master");
    // Another master goes on from the same journal.
    write(10_000..13_000, 0);
    check("restarted");
    // The newest rows deleted by hand: their ids come again, later in time.
    Connection::open(&path)
        .unwrap()
        .execute(
            "DELETE FROM request_batches WHERE first_id + n - 1 > 12000",
            [],
        )
        .unwrap();
    write(13_000..15_000, 0);
    check("ids reused");
    // Retention drops the marks of the rows it deletes.
    write(15_000..25_000, 5_000);
    check("retention");
    let conn = read_conn(&path);
    let oldest = count(&conn, "SELECT min(id) FROM requests");
    assert_eq!(
        count(
            &conn,
            &format!("SELECT count(*) FROM request_marks WHERE last_id < {oldest}")
        ),
        0
    );
}

#[test]
fn marks_hold_while_two_masters_write_one_journal() {
    // As while USR2 replaces a master: two writers take turns, and the
    // newer one's requests are later in time, its rows interleaved with
    // the older one's by id.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let old = Journal::open(&path, 0).unwrap();
    let new = Journal::open(&path, 0).unwrap();
    let mut next = [0u64; 2];
    for turn in 0..12 {
        let (journal, base) = if turn % 2 == 0 {
            (&old, 1_000_000_000)
        } else {
            (&new, 2_000_000_000)
        };
        let n = &mut next[turn % 2];
        let mut rows: Vec<RequestRow> = (*n..*n + 700)
            .map(|i| {
                let mut r = row(i);
                r.ts_unix_us = base + i as i64;
                r
            })
            .collect();
        *n += 700;
        let want = journal.written_rows() + 700;
        journal.submit(&mut rows);
        let deadline = Instant::now() + Duration::from_secs(60);
        while journal.written_rows() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(journal.written_rows(), want);
    }
    old.close();
    new.close();
    let conn = read_conn(&path);
    assert_eq!(count(&conn, "SELECT count(*) FROM requests"), 12 * 700);
    assert!(count(&conn, "SELECT count(*) FROM request_marks") >= 4);
    for since in [
        0,
        1_000_000_000,
        1_000_001_000,
        1_000_004_200,
        2_000_000_000,
        2_000_000_500,
        2_000_003_000,
        2_000_004_199,
        2_000_004_200,
    ] {
        let (marked, scanned) = window_counts(&conn, since);
        assert_eq!(marked, scanned, "since {since}");
    }
}

#[test]
fn a_batch_decodes_to_what_the_view_reads() {
    // Every outcome, IPv6 clients, rows with and without a stamp, and the
    // first row without one (the batch's hlc is its first stamp).
    let mut rows = varied_rows();
    rows[0].hlc = 0;
    let mut text = Vec::new();
    let (ts_us, max_ts_us, hlc) = encode_batch(&rows, &mut text);
    assert_eq!(ts_us, rows[0].ts_unix_us);
    assert_eq!(max_ts_us, rows.iter().map(|r| r.ts_unix_us).max().unwrap());
    assert_eq!(hlc, rows.iter().find_map(|r| hlc_value(r.hlc)));
    let decoded: Vec<BatchedRequest> = serde_json::from_slice(&text).unwrap();
    assert_eq!(decoded.len(), rows.len());
    for (r, d) in rows.iter().zip(&decoded) {
        assert_eq!(ts_us + d.ts_offset_us, r.ts_unix_us);
        assert_eq!(d.worker_pid, r.worker_pid);
        assert_eq!(d.outcome_text(), r.outcome.as_str());
        assert_eq!(d.latency_us, r.latency_us as i64);
        let stamp = d.hlc_offset.map(|o| hlc.unwrap().wrapping_add(o));
        assert_eq!(stamp, hlc_value(r.hlc));
    }
    // A number no outcome has, and text, read as they are stored.
    let odd: Vec<BatchedRequest> =
        serde_json::from_str(r#"[[0,1,null,1,null,250,5],[0,1,null,1,null,"later",5,7,"x"]]"#)
            .unwrap();
    assert_eq!(odd[0].outcome_text(), "250");
    assert_eq!(
        (odd[1].outcome_text(), odd[1].hlc_offset),
        ("later".into(), Some(7))
    );
    assert!(serde_json::from_str::<Vec<BatchedRequest>>("[[0,1,null,1]]").is_err());
}

#[test]
fn the_report_reads_batches_and_older_rows_as_the_view_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    let journal = Journal::open(&path, 0).unwrap();
    let mut rows: Vec<RequestRow> = (0..1000).map(row).collect();
    journal.submit(&mut rows);
    journal.close();
    // Rows as a schema-5 master writes them (a USR2 hand-over from one).
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "INSERT INTO request_rows (ts_us, client, request_id, op, worker_pid, outcome, latency_us) \
         VALUES (1714557600000500, 2130706433, 5, 1, 101, 0, 70000), \
                (1714557600000600, '[::1]:5', 'x', 1, NULL, 3, 80000)",
    )
    .unwrap();
    let conn = read_conn(&path);
    let view: Vec<(String, i64)> = pairs(
        &conn,
        "SELECT outcome, count(*) FROM requests GROUP BY outcome ORDER BY outcome",
    );
    for since in [None, Some(1_714_557_600_000_400)] {
        let report = crate::report::Report::collect(&path, since).unwrap();
        let since = since.unwrap_or(0);
        let want = count(
            &conn,
            &format!("SELECT count(*) FROM requests WHERE ts_us >= {since}"),
        );
        assert_eq!(report.requests as i64, want, "since {since}");
        if since == 0 {
            let mut got: Vec<(String, i64)> = report
                .outcomes
                .iter()
                .map(|(o, n)| (o.clone(), *n as i64))
                .collect();
            got.sort();
            assert_eq!(got, view);
            assert_eq!(report.latency.unwrap().max, 80000);
        }
    }
    // A batch that is not one: the report names it.
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE request_batches SET rows = '[[1]]' WHERE first_id = 1",
            [],
        )
        .unwrap();
    let err = crate::report::Report::collect(&path, None).unwrap_err();
    assert!(format!("{err:#}").contains("request batch 1"), "{err:#}");
}
