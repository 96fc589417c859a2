//! Issue 10, item 1 (the rest of that issue is not built yet): several
//! masters serving one address with `--reuse-port`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::harness::{self, Load, Reply, Server};

#[test]
fn two_masters_share_a_port_and_one_sigkilled_under_load_fails_no_request() {
    let _g = harness::exclusive();
    let a = Server::start(&["--workers", "2", "--reuse-port"]);
    let bind = a.addr().to_string();
    let b = Server::start(&["--workers", "2", "--reuse-port", "--bind", &bind]);
    let (a_workers, b_workers) = (a.worker_pids(), b.worker_pids());
    // The kernel spreads clients by their address: 64 sockets reach both.
    let mut answered_by = BTreeSet::new();
    for i in 0..64 {
        let c = a.client();
        let r = c
            .request(
                format!(r#"{{"op":"square","n":{i},"id":{i}}}"#).as_bytes(),
                Duration::from_secs(2),
                3,
            )
            .unwrap_or_else(|| a.fail(&format!("no reply to request {i} on the shared port")));
        answered_by.extend(r.worker_pid());
    }
    let from_a = answered_by.iter().filter(|p| a_workers.contains(p)).count();
    let from_b = answered_by.iter().filter(|p| b_workers.contains(p)).count();
    eprintln!("reuse-port: 64 clients answered by {from_a} of A's and {from_b} of B's workers");
    a.check(from_a > 0 && from_b > 0, || {
        format!(
            "both masters should answer: workers {answered_by:?}, A {a_workers:?}, B {b_workers:?}"
        )
    });
    // Under load from 8 clients (resending a lost request with its id),
    // SIGKILL one master: every request is still answered.
    let progress = Arc::new(AtomicUsize::new(0));
    let streams: Vec<_> = (0..8)
        .map(|k| {
            let c = a.client();
            let load = Load {
                window: 8,
                resend_after: Duration::from_millis(300),
                attempts: 5,
                pace: Some(Duration::from_micros(500)),
                deadline: Duration::from_secs(30),
                progress: Some(progress.clone()),
                stop: None,
            };
            let requests: Vec<String> = (0..1000)
                .map(|i| format!(r#"{{"op":"square","n":{}}}"#, k * 1000 + i))
                .collect();
            std::thread::spawn(move || c.many(&requests, &load))
        })
        .collect();
    let started = Instant::now();
    while progress.load(Ordering::Relaxed) < 2000 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    a.signal(Signal::SIGKILL);
    let mut failed = 0;
    let mut wrong = 0;
    let mut total = 0;
    let mut resent = 0;
    let mut by_a = 0;
    for s in streams {
        let got = s.join().expect("a stream thread panicked");
        total += got.replies.len();
        failed += got.missing().len();
        resent += got.resent;
        by_a += got
            .replies
            .iter()
            .flatten()
            .filter(|r| r.worker_pid().is_some_and(|p| a_workers.contains(&p)))
            .count();
        wrong += got
            .replies
            .iter()
            .flatten()
            .filter(|r: &&Reply| !r.is_ok())
            .count();
    }
    eprintln!(
        "reuse-port: {total} requests over 8 clients, A SIGKILLed after 2000 ({by_a} answered by A); \
         {resent} resent, {failed} unanswered, {wrong} errors"
    );
    b.check(by_a > 0, || {
        "no stream was served by A before the kill".into()
    });
    b.check(failed == 0 && wrong == 0, || {
        format!("with one master killed: {failed} of {total} unanswered, {wrong} error replies")
    });
    let st = b.stats();
    b.check(st["master_pid"] == b.pid(), || {
        format!("B still serves: {st}")
    });
}
