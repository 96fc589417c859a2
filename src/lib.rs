//! What the four binaries (`master`, `worker`, `client`, `loadgen`) share
//! beyond the library crates they call: the format of their log lines.
//!
//! It lives here, in the package that owns the binaries, because setting up
//! a process's logger is a binary's job: no library crate depends on it, so
//! none has to know how lines look, and the master and its workers (which
//! write to the same stderr) cannot drift apart.

use std::io::Write;

/// Sets up the process's logger: `RUST_LOG` chooses the levels
/// (`default_filter` when it is unset), and every line reads
///
/// ```text
/// [2026-05-01T10:00:00.123456Z] [4242] [INFO] master::arbiter: listening on ...
/// ```
///
/// a UTC time (the journal's `ts` format, so lines and rows line up), the
/// PID of the process that wrote it, the level, and where it comes from.
/// Call it once, first thing in `main`: the PID is read then.
pub fn init_logging(default_filter: &str) {
    let pid = std::process::id();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .format(move |buf, record| {
            writeln!(
                buf,
                "[{}] [{pid}] [{}] {}: {}",
                buf.timestamp_micros(),
                record.level(),
                record.target(),
                record.args()
            )
        })
        .init();
}
