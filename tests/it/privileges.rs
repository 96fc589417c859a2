//! Issue 9's least privilege, with the real binaries: workers run as
//! `--user` (the master binds first, so a port below 1024 works), with
//! their resource limits, and behind their seccomp filter, still answering
//! every kind of request; a root master without `--user` warns once.
//!
//! The tests that switch users need a root master. Run as another user,
//! each prints `skipped: not root` and returns.

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, Uid, User};
use tempfile::TempDir;

use crate::harness::{self, bin, describe, run_with_deadline, square_of, status_field, Server};

/// For "eventually" checks on a noisy machine.
const EVENTUALLY: Duration = Duration::from_secs(10);
/// A master that must fail at start-up.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);

/// Whether this test can run: it needs a root master. Says so when not.
fn root_or_skip(test: &str) -> bool {
    if Uid::effective().is_root() {
        return true;
    }
    println!("{test}: skipped: not root");
    eprintln!("{test}: skipped: not root");
    false
}

/// Whether every directory above `path` lets others in, and `path` lets
/// them execute it.
fn executable_by_others(path: &Path) -> bool {
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode());
    mode(path).is_ok_and(|m| m & 0o001 != 0)
        && path
            .ancestors()
            .skip(1)
            .all(|dir| mode(dir).is_ok_and(|m| m & 0o001 != 0))
}

/// A `master` whose `worker` another user can execute: the one cargo built
/// when it can, else copies of both in a directory anyone may enter (a
/// checkout under a private home directory, say).
struct Binaries {
    master: PathBuf,
    _dir: Option<TempDir>,
}

impl Binaries {
    fn for_other_users() -> Binaries {
        let (master, worker) = (bin("master"), bin("worker"));
        if executable_by_others(&worker) {
            return Binaries { master, _dir: None };
        }
        let dir = TempDir::new().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temp dir");
        for from in [&master, &worker] {
            let to = dir.path().join(from.file_name().expect("a file name"));
            std::fs::copy(from, &to).expect("copy a binary");
        }
        Binaries {
            master: dir.path().join("master"),
            _dir: Some(dir),
        }
    }
}

/// A UDP port below 1024 on 127.0.0.1 where nothing listens (bound, then
/// released), or none.
fn free_privileged_port() -> Option<u16> {
    (900..1024).find(|p| UdpSocket::bind(("127.0.0.1", *p)).is_ok())
}

/// The worker PIDs, waiting for exactly `n` of them.
#[track_caller]
fn workers(s: &Server, n: usize) -> Vec<u32> {
    s.wait_pool(n, EVENTUALLY);
    s.worker_pids()
}

/// Field `name` of `/proc/PID/status`, failing the test when it is missing.
#[track_caller]
fn field(s: &Server, pid: u32, name: &str) -> String {
    status_field(pid, name)
        .unwrap_or_else(|| s.fail(&format!("no {name} line in /proc/{pid}/status")))
}

/// `/proc/PID/limits`' soft and hard values of the limit named `name`.
#[track_caller]
fn limit(s: &Server, pid: u32, name: &str) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| s.fail(&format!("/proc/{pid}/limits: {e}")));
    let line = text
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| s.fail(&format!("no {name} in /proc/{pid}/limits:\n{text}")));
    let mut values = line[name.len()..].split_whitespace();
    let soft = values.next().unwrap_or_default().to_owned();
    let hard = values.next().unwrap_or_default().to_owned();
    (soft, hard)
}

/// Issue 9's acceptance: with `--user nobody`, every worker runs as
/// nobody (its four uids, its group, no other group), the master stays
/// root and has bound a port below 1024, and the workers serve, a
/// replacement too.
#[test]
fn workers_run_as_nobody_with_user_nobody() {
    if !root_or_skip("workers_run_as_nobody_with_user_nobody") {
        return;
    }
    let _g = harness::shared();
    let nobody = User::from_name("nobody")
        .expect("look up nobody")
        .expect("a user named nobody");
    let binaries = Binaries::for_other_users();
    let port = free_privileged_port().expect("a free UDP port below 1024");
    let bind = format!("127.0.0.1:{port}");
    let s = Server::start_binary(
        &binaries.master,
        &[
            "--bind",
            &bind,
            "--workers",
            "2",
            "--user",
            "nobody",
            "--enable-fault-injection",
        ],
    );
    s.check(s.addr().port() == port, || {
        format!("expected the master on port {port}, got {}", s.addr())
    });
    let uid = nobody.uid.to_string();
    let gid = nobody.gid.to_string();
    let four = |id: &str| [id; 4].join(" ");
    let check_nobody = |pids: &[u32]| {
        for &pid in pids {
            let (u, g, groups) = (
                field(&s, pid, "Uid"),
                field(&s, pid, "Gid"),
                field(&s, pid, "Groups"),
            );
            s.check(u == four(&uid) && g == four(&gid) && groups == gid, || {
                format!(
                    "worker {pid}: expected Uid {}, Gid {}, Groups {gid}; got Uid {u}, Gid {g}, Groups {groups}",
                    four(&uid),
                    four(&gid)
                )
            });
        }
    };
    let first = workers(&s, 2);
    check_nobody(&first);
    let master_uid = field(&s, s.pid(), "Uid");
    s.check(master_uid == four("0"), || {
        format!("the master should stay root, has Uid {master_uid}")
    });
    let reply = s.ask(r#"{"op":"square","n":12,"id":1}"#);
    s.check(reply.raw("result").as_deref() == Some("144"), || {
        format!("square as nobody: {reply:?}")
    });
    // A crash and its re-dispatch kill two workers (the master answers
    // once the second is dead); their replacements are nobody too. The
    // re-dispatch may go to the other first worker or to the first
    // replacement, whichever is less loaded, so at least one worker of
    // the pool that serves now is new.
    let crashed = s.ask(r#"{"op":"crash","id":2}"#);
    s.check(crashed.error().as_deref() == Some("worker_crashed"), || {
        format!("crash: expected worker_crashed, got {crashed:?}")
    });
    s.wait_until("a pool of two with a replacement in it", EVENTUALLY, |s| {
        let now = s.worker_pids();
        now.len() == 2 && now.iter().any(|p| !first.contains(p))
    });
    check_nobody(&workers(&s, 2));
    let log = s.log();
    s.check(!log.contains("without --user"), || {
        "a master with --user must not warn about running as root".to_owned()
    });
}

/// A `--user` or `--group` that does not exist stops the master at once
/// with one `master: ...` line naming it.
#[test]
fn a_user_or_group_that_does_not_exist_is_one_clear_line() {
    let _g = harness::shared();
    let me = User::from_uid(Uid::effective())
        .expect("look up the current user")
        .map_or_else(|| Uid::effective().to_string(), |u| u.name);
    let cases: [(&[&str], &str); 2] = [
        (
            &["--user", "no-such-user-udp-pool"],
            "master: --user no-such-user-udp-pool: no such user",
        ),
        (
            &["--user", &me, "--group", "no-such-group-udp-pool"],
            "master: --group no-such-group-udp-pool: no such group",
        ),
    ];
    for (extra, expected) in cases {
        let mut cmd = Command::new(bin("master"));
        cmd.args([
            "--bind",
            "127.0.0.1:0",
            "--journal",
            "none",
            "--workers",
            "1",
        ])
        .args(extra)
        .env_remove("RUST_LOG");
        let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            in_time && !out.status.success() && lines == [expected],
            "expected a non-zero exit and the one line {expected:?}\n{}",
            describe(&cmd, &out)
        );
    }
}

/// A root master without `--user` says once, at start, that its workers
/// run as root; replacing every worker does not repeat it.
#[test]
fn a_root_master_without_user_warns_once() {
    if !root_or_skip("a_root_master_without_user_warns_once") {
        return;
    }
    let _g = harness::shared();
    let s = Server::start(&["--workers", "1"]);
    let before = workers(&s, 1);
    s.signal(Signal::SIGHUP);
    s.wait_until("the worker replaced", EVENTUALLY, |s| {
        let now = s.worker_pids();
        now.len() == 1 && now != before
    });
    let log = s.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[WARN]") && l.contains("without --user"))
        .collect();
    s.check(
        warnings.len() == 1 && warnings[0].contains(&format!("[{}]", s.pid())),
        || format!("expected one warning from the master about --user, got {warnings:?}"),
    );
}

/// Workers start with no core dumps, 64 descriptors and the memory limit
/// (256 MiB by default, `--worker-memory-limit` MiB, 0 unlimited), soft and
/// hard; the largest square a reply holds still works within 32 MiB, and a
/// 65,000-digit number gets `too_large` from a worker that lives on.
#[test]
fn workers_get_their_resource_limits() {
    let _g = harness::shared();
    let digits = |n: usize| -> String {
        let mut s = String::from("7");
        s.extend((1..n).map(|i| char::from(b'0' + (i * 7 % 10) as u8)));
        s
    };
    let largest = digits(32_700);
    let huge = digits(65_000);
    for (memory, address_space) in [
        (None, "268435456"),
        (Some("0"), "unlimited"),
        (Some("32"), "33554432"),
    ] {
        let mut args = vec!["--workers", "1", "--max-datagram", "65507"];
        if let Some(m) = memory {
            args.extend(["--worker-memory-limit", m]);
        }
        let s = Server::start(&args);
        let pid = workers(&s, 1)[0];
        let want = |v: &str| (v.to_owned(), v.to_owned());
        for (name, expected) in [
            ("Max core file size", want("0")),
            ("Max open files", want("64")),
            ("Max address space", want(address_space)),
        ] {
            let got = limit(&s, pid, name);
            s.check(got == expected, || {
                format!("worker {pid} ({args:?}): {name} {got:?}, expected {expected:?}")
            });
        }
        let c = s.client();
        let reply = c
            .request(
                format!(r#"{{"op":"square","n":{largest},"id":1}}"#).as_bytes(),
                Duration::from_secs(10),
                1,
            )
            .unwrap_or_else(|| s.fail("no reply to the largest square"));
        s.check(
            reply.raw("result").as_deref() == Some(square_of(&largest).as_str()),
            || format!("the largest square ({args:?}): {}", &reply.text()[..80]),
        );
        let reply = c
            .request(
                format!(r#"{{"op":"square","n":{huge},"id":2}}"#).as_bytes(),
                Duration::from_secs(10),
                1,
            )
            .unwrap_or_else(|| s.fail("no reply to the 65,000-digit square"));
        s.check(reply.error().as_deref() == Some("too_large"), || {
            format!("a 65,000-digit square ({args:?}): {reply:?}")
        });
        s.check(s.worker_pids() == [pid], || {
            format!("worker {pid} did not live through the big squares ({args:?})")
        });
    }
}

/// By default a worker is filtered (`Seccomp: 2`) and still answers every
/// kind of request: both dialects, `sleep` (stopped and continued in the
/// middle, which resumes it through `restart_syscall`), `TERM`, and
/// `crash`, which still dies of `SIGABRT` and gets `worker_crashed`; a
/// worker killed by `SIGSYS` (what breaking the filter does) is handled
/// like any crash. `--no-seccomp` gives `Seccomp: 0`.
#[test]
fn filtered_workers_still_serve_and_no_seccomp_turns_the_filter_off() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "1", "--enable-fault-injection"]);
    let seccomp = |s: &Server, pid: u32, want: &str| {
        let got = field(s, pid, "Seccomp");
        s.check(got == want, || {
            format!("worker {pid}: Seccomp {got}, expected {want}")
        });
    };
    let pid = workers(&s, 1)[0];
    seccomp(&s, pid, "2");
    let square = s.ask(r#"{"op":"square","n":-18446744073709551616,"id":1}"#);
    s.check(
        square.raw("result").as_deref() == Some("340282366920938463463374607431768211456"),
        || format!("square: {square:?}"),
    );
    let hello = s.ask(r#"{"op":"hello","pid":99,"id":2}"#);
    s.check(hello.is_ok() && hello.worker_pid() == Some(pid), || {
        format!("hello: {hello:?}")
    });
    let text = s.ask_text(b"7");
    s.check(text == "49", || format!("text 7: {text:?}"));
    let text = s.ask_text(b"Hi server!");
    s.check(text.ends_with(&format!("This is server {pid}")), || {
        format!("text hello: {text:?}")
    });
    let error = s.ask(r#"{"op":"nope","id":3}"#);
    s.check(error.error().as_deref() == Some("unknown_op"), || {
        format!("unknown op: {error:?}")
    });

    // A sleep, stopped and continued twice while it runs.
    let c = s.client();
    c.send(br#"{"op":"sleep","ms":600,"id":4}"#);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(100));
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
        std::thread::sleep(Duration::from_millis(50));
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
    }
    let slept = c.recv(Duration::from_secs(5));
    s.check(
        slept
            .as_ref()
            .is_some_and(|r| r.is_ok() && r.worker_pid() == Some(pid)),
        || format!("sleep, stopped and continued: {slept:?}"),
    );

    // TERM: it answers what it holds and exits 0; the replacement is filtered.
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    s.wait_until("the worker sent TERM replaced", EVENTUALLY, |s| {
        let now = s.worker_pids();
        now.len() == 1 && now[0] != pid
    });
    s.wait_until("worker exited 0 after TERM", EVENTUALLY, |s| {
        s.log()
            .contains(&format!("worker {pid} exited: exit 0 (terminated"))
    });
    let pid = workers(&s, 1)[0];
    seccomp(&s, pid, "2");

    // crash: abort() is allowed, so it is SIGABRT, as without a filter.
    let crashed = s.ask(r#"{"op":"crash","id":5}"#);
    s.check(crashed.error().as_deref() == Some("worker_crashed"), || {
        format!("crash: expected worker_crashed, got {crashed:?}")
    });
    s.wait_until("the crash logged as SIGABRT", EVENTUALLY, |s| {
        s.log()
            .contains(&format!("worker {pid} died: signal 6 (SIGABRT) (crash"))
    });

    // What a worker that breaks its filter dies of: a crash, and replaced.
    let pid = workers(&s, 1)[0];
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSYS);
    s.wait_until("a SIGSYS death handled as a crash", EVENTUALLY, |s| {
        s.log()
            .contains(&format!("worker {pid} died: signal 31 (SIGSYS) (crash"))
    });
    let pid = workers(&s, 1)[0];
    seccomp(&s, pid, "2");
    let text = s.ask_text(b"12");
    s.check(text == "144", || {
        format!("after the crashes: 12 -> {text:?}")
    });
    let log = s.log();
    s.check(log.matches("SIGSYS").count() == 1, || {
        "only the worker killed with SIGSYS by the test may die of it".to_owned()
    });
    drop(s);

    let s = Server::start(&["--workers", "1", "--no-seccomp"]);
    let pid = workers(&s, 1)[0];
    seccomp(&s, pid, "0");
    let text = s.ask_text(b"7");
    s.check(text == "49", || format!("without seccomp: 7 -> {text:?}"));
}
