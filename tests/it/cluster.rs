//! Issue 11: a group of servers (`--cluster-addr`), on one machine: each
//! server on its own loopback address (127.0.0.1, .2, .3, .4) with its own
//! cluster port, with the test timer profile. The group forms with one
//! coordinator and one view; clients discover it; a SIGKILLed server is
//! marked down and clients fail over; a SIGKILLed coordinator is replaced at
//! the next term; a server joining under load serves; garbage on the
//! cluster port crashes nothing; a group with a key ignores datagrams
//! without it. Without `--cluster-addr` nothing more runs.
//!
//! Each wait records how long it took and prints it next to its bound
//! (the bounds are 2-3 times what was measured on a busy 2-core machine).
//! The same scenarios across network namespaces are in `netns`.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, bin, describe, run_with_deadline, Rng, Server};

/// One member of a test group: its master and its cluster port.
pub struct Member {
    pub server: Server,
    pub cluster: SocketAddr,
}

/// Starts a master on `ip` (a free service and cluster port) with the test
/// timers, joining `join` (none: founding a group); waits until its
/// cluster thread runs.
pub fn start_member(ip: &str, join: &[SocketAddr], extra: &[&str]) -> Member {
    let bind = format!("{ip}:0");
    let cluster = format!("{ip}:0");
    let mut args = vec![
        "--workers",
        "1",
        "--bind",
        &bind,
        "--cluster-addr",
        &cluster,
        "--cluster-timing",
        "test",
    ];
    let joins: Vec<String> = join.iter().map(ToString::to_string).collect();
    for j in &joins {
        args.extend(["--join", j]);
    }
    args.extend(extra);
    let server = Server::start(&args);
    let cluster = cluster_addr(&server);
    Member { server, cluster }
}

/// The cluster port a master logged (`cluster: node N on ADDR ...`).
pub fn cluster_addr(server: &Server) -> SocketAddr {
    let mut found = None;
    server.wait_until("its cluster thread runs", Duration::from_secs(10), |s| {
        found = s.log().lines().find_map(|l| {
            let rest = l.split("cluster: node ").nth(1)?;
            rest.split(" on ").nth(1)?.split(' ').next()?.parse().ok()
        });
        found.is_some()
    });
    found.expect("waited for it")
}

/// A server's `members` reply (from a fresh socket, retried).
pub fn members(s: &Server) -> Value {
    let c = s.client();
    match c.request(
        br#"{"op":"members","id":"t"}"#,
        Duration::from_millis(500),
        4,
    ) {
        Some(r) => r.json(),
        None => Value::Null,
    }
}

/// What a group agrees on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    pub view: u64,
    pub term: u64,
    /// The coordinator's server number.
    pub coordinator: u64,
    /// Service addresses of the members that are up.
    pub up: BTreeSet<String>,
    /// How many members are voters.
    pub voters: usize,
    /// How many members the view lists (up or down).
    pub listed: usize,
}

/// The agreement of `servers` if every one answers `members` with the
/// same view, term and coordinator, not stale, and exactly `up` members up.
pub fn agreement(servers: &[&Server], up: usize) -> Option<Agreement> {
    let mut seen: Option<Agreement> = None;
    for s in servers {
        let m = members(s);
        if m["ok"] != Value::Bool(true) || m["stale"] != Value::Bool(false) {
            return None;
        }
        let a = Agreement {
            view: m["view"].as_u64()?,
            term: m["term"].as_u64()?,
            coordinator: m["coordinator"].as_u64()?,
            up: m["members"]
                .as_array()?
                .iter()
                .filter(|x| x["status"] == "up")
                .filter_map(|x| x["addr"].as_str().map(str::to_owned))
                .collect(),
            voters: m["members"]
                .as_array()?
                .iter()
                .filter(|x| x["role"] == "voter")
                .count(),
            listed: m["members"].as_array()?.len(),
        };
        if a.up.len() != up || seen.as_ref().is_some_and(|s| *s != a) {
            return None;
        }
        seen = Some(a);
    }
    seen
}

/// Polls `cond` every 20 ms until it gives a value; fails after `bound`
/// with every server's log. Prints the measured time next to the bound.
#[track_caller]
pub fn wait_for<T>(
    what: &str,
    bound: Duration,
    servers: &[&Server],
    mut cond: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        if let Some(v) = cond() {
            let took = started.elapsed();
            eprintln!(
                "cluster: {what}: {:.2} s (bound {:.1} s)",
                took.as_secs_f64(),
                bound.as_secs_f64()
            );
            return (v, took);
        }
        if started.elapsed() > bound {
            for s in servers {
                eprintln!("--- {} ---\n{}", s.command(), harness::tail(&s.log(), 40));
            }
            panic!("timed out after {bound:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three servers on 127.0.0.1-3, formed; returns them and how long
/// formation took (from the founder's start to one agreed view).
fn three(extra: &[&str]) -> (Vec<Member>, Agreement) {
    let started = Instant::now();
    let s1 = start_member("127.0.0.1", &[], extra);
    let s2 = start_member("127.0.0.2", &[s1.cluster], extra);
    let s3 = start_member("127.0.0.3", &[s1.cluster], extra);
    let group = vec![s1, s2, s3];
    let servers: Vec<&Server> = group.iter().map(|m| &m.server).collect();
    let (a, _) = wait_for(
        "three servers formed one view with one coordinator and three voters",
        Duration::from_secs(6),
        &servers,
        || agreement(&servers, 3).filter(|a| a.voters == 3),
    );
    eprintln!(
        "cluster: formation from the founder's start: {:.2} s (view {}, term {}, coordinator s{})",
        started.elapsed().as_secs_f64(),
        a.view,
        a.term,
        a.coordinator
    );
    (group, a)
}

/// A server's own number, as its `members` says.
fn number_of(s: &Server) -> u64 {
    members(s)["server"].as_u64().unwrap_or(0)
}

/// Runs a binary to completion (at most 60 s) and returns its output.
fn run(name: &str, args: &[&str]) -> (Output, Command) {
    let mut cmd = Command::new(bin(name));
    cmd.args(args);
    let (out, in_time) = run_with_deadline(&mut cmd, Duration::from_secs(60));
    assert!(in_time, "{name} ran over 60 s\n{}", describe(&cmd, &out));
    (out, cmd)
}

/// The JSON report on loadgen's last line.
fn report(out: &Output, cmd: &Command) -> Value {
    serde_json::from_slice(
        out.stdout
            .trim_ascii_end()
            .split(|&c| c == b'\n')
            .next_back()
            .unwrap_or(b""),
    )
    .unwrap_or_else(|e| panic!("no JSON report ({e})\n{}", describe(cmd, out)))
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(u64::MAX)
}

/// Threads and sockets of a process, from /proc.
fn threads_and_sockets(pid: u32) -> (usize, usize) {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0);
    (threads, sockets)
}

#[test]
fn without_cluster_addr_nothing_more_runs_and_members_names_this_server() {
    let _g = harness::shared();
    let alone = Server::start(&["--workers", "1"]);
    let m = members(&alone);
    assert_eq!(m["mode"], "single", "{m}");
    assert_eq!(m["members"][0]["addr"], alone.addr().to_string(), "{m}");
    assert_eq!(m["members"][0]["status"], "up", "{m}");
    // One thread, one socket (the service's).
    let (threads, sockets) = threads_and_sockets(alone.pid());
    alone.check(threads == 1 && sockets == 1, || {
        format!("alone: {threads} threads and {sockets} sockets, expected 1 and 1")
    });
    // In a group: one more thread (the cluster's) and one more socket.
    let s1 = start_member("127.0.0.1", &[], &[]);
    let (threads, sockets) = threads_and_sockets(s1.server.pid());
    s1.server.check(threads == 2 && sockets == 2, || {
        format!("in a group: {threads} threads and {sockets} sockets, expected 2 and 2")
    });
}

#[test]
fn three_servers_form_one_view_and_clients_discover_and_spread_over_them() {
    let _g = harness::shared();
    let (group, a) = three(&[]);
    let servers: Vec<&Server> = group.iter().map(|m| &m.server).collect();
    // Every member is listed with its number, address, status and role.
    let m = members(servers[1]);
    let listed: Vec<(u64, &str, &str, &str)> = m["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["server"].as_u64().unwrap(),
                x["addr"].as_str().unwrap(),
                x["status"].as_str().unwrap(),
                x["role"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed.len(), 3, "{m}");
    assert!(listed.iter().all(|l| l.2 == "up" && l.3 == "voter"), "{m}");
    let numbers: BTreeSet<u64> = listed.iter().map(|l| l.0).collect();
    assert_eq!(numbers, BTreeSet::from([1, 2, 3]), "{m}");
    assert_eq!(
        a.coordinator, 1,
        "the founder is the first coordinator: {m}"
    );
    // client members, through one seed.
    let seed = servers[2].addr().to_string();
    let (out, cmd) = run("client", &["--discover", &seed, "members"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("coordinator s1") && table.lines().count() == 5,
        "{}",
        describe(&cmd, &out)
    );
    // Six clients discover through one seed and spread round-robin.
    let (out, cmd) = run(
        "client",
        &[
            "--discover",
            &seed,
            "--policy",
            "round-robin",
            "--processes",
            "6",
            "hello",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let answered_by: BTreeSet<String> = servers
        .iter()
        .map(|s| s.addr().to_string())
        .filter(|a| text.contains(&format!(" at {a})")))
        .collect();
    assert!(
        out.status.success() && answered_by.len() == 3,
        "all three servers should answer: {answered_by:?}\n{}",
        describe(&cmd, &out)
    );
    // loadgen discovers too, and loses nothing.
    let (out, cmd) = run(
        "loadgen",
        &[
            "--discover",
            &seed,
            "--policy",
            "round-robin",
            "--sockets",
            "3",
            "--rate",
            "300",
            "--duration",
            "1",
            "--json",
            "--quiet",
        ],
    );
    let r = report(&out, &cmd);
    let per_server: Vec<u64> = r["servers"]
        .as_array()
        .map(|v| v.iter().map(|s| n(s, "answered")).collect())
        .unwrap_or_default();
    eprintln!("cluster: loadgen --discover: answered per server {per_server:?}");
    assert!(
        n(&r, "lost") == 0 && per_server.len() == 3 && per_server.iter().all(|&a| a > 0),
        "{}",
        describe(&cmd, &out)
    );
}

#[test]
fn a_sigkilled_server_is_marked_down_and_clients_fail_over_losing_nothing() {
    let _g = harness::exclusive();
    let (mut group, a) = three(&[]);
    let seed = group[0].server.addr().to_string();
    let mut cmd = Command::new(bin("loadgen"));
    cmd.args([
        "--discover",
        &seed,
        "--policy",
        "round-robin",
        "--sockets",
        "3",
        "--rate",
        "300",
        "--duration",
        "4",
        "--retries",
        "1",
        "--timeout-ms",
        "200",
        "--json",
        "--quiet",
    ]);
    let load = std::thread::spawn(move || {
        let (out, in_time) = run_with_deadline(&mut cmd, Duration::from_secs(60));
        (out, in_time, cmd)
    });
    std::thread::sleep(Duration::from_secs(1));
    // Kill a server that is not the coordinator.
    let victim_at = group
        .iter()
        .position(|m| number_of(&m.server) != a.coordinator)
        .expect("two are not the coordinator");
    let victim = group.remove(victim_at);
    let victim_addr = victim.server.addr().to_string();
    drop(victim); // SIGKILL to the master's process group
    let servers: Vec<&Server> = group.iter().map(|m| &m.server).collect();
    wait_for(
        "the killed server is marked down in every view",
        Duration::from_secs(3),
        &servers,
        || {
            let ok = servers.iter().all(|s| {
                members(s)["members"].as_array().is_some_and(|ms| {
                    ms.iter()
                        .any(|x| x["addr"] == victim_addr.as_str() && x["status"] == "down")
                })
            });
            ok.then_some(())
        },
    );
    let (out, in_time, cmd) = load.join().expect("the load thread");
    let r = report(&out, &cmd);
    eprintln!(
        "cluster: loadgen with {victim_addr} killed: sent {} answered {} lost {}",
        n(&r, "sent"),
        n(&r, "answered"),
        n(&r, "lost")
    );
    assert!(
        in_time
            && out.status.success()
            && n(&r, "sent") > 0
            && n(&r, "lost") == 0
            && n(&r, "answered") == n(&r, "sent")
            && n(&r, "duplicates") == 0,
        "no request may go unanswered\n{}",
        describe(&cmd, &out)
    );
}

#[test]
fn a_sigkilled_coordinator_is_replaced_at_the_next_term() {
    let _g = harness::exclusive();
    let (mut group, a) = three(&[]);
    let at = group
        .iter()
        .position(|m| number_of(&m.server) == a.coordinator)
        .expect("the coordinator is one of them");
    drop(group.remove(at));
    let servers: Vec<&Server> = group.iter().map(|m| &m.server).collect();
    let (term, _) = wait_for(
        "a new coordinator is elected",
        Duration::from_secs(2),
        &servers,
        || {
            let ms: Vec<Value> = servers.iter().map(|s| members(s)).collect();
            let c = ms[0]["coordinator"].as_u64()?;
            let t = ms[0]["term"].as_u64()?;
            let agreed = ms
                .iter()
                .all(|m| m["coordinator"] == c && m["term"] == t && m["stale"] == false);
            (agreed && c != a.coordinator).then_some(t)
        },
    );
    eprintln!(
        "cluster: coordinator s{} was at term {}; the new one at term {term}",
        a.coordinator, a.term
    );
    assert_eq!(term, a.term + 1, "the new coordinator's term");
    // Then the dead one is marked down, and removed from the view.
    wait_for(
        "the dead coordinator is removed from the view (remove_after 3 s)",
        Duration::from_secs(8),
        &servers,
        || agreement(&servers, 2).filter(|x| x.listed == 2),
    );
}

#[test]
fn a_server_joining_under_load_serves_within_3s_and_nothing_is_lost() {
    let _g = harness::exclusive();
    let (group, _) = three(&[]);
    let seed = group[0].server.addr().to_string();
    let mut cmd = Command::new(bin("loadgen"));
    cmd.args([
        "--discover",
        &seed,
        "--policy",
        "round-robin",
        "--sockets",
        "3",
        "--rate",
        "300",
        "--duration",
        "4",
        "--retries",
        "1",
        "--timeout-ms",
        "200",
        "--json",
        "--quiet",
    ]);
    let load = std::thread::spawn(move || {
        let (out, in_time) = run_with_deadline(&mut cmd, Duration::from_secs(60));
        (out, in_time, cmd)
    });
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let s4 = start_member("127.0.0.4", &[group[1].cluster], &[]);
    let s4_addr = s4.server.addr().to_string();
    let mut all: Vec<&Server> = group.iter().map(|m| &m.server).collect();
    all.push(&s4.server);
    let (_, _) = wait_for(
        "the new server is up in every view (from its start)",
        Duration::from_secs(3).saturating_sub(started.elapsed()),
        &all,
        || agreement(&all, 4).filter(|a| a.up.contains(&s4_addr)),
    );
    // Clients that discover now reach it.
    let (out, cmd4) = run(
        "client",
        &[
            "--discover",
            &seed,
            "--policy",
            "round-robin",
            "--processes",
            "8",
            "hello",
        ],
    );
    let serving = started.elapsed();
    eprintln!(
        "cluster: new server serving discovered clients {:.2} s after its start (bound 3 s)",
        serving.as_secs_f64()
    );
    assert!(
        out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains(&format!(" at {s4_addr})")),
        "a discovering client should reach the new server\n{}",
        describe(&cmd4, &out)
    );
    assert!(
        serving < Duration::from_secs(3),
        "serving after {serving:?}"
    );
    let m = members(&s4.server);
    assert_eq!(
        m["role"], "learner",
        "a fourth server is a learner (3 voters): {m}"
    );
    let (out, in_time, cmd) = load.join().expect("the load thread");
    let r = report(&out, &cmd);
    eprintln!(
        "cluster: loadgen while a server joined: sent {} answered {} lost {}",
        n(&r, "sent"),
        n(&r, "answered"),
        n(&r, "lost")
    );
    assert!(
        in_time && out.status.success() && n(&r, "sent") > 0 && n(&r, "lost") == 0,
        "{}",
        describe(&cmd, &out)
    );
}

/// A cluster envelope around `payload` (no MAC).
fn envelope(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut d = b"UP\x01".to_vec();
    d.push(kind);
    d.extend_from_slice(&0u64.to_be_bytes());
    d.extend_from_slice(payload);
    d
}

#[test]
fn random_truncated_oversized_and_forged_datagrams_on_the_cluster_port_crash_nothing() {
    let _g = harness::shared();
    let (group, before) = three(&[]);
    let mut rng = Rng(0x5eed_c1a5);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0;
    for m in &group {
        for i in 0..1500 {
            let len = (rng.next() % 1500) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            match i % 6 {
                // Random bytes.
                0 => {}
                // A SWIM or Raft envelope with random content.
                1 | 2 => d = envelope(1 + (i % 2) as u8, &d),
                // Truncated: a header cut short.
                3 => d = envelope(2, b"")[..(rng.next() % 12) as usize].to_vec(),
                // Oversized (over the 1400-byte cap).
                4 => d = envelope(1, &vec![0x55; 1400 + (rng.next() % 600) as usize]),
                // A well-formed protobuf-ish Raft message to node 0 and a bomb
                // of nested groups.
                _ => d = envelope(2, &[0x0b; 1300]),
            }
            let _ = sock.send_to(&d, m.cluster);
            sent += 1;
            // Paced, so that the kernel's queue does not drop them.
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let servers: Vec<&Server> = group.iter().map(|m| &m.server).collect();
    let (after, _) = wait_for(
        "the group is still formed after the garbage",
        Duration::from_secs(5),
        &servers,
        || agreement(&servers, 3),
    );
    let (bad, _) = wait_for(
        "every server counted the garbage it refused",
        Duration::from_secs(5),
        &servers,
        || {
            let bad: Vec<u64> = servers
                .iter()
                .map(|s| members(s)["cluster_port"]["bad"].as_u64().unwrap_or(0))
                .collect();
            bad.iter().all(|&b| b >= 1000).then_some(bad)
        },
    );
    let restarts: Vec<u64> = servers
        .iter()
        .map(|s| {
            members(s)["cluster_port"]["restarts"]
                .as_u64()
                .unwrap_or(99)
        })
        .collect();
    eprintln!("cluster: {sent} garbage datagrams; bad per server {bad:?}; restarts {restarts:?}; before {before:?} after {after:?}");
    for s in &servers {
        s.check(s.poll_exit().is_none(), || "a master exited".into());
    }
    assert!(
        bad.iter().all(|&b| b >= 1000),
        "every server counted its bad datagrams: {bad:?}"
    );
    assert_eq!(restarts, [0, 0, 0], "no cluster thread failed");
    assert_eq!(
        after.coordinator, before.coordinator,
        "the same coordinator"
    );
}

#[test]
fn a_group_with_a_key_ignores_datagrams_without_its_mac() {
    let _g = harness::shared();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    let wrong = dir.path().join("wrong.key");
    for (p, k) in [
        (&key, "the group's secret, 32 bytes...."),
        (&wrong, "another secret, also 32 bytes.."),
    ] {
        std::fs::write(p, k).unwrap();
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let k = key.to_str().unwrap();
    let s1 = start_member("127.0.0.1", &[], &["--cluster-key", k]);
    let s2 = start_member("127.0.0.2", &[s1.cluster], &["--cluster-key", k]);
    let outsider = start_member(
        "127.0.0.3",
        &[s1.cluster],
        &["--cluster-key", wrong.to_str().unwrap()],
    );
    let servers = [&s1.server, &s2.server];
    wait_for(
        "two servers with the key formed",
        Duration::from_secs(6),
        &servers,
        || agreement(&servers, 2),
    );
    // Unkeyed envelopes are refused before any parser sees them.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..200 {
        let _ = sock.send_to(&envelope(1, b"\x00\x01\x02"), s1.cluster);
    }
    std::thread::sleep(Duration::from_secs(1));
    let m = members(&s1.server);
    assert!(m["cluster_port"]["bad"].as_u64().unwrap_or(0) >= 200, "{m}");
    assert_eq!(
        m["members"].as_array().map(Vec::len),
        Some(2),
        "the outsider is not admitted: {m}"
    );
    let o = members(&outsider.server);
    assert_eq!(o["stale"], true, "the outsider has no coordinator: {o}");
    assert_eq!(o["role"], "joining", "{o}");
    // A key readable by others is refused at start, with one line.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let refused = Server::launch(&[
        "--workers",
        "1",
        "--cluster-addr",
        "127.0.0.1:0",
        "--cluster-key",
        k,
    ]);
    let status = refused.wait_exit(Duration::from_secs(10));
    refused.check(status.is_some_and(|s| !s.success()), || {
        "a master with a public key file should not start".into()
    });
    refused.check(refused.log().contains("readable by others"), || {
        "the reason is logged".into()
    });
}
