//! The duplicate request cache: each request answered at most once per
//! server, after the ONC RPC duplicate request cache and Linux nfsd's
//! (`fs/nfsd/nfscache.c`).
//!
//! A JSON request with an `id` is keyed by (client address, the id's raw
//! bytes), with a 64-bit hash of the whole datagram beside it (nfsd's
//! checksum: the same id with other bytes is a new request, not a retry).
//! An entry is *in progress* from the request's arrival until its reply is
//! known, then *done*, holding the reply bytes exactly as sent:
//!
//! * a retry of a request in progress is dropped (nfsd's `RC_DROPIT`): the
//!   first request's reply answers it;
//! * a retry of a done request gets the kept reply again, byte for byte,
//!   without running the request (`RC_REPLY`);
//! * anything else runs (`RC_DOIT`) and gets an entry.
//!
//! Entries live in a ring, oldest first, with a hash table of their
//! positions: eviction is first in, first out, and memory is bounded by
//! construction: at most `entries` entries (64 bytes each), at most
//! `bytes` bytes of ids and replies (counted by the capacity of their
//! buffers, which also hold the client's address, 6 or 26 bytes), and a
//! done entry is forgotten `window` after its reply. Buffers are recycled,
//! so a steady stream of requests allocates nothing here. The table hashes
//! with a random key (SipHash), so forged datagrams cannot aim at one
//! bucket; the datagram's hash, compared but never a bucket, is foldhash
//! with a random key (a fraction of SipHash's cost; see `Keys`).
//!
//! What a request costs here is counted by `timing::dedup_cycles` (an
//! ignored test, run under cachegrind: see docs/PERFORMANCE.md).
//!
//! Nothing here does I/O or reads a clock: the arbiter passes `now`.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use protocol::{Op, Outcome};

/// Buffers kept for reuse, at most.
const SPARE_BUFFERS: usize = 256;
/// The largest buffer kept for reuse, in bytes.
const SPARE_CAPACITY: usize = 1024;
/// A new entry's buffer: room for a usual id and reply (a square's is about
/// 80 bytes), so that completing it does not allocate again; a longer reply
/// grows it to its exact size.
const ENTRY_CAPACITY: usize = 128;

/// How much the cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a reply is kept after it was sent; zero turns the cache off.
    pub window: Duration,
    /// Entries at most (in progress and done).
    pub entries: usize,
    /// Bytes of ids and replies at most.
    pub bytes: usize,
    /// An entry still in progress this long after its request arrived is
    /// given up (its request was lost on a path that never reported back;
    /// none is known, this only keeps the ring moving).
    pub stale_after: Duration,
}

/// Names an entry from its request's arrival to its completion: the
/// arbiter carries it with the request.
pub type Token = u64;

/// What to do with a datagram, by the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Check<'a> {
    /// Not a retry: run it, and report its end with [`Dedup::complete`] or
    /// [`Dedup::forget`].
    New(Token),
    /// Not a retry, and not kept: its id alone is over the byte bound.
    Uncached,
    /// A retry of a request still in progress: drop it.
    InProgress,
    /// A retry of a request already answered: send this reply again.
    Replay {
        /// What the request asked.
        op: Op,
        /// The reply, byte for byte as it was first sent.
        reply: &'a [u8],
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Removed from the table; waits to leave the ring's front.
    Dead,
    /// `at` is when its request arrived.
    InProgress,
    /// `at` is when its window ends; `op` is what it asked.
    Done,
}

/// One request: 64 bytes, one cache line's worth of the ring (read at
/// eviction, and written again by the next entry).
#[derive(Debug)]
struct Entry {
    key_hash: u64,
    payload_hash: u64,
    /// The client's address (see [`ClientBytes`]), the id, then (once
    /// done) the reply.
    data: Vec<u8>,
    /// See [`State`].
    at: Instant,
    /// Where the id ends in `data`, and the reply begins.
    id_end: u32,
    /// The length of the client's address in `data`.
    client_len: u8,
    state: State,
    op: Op,
}

/// A client's address as bytes, for the table's hash and an entry's
/// buffer: 6 for IPv4 (address, port), 26 for IPv6 (address, port, flow
/// information, scope). Two addresses are equal if and only if these are.
struct ClientBytes {
    bytes: [u8; 26],
    len: usize,
}

impl ClientBytes {
    fn new(client: SocketAddr) -> ClientBytes {
        let mut bytes = [0; 26];
        let len = match client {
            SocketAddr::V4(a) => {
                bytes[..4].copy_from_slice(&a.ip().octets());
                bytes[4..6].copy_from_slice(&a.port().to_le_bytes());
                6
            }
            SocketAddr::V6(a) => {
                bytes[..16].copy_from_slice(&a.ip().octets());
                bytes[16..18].copy_from_slice(&a.port().to_le_bytes());
                bytes[18..22].copy_from_slice(&a.flowinfo().to_le_bytes());
                bytes[22..].copy_from_slice(&a.scope_id().to_le_bytes());
                26
            }
        };
        ClientBytes { bytes, len }
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The cache's two hash functions, keyed at random when it is made.
///
/// The key's hash picks the table's bucket, so it is SipHash-1-3 (std's,
/// keyed from the operating system's random source), which forged
/// datagrams cannot aim at one bucket with. The datagram's hash is only
/// compared for equality, beside an entry found by its key, and never
/// leaves the process; it is foldhash (about a third of SipHash's
/// instructions on a 40-byte datagram), with a 64-bit seed drawn from the
/// same random source. A forger who wants a victim's request taken for a
/// retry of his own must send, under the victim's address and next id,
/// other bytes with the same 64-bit hash under a key he never sees;
/// foldhash is built to have no collisions that hold for every key, but
/// unlike SipHash it is not a pseudorandom function (its authors disclaim
/// resistance to attackers who can watch its outputs, which here nobody
/// can).
struct Keys {
    sip: RandomState,
    fold: foldhash::SharedSeed,
    fold_start: u64,
}

impl Keys {
    fn random() -> Keys {
        let sip = RandomState::new();
        Keys {
            fold: foldhash::SharedSeed::from_u64(sip.hash_one(1u64)),
            fold_start: sip.hash_one(2u64),
            sip,
        }
    }

    /// The hash of (client, id), in two writes (SipHash pays for each).
    fn key(&self, client: &ClientBytes, id: &[u8]) -> u64 {
        let mut h = self.sip.build_hasher();
        match client.len {
            // An IPv4 address and port: one number (its bytes 6 and 7 are 0).
            6 => h.write_u64(u64::from_le_bytes(client.bytes[..8].try_into().unwrap())),
            _ => h.write(client.get()),
        }
        h.write(id);
        h.finish()
    }

    /// The hash of a whole datagram.
    fn payload(&self, payload: &[u8]) -> u64 {
        let mut h = foldhash::fast::FoldHasher::with_seed(self.fold_start, &self.fold);
        h.write(payload);
        h.finish()
    }
}

/// Why an entry left the ring.
#[derive(Clone, Copy)]
enum Cause {
    /// Pushed out by the entry or byte bound.
    Evicted,
    /// Its window was over.
    Expired,
}

/// The cache. See the module documentation.
pub struct Dedup {
    limits: Limits,
    /// Entries, oldest first; entry number `first + i` is at `i`.
    ring: VecDeque<Entry>,
    first: u64,
    /// The live entries, by key hash, as their numbers' low 32 bits
    /// (the ring holds fewer than 2^32 entries, so these are unique).
    table: HashTable<u32>,
    keys: Keys,
    live: usize,
    bytes: usize,
    spare: Vec<Vec<u8>>,
    /// Entries pushed out by the entry or byte bound before their time.
    pub evicted: u64,
    /// Entries whose window was over.
    pub expired: u64,
    /// Entries dropped because their id came again with other bytes.
    pub replaced: u64,
}

impl Dedup {
    /// An empty cache; its ring and table are allocated now, at their
    /// full size.
    pub fn new(limits: Limits) -> Dedup {
        let slots = if limits.window.is_zero() {
            0
        } else {
            limits.entries
        };
        assert!(
            slots <= u32::MAX as usize,
            "entry numbers are kept in 32 bits"
        );
        Dedup {
            limits,
            ring: VecDeque::with_capacity(slots),
            first: 0,
            table: HashTable::with_capacity(slots),
            keys: Keys::random(),
            live: 0,
            bytes: 0,
            spare: Vec::new(),
            evicted: 0,
            expired: 0,
            replaced: 0,
        }
    }

    /// Whether the cache is on (`--dedup-window` is not 0).
    pub fn enabled(&self) -> bool {
        !self.limits.window.is_zero() && self.limits.entries > 0
    }

    /// Its bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Entries held (in progress and done).
    pub fn entries(&self) -> usize {
        self.live
    }

    /// Bytes held by ids and replies (their buffers' capacity).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Looks up a JSON request with id `id` (raw bytes) from `client`,
    /// whose whole datagram is `payload`; a request that is not a retry
    /// gets an entry, in progress.
    pub fn check(
        &mut self,
        client: SocketAddr,
        id: &[u8],
        payload: &[u8],
        now: Instant,
    ) -> Check<'_> {
        self.expire(now);
        let client = ClientBytes::new(client);
        let key_hash = self.keys.key(&client, id);
        let payload_hash = self.keys.payload(payload);
        if let Some(i) = self.find(key_hash, &client, id) {
            let e = &self.ring[i];
            if e.payload_hash != payload_hash {
                self.replaced += 1;
                self.kill(i);
            } else {
                match e.state {
                    State::InProgress => return Check::InProgress,
                    State::Done if now < e.at => {
                        let e = &self.ring[i];
                        return Check::Replay {
                            op: e.op,
                            reply: &e.data[e.id_end as usize..],
                        };
                    }
                    _ => {
                        self.expired += 1;
                        self.kill(i);
                    }
                }
            }
        }
        match self.insert(key_hash, payload_hash, &client, id, now) {
            Some(token) => Check::New(token),
            None => Check::Uncached,
        }
    }

    /// The request of `token` was answered with `reply` (the bytes sent)
    /// and `outcome`: its entry is done and kept for the window. A reply
    /// that was not sent (withheld) is not kept: the entry is forgotten.
    /// A token whose entry is gone (evicted, expired, replaced) is ignored.
    pub fn complete(&mut self, token: Token, op: Op, outcome: Outcome, reply: &[u8], now: Instant) {
        let Some(i) = self.index(token) else {
            return;
        };
        if self.ring[i].state != State::InProgress {
            return;
        }
        if !outcome.sent() || self.ring[i].id_end as usize + reply.len() > self.limits.bytes {
            self.kill(i);
            return;
        }
        let e = &mut self.ring[i];
        let before = e.data.capacity();
        e.data.reserve_exact(reply.len());
        e.data.extend_from_slice(reply);
        e.state = State::Done;
        e.op = op;
        e.at = now + self.limits.window;
        self.bytes = self.bytes - before + e.data.capacity();
        while self.bytes > self.limits.bytes {
            if self.first == token {
                self.kill(0);
                break;
            }
            self.pop_front(Cause::Evicted);
        }
    }

    /// The request of `token` ended without a reply worth keeping (`busy`,
    /// `shutting_down`): its entry is dropped, so a retry runs.
    pub fn forget(&mut self, token: Token) {
        if let Some(i) = self.index(token) {
            if self.ring[i].state == State::InProgress {
                self.kill(i);
            }
        }
    }

    /// Drops the entries at the front whose time is over: done ones past
    /// their window, in-progress ones past `stale_after`. An entry not yet
    /// over holds back the younger ones behind it (a lookup checks their
    /// window itself); the bounds still apply to all.
    pub fn expire(&mut self, now: Instant) {
        while let Some(front) = self.ring.front() {
            let over = match front.state {
                State::Dead => true,
                State::Done => now >= front.at,
                // Rare at the front: a request in progress for long.
                State::InProgress => front
                    .at
                    .checked_add(self.limits.stale_after)
                    .is_some_and(|stale| now >= stale),
            };
            if !over {
                break;
            }
            self.pop_front(Cause::Expired);
        }
    }

    /// The ring position of entry number `n`, as the table keeps it.
    fn position(&self, n: u32) -> usize {
        n.wrapping_sub(self.first as u32) as usize
    }

    /// The ring position of the live entry for (client, id).
    fn find(&self, key_hash: u64, client: &ClientBytes, id: &[u8]) -> Option<usize> {
        let (client, id_end) = (client.get(), client.len + id.len());
        self.table
            .find(key_hash, |&n| {
                let e = &self.ring[self.position(n)];
                e.id_end as usize == id_end
                    && usize::from(e.client_len) == client.len()
                    && &e.data[..client.len()] == client
                    && &e.data[client.len()..id_end] == id
            })
            .map(|&n| self.position(n))
    }

    /// The ring position of entry `token`, if it is still there.
    fn index(&self, token: Token) -> Option<usize> {
        let i = usize::try_from(token.checked_sub(self.first)?).ok()?;
        (i < self.ring.len()).then_some(i)
    }

    fn insert(
        &mut self,
        key_hash: u64,
        payload_hash: u64,
        client: &ClientBytes,
        id: &[u8],
        now: Instant,
    ) -> Option<Token> {
        let id_end = client.len + id.len();
        let mut data = match self.spare.pop() {
            Some(buf) if buf.capacity() >= id_end => buf,
            _ => Vec::with_capacity(ENTRY_CAPACITY.max(id_end)),
        };
        if data.capacity() > self.limits.bytes || id_end > u32::MAX as usize {
            return None;
        }
        while !self.ring.is_empty()
            && (self.ring.len() >= self.limits.entries
                || self.bytes + data.capacity() > self.limits.bytes)
        {
            self.pop_front(Cause::Evicted);
        }
        data.clear();
        // Copies of a constant length: no call to memcpy.
        match client.len {
            6 => data.extend_from_slice(&client.bytes[..6]),
            _ => data.extend_from_slice(&client.bytes),
        }
        data.extend_from_slice(id);
        let token = self.first + self.ring.len() as u64;
        self.bytes += data.capacity();
        self.live += 1;
        self.ring.push_back(Entry {
            key_hash,
            payload_hash,
            data,
            at: now,
            id_end: id_end as u32,
            client_len: client.len as u8,
            state: State::InProgress,
            op: Op::Invalid,
        });
        let (ring, first) = (&self.ring, self.first as u32);
        self.table.insert_unique(key_hash, token as u32, |&n| {
            ring[n.wrapping_sub(first) as usize].key_hash
        });
        Some(token)
    }

    /// Removes the live entry at ring position `i` from the table and
    /// frees its bytes; it stays in the ring, dead, until it reaches the
    /// front.
    fn kill(&mut self, i: usize) {
        let n = (self.first + i as u64) as u32;
        let e = &mut self.ring[i];
        if e.state == State::Dead {
            return;
        }
        e.state = State::Dead;
        let data = std::mem::take(&mut e.data);
        if let Ok(slot) = self.table.find_entry(e.key_hash, |&m| m == n) {
            slot.remove();
        }
        self.live -= 1;
        self.bytes -= data.capacity();
        self.recycle(data);
    }

    fn pop_front(&mut self, cause: Cause) {
        if self.ring.front().is_some_and(|e| e.state != State::Dead) {
            self.kill(0);
            match cause {
                Cause::Evicted => self.evicted += 1,
                Cause::Expired => self.expired += 1,
            }
        }
        if self.ring.pop_front().is_some() {
            self.first += 1;
        }
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS && (1..=SPARE_CAPACITY).contains(&buf.capacity()) {
            self.spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::ErrorCode;

    const MS: Duration = Duration::from_millis(1);

    fn limits(entries: usize, bytes: usize) -> Limits {
        Limits {
            window: 1000 * MS,
            entries,
            bytes,
            stale_after: 5000 * MS,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn new_token(c: Check<'_>) -> Token {
        match c {
            Check::New(t) => t,
            other => panic!("expected a new entry, got {other:?}"),
        }
    }

    /// The invariants every operation keeps.
    fn sound(d: &Dedup) {
        let live: Vec<&Entry> = d.ring.iter().filter(|e| e.state != State::Dead).collect();
        assert_eq!(d.live, live.len());
        assert_eq!(d.table.len(), live.len());
        assert_eq!(
            d.bytes,
            live.iter().map(|e| e.data.capacity()).sum::<usize>()
        );
        assert!(d.ring.len() <= d.limits.entries);
        assert!(d.bytes <= d.limits.bytes);
        assert!(d.spare.len() <= SPARE_BUFFERS);
        // Every live entry's number is in the table under its key's hash.
        for (i, e) in d.ring.iter().enumerate() {
            if e.state != State::Dead {
                let n = (d.first + i as u64) as u32;
                assert!(d.table.find(e.key_hash, |&m| m == n).is_some());
            }
        }
    }

    #[test]
    fn a_retry_in_progress_is_dropped_and_a_retry_after_the_reply_replayed() {
        let mut d = Dedup::new(limits(16, 1 << 20));
        let t0 = Instant::now();
        let req = br#"{"op":"sleep","ms":300,"id":7}"#;
        let token = new_token(d.check(addr(1), b"7", req, t0));
        assert_eq!(d.check(addr(1), b"7", req, t0 + MS), Check::InProgress);
        let reply = br#"{"ok":true,"op":"sleep","slept_ms":300,"worker_pid":9,"id":7}"#;
        d.complete(token, Op::Sleep, Outcome::Ok, reply, t0 + 300 * MS);
        assert_eq!(
            d.check(addr(1), b"7", req, t0 + 400 * MS),
            Check::Replay {
                op: Op::Sleep,
                reply
            }
        );
        // Another client, or another id, is another request.
        new_token(d.check(addr(2), b"7", req, t0 + 400 * MS));
        new_token(d.check(addr(1), b"8", req, t0 + 400 * MS));
        assert_eq!(d.entries(), 3);
        sound(&d);
        // The window runs from the reply: 1 s after it, the id is new again.
        assert!(matches!(
            d.check(addr(1), b"7", req, t0 + 1299 * MS),
            Check::Replay { .. }
        ));
        new_token(d.check(addr(1), b"7", req, t0 + 1300 * MS));
        assert_eq!(d.expired, 1);
        sound(&d);
    }

    #[test]
    fn the_same_id_with_other_bytes_is_a_new_request() {
        let mut d = Dedup::new(limits(16, 1 << 20));
        let now = Instant::now();
        let first = new_token(d.check(addr(1), b"1", br#"{"op":"square","n":2,"id":1}"#, now));
        let second = new_token(d.check(addr(1), b"1", br#"{"op":"square","n":3,"id":1}"#, now));
        assert_ne!(first, second);
        assert_eq!((d.replaced, d.entries()), (1, 1));
        // The first one's completion finds its entry gone and keeps nothing.
        d.complete(first, Op::Square, Outcome::Ok, b"4", now);
        d.complete(second, Op::Square, Outcome::Ok, b"9", now);
        assert_eq!(
            d.check(addr(1), b"1", br#"{"op":"square","n":3,"id":1}"#, now),
            Check::Replay {
                op: Op::Square,
                reply: b"9"
            }
        );
        sound(&d);
    }

    #[test]
    fn replies_not_sent_and_forgotten_requests_run_again() {
        let mut d = Dedup::new(limits(16, 1 << 20));
        let now = Instant::now();
        let t = new_token(d.check(addr(1), b"1", b"a", now));
        d.complete(t, Op::Hello, Outcome::Withheld, b"", now);
        let t = new_token(d.check(addr(1), b"1", b"a", now));
        d.forget(t);
        let t = new_token(d.check(addr(1), b"1", b"a", now));
        // Errors are replies like any other.
        d.complete(t, Op::Sleep, Outcome::Error(ErrorCode::Timeout), b"t", now);
        assert!(matches!(
            d.check(addr(1), b"1", b"a", now),
            Check::Replay { reply: b"t", .. }
        ));
        assert_eq!(d.entries(), 1);
        sound(&d);
    }

    #[test]
    fn the_entry_bound_evicts_the_oldest() {
        let mut d = Dedup::new(limits(3, 1 << 20));
        let now = Instant::now();
        let tokens: Vec<Token> = (0..5u8)
            .map(|i| new_token(d.check(addr(1), &[b'0' + i], b"x", now)))
            .collect();
        assert_eq!((d.entries(), d.evicted), (3, 2));
        // An evicted request's completion is ignored; a retry of it runs again.
        d.complete(tokens[0], Op::Hello, Outcome::Ok, b"r", now);
        sound(&d);
        new_token(d.check(addr(1), b"0", b"x", now));
        assert_eq!(d.check(addr(1), b"4", b"x", now), Check::InProgress);
        sound(&d);
    }

    #[test]
    fn the_byte_bound_evicts_the_oldest_and_never_keeps_what_cannot_fit() {
        let mut d = Dedup::new(limits(100, 4 * ENTRY_CAPACITY));
        let now = Instant::now();
        let mut tokens = Vec::new();
        for i in 0..4u8 {
            tokens.push(new_token(d.check(addr(1), &[i], b"x", now)));
        }
        assert_eq!((d.entries(), d.evicted), (4, 0));
        // A reply that outgrows its buffer pushes the oldest out.
        let long = [b'r'; ENTRY_CAPACITY + 100];
        d.complete(tokens[3], Op::Hello, Outcome::Ok, &long, now);
        assert_eq!(d.evicted, 1);
        assert!(matches!(d.check(addr(1), &[0], b"x", now), Check::New(_)));
        sound(&d);
        assert!(matches!(
            d.check(addr(1), &[3], b"x", now),
            Check::Replay { reply, .. } if reply == long
        ));
        // A reply larger than the whole bound is not kept.
        let t = new_token(d.check(addr(1), b"big", b"x", now));
        d.complete(t, Op::Hello, Outcome::Ok, &[0; 5000], now);
        assert!(matches!(d.check(addr(1), b"big", b"x", now), Check::New(_)));
        // Nor an id that is.
        assert_eq!(d.check(addr(1), &[b'i'; 5000], b"x", now), Check::Uncached);
        sound(&d);
    }

    #[test]
    fn stale_requests_in_progress_leave_and_make_way() {
        let mut d = Dedup::new(limits(16, 1 << 20));
        let t0 = Instant::now();
        let lost = new_token(d.check(addr(1), b"1", b"x", t0));
        let t = new_token(d.check(addr(1), b"2", b"x", t0 + MS));
        d.complete(t, Op::Hello, Outcome::Ok, b"r", t0 + MS);
        // Its window is over, but the request in progress before it holds it.
        d.expire(t0 + 2000 * MS);
        assert_eq!(d.entries(), 2);
        // A lookup checks the window itself.
        new_token(d.check(addr(1), b"2", b"x", t0 + 2000 * MS));
        d.expire(t0 + 5001 * MS);
        assert_eq!(d.check(addr(1), b"1", b"x", t0 + 5001 * MS), Check::New(3));
        d.complete(lost, Op::Hello, Outcome::Ok, b"late", t0 + 5002 * MS);
        assert_eq!(
            d.check(addr(1), b"1", b"x", t0 + 5002 * MS),
            Check::InProgress
        );
        sound(&d);
    }

    #[test]
    fn a_hundred_thousand_ids_stay_within_the_bounds() {
        let mut d = Dedup::new(limits(1000, 64 * 1024));
        let t0 = Instant::now();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..100_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let now = t0 + Duration::from_micros(i * 10);
            let id = (rng % 50_000).to_string();
            let from = addr((rng >> 32) as u16 % 4);
            if let Check::New(t) = d.check(from, id.as_bytes(), id.as_bytes(), now) {
                match rng % 5 {
                    0 => d.forget(t),
                    1 => {}
                    _ => d.complete(
                        t,
                        Op::Square,
                        Outcome::Ok,
                        &[b'r'; 100][..(rng % 100) as usize],
                        now,
                    ),
                }
            }
            if i % 997 == 0 {
                sound(&d);
            }
        }
        sound(&d);
        assert!(d.evicted > 0);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_entry_is_one_cache_line_s_worth() {
        assert_eq!(std::mem::size_of::<Entry>(), 64);
    }

    #[test]
    fn off_holds_nothing() {
        let d = Dedup::new(Limits {
            window: Duration::ZERO,
            ..limits(16, 1024)
        });
        assert!(!d.enabled());
        assert_eq!(d.ring.capacity(), 0);
    }
}

#[cfg(test)]
mod timing {
    use super::*;

    /// This thread's CPU time: the machine is shared, wall time is not ours.
    fn cpu_time() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which `ts` is.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A cache of the default size (`--dedup-window 5`, 16,384 entries,
    /// 8 MiB) and the client the measurements send from.
    fn full_size_cache() -> (Dedup, SocketAddr) {
        let d = Dedup::new(Limits {
            window: Duration::from_secs(5),
            entries: 16_384,
            bytes: 8 << 20,
            stale_after: Duration::from_secs(65),
        });
        (d, SocketAddr::from(([127, 0, 0, 1], 40000)))
    }

    /// What one request costs the cache at peak, every request with a new
    /// id: `cargo test --release -p master dedup_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn dedup_cost() {
        let (mut d, from) = full_size_cache();
        let now = Instant::now();
        let mut payload = Vec::new();
        let mut reply = Vec::new();
        let n = 2_000_000u64;
        let mut format_only = Duration::ZERO;
        for pass in 0..2 {
            let started = cpu_time();
            for i in 0..n {
                payload.clear();
                reply.clear();
                use std::io::Write;
                let _ = write!(payload, r#"{{"op":"square","n":{},"id":{i}}}"#, i % 1000);
                let _ = write!(
                    reply,
                    r#"{{"ok":true,"op":"square","result":{},"worker_pid":12345,"id":{i}}}"#,
                    (i % 1000) * (i % 1000)
                );
                if pass == 0 {
                    std::hint::black_box((&payload, &reply));
                    continue;
                }
                let id = protocol::request::scan_id(&payload).expect("an id");
                if let Check::New(t) = d.check(from, id, &payload, now) {
                    d.complete(t, Op::Square, Outcome::Ok, &reply, now);
                }
            }
            if pass == 0 {
                format_only = cpu_time() - started;
                continue;
            }
            let per = (cpu_time() - started).saturating_sub(format_only) / n as u32;
            eprintln!("dedup: {per:?} of CPU per request (scan_id, check, complete)");
        }
    }

    /// Adds one to the decimal number in `digits` (no carry out of it).
    fn increment(digits: &mut [u8]) {
        for d in digits.iter_mut().rev() {
            if *d == b'9' {
                *d = b'0';
            } else {
                *d += 1;
                return;
            }
        }
    }

    /// A fixed amount of work for an instruction counter: 1,000,000
    /// requests with distinct ids through a full cache of the default
    /// size, each looked up and completed as the arbiter does. The
    /// datagrams are made by counting in place, which costs little:
    ///
    /// ```text
    /// cargo test --release -p master --lib dedup_cycles --no-run
    /// DEDUP_CYCLES=base valgrind --tool=cachegrind --cache-sim=yes \
    ///     target/release/deps/master-<hash> --ignored --exact timing::dedup_cycles
    /// DEDUP_CYCLES=scan ...   # plus scan_id
    /// valgrind ...            # plus check and complete
    /// ```
    ///
    /// The differences between the three runs are what `scan_id`, and
    /// `check` with `complete`, cost.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn dedup_cycles() {
        let mode = std::env::var("DEDUP_CYCLES").unwrap_or_default();
        let (mut d, from) = full_size_cache();
        let mut now = Instant::now();
        // 140k requests a second.
        let step = Duration::from_nanos(7_143);
        let mut payload = br#"{"op":"square","n":-10000,"id":1000000}"#.to_vec();
        let mut reply =
            br#"{"ok":true,"op":"square","result":100000000,"worker_pid":123456,"id":1000000}"#
                .to_vec();
        let (pn, pid) = (20..25, payload.len() - 8..payload.len() - 1);
        let (rn, rid) = (34..43, reply.len() - 8..reply.len() - 1);
        let (mut new, mut other) = (0u64, 0u64);
        for _ in 0..1_000_000 {
            increment(&mut payload[pid.clone()]);
            increment(&mut payload[pn.clone()]);
            increment(&mut reply[rid.clone()]);
            increment(&mut reply[rn.clone()]);
            now += step;
            if mode == "base" {
                std::hint::black_box((&payload, &reply, now));
                continue;
            }
            let id = protocol::request::scan_id(&payload).expect("an id");
            if mode == "scan" {
                std::hint::black_box((id, &reply, now));
                continue;
            }
            match d.check(from, id, &payload, now) {
                Check::New(t) => {
                    new += 1;
                    d.complete(t, Op::Square, Outcome::Ok, &reply, now);
                }
                _ => other += 1,
            }
        }
        std::hint::black_box(&d);
        if mode != "base" && mode != "scan" {
            assert_eq!((new, other), (1_000_000, 0));
            assert_eq!(d.entries(), 16_384);
        }
        eprintln!("dedup_cycles ({mode:?}): {new} new, evicted {}", d.evicted);
    }
}
