//! Telling the service manager what the master is doing (`sd_notify`:
//! systemd's `Type=notify`), through the `sd-notify` crate. Without
//! `NOTIFY_SOCKET` in the environment nothing is sent.
//!
//! The messages: `READY=1` once the workers are up (and again after a
//! replacement that was rolled back), `RELOADING=1` when `USR2` starts a
//! new master, `MAINPID=<new>` when the new master takes over (it then
//! says `READY=1` itself), `STOPPING=1` when a stop begins. Only the
//! service's main process speaks: a master that has handed over says
//! nothing more, and one started by `USR2` says nothing before it takes
//! over. Workers never see `NOTIFY_SOCKET` (`spawn` removes it).

pub use sd_notify::NotifyState as State;

/// The variable that names the service manager's socket.
pub const SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Sends `states` as one message, if a service manager listens. A failure
/// is logged, not returned: serving matters more than reporting it.
pub fn send(states: &[State]) {
    if std::env::var_os(SOCKET_ENV).is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        let what: Vec<String> = states.iter().map(ToString::to_string).collect();
        log::warn!(
            "cannot tell the service manager {} (through {SOCKET_ENV}): {e}",
            what.join(" ")
        );
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd's `Type=notify-reload`
/// wants beside it.
pub fn reloading() {
    match State::monotonic_usec_now() {
        Ok(now) => send(&[State::Reloading, now]),
        Err(_) => send(&[State::Reloading]),
    }
}
