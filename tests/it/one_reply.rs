//! Issue 8's acceptance: exactly one reply per request on every path (stops
//! under load, timeouts), signals as documented (an ignored SIGCHLD, a
//! worker's own TERM and QUIT), and a loop that never stalls.
//!
//! The stop tests count what a client sees (duplicates, replies matching no
//! request) and hold it against the journal: every request the master read
//! has exactly one row, and its reply says what that row says.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rusqlite::{Connection, OpenFlags};
use tempfile::TempDir;

use crate::harness::{self, Load, Reply, Server};

/// For "eventually" checks on a noisy machine.
const EVENTUALLY: Duration = Duration::from_secs(10);

// ----- stops under load -----------------------------------------------------

/// A stream of squares with a 2 ms sleep every 20th request, so that
/// workers hold queues of requests when a signal lands.
fn mixed_requests(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 20 == 0 {
                r#"{"op":"sleep","ms":2}"#.to_owned()
            } else {
                format!(r#"{{"op":"square","n":{i}}}"#)
            }
        })
        .collect()
}

/// The outcome of every request row of the journal at `path`, by request
/// id; fails on an id journaled twice.
fn journal_outcomes(s: &Server, path: &Path) -> HashMap<String, String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| s.fail(&format!("cannot open the journal {}: {e}", path.display())));
    let mut stmt = conn
        .prepare("SELECT request_id, outcome FROM requests WHERE op != 'stats'")
        .expect("prepare");
    let rows = stmt
        .query_map([], |r| {
            let id: rusqlite::types::Value = r.get(0)?;
            let outcome: String = r.get(1)?;
            Ok((id, outcome))
        })
        .expect("query");
    let mut out = HashMap::new();
    for row in rows {
        let (id, outcome) = row.expect("row");
        let id = match id {
            rusqlite::types::Value::Integer(n) => n.to_string(),
            rusqlite::types::Value::Text(t) => t.trim_matches('"').to_owned(),
            other => s.fail(&format!("a journal row with request_id {other:?}")),
        };
        if let Some(first) = out.insert(id.clone(), outcome.clone()) {
            s.fail(&format!(
                "request {id} is journaled twice: {first} and {outcome}"
            ));
        }
    }
    out
}

/// The outcome a reply states: `ok` or its error code.
fn outcome_of(reply: &Reply) -> String {
    if reply.is_ok() {
        "ok".to_owned()
    } else {
        reply
            .error()
            .unwrap_or_else(|| format!("unreadable {reply:?}"))
    }
}

/// [`stop_round`] three times: a duplicate needs a worker caught between
/// its two writes, so one round can miss a bug that three rarely do.
fn stop_under_load(what: &str, args: &[&str], stop: impl Fn(&Server)) {
    let _g = harness::exclusive();
    for round in 1..=3 {
        stop_round(&format!("{what} (round {round})"), args, &stop);
    }
}

/// Starts a journaled 4-worker master, streams [`mixed_requests`] at it,
/// calls `stop` once 2,000 are answered, and checks that the client got no
/// duplicate and no stray reply, that the master exited, and that every
/// request the master read got exactly one reply, the one its journal row
/// names.
fn stop_round(what: &str, args: &[&str], stop: &impl Fn(&Server)) {
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("j.db");
    let mut full = vec!["--workers", "4", "--journal", path.to_str().expect("utf-8")];
    full.extend_from_slice(args);
    let s = Server::start(&full);
    let requests = mixed_requests(20_000);
    let progress = Arc::new(AtomicUsize::new(0));
    let no_more = Arc::new(AtomicBool::new(false));
    let load = Load {
        window: 256,
        // One send per request: a second reply can only be the server's doing.
        attempts: 1,
        resend_after: Duration::from_secs(2),
        pace: None,
        deadline: Duration::from_secs(30),
        progress: Some(progress.clone()),
        stop: Some(no_more.clone()),
    };
    let client = s.client();
    let stream = std::thread::spawn(move || client.many(&requests, &load));
    let started = Instant::now();
    while progress.load(Ordering::Relaxed) < 2000 && started.elapsed() < EVENTUALLY {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop(&s);
    let status = s.wait_exit(EVENTUALLY);
    no_more.store(true, Ordering::Relaxed);
    let got = stream.join().expect("the stream thread panicked");
    s.check(status.is_some(), || {
        format!("{what}: the master still runs {EVENTUALLY:?} later")
    });
    let journal = journal_outcomes(&s, &path);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut mismatched = Vec::new();
    for (i, reply) in got.replies.iter().enumerate() {
        let Some(reply) = reply else { continue };
        let id = got.ids[i].to_string();
        let said = outcome_of(reply);
        *seen.entry(said.clone()).or_default() += 1;
        match journal.get(&id) {
            Some(row) if *row == said => {}
            row => mismatched.push(format!("id {id}: reply {said}, journal {row:?}")),
        }
    }
    let answered: usize = seen.values().sum();
    eprintln!(
        "{what}: {answered} replies {seen:?}, {} journal rows, {} duplicates, {} unmatched",
        journal.len(),
        got.duplicates,
        got.unmatched
    );
    s.check(got.duplicates == 0 && got.unmatched == 0, || {
        format!(
            "{what}: {} duplicate replies and {} replies matching no request",
            got.duplicates, got.unmatched
        )
    });
    s.check(mismatched.is_empty(), || {
        format!(
            "{what}: {} replies disagree with the journal, first {:?}",
            mismatched.len(),
            &mismatched[..mismatched.len().min(5)]
        )
    });
    s.check(journal.len() == answered, || {
        format!(
            "{what}: the master journaled {} requests but the client got {answered} replies",
            journal.len()
        )
    });
}

#[test]
fn sigquit_under_load_answers_each_request_once() {
    stop_under_load("SIGQUIT", &[], |s| s.signal(Signal::SIGQUIT));
}

#[test]
fn sigint_under_load_answers_each_request_once() {
    stop_under_load("SIGINT", &[], |s| s.signal(Signal::SIGINT));
}

#[test]
fn a_second_sigterm_under_load_answers_each_request_once() {
    stop_under_load("TERM twice", &[], |s| {
        s.signal(Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(5));
        s.signal(Signal::SIGTERM);
    });
}

#[test]
fn the_graceful_timeout_under_load_answers_each_request_once() {
    stop_under_load(
        "TERM, graceful timeout 0",
        &["--graceful-timeout", "0"],
        |s| s.signal(Signal::SIGTERM),
    );
}

// ----- timeouts ---------------------------------------------------------------

#[test]
fn only_the_hung_request_gets_timeout_and_the_queue_behind_it_is_answered() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "1", "--request-timeout-ms", "500"]);
    let old = s.worker_pids();
    let c = s.client();
    c.send(br#"{"op":"sleep","ms":5000,"id":"hung"}"#);
    std::thread::sleep(Duration::from_millis(50));
    for i in 0..20 {
        c.send(format!(r#"{{"op":"square","n":{i},"id":{i}}}"#).as_bytes());
    }
    let mut got: BTreeMap<String, Reply> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < 21 {
        let Some(r) = c.recv(deadline.saturating_duration_since(Instant::now())) else {
            break;
        };
        let id = r.raw("id").unwrap_or_default();
        if got.insert(id.clone(), r).is_some() {
            s.fail(&format!("request {id} was answered twice"));
        }
    }
    s.check(got.len() == 21, || {
        format!("{} of 21 replies within 5 s: {got:?}", got.len())
    });
    let hung = &got["\"hung\""];
    s.check(hung.error().as_deref() == Some("timeout"), || {
        format!("the hung sleep got {hung:?}")
    });
    for i in 0..20 {
        let r = &got[&i.to_string()];
        s.check(
            r.is_ok() && r.raw("result") == Some((i * i).to_string()),
            || format!("square {i}, queued behind the hung request, got {r:?}"),
        );
        s.check(r.worker_pid().is_some_and(|p| !old.contains(&p)), || {
            format!("square {i} should come from the replacement of {old:?}: {r:?}")
        });
    }
    let st = s.stats();
    s.check(st["totals"]["timeouts"] == 1, || {
        format!("one worker killed for a timeout: {st}")
    });
}

// ----- signals ----------------------------------------------------------------

/// The set of blocked signals of process `pid`, from `/proc`.
fn blocked_signals(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("SigBlk:"))?;
    u64::from_str_radix(line.trim_start_matches("SigBlk:").trim(), 16).ok()
}

#[test]
fn a_master_started_with_sigchld_ignored_still_replaces_a_killed_worker() {
    let _g = harness::shared();
    let s = Server::start_with(&["--workers", "2"], |cmd| {
        // SAFETY: signal(2) with SIG_IGN is async-signal-safe and installs
        // no handler code; it runs between fork and exec of the master.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    let victim = s.worker_pids()[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill a worker");
    s.wait_until("the killed worker is replaced", EVENTUALLY, |s| {
        let now = s.worker_pids();
        now.len() == 2 && !now.contains(&victim)
    });
    let got = s.ask_text(b"12");
    s.check(got == "144", || {
        format!("after the replacement: 12 -> {got:?}")
    });
}

#[test]
fn a_worker_starts_with_no_signal_blocked() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "2"]);
    for pid in s.worker_pids() {
        let blocked = blocked_signals(pid);
        s.check(blocked == Some(0), || {
            format!("worker {pid} starts with blocked signals {blocked:x?}")
        });
    }
}

#[test]
fn a_worker_sent_sigterm_answers_what_it_holds_exits_0_and_is_replaced() {
    let _g = harness::shared();
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("j.db");
    let s = Server::start(&["--workers", "1", "--journal", path.to_str().expect("utf-8")]);
    let worker = s.worker_pids()[0];
    let c = s.client();
    for i in 0..3 {
        c.send(format!(r#"{{"op":"sleep","ms":300,"id":{i}}}"#).as_bytes());
    }
    s.wait_until("3 sleeps in flight", EVENTUALLY, |s| {
        s.stats()["workers"][0]["in_flight"] == 3
    });
    kill(Pid::from_raw(worker as i32), Signal::SIGTERM).expect("TERM the worker");
    let mut got = Vec::new();
    while got.len() < 3 {
        match c.recv(Duration::from_secs(5)) {
            Some(r) => got.push(r),
            None => s.fail(&format!(
                "only {} of 3 replies after TERM: {got:?}",
                got.len()
            )),
        }
    }
    for r in &got {
        s.check(r.is_ok() && r.worker_pid() == Some(worker), || {
            format!("a sleep held by the TERMed worker {worker} got {r:?}")
        });
    }
    s.wait_until("the TERMed worker is replaced", EVENTUALLY, |s| {
        let now = s.worker_pids();
        now.len() == 1 && now[0] != worker
    });
    let r = s.ask(r#"{"op":"square","n":5,"id":"after"}"#);
    s.check(r.is_ok(), || format!("the replacement answers: {r:?}"));
    s.signal(Signal::SIGTERM);
    s.check(s.wait_exit(EVENTUALLY).is_some(), || "master exits".into());
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the journal");
    let (status, reason, served): (String, String, i64) = conn
        .query_row(
            "SELECT exit_status, reason, requests_served FROM workers WHERE pid = ?1",
            [worker],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("the TERMed worker's row");
    s.check(
        status == "exit 0" && reason == "terminated" && served == 3,
        || format!("the TERMed worker's journal row: {status}, {reason}, served {served}"),
    );
}

// ----- the loop never stalls ------------------------------------------------

#[test]
fn inline_mode_answers_sleep_disabled_at_once() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "0"]);
    let c = s.client();
    let asked = Instant::now();
    let r = c
        .request(
            br#"{"op":"sleep","ms":5000,"id":1}"#,
            Duration::from_secs(2),
            1,
        )
        .unwrap_or_else(|| s.fail("no reply to sleep with --workers 0"));
    let took = asked.elapsed();
    s.check(r.error().as_deref() == Some("disabled"), || {
        format!("sleep with --workers 0 got {r:?}")
    });
    s.check(took < Duration::from_secs(2), || {
        format!("sleep with --workers 0 took {took:?} to answer")
    });
    let st = s.stats();
    s.check(
        st["master_pid"] == s.pid() && st["totals"]["replies_dropped"] == 0,
        || format!("stats, with replies_dropped: {st}"),
    );
}
