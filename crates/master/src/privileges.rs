//! Least privilege for workers: the user and group they run as and the
//! resource limits they start with, decided once at start-up from
//! `--user`, `--group`, `--worker-memory-limit` and `--no-seccomp`, and
//! applied by [`crate::spawn`] between fork and exec.
//!
//! The master keeps its own user: it has bound the socket (a port below
//! 1024 needs root) and must signal and reap workers of any user. Only the
//! workers, which read what strangers send, drop to `--user`.

use anyhow::{bail, Context};
use nix::unistd::{Gid, Group, Uid, User};

/// `RLIMIT_NOFILE` of a worker, soft and hard: it holds three descriptors
/// (the socket, two pipes) and stdin, stdout and stderr, and opens none
/// after start-up; the rest is headroom for the runtime.
pub const WORKER_OPEN_FILES: u64 = 64;

/// The default `--worker-memory-limit`, MiB of address space (`RLIMIT_AS`).
/// An idle worker maps 5.3 MiB (`VmSize`), and 6.1 MiB at most after the
/// largest squares a reply holds, a 65,000-digit request and bursts of
/// 2,000 requests (`VmPeak`): the limit only has to stop a runaway one.
pub const DEFAULT_WORKER_MEMORY_MIB: u64 = 256;

/// The smallest `--worker-memory-limit` other than 0: below this a worker
/// cannot even map its executable and libraries.
pub const MIN_WORKER_MEMORY_MIB: u64 = 32;

/// The largest `--worker-memory-limit`: 1 TiB.
pub const MAX_WORKER_MEMORY_MIB: u64 = 1 << 20;

/// The user and group a worker switches to before exec (with no
/// supplementary group but `gid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// The user ID.
    pub uid: Uid,
    /// The group ID, also its only supplementary group.
    pub gid: Gid,
}

/// What a worker runs as and within, the same for every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confinement {
    /// The user and group to switch to; `None` keeps the master's.
    pub credentials: Option<Credentials>,
    /// `RLIMIT_AS` in bytes; `None` is unlimited.
    pub memory_limit: Option<u64>,
    /// Whether the worker installs its seccomp filter once started.
    pub seccomp: bool,
}

impl Confinement {
    /// No user switch, no memory limit, no filter (core dumps and
    /// descriptors are still capped): for tests of other things.
    pub fn none() -> Confinement {
        Confinement {
            credentials: None,
            memory_limit: None,
            seccomp: false,
        }
    }
}

/// `--worker-memory-limit` in MiB (0: unlimited) as an `RLIMIT_AS` value.
pub fn memory_limit(mib: u64) -> Option<u64> {
    (mib != 0).then(|| mib * 1024 * 1024)
}

/// The credentials `--user` and `--group` name, or `None` when workers
/// keep the master's. `--group` defaults to the user's primary group. A
/// name that is all digits and names no user (group) is taken as an ID.
///
/// # Errors
/// When a user or group does not exist, or when the master is not root
/// and the names are not its own user and group (only root can switch).
pub fn resolve(user: Option<&str>, group: Option<&str>) -> anyhow::Result<Option<Credentials>> {
    let Some(user) = user else {
        if let Some(group) = group {
            bail!("--group {group} needs --user");
        }
        return Ok(None);
    };
    let found = lookup_user(user)?;
    let gid = match group {
        Some(g) => lookup_group(g)?,
        None => found.gid,
    };
    let wanted = Credentials {
        uid: found.uid,
        gid,
    };
    let current = Credentials {
        uid: Uid::effective(),
        gid: Gid::effective(),
    };
    decide(current, wanted).map_err(|why| {
        anyhow::anyhow!(
            "--user {user}{}: {why}",
            group.map(|g| format!(" --group {g}")).unwrap_or_default()
        )
    })
}

/// Whether a master running as `current` can run its workers as
/// `wanted`, and whether it must switch to do so: root can switch to
/// anyone; another user only "switches" to itself, which needs nothing.
fn decide(current: Credentials, wanted: Credentials) -> Result<Option<Credentials>, String> {
    if current.uid.is_root() {
        return Ok(Some(wanted));
    }
    if wanted == current {
        return Ok(None);
    }
    Err(format!(
        "only root can start workers as another user or group (the master runs as uid {} gid {})",
        current.uid, current.gid
    ))
}

fn lookup_user(name: &str) -> anyhow::Result<User> {
    let by_name = User::from_name(name).with_context(|| format!("cannot look up user {name}"))?;
    let by_id = || match name.parse::<u32>() {
        Ok(id) => User::from_uid(Uid::from_raw(id)).ok().flatten(),
        Err(_) => None,
    };
    by_name
        .or_else(by_id)
        .with_context(|| format!("--user {name}: no such user"))
}

fn lookup_group(name: &str) -> anyhow::Result<Gid> {
    let by_name = Group::from_name(name).with_context(|| format!("cannot look up group {name}"))?;
    let by_id = || match name.parse::<u32>() {
        Ok(id) => Group::from_gid(Gid::from_raw(id)).ok().flatten(),
        Err(_) => None,
    };
    by_name
        .or_else(by_id)
        .map(|g| g.gid)
        .with_context(|| format!("--group {name}: no such group"))
}

/// Says once that a root master without `--user` runs its workers as root.
pub fn warn_if_root_without_user(user: Option<&str>, workers: usize) {
    if user.is_none() && Uid::effective().is_root() {
        let who = if workers == 0 {
            "the master answers requests as root"
        } else {
            "workers run as root too"
        };
        log::warn!(
            "running as root without --user: {who}; pass --user nobody (or a dedicated user) \
             so that what strangers send is handled without privileges"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(uid: u32, gid: u32) -> Credentials {
        Credentials {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
        }
    }

    #[test]
    fn root_switches_to_anyone_and_others_only_to_themselves() {
        assert_eq!(
            decide(creds(0, 0), creds(65534, 65534)),
            Ok(Some(creds(65534, 65534)))
        );
        assert_eq!(decide(creds(0, 0), creds(0, 0)), Ok(Some(creds(0, 0))));
        assert_eq!(decide(creds(1000, 1000), creds(1000, 1000)), Ok(None));
        let e = decide(creds(1000, 1000), creds(65534, 65534)).unwrap_err();
        assert!(e.contains("only root") && e.contains("uid 1000"), "{e}");
        assert!(decide(creds(1000, 1000), creds(1000, 0)).is_err());
    }

    #[test]
    fn names_resolve_and_missing_ones_are_one_clear_error() {
        assert_eq!(resolve(None, None).unwrap(), None);
        let e = resolve(None, Some("root")).unwrap_err().to_string();
        assert!(e.contains("--group root needs --user"), "{e}");
        let e = resolve(Some("no-such-user-udp-pool"), None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--user no-such-user-udp-pool: no such user");
        let root = User::from_uid(Uid::effective()).unwrap().unwrap();
        let e = resolve(Some(&root.name), Some("no-such-group-udp-pool"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--group no-such-group-udp-pool: no such group");
        // Naming oneself always works, by name or by ID; it switches only as root.
        let me = resolve(Some(&root.name), None).unwrap();
        let by_id = resolve(Some(&Uid::effective().to_string()), None).unwrap();
        assert_eq!(me, by_id);
        assert_eq!(me.is_some(), Uid::effective().is_root());
    }

    #[test]
    fn memory_limits_are_mib_and_zero_is_unlimited() {
        assert_eq!(memory_limit(0), None);
        assert_eq!(memory_limit(256), Some(256 << 20));
        assert_eq!(
            memory_limit(MAX_WORKER_MEMORY_MIB),
            Some(MAX_WORKER_MEMORY_MIB << 20)
        );
    }
}
