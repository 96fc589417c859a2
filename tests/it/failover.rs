//! Issue 10 item 4, the client side: `client` and `loadgen` given several
//! `--server`s retry a silent one with the same datagram from the same
//! socket, fail over on a timeout, at once on a port unreachable or a
//! `busy` reply, say which server answered, and lose nothing when one of
//! two servers is killed under load.
//!
//! A "dead" server is a closed loopback port (bound, then released); a
//! "silent" one is a socket this test holds and never answers from.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, bin, describe, run_with_deadline, unused_udp_port, Server};

/// How long one `client` command may run.
const COMMAND_DEADLINE: Duration = Duration::from_secs(15);

/// Runs `client` with `args`; returns its output, how long it took, and the
/// command (for messages).
fn client(args: &[&str]) -> (Output, Duration, Command) {
    let mut cmd = Command::new(bin("client"));
    cmd.args(args);
    let started = Instant::now();
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    let took = started.elapsed();
    assert!(
        in_time,
        "client ran over {COMMAND_DEADLINE:?}\n{}",
        describe(&cmd, &out)
    );
    (out, took, cmd)
}

/// The `--json` reply `client` printed, with its `server` field.
fn json_reply(out: &Output, cmd: &Command) -> Value {
    serde_json::from_slice(out.stdout.trim_ascii_end())
        .unwrap_or_else(|e| panic!("not one JSON reply ({e})\n{}", describe(cmd, out)))
}

fn closed_port() -> String {
    format!("127.0.0.1:{}", unused_udp_port())
}

#[test]
fn the_client_says_which_server_answered_and_fails_over_when_it_dies() {
    let _g = harness::shared();
    let a = Server::start(&["--workers", "1"]);
    let b = Server::start(&["--workers", "1"]);
    let (sa, sb) = (a.addr().to_string(), b.addr().to_string());
    let both = ["--server", &sa, "--server", &sb, "--timeout-ms", "1000"];

    let (out, _, cmd) = client(&[&both[..], &["--json", "square", "12"]].concat());
    let v = json_reply(&out, &cmd);
    a.check(
        out.status.success() && v["result"] == 144 && v["server"] == sa.as_str(),
        || format!("expected 144 from A {sa}\n{}", describe(&cmd, &out)),
    );
    let (out, _, cmd) = client(&[&both[..], &["square", "12"]].concat());
    let line = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
    let worker = a.worker_pids()[0];
    a.check(line == format!("144  (worker {worker} at {sa})"), || {
        format!(
            "expected `144  (worker {worker} at {sa})`\n{}",
            describe(&cmd, &out)
        )
    });

    // Round robin over client processes: process i starts at server i mod 2.
    let (out, _, cmd) = client(
        &[
            &both[..],
            &["--policy", "round-robin", "--processes", "2", "square", "3"],
        ]
        .concat(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut at: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.rsplit(" at ").next()?.strip_suffix(')'))
        .collect();
    at.sort_unstable();
    let mut want = vec![sa.as_str(), sb.as_str()];
    want.sort_unstable();
    a.check(out.status.success() && at == want, || {
        format!(
            "expected one answer from each server\n{}",
            describe(&cmd, &out)
        )
    });

    // A dies (SIGKILL to its process group): the same command is answered
    // by B, at once (its port now refuses).
    drop(a);
    let (out, took, cmd) = client(&[&both[..], &["--json", "square", "12"]].concat());
    let v = json_reply(&out, &cmd);
    eprintln!("client failed over from a killed server in {took:?}");
    b.check(
        out.status.success() && v["result"] == 144 && v["server"] == sb.as_str(),
        || {
            format!(
                "expected 144 from B {sb} once A is dead\n{}",
                describe(&cmd, &out)
            )
        },
    );
    b.check(took < Duration::from_secs(5), || {
        format!("failing over from a dead server took {took:?}")
    });
}

#[test]
fn a_silent_server_is_retried_with_the_same_datagram_then_failed_over() {
    let _g = harness::shared();
    let b = Server::start(&["--workers", "1"]);
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("local_addr").to_string();
    let sb = b.addr().to_string();
    let (out, took, cmd) = client(&[
        "--server",
        &silent_addr,
        "--server",
        &sb,
        "--timeout-ms",
        "200",
        "--retries",
        "1",
        "--json",
        "square",
        "7",
    ]);
    let v = json_reply(&out, &cmd);
    eprintln!("client failed over from a silent server in {took:?} (2 attempts of 200 ms)");
    b.check(
        out.status.success() && v["result"] == 49 && v["server"] == sb.as_str(),
        || {
            format!(
                "expected 49 from B after the silent server\n{}",
                describe(&cmd, &out)
            )
        },
    );
    b.check(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        || format!("two attempts of 200 ms, then B: took {took:?}"),
    );
    // What the silent server got: the same datagram twice, from one port.
    silent.set_nonblocking(true).expect("nonblocking");
    let mut got: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = silent.recv_from(&mut buf) {
        got.push((buf[..n].to_vec(), from));
    }
    b.check(got.len() == 2 && got[0] == got[1], || {
        format!("expected one datagram and its identical retry from one address: {got:?}")
    });
}

#[test]
fn a_closed_port_fails_over_at_once() {
    let _g = harness::exclusive();
    let b = Server::start(&["--workers", "1"]);
    let sb = b.addr().to_string();
    let dead = closed_port();
    let (out, took, cmd) = client(&[
        "--server",
        &dead,
        "--server",
        &sb,
        "--timeout-ms",
        "3000",
        "--json",
        "hello",
    ]);
    let v = json_reply(&out, &cmd);
    eprintln!("client failed over from a closed port in {took:?} (timeout 3000 ms)");
    b.check(
        out.status.success() && v["ok"] == true && v["server"] == sb.as_str(),
        || format!("expected a greeting from B\n{}", describe(&cmd, &out)),
    );
    b.check(took < Duration::from_millis(1000), || {
        format!("a port unreachable should fail over at once: took {took:?} (timeout 3000 ms)")
    });
}

#[test]
fn a_busy_server_is_left_at_once_and_total_failure_names_every_server() {
    let _g = harness::exclusive();
    let full = Server::start(&[
        "--workers",
        "1",
        "--max-inflight",
        "1",
        "--enable-fault-injection",
    ]);
    let b = Server::start(&["--workers", "1"]);
    let (sfull, sb) = (full.addr().to_string(), b.addr().to_string());
    // Keep the one worker busy for 3 s.
    let sleeper = full.client();
    sleeper.send(br#"{"op":"sleep","ms":3000,"id":"sleeper"}"#);
    full.wait_until("the worker holds the sleep", Duration::from_secs(2), |s| {
        s.stats()["workers"][0]["in_flight"] == 1
    });

    let (out, took, cmd) = client(&[
        "--server",
        &sfull,
        "--server",
        &sb,
        "--timeout-ms",
        "2500",
        "--json",
        "square",
        "5",
    ]);
    let v = json_reply(&out, &cmd);
    eprintln!("client moved on from a busy server in {took:?} (timeout 2500 ms)");
    b.check(
        out.status.success() && v["result"] == 25 && v["server"] == sb.as_str(),
        || {
            format!(
                "expected 25 from B, the first server being busy\n{}",
                describe(&cmd, &out)
            )
        },
    );
    b.check(took < Duration::from_millis(1000), || {
        format!("a busy reply should fail over at once: took {took:?}")
    });

    // Nothing answers: a refused port, then the busy server. One line on
    // stderr names both and why, exit status 2.
    let dead = closed_port();
    let (out, _, cmd) = client(&[
        "--server",
        &dead,
        "--server",
        &sfull,
        "--timeout-ms",
        "2500",
        "square",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    full.check(
        out.status.code() == Some(2)
            && out.stdout.is_empty()
            && lines.len() == 1
            && lines[0].contains(&format!("{dead} refused"))
            && lines[0].contains(&format!("{sfull} busy")),
        || {
            format!(
                "expected exit 2 and one line naming {dead} refused and {sfull} busy\n{}",
                describe(&cmd, &out)
            )
        },
    );
}

#[test]
fn loadgen_loses_nothing_when_one_of_two_servers_is_killed() {
    let _g = harness::exclusive();
    let a = Server::start(&["--workers", "2"]);
    let b = Server::start(&["--workers", "2"]);
    let (sa, sb) = (a.addr().to_string(), b.addr().to_string());
    let mut cmd = Command::new(bin("loadgen"));
    cmd.args([
        "--server",
        &sa,
        "--server",
        &sb,
        "--policy",
        "round-robin",
        "--sockets",
        "2",
        "--window",
        "8",
        "--duration",
        "3",
        "--timeout-ms",
        "500",
        "--json",
        "--quiet",
    ]);
    // A is killed (SIGKILL to its process group) a second into the run.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(a);
    });
    let (out, in_time) = run_with_deadline(&mut cmd, Duration::from_secs(30));
    killer.join().expect("the killer thread");
    let report: Value = serde_json::from_slice(
        out.stdout
            .trim_ascii_end()
            .split(|&c| c == b'\n')
            .next_back()
            .unwrap_or(b""),
    )
    .unwrap_or_else(|e| panic!("no JSON report ({e})\n{}", describe(&cmd, &out)));
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    let (ra, rb) = (&report["servers"][0], &report["servers"][1]);
    eprintln!(
        "loadgen, A killed after 1 s: sent {} answered {} lost {}; A {ra}; B {rb}",
        n(&report, "sent"),
        n(&report, "answered"),
        n(&report, "lost")
    );
    // Requests in flight at A when it died time out and fail over to B with
    // the same id; those sent after it died are refused and fail over at
    // once: none is lost, and none is answered twice.
    b.check(
        in_time
            && out.status.success()
            && n(&report, "sent") > 0
            && n(&report, "lost") == 0
            && n(&report, "answered") == n(&report, "sent")
            && n(&report, "duplicates") == 0
            && n(&report, "wrong") == 0
            && ra["server"] == sa.as_str()
            && rb["server"] == sb.as_str()
            && n(ra, "answered") > 0
            && n(rb, "answered") > 0
            && n(ra, "failed_over") > 0
            && n(ra, "lost") == 0
            && n(rb, "lost") == 0
            && n(ra, "answered") + n(rb, "answered") == n(&report, "answered"),
        || {
            format!(
                "expected no loss and per-server counts\n{}",
                describe(&cmd, &out)
            )
        },
    );
}
