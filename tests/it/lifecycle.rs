//! Signals and worker lifetimes: TERM drains and stops cleanly, the
//! workers die with a SIGKILLed master, HUP replaces every worker under
//! load without losing a request, TTIN/TTOU resize the pool, and
//! `--max-requests 1` serves one request per process.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::{self, alive, exists, square_of, Load, Reply, Server};

/// "Within a few seconds" for a graceful stop.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
/// For "eventually" checks on a noisy machine.
const EVENTUALLY: Duration = Duration::from_secs(10);

#[test]
fn sigterm_exits_0_and_leaves_no_worker() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    let workers = s.workers();
    s.check(workers.len() == 4, || {
        format!("expected 4 workers: {workers:?}")
    });
    let got = s.ask_text(b"5");
    s.check(got == "25", || format!("5 -> {got:?}"));
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(STOP_DEADLINE);
    s.check(status.is_some_and(|st| st.success()), || {
        format!("after SIGTERM: expected exit 0 within {STOP_DEADLINE:?}, got {status:?}")
    });
    // The master reaped its workers before exiting: neither running nor zombies.
    let left: Vec<_> = workers.iter().filter(|p| exists(**p)).collect();
    s.check(left.is_empty(), || {
        format!("workers left after the master exited (running or unreaped): {left:?}")
    });
    let children = s.worker_pids();
    s.check(children.is_empty(), || {
        format!("children left: {children:?}")
    });
}

#[test]
fn sigterm_answers_the_requests_in_flight() {
    let _g = harness::exclusive();
    let s = Server::start(&["--enable-fault-injection", "--workers", "4"]);
    let c = s.client();
    let ids = ["\"s1\"", "\"s2\"", "\"s3\"", "\"s4\""];
    for id in ids {
        c.send(format!(r#"{{"op":"sleep","ms":1000,"id":{id}}}"#).as_bytes());
    }
    s.wait_until("the 4 sleeps are in flight", Duration::from_secs(5), |s| {
        let st = s.stats();
        st["workers"].as_array().is_some_and(|w| {
            w.iter()
                .map(|w| w["in_flight"].as_u64().unwrap_or(0))
                .sum::<u64>()
                == 4
        })
    });
    let signalled = Instant::now();
    s.signal(Signal::SIGTERM);
    let mut answered = BTreeSet::new();
    while answered.len() < ids.len() {
        let Some(reply) = c.recv(STOP_DEADLINE.saturating_sub(signalled.elapsed())) else {
            s.fail(&format!(
                "after SIGTERM only {answered:?} of the 4 sleeps were answered"
            ));
        };
        s.check(reply.is_ok() && reply.json()["op"] == "sleep", || {
            format!("a sleep in flight at SIGTERM got {reply:?}")
        });
        answered.insert(reply.raw("id").unwrap_or_default());
    }
    let status = s.wait_exit(STOP_DEADLINE);
    s.check(status.is_some_and(|st| st.success()), || {
        format!("after SIGTERM with work in flight: expected exit 0, got {status:?}")
    });
}

#[test]
fn a_sigkilled_master_takes_its_workers_down() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    let workers = s.workers();
    s.check(workers.len() == 4, || {
        format!("expected 4 workers: {workers:?}")
    });
    s.signal(Signal::SIGKILL);
    let died = s.wait_exit(Duration::from_secs(2)).is_some();
    s.check(died, || "the master survived SIGKILL".to_owned());
    let killed = Instant::now();
    // Orphans are reparented to PID 1, which may not reap them here: a
    // zombie counts as gone.
    while workers.iter().any(|p| alive(*p)) {
        if killed.elapsed() > Duration::from_secs(2) {
            let left: Vec<_> = workers.iter().filter(|p| alive(**p)).collect();
            s.fail(&format!(
                "workers still running 2 s after the master was SIGKILLed: {left:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sighup_replaces_every_worker_during_a_stream_without_losing_a_request() {
    let _g = harness::exclusive();
    let s = Server::start(&["--workers", "4"]);
    let old = s.workers();
    s.check(old.len() == 4, || format!("expected 4 workers: {old:?}"));
    let numbers: Vec<String> = (0..3000u64)
        .map(|i| {
            if i % 3 == 0 {
                format!("{}{i:020}", 98_765_432_109_876u64)
            } else {
                i.to_string()
            }
        })
        .collect();
    let requests: Vec<String> = numbers
        .iter()
        .map(|n| format!(r#"{{"op":"square","n":{n}}}"#))
        .collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let load = Load {
        window: 32,
        // About 1.5 s of traffic, so the reload happens well inside it.
        pace: Some(Duration::from_micros(500)),
        progress: Some(progress.clone()),
        ..Load::default()
    };
    let client = s.client();
    let stream = std::thread::spawn(move || client.many(&requests, &load));
    let started = Instant::now();
    while progress.load(Ordering::Relaxed) < 300 && started.elapsed() < EVENTUALLY {
        std::thread::sleep(Duration::from_millis(1));
    }
    let at_hup = progress.load(Ordering::Relaxed);
    s.signal(Signal::SIGHUP);
    let got = stream.join().expect("the stream thread panicked");
    s.check((300..3000).contains(&at_hup), || {
        format!("SIGHUP was not sent mid-stream: {at_hup} of 3000 requests were answered")
    });
    let missing = got.missing();
    s.check(missing.is_empty() && got.resent == 0, || {
        format!(
            "SIGHUP lost requests: {} unanswered, {} needed a resend",
            missing.len(),
            got.resent
        )
    });
    for (i, n) in numbers.iter().enumerate() {
        let reply = got.replies[i].as_ref().expect("checked");
        let want = square_of(n);
        s.check(
            reply.is_ok() && reply.raw("result").as_deref() == Some(want.as_str()),
            || format!("square of {n} during SIGHUP: got {reply:?}"),
        );
    }
    s.wait_until(
        "every old worker is gone and 4 new ones serve",
        EVENTUALLY,
        |s| {
            let now = s.workers();
            now.len() == 4
                && !now.iter().any(|p| old.contains(p))
                && !old.iter().any(|p| exists(*p))
        },
    );
    s.wait_pool(4, EVENTUALLY);
    let served_by: BTreeSet<u32> = got
        .replies
        .iter()
        .flatten()
        .filter_map(Reply::worker_pid)
        .collect();
    let old_pids: BTreeSet<u32> = old.iter().map(|p| p.pid).collect();
    s.check(
        served_by.len() > 4 && served_by.iter().any(|p| !old_pids.contains(p)),
        || format!("the stream was served only by {served_by:?} (old workers {old_pids:?})"),
    );
}

#[test]
fn ttin_then_ttou_resize_the_pool() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    s.signal(Signal::SIGTTIN);
    s.wait_pool(5, EVENTUALLY);
    let st = s.stats();
    s.check(st["pool"]["target"] == 5, || format!("after TTIN: {st}"));
    s.signal(Signal::SIGTTOU);
    s.wait_pool(4, EVENTUALLY);
    let st = s.stats();
    s.check(st["pool"]["target"] == 4, || format!("after TTOU: {st}"));
    // Never below one.
    for _ in 0..5 {
        s.signal(Signal::SIGTTOU);
        std::thread::sleep(Duration::from_millis(50));
    }
    s.wait_pool(1, EVENTUALLY);
    let st = s.stats();
    s.check(st["pool"]["target"] == 1, || {
        format!("after 5 more TTOU: {st}")
    });
    let got = s.ask_text(b"9");
    s.check(got == "81", || format!("one worker left: 9 -> {got:?}"));
}

#[test]
fn max_requests_1_serves_each_request_from_a_fresh_process() {
    let _g = harness::exclusive();
    let s = Server::start(&["--workers", "4", "--max-requests", "1"]);
    let mut pids = Vec::new();
    for i in 0..20u64 {
        let n = format!("{}{i}", 10u128.pow(25));
        let reply = s.ask(&format!(r#"{{"op":"square","n":{n},"id":{i}}}"#));
        let want = square_of(&n);
        s.check(
            reply.is_ok() && reply.raw("result").as_deref() == Some(want.as_str()),
            || format!("request {i} with --max-requests 1: got {reply:?}"),
        );
        pids.extend(reply.worker_pid());
    }
    let distinct: BTreeSet<u32> = pids.iter().copied().collect();
    s.check(distinct.len() >= 15, || {
        format!(
            "20 requests with --max-requests 1 came from only {} processes: {pids:?}",
            distinct.len()
        )
    });
    s.wait_pool(4, EVENTUALLY);
}

/// Sends `n` sleeps of `ms` from `c` (ids 0..n) and waits until the
/// workers hold all of them.
fn sleeps_in_flight(s: &Server, c: &harness::Client, n: u64, ms: u64) {
    for i in 0..n {
        c.send(format!(r#"{{"op":"sleep","ms":{ms},"id":{i}}}"#).as_bytes());
    }
    s.wait_until(&format!("{n} sleeps are in flight"), EVENTUALLY, |s| {
        let st = s.stats();
        st["workers"].as_array().is_some_and(|w| {
            w.iter()
                .map(|w| w["in_flight"].as_u64().unwrap_or(0))
                .sum::<u64>()
                == n
        })
    });
}

/// Collects `n` replies from `c`, each within `deadline` of now.
fn replies(s: &Server, c: &harness::Client, n: usize, deadline: Duration) -> Vec<Reply> {
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < n {
        match c.recv(deadline.saturating_sub(started.elapsed())) {
            Some(r) => got.push(r),
            None => s.fail(&format!(
                "only {} of {n} replies within {deadline:?}: {got:?}",
                got.len()
            )),
        }
    }
    got
}

#[test]
fn a_second_sigterm_stops_at_once_and_answers_shutting_down() {
    let _g = harness::shared();
    let s = Server::start(&["--enable-fault-injection", "--workers", "2"]);
    let c = s.client();
    sleeps_in_flight(&s, &c, 2, 8000);
    s.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    s.signal(Signal::SIGTERM);
    let second = Instant::now();
    let got = replies(&s, &c, 2, Duration::from_secs(3));
    for r in &got {
        s.check(r.error().as_deref() == Some("shutting_down"), || {
            format!("a sleep in flight at the second SIGTERM got {r:?}")
        });
    }
    let status = s.wait_exit(Duration::from_secs(3));
    s.check(status.is_some(), || {
        format!(
            "the master still runs {:?} after a second SIGTERM",
            second.elapsed()
        )
    });
}

#[test]
fn the_graceful_timeout_ends_a_drain_and_every_request_is_answered() {
    let _g = harness::shared();
    let s = Server::start(&[
        "--enable-fault-injection",
        "--workers",
        "2",
        "--graceful-timeout",
        "1",
    ]);
    let workers = s.workers();
    let c = s.client();
    sleeps_in_flight(&s, &c, 2, 8000);
    let signalled = Instant::now();
    s.signal(Signal::SIGTERM);
    let got = replies(&s, &c, 2, Duration::from_secs(4));
    for r in &got {
        s.check(r.error().as_deref() == Some("shutting_down"), || {
            format!("a sleep cut short by --graceful-timeout 1 got {r:?}")
        });
    }
    let status = s.wait_exit(Duration::from_secs(4));
    let took = signalled.elapsed();
    s.check(status.is_some(), || {
        format!("the master still runs {took:?} after SIGTERM with --graceful-timeout 1")
    });
    let left: Vec<_> = workers.iter().filter(|p| exists(**p)).collect();
    s.check(left.is_empty(), || {
        format!("workers left after the drain: {left:?}")
    });
}

#[test]
fn ttou_lets_the_retiring_worker_answer_what_it_holds() {
    let _g = harness::shared();
    let s = Server::start(&["--enable-fault-injection", "--workers", "4"]);
    let c = s.client();
    sleeps_in_flight(&s, &c, 4, 1000);
    s.signal(Signal::SIGTTOU);
    let got = replies(&s, &c, 4, Duration::from_secs(5));
    for r in &got {
        s.check(r.is_ok() && r.json()["op"] == "sleep", || {
            format!("a sleep held across SIGTTOU got {r:?}")
        });
    }
    s.wait_pool(3, EVENTUALLY);
}

#[test]
fn max_requests_1_under_concurrent_load_answers_everything() {
    let _g = harness::exclusive();
    let s = Server::start(&["--workers", "4", "--max-requests", "1"]);
    let numbers: Vec<String> = (0..400u64)
        .map(|i| format!("-{}", i * 1_000_003 + 1))
        .collect();
    let requests: Vec<String> = numbers
        .iter()
        .map(|n| format!(r#"{{"op":"square","n":{n}}}"#))
        .collect();
    let got = s.client().many(
        &requests,
        &Load {
            window: 16,
            ..Load::default()
        },
    );
    let missing = got.missing();
    s.check(missing.is_empty() && got.resent == 0, || {
        format!(
            "--max-requests 1, 16 at once: {} of 400 unanswered, {} resent",
            missing.len(),
            got.resent
        )
    });
    let mut pids = BTreeSet::new();
    for (i, n) in numbers.iter().enumerate() {
        let reply = got.replies[i].as_ref().expect("checked");
        s.check(
            reply.is_ok() && reply.raw("result") == Some(square_of(n)),
            || format!("square of {n} with --max-requests 1, 16 at once: got {reply:?}"),
        );
        pids.extend(reply.worker_pid());
    }
    s.check(pids.len() >= 300, || {
        format!(
            "400 requests with --max-requests 1 came from only {} processes",
            pids.len()
        )
    });
    s.wait_pool(4, EVENTUALLY);
}
