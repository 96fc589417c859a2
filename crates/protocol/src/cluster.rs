//! The cluster port's formats (`master --cluster-addr`): the envelope every
//! cluster datagram travels in, and the coordinator's replicated state (the
//! [`View`]) with the entries that change it.
//!
//! An envelope is
//!
//! ```text
//! "UP" | version u8 | kind u8 | hlc u64 (big-endian) | payload | [MAC: 16 bytes]
//! ```
//!
//! at most [`MAX_CLUSTER_DATAGRAM`] bytes in all. The payload of a
//! [`Kind::Swim`] datagram is a message of the `foca` crate (SWIM), that of
//! a [`Kind::Raft`] datagram a `raft` crate message (protobuf); neither is
//! parsed before the envelope is accepted. With a cluster key the MAC
//! (HMAC-SHA256 over everything before it, truncated to 16 bytes) is
//! checked first, in constant time, so nothing from a sender without the
//! key reaches a parser.
//!
//! The view and its entries are encoded with `postcard` (serde, compact,
//! bounded by the datagram size).

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The first two bytes of every cluster datagram.
pub const MAGIC: [u8; 2] = *b"UP";
/// The envelope's version.
pub const VERSION: u8 = 1;
/// Magic, version, kind and the HLC stamp.
pub const HEADER_LEN: usize = 12;
/// The truncated HMAC-SHA256 appended with a cluster key.
pub const MAC_LEN: usize = 16;
/// No cluster datagram is longer: it fits an Ethernet frame with room for
/// IP and UDP headers, so it is never fragmented.
pub const MAX_CLUSTER_DATAGRAM: usize = 1400;
/// The most servers a view holds: a full view, with IPv6 addresses and
/// the longest numbers, still fits one datagram as a Raft snapshot.
pub const MAX_MEMBERS: usize = 12;
/// The shortest cluster key, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// What a cluster datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Membership and failure detection (SWIM, the `foca` crate).
    Swim = 1,
    /// Coordinator election and the view's log (Raft, the `raft` crate).
    Raft = 2,
}

/// A cluster datagram, accepted: its kind, its hybrid-logical-clock stamp
/// and its payload (not parsed yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// SWIM or Raft.
    pub kind: Kind,
    /// The sender's HLC time (NTP64: seconds in the high 32 bits).
    pub hlc: u64,
    /// The SWIM or Raft message.
    pub payload: &'a [u8],
}

/// Why a cluster datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than a header (and MAC).
    #[error("cluster datagram too short ({0} bytes)")]
    TooShort(usize),
    /// Longer than [`MAX_CLUSTER_DATAGRAM`].
    #[error("cluster datagram too long ({0} bytes, at most {MAX_CLUSTER_DATAGRAM})")]
    TooLong(usize),
    /// The MAC does not match the cluster key.
    #[error("cluster datagram with a wrong MAC (another key, or forged)")]
    BadMac,
    /// Not `UP`.
    #[error("not a cluster datagram (bad magic)")]
    BadMagic,
    /// Another version of the envelope.
    #[error("cluster datagram of version {0}, expected {VERSION}")]
    BadVersion(u8),
    /// A kind this version does not know.
    #[error("cluster datagram of unknown kind {0}")]
    UnknownKind(u8),
}

/// The shared secret of a cluster (`--cluster-key FILE`).
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A key from its bytes (a file's contents, surrounding whitespace
    /// trimmed), or `None` when shorter than [`MIN_KEY_LEN`].
    pub fn new(bytes: &[u8]) -> Option<ClusterKey> {
        let trimmed = bytes.trim_ascii();
        (trimmed.len() >= MIN_KEY_LEN).then(|| ClusterKey(trimmed.to_vec()))
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }
}

/// The largest payload an envelope can carry with (or without) a key.
pub fn max_payload(key: Option<&ClusterKey>) -> usize {
    MAX_CLUSTER_DATAGRAM - HEADER_LEN - if key.is_some() { MAC_LEN } else { 0 }
}

/// Writes an envelope around `payload` into `out` (cleared first). `None`
/// when the payload is longer than [`max_payload`]: nothing is written.
pub fn encode_envelope(
    kind: Kind,
    hlc: u64,
    payload: &[u8],
    key: Option<&ClusterKey>,
    out: &mut Vec<u8>,
) -> Option<()> {
    out.clear();
    if payload.len() > max_payload(key) {
        return None;
    }
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&hlc.to_be_bytes());
    out.extend_from_slice(payload);
    if let Some(key) = key {
        let mut mac = key.mac();
        mac.update(out);
        let tag = mac.finalize().into_bytes();
        out.extend_from_slice(&tag[..MAC_LEN]);
    }
    Some(())
}

/// Accepts a cluster datagram: its length, then (with a key) its MAC, then
/// its header; the payload is not looked at.
///
/// # Errors
/// [`EnvelopeError`] says why the datagram is refused.
pub fn decode_envelope<'a>(
    datagram: &'a [u8],
    key: Option<&ClusterKey>,
) -> Result<Envelope<'a>, EnvelopeError> {
    let n = datagram.len();
    if n > MAX_CLUSTER_DATAGRAM {
        return Err(EnvelopeError::TooLong(n));
    }
    let mac_len = if key.is_some() { MAC_LEN } else { 0 };
    if n < HEADER_LEN + mac_len {
        return Err(EnvelopeError::TooShort(n));
    }
    let (body, tag) = datagram.split_at(n - mac_len);
    if let Some(key) = key {
        let mut mac = key.mac();
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| EnvelopeError::BadMac)?;
    }
    if body[..2] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if body[2] != VERSION {
        return Err(EnvelopeError::BadVersion(body[2]));
    }
    let kind = match body[3] {
        1 => Kind::Swim,
        2 => Kind::Raft,
        other => return Err(EnvelopeError::UnknownKind(other)),
    };
    let hlc = u64::from_be_bytes(body[4..12].try_into().expect("8 bytes"));
    Ok(Envelope {
        kind,
        hlc,
        payload: &body[HEADER_LEN..],
    })
}

/// Whether a server in the view is serving, as the coordinator decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Alive as far as the coordinator knows: clients may use it.
    Up,
    /// Declared down by the coordinator (its SWIM state stayed down).
    Down,
}

impl Status {
    /// `up` or `down`, as `members` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// What a server is in the coordinator's election.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Votes, and may be elected coordinator.
    Voter,
    /// Receives the view, does not vote.
    Learner,
}

impl Role {
    /// `voter` or `learner`, as `members` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Voter => "voter",
            Role::Learner => "learner",
        }
    }
}

/// One server in the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewMember {
    /// Its node id (random, fixed for the life of its process).
    pub node: u64,
    /// Its server number, given by the coordinator at admission (1, 2...).
    pub server: u32,
    /// Where it serves clients.
    pub service: SocketAddr,
    /// Its cluster port.
    pub cluster: SocketAddr,
    /// Its SWIM generation when admitted or last marked up.
    pub gen: u64,
    /// Up or down.
    pub status: Status,
    /// Voter or learner.
    pub role: Role,
    /// The view number at which its status last changed.
    pub since: u64,
}

/// The coordinator's replicated state: which servers form the group, each
/// with a number, a status and a role. Every server applies the same
/// entries in the same order (the Raft log), so every server has the same
/// view for the same view number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The Raft log index of the last entry that changed the view: the
    /// view number.
    pub view: u64,
    /// The number the next admitted server gets.
    pub next_server: u32,
    /// The servers, in order of their numbers.
    pub members: Vec<ViewMember>,
}

/// What a server brings to its admission: carried in the Raft
/// configuration change (or entry) that admits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    /// Where it serves clients.
    pub service: SocketAddr,
    /// Its cluster port.
    pub cluster: SocketAddr,
    /// Its SWIM generation.
    pub gen: u64,
}

/// A normal Raft entry: a change of the view proposed by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A server already in the Raft configuration (the founder) enters the view.
    Admit {
        /// Its node id.
        node: u64,
        /// Its addresses and generation.
        admission: Admission,
    },
    /// The server's SWIM state stayed down: clients should not use it.
    MarkDown {
        /// Its node id.
        node: u64,
    },
    /// The server is alive again (after a partition healed).
    MarkUp {
        /// Its node id.
        node: u64,
        /// Its current SWIM generation.
        gen: u64,
    },
}

/// A view, admission or command that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode a cluster {what}: {why}")]
pub struct DecodeError {
    what: &'static str,
    why: String,
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(|e| DecodeError {
        what,
        why: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("postcard encodes into a Vec without error")
}

impl View {
    /// The view's bytes (a Raft snapshot's data).
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// A view from its bytes.
    ///
    /// # Errors
    /// When the bytes are not a view, or hold more than [`MAX_MEMBERS`].
    pub fn decode(bytes: &[u8]) -> Result<View, DecodeError> {
        let view: View = decode(bytes, "view")?;
        if view.members.len() > MAX_MEMBERS {
            return Err(DecodeError {
                what: "view",
                why: format!("{} members, at most {MAX_MEMBERS}", view.members.len()),
            });
        }
        Ok(view)
    }

    /// The member with this node id.
    pub fn member(&self, node: u64) -> Option<&ViewMember> {
        self.members.iter().find(|m| m.node == node)
    }
}

impl Admission {
    /// Its bytes (a configuration change's context).
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// # Errors
    /// When the bytes are not an admission.
    pub fn decode(bytes: &[u8]) -> Result<Admission, DecodeError> {
        decode(bytes, "admission")
    }
}

impl Command {
    /// Its bytes (a normal entry's data).
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// # Errors
    /// When the bytes are not a command.
    pub fn decode(bytes: &[u8]) -> Result<Command, DecodeError> {
        decode(bytes, "command")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::new(b"0123456789abcdef-secret\n").unwrap()
    }

    #[test]
    fn envelopes_round_trip_with_and_without_a_key() {
        let mut out = Vec::new();
        for k in [None, Some(key())] {
            encode_envelope(
                Kind::Raft,
                0x0102_0304_0506_0708,
                b"payload",
                k.as_ref(),
                &mut out,
            )
            .unwrap();
            assert_eq!(
                out.len(),
                HEADER_LEN + 7 + k.as_ref().map_or(0, |_| MAC_LEN)
            );
            let e = decode_envelope(&out, k.as_ref()).unwrap();
            assert_eq!(
                e,
                Envelope {
                    kind: Kind::Raft,
                    hlc: 0x0102_0304_0506_0708,
                    payload: b"payload"
                }
            );
        }
    }

    #[test]
    fn the_mac_is_checked_before_anything_else() {
        let k = key();
        let other = ClusterKey::new(b"another key, also long").unwrap();
        let mut out = Vec::new();
        encode_envelope(Kind::Swim, 1, b"x", Some(&k), &mut out).unwrap();
        assert_eq!(
            decode_envelope(&out, Some(&other)),
            Err(EnvelopeError::BadMac)
        );
        // Without the key's MAC, even a well-formed header is refused.
        let mut plain = Vec::new();
        encode_envelope(Kind::Swim, 1, b"0123456789abcdefXX", None, &mut plain).unwrap();
        assert_eq!(
            decode_envelope(&plain, Some(&k)),
            Err(EnvelopeError::BadMac)
        );
        // A flipped bit anywhere fails the MAC.
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 1;
            assert_eq!(
                decode_envelope(&bad, Some(&k)),
                Err(EnvelopeError::BadMac),
                "{i}"
            );
        }
    }

    #[test]
    fn bad_datagrams_say_why() {
        assert_eq!(
            decode_envelope(b"UP", None),
            Err(EnvelopeError::TooShort(2))
        );
        let long = vec![0u8; MAX_CLUSTER_DATAGRAM + 1];
        assert_eq!(
            decode_envelope(&long, None),
            Err(EnvelopeError::TooLong(1401))
        );
        let mut d = b"XX\x01\x01\0\0\0\0\0\0\0\0".to_vec();
        assert_eq!(decode_envelope(&d, None), Err(EnvelopeError::BadMagic));
        d[..2].copy_from_slice(b"UP");
        d[2] = 9;
        assert_eq!(decode_envelope(&d, None), Err(EnvelopeError::BadVersion(9)));
        d[2] = VERSION;
        d[3] = 7;
        assert_eq!(
            decode_envelope(&d, None),
            Err(EnvelopeError::UnknownKind(7))
        );
        let mut out = Vec::new();
        let big = vec![0u8; max_payload(None) + 1];
        assert!(encode_envelope(Kind::Swim, 0, &big, None, &mut out).is_none());
        assert!(encode_envelope(Kind::Swim, 0, &big[1..], None, &mut out).is_some());
        assert_eq!(out.len(), MAX_CLUSTER_DATAGRAM);
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(ClusterKey::new(b"short").is_none());
        assert!(ClusterKey::new(b"   0123456789abcde  \n").is_none());
        assert!(ClusterKey::new(b"0123456789abcdef").is_some());
    }

    #[test]
    fn a_full_view_fits_a_datagram() {
        let member = |i: u32| ViewMember {
            node: u64::MAX - u64::from(i),
            server: i,
            service: "[2001:db8::1]:65535".parse().unwrap(),
            cluster: "[2001:db8::1]:65534".parse().unwrap(),
            gen: u64::MAX,
            status: Status::Down,
            role: Role::Learner,
            since: u64::MAX,
        };
        let view = View {
            view: u64::MAX,
            next_server: u32::MAX,
            members: (0..MAX_MEMBERS as u32).map(member).collect(),
        };
        let bytes = view.encode();
        // A snapshot message adds its metadata and configuration (< 200 bytes).
        assert!(
            bytes.len() + 200 < max_payload(Some(&key())),
            "{}",
            bytes.len()
        );
        assert_eq!(View::decode(&bytes).unwrap(), view);
        let mut too_many = view.clone();
        too_many.members.push(member(99));
        assert!(View::decode(&too_many.encode()).is_err());
        assert!(View::decode(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn commands_and_admissions_round_trip() {
        let a = Admission {
            service: "127.0.0.2:10001".parse().unwrap(),
            cluster: "127.0.0.2:7000".parse().unwrap(),
            gen: 42,
        };
        assert_eq!(Admission::decode(&a.encode()).unwrap(), a);
        for c in [
            Command::Admit {
                node: 7,
                admission: a,
            },
            Command::MarkDown { node: 9 },
            Command::MarkUp { node: 9, gen: 3 },
        ] {
            assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        }
        assert!(Command::decode(b"").is_err());
    }
}
