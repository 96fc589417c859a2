//! Starting one worker process: its two pipes, the hand-off, fork and exec,
//! and between the two its confinement: resource limits, user and group.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::Pid;
use protocol::handoff::{self, Handoff};

use crate::privileges::{Confinement, WORKER_OPEN_FILES};

/// A worker just started: its PID and the master's ends of its pipes.
pub struct Spawned {
    /// The worker's PID.
    pub pid: Pid,
    /// Write end of the request pipe (non-blocking).
    pub requests: OwnedFd,
    /// Read end of the completion pipe (non-blocking).
    pub completions: OwnedFd,
}

/// Starts the worker executable at `path`, handing it `socket`.
///
/// Every descriptor the master opens is close-on-exec; the child clears
/// that flag on exactly its three descriptors, so no worker inherits another
/// worker's pipes (which would hide that worker's death from the master).
///
/// Between fork and exec the child also takes on `confinement`: no core
/// dumps, at most [`WORKER_OPEN_FILES`] descriptors, its memory limit, and
/// its user and group (supplementary groups first, then the group, then
/// the user: each step needs the privilege the next one drops). Its seccomp
/// filter it installs itself, once started (the hand-off says whether).
///
/// # Errors
/// When a pipe cannot be made or the executable cannot be started (as the
/// user it is confined to: that user must be able to execute it).
pub fn spawn_worker(
    path: &Path,
    socket: BorrowedFd<'_>,
    master_pid: u32,
    fault_injection: bool,
    confinement: &Confinement,
) -> io::Result<Spawned> {
    let (req_r, req_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (done_r, done_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    for fd in [&req_w, &done_r] {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    let inherited = [socket.as_raw_fd(), req_r.as_raw_fd(), done_w.as_raw_fd()];
    let handoff = Handoff {
        socket: inherited[0],
        requests: inherited[1],
        completions: inherited[2],
        master: master_pid,
        fault_injection,
        seccomp: confinement.seccomp,
    };
    // Everything the child needs, as plain integers, before the fork.
    // The resource limits, soft and hard alike (a worker cannot raise them
    // again): no core dumps (a worker's memory holds clients' data), a few
    // descriptors, and its address space.
    let limits = [
        (libc::RLIMIT_CORE, 0),
        (libc::RLIMIT_NOFILE, WORKER_OPEN_FILES as libc::rlim_t),
        (libc::RLIMIT_AS, address_space(confinement)),
    ];
    let credentials = confinement
        .credentials
        .map(|c| (c.uid.as_raw(), c.gid.as_raw()));
    let mut cmd = Command::new(path);
    // The service manager's socket is the master's to speak on, not a
    // worker's.
    cmd.env(handoff::ENV, handoff.to_string())
        .env_remove(crate::notify::SOCKET_ENV)
        .stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec and calls only
    // fcntl(2), sigprocmask(2) (on a set built on the stack with
    // sigemptyset(3)), setrlimit(2), setgroups(2), setgid(2), setuid(2) and
    // prctl(2), which are async-signal-safe (the child has one thread, so
    // glibc's set*id need not signal others); it allocates nothing and
    // touches only the copied integers above and an array on its stack.
    unsafe {
        cmd.pre_exec(move || {
            // The master blocks the signals its signalfd reads; a worker
            // starts with none blocked.
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            if libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut()) == -1 {
                return Err(io::Error::last_os_error());
            }
            for (resource, value) in limits {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &limit) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid)) = credentials {
                let groups = [gid];
                if libc::setgroups(1, groups.as_ptr()) == -1
                    || libc::setgid(gid) == -1
                    || libc::setuid(uid) == -1
                {
                    return Err(io::Error::last_os_error());
                }
            }
            for fd in inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Die with the master, even if it is SIGKILLed. After the
            // switch of user: a change of credentials clears this setting.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // The child's ends close here, in the master.
    drop((req_r, done_w));
    Ok(Spawned {
        pid: Pid::from_raw(child.id() as i32),
        requests: req_w,
        completions: done_r,
    })
}

/// A worker's `RLIMIT_AS`: its memory limit, or none.
fn address_space(confinement: &Confinement) -> libc::rlim_t {
    confinement
        .memory_limit
        .map_or(libc::RLIM_INFINITY, |bytes| bytes as libc::rlim_t)
}
