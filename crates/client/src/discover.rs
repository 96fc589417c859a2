//! `--discover SEED`: ask one server for `{"op":"members"}` and use the
//! servers of the group that are up, in the order of their server numbers,
//! as the server list (the policies and failover are then the usual ones).
//!
//! Seeds are tried in order, each up to three times; the first that
//! answers decides. The request is padded to [`PADDED_LEN`] bytes so that
//! a server holds its reply to three times that (the amplification bound
//! for sources it does not trust) and not less. A member whose address is
//! a wildcard (`0.0.0.0`) is reached at the seed's IP. A server that runs
//! alone answers with itself.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::addr;

/// What a `members` request is padded to.
pub const PADDED_LEN: usize = 1200;

/// Resends of the `members` request to one seed.
const ATTEMPTS: u32 = 3;

/// A group as one server described it.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The seed that answered.
    pub seed: SocketAddr,
    /// The servers that are up, by server number.
    pub servers: Vec<SocketAddr>,
    /// The whole reply.
    pub reply: Value,
}

/// The `members` request with `id`, padded to [`PADDED_LEN`] bytes.
pub fn members_request(id: &str) -> Vec<u8> {
    let head = format!(r#"{{"op":"members","id":{id},"pad":""#);
    let pad = PADDED_LEN.saturating_sub(head.len() + 2);
    let mut out = head.into_bytes();
    out.resize(out.len() + pad, b'.');
    out.extend_from_slice(b"\"}");
    out
}

/// The servers that are up in a `members` reply from `seed`.
///
/// # Errors
/// When the reply is not a successful `members` reply.
pub fn up_servers(reply: &Value, seed: SocketAddr) -> Result<Vec<SocketAddr>> {
    if reply["ok"] != Value::Bool(true) {
        bail!("{seed} refused members: {reply}");
    }
    let Some(members) = reply["members"].as_array() else {
        bail!("{seed} sent a members reply without members: {reply}");
    };
    let mut up: Vec<(u64, SocketAddr)> = members
        .iter()
        .filter(|m| m["status"] == "up")
        .filter_map(|m| {
            let a: SocketAddr = m["addr"].as_str()?.parse().ok()?;
            let a = if a.ip().is_unspecified() {
                SocketAddr::new(seed.ip(), a.port())
            } else {
                a
            };
            Some((m["server"].as_u64().unwrap_or(u64::MAX), a))
        })
        .collect();
    up.sort();
    let mut servers: Vec<SocketAddr> = up.into_iter().map(|(_, a)| a).collect();
    servers.dedup();
    if servers.is_empty() {
        servers.push(seed);
    }
    Ok(servers)
}

/// Asks each seed in turn for `members`, and returns the first answer.
/// With `loopback_only` (loadgen), seeds and servers must be loopback.
///
/// # Errors
/// When a seed does not resolve, or none answers.
pub fn discover(seeds: &[String], timeout: Duration, loopback_only: bool) -> Result<Group> {
    let seeds = addr::resolve_servers(seeds, loopback_only)?;
    let mut why = Vec::new();
    for seed in seeds {
        match ask(seed, timeout) {
            Ok(reply) => {
                let mut servers = up_servers(&reply, seed)?;
                if loopback_only {
                    if let Some(a) = servers.iter().find(|a| !a.ip().is_loopback()) {
                        bail!(addr::AddrError::NotLoopback(*a));
                    }
                }
                servers.truncate(crate::cli::MAX_SERVERS);
                log::debug!("discovered from {seed}: {servers:?}");
                return Ok(Group {
                    seed,
                    servers,
                    reply,
                });
            }
            Err(e) => why.push(format!("{seed}: {e}")),
        }
    }
    bail!("no seed answered members ({})", why.join("; "))
}

/// One seed's `members` reply, as JSON.
fn ask(seed: SocketAddr, timeout: Duration) -> Result<Value> {
    let socket = UdpSocket::bind(addr::local_wildcard(seed))?;
    socket.connect(seed)?;
    socket.set_read_timeout(Some(timeout))?;
    let id = format!("\"members-{}\"", std::process::id());
    let request = members_request(&id);
    let mut buf = vec![0u8; protocol::MAX_UDP_PAYLOAD + 1];
    for _ in 0..ATTEMPTS {
        socket.send(&request).context("sending members")?;
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let Ok(v) = serde_json::from_slice::<Value>(&buf[..n]) else {
                        continue;
                    };
                    if v["id"].as_str().is_some_and(|i| id.contains(i)) {
                        return Ok(v);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    bail!("refused (nothing listens)")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    bail!(
        "no reply after {ATTEMPTS} attempts of {} ms",
        timeout.as_millis()
    )
}

/// The `members` reply as a table: a header line (view, term, coordinator,
/// stale), then one line per server.
pub fn table(reply: &Value, from: SocketAddr) -> String {
    let mut out = String::new();
    let coordinator = match &reply["coordinator"] {
        Value::Null => "none".to_owned(),
        v => format!("s{v}"),
    };
    out.push_str(&format!(
        "{} mode, view {}, term {}, coordinator {}{} (asked {from})\n",
        reply["mode"].as_str().unwrap_or("?"),
        reply["view"],
        reply["term"],
        coordinator,
        if reply["stale"] == Value::Bool(true) {
            ", STALE (no coordinator reachable from this server)"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "{:<7} {:<24} {:<7} {:<8} {}\n",
        "server", "addr", "status", "role", "swim"
    ));
    for m in reply["members"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<7} {:<24} {:<7} {:<8} {}\n",
            format!("s{}", m["server"]),
            m["addr"].as_str().unwrap_or("?"),
            m["status"].as_str().unwrap_or("?"),
            m["role"].as_str().unwrap_or("?"),
            m["swim"].as_str().unwrap_or("-"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_request_is_padded_and_parses() {
        let r = members_request("\"m-1\"");
        assert_eq!(r.len(), PADDED_LEN);
        let p = protocol::parse(&r).unwrap();
        assert_eq!(p.request, Ok(protocol::Request::Members));
        assert_eq!(p.id, Some("\"m-1\""));
    }

    #[test]
    fn up_servers_in_server_order_wildcards_at_the_seed() {
        let seed: SocketAddr = "127.0.0.9:10001".parse().unwrap();
        let reply = json!({"ok": true, "op": "members", "members": [
            {"server": 3, "addr": "127.0.0.3:10001", "status": "up"},
            {"server": 1, "addr": "0.0.0.0:10001", "status": "up"},
            {"server": 2, "addr": "127.0.0.2:10001", "status": "down"},
        ]});
        assert_eq!(
            up_servers(&reply, seed).unwrap(),
            [
                "127.0.0.9:10001".parse::<SocketAddr>().unwrap(),
                "127.0.0.3:10001".parse().unwrap()
            ]
        );
        let none_up = json!({"ok": true, "members": []});
        assert_eq!(up_servers(&none_up, seed).unwrap(), [seed]);
        assert!(up_servers(&json!({"ok": false}), seed).is_err());
    }

    #[test]
    fn the_table_names_every_server() {
        let reply = json!({"ok": true, "mode": "cluster", "view": 7, "term": 2,
            "coordinator": 1, "stale": false, "members": [
            {"server": 1, "addr": "127.0.0.1:10001", "status": "up", "role": "voter", "swim": "alive"}]});
        let t = table(&reply, "127.0.0.1:10001".parse().unwrap());
        assert!(
            t.starts_with("cluster mode, view 7, term 2, coordinator s1 (asked"),
            "{t}"
        );
        assert!(t.contains("s1      127.0.0.1:10001"), "{t}");
    }
}
