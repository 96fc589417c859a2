//! Server addresses as typed on the command line.

use std::net::{SocketAddr, ToSocketAddrs};

use crate::cli::MAX_SERVERS;

/// Why a server address was refused.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    /// The text is not `HOST:PORT` or does not resolve.
    #[error("cannot resolve server address {0:?} (expected HOST:PORT, such as 127.0.0.1:10001 or [::1]:10001): {1}")]
    Resolve(String, std::io::Error),
    /// It resolved to nothing.
    #[error("server address {0:?} resolves to no address")]
    Empty(String),
    /// The load generator only loads this machine.
    #[error("loadgen only sends load to this machine: {0} is not a loopback address (use 127.0.0.1 or [::1])")]
    NotLoopback(SocketAddr),
    /// More `--server`s than [`MAX_SERVERS`].
    #[error("{0} servers named: at most {MAX_SERVERS} --server options are allowed")]
    TooMany(usize),
}

/// Resolves every `--server`: [`resolve_loopback`] each when `loopback_only`,
/// else [`resolve`].
///
/// # Errors
/// The first address that does not resolve (or is not loopback), or
/// [`AddrError::TooMany`].
pub fn resolve_servers(
    texts: &[String],
    loopback_only: bool,
) -> Result<Vec<SocketAddr>, AddrError> {
    if texts.len() > MAX_SERVERS {
        return Err(AddrError::TooMany(texts.len()));
    }
    texts
        .iter()
        .map(|t| {
            if loopback_only {
                resolve_loopback(t)
            } else {
                resolve(t)
            }
        })
        .collect()
}

/// Resolves `HOST:PORT` (`127.0.0.1:10001`, `[::1]:10001`, `localhost:10001`)
/// to its first address.
///
/// # Errors
/// [`AddrError::Resolve`] or [`AddrError::Empty`] when it does not resolve.
pub fn resolve(text: &str) -> Result<SocketAddr, AddrError> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .map_err(|e| AddrError::Resolve(text.to_string(), e))?
        .next()
        .ok_or_else(|| AddrError::Empty(text.to_string()))
}

/// Like [`resolve`], and refuses anything but a loopback address: load is
/// only ever sent to this machine.
///
/// # Errors
/// As [`resolve`], plus [`AddrError::NotLoopback`].
pub fn resolve_loopback(text: &str) -> Result<SocketAddr, AddrError> {
    let addr = resolve(text)?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(AddrError::NotLoopback(addr))
    }
}

/// The wildcard address of the same family as `server`, port 0: where a
/// client socket binds before connecting to `server`.
pub fn local_wildcard(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_loopback_addresses() {
        assert_eq!(
            resolve("127.0.0.1:10001").unwrap(),
            "127.0.0.1:10001".parse().unwrap()
        );
        assert_eq!(
            resolve_loopback("[::1]:7").unwrap(),
            "[::1]:7".parse().unwrap()
        );
        assert!(matches!(
            resolve_loopback("10.0.0.1:7"),
            Err(AddrError::NotLoopback(_))
        ));
        assert!(resolve("no-port").is_err());
        let two = ["127.0.0.1:1".to_string(), "10.0.0.1:2".to_string()];
        assert!(resolve_servers(&two, false).is_ok());
        assert!(matches!(
            resolve_servers(&two, true),
            Err(AddrError::NotLoopback(_))
        ));
        let many = vec!["127.0.0.1:1".to_string(); MAX_SERVERS + 1];
        assert!(matches!(
            resolve_servers(&many, true),
            Err(AddrError::TooMany(17))
        ));
        assert!(local_wildcard("[::1]:7".parse().unwrap()).is_ipv6());
    }
}
