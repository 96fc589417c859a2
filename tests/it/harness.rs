//! The harness: finds the real binaries, starts `master` in its own process
//! group with a temporary directory, talks UDP to it, and looks at its
//! processes through `/proc`.
//!
//! Every wait has a deadline. A failure panics with the master's command
//! line, its exit status and the tail of its log ([`Server::fail`]).
//!
//! # Layout
//! * Binaries: [`bin`] finds `master`, `worker` and `client`, which cargo
//!   builds for this test (they belong to the same package).
//! * [`Server`]: one running `master`; [`Drop`] kills its process group.
//! * [`Client`]: a UDP socket with request/reply matching by id, and
//!   [`Client::many`], a pipelined stream of requests.
//! * [`Proc`] and friends: processes as `/proc` shows them.
//! * [`shared`] / [`exclusive`]: tests that load the machine or assert a
//!   tight time bound run alone.

#![allow(dead_code)] // Not every test module uses every helper.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use num_bigint::BigInt;
use serde_json::value::RawValue;
use serde_json::Value;
use tempfile::TempDir;

/// How long `master` may take to log `listening on`.
pub const START_DEADLINE: Duration = Duration::from_secs(10);
/// Lines of the master's log shown when a test fails.
const LOG_TAIL_LINES: usize = 60;
/// Set this to a directory holding `master`, `worker` and `client` to test
/// those binaries instead of the ones cargo built.
pub const BIN_DIR_ENV: &str = "UDP_POOL_BIN_DIR";

// ----- running alone --------------------------------------------------------

static MACHINE: RwLock<()> = RwLock::new(());

/// Taken by tests that neither load the machine nor assert a tight bound:
/// they run in parallel with each other.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// Taken by tests that load the machine (floods, streams) or assert a tight
/// time bound (300 ms, 1 s): on a small, shared machine they run alone.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

// ----- binaries -------------------------------------------------------------

/// The path of one of the root package's binaries (`master`, `worker`,
/// `client`, `loadgen`): the one cargo built for this test run
/// (`CARGO_BIN_EXE_<name>`, in the same directory, so `master` finds its
/// `worker` next to it), or the one in [`BIN_DIR_ENV`] when that is set.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        let path = Path::new(&dir).join(name);
        assert!(
            path.is_file(),
            "{BIN_DIR_ENV}: {} is missing",
            path.display()
        );
        return path;
    }
    PathBuf::from(match name {
        "master" => env!("CARGO_BIN_EXE_master"),
        "worker" => env!("CARGO_BIN_EXE_worker"),
        "client" => env!("CARGO_BIN_EXE_client"),
        "loadgen" => env!("CARGO_BIN_EXE_loadgen"),
        _ => panic!("no binary named {name}"),
    })
}

/// Runs one of the binaries to completion, killing it at `deadline`.
/// Returns its output and whether it finished in time.
pub fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> (Output, bool) {
    let dir = TempDir::new().expect("temp dir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .process_group(0);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pgid = Pid::from_raw(child.id() as i32);
    let (status, in_time) = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break (s, true);
        }
        if started.elapsed() > deadline {
            let _ = killpg(pgid, Signal::SIGKILL);
            break (child.wait().expect("wait"), false);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // Children it left behind (the lecture's clients fork) go too.
    let _ = killpg(pgid, Signal::SIGKILL);
    let output = Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    };
    (output, in_time)
}

/// `cmd`'s outcome, readably, for a panic message.
pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {cmd:?}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 40),
        tail(&String::from_utf8_lossy(&out.stderr), 40)
    )
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ----- the server -----------------------------------------------------------

/// A running `master`, in its own process group, with its own temporary
/// directory (its working directory, holding its log).
pub struct Server {
    child: Child,
    pid: u32,
    addr: Option<SocketAddr>,
    command: String,
    log_path: PathBuf,
    exit: Cell<Option<ExitStatus>>,
    dir: TempDir,
}

impl Server {
    /// Starts `master` with `args`, plus `--bind 127.0.0.1:0` and
    /// `--journal none` unless `args` name them, and waits (up to
    /// [`START_DEADLINE`]) for its `listening on` line.
    pub fn start(args: &[&str]) -> Server {
        let mut server = Server::launch(args);
        server.wait_listening();
        server
    }

    /// [`Server::start`], with `prepare` applied to the command first (a
    /// signal disposition, say).
    pub fn start_with(args: &[&str], prepare: impl FnOnce(&mut Command)) -> Server {
        let mut server = Server::launch_with(args, prepare);
        server.wait_listening();
        server
    }

    /// Starts `master` like [`Server::start`] but does not wait for it to
    /// serve (for masters that are expected to fail).
    pub fn launch(args: &[&str]) -> Server {
        Server::launch_with(args, |_| {})
    }

    /// [`Server::start`] with another `master` executable (a copy, with
    /// its `worker` beside it).
    pub fn start_binary(master: &Path, args: &[&str]) -> Server {
        let mut server = Server::launch_binary(master, args, |_| {});
        server.wait_listening();
        server
    }

    /// [`Server::start_binary`], with `prepare` applied to the command
    /// first (descriptors to pass, variables to set).
    pub fn start_binary_with(
        master: &Path,
        args: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Server {
        let mut server = Server::launch_binary(master, args, prepare);
        server.wait_listening();
        server
    }

    fn launch_with(args: &[&str], prepare: impl FnOnce(&mut Command)) -> Server {
        Server::launch_binary(&bin("master"), args, prepare)
    }

    /// [`Server::start`] through a wrapper that execs the master in place
    /// (`ip netns exec NS`): the PID is still the master's.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Server {
        let mut server = Server::launch_program(wrapper, &bin("master"), args, |_| {});
        server.wait_listening();
        server
    }

    fn launch_binary(master: &Path, args: &[&str], prepare: impl FnOnce(&mut Command)) -> Server {
        Server::launch_program(&[], master, args, prepare)
    }

    fn launch_program(
        wrapper: &[&str],
        master: &Path,
        args: &[&str],
        prepare: impl FnOnce(&mut Command),
    ) -> Server {
        let dir = TempDir::new().expect("temp dir");
        let log_path = dir.path().join("master.log");
        let log = File::create(&log_path).expect("log file");
        let mut full: Vec<&str> = Vec::new();
        if !args.contains(&"--bind") {
            full.extend(["--bind", "127.0.0.1:0"]);
        }
        if !args.contains(&"--journal") {
            full.extend(["--journal", "none"]);
        }
        full.extend(args);
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(master);
                c
            }
            None => Command::new(master),
        };
        cmd.args(&full)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .env_remove("UDP_POOL_WORKER")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            // Its own group: Drop kills the master and every worker at once.
            .process_group(0);
        prepare(&mut cmd);
        let command = format!(
            "{}{} {}",
            wrapper.iter().map(|w| format!("{w} ")).collect::<String>(),
            master.display(),
            full.join(" ")
        );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        Server {
            pid: child.id(),
            child,
            addr: None,
            command,
            log_path,
            exit: Cell::new(None),
            dir,
        }
    }

    fn wait_listening(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(addr) = listening_addr(&self.log()) {
                self.addr = Some(addr);
                return;
            }
            if self.poll_exit().is_some() {
                self.fail("master exited before it was listening");
            }
            if started.elapsed() > START_DEADLINE {
                self.fail(&format!(
                    "master did not log `listening on` within {START_DEADLINE:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
            .expect("the server was started with Server::start")
    }

    /// The master's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The master's command line.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Its temporary (working) directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PIDs of the master's live (not zombie) children, sorted.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers().iter().map(|p| p.pid).collect()
    }

    /// The master's live children, sorted by PID.
    pub fn workers(&self) -> Vec<Proc> {
        children_of(self.pid)
    }

    /// Sends `sig` to the master.
    pub fn signal(&self, sig: Signal) {
        if self.poll_exit().is_some() {
            self.fail(&format!("cannot send {sig}: the master has exited"));
        }
        if let Err(e) = kill(Pid::from_raw(self.pid as i32), sig) {
            self.fail(&format!("cannot send {sig}: {e}"));
        }
    }

    /// Waits up to `timeout` for the master to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(s) = self.poll_exit() {
                return Some(s);
            }
            if started.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its exit status, if it has exited. The master is not reaped (the
    /// status is read with `WNOWAIT`): while it is a zombie its PID, and so
    /// its process group, cannot be reused, and `Drop` can kill the group
    /// safely.
    pub fn poll_exit(&self) -> Option<ExitStatus> {
        if self.exit.get().is_none() {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
            match waitid(Id::Pid(Pid::from_raw(self.pid as i32)), flags) {
                Ok(WaitStatus::Exited(_, code)) => {
                    self.exit
                        .set(Some(ExitStatus::from_raw((code & 0xff) << 8)));
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    self.exit.set(Some(ExitStatus::from_raw(sig as i32)));
                }
                _ => {}
            }
        }
        self.exit.get()
    }

    /// Everything the master has logged so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Panics with `msg`, the command line, the exit status and the tail of
    /// the log.
    #[track_caller]
    pub fn fail(&self, msg: &str) -> ! {
        let status = match self.poll_exit() {
            Some(s) => s.to_string(),
            None => "still running".to_owned(),
        };
        panic!(
            "{msg}\ncommand: {}\nmaster pid {}: {status}\n--- last {LOG_TAIL_LINES} lines of {} ---\n{}\n---",
            self.command,
            self.pid,
            self.log_path.display(),
            tail(&self.log(), LOG_TAIL_LINES)
        );
    }

    /// Checks `cond`, failing with `msg` and the log when it does not hold.
    #[track_caller]
    pub fn check(&self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond {
            let msg = msg();
            self.fail(&msg);
        }
    }

    /// Polls `cond` every 20 ms until it holds; fails after `timeout`.
    /// Returns how long it took.
    #[track_caller]
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Server) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if cond(self) {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                self.fail(&format!("timed out after {timeout:?} waiting until {what}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new client socket for this server.
    pub fn client(&self) -> Client {
        Client::new(self.addr())
    }

    /// Sends one JSON request from a fresh socket and returns the reply
    /// that matches its id (retrying a lost one twice); fails otherwise.
    #[track_caller]
    pub fn ask(&self, request: &str) -> Reply {
        match self
            .client()
            .request(request.as_bytes(), Duration::from_secs(3), 3)
        {
            Some(r) => r,
            None => self.fail(&format!("no reply to {request} after 3 attempts of 3 s")),
        }
    }

    /// `ask` for the text dialect: one datagram, its first reply.
    #[track_caller]
    pub fn ask_text(&self, payload: &[u8]) -> String {
        match self.client().request(payload, Duration::from_secs(3), 3) {
            Some(r) => r.text(),
            None => self.fail(&format!(
                "no reply to text {:?} after 3 attempts of 3 s",
                String::from_utf8_lossy(payload)
            )),
        }
    }

    /// The master's `stats` reply, as JSON.
    #[track_caller]
    pub fn stats(&self) -> Value {
        let reply = self.ask(r#"{"op":"stats","id":"harness-stats"}"#);
        let v = reply.json();
        if v["ok"] != Value::Bool(true) {
            self.fail(&format!("stats failed: {}", reply.text()));
        }
        v
    }

    /// Waits (up to `timeout`) until the master has exactly `n` live
    /// children and `stats` says `n` active workers, none booting.
    #[track_caller]
    pub fn wait_pool(&self, n: usize, timeout: Duration) -> Duration {
        self.wait_until(&format!("the pool has {n} workers"), timeout, |s| {
            if s.worker_pids().len() != n {
                return false;
            }
            let st = s.stats();
            st["pool"]["active"] == n
                && st["workers"]
                    .as_array()
                    .is_some_and(|w| w.len() == n && w.iter().all(|w| w["state"] != "booting"))
        })
    }
}

impl Drop for Server {
    /// Kills the master's whole process group and reaps the master, so a
    /// failing test leaves nothing running.
    fn drop(&mut self) {
        // The master is not reaped yet (see poll_exit): the group is ours.
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        eprintln!(
            "harness: master {} did not die within 10 s of SIGKILL",
            self.pid
        );
    }
}

/// The address in the master's `listening on ADDR with ...` line.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let rest = log.split("listening on ").nth(1)?;
    let line = rest.lines().next()?;
    line.split(" with ").next()?.trim().parse().ok()
}

/// One line of a log as `udp_pool::init_logging` writes it:
/// `[2026-05-01T10:00:00.123456Z] [4242] [INFO] master::arbiter: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine<'a> {
    /// The UTC time, as written.
    pub time: &'a str,
    /// The PID of the process that wrote it.
    pub pid: u32,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: &'a str,
    /// The module that logged it (`master::arbiter`, `worker::serve`).
    pub target: &'a str,
    /// The message.
    pub message: &'a str,
}

impl<'a> LogLine<'a> {
    /// Parses `line`, or `None` if it is not in the log format (the time
    /// must be RFC 3339 UTC with microseconds).
    pub fn parse(line: &'a str) -> Option<LogLine<'a>> {
        let (time, rest) = line.strip_prefix('[')?.split_once("] [")?;
        let (pid, rest) = rest.split_once("] [")?;
        let (level, rest) = rest.split_once("] ")?;
        let (target, message) = rest.split_once(": ")?;
        // 2026-05-01T10:00:00.123456Z: digits everywhere but these places.
        let shape = time.len() == 27
            && time.char_indices().all(|(i, c)| match i {
                4 | 7 => c == '-',
                10 => c == 'T',
                13 | 16 => c == ':',
                19 => c == '.',
                26 => c == 'Z',
                _ => c.is_ascii_digit(),
            });
        let level_ok = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level);
        (shape && level_ok && !target.contains(' ')).then_some(LogLine {
            time,
            pid: pid.parse().ok()?,
            level,
            target,
            message,
        })
    }
}

// ----- processes ------------------------------------------------------------

/// A process as `/proc/PID/stat` shows it. `start` (its start time in clock
/// ticks since boot) tells a process from a later one with the same PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proc {
    /// Its PID.
    pub pid: u32,
    /// Start time, clock ticks after boot.
    pub start: u64,
}

/// The fields of `/proc/PID/stat` the tests use.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// R, S, D, Z, ...
    pub state: char,
    /// Parent PID.
    pub ppid: u32,
    /// Process group.
    pub pgrp: u32,
    /// Start time, clock ticks after boot.
    pub start: u64,
}

/// `/proc/PID/stat`, if the process exists (zombies included).
pub fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: split after the last ')'.
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// Whether `p` still runs: it exists and is not a zombie. (Orphans that
/// died may stay zombies here: PID 1 of this machine does not reap them.)
pub fn alive(p: Proc) -> bool {
    stat(p.pid).is_some_and(|s| s.start == p.start && s.state != 'Z' && s.state != 'X')
}

/// Whether `p` still exists in any state, zombie included.
pub fn exists(p: Proc) -> bool {
    stat(p.pid).is_some_and(|s| s.start == p.start)
}

/// Every live (not zombie) process for which `pick` holds, sorted by PID.
pub fn live_processes(pick: impl Fn(&Stat) -> bool) -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        match stat(pid) {
            Some(s) if s.state != 'Z' && s.state != 'X' && pick(&s) => out.push(Proc {
                pid,
                start: s.start,
            }),
            _ => {}
        }
    }
    out.sort();
    out
}

/// The live children of `parent`, sorted by PID.
pub fn children_of(parent: u32) -> Vec<Proc> {
    live_processes(|s| s.ppid == parent)
}

/// The live members of process group `pgid`, sorted by PID.
pub fn group_members(pgid: u32) -> Vec<Proc> {
    live_processes(|s| s.pgrp == pgid)
}

/// The value of field `name` (`Uid`, `Seccomp`, ...) of
/// `/proc/PID/status`, its tabs and spaces made single spaces.
pub fn status_field(pid: u32, name: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(name))?;
    let value = line.split_once(':')?.1;
    Some(value.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `VmRSS` of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ----- replies --------------------------------------------------------------

/// One reply datagram.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply(pub Vec<u8>);

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.text();
        if text.chars().count() > 300 {
            let head: String = text.chars().take(300).collect();
            write!(f, "{head}...({} bytes)", self.0.len())
        } else {
            write!(f, "{text}")
        }
    }
}

impl Reply {
    /// The datagram as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// The datagram as JSON (`Null` if it is not JSON). Numbers lose
    /// precision past f64/u64: compare big ones with [`Reply::raw`].
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.0).unwrap_or(Value::Null)
    }

    /// The exact JSON text of the top-level field `name`.
    pub fn raw(&self, name: &str) -> Option<String> {
        raw_fields(&self.0)?.remove(name)
    }

    /// `ok` is `true`.
    pub fn is_ok(&self) -> bool {
        self.json()["ok"] == Value::Bool(true)
    }

    /// The error code of an `ok:false` reply.
    pub fn error(&self) -> Option<String> {
        let v = self.json();
        (v["ok"] == Value::Bool(false))
            .then(|| v["error"].as_str().map(str::to_owned))
            .flatten()
    }

    /// `worker_pid`, if there is one.
    pub fn worker_pid(&self) -> Option<u32> {
        self.json()["worker_pid"].as_u64().map(|p| p as u32)
    }
}

/// The exact JSON text of each top-level field of a JSON object.
pub fn raw_fields(datagram: &[u8]) -> Option<BTreeMap<String, String>> {
    let map: BTreeMap<String, Box<RawValue>> = serde_json::from_slice(datagram).ok()?;
    Some(
        map.into_iter()
            .map(|(k, v)| (k, v.get().to_owned()))
            .collect(),
    )
}

/// `n * n` for an integer literal of any size, as decimal text.
pub fn square_of(n: &str) -> String {
    let v: BigInt = n
        .parse()
        .unwrap_or_else(|e| panic!("{n:?} is not an integer: {e}"));
    (&v * &v).to_string()
}

// ----- the client -----------------------------------------------------------

/// Ids unique over the whole test run, so replies cannot be confused.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A UDP socket connected to a server.
pub struct Client {
    socket: UdpSocket,
    server: SocketAddr,
}

/// How [`Client::many`] sends its stream.
#[derive(Clone)]
pub struct Load {
    /// Requests outstanding at once.
    pub window: usize,
    /// A request without a reply this long after it was sent is sent again.
    pub resend_after: Duration,
    /// Sends per request, the first included.
    pub attempts: u32,
    /// At most one new request per this interval (retries are not paced).
    pub pace: Option<Duration>,
    /// The whole stream gives up after this long.
    pub deadline: Duration,
    /// Counts requests answered so far, for a test that acts mid-stream.
    pub progress: Option<Arc<AtomicUsize>>,
    /// Once set, no new request is sent, and the stream ends when every
    /// request sent is answered or given up (a test that stopped the server).
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            window: 16,
            resend_after: Duration::from_secs(3),
            attempts: 3,
            pace: None,
            deadline: Duration::from_secs(60),
            progress: None,
            stop: None,
        }
    }
}

/// What came back from [`Client::many`].
#[derive(Debug, Default)]
pub struct Many {
    /// The first reply to each request, in request order (`None`: none
    /// after every attempt).
    pub replies: Vec<Option<Reply>>,
    /// The id each request was sent with.
    pub ids: Vec<u64>,
    /// Requests sent at least once: the first `sent` (all of them, unless
    /// `load.stop` ended the stream early).
    pub sent: usize,
    /// Requests that had to be sent again (their first send got no reply
    /// within `resend_after`).
    pub resent: usize,
    /// Second and later replies to one request.
    pub duplicates: usize,
    /// Replies whose id matched no request.
    pub unmatched: usize,
    /// How long the whole stream took.
    pub elapsed: Duration,
}

impl Many {
    /// Indices of requests that got no reply at all.
    pub fn missing(&self) -> Vec<usize> {
        (0..self.replies.len())
            .filter(|&i| self.replies[i].is_none())
            .collect()
    }
}

impl Client {
    /// A socket on the loopback address of `server`'s family, connected to it.
    pub fn new(server: SocketAddr) -> Client {
        let local: SocketAddr = if server.is_ipv4() {
            "127.0.0.1:0".parse().unwrap()
        } else {
            "[::1]:0".parse().unwrap()
        };
        let socket = UdpSocket::bind(local).expect("bind a client socket");
        socket.connect(server).expect("connect the client socket");
        Client { socket, server }
    }

    /// Its socket, to read what it was sent.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// The client's own address.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local_addr")
    }

    /// The server it talks to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Sends one datagram. Errors (an ICMP error left by an earlier send)
    /// are ignored: the caller waits for a reply anyway.
    pub fn send(&self, payload: &[u8]) {
        let _ = self.socket.send(payload);
    }

    /// The next datagram within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Reply> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.socket.recv(&mut buf) {
                Ok(n) => return Some(Reply(buf[..n].to_vec())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ICMP port unreachable from an earlier send: keep waiting.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::thread::sleep(Duration::from_millis(5).min(left));
                }
                Err(_) => return None,
            }
        }
    }

    /// Sends `payload` once and returns the first reply within `timeout`.
    pub fn request_raw(&self, payload: &[u8], timeout: Duration) -> Option<Vec<u8>> {
        self.send(payload);
        self.recv(timeout).map(|r| r.0)
    }

    /// Sends `payload` up to `attempts` times, each waiting `timeout`, and
    /// returns the first reply that answers it: for a JSON request with an
    /// `id`, the reply echoing that id; otherwise the first reply.
    pub fn request(&self, payload: &[u8], timeout: Duration, attempts: u32) -> Option<Reply> {
        let want_id = raw_fields(payload).and_then(|mut f| f.remove("id"));
        for _ in 0..attempts {
            self.send(payload);
            let deadline = Instant::now() + timeout;
            while let Some(reply) = self.recv(deadline.saturating_duration_since(Instant::now())) {
                match &want_id {
                    Some(id) if reply.raw("id").as_ref() != Some(id) => continue,
                    _ => return Some(reply),
                }
            }
        }
        None
    }

    /// Sends a JSON request (with or without an id) like [`Client::request`]
    /// (3 attempts of 3 s) and returns the reply as JSON, or `Null`.
    pub fn request_json(&self, request: &str) -> Value {
        self.request(request.as_bytes(), Duration::from_secs(3), 3)
            .map_or(Value::Null, |r| r.json())
    }

    /// Sends every JSON request in `requests` (objects without an `id`: each
    /// gets a fresh numeric one), keeping `load.window` outstanding, matches
    /// replies by id, resends lost ones up to `load.attempts` times, and
    /// returns what came back.
    pub fn many(&self, requests: &[String], load: &Load) -> Many {
        let n = requests.len();
        let base = NEXT_ID.fetch_add(n as u64, Ordering::Relaxed);
        let ids: Vec<u64> = (0..n as u64).map(|i| base + i).collect();
        let payloads: Vec<Vec<u8>> = requests
            .iter()
            .zip(&ids)
            .map(|(r, id)| with_id(r, *id).into_bytes())
            .collect();
        let index: HashMap<u64, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let mut out = Many {
            replies: vec![None; n],
            ids,
            ..Many::default()
        };
        let mut attempts = vec![0u32; n];
        let mut gave_up = vec![false; n];
        let mut sent_at = vec![Instant::now(); n];
        // Requests sent and not answered, oldest send first.
        let mut pending: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
        let mut settled = 0usize;
        let mut outstanding = 0usize;
        let mut next = 0usize;
        let started = Instant::now();
        let mut buf = vec![0u8; 65536];
        self.socket
            .set_read_timeout(Some(Duration::from_millis(2)))
            .expect("set_read_timeout");
        while settled < n && started.elapsed() < load.deadline {
            let stopped = load
                .stop
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Relaxed));
            if stopped && outstanding == 0 {
                break;
            }
            // Fill the window.
            while !stopped && next < n && outstanding < load.window {
                if let Some(pace) = load.pace {
                    if started.elapsed() < pace * next as u32 {
                        break;
                    }
                }
                // A failed send is a lost request: it is resent later.
                let _ = self.socket.send(&payloads[next]);
                attempts[next] = 1;
                outstanding += 1;
                sent_at[next] = Instant::now();
                pending.push_back(next);
                next += 1;
            }
            // Take every reply that is there.
            loop {
                match self.socket.recv(&mut buf) {
                    Ok(len) => {
                        let reply = Reply(buf[..len].to_vec());
                        let Some(i) = reply
                            .raw("id")
                            .and_then(|id| id.parse::<u64>().ok())
                            .and_then(|id| index.get(&id).copied())
                        else {
                            out.unmatched += 1;
                            continue;
                        };
                        if out.replies[i].is_some() {
                            out.duplicates += 1;
                        } else if gave_up[i] {
                            // Answered after its last attempt expired: late, but answered.
                            out.replies[i] = Some(reply);
                        } else {
                            out.replies[i] = Some(reply);
                            settled += 1;
                            outstanding -= 1;
                            if let Some(p) = &load.progress {
                                p.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Do not block again while replies keep coming.
                        self.socket.set_nonblocking(true).expect("nonblocking");
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(_) => break,
                }
            }
            self.socket.set_nonblocking(false).expect("blocking");
            // Drop answered requests from the front; resend or give up on old ones.
            let now = Instant::now();
            let mut again = Vec::new();
            while let Some(&i) = pending.front() {
                if out.replies[i].is_some() {
                    pending.pop_front();
                } else if now.duration_since(sent_at[i]) >= load.resend_after {
                    pending.pop_front();
                    if attempts[i] < load.attempts {
                        if attempts[i] == 1 {
                            out.resent += 1;
                        }
                        attempts[i] += 1;
                        let _ = self.socket.send(&payloads[i]);
                        sent_at[i] = now;
                        again.push(i);
                    } else {
                        gave_up[i] = true;
                        settled += 1;
                        outstanding -= 1;
                    }
                } else {
                    break;
                }
            }
            pending.extend(again);
        }
        out.elapsed = started.elapsed();
        out.sent = next;
        out
    }
}

/// `request` (a JSON object without `id`) with `"id":id` added first.
pub fn with_id(request: &str, id: u64) -> String {
    let body = request.trim();
    let inner = body
        .strip_prefix('{')
        .unwrap_or_else(|| panic!("not a JSON object: {request}"));
    if inner.trim_start().starts_with('}') {
        format!("{{\"id\":{id}}}")
    } else {
        format!("{{\"id\":{id},{inner}")
    }
}

/// A UDP port on 127.0.0.1 where nothing listens (bound, then released).
pub fn unused_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("local_addr").port()
}

/// A small xorshift generator: the same "random" choices on every run
/// (which worker to kill next, the bytes of a fuzzed datagram).
pub struct Rng(pub u64);

impl Rng {
    /// The next number of the stream.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A master whose journal is `j.db` in a temporary directory of its own, so
/// the path is absolute and the file can be read after the master is gone.
pub struct Journaled {
    // Dropped first: the master's process group dies before its files go.
    pub server: Server,
    pub path: PathBuf,
    _dir: TempDir,
}

impl Journaled {
    /// Starts `master --journal <tempdir>/j.db ARGS` and waits for it to serve.
    pub fn start(args: &[&str]) -> Journaled {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.path().join("j.db");
        let text = path.to_str().expect("a UTF-8 temp path").to_owned();
        let mut full = vec!["--journal", text.as_str()];
        full.extend_from_slice(args);
        let server = Server::start(&full);
        Journaled {
            server,
            path,
            _dir: dir,
        }
    }

    /// SIGTERM and an exit 0: every row is in the journal.
    pub fn stop(&self) {
        let s = &self.server;
        s.signal(Signal::SIGTERM);
        let status = s.wait_exit(Duration::from_secs(20));
        s.check(status.is_some_and(|st| st.success()), || {
            format!("after SIGTERM: expected exit 0, got {status:?}")
        });
    }
}
