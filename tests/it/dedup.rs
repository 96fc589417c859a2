//! Issue 10 item 3: retries answered once (at-most-once per server). A JSON
//! request with an `id` that comes again from the same address, with the
//! same bytes, is dropped while the first runs and gets the first reply
//! again, byte for byte, once it has run; the cache stays within its bounds
//! under 100,000 distinct ids; the same id with other bytes is a new
//! request; a retrying `client` runs a slow request once.
//!
//! What ran is read from the journal (a row with a `worker_pid` is an
//! execution; `replayed` and `duplicate` rows are the cache's answers) and
//! from `stats`' `dedup` object.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

use crate::harness::{
    self, bin, describe, rss_kib, run_with_deadline, with_id, Client, Journaled, Load, Server,
};

/// Waits that end as soon as their condition holds.
const EVENTUALLY: Duration = Duration::from_secs(10);

impl Journaled {
    /// `(op, worker_pid, outcome)` of every row of request id `id` (as
    /// stored: a string id's text), in journal order.
    fn rows(&self, id: &str) -> Vec<(String, Option<u32>, String)> {
        rows_of(&self.server, &self.path, id)
    }
}

fn rows_of(s: &Server, path: &Path, id: &str) -> Vec<(String, Option<u32>, String)> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| s.fail(&format!("cannot open {}: {e}", path.display())));
    let mut stmt = conn
        .prepare("SELECT op, worker_pid, outcome FROM requests WHERE request_id = ?1 ORDER BY id")
        .expect("prepare");
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .and_then(|rows| rows.collect())
        .unwrap_or_else(|e| s.fail(&format!("reading rows of id {id}: {e}")))
}

/// Rows of `rows` that ran on a worker (an execution).
fn executed(rows: &[(String, Option<u32>, String)]) -> usize {
    rows.iter().filter(|r| r.1.is_some()).count()
}

fn outcomes(rows: &[(String, Option<u32>, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in rows {
        *m.entry(r.2.clone()).or_default() += 1;
    }
    m
}

/// `stats`' `dedup` object.
fn dedup(s: &Server) -> Value {
    s.stats()["dedup"].clone()
}

fn n(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field} in {v}"))
}

/// Requests the workers have answered (executions; the master's own
/// replies, `stats` and replays among them, are not).
fn served(st: &Value) -> u64 {
    st["workers"]
        .as_array()
        .map_or(0, |w| w.iter().filter_map(|w| w["served"].as_u64()).sum())
}

/// `stats` once no worker holds a request: a worker sends its reply
/// before the master reads its completion, so right after a reply the
/// master may not have counted that execution yet.
fn settled_stats(s: &Server) -> Value {
    let mut st = s.stats();
    let started = Instant::now();
    while st["workers"]
        .as_array()
        .is_some_and(|w| w.iter().any(|w| w["in_flight"].as_u64() != Some(0)))
        && started.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
        st = s.stats();
    }
    st
}

/// Requests held by workers right now.
fn in_flight(s: &Server) -> u64 {
    s.stats()["workers"].as_array().map_or(0, |w| {
        w.iter().filter_map(|w| w["in_flight"].as_u64()).sum()
    })
}

#[test]
fn the_same_id_three_times_runs_once_and_every_reply_is_the_same_bytes() {
    let _g = harness::shared();
    let j = Journaled::start(&["--workers", "2", "--enable-fault-injection"]);
    let s = &j.server;
    let c = s.client();
    let req = br#"{"op":"sleep","ms":1000,"id":"dedup-a"}"#;
    c.send(req);
    s.wait_until("the sleep is at a worker", EVENTUALLY, |s| {
        in_flight(s) == 1
    });
    // The retry while it runs: dropped, the first reply answers both.
    c.send(req);
    s.wait_until("the retry in progress is counted", EVENTUALLY, |s| {
        n(&dedup(s), "dropped_in_progress") == 1
    });
    let first = c
        .recv(Duration::from_secs(10))
        .unwrap_or_else(|| s.fail("no reply to the sleep"));
    s.check(
        first.is_ok() && first.raw("id").as_deref() == Some(r#""dedup-a""#),
        || format!("reply to the sleep: {first:?}"),
    );
    // The retry after the reply: the same bytes again, without running it.
    // (The worker replies before the master reads its completion; a retry
    // in between would still find the request running and be dropped, as
    // nfsd drops one, so the test waits for the master to have the reply.)
    s.wait_until("the master has the reply", EVENTUALLY, |s| {
        in_flight(s) == 0
    });
    c.send(req);
    let third = c
        .recv(Duration::from_secs(5))
        .unwrap_or_else(|| s.fail("no reply to the retry after the reply"));
    s.check(third == first, || {
        format!("replay differs: first {first:?}, replay {third:?}")
    });
    let extra = c.recv(Duration::from_millis(300));
    s.check(extra.is_none(), || format!("a reply too many: {extra:?}"));
    let d = dedup(s);
    s.check(
        n(&d, "replayed") == 1 && n(&d, "dropped_in_progress") == 1 && n(&d, "entries") >= 1,
        || format!("stats dedup after 3 sends: {d}"),
    );
    let st = settled_stats(s);
    eprintln!("dedup: 3 sends of one id: one reply each for the 1st and 3rd, identical; stats {d}");
    s.check(served(&st) == 1, || format!("one execution, stats {st}"));
    j.stop();
    let rows = j.rows("dedup-a");
    let by = outcomes(&rows);
    s.check(
        executed(&rows) == 1
            && rows.len() == 3
            && by.get("ok") == Some(&1)
            && by.get("replayed") == Some(&1)
            && by.get("duplicate") == Some(&1)
            && rows.iter().all(|r| r.2 == "duplicate" || r.0 == "sleep"),
        || format!("journal rows of dedup-a: {rows:?}"),
    );
}

#[test]
fn a_request_that_timed_out_is_answered_timeout_again_not_run_again() {
    let _g = harness::shared();
    let j = Journaled::start(&[
        "--workers",
        "1",
        "--enable-fault-injection",
        "--request-timeout-ms",
        "300",
    ]);
    let s = &j.server;
    let c = s.client();
    let req = br#"{"op":"sleep","ms":3000,"id":"dedup-timeout"}"#;
    let first = c
        .request(req, Duration::from_secs(10), 1)
        .unwrap_or_else(|| s.fail("no reply to the hanging sleep"));
    s.check(first.error().as_deref() == Some("timeout"), || {
        format!("expected timeout: {first:?}")
    });
    let again = c
        .request(req, Duration::from_secs(5), 1)
        .unwrap_or_else(|| s.fail("no reply to the retry"));
    s.check(again == first, || {
        format!("the retry should get the same timeout reply: {first:?} then {again:?}")
    });
    j.stop();
    let rows = j.rows("dedup-timeout");
    s.check(
        outcomes(&rows) == BTreeMap::from([("replayed".to_owned(), 1), ("timeout".to_owned(), 1)]),
        || format!("journal rows: {rows:?}"),
    );
}

#[test]
fn a_hundred_thousand_ids_keep_the_cache_within_its_bounds() {
    let _g = harness::exclusive();
    let s = Server::start(&["--workers", "2", "--dedup-entries", "1000"]);
    let c = s.client();
    let total = 100_000;
    let requests: Vec<String> = (0..total)
        .map(|i| format!(r#"{{"op":"square","n":{i}}}"#))
        .collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Sample stats and the master's RSS while the stream runs.
    let sampler = {
        let (progress, done, addr, pid) = (progress.clone(), done.clone(), s.addr(), s.pid());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let started = Instant::now();
            while !done.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(180) {
                let st = Client::new(addr).request_json(r#"{"op":"stats","id":"sample"}"#);
                if st["ok"] == true {
                    samples.push((
                        progress.load(Ordering::Relaxed),
                        st["dedup"]["entries"].as_u64().unwrap_or(u64::MAX),
                        st["dedup"]["bytes"].as_u64().unwrap_or(u64::MAX),
                        rss_kib(pid).unwrap_or(0),
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let load = Load {
        window: 64,
        attempts: 3,
        deadline: Duration::from_secs(150),
        progress: Some(progress),
        ..Load::default()
    };
    let got = c.many(&requests, &load);
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("the sampler panicked");
    let missing = got.missing().len();
    s.check(missing == 0, || {
        format!("{missing} of {total} requests unanswered")
    });
    let d = dedup(&s);
    let max_entries = samples.iter().map(|x| x.1).max().unwrap_or(0);
    let max_bytes = samples.iter().map(|x| x.2).max().unwrap_or(0);
    let rss: Vec<u64> = samples.iter().map(|x| x.3).filter(|r| *r > 0).collect();
    let (first_rss, last_rss) = (rss.first().copied(), rss.last().copied());
    eprintln!(
        "dedup: {total} distinct ids in {:?} through --dedup-entries 1000: {} samples, \
         entries at most {max_entries}, bytes at most {max_bytes}, master RSS {first_rss:?} -> \
         {last_rss:?} KiB (max {:?}); at the end {d}",
        got.elapsed,
        samples.len(),
        rss.iter().max()
    );
    s.check(samples.len() >= 3, || {
        format!("only {} stats samples", samples.len())
    });
    s.check(
        max_entries <= 1000 && n(&d, "entries") <= 1000 && max_bytes <= n(&d, "max_bytes"),
        || format!("over the bounds: samples {samples:?}, end {d}"),
    );
    s.check(n(&d, "evicted") >= 90_000, || {
        format!("expected ~99,000 evictions: {d}")
    });
    // Memory: the cache is allocated at start; the stream adds nothing to it.
    s.check(
        last_rss.unwrap_or(0) < 40 * 1024
            && last_rss.unwrap_or(0) <= first_rss.unwrap_or(0) + 8 * 1024,
        || format!("master RSS grew: {rss:?} KiB"),
    );
    // The newest id is still kept: its retry is a replay. The oldest was
    // evicted long ago: its retry runs again (another `ok`).
    let served_before = served(&settled_stats(&s));
    let replayed_before = n(&d, "replayed");
    let newest = with_id(&requests[total - 1], got.ids[total - 1]);
    let oldest = with_id(&requests[0], got.ids[0]);
    let r = c
        .request(newest.as_bytes(), Duration::from_secs(3), 3)
        .unwrap_or_else(|| s.fail("no reply to the newest id's retry"));
    s.check(got.replies[total - 1].as_ref() == Some(&r), || {
        format!(
            "the newest id's retry: {r:?} vs {:?}",
            got.replies[total - 1]
        )
    });
    let r = c
        .request(oldest.as_bytes(), Duration::from_secs(3), 3)
        .unwrap_or_else(|| s.fail("no reply to the oldest id's retry"));
    s.check(r.is_ok() && r.raw("result").as_deref() == Some("0"), || {
        format!("the oldest id's retry: {r:?}")
    });
    let after = settled_stats(&s);
    s.check(
        after["dedup"]["replayed"].as_u64() == Some(replayed_before + 1)
            && served(&after) == served_before + 1,
        || format!("expected one replay (newest) and one execution (oldest): {after}"),
    );
}

#[test]
fn the_same_id_with_other_bytes_is_a_new_request() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "2"]);
    let c = s.client();
    let ask = |req: &str| {
        c.request(req.as_bytes(), Duration::from_secs(3), 3)
            .unwrap_or_else(|| s.fail(&format!("no reply to {req}")))
    };
    let three = r#"{"op":"square","n":3,"id":"c"}"#;
    let four = r#"{"op":"square","n":4,"id":"c"}"#;
    let nine = ask(three);
    let sixteen = ask(four);
    s.check(
        nine.raw("result").as_deref() == Some("9")
            && sixteen.raw("result").as_deref() == Some("16"),
        || format!("each payload gets its own answer: {nine:?}, {sixteen:?}"),
    );
    let d = dedup(&s);
    s.check(n(&d, "replaced") == 1 && n(&d, "replayed") == 0, || {
        format!("the second payload replaced the first: {d}")
    });
    // The second payload again is a retry; the first one again is new.
    let again = ask(four);
    s.check(again == sixteen, || format!("{again:?} vs {sixteen:?}"));
    let nine_again = ask(three);
    s.check(nine_again.raw("result").as_deref() == Some("9"), || {
        format!("{nine_again:?}")
    });
    // Another address with the same id and bytes is another client.
    let other = s
        .client()
        .request(four.as_bytes(), Duration::from_secs(3), 3)
        .unwrap_or_else(|| s.fail("no reply to the other client"));
    s.check(other.raw("result").as_deref() == Some("16"), || {
        format!("{other:?}")
    });
    let st = settled_stats(&s);
    s.check(
        st["dedup"]["replayed"] == 1 && st["dedup"]["replaced"] == 2 && served(&st) == 4,
        || format!("4 executions, 1 replay, 2 replaced: {st}"),
    );
    eprintln!(
        "dedup: same id, other bytes: run as new; stats dedup {}",
        st["dedup"]
    );
}

#[test]
fn with_a_zero_window_a_retry_runs_again() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "1", "--dedup-window", "0"]);
    let c = s.client();
    let req = br#"{"op":"hello","id":"off"}"#;
    for _ in 0..2 {
        c.request(req, Duration::from_secs(3), 3)
            .unwrap_or_else(|| s.fail("no reply"));
    }
    let st = settled_stats(&s);
    s.check(
        served(&st) == 2 && st["dedup"]["replayed"] == 0 && st["dedup"]["max_entries"] == 0,
        || format!("off: both run: {st}"),
    );
}

#[test]
fn a_retrying_client_gets_a_slow_request_run_once() {
    let _g = harness::shared();
    let j = Journaled::start(&["--workers", "2", "--enable-fault-injection"]);
    let s = &j.server;
    let addr = s.addr().to_string();
    // Each attempt waits 250 ms: the client resends the same datagram
    // from the same socket about four times while the second-long sleep runs.
    let mut cmd = Command::new(bin("client"));
    cmd.args([
        "--server",
        &addr,
        "--timeout-ms",
        "250",
        "--retries",
        "12",
        "--json",
        "sleep",
        "1000",
    ]);
    let (out, in_time) = run_with_deadline(&mut cmd, Duration::from_secs(20));
    s.check(in_time && out.status.success(), || describe(&cmd, &out));
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii_end())
        .unwrap_or_else(|e| s.fail(&format!("not JSON ({e}): {}", describe(&cmd, &out))));
    let id = v["id"]
        .as_str()
        .unwrap_or_else(|| s.fail(&format!("no string id in {v}")))
        .to_owned();
    s.check(v["ok"] == true && v["slept_ms"] == 1000, || format!("{v}"));
    j.stop();
    let rows = j.rows(&id);
    let by = outcomes(&rows);
    eprintln!("dedup: a client retrying every 250 ms a 1 s sleep: journal {by:?}");
    s.check(
        executed(&rows) == 1
            && by.get("ok") == Some(&1)
            && by.get("duplicate").is_some_and(|d| *d >= 1),
        || format!("expected one execution and its retries dropped: {rows:?}"),
    );
}

#[test]
fn a_retry_sent_the_moment_its_reply_arrives_is_replayed_and_runs_once() {
    // The master reads a serving worker's completions lazily
    // (`pool::completions_due`), so a retry sent the moment its reply
    // arrives mostly finds its request still in progress. The master then
    // reads every worker's completions and checks the retry again: it is
    // replayed. Only a retry that beats the worker's own completion write
    // (the reply leaves first) is dropped, and the client's next try is
    // replayed.
    let _g = harness::shared();
    let j = Journaled::start(&["--workers", "2"]);
    let s = &j.server;
    let c = s.client();
    const N: u64 = 20;
    let mut at_once = 0;
    for k in 0..N {
        let req = format!(r#"{{"op":"square","n":{k},"id":"quick-{k}"}}"#);
        let first = c
            .request(req.as_bytes(), Duration::from_secs(3), 3)
            .unwrap_or_else(|| s.fail(&format!("no reply to {req}")));
        c.send(req.as_bytes());
        let again = match c.recv(Duration::from_millis(500)) {
            Some(reply) => {
                at_once += 1;
                reply
            }
            None => c
                .request(req.as_bytes(), Duration::from_secs(1), 5)
                .unwrap_or_else(|| s.fail(&format!("no reply to the retries of {req}"))),
        };
        s.check(again == first, || {
            format!("{req}: first {first:?}, retry {again:?}")
        });
    }
    let d = dedup(s);
    eprintln!("dedup: {at_once} of {N} retries sent at their reply replayed at once; stats {d}");
    // Without the second check none of the 20 is replayed at once (all
    // are dropped, then replayed at the client's next try); with it, all
    // 20 on a quiet machine. At least one, even on a busy one.
    s.check(n(&d, "replayed") >= N && at_once >= 1, || {
        format!("every retry replayed, {at_once} of {N} at once: {d}")
    });
    j.stop();
    for k in 0..N {
        let rows = j.rows(&format!("quick-{k}"));
        let by = outcomes(&rows);
        s.check(
            executed(&rows) == 1
                && by.get("ok") == Some(&1)
                && by.get("replayed").is_some_and(|r| *r >= 1)
                && rows.len() == 1 + by["replayed"] + by.get("duplicate").unwrap_or(&0),
            || format!("journal rows of quick-{k}: {rows:?}"),
        );
    }
}

#[test]
fn inline_answers_are_replayed_too() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "0"]);
    let c = s.client();
    let req = br#"{"op":"hello","id":"inline"}"#;
    let first = c
        .request(req, Duration::from_secs(3), 3)
        .unwrap_or_else(|| s.fail("no reply"));
    let again = c
        .request(req, Duration::from_secs(3), 3)
        .unwrap_or_else(|| s.fail("no reply to the retry"));
    let d = dedup(&s);
    s.check(again == first && n(&d, "replayed") == 1, || {
        format!("inline: {first:?} then {again:?}; {d}")
    });
}

#[test]
fn replays_to_an_untrusted_source_count_against_its_rate_limit() {
    let _g = harness::shared();
    let s = Server::start(&[
        "--workers",
        "1",
        "--trusted",
        "127.0.0.1",
        "--rate-limit",
        "2",
        "--rate-limit-slip",
        "0",
    ]);
    // From 127.0.0.2: outside --trusted, 2 replies per second.
    let sock = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    sock.connect(s.addr()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let req = br#"{"op":"square","n":1234,"id":"far"}"#;
    let mut buf = [0u8; 2048];
    sock.send(req).expect("send");
    let first = sock.recv(&mut buf).map(|k| buf[..k].to_vec());
    s.check(first.is_ok(), || format!("no first reply: {first:?}"));
    // Four retries at once: the one token left answers one; the rest are
    // over the limit like any datagram. (Once the master has read the
    // completion: a retry before that finds the request running.)
    s.wait_until("the master has the reply", EVENTUALLY, |s| {
        in_flight(s) == 0
    });
    for _ in 0..4 {
        sock.send(req).expect("send");
    }
    let d = s.wait_until("the retries are accounted", EVENTUALLY, |s| {
        let st = s.stats();
        st["dedup"]["replayed"].as_u64().unwrap_or(0)
            + st["totals"]["dropped"].as_u64().unwrap_or(0)
            == 4
    });
    let st = s.stats();
    eprintln!(
        "dedup: 4 retries from an untrusted source at 2/s: {} (after {d:?})",
        st["dedup"]
    );
    s.check(
        st["dedup"]["replayed"].as_u64() >= Some(1) && st["totals"]["dropped"].as_u64() >= Some(2),
        || format!("expected replays held to the rate limit: {st}"),
    );
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let replay = sock.recv(&mut buf).map(|k| buf[..k].to_vec());
    s.check(replay.as_ref().ok() == first.as_ref().ok(), || {
        format!("the replay: {replay:?} vs {first:?}")
    });
}
