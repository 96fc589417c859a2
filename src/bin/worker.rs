//! `worker`: started by `master`, one per pool slot. See the `worker` crate.

use std::process::ExitCode;

fn main() -> ExitCode {
    udp_pool::init_logging("info");
    let Ok(value) = std::env::var(protocol::handoff::ENV) else {
        eprintln!(
            "worker: this program is started by `master` (try `master --workers 4`), not by hand"
        );
        return ExitCode::from(2);
    };
    let handoff = match value.parse() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(2);
        }
    };
    match worker::serve::run(handoff) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker {}: {e:#}", std::process::id());
            ExitCode::FAILURE
        }
    }
}
