//! Issue 11 across hosts: each server in a network namespace of its own
//! (a "host"), joined by a veth pair to a bridge in a "switch" namespace;
//! clients in a namespace of their own on the same bridge. The root
//! namespace has no route to them, so no test traffic leaves the
//! namespaces. A partition is a host's bridge port moved to a second
//! bridge: its datagrams are dropped silently, both ways; moving it back
//! heals.
//!
//! Needs root and `ip` (iproute2): where namespaces cannot be made, each
//! test prints `skipped: <reason>` and returns. Namespace tests run one at
//! a time (a lock file, also across test processes); [`Net`]'s `Drop`
//! kills what runs in its namespaces and deletes them. The loopback
//! variants of these scenarios are in `cluster`.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::wait_for;
use crate::harness::{self, bin, describe, run_with_deadline, Server};

/// Serializes namespace tests, across test processes too.
const LOCK: &str = "/tmp/udp-pool-netns.lock";
/// Every namespace this suite makes starts with this, then the PID.
const PREFIX: &str = "udpp";

/// A small network of hosts in namespaces.
struct Net {
    /// `udpp<pid>t<test>`: names of this net's namespaces start with it.
    name: String,
    /// The third byte of `10.200.X.0/24`.
    subnet: u8,
    hosts: usize,
    /// Held while the net exists.
    _lock: File,
}

/// Runs `ip` with `args`; the error is its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes namespaces left by a test process that no longer exists.
fn delete_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            kill_all_in(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn kill_all_in(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(p) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Net {
    /// Makes the switch (two bridges), `hosts` hosts `h1..` on `br0` at
    /// `10.200.<subnet>.<i>`, and a client host `hc` at `.100`; or says why
    /// it cannot.
    fn new(test: u8, hosts: usize) -> Result<Net, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("ip (iproute2) is not installed".into());
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .map_err(|e| format!("cannot open {LOCK}: {e}"))?;
        // SAFETY: flock on a descriptor this function owns; blocks until
        // no other namespace test holds the lock.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("cannot lock {LOCK}"));
        }
        delete_leftovers();
        let net = Net {
            name: format!("{PREFIX}{}t{test}", std::process::id()),
            subnet: test,
            hosts,
            _lock: lock,
        };
        net.build()?;
        Ok(net)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.name)
    }

    fn build(&self) -> Result<(), String> {
        let sw = self.ns("sw");
        ip(&["netns", "add", &sw])?;
        for br in ["br0", "br1"] {
            ip(&["-n", &sw, "link", "add", br, "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", br, "up"])?;
        }
        let mut names: Vec<(String, u8)> = (1..=self.hosts)
            .map(|i| (format!("h{i}"), i as u8))
            .collect();
        names.push(("hc".into(), 100));
        for (host, octet) in names {
            let ns = self.ns(&host);
            let port = format!("p{octet}");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", "e0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
                &sw,
            ])?;
            let addr = format!("10.200.{}.{octet}/24", self.subnet);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "e0"])?;
            ip(&["-n", &ns, "link", "set", "e0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
        }
        Ok(())
    }

    /// Host `i`'s address.
    fn addr(&self, i: usize) -> String {
        format!("10.200.{}.{i}", self.subnet)
    }

    /// Moves host `i`'s bridge port to `bridge` (`br1`: cut off; `br0`:
    /// back).
    fn move_port(&self, i: usize, bridge: &str) {
        let sw = self.ns("sw");
        let port = format!("p{i}");
        ip(&["-n", &sw, "link", "set", &port, "nomaster"]).expect("nomaster");
        ip(&["-n", &sw, "link", "set", &port, "master", bridge]).expect("master");
    }

    /// A UDP socket in host `host`'s namespace (made on a thread that
    /// enters it; a socket stays in the namespace it was made in).
    fn socket_in(&self, host: &str) -> UdpSocket {
        let path = format!("/var/run/netns/{}", self.ns(host));
        std::thread::spawn(move || {
            let f = File::open(&path).expect("the namespace's file");
            // SAFETY: setns changes the namespace of this thread only (a
            // thread made for it, which ends right after), with a valid
            // descriptor of a network namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            UdpSocket::bind("0.0.0.0:0").expect("bind in the namespace")
        })
        .join()
        .expect("the setns thread")
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let mut names: Vec<String> = (1..=self.hosts)
            .map(|i| self.ns(&format!("h{i}")))
            .collect();
        names.push(self.ns("hc"));
        names.push(self.ns("sw"));
        for ns in &names {
            kill_all_in(ns);
        }
        for ns in &names {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A server's `members` reply, asked from a socket in its own host (so
/// it is reachable whichever bridge that host is on).
fn members_from(sock: &UdpSocket, to: SocketAddr) -> Value {
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        let _ = sock.send_to(br#"{"op":"members","id":"n"}"#, to);
        while let Ok((len, from)) = sock.recv_from(&mut buf) {
            if from == to {
                if let Ok(v) = serde_json::from_slice::<Value>(&buf[..len]) {
                    if v["id"] == "n" {
                        return v;
                    }
                }
            }
        }
    }
    Value::Null
}

#[test]
fn a_coordinator_cut_off_steps_down_the_majority_elects_and_the_heal_gives_one_view() {
    let _g = harness::exclusive();
    let net = match Net::new(11, 3) {
        Ok(n) => n,
        Err(why) => {
            println!("skipped: {why}");
            eprintln!("skipped: {why}");
            return;
        }
    };
    let trusted = "10.200.0.0/16";
    let mut servers = Vec::new();
    for i in 1..=3 {
        let ns = net.ns(&format!("h{i}"));
        let bind = format!("{}:10001", net.addr(i));
        let cluster = format!("{}:7000", net.addr(i));
        let seed = format!("{}:7000", net.addr(1));
        let mut args = vec![
            "--workers",
            "1",
            "--bind",
            &bind,
            "--trusted",
            trusted,
            "--cluster-addr",
            &cluster,
            "--cluster-timing",
            "test",
        ];
        if i > 1 {
            args.extend(["--join", &seed]);
        }
        servers.push(Server::start_wrapped(&["ip", "netns", "exec", &ns], &args));
    }
    let socks: Vec<UdpSocket> = (1..=3).map(|i| net.socket_in(&format!("h{i}"))).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(Server::addr).collect();
    let refs: Vec<&Server> = servers.iter().collect();
    let ask = |i: usize| members_from(&socks[i], addrs[i]);
    // One view, one coordinator, three voters, on every host.
    let agreed = |hosts: &[usize]| -> Option<(u64, u64, u64)> {
        let ms: Vec<Value> = hosts.iter().map(|&i| ask(i)).collect();
        let first = (
            ms[0]["view"].as_u64()?,
            ms[0]["term"].as_u64()?,
            ms[0]["coordinator"].as_u64()?,
        );
        ms.iter()
            .all(|m| {
                m["stale"] == false
                    && (
                        m["view"].as_u64(),
                        m["term"].as_u64(),
                        m["coordinator"].as_u64(),
                    ) == (Some(first.0), Some(first.1), Some(first.2))
                    && m["members"].as_array().is_some_and(|a| {
                        a.len() == 3
                            && a.iter()
                                .all(|x| x["status"] == "up" && x["role"] == "voter")
                    })
            })
            .then_some(first)
    };
    let ((_, term, coordinator), _) = wait_for(
        "netns: three hosts formed one view",
        Duration::from_secs(10),
        &refs,
        || agreed(&[0, 1, 2]),
    );
    // A client host discovers the group and reaches every server.
    let hc = net.ns("hc");
    let seed = addrs[1].to_string();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &hc]).arg(bin("client")).args([
        "--discover",
        &seed,
        "--policy",
        "round-robin",
        "--processes",
        "6",
        "hello",
    ]);
    let (out, in_time) = run_with_deadline(&mut cmd, Duration::from_secs(30));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        in_time
            && out.status.success()
            && addrs.iter().all(|a| text.contains(&format!(" at {a})"))),
        "a client in its own namespace should reach all three\n{}",
        describe(&cmd, &out)
    );
    // Cut the coordinator's host off.
    let c = (0..3)
        .find(|&i| ask(i)["server"].as_u64() == Some(coordinator))
        .expect("the coordinator is one of the hosts");
    let majority: Vec<usize> = (0..3).filter(|&i| i != c).collect();
    let cut_at = Instant::now();
    net.move_port(c + 1, "br1");
    eprintln!(
        "netns: cut h{} (coordinator s{coordinator}, term {term}) off",
        c + 1
    );
    let (_, stepped) = wait_for(
        "netns: the cut-off coordinator steps down (its view is stale)",
        Duration::from_secs(3),
        &refs,
        || {
            let m = ask(c);
            (m["stale"] == true && m["role"] != "coordinator").then_some(())
        },
    );
    let ((_, new_term, new_coordinator), _) = wait_for(
        "netns: the majority elects a new coordinator",
        Duration::from_secs(3),
        &refs,
        || {
            let ms: Vec<Value> = majority.iter().map(|&i| ask(i)).collect();
            let t = ms[0]["term"].as_u64()?;
            let co = ms[0]["coordinator"].as_u64()?;
            let v = ms[0]["view"].as_u64()?;
            (co != coordinator
                && t > term
                && ms
                    .iter()
                    .all(|m| m["term"] == t && m["coordinator"] == co && m["stale"] == false))
            .then_some((v, t, co))
        },
    );
    eprintln!(
        "netns: after the cut: stepped down in {:.2} s, new coordinator s{new_coordinator} at term {new_term}, {:.2} s after the cut",
        stepped.as_secs_f64(),
        cut_at.elapsed().as_secs_f64()
    );
    // The cut-off server still serves the clients that reach it, and
    // (pre-vote) does not inflate its term.
    std::thread::sleep(Duration::from_secs(1));
    let isolated = ask(c);
    assert_eq!(
        isolated["ok"], true,
        "the cut-off server still answers: {isolated}"
    );
    assert_eq!(isolated["stale"], true, "{isolated}");
    let isolated_term = isolated["term"].as_u64().unwrap_or(u64::MAX);
    assert!(
        isolated_term <= term,
        "pre-vote: the cut-off server stays at term {term}, not {isolated_term}"
    );
    // Heal: one coordinator and one view again.
    let healed_at = Instant::now();
    net.move_port(c + 1, "br0");
    let ((view, t, co), healed) = wait_for(
        "netns: after the heal, one coordinator and one view on every host",
        Duration::from_secs(6),
        &refs,
        || agreed(&[0, 1, 2]),
    );
    eprintln!(
        "netns: healed in {:.2} s: view {view}, term {t}, coordinator s{co}",
        healed.as_secs_f64()
    );
    assert_eq!(t, new_term, "healing does not start a new election");
    let _ = healed_at;
}
