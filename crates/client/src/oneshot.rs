//! The `client` binary's work: send one request, wait for the reply that
//! answers it, retry, fall back to the next server, print.

use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::debug;

use crate::addr;
use crate::cli::{ClientArgs, ClientCommand};
use crate::wire::{self, Command, JsonReply};

/// Exit status for an error reply.
pub const EXIT_ERROR_REPLY: u8 = 1;

/// Exit status when no server answered ([`NoReply`]).
pub const EXIT_NO_REPLY: u8 = 2;

/// No server answered any attempt.
#[derive(Debug, thiserror::Error)]
#[error("no reply from {servers} after {attempts} attempts of {timeout_ms} ms each{why}")]
pub struct NoReply {
    servers: String,
    attempts: u32,
    timeout_ms: u64,
    why: &'static str,
}

/// How one server answered, or did not.
enum Attempted {
    /// The reply to our request.
    Reply(Vec<u8>),
    /// Every attempt timed out or found nothing listening.
    Silent {
        /// Whether every attempt ended with an ICMP port-unreachable.
        refused: bool,
    },
}

/// Runs the `client` command line and returns the exit status.
///
/// # Errors
/// [`NoReply`] (exit status 2) when no server answered; anything else that
/// failed (a bad address, a socket error).
pub fn run(args: &ClientArgs) -> Result<u8> {
    if let Some(k) = args.processes {
        return run_processes(args, k);
    }
    let command = to_command(&args.command)?;
    let servers = args
        .servers
        .iter()
        .map(|s| addr::resolve(s))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let pid = std::process::id();
    let mut all_refused = true;
    for (n, server) in servers.iter().enumerate() {
        // One id per server: a late reply from an earlier server cannot be
        // taken for this one's (it also arrives on another socket).
        let id = format!("\"{pid}-{}\"", n + 1);
        let request = wire::render_command(&command, &id, pid);
        let expect = match command {
            Command::Send(_) => None,
            _ => Some(id.as_str()),
        };
        match ask(*server, &request, expect, timeout, args.retries)
            .with_context(|| format!("asking {server}"))?
        {
            Attempted::Reply(reply) => return print_reply(&reply, args.json),
            Attempted::Silent { refused } => {
                all_refused &= refused;
                debug!("no reply from {server}");
            }
        }
    }
    let names: Vec<String> = servers.iter().map(SocketAddr::to_string).collect();
    Err(NoReply {
        servers: names.join(", "),
        attempts: args.retries + 1,
        timeout_ms: args.timeout_ms,
        why: if all_refused {
            " (port unreachable: nothing is listening)"
        } else {
            ""
        },
    }
    .into())
}

fn to_command(cmd: &ClientCommand) -> Result<Command> {
    Ok(match cmd {
        ClientCommand::Hello => Command::Hello,
        ClientCommand::Square { n } => {
            Command::Square(wire::json_number_literal(n).context("square")?)
        }
        ClientCommand::Sleep { ms } => Command::Sleep(*ms),
        ClientCommand::Stats => Command::Stats,
        ClientCommand::Send { text } => Command::Send(text.join(" ")),
    })
}

/// Sends `request` to `server` up to `retries + 1` times and waits for a
/// reply whose id is `expect` (any reply when `None`). Replies with another
/// id are stale and ignored.
fn ask(
    server: SocketAddr,
    request: &[u8],
    expect: Option<&str>,
    timeout: Duration,
    retries: u32,
) -> io::Result<Attempted> {
    let socket = UdpSocket::bind(addr::local_wildcard(server))?;
    socket.connect(server)?;
    let mut buf = vec![0u8; protocol::MAX_UDP_PAYLOAD + 1];
    let mut refused = true;
    for attempt in 1..=retries + 1 {
        debug!("attempt {attempt} to {server}");
        let deadline = Instant::now() + timeout;
        let got_refused = match socket.send(request) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => true,
            Err(e) => return Err(e),
            Ok(_) => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break false;
                }
                socket.set_read_timeout(Some(left))?;
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let reply = &buf[..n];
                        if answers(reply, expect) {
                            return Ok(Attempted::Reply(reply.to_vec()));
                        }
                        debug!("ignoring a stale reply: {}", String::from_utf8_lossy(reply));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break false
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
        };
        refused &= got_refused;
        if got_refused {
            // Nothing listens yet: pause briefly rather than burn the
            // attempts at once, but do not wait the whole timeout either.
            debug!("{server}: port unreachable");
            if attempt <= retries {
                std::thread::sleep(timeout.min(Duration::from_millis(100)));
            }
        }
    }
    Ok(Attempted::Silent { refused })
}

/// Whether `reply` answers the request with id `expect` (raw JSON text).
fn answers(reply: &[u8], expect: Option<&str>) -> bool {
    match expect {
        None => true,
        Some(id) => JsonReply::parse(reply).and_then(|r| r.id_raw()) == Some(id),
    }
}

/// Prints the reply and returns the exit status it deserves.
fn print_reply(reply: &[u8], json: bool) -> Result<u8> {
    let mut out = io::stdout().lock();
    let line = if json {
        String::from_utf8_lossy(reply).into_owned()
    } else {
        wire::readable(reply)
    };
    writeln!(out, "{line}").context("writing the reply")?;
    let failed = match JsonReply::parse(reply) {
        Some(r) => !r.is_ok(),
        None => reply.starts_with(b"error: "),
    };
    Ok(if failed { EXIT_ERROR_REPLY } else { 0 })
}

/// Runs `k` copies of this client at once, each a process of its own that
/// sends with its own PID, and prints `client <pid>: <reply>` for each.
fn run_processes(args: &ClientArgs, k: u32) -> Result<u8> {
    let exe = std::env::current_exe().context("finding the client executable")?;
    let mut child_args: Vec<String> = Vec::new();
    for s in &args.servers {
        child_args.extend(["--server".into(), s.clone()]);
    }
    child_args.extend([
        "--timeout-ms".into(),
        args.timeout_ms.to_string(),
        "--retries".into(),
        args.retries.to_string(),
    ]);
    if args.json {
        child_args.push("--json".into());
    }
    child_args.extend(command_args(&args.command));
    let mut children = Vec::new();
    for _ in 0..k {
        let child = Process::new(&exe)
            .args(&child_args)
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

    #[test]
    fn replies_are_matched_by_raw_id() {
        let r = br#"{"ok":true,"op":"hello","message":"x","worker_pid":1,"id":"9-1"}"#;
        assert!(answers(r, Some("\"9-1\"")));
        assert!(!answers(r, Some("\"9-2\"")));
        assert!(!answers(b"49", Some("\"9-1\"")));
        assert!(answers(b"49", None));
    }

    #[test]
    fn silent_port_is_reported_as_refused() {
        // Bind then drop a socket to find a port where nothing listens.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let got = ask(port, b"{}", Some("1"), Duration::from_millis(50), 1).unwrap();
        assert!(matches!(got, Attempted::Silent { refused: true }));
    }

    #[test]
    fn stale_replies_are_ignored() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (_, from) = server.recv_from(&mut buf).unwrap();
            server
                .send_to(br#"{"ok":true,"op":"hello","id":"old"}"#, from)
                .unwrap();
            server
                .send_to(
                    br#"{"ok":true,"op":"hello","message":"hi","id":"new"}"#,
                    from,
                )
                .unwrap();
        });
        let got = ask(addr, b"x", Some("\"new\""), Duration::from_secs(5), 0).unwrap();
        t.join().unwrap();
        match got {
            Attempted::Reply(r) => assert!(r.ends_with(br#""id":"new"}"#)),
            Attempted::Silent { .. } => panic!("no reply"),
        }
    }
}
