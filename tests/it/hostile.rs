//! Issue 9's acceptance: a server on a public address against hostile
//! clients. Untrusted sources are simulated on loopback: the master trusts
//! only 127.0.0.1, and the tests send from 127.0.0.2 (or from many
//! addresses of 127.0.0.0/8), which loopback routes like any other host.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::harness::{self, rss_kib, Rng, Server};

/// Trust only 127.0.0.1: 127.0.0.2 and the rest of 127/8 are "the Internet".
const TRUST_ONE: [&str; 2] = ["--trusted", "127.0.0.1"];

/// A socket bound to `local`, connected to the server.
fn socket_from(local: &str, server: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind(local).unwrap_or_else(|e| panic!("bind {local}: {e}"));
    s.connect(server).expect("connect");
    s
}

/// Every datagram `socket` receives until it has been quiet for `quiet`.
fn drain(socket: &UdpSocket, quiet: Duration, at_most: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    let started = Instant::now();
    socket.set_read_timeout(Some(quiet)).expect("timeout");
    while started.elapsed() < at_most {
        match socket.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(_) => break,
        }
    }
    got
}

#[test]
fn no_reply_to_an_untrusted_source_is_over_three_times_its_datagram() {
    let _g = harness::exclusive();
    let mut args = vec!["--workers", "2", "--rate-limit", "0"];
    args.extend(TRUST_ONE);
    let s = Server::start(&args);
    // One socket per datagram length: every reply it gets answers a
    // datagram of that length.
    let one = socket_from("127.0.0.2:0", s.addr());
    let two = socket_from("127.0.0.2:0", s.addr());
    let mut sent = 0usize;
    for b in 0..=255u8 {
        let _ = one.send(&[b]);
        sent += 1;
    }
    for hi in 0..=255u8 {
        for lo in 0..=255u8 {
            let _ = two.send(&[hi, lo]);
            sent += 1;
        }
        // Let the server keep up: a full socket buffer drops, not bounds.
        std::thread::sleep(Duration::from_micros(300));
    }
    let mut rng = Rng(0x5eed);
    let longer: Vec<(usize, UdpSocket)> = (3..=64)
        .map(|len| (len, socket_from("127.0.0.2:0", s.addr())))
        .collect();
    let templates: [&[u8]; 4] = [
        br#"{"op":"square","n":"#,
        br#"{"op":"hello","id":"#,
        br#"{"op":"stats","id":1}"#,
        b"Hi server!",
    ];
    for (len, sock) in &longer {
        for k in 0..40 {
            // Half plausible requests cut or padded to the length, half noise.
            let mut d: Vec<u8> = if k % 2 == 0 {
                templates[k / 2 % templates.len()].to_vec()
            } else {
                Vec::new()
            };
            d.resize(*len, 0);
            for byte in d.iter_mut().skip(if k % 2 == 0 { 12 } else { 0 }) {
                *byte = (rng.next() % 256) as u8;
            }
            d.truncate(*len);
            let _ = sock.send(&d);
            sent += 1;
        }
    }
    let mut worst: Option<(usize, usize, Vec<u8>)> = None;
    let mut replies = 0;
    let mut check = |len: usize, sock: &UdpSocket| {
        for r in drain(sock, Duration::from_millis(300), Duration::from_secs(20)) {
            replies += 1;
            if r.len() > 3 * len && worst.as_ref().is_none_or(|w| r.len() > w.1) {
                worst = Some((len, r.len(), r));
            }
        }
    };
    check(1, &one);
    check(2, &two);
    for (len, sock) in &longer {
        check(*len, sock);
    }
    eprintln!("amplification: {sent} datagrams of 1..64 bytes from 127.0.0.2, {replies} replies");
    if let Some((len, got, r)) = worst {
        s.fail(&format!(
            "a {len}-byte datagram got a {got}-byte reply: {:?}",
            String::from_utf8_lossy(&r)
        ));
    }
    s.check(replies > 0, || {
        "no reply at all: the bound should compact, not silence everything".into()
    });
    let st = s.stats();
    s.check(st["totals"]["withheld"].as_u64() > Some(0), || {
        format!("stats should count withheld replies: {st}")
    });
}

#[test]
fn stats_is_forbidden_to_an_untrusted_source_in_a_short_reply() {
    let _g = harness::shared();
    let mut args = vec!["--workers", "1"];
    args.extend(TRUST_ONE);
    let s = Server::start(&args);
    let far = socket_from("127.0.0.2:0", s.addr());
    let req = br#"{"op":"stats","id":"probe"}"#;
    far.send(req).expect("send");
    let got = drain(&far, Duration::from_millis(500), Duration::from_secs(3));
    s.check(got.len() == 1, || {
        format!("expected one reply, got {got:?}")
    });
    let text = String::from_utf8_lossy(&got[0]).into_owned();
    s.check(
        text.contains(r#""error":"forbidden""#) && got[0].len() <= 3 * req.len(),
        || format!("stats from 127.0.0.2 got {text:?}"),
    );
    // The trusted source still gets it; the lecture's greeting too.
    let st = s.stats();
    s.check(st["master_pid"] == s.pid(), || {
        format!("stats from 127.0.0.1: {st}")
    });
    let hi = s.ask_text(b"Hi server!");
    s.check(hi.starts_with("Hi 127.0.0.1:"), || {
        format!("greeting: {hi:?}")
    });
}

#[test]
fn a_source_over_the_rate_limit_is_dropped_with_a_few_rate_limited_replies() {
    let _g = harness::shared();
    let mut args = vec![
        "--workers",
        "2",
        "--rate-limit",
        "50",
        "--rate-limit-slip",
        "2",
    ];
    args.extend(TRUST_ONE);
    let s = Server::start(&args);
    let far = socket_from("127.0.0.2:0", s.addr());
    for i in 0..300 {
        let _ = far.send(format!(r#"{{"op":"square","n":{i},"id":{i}}}"#).as_bytes());
    }
    let got = drain(&far, Duration::from_millis(500), Duration::from_secs(10));
    let ok = got
        .iter()
        .filter(|r| r.starts_with(br#"{"ok":true"#))
        .count();
    let limited = got
        .iter()
        .filter(|r| String::from_utf8_lossy(r).contains("rate_limited"))
        .count();
    eprintln!("rate limit 50/s: 300 sent in a burst, {ok} ok, {limited} rate_limited");
    // The burst is 50; a slow machine refills a few more while it sends.
    s.check((50..=80).contains(&ok), || {
        format!("300 at once with --rate-limit 50: {ok} ok")
    });
    s.check(limited > 50 && ok + limited < 300, || {
        format!("with --rate-limit-slip 2, about half the rest get rate_limited: {limited}")
    });
    let st = s.stats();
    s.check(
        st["totals"]["dropped"].as_u64() > Some(50)
            && st["totals"]["errors"]["rate_limited"].as_u64() == Some(limited as u64),
        || format!("stats counts the limited datagrams: {st}"),
    );
    // A trusted client is not limited.
    for i in 0..100 {
        let r = s.ask(&format!(r#"{{"op":"square","n":{i},"id":"t{i}"}}"#));
        s.check(r.is_ok(), || format!("trusted request {i}: {r:?}"));
    }
}

#[test]
fn sleep_without_fault_injection_is_disabled_and_600_of_them_leave_others_served() {
    let _g = harness::exclusive();
    let s = Server::start(&["--workers", "4"]);
    let attacker = s.client();
    // Read the attacker's replies as they come: 600 overflow a socket buffer.
    let inbox = attacker_socket(&attacker);
    // Room for all 600 replies even if this thread is scheduled late.
    let room = 8 << 20;
    if nix::sys::socket::setsockopt(&inbox, nix::sys::socket::sockopt::RcvBufForce, &room).is_err()
    {
        let _ = nix::sys::socket::setsockopt(&inbox, nix::sys::socket::sockopt::RcvBuf, &room);
    }
    let reader =
        std::thread::spawn(move || drain(&inbox, Duration::from_secs(1), Duration::from_secs(10)));
    for i in 0..600 {
        attacker.send(format!(r#"{{"op":"sleep","ms":10000,"id":{i}}}"#).as_bytes());
    }
    let p99 = squares_p99(&s, "a square among 600 sleeps");
    // The machine's own delay, measured the same way once the sleeps are
    // answered: on a busy machine (CPU hogs beside the suite) scheduling
    // alone can reach a few ms, and the bound follows it. The p99 of 200
    // is their second slowest, so the two figures differ by more than 3x
    // by chance alone (7.8 against 2.5 ms once, with two hogs); a square
    // behind a sleep that ran would wait 10,000 ms.
    let got = reader.join().expect("the reader thread panicked");
    let quiet_p99 = squares_p99(&s, "a square after the sleeps");
    let bound = Duration::from_millis(10).max(quiet_p99 * 4);
    eprintln!("600 sleeps without the flag: squares p99 {p99:?} (without them {quiet_p99:?}; bound {bound:?})");
    s.check(p99 < bound, || {
        format!("p99 of squares among 600 sleep requests: {p99:?} (bound {bound:?})")
    });
    let disabled = got
        .iter()
        .filter(|r| String::from_utf8_lossy(r).contains(r#""error":"disabled""#))
        .count();
    let busy = got
        .iter()
        .filter(|r| String::from_utf8_lossy(r).contains(r#""error":"busy""#))
        .count();
    eprintln!("600 sleeps without the flag: {disabled} disabled, {busy} busy");
    s.check(disabled + busy == 600 && disabled >= 512, || {
        format!(
            "600 sleeps without --enable-fault-injection: {disabled} disabled and {busy} busy of {}",
            got.len()
        )
    });
}

/// The p99 of 200 squares asked one after the other.
fn squares_p99(s: &Server, what: &str) -> Duration {
    let mut took = Vec::new();
    for i in 0..200 {
        let asked = Instant::now();
        let r = s.ask(&format!(r#"{{"op":"square","n":{i},"id":"v{i}"}}"#));
        took.push(asked.elapsed());
        s.check(r.is_ok(), || format!("{what}: {r:?}"));
    }
    took.sort();
    took[took.len() * 99 / 100]
}

/// The socket behind a harness client, to read what it was sent.
fn attacker_socket(c: &harness::Client) -> UdpSocket {
    c.socket().try_clone().expect("clone the client socket")
}

#[test]
fn a_flood_from_100000_source_addresses_keeps_the_master_small() {
    const RSS_BOUND_KIB: u64 = 20 * 1024;
    let _g = harness::exclusive();
    let mut args = vec!["--workers", "2"];
    args.extend(TRUST_ONE);
    let s = Server::start(&args);
    let before = rss_kib(s.pid()).unwrap_or(0);
    let started = Instant::now();
    let mut peak = before;
    let mut sent = 0u32;
    // 127.1.0.1 ..= 127.2.249.250: 100,000 distinct addresses in 500 /24s.
    for n in 0..100_000u32 {
        let (a, r) = (1 + n / 62_500, n % 62_500);
        let (b, c) = (r / 250, 1 + r % 250);
        let local = format!("127.{a}.{b}.{c}:0");
        let Ok(sock) = UdpSocket::bind(local.as_str()) else {
            continue;
        };
        if sock.send_to(br#"{"op":"square","n":12}"#, s.addr()).is_ok() {
            sent += 1;
        }
        if n % 5000 == 0 {
            peak = peak.max(rss_kib(s.pid()).unwrap_or(0));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    peak = peak.max(rss_kib(s.pid()).unwrap_or(0));
    eprintln!(
        "flood: {sent} datagrams from distinct addresses in {:?}; master VmRSS {before} KiB before, {peak} KiB at most",
        started.elapsed()
    );
    s.check(sent >= 90_000, || format!("only {sent} of 100,000 sent"));
    s.check(peak < RSS_BOUND_KIB, || {
        format!("master VmRSS reached {peak} KiB (bound {RSS_BOUND_KIB} KiB)")
    });
    let r = s.ask(r#"{"op":"square","n":7,"id":"after"}"#);
    s.check(r.is_ok(), || format!("after the flood: {r:?}"));
}
