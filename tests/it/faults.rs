//! Issue 3's acceptance: no request goes unanswered when workers crash or
//! hang, `stats` is answered while every worker is busy, a worker that
//! cannot start stops the master, and a flood gets `busy` replies in
//! bounded memory.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::harness::{
    self, children_of, group_members, rss_kib, square_of, Load, LogLine, Proc, Reply, Rng, Server,
};

/// For "eventually" checks on a noisy machine.
const EVENTUALLY: Duration = Duration::from_secs(10);

/// The requests of a stream: squares of small, 30-digit and negative numbers.
fn square_stream(n: u64) -> (Vec<String>, Vec<String>) {
    let numbers: Vec<String> = (0..n)
        .map(|i| match i % 3 {
            0 => i.to_string(),
            1 => format!("{}{i:020}", 1_234_567_890u64),
            _ => format!("-{i}"),
        })
        .collect();
    let requests = numbers
        .iter()
        .map(|n| format!(r#"{{"op":"square","n":{n}}}"#))
        .collect();
    (numbers, requests)
}

#[test]
fn killing_a_worker_every_50_ms_loses_no_request() {
    let _g = harness::exclusive();
    let s = Server::start(&["--workers", "4"]);
    let (numbers, requests) = square_stream(3000);
    let progress = Arc::new(AtomicUsize::new(0));
    let load = Load {
        window: 24,
        // About 1.5 s of traffic: some 30 kills land inside it.
        pace: Some(Duration::from_micros(500)),
        progress: Some(progress.clone()),
        ..Load::default()
    };
    let client = s.client();
    let stream = std::thread::spawn(move || client.many(&requests, &load));

    let stop = Arc::new(AtomicBool::new(false));
    let master = s.pid();
    let killer = {
        let stop = stop.clone();
        let progress = progress.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ u64::from(master));
            let mut killed: Vec<(Proc, u64)> = Vec::new();
            let started = Instant::now();
            while progress.load(Ordering::Relaxed) < 100 && started.elapsed() < EVENTUALLY {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut last = Instant::now();
            // Bounded: at most 100 kills, at most 20 s.
            while !stop.load(Ordering::Relaxed)
                && killed.len() < 100
                && started.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(50));
                let workers = children_of(master);
                if workers.is_empty() {
                    continue;
                }
                let victim = workers[(rng.next() % workers.len() as u64) as usize];
                if kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).is_ok() {
                    killed.push((victim, progress.load(Ordering::Relaxed) as u64));
                    last = Instant::now();
                }
            }
            (killed, last)
        })
    };
    let got = stream.join().expect("the stream thread panicked");
    stop.store(true, Ordering::Relaxed);
    let (killed, last_kill) = killer.join().expect("the killer thread panicked");

    let kills_in_stream = killed.iter().filter(|(_, at)| *at < 3000).count();
    s.check(kills_in_stream >= 10, || {
        format!("only {kills_in_stream} kills landed during the stream: {killed:?}")
    });
    let missing = got.missing();
    s.check(missing.is_empty() && got.resent == 0, || {
        format!(
            "with {} workers killed: {} requests unanswered (first: {:?}), {} needed a resend",
            killed.len(),
            missing.len(),
            missing.first().map(|&i| &numbers[i]),
            got.resent
        )
    });
    let mut crashed = 0;
    for (i, n) in numbers.iter().enumerate() {
        let reply = got.replies[i].as_ref().expect("checked");
        if reply.error().as_deref() == Some("worker_crashed") {
            crashed += 1;
            continue;
        }
        let want = square_of(n);
        s.check(
            reply.is_ok() && reply.raw("result").as_deref() == Some(want.as_str()),
            || {
                format!(
                    "square of {n} under kills: expected {want} or worker_crashed, got {reply:?}"
                )
            },
        );
    }
    eprintln!(
        "{} kills ({} during the stream), {crashed} worker_crashed replies, {} duplicates, stream {:.2?}",
        killed.len(),
        kills_in_stream,
        got.duplicates,
        got.elapsed
    );

    // Back to full size within a second of the last kill.
    let mut full_at = None;
    while last_kill.elapsed() < EVENTUALLY {
        if children_of(master).len() == 4 && s.stats()["pool"]["active"] == 4 {
            full_at = Some(last_kill.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("the pool was full again {full_at:?} after the last kill");
    s.check(full_at.is_some_and(|t| t <= Duration::from_secs(1)), || {
        format!(
            "the pool was back to 4 workers {full_at:?} after the last kill (bound: 1 s); children now {:?}",
            children_of(master)
        )
    });
    let st = s.stats();
    let distinct: BTreeSet<Proc> = killed.iter().map(|(p, _)| *p).collect();
    s.check(
        st["totals"]["crashes"].as_u64() >= Some(distinct.len() as u64),
        || {
            format!(
                "stats counts fewer crashes than the {} workers killed: {st}",
                distinct.len()
            )
        },
    );
}

#[test]
fn a_hung_worker_is_killed_and_its_request_gets_timeout() {
    let _g = harness::exclusive();
    let s = Server::start(&[
        "--enable-fault-injection",
        "--workers",
        "4",
        "--request-timeout-ms",
        "500",
    ]);
    let before = s.workers();
    let c = s.client();
    let sent = Instant::now();
    c.send(br#"{"op":"sleep","ms":2000,"id":"slow"}"#);
    // Wait longer than the bound, to report how late a late reply was.
    let reply = c.recv(Duration::from_secs(5));
    let took = sent.elapsed();
    s.check(reply.as_ref().and_then(Reply::error).as_deref() == Some("timeout"), || {
        format!("sleep 2000 with --request-timeout-ms 500: expected error timeout, got {reply:?} after {took:?}")
    });
    let reply = reply.expect("checked");
    s.check(reply.raw("id").as_deref() == Some("\"slow\""), || {
        format!("the timeout reply lacks the id \"slow\": {reply:?}")
    });
    eprintln!("the timeout reply came after {took:?}");
    s.check(took <= Duration::from_secs(1), || {
        format!("the timeout reply came after {took:?} (bound: 1 s)")
    });
    s.wait_until("one worker is replaced", EVENTUALLY, |s| {
        let now = s.workers();
        now.len() == 4 && before.iter().filter(|p| !now.contains(p)).count() == 1
    });
    s.wait_pool(4, EVENTUALLY);
    let now = s.workers();
    let gone: Vec<_> = before.iter().filter(|p| !now.contains(p)).collect();
    let new: Vec<_> = now.iter().filter(|p| !before.contains(p)).collect();
    s.check(gone.len() == 1 && new.len() == 1, || {
        format!("expected exactly one worker replaced: before {before:?}, after {now:?}")
    });
    let st = s.stats();
    s.check(st["totals"]["timeouts"] == 1, || {
        format!("expected 1 timeout: {st}")
    });
    let got = s.ask_text(b"11");
    s.check(got == "121", || format!("after the timeout: 11 -> {got:?}"));
}

#[test]
fn a_crash_request_gets_worker_crashed_with_fault_injection() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4", "--enable-fault-injection"]);
    let c = s.client();
    c.send(br#"{"op":"crash","id":"boom"}"#);
    let reply = c.recv(Duration::from_secs(5));
    s.check(
        reply.as_ref().is_some_and(|r| r.json()["ok"] == false),
        || format!("crash with fault injection: expected ok:false, got {reply:?}"),
    );
    let reply = reply.expect("checked");
    s.check(
        reply.error().as_deref() == Some("worker_crashed") && reply.raw("id").as_deref() == Some("\"boom\""),
        || format!("crash: expected worker_crashed with id \"boom\" (the re-dispatch crashes too), got {reply:?}"),
    );
    s.wait_pool(4, EVENTUALLY);
    let st = s.stats();
    s.check(
        st["totals"]["crashes"] == 2 && st["totals"]["redispatched"] == 1,
        || format!("expected 2 crashes and 1 re-dispatch: {st}"),
    );
    let got = s.ask_text(b"13");
    s.check(got == "169", || format!("after the crash: 13 -> {got:?}"));
}

/// Every line the master and its workers log names its UTC time, its
/// writer's PID and its level, so an operator can tell them apart: the
/// master's `listening on` carries the master's PID, a crashing worker's
/// warning its own.
#[test]
fn every_log_line_names_its_time_pid_and_level() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "2", "--enable-fault-injection"]);
    let c = s.client();
    c.send(br#"{"op":"crash","id":1}"#);
    let reply = c.recv(Duration::from_secs(5));
    s.check(
        reply.as_ref().and_then(|r| r.error()).as_deref() == Some("worker_crashed"),
        || format!("crash: expected worker_crashed, got {reply:?}"),
    );
    // The crash and its re-dispatch: two workers warn before aborting.
    s.wait_until("two workers warned `crash requested`", EVENTUALLY, |s| {
        s.log().matches("crash requested").count() == 2
    });
    let log = s.log();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| LogLine::parse(l).is_none())
        .collect();
    s.check(bad.is_empty(), || {
        format!("lines not in the `[time] [pid] [LEVEL] target: message` format: {bad:?}")
    });
    let lines: Vec<LogLine> = log.lines().filter_map(LogLine::parse).collect();
    let master = s.pid();
    let listening = lines.iter().find(|l| l.message.starts_with("listening on"));
    s.check(
        listening.is_some_and(|l| l.pid == master && l.level == "INFO"),
        || format!("expected `listening on` at INFO with the master's pid {master}: {listening:?}"),
    );
    let crashes: Vec<&LogLine> = lines
        .iter()
        .filter(|l| l.message.contains("crash requested"))
        .collect();
    s.check(
        crashes.len() == 2
            && crashes[0].pid != crashes[1].pid
            && crashes
                .iter()
                .all(|l| l.pid != master && l.level == "WARN" && l.target.starts_with("worker")),
        || format!("expected two WARN lines from two workers (not {master}): {crashes:?}"),
    );
}

#[test]
fn a_crash_request_is_disabled_without_fault_injection() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    let before = s.workers();
    let workers = s.worker_pids();
    let reply = s.ask(r#"{"op":"crash","id":3}"#);
    s.check(
        reply.error().as_deref() == Some("disabled")
            && reply.raw("id").as_deref() == Some("3")
            && reply.worker_pid().is_some_and(|p| workers.contains(&p)),
        || format!("crash without --enable-fault-injection: expected `disabled` from a worker, got {reply:?}"),
    );
    let after = s.workers();
    s.check(after == before, || {
        format!("workers changed after a disabled crash: {before:?} -> {after:?}")
    });
}

#[test]
fn stats_answers_within_300_ms_while_every_worker_sleeps() {
    let _g = harness::exclusive();
    let s = Server::start(&["--enable-fault-injection", "--workers", "4"]);
    let sleeper = s.client();
    for i in 0..4 {
        sleeper.send(format!(r#"{{"op":"sleep","ms":2000,"id":{i}}}"#).as_bytes());
    }
    // Let the workers fall asleep.
    std::thread::sleep(Duration::from_millis(100));
    let c = s.client();
    let sent = Instant::now();
    c.send(br#"{"op":"stats","id":"st"}"#);
    let reply = c.recv(Duration::from_secs(3));
    let took = sent.elapsed();
    s.check(reply.as_ref().is_some_and(Reply::is_ok), || {
        format!("stats while the workers sleep: got {reply:?} after {took:?}")
    });
    eprintln!("stats answered in {took:?} while every worker slept");
    s.check(took <= Duration::from_millis(300), || {
        format!("stats took {took:?} while every worker slept (bound: 300 ms)")
    });
    let st = reply.expect("checked").json();
    let busy = st["workers"].as_array().map_or(0, |w| {
        w.iter()
            .filter(|w| w["state"] == "busy" && w["in_flight"] == 1)
            .count()
    });
    s.check(busy == 4, || {
        format!("stats should show 4 busy workers holding one sleep each: {st}")
    });
    let mut answered = 0;
    while answered < 4 {
        let Some(r) = sleeper.recv(Duration::from_secs(5)) else {
            s.fail(&format!("only {answered} of the 4 sleeps were answered"));
        };
        s.check(r.is_ok(), || format!("a sleep got {r:?}"));
        answered += 1;
    }
}

#[test]
fn a_worker_that_cannot_start_stops_the_master_with_one_clear_line() {
    let _g = harness::shared();
    let s = Server::launch(&["--worker-path", "/bin/false"]);
    let status = s.wait_exit(Duration::from_secs(10));
    s.check(status.is_some_and(|st| !st.success()), || {
        format!("--worker-path /bin/false: expected a non-zero exit within 10 s, got {status:?}")
    });
    let log = s.log();
    let fatal: Vec<&str> = log.lines().filter(|l| l.starts_with("master: ")).collect();
    s.check(fatal.len() == 1 && fatal[0].contains("/bin/false"), || {
        format!("expected one `master: ...` line naming /bin/false, got {fatal:?}")
    });
    let left: Vec<Proc> = group_members(s.pid());
    s.check(left.is_empty(), || {
        format!("processes left in the master's group: {left:?}")
    });
}

/// One flooding socket's tally.
#[derive(Debug, Default)]
struct Flood {
    sent: u64,
    ok: u64,
    busy: u64,
    other: u64,
}

/// Sends up to `count` sleep-1ms requests as fast as it can for at most
/// `for_at_most`, reading replies as they come, then waits up to 1 s for
/// the last ones.
fn flood(server: std::net::SocketAddr, count: u64, for_at_most: Duration) -> Flood {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(server).expect("connect");
    socket.set_nonblocking(true).expect("nonblocking");
    let mut tally = Flood::default();
    let mut buf = vec![0u8; 2048];
    let mut take = |tally: &mut Flood| -> bool {
        match socket.recv(&mut buf) {
            Ok(n) => {
                match Reply(buf[..n].to_vec()).error().as_deref() {
                    None => tally.ok += 1,
                    Some("busy") => tally.busy += 1,
                    Some(_) => tally.other += 1,
                }
                true
            }
            Err(_) => false,
        }
    };
    let started = Instant::now();
    while tally.sent < count && started.elapsed() < for_at_most {
        let req = format!(r#"{{"op":"sleep","ms":1,"id":{}}}"#, tally.sent);
        if socket.send(req.as_bytes()).is_ok() {
            tally.sent += 1;
        }
        while take(&mut tally) {}
    }
    let mut quiet_since = Instant::now();
    let drain_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < drain_until && quiet_since.elapsed() < Duration::from_millis(300) {
        if take(&mut tally) {
            quiet_since = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    tally
}

#[test]
fn a_flood_gets_busy_replies_in_bounded_memory_then_normal_service() {
    const RSS_BOUND_KIB: u64 = 64 * 1024;
    let _g = harness::exclusive();
    let s = Server::start(&[
        "--enable-fault-injection",
        "--workers",
        "2",
        "--max-inflight",
        "4",
    ]);
    let master = s.pid();
    let rss_before = rss_kib(master).unwrap_or(0);
    let addr = s.addr();
    let flooders: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || flood(addr, 5000, Duration::from_secs(2))))
        .collect();
    let mut rss_max = rss_before;
    while !flooders.iter().all(|f| f.is_finished()) {
        rss_max = rss_max.max(rss_kib(master).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    let tallies: Vec<Flood> = flooders
        .into_iter()
        .map(|f| f.join().expect("a flood thread panicked"))
        .collect();
    let sum = |f: fn(&Flood) -> u64| tallies.iter().map(f).sum::<u64>();
    let (sent, ok, busy, other) = (
        sum(|t| t.sent),
        sum(|t| t.ok),
        sum(|t| t.busy),
        sum(|t| t.other),
    );
    let rss_after = rss_kib(master).unwrap_or(0);
    eprintln!(
        "flood: {sent} sent, {ok} ok, {busy} busy, {other} other; master VmRSS {rss_before} KiB before, \
         {rss_max} KiB at most, {rss_after} KiB after"
    );
    s.check(busy > 0 && ok > 0, || {
        format!("flood of {sent}: expected some ok and some busy replies, got {ok} ok, {busy} busy, {other} other")
    });
    s.check(other == 0, || {
        format!("flood: {other} replies were neither ok nor busy")
    });
    s.check(rss_max < RSS_BOUND_KIB && rss_after < RSS_BOUND_KIB, || {
        format!(
            "master VmRSS reached {rss_max} KiB ({rss_after} KiB after; bound {RSS_BOUND_KIB} KiB)"
        )
    });
    // Normal service afterwards.
    let reply = s.ask(r#"{"op":"square","n":12,"id":"after"}"#);
    s.check(
        reply.is_ok() && reply.raw("result").as_deref() == Some("144"),
        || format!("after the flood: {reply:?}"),
    );
    s.wait_pool(2, EVENTUALLY);
    let st = s.stats();
    s.check(st["totals"]["busy"].as_u64() >= Some(busy), || {
        format!("stats counts fewer busy replies than the {busy} received: {st}")
    });
}

#[test]
fn stats_reports_the_pool_its_workers_and_totals() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "3", "--max-inflight", "7"]);
    let workers = s.worker_pids();
    for i in 0..10 {
        let got = s.ask_text(i.to_string().as_bytes());
        s.check(got == (i * i).to_string(), || format!("{i} -> {got:?}"));
    }
    let bad = s.ask(r#"{"op":"nope","id":1}"#);
    s.check(bad.error().as_deref() == Some("unknown_op"), || {
        format!("{bad:?}")
    });
    // A worker replies to the client before it reports the completion to
    // the master: the counters catch up a moment later.
    s.wait_until("stats counts the 11 requests done", EVENTUALLY, |s| {
        let st = s.stats();
        st["workers"].as_array().is_some_and(|w| {
            w.iter().all(|w| w["in_flight"] == 0)
                && w.iter().filter_map(|w| w["served"].as_u64()).sum::<u64>() == 11
        })
    });
    let reply = s.ask(r#"{"op":"stats","id":"st"}"#);
    let st = reply.json();
    s.check(reply.raw("id").as_deref() == Some("\"st\""), || {
        format!("stats id: {reply:?}")
    });
    s.check(
        st["op"] == "stats" && st["master_pid"] == s.pid() && st["uptime_s"].is_number(),
        || {
            format!(
                "stats: op, master_pid {} and uptime_s expected: {st}",
                s.pid()
            )
        },
    );
    s.check(
        st["pool"]["target"] == 3 && st["pool"]["active"] == 3 && st["pool"]["max_inflight"] == 7,
        || format!("stats pool: expected target 3, active 3, max_inflight 7: {st}"),
    );
    let listed: BTreeSet<u32> = st["workers"]
        .as_array()
        .map(|w| {
            w.iter()
                .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default();
    s.check(listed == workers.iter().copied().collect(), || {
        format!("stats lists workers {listed:?}, the master's children are {workers:?}")
    });
    let fields_ok = st["workers"].as_array().is_some_and(|w| {
        w.iter().all(|w| {
            w["age_s"].is_number()
                && w["served"].is_u64()
                && w["in_flight"] == 0
                && w["state"] == "idle"
        })
    });
    s.check(fields_ok, || {
        format!("stats workers: age_s, served, in_flight 0, state idle: {st}")
    });
    let served: u64 = st["workers"]
        .as_array()
        .map_or(0, |w| w.iter().filter_map(|w| w["served"].as_u64()).sum());
    let t = &st["totals"];
    s.check(
        // `ok` and `answered` count the harness's own stats requests too.
        served == 11
            && t["ok"].as_u64() >= Some(10)
            && t["errors"]["unknown_op"] == 1
            && t["answered"].as_u64() == t["ok"].as_u64().map(|ok| ok + 1)
            && t["received"].as_u64() > t["answered"].as_u64()
            && t["crashes"] == 0
            && t["timeouts"] == 0
            && t["busy"] == 0,
        || format!("stats after 10 squares and 1 unknown op: {st}"),
    );
    for key in [
        "restarts",
        "redispatched",
        "journal_written",
        "journal_shed",
    ] {
        s.check(t[key].is_u64(), || {
            format!("stats totals lacks {key}: {st}")
        });
    }
}

#[test]
fn busy_is_answered_at_once_when_every_worker_is_full() {
    let _g = harness::shared();
    let s = Server::start(&[
        "--enable-fault-injection",
        "--workers",
        "1",
        "--max-inflight",
        "1",
    ]);
    let c = s.client();
    c.send(br#"{"op":"sleep","ms":1500,"id":"slow"}"#);
    s.wait_until("the sleep is in flight", EVENTUALLY, |s| {
        s.stats()["workers"][0]["in_flight"] == 1
    });
    c.send(br#"{"op":"square","n":5,"id":"fast"}"#);
    c.send(b"6");
    // Both come back busy before the sleep ends: `busy` does not queue.
    let first = c.recv(Duration::from_secs(5));
    s.check(
        first.as_ref().and_then(Reply::error).as_deref() == Some("busy")
            && first.as_ref().and_then(|r| r.raw("id")).as_deref() == Some("\"fast\""),
        || format!("a square while the only worker is full: expected busy with id \"fast\" first, got {first:?}"),
    );
    let second = c.recv(Duration::from_secs(5)).map(|r| r.text());
    s.check(
        second.as_deref().is_some_and(|t| t.starts_with("error: busy: ")),
        || format!("a text square while the only worker is full: expected `error: busy: ...`, got {second:?}"),
    );
    let third = c.recv(Duration::from_secs(5));
    s.check(
        third.as_ref().is_some_and(Reply::is_ok)
            && third.as_ref().and_then(|r| r.raw("id")).as_deref() == Some("\"slow\""),
        || format!("the sleep: expected ok with id \"slow\", got {third:?}"),
    );
    // The worker replies before it reports the completion: wait for that.
    s.wait_until("the worker is idle", EVENTUALLY, |s| {
        s.stats()["workers"][0]["in_flight"] == 0
    });
    let got = s.ask_text(b"7");
    s.check(got == "49", || format!("after busy: 7 -> {got:?}"));
}

/// A stream of squares and 2 ms sleeps.
fn mixed_stream(n: usize) -> (Vec<Option<String>>, Vec<String>) {
    let numbers: Vec<Option<String>> = (0..n)
        .map(|i| (i % 5 != 0).then(|| format!("{}{i:015}", 777u64)))
        .collect();
    let requests = numbers
        .iter()
        .map(|n| match n {
            Some(n) => format!(r#"{{"op":"square","n":{n}}}"#),
            None => r#"{"op":"sleep","ms":2}"#.to_owned(),
        })
        .collect();
    (numbers, requests)
}

#[test]
fn kills_hup_ttin_and_ttou_together_lose_no_request() {
    let _g = harness::exclusive();
    let s = Server::start(&["--enable-fault-injection", "--workers", "4"]);
    let (numbers, requests) = mixed_stream(5000);
    let stop = Arc::new(AtomicBool::new(false));
    let master = s.pid();
    let chaos = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(master));
            let signals = [Signal::SIGHUP, Signal::SIGTTIN, Signal::SIGTTOU];
            let started = Instant::now();
            let mut kills = 0;
            // Bounded: at most 200 rounds, at most 20 s.
            for round in 0..200 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(20) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(35));
                if round % 2 == 0 {
                    let workers = children_of(master);
                    if !workers.is_empty() {
                        let victim = workers[(rng.next() % workers.len() as u64) as usize];
                        kills += usize::from(
                            kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).is_ok(),
                        );
                    }
                } else {
                    let _ = kill(Pid::from_raw(master as i32), signals[(round / 2) % 3]);
                }
            }
            kills
        })
    };
    let load = Load {
        window: 32,
        pace: Some(Duration::from_micros(300)),
        ..Load::default()
    };
    let got = s.client().many(&requests, &load);
    stop.store(true, Ordering::Relaxed);
    let kills = chaos.join().expect("the chaos thread panicked");
    let missing = got.missing();
    s.check(missing.is_empty() && got.resent == 0, || {
        format!(
            "{kills} kills with HUP/TTIN/TTOU: {} of 5000 unanswered, {} resent",
            missing.len(),
            got.resent
        )
    });
    for (i, n) in numbers.iter().enumerate() {
        let reply = got.replies[i].as_ref().expect("checked");
        let right = match n {
            _ if reply.error().as_deref() == Some("worker_crashed") => true,
            Some(n) => reply.is_ok() && reply.raw("result") == Some(square_of(n)),
            None => reply.is_ok() && reply.json()["op"] == "sleep",
        };
        s.check(right, || {
            format!("request {i} ({}): got {reply:?}", requests[i])
        });
    }
    let target = s.stats()["pool"]["target"].as_u64().unwrap_or(0) as usize;
    s.check(target >= 1, || format!("pool target {target}"));
    s.wait_pool(target, EVENTUALLY);
}

/// A worker build that stops booting (here: `--worker-path` is a script
/// that execs the real worker, then is switched to `exit 3`) is a crash
/// loop: the master logs it, backs off exponentially instead of spinning,
/// keeps serving with the workers still alive, and fills the pool again
/// once workers boot again.
#[test]
fn a_crash_loop_backs_off_and_the_pool_recovers() {
    use std::os::unix::fs::PermissionsExt;
    let _g = harness::exclusive();
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("worker.sh");
    let write_script = |body: &str| {
        // Written aside and renamed, so a starting worker never sees half a file.
        let tmp = dir.path().join("worker.sh.new");
        std::fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &script).expect("rename script");
    };
    let real = harness::bin("worker");
    write_script(&format!("exec '{}' \"$@\"", real.display()));
    let s = Server::start(&["--workers", "3", "--worker-path", script.to_str().unwrap()]);
    s.wait_pool(3, EVENTUALLY);

    write_script("exit 3");
    let victim = s.worker_pids()[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill a worker");
    s.wait_until("the master reports a crash loop", EVENTUALLY, |s| {
        s.log().contains("crash loop")
    });
    // Backing off, not spinning: a few failed starts, not hundreds.
    std::thread::sleep(Duration::from_millis(1500));
    let failed = s.log().matches("failed to boot").count();
    s.check((6..=40).contains(&failed), || {
        format!("expected a handful of failed starts while backing off, saw {failed}")
    });
    // The two survivors still serve.
    let r = s.ask(r#"{"op":"square","n":12,"id":"during-loop"}"#);
    s.check(
        r.is_ok() && r.raw("result").as_deref() == Some("144"),
        || format!("a square during the crash loop: {}", r.text()),
    );

    write_script(&format!("exec '{}' \"$@\"", real.display()));
    s.wait_pool(3, Duration::from_secs(20));
}
