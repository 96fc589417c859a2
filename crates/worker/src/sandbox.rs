//! The worker's seccomp filter: once started (signals set up, and
//! before it writes READY), a worker needs only a handful of system calls to read
//! requests, answer them and stop; any other one kills it (`SIGSYS`), and
//! the master handles that like any crash.
//!
//! The allow-list is what `strace -f` saw workers do after READY through
//! every path a worker takes: requests of both dialects (squares up to the
//! largest that fits a reply, and 65,000 digits, hello, errors), `sleep`
//! (also stopped and continued), `crash` (abort), a worker's `TERM` and
//! `QUIT`, the end of the request pipe (TTOU, HUP, the master's `TERM`),
//! a burst of 300 requests, and log lines; plus a few calls the C library
//! makes on paths a test cannot force (see [`allowed`]).
//! `open`, `socket`, `connect`, `execve`, `fork`/`clone`, `ptrace` and the
//! rest are absent: a worker that something strange got control of cannot
//! read files, reach the network other than by replying on its socket, or
//! start programs.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// This architecture has no allow-list (the master does not ask for a
    /// filter there: see `protocol::handoff::SECCOMP_AVAILABLE`).
    #[error("no seccomp allow-list for {0}")]
    Unsupported(&'static str),
    /// seccompiler refused the filter or the kernel refused to install it.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    /// seccompiler could not compile the filter.
    #[error("seccomp: {0}")]
    Backend(#[from] seccompiler::BackendError),
}

/// The system calls a started worker makes, and nothing else. Each is
/// there for a reason; "seen" means `strace -f` saw workers make it after
/// READY (see the module's documentation for the paths exercised):
///
/// * `read`, `write` (seen): the request pipe, the completion pipe, log
///   lines on stderr.
/// * `sendmmsg` (seen): replies, through `netio::ReplyBatch`.
/// * `clock_nanosleep` (seen): the `sleep` op, in slices.
/// * `restart_syscall`: resumes a `clock_nanosleep` that a stop and a
///   continue (`SIGSTOP`/`SIGCONT`, a Ctrl-Z) interrupted.
/// * `clock_gettime`: the clock of `sleep` and of log lines. The vDSO
///   answers it without a system call, except on a clock source it does
///   not support (some virtual machines), where every worker would die.
/// * `brk`, `munmap` (seen), `mmap`, `mremap`: the allocator. Squares of
///   every size the protocol allows grew the heap with `brk` only; `mmap`
///   is malloc's way for blocks of 128 KiB and more and its fallback when
///   `brk` fails, `mremap` its way to grow such a block.
/// * `rt_sigreturn` (seen): returning from the `TERM` and `QUIT` handlers.
/// * `rt_sigprocmask`, `getpid`, `gettid`, `tgkill` (seen): `abort()`, for
///   the fault-injection `crash` (and a panic that aborts): it must die of
///   `SIGABRT`, as documented, not of `SIGSYS`.
/// * `sigaltstack`, `munmap`, `close`, `exit_group` (seen): leaving `main`
///   (std takes down the signal stack, the descriptors are closed).
///
/// Absent on purpose: `open`/`openat`, `socket`, `connect`, `sendto`,
/// `execve`, `fork`/`clone`, `ptrace`, `rt_sigaction`, `mprotect`,
/// `futex` (a worker has one thread), `prctl`, `seccomp`.
fn allowed() -> Vec<i64> {
    vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_sendmmsg,
        libc::SYS_clock_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_clock_gettime,
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_tgkill,
        libc::SYS_sigaltstack,
        libc::SYS_close,
        libc::SYS_exit_group,
    ]
}

/// The architecture the filter is compiled for: this process's.
fn target_arch() -> Result<TargetArch, SandboxError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SandboxError::Unsupported(std::env::consts::ARCH))
    }
}

/// The worker's filter as a BPF program: the calls of [`allowed`] pass,
/// any other kills the whole process (`SECCOMP_RET_KILL_PROCESS`), and so
/// does a call made through another architecture's convention.
///
/// # Errors
/// On an architecture without an allow-list.
pub fn program() -> Result<BpfProgram, SandboxError> {
    let rules = allowed()
        .into_iter()
        .map(|nr| (nr, Vec::<SeccompRule>::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Installs `program` on the calling thread, for good: sets
/// `PR_SET_NO_NEW_PRIVS`, then the filter. A worker has one thread, so it
/// covers the whole process. Makes two system calls and allocates
/// nothing, so a test may call it in a freshly forked child.
///
/// # Errors
/// When the kernel refuses (no seccomp support, say).
pub fn install(program: &BpfProgram) -> Result<(), SandboxError> {
    Ok(seccompiler::apply_filter(program)?)
}

/// Confines the calling worker to [`allowed`]: [`program`], then
/// [`install`].
///
/// # Errors
/// As they do.
pub fn confine() -> Result<(), SandboxError> {
    install(&program()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    /// Forks a child that installs the worker's filter and then runs
    /// `then`; returns how it ended. The program is built before the fork:
    /// the child only makes system calls.
    fn filtered_child(then: fn() -> i32) -> WaitStatus {
        let program = program().expect("the filter builds");
        // SAFETY: the child calls only `install` (prctl and seccomp, no
        // allocation), the raw calls of `then`, and `_exit`: all
        // async-signal-safe, so the test harness's other threads do not
        // matter.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = match install(&program) {
                    Ok(()) => then(),
                    Err(_) => 100,
                };
                // SAFETY: leaves the child at once, running no destructor
                // and no atexit handler of the parent's.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    #[test]
    fn a_filtered_worker_cannot_open_a_file() {
        let status = filtered_child(|| {
            // SAFETY: a NUL-terminated path and plain flags.
            let fd = unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
            // Not reached: the call kills the process.
            if fd >= 0 {
                0
            } else {
                1
            }
        });
        assert!(
            matches!(
                status,
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
            ),
            "open under the filter: expected death by SIGSYS, got {status:?}"
        );
    }

    #[test]
    fn a_filtered_worker_cannot_start_a_program_or_open_a_socket() {
        let socket = filtered_child(|| {
            // SAFETY: plain integer arguments.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            i32::from(fd < 0)
        });
        let fork = filtered_child(|| {
            // SAFETY: raw fork; in the child (not reached) it exits at once.
            let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            i32::from(pid != 0)
        });
        for (what, status) in [("socket", socket), ("clone", fork)] {
            assert!(
                matches!(
                    status,
                    WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
                ),
                "{what} under the filter: expected death by SIGSYS, got {status:?}"
            );
        }
    }

    #[test]
    fn a_filtered_worker_still_writes_sleeps_and_exits() {
        let status = filtered_child(|| {
            let msg = b"";
            // SAFETY: a zero-length write to stderr, and a 1 ms sleep on
            // a timespec on the stack.
            unsafe {
                if libc::write(2, msg.as_ptr().cast(), 0) != 0 {
                    return 1;
                }
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                };
                if libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut()) != 0 {
                    return 2;
                }
            }
            7
        });
        assert_eq!(status, WaitStatus::Exited(status.pid().unwrap(), 7));
    }
}
