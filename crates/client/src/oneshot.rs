//! The `client` binary's work: send one request, wait for the reply that
//! answers it, retry, fail over to the next server, print the reply and the
//! server that sent it.
//!
//! Each server gets its own connected socket, opened when the request first
//! goes there: a retry goes out on the same socket with the same id (so the
//! server's duplicate-request cache, keyed by client address and id, sees
//! the same request), an ICMP port unreachable shows as `ECONNREFUSED` on
//! it, and while the client waits for one server it still listens to those
//! it left, so a late reply from one of them answers the request (once:
//! the first reply wins). The rules are [`failover`]'s.

use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::debug;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::addr;
use crate::cli::{ClientArgs, ClientCommand};
use crate::discover;
use crate::failover::{Failure, Health, SkipRule};
use crate::wire::{self, Command, JsonReply};

/// Exit status for an error reply.
pub const EXIT_ERROR_REPLY: u8 = 1;

/// Exit status when no server answered ([`NoReply`]).
pub const EXIT_NO_REPLY: u8 = 2;

/// What one server did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tried {
    /// The server.
    pub server: SocketAddr,
    /// Why it gave no answer.
    pub why: Failure,
    /// Datagrams sent to it (1 + retries for a timeout).
    pub attempts: u32,
}

/// No server answered: each one tried, and why.
#[derive(Debug, thiserror::Error)]
pub struct NoReply {
    tried: Vec<Tried>,
    timeout_ms: u64,
}

impl fmt::Display for NoReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no server answered: ")?;
        for (i, t) in self.tried.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} {}", t.server, t.why)?;
            match t.why {
                Failure::Timeout => {
                    let s = if t.attempts == 1 { "" } else { "s" };
                    write!(f, " ({} attempt{s} of {} ms)", t.attempts, self.timeout_ms)?;
                }
                Failure::Refused => f.write_str(" (port unreachable: nothing listens)")?,
                Failure::Busy | Failure::ShuttingDown => {}
            }
        }
        Ok(())
    }
}

/// A reply to the request, and which server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The reply datagram.
    pub reply: Vec<u8>,
    /// The server it came from.
    pub server: SocketAddr,
}

/// How a request went.
#[derive(Debug)]
pub enum Outcome {
    /// A server answered.
    Answered(Answer),
    /// None did: what each one tried did instead, in order.
    Failed(Vec<Tried>),
}

/// How to ask: the request, how long to wait, how often to retry, where to
/// start.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    /// The datagram.
    pub request: &'a [u8],
    /// The raw JSON id a reply must carry (`None`: any reply answers, as
    /// for text requests).
    pub expect: Option<&'a str>,
    /// How long each attempt waits.
    pub timeout: Duration,
    /// Resends to one server before failing over.
    pub retries: u32,
    /// The server the policy prefers to start at.
    pub preferred: usize,
}

/// Runs the `client` command line and returns the exit status.
///
/// # Errors
/// [`NoReply`] (exit status 2) when no server answered; anything else that
/// failed (a bad address, a socket error).
pub fn run(args: &ClientArgs) -> Result<u8> {
    let timeout = Duration::from_millis(args.timeout_ms);
    if let ClientCommand::Members = args.command {
        return print_members(args, timeout);
    }
    let servers = if args.discover.is_empty() {
        addr::resolve_servers(&args.servers, false)?
    } else {
        discover::discover(&args.discover, timeout, false)?.servers
    };
    if let Some(k) = args.processes {
        return run_processes(args, k, &servers);
    }
    let command = to_command(&args.command)?;
    let pid = std::process::id();
    // One id for the request, whichever server it goes to: the pid, and
    // the time, so that a later client given the same pid and port is not
    // taken for this one by a server's duplicate-request cache.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let id = format!("\"{pid}-{nonce:x}\"");
    let request = wire::render_command(&command, &id, pid);
    let ask_for = Ask {
        request: &request,
        expect: match command {
            Command::Send(_) => None,
            _ => Some(id.as_str()),
        },
        timeout: Duration::from_millis(args.timeout_ms),
        retries: args.retries,
        preferred: args.policy.preferred(args.process_index, servers.len()),
    };
    let mut health = Health::new(servers.len(), SkipRule::default());
    match ask(&servers, &ask_for, &mut health)? {
        Outcome::Answered(a) => print_reply(&a, args.json),
        Outcome::Failed(tried) => Err(NoReply {
            tried,
            timeout_ms: args.timeout_ms,
        }
        .into()),
    }
}

fn to_command(cmd: &ClientCommand) -> Result<Command> {
    Ok(match cmd {
        ClientCommand::Hello => Command::Hello,
        ClientCommand::Square { n } => {
            Command::Square(wire::json_number_literal(n).context("square")?)
        }
        ClientCommand::Sleep { ms } => Command::Sleep(*ms),
        ClientCommand::Stats => Command::Stats,
        ClientCommand::Members => anyhow::bail!("members is asked with discover::discover"),
        ClientCommand::Send { text } => Command::Send(text.join(" ")),
    })
}

/// `client members`: the first server (or seed) that answers, its reply as
/// a table (or JSON with a "server" field).
fn print_members(args: &ClientArgs, timeout: Duration) -> Result<u8> {
    let seeds = if args.discover.is_empty() {
        &args.servers
    } else {
        &args.discover
    };
    let group = discover::discover(seeds, timeout, false)?;
    let mut out = io::stdout().lock();
    if args.json {
        let mut reply = group.reply;
        reply["server"] = serde_json::Value::String(group.seed.to_string());
        writeln!(out, "{reply}")
    } else {
        write!(out, "{}", discover::table(&group.reply, group.seed))
    }
    .context("writing the members")?;
    Ok(0)
}

/// One server's connected socket.
struct Conn {
    /// The server's index.
    server: usize,
    socket: UdpSocket,
}

/// What waiting for one attempt's reply came to.
enum Waited {
    /// A reply that answers the request, on connection `conn`.
    Answer { conn: usize, reply: Vec<u8> },
    /// The server being asked failed at once (busy, shutting down, refused).
    Failed(Failure),
    /// Nothing from it before the deadline.
    TimedOut,
}

/// Asks `servers` for one request, as [`failover`](crate::failover) rules:
/// starts where `health` says, retries a silent server on the same socket,
/// fails over to the next, and takes the first reply that answers from any
/// server asked so far.
///
/// # Errors
/// A socket that cannot be opened, or a send or receive error other than
/// `ECONNREFUSED`.
pub fn ask(servers: &[SocketAddr], ask: &Ask<'_>, health: &mut Health) -> io::Result<Outcome> {
    let clock = Instant::now();
    let now_ns = || clock.elapsed().as_nanos() as u64;
    let mut conns: Vec<Conn> = Vec::new();
    let mut tried: Vec<Tried> = Vec::new();
    let mut buf = vec![0u8; protocol::MAX_UDP_PAYLOAD + 1];
    let start = health.start(ask.preferred, now_ns());
    let mut hop = 0;
    loop {
        let server = health.server_at(start, hop);
        let addr = servers[server];
        let socket = UdpSocket::bind(addr::local_wildcard(addr))?;
        socket.connect(addr)?;
        socket.set_nonblocking(true)?;
        conns.push(Conn { server, socket });
        let current = conns.len() - 1;
        let mut attempts = 0;
        let why = loop {
            attempts += 1;
            debug!("attempt {attempts} to {addr}");
            match conns[current].socket.send(ask.request) {
                // An ICMP error left by an earlier datagram: nothing listens.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break Failure::Refused,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            let deadline = Instant::now() + ask.timeout;
            match wait(&conns, current, ask.expect, deadline, &mut buf, &mut tried)? {
                Waited::Answer { conn, reply } => {
                    health.replied(conns[conn].server);
                    return Ok(Outcome::Answered(Answer {
                        reply,
                        server: servers[conns[conn].server],
                    }));
                }
                Waited::Failed(why) => break why,
                Waited::TimedOut => {
                    if health.failed(server, Failure::Timeout, now_ns()) {
                        debug!("{addr} timed out repeatedly: skipped for a while");
                    }
                    if attempts > ask.retries {
                        break Failure::Timeout;
                    }
                }
            }
        };
        debug!("{addr}: {why}, moving on");
        if why != Failure::Timeout {
            health.failed(server, why, now_ns());
        }
        tried.push(Tried {
            server: addr,
            why,
            attempts,
        });
        match health.next_hop(start, hop, now_ns()) {
            Some(next) => hop = next,
            None => return Ok(Outcome::Failed(tried)),
        }
    }
}

/// Waits until `deadline` for a reply on any of `conns`: one that answers
/// the request ends the wait, wherever it comes from; a failure of
/// `conns[current]` ends it too. A late failure of a server already left
/// corrects what `tried` says of it.
fn wait(
    conns: &[Conn],
    current: usize,
    expect: Option<&str>,
    deadline: Instant,
    buf: &mut [u8],
    tried: &mut [Tried],
) -> io::Result<Waited> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Waited::TimedOut);
        }
        // Rounded up, so that the wait never ends early.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut fds: Vec<PollFd<'_>> = conns
            .iter()
            .map(|c| PollFd::new(c.socket.as_fd(), PollFlags::POLLIN))
            .collect();
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        for (i, conn) in conns.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            loop {
                let failure = match conn.socket.recv(buf) {
                    Ok(n) => {
                        let reply = &buf[..n];
                        if !answers(reply, expect) {
                            debug!("ignoring a stale reply: {}", String::from_utf8_lossy(reply));
                            continue;
                        }
                        match failure_in(reply) {
                            Some(why) => why,
                            None => {
                                return Ok(Waited::Answer {
                                    conn: i,
                                    reply: reply.to_vec(),
                                })
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Failure::Refused,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                if i == current {
                    return Ok(Waited::Failed(failure));
                }
                // A server left behind failed after all: say how.
                if let Some(t) = tried.get_mut(i) {
                    t.why = failure;
                }
            }
        }
    }
}

/// Whether `reply` answers the request with id `expect` (raw JSON text).
fn answers(reply: &[u8], expect: Option<&str>) -> bool {
    match expect {
        None => true,
        Some(id) => JsonReply::parse(reply).and_then(|r| r.id_raw()) == Some(id),
    }
}

/// The failure a reply reports, if it is `busy` or `shutting_down` (in
/// either dialect): the request moves on to the next server.
fn failure_in(reply: &[u8]) -> Option<Failure> {
    match JsonReply::parse(reply) {
        Some(r) if !r.is_ok() => Failure::from_error_code(&r.error_code()?),
        Some(_) => None,
        None => {
            let text = std::str::from_utf8(reply).ok()?;
            let code = text.strip_prefix("error: ")?.split(':').next()?;
            Failure::from_error_code(code)
        }
    }
}

/// Prints the reply, and the server that sent it, and returns the exit
/// status it deserves.
fn print_reply(answer: &Answer, json: bool) -> Result<u8> {
    let reply = &answer.reply;
    let mut out = io::stdout().lock();
    let line = if json {
        wire::with_server_field(reply, answer.server)
    } else {
        wire::readable(reply, Some(answer.server))
    };
    writeln!(out, "{line}").context("writing the reply")?;
    let failed = match JsonReply::parse(reply) {
        Some(r) => !r.is_ok(),
        None => reply.starts_with(b"error: "),
    };
    Ok(if failed { EXIT_ERROR_REPLY } else { 0 })
}

/// Runs `k` copies of this client at once, each a process of its own that
/// sends with its own PID (and, with `--policy round-robin`, starts at its
/// own server), and prints `client <pid>: <reply>` for each.
fn run_processes(args: &ClientArgs, k: u32, servers: &[SocketAddr]) -> Result<u8> {
    let exe = std::env::current_exe().context("finding the client executable")?;
    let mut child_args: Vec<String> = Vec::new();
    for s in servers {
        child_args.extend(["--server".into(), s.to_string()]);
    }
    child_args.extend([
        "--timeout-ms".into(),
        args.timeout_ms.to_string(),
        "--retries".into(),
        args.retries.to_string(),
        "--policy".into(),
        args.policy.to_string(),
    ]);
    if args.json {
        child_args.push("--json".into());
    }
    let command = command_args(&args.command);
    let mut children = Vec::new();
    for i in 0..k {
        let child = Process::new(&exe)
            .args(&child_args)
            .args(["--process-index".to_string(), i.to_string()])
            .args(&command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        children.push(child);
    }
    let mut worst = 0u8;
    let mut out = io::stdout().lock();
    for child in children {
        let pid = child.id();
        let done = child
            .wait_with_output()
            .with_context(|| format!("waiting for client {pid}"))?;
        let code = done
            .status
            .code()
            .map_or(1, |c| u8::try_from(c).unwrap_or(1));
        worst = worst.max(code);
        let text = if done.stdout.is_empty() {
            done.stderr
        } else {
            done.stdout
        };
        let text = String::from_utf8_lossy(&text);
        let text = text.trim_end();
        let text = text.strip_prefix("client: ").unwrap_or(text);
        writeln!(out, "client {pid}: {text}").context("writing the reply")?;
    }
    Ok(worst)
}

/// The command line words that ask for `cmd`.
fn command_args(cmd: &ClientCommand) -> Vec<String> {
    match cmd {
        ClientCommand::Hello => vec!["hello".into()],
        ClientCommand::Square { n } => vec!["square".into(), n.clone()],
        ClientCommand::Sleep { ms } => vec!["sleep".into(), ms.to_string()],
        ClientCommand::Stats => vec!["stats".into()],
        ClientCommand::Members => vec!["members".into()],
        ClientCommand::Send { text } => {
            let mut v = vec!["send".into()];
            v.extend(text.iter().cloned());
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::JoinHandle;

    #[test]
    fn replies_are_matched_by_raw_id() {
        let r = br#"{"ok":true,"op":"hello","message":"x","worker_pid":1,"id":"9-1"}"#;
        assert!(answers(r, Some("\"9-1\"")));
        assert!(!answers(r, Some("\"9-2\"")));
        assert!(!answers(b"49", Some("\"9-1\"")));
        assert!(answers(b"49", None));
    }

    #[test]
    fn busy_and_shutting_down_replies_are_failures() {
        let busy = br#"{"ok":false,"error":"busy","message":"m","id":1}"#;
        assert_eq!(failure_in(busy), Some(Failure::Busy));
        assert_eq!(
            failure_in(b"error: shutting_down: stopping"),
            Some(Failure::ShuttingDown)
        );
        assert_eq!(failure_in(b"error: bad_request: x"), None);
        assert_eq!(failure_in(br#"{"ok":true,"id":1}"#), None);
        assert_eq!(failure_in(b"49"), None);
    }

    /// What a fake server received: each datagram and its sender.
    type Received = Vec<(Vec<u8>, SocketAddr)>;

    /// A fake server on a thread: `serve` is called with each of the first
    /// `n` datagrams (and how many came before); the thread returns what it
    /// received and from where.
    fn fake(
        n: usize,
        mut serve: impl FnMut(&UdpSocket, &[u8], SocketAddr, usize) + Send + 'static,
    ) -> (SocketAddr, JoinHandle<Received>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while got.len() < n {
                let Ok((len, from)) = sock.recv_from(&mut buf) else {
                    break;
                };
                serve(&sock, &buf[..len], from, got.len());
                got.push((buf[..len].to_vec(), from));
            }
            got
        });
        (addr, t)
    }

    /// A reply with id `"r"`.
    const OK: &[u8] = br#"{"ok":true,"op":"hello","message":"hi","worker_pid":5,"id":"r"}"#;
    const BUSY: &[u8] = br#"{"ok":false,"error":"busy","message":"full","id":"r"}"#;

    fn closed_port() -> SocketAddr {
        // Bind then drop a socket to find a port where nothing listens.
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn asking(timeout_ms: u64, retries: u32) -> Ask<'static> {
        Ask {
            request: b"{\"op\":\"hello\",\"id\":\"r\"}",
            expect: Some("\"r\""),
            timeout: Duration::from_millis(timeout_ms),
            retries,
            preferred: 0,
        }
    }

    fn run_ask(servers: &[SocketAddr], a: &Ask<'_>) -> (Outcome, Duration) {
        let mut health = Health::new(servers.len(), SkipRule::default());
        let started = Instant::now();
        let got = ask(servers, a, &mut health).unwrap();
        (got, started.elapsed())
    }

    #[test]
    fn stale_replies_are_ignored() {
        let (addr, t) = fake(1, |sock, _, from, _| {
            sock.send_to(br#"{"ok":true,"op":"hello","id":"old"}"#, from)
                .unwrap();
            sock.send_to(OK, from).unwrap();
        });
        let (got, _) = run_ask(&[addr], &asking(5000, 0));
        t.join().unwrap();
        match got {
            Outcome::Answered(a) => assert_eq!((a.reply.as_slice(), a.server), (OK, addr)),
            Outcome::Failed(t) => panic!("no reply: {t:?}"),
        }
    }

    #[test]
    fn a_retry_is_the_same_datagram_from_the_same_socket() {
        // The first attempt goes unanswered, the retry is answered.
        let (addr, t) = fake(2, |sock, _, from, before| {
            if before == 1 {
                sock.send_to(OK, from).unwrap();
            }
        });
        let (got, took) = run_ask(&[addr], &asking(100, 2));
        let seen = t.join().unwrap();
        assert!(
            matches!(got, Outcome::Answered(ref a) if a.server == addr),
            "{got:?}"
        );
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], seen[1], "same bytes, same source address");
        assert!(took >= Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn a_silent_server_is_retried_then_failed_over() {
        let (silent, ts) = fake(2, |_, _, _, _| {});
        let (b, tb) = fake(1, |sock, _, from, _| {
            sock.send_to(OK, from).unwrap();
        });
        let (got, took) = run_ask(&[silent, b], &asking(100, 1));
        let seen = ts.join().unwrap();
        let seen_b = tb.join().unwrap();
        assert!(
            matches!(got, Outcome::Answered(ref a) if a.server == b),
            "{got:?}"
        );
        assert_eq!(seen.len(), 2, "one attempt and one retry");
        assert_eq!(seen[0], seen[1]);
        assert_eq!(seen_b[0].0, seen[0].0, "the same id everywhere");
        assert!(took >= Duration::from_millis(200), "{took:?}");
    }

    #[test]
    fn refused_and_busy_move_on_at_once() {
        let (busy, tb) = fake(1, |sock, _, from, _| {
            sock.send_to(BUSY, from).unwrap();
        });
        let (c, tc) = fake(1, |sock, _, from, _| {
            sock.send_to(OK, from).unwrap();
        });
        let (got, took) = run_ask(&[closed_port(), busy, c], &asking(5000, 3));
        tb.join().unwrap();
        tc.join().unwrap();
        assert!(
            matches!(got, Outcome::Answered(ref a) if a.server == c),
            "{got:?}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn a_late_reply_from_a_server_left_behind_still_answers() {
        // A answers after 300 ms, when the client has moved on to a silent B.
        let (a, ta) = fake(1, |sock, _, from, _| {
            std::thread::sleep(Duration::from_millis(300));
            sock.send_to(OK, from).unwrap();
        });
        let (b, tb) = fake(1, |_, _, _, _| {});
        let (got, took) = run_ask(&[a, b], &asking(200, 0));
        ta.join().unwrap();
        tb.join().unwrap();
        assert!(
            matches!(got, Outcome::Answered(ref r) if r.server == a),
            "{got:?}"
        );
        assert!(took < Duration::from_millis(400), "{took:?}");
    }

    #[test]
    fn when_no_server_answers_each_one_says_why() {
        let refused = closed_port();
        let (busy, tb) = fake(1, |sock, _, from, _| {
            sock.send_to(BUSY, from).unwrap();
        });
        let (silent, ts) = fake(2, |_, _, _, _| {});
        let (got, _) = run_ask(&[refused, busy, silent], &asking(50, 1));
        tb.join().unwrap();
        ts.join().unwrap();
        let Outcome::Failed(tried) = got else {
            panic!("{got:?}")
        };
        let why: Vec<_> = tried
            .iter()
            .map(|t| (t.server, t.why, t.attempts))
            .collect();
        assert_eq!(
            why,
            [
                (refused, Failure::Refused, 1),
                (busy, Failure::Busy, 1),
                (silent, Failure::Timeout, 2)
            ]
        );
        let line = NoReply {
            tried,
            timeout_ms: 50,
        }
        .to_string();
        assert_eq!(
            line,
            format!(
                "no server answered: {refused} refused (port unreachable: nothing listens), \
                 {busy} busy, {silent} timeout (2 attempts of 50 ms)"
            )
        );
    }

    #[test]
    fn round_robin_starts_at_the_preferred_server() {
        let (a, ta) = fake(1, |sock, _, from, _| {
            sock.send_to(OK, from).unwrap();
        });
        let (b, tb) = fake(1, |sock, _, from, _| {
            sock.send_to(OK, from).unwrap();
        });
        let mut at_b = asking(5000, 0);
        at_b.preferred = 1;
        let (got, _) = run_ask(&[a, b], &at_b);
        assert!(
            matches!(got, Outcome::Answered(ref r) if r.server == b),
            "{got:?}"
        );
        let (got, _) = run_ask(&[a, b], &asking(5000, 0));
        assert!(
            matches!(got, Outcome::Answered(ref r) if r.server == a),
            "{got:?}"
        );
        ta.join().unwrap();
        tb.join().unwrap();
    }
}
