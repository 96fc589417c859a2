//! Issue 2's acceptance: a pool of four workers answers both dialects
//! exactly, every bad input gets its error reply and the pool survives it,
//! IPv6 and inline mode work, and so do the `client` binary, a `worker` run
//! by hand, and the lecture's own Python clients.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use num_bigint::BigInt;

use crate::harness::{self, bin, describe, run_with_deadline, square_of, Load, Reply, Server};

/// How long a one-shot command (`client`, `worker`, a failing `master`) may run.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);

fn set<T: Ord + Copy>(items: &[T]) -> BTreeSet<T> {
    items.iter().copied().collect()
}

/// A 40-digit integer, different for each `i`.
fn forty_digits(i: usize) -> String {
    format!("{}{:030}", 1_000_000_007 + i * 7919, i * 104_729 + 3)
}

/// 200 integers: small (negative too), 40 digits, above 2^64, negative
/// 40 digits, near u64::MAX.
fn test_numbers() -> Vec<String> {
    let two_64: BigInt = BigInt::from(u64::MAX) + 1;
    (0..200)
        .map(|i| match i % 5 {
            0 => (i as i64 - 100).to_string(),
            1 => forty_digits(i),
            2 => (&two_64 + BigInt::from(i * i * 12_345)).to_string(),
            3 => format!("-{}", forty_digits(i)),
            _ => (u64::MAX - i as u64).to_string(),
        })
        .collect()
}

/// Checks that `reply` is `ok:true` for `op` and came from one of `workers`.
#[track_caller]
fn check_ok(s: &Server, what: &str, reply: &Reply, op: &str, workers: &[u32]) {
    let v = reply.json();
    s.check(v["ok"] == true && v["op"] == op, || {
        format!("{what}: expected ok:true op {op}, got {reply:?}")
    });
    let pid = reply.worker_pid();
    s.check(pid.is_some_and(|p| workers.contains(&p)), || {
        format!(
            "{what}: worker_pid {pid:?} is not one of the master's children {workers:?}: {reply:?}"
        )
    });
}

#[test]
fn json_squares_are_exact_and_come_from_the_four_workers() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    let workers = s.worker_pids();
    s.check(workers.len() == 4, || {
        format!("expected 4 children of the master, found {workers:?}")
    });
    let numbers = test_numbers();
    let requests: Vec<String> = numbers
        .iter()
        .map(|n| format!(r#"{{"op":"square","n":{n}}}"#))
        .collect();
    let got = s.client().many(&requests, &Load::default());
    let missing = got.missing();
    s.check(missing.is_empty() && got.resent == 0, || {
        format!(
            "{} of 200 squares unanswered (first: {:?}), {} resent",
            missing.len(),
            missing.first().map(|&i| &requests[i]),
            got.resent
        )
    });
    let mut seen = BTreeSet::new();
    for (i, n) in numbers.iter().enumerate() {
        let reply = got.replies[i].clone().expect("checked above");
        check_ok(&s, &requests[i], &reply, "square", &workers);
        let want = square_of(n);
        let result = reply.raw("result");
        s.check(result.as_deref() == Some(want.as_str()), || {
            format!("square of {n}: expected {want}, got {reply:?}")
        });
        let id = reply.raw("id");
        s.check(id == Some(got.ids[i].to_string()), || {
            format!("request {i} had id {}, the reply {reply:?}", got.ids[i])
        });
        seen.insert(reply.worker_pid().expect("checked"));
    }
    s.check(seen == set(&workers), || {
        format!("replies came from {seen:?}; the master's children are {workers:?}")
    });
}

#[test]
fn ids_are_echoed_verbatim() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    let ids = [
        "7",
        "-3",
        "\"abc\"",
        "\"\"",
        "null",
        "true",
        "123456789012345678901234567890",
        "1.50",
        "1e3",
        "\"\\u0041\"",
    ];
    for id in ids {
        let req = format!(r#"{{"op":"square","n":3,"id":{id}}}"#);
        let reply = s.ask(&req);
        s.check(reply.raw("id").as_deref() == Some(id), || {
            format!("{req}: expected the id {id} back verbatim, got {reply:?}")
        });
        s.check(reply.raw("result").as_deref() == Some("9"), || {
            format!("{req}: expected result 9, got {reply:?}")
        });
    }
    let reply = s.ask(r#"{"op":"square","n":4}"#);
    s.check(
        reply.raw("id").is_none() && reply.raw("result").as_deref() == Some("16"),
        || format!("a request without id: expected result 16 and no id, got {reply:?}"),
    );
}

#[test]
fn text_squares_and_greetings_name_a_worker() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    let workers = s.worker_pids();
    let big = forty_digits(1);
    let cases: Vec<(String, String)> = vec![
        ("7".into(), "49".into()),
        ("-12".into(), "144".into()),
        ("1.5".into(), "2.25".into()),
        ("+5".into(), "25".into()),
        (" 7\n".into(), "49".into()),
        ("2.0".into(), "4.0".into()),
        (
            "12345678901234567890".into(),
            square_of("12345678901234567890"),
        ),
        (big.clone(), square_of(&big)),
        (format!("-{big}"), square_of(&big)),
    ];
    for (text, want) in &cases {
        let got = s.ask_text(text.as_bytes());
        s.check(&got == want, || {
            format!("text {text:?}: expected {want:?}, got {got:?}")
        });
    }

    // Decimals in JSON too: squared as f64, shortest round-trip form.
    for (n, want) in [
        ("1.5", "2.25"),
        ("-12", "144"),
        ("2.0", "4.0"),
        ("1e3", "1000000.0"),
    ] {
        let reply = s.ask(&format!(r#"{{"op":"square","n":{n},"id":"d"}}"#));
        s.check(reply.raw("result").as_deref() == Some(want), || {
            format!("JSON square of {n}: expected {want}, got {reply:?}")
        });
    }

    // The lecture's greeting names the client's address and a worker.
    let c = s.client();
    let port = c.local_addr().port();
    let got = c
        .request(b"Hi server!", Duration::from_secs(3), 3)
        .map(|r| r.text());
    let prefix = format!("Hi 127.0.0.1:{port}. This is server ");
    let pid = got
        .as_deref()
        .and_then(|g| g.strip_prefix(&prefix))
        .and_then(|p| p.parse::<u32>().ok());
    s.check(pid.is_some_and(|p| workers.contains(&p)), || {
        format!("greeting: expected {prefix:?} and one of {workers:?}, got {got:?}")
    });

    // The JSON hello: the same greeting, the client's pid echoed.
    let reply = c
        .request(
            br#"{"op":"hello","pid":4242,"id":"h"}"#,
            Duration::from_secs(3),
            3,
        )
        .unwrap_or_else(|| s.fail("no reply to the JSON hello"));
    check_ok(&s, "JSON hello", &reply, "hello", &workers);
    let v = reply.json();
    let wp = reply.worker_pid().expect("checked");
    s.check(
        v["message"] == format!("{prefix}{wp}") && v["client_pid"] == 4242 && v["id"] == "h",
        || format!("JSON hello: expected message {prefix}{wp}, client_pid 4242, id \"h\"; got {reply:?}"),
    );
}

#[test]
fn bad_inputs_get_error_replies_and_the_same_workers_keep_serving() {
    let _g = harness::shared();
    let s = Server::start(&[
        "--enable-fault-injection",
        "--workers",
        "4",
        "--max-datagram",
        "65507",
    ]);
    let before = s.workers();
    let workers = s.worker_pids();
    s.check(before.len() == 4, || {
        format!("expected 4 workers, found {before:?}")
    });

    let huge = "9".repeat(40_000);
    let json_cases: Vec<(String, &str, Option<&str>)> = vec![
        (r#"{"op":"square","n":2"#.into(), "bad_request", None),
        (
            r#"{"op":"square","n":2} trailing"#.into(),
            "bad_request",
            None,
        ),
        (r#"{"op":"square","id":1}"#.into(), "bad_request", Some("1")),
        (
            r#"{"op":"square","n":"7","id":2}"#.into(),
            "bad_request",
            Some("2"),
        ),
        (
            r#"{"op":"square","n":[7],"id":3}"#.into(),
            "bad_request",
            Some("3"),
        ),
        (r#"{"n":5,"id":4}"#.into(), "bad_request", Some("4")),
        (r#"{"op":5,"id":5}"#.into(), "bad_request", Some("5")),
        (
            r#"{"op":"cube","n":2,"id":6}"#.into(),
            "unknown_op",
            Some("6"),
        ),
        (
            r#"{"op":"hello","pid":-1,"id":7}"#.into(),
            "bad_request",
            Some("7"),
        ),
        (
            r#"{"op":"sleep","ms":20000,"id":8}"#.into(),
            "out_of_range",
            Some("8"),
        ),
        (
            r#"{"op":"sleep","ms":1.5,"id":9}"#.into(),
            "bad_request",
            Some("9"),
        ),
        (
            r#"{"op":"square","n":1e200,"id":10}"#.into(),
            "out_of_range",
            Some("10"),
        ),
        (
            r#"{"op":"square","n":2,"id":{"a":1}}"#.into(),
            "bad_request",
            None,
        ),
        (
            format!(r#"{{"op":"square","n":{huge},"id":"big"}}"#),
            "too_large",
            Some("\"big\""),
        ),
    ];
    for (req, code, id) in &json_cases {
        let c = s.client();
        let shown = if req.len() > 80 { &req[..80] } else { req };
        let Some(raw) = c.request_raw(req.as_bytes(), Duration::from_secs(3)) else {
            s.fail(&format!("no error reply to {shown}"));
        };
        let reply = Reply(raw);
        s.check(reply.error().as_deref() == Some(*code), || {
            format!("{shown}: expected error {code}, got {reply:?}")
        });
        s.check(reply.raw("id").as_deref() == *id, || {
            format!("{shown}: expected id {id:?}, got {reply:?}")
        });
        let message = reply.json()["message"].as_str().map(str::to_owned);
        s.check(message.is_some_and(|m| !m.is_empty()), || {
            format!("{shown}: the error has no message: {reply:?}")
        });
        if let Some(p) = reply.worker_pid() {
            s.check(workers.contains(&p), || {
                format!("{shown}: worker_pid {p} is not a worker ({workers:?})")
            });
        }
    }

    let text_cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe".to_vec(), "error: bad_request: "),
        (b"7\xff".to_vec(), "error: bad_request: "),
        (b"1e200".to_vec(), "error: out_of_range: "),
        (huge.clone().into_bytes(), "error: too_large: "),
    ];
    for (payload, prefix) in &text_cases {
        let shown = String::from_utf8_lossy(&payload[..payload.len().min(40)]).into_owned();
        let got = s.ask_text(payload);
        s.check(
            got.starts_with(prefix) && !got.contains('\n') && got.len() > prefix.len(),
            || format!("text {shown:?}: expected one line starting {prefix:?}, got {got:?}"),
        );
    }

    // The largest reply that fits: a text square of 65506 digits; one more does not fit.
    let nines = "9".repeat(32_753);
    let got = s.ask_text(nines.as_bytes());
    s.check(got == square_of(&nines), || {
        format!(
            "the square of 32753 nines (65506 digits) fits in a datagram, got {} bytes: {:?}",
            got.len(),
            &got[..got.len().min(80)]
        )
    });
    let got = s.ask_text("9".repeat(32_754).as_bytes());
    s.check(got.starts_with("error: too_large: "), || {
        format!(
            "the square of 32754 nines (65508 digits) does not fit, got {} bytes: {:?}",
            got.len(),
            &got[..got.len().min(80)]
        )
    });

    // The empty datagram gets no reply (as in the lecture).
    let c = s.client();
    let got = c.request_raw(b"", Duration::from_millis(300));
    s.check(got.is_none(), || {
        format!("the empty datagram got a reply: {:?}", got.map(Reply))
    });

    // The same four processes still serve, all of them.
    let after = s.workers();
    s.check(after == before, || {
        format!("workers changed after the bad inputs: {before:?} -> {after:?}")
    });
    let requests: Vec<String> = (0..40)
        .map(|i| format!(r#"{{"op":"square","n":{i}}}"#))
        .collect();
    let got = s.client().many(&requests, &Load::default());
    let mut seen = BTreeSet::new();
    for (i, r) in got.replies.iter().enumerate() {
        let ok = r
            .as_ref()
            .is_some_and(|r| r.raw("result") == Some((i * i).to_string()));
        s.check(ok, || format!("square of {i} after the bad inputs: {r:?}"));
        seen.extend(r.as_ref().and_then(Reply::worker_pid));
    }
    s.check(seen == set(&workers), || {
        format!("after the bad inputs, replies came from {seen:?}, not the workers {workers:?}")
    });
    let crashes = s.stats()["totals"]["crashes"].clone();
    s.check(crashes == 0, || format!("stats counts {crashes} crashes"));
}

#[test]
fn a_datagram_over_max_datagram_gets_too_large() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "2", "--max-datagram", "1000"]);
    let pad = "x".repeat(2000);
    let req = format!(r#"{{"op":"square","n":1,"id":77,"pad":"{pad}"}}"#);
    let c = s.client();
    let reply = c
        .request_raw(req.as_bytes(), Duration::from_secs(3))
        .map(Reply);
    s.check(
        reply.as_ref().and_then(Reply::error).as_deref() == Some("too_large"),
        || {
            format!(
                "a 2 KB JSON request over --max-datagram 1000: expected too_large, got {reply:?}"
            )
        },
    );
    let got = s.ask_text("a".repeat(1001).as_bytes());
    s.check(got.starts_with("error: too_large: "), || {
        format!("a 1001-byte text datagram: expected `error: too_large: ...`, got {got:?}")
    });
    // Exactly --max-datagram bytes is accepted: the greeting.
    let got = s.ask_text("a".repeat(1000).as_bytes());
    s.check(got.starts_with("Hi 127.0.0.1:"), || {
        format!("a 1000-byte text datagram: expected the greeting, got {got:?}")
    });
    let got = s.ask_text(b"12");
    s.check(got == "144", || format!("after too_large: 12 -> {got:?}"));
}

#[test]
fn ipv6_works() {
    let _g = harness::shared();
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this machine has no IPv6 loopback");
        return;
    }
    let s = Server::start(&["--workers", "2", "--bind", "[::1]:0"]);
    let addr = s.addr();
    s.check(addr.is_ipv6(), || format!("bound to {addr}"));
    let workers = s.worker_pids();
    let reply = s.ask(r#"{"op":"square","n":-18446744073709551616,"id":1}"#);
    check_ok(&s, "IPv6 square", &reply, "square", &workers);
    s.check(
        reply.raw("result").as_deref() == Some("340282366920938463463374607431768211456"),
        || format!("IPv6 square of -2^64: got {reply:?}"),
    );
    let c = s.client();
    let port = c.local_addr().port();
    let got = c
        .request(b"Hi server!", Duration::from_secs(3), 3)
        .map(|r| r.text());
    let prefix = format!("Hi [::1]:{port}. This is server ");
    let pid = got
        .as_deref()
        .and_then(|g| g.strip_prefix(&prefix))
        .and_then(|p| p.parse::<u32>().ok());
    s.check(pid.is_some_and(|p| workers.contains(&p)), || {
        format!("IPv6 greeting: expected {prefix:?} and one of {workers:?}, got {got:?}")
    });
}

#[test]
fn inline_mode_answers_with_the_masters_pid() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "0"]);
    let master = s.pid();
    let children = s.worker_pids();
    s.check(children.is_empty(), || {
        format!("--workers 0 started children {children:?}")
    });
    let reply = s.ask(r#"{"op":"square","n":123456789012345678901234567890,"id":"i"}"#);
    check_ok(&s, "inline square", &reply, "square", &[master]);
    s.check(
        reply.raw("result") == Some(square_of("123456789012345678901234567890")),
        || format!("inline square: got {reply:?}"),
    );
    let got = s.ask_text(b"Hi server!");
    s.check(got.ends_with(&format!(". This is server {master}")), || {
        format!("inline greeting should name the master {master}: {got:?}")
    });
    let got = s.ask_text(b"-12");
    s.check(got == "144", || format!("inline text square: {got:?}"));
    let reply = s.ask(r#"{"op":"nope","id":2}"#);
    s.check(reply.error().as_deref() == Some("unknown_op"), || {
        format!("inline unknown op: {reply:?}")
    });
}

#[test]
fn the_client_binary_asks_and_reports() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "4"]);
    let workers = s.worker_pids();
    let addr = s.addr().to_string();

    let mut cmd = Command::new(bin("client"));
    cmd.args(["--server", &addr, "square", "12"]);
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    s.check(
        in_time && out.status.success() && stdout.split_whitespace().next() == Some("144"),
        || format!("expected 144 and exit 0\n{}", describe(&cmd, &out)),
    );

    let n = "123456789012345678901234567890";
    let mut cmd = Command::new(bin("client"));
    cmd.args(["--json", "--server", &addr, "square", n]);
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    let reply = Reply(out.stdout.trim_ascii_end().to_vec());
    s.check(
        in_time && out.status.success() && reply.raw("result") == Some(square_of(n)),
        || format!("expected the exact square of {n}\n{}", describe(&cmd, &out)),
    );

    let mut cmd = Command::new(bin("client"));
    cmd.args(["--server", &addr, "--processes", "3", "hello"]);
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    let mut client_pids = BTreeSet::new();
    for line in &lines {
        // client <pid>: Hi 127.0.0.1:<port>. This is server <worker>  (worker <worker>)
        let pid = line
            .strip_prefix("client ")
            .and_then(|l| l.split(':').next())
            .and_then(|p| p.parse::<u32>().ok());
        let worker = line
            .split("This is server ")
            .nth(1)
            .and_then(|w| w.split_whitespace().next())
            .and_then(|w| w.parse::<u32>().ok());
        s.check(
            pid.is_some() && worker.is_some_and(|w| workers.contains(&w)),
            || {
                format!(
                    "unexpected line {line:?} (workers {workers:?})\n{}",
                    describe(&cmd, &out)
                )
            },
        );
        client_pids.extend(pid);
    }
    s.check(
        in_time && out.status.success() && lines.len() == 3 && client_pids.len() == 3,
        || {
            format!(
                "expected 3 lines from 3 distinct client processes\n{}",
                describe(&cmd, &out)
            )
        },
    );

    // Nothing listens: non-zero after its retries, with one clear line.
    let port = harness::unused_udp_port();
    let mut cmd = Command::new(bin("client"));
    cmd.args([
        "--server",
        &format!("127.0.0.1:{port}"),
        "--timeout-ms",
        "200",
        "--retries",
        "1",
        "hello",
    ]);
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let err_lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    s.check(
        in_time
            && !out.status.success()
            && out.stdout.is_empty()
            && err_lines.len() == 1
            && err_lines[0].starts_with("client: ")
            && err_lines[0].contains(&port.to_string()),
        || {
            format!(
                "expected a non-zero exit and one `client: ...` line naming port {port}\n{}",
                describe(&cmd, &out)
            )
        },
    );
}

#[test]
fn the_worker_run_by_hand_says_so_and_fails() {
    let _g = harness::shared();
    let mut cmd = Command::new(bin("worker"));
    cmd.env_remove("UDP_POOL_WORKER");
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        in_time
            && !out.status.success()
            && out.stdout.is_empty()
            && lines.len() == 1
            && lines[0].contains("master"),
        "expected one line naming `master` and a non-zero exit\n{}",
        describe(&cmd, &out)
    );
}

#[test]
fn a_missing_worker_executable_stops_the_master_with_one_clear_line() {
    let _g = harness::shared();
    let s = Server::launch(&["--worker-path", "/nonexistent/worker"]);
    let status = s.wait_exit(COMMAND_DEADLINE);
    s.check(status.is_some_and(|st| !st.success()), || {
        format!("expected a non-zero exit within {COMMAND_DEADLINE:?}, got {status:?}")
    });
    let log = s.log();
    let fatal: Vec<&str> = log.lines().filter(|l| l.starts_with("master: ")).collect();
    s.check(
        fatal.len() == 1 && fatal[0].contains("/nonexistent/worker"),
        || format!("expected one `master: ...` line naming /nonexistent/worker, got {fatal:?}"),
    );
}

/// A `master` copied away from its `worker` (an install that lost half of
/// itself) says where it looked and what to do, in one line.
#[test]
fn a_master_without_its_worker_says_how_to_get_one() {
    let _g = harness::shared();
    let dir = tempfile::TempDir::new().expect("temp dir");
    let master = dir.path().join("master");
    std::fs::copy(bin("master"), &master).expect("copy master");
    let mut cmd = Command::new(&master);
    cmd.args(["--bind", "127.0.0.1:0", "--journal", "none"])
        .current_dir(dir.path());
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let worker = dir.path().join("worker").display().to_string();
    assert!(
        in_time
            && !out.status.success()
            && lines.len() == 1
            && lines[0].starts_with("master: ")
            && lines[0].contains(&worker)
            && lines[0].contains("cargo build --release")
            && lines[0].contains("cargo install --path .")
            && lines[0].contains("--worker-path"),
        "expected one `master: ...` line naming {worker} and how to get a worker\n{}",
        describe(&cmd, &out)
    );
}

/// The lecture's own clients, unmodified, against a master on their
/// hard-coded address 127.0.0.1:10001.
#[test]
fn the_lectures_python_clients_get_answers() {
    let _g = harness::shared();
    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.as_ref().is_ok_and(|o| o.status.success()),
        "python3 is needed to run the lecture's clients: {python:?}"
    );
    match UdpSocket::bind("127.0.0.1:10001") {
        Ok(probe) => drop(probe),
        Err(e) => panic!(
            "UDP port 127.0.0.1:10001 is taken ({e}): the lecture's clients have that address \
             hard-coded, so this test needs it; stop whatever listens there (a master, the \
             lecture's server) and run the test again"
        ),
    }
    let s = Server::start(&["--workers", "4", "--bind", "127.0.0.1:10001"]);
    let workers = s.worker_pids();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lecture");
    let run = |s: &Server, script: &str| -> String {
        let mut cmd = Command::new("python3");
        // stdout stays block-buffered: each of the forked clients writes its
        // lines in one piece when it exits, so they do not interleave.
        cmd.arg(dir.join(script)).env_remove("PYTHONUNBUFFERED");
        let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
        s.check(in_time && out.status.success(), || {
            format!(
                "{script} did not finish cleanly within {COMMAND_DEADLINE:?}\n{}",
                describe(&cmd, &out)
            )
        });
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The PIDs named by the greetings `Hi 127.0.0.1:PORT. This is server PID` in `out`.
    let greeters = |out: &str| -> Vec<u32> {
        out.split("Hi 127.0.0.1:")
            .skip(1)
            .filter_map(|g| g.split_once(". This is server "))
            .filter_map(|(port, rest)| {
                port.parse::<u16>().ok()?;
                let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
                pid.parse().ok()
            })
            .collect()
    };

    let out = run(&s, "client.py");
    let pids = greeters(&out);
    s.check(
        out.matches("Received message from server: ").count() == 1
            && pids.len() == 1
            && workers.contains(&pids[0]),
        || format!("client.py: expected one greeting from one of {workers:?}:\n{out}"),
    );

    let out = run(&s, "multiple_clients.py");
    let pids = greeters(&out);
    s.check(
        out.matches("Received message: ").count() == 3
            && pids.len() == 3
            && pids.iter().all(|p| workers.contains(p)),
        || format!("multiple_clients.py: expected 3 greetings from {workers:?}:\n{out}"),
    );

    let out = run(&s, "square_client.py");
    let squares: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("Received square from server:  "))
        .collect();
    let want = [
        "49",
        "144",
        "2.25",
        &square_of("123456789012345678901234567890"),
    ];
    s.check(squares == want, || {
        format!("square_client.py: expected squares {want:?}:\n{out}")
    });
}
