//! The master <-> worker pipe frames.
//!
//! Every frame is a fixed-width big-endian `u32` length (of what follows),
//! then a one-byte kind, then the kind's fields:
//!
//! ```text
//! master -> worker (request pipe)
//!   kind 1 REQUEST  seq:u64 reply_limit:u32 family:u8 (4|6) ip:[u8;4|16] port:u16
//!                   [v6 only: flowinfo:u32 scope_id:u32] payload:rest
//!   kind 5 REQUEST_KEEP  the same fields; the worker sends its reply back in
//!                   a DONE_REPLY (the master keeps it for retries)
//! worker -> master (completion pipe)
//!   kind 2 READY    pid:u32
//!   kind 3 DONE     seq:u64 op:u8 outcome:u8 id:rest (raw JSON id text, may be empty)
//!   kind 4 STOPPING pid:u32 (got SIGTERM: it answers what it holds and
//!                   exits once the master closes its request pipe)
//!   kind 6 DONE_REPLY seq:u64 op:u8 outcome:u8 id_len:u8 id:[id_len]
//!                   reply:rest (the reply exactly as sent; empty if none was)
//!   kind 7 SENT_AT  mono_us:u64 (the replies of the DONE and DONE_REPLY
//!                   frames that follow left at this CLOCK_MONOTONIC time)
//! ```
//!
//! Several frames travel in one pipe write. [`FrameBuf`] accumulates what a
//! reader got and hands out whole frames; a stream that ends inside a frame
//! is an error, one that ends between frames is a clean end.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use crate::{Op, Outcome, MAX_UDP_PAYLOAD};

/// The largest frame body accepted: a maximal datagram plus its header
/// (a DONE_REPLY's header, with the longest id, is the largest: 140 bytes).
pub const MAX_FRAME: usize = MAX_UDP_PAYLOAD + 256;

/// The longest JSON id a completion carries (longer ones are cut; the
/// client still gets its whole id in the reply).
pub const MAX_DONE_ID: usize = 128;

const KIND_REQUEST: u8 = 1;
const KIND_READY: u8 = 2;
const KIND_DONE: u8 = 3;
const KIND_STOPPING: u8 = 4;
const KIND_REQUEST_KEEP: u8 = 5;
const KIND_DONE_REPLY: u8 = 6;
const KIND_SENT_AT: u8 = 7;
/// The length of a SENT_AT frame, prefix included.
pub const SENT_AT_LEN: usize = 4 + 1 + 8;

/// A pipe stream that does not follow the framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over [`MAX_FRAME`].
    #[error("frame length {0} is over the limit of {MAX_FRAME} bytes")]
    TooLong(usize),
    /// The kind byte is not one this direction carries.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The body is shorter than its kind's fields, or a field is invalid.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

/// A frame the master sends a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker<'a> {
    /// One client datagram to answer.
    Request {
        /// The master's sequence number, echoed in the completion.
        seq: u64,
        /// The largest reply that may be sent ([`u32::MAX`]: no bound; for a
        /// source outside `--trusted`, the amplification bound).
        reply_limit: u32,
        /// The master keeps the reply (its duplicate request cache): the
        /// worker sends it back in its completion (a DONE_REPLY frame).
        keep_reply: bool,
        /// Where the reply goes.
        client: SocketAddr,
        /// The datagram as received.
        payload: &'a [u8],
    },
}

/// A frame a worker sends its master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToMaster<'a> {
    /// The worker has started and is reading requests.
    Ready {
        /// The worker's own PID.
        pid: u32,
    },
    /// The worker got SIGTERM: it wants no new work, answers what it holds,
    /// and exits once its request pipe is closed.
    Stopping {
        /// The worker's own PID.
        pid: u32,
    },
    /// The worker has answered request `seq` (the reply is already sent).
    Done {
        /// The sequence number of the request frame.
        seq: u64,
        /// What was asked.
        op: Op,
        /// How it ended.
        outcome: Outcome,
        /// The request's raw JSON id (cut at [`MAX_DONE_ID`]), or empty.
        id: &'a [u8],
        /// For a request sent with `keep_reply`: the reply exactly as it
        /// was sent (empty when none was); `None` otherwise.
        reply: Option<&'a [u8]>,
    },
    /// The replies of the DONE frames that follow (until the next SENT_AT)
    /// left the worker at this time: the request's end, as the journal's
    /// latency counts it (the master may read the completions later).
    SentAt {
        /// `CLOCK_MONOTONIC`, in microseconds (the same clock in every
        /// process of the host).
        mono_us: u64,
    },
}

/// Appends a REQUEST frame to `out` (a REQUEST_KEEP with `keep_reply`:
/// the worker then sends its reply back in a DONE_REPLY).
pub fn encode_request(
    seq: u64,
    reply_limit: u32,
    keep_reply: bool,
    client: SocketAddr,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let addr_len = match client {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2 + 8,
    };
    let body = 1 + 8 + 4 + addr_len + payload.len();
    out.reserve(4 + body);
    out.extend_from_slice(&(body as u32).to_be_bytes());
    out.push(if keep_reply {
        KIND_REQUEST_KEEP
    } else {
        KIND_REQUEST
    });
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&reply_limit.to_be_bytes());
    match client {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.flowinfo().to_be_bytes());
            out.extend_from_slice(&a.scope_id().to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// Appends a READY frame to `out`.
pub fn encode_ready(pid: u32, out: &mut Vec<u8>) {
    encode_pid_frame(KIND_READY, pid, out);
}

/// Appends a STOPPING frame to `out`.
pub fn encode_stopping(pid: u32, out: &mut Vec<u8>) {
    encode_pid_frame(KIND_STOPPING, pid, out);
}

fn encode_pid_frame(kind: u8, pid: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&5u32.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(&pid.to_be_bytes());
}

/// Appends a SENT_AT frame to `out`. A worker appends one, stamped 0,
/// before the first DONE of a batch, and sets its time with
/// [`stamp_sent_at`] once the batch's replies have left.
pub fn encode_sent_at(mono_us: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&9u32.to_be_bytes());
    out.push(KIND_SENT_AT);
    out.extend_from_slice(&mono_us.to_be_bytes());
}

/// Sets the time of the SENT_AT frame at `at` in `buf` (where
/// [`encode_sent_at`] put it).
///
/// # Panics
/// When `buf` has no SENT_AT frame at `at`.
pub fn stamp_sent_at(buf: &mut [u8], at: usize, mono_us: u64) {
    assert_eq!(buf[at + 4], KIND_SENT_AT, "no SENT_AT frame at {at}");
    buf[at + 5..at + SENT_AT_LEN].copy_from_slice(&mono_us.to_be_bytes());
}

/// Appends a DONE frame to `out`; an id over [`MAX_DONE_ID`] bytes is cut.
pub fn encode_done(seq: u64, op: Op, outcome: Outcome, id: &[u8], out: &mut Vec<u8>) {
    let id = &id[..id.len().min(MAX_DONE_ID)];
    let body = 1 + 8 + 1 + 1 + id.len();
    out.extend_from_slice(&(body as u32).to_be_bytes());
    out.push(KIND_DONE);
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(op as u8);
    out.push(outcome.to_u8());
    out.extend_from_slice(id);
}

/// Appends a DONE_REPLY frame to `out`: a DONE that also carries the reply
/// as sent (for a REQUEST_KEEP). An id over [`MAX_DONE_ID`] bytes is cut;
/// so is a reply over [`MAX_UDP_PAYLOAD`], which no reply can be.
pub fn encode_done_with_reply(
    seq: u64,
    op: Op,
    outcome: Outcome,
    id: &[u8],
    reply: &[u8],
    out: &mut Vec<u8>,
) {
    let id = &id[..id.len().min(MAX_DONE_ID)];
    let reply = &reply[..reply.len().min(MAX_UDP_PAYLOAD)];
    let body = 1 + 8 + 1 + 1 + 1 + id.len() + reply.len();
    out.reserve(4 + body);
    out.extend_from_slice(&(body as u32).to_be_bytes());
    out.push(KIND_DONE_REPLY);
    out.extend_from_slice(&seq.to_be_bytes());
    out.push(op as u8);
    out.push(outcome.to_u8());
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(reply);
}

/// A whole frame split off a buffer: its kind, its body and the bytes used.
type SplitFrame<'a> = (u8, &'a [u8], usize);

/// Splits the first whole frame off `buf`: `Ok(None)` when `buf` holds
/// less than one frame.
fn split_frame(buf: &[u8]) -> Result<Option<SplitFrame<'_>>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("four bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    if len == 0 {
        return Err(FrameError::Malformed("empty"));
    }
    match buf.get(4..4 + len) {
        None => Ok(None),
        Some(body) => Ok(Some((body[0], &body[1..], 4 + len))),
    }
}

/// A cursor over a frame body.
struct Fields<'a>(&'a [u8], &'static str);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Malformed(self.1));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("exact length"))
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
}

/// Decodes the first frame of `buf` as master -> worker.
///
/// # Errors
/// A [`FrameError`] when the bytes are not a valid frame; the stream is then
/// unusable.
pub fn decode_to_worker(buf: &[u8]) -> Result<Option<(ToWorker<'_>, usize)>, FrameError> {
    let Some((kind, body, used)) = split_frame(buf)? else {
        return Ok(None);
    };
    if kind != KIND_REQUEST && kind != KIND_REQUEST_KEEP {
        return Err(FrameError::UnknownKind(kind));
    }
    let mut f = Fields(body, "request");
    let seq = u64::from_be_bytes(f.array()?);
    let reply_limit = u32::from_be_bytes(f.array()?);
    let client = match f.u8()? {
        4 => {
            let ip = Ipv4Addr::from(f.array::<4>()?);
            let port = u16::from_be_bytes(f.array()?);
            SocketAddr::V4(SocketAddrV4::new(ip, port))
        }
        6 => {
            let ip = Ipv6Addr::from(f.array::<16>()?);
            let port = u16::from_be_bytes(f.array()?);
            let flow = u32::from_be_bytes(f.array()?);
            let scope = u32::from_be_bytes(f.array()?);
            SocketAddr::V6(SocketAddrV6::new(ip, port, flow, scope))
        }
        _ => return Err(FrameError::Malformed("request")),
    };
    Ok(Some((
        ToWorker::Request {
            seq,
            reply_limit,
            keep_reply: kind == KIND_REQUEST_KEEP,
            client,
            payload: f.0,
        },
        used,
    )))
}

/// Decodes the first frame of `buf` as worker -> master.
///
/// # Errors
/// A [`FrameError`] when the bytes are not a valid frame.
pub fn decode_to_master(buf: &[u8]) -> Result<Option<(ToMaster<'_>, usize)>, FrameError> {
    let Some((kind, body, used)) = split_frame(buf)? else {
        return Ok(None);
    };
    let frame = match kind {
        KIND_READY | KIND_STOPPING => {
            let name = if kind == KIND_READY {
                "ready"
            } else {
                "stopping"
            };
            let mut f = Fields(body, name);
            let pid = u32::from_be_bytes(f.array()?);
            if !f.0.is_empty() {
                return Err(FrameError::Malformed(name));
            }
            if kind == KIND_READY {
                ToMaster::Ready { pid }
            } else {
                ToMaster::Stopping { pid }
            }
        }
        KIND_DONE => {
            let mut f = Fields(body, "done");
            let seq = u64::from_be_bytes(f.array()?);
            let op = Op::from_u8(f.u8()?).ok_or(FrameError::Malformed("done"))?;
            let outcome = Outcome::from_u8(f.u8()?).ok_or(FrameError::Malformed("done"))?;
            if f.0.len() > MAX_DONE_ID {
                return Err(FrameError::Malformed("done"));
            }
            ToMaster::Done {
                seq,
                op,
                outcome,
                id: f.0,
                reply: None,
            }
        }
        KIND_DONE_REPLY => {
            let mut f = Fields(body, "done_reply");
            let seq = u64::from_be_bytes(f.array()?);
            let op = Op::from_u8(f.u8()?).ok_or(FrameError::Malformed("done_reply"))?;
            let outcome = Outcome::from_u8(f.u8()?).ok_or(FrameError::Malformed("done_reply"))?;
            let id_len = usize::from(f.u8()?);
            if id_len > MAX_DONE_ID {
                return Err(FrameError::Malformed("done_reply"));
            }
            let id = f.take(id_len)?;
            if f.0.len() > MAX_UDP_PAYLOAD {
                return Err(FrameError::Malformed("done_reply"));
            }
            ToMaster::Done {
                seq,
                op,
                outcome,
                id,
                reply: Some(f.0),
            }
        }
        KIND_SENT_AT => {
            let mut f = Fields(body, "sent_at");
            let mono_us = u64::from_be_bytes(f.array()?);
            if !f.0.is_empty() {
                return Err(FrameError::Malformed("sent_at"));
            }
            ToMaster::SentAt { mono_us }
        }
        other => return Err(FrameError::UnknownKind(other)),
    };
    Ok(Some((frame, used)))
}

/// A reader's buffer of pipe bytes that hands out whole frames.
///
/// Read into [`FrameBuf::spare`], record the count with
/// [`FrameBuf::filled`], then take frames until `None`.
#[derive(Debug)]
pub struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameBuf {
    /// A buffer that reads up to `capacity` bytes at a time (it grows when
    /// one frame is larger).
    pub fn with_capacity(capacity: usize) -> Self {
        FrameBuf {
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
        }
    }

    /// Room to read into, after moving any partial frame to the front and
    /// growing the buffer if a whole frame would not fit.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let grown = (self.buf.len() * 2)
                .min(MAX_FRAME + 4)
                .max(self.buf.len() + 1);
            self.buf.resize(grown, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`FrameBuf::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Bytes received that do not yet make a whole frame.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Checks a stream that has just ended: a clean end between frames,
    /// or [`FrameError::Truncated`].
    ///
    /// # Errors
    /// [`FrameError::Truncated`] when bytes of an unfinished frame remain.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.pending() {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }

    /// The next whole master -> worker frame, if one has arrived.
    ///
    /// # Errors
    /// A [`FrameError`] for bytes that are not a valid frame.
    pub fn next_to_worker(&mut self) -> Result<Option<ToWorker<'_>>, FrameError> {
        match decode_to_worker(&self.buf[self.start..self.end])? {
            None => Ok(None),
            Some((frame, used)) => {
                self.start += used;
                Ok(Some(frame))
            }
        }
    }

    /// The next whole worker -> master frame, if one has arrived.
    ///
    /// # Errors
    /// A [`FrameError`] for bytes that are not a valid frame.
    pub fn next_to_master(&mut self) -> Result<Option<ToMaster<'_>>, FrameError> {
        match decode_to_master(&self.buf[self.start..self.end])? {
            None => Ok(None),
            Some((frame, used)) => {
                self.start += used;
                Ok(Some(frame))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn frames_round_trip_through_a_split_stream() {
        let v4: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let v6: SocketAddr = "[::1]:6666".parse().unwrap();
        let mut wire = Vec::new();
        encode_request(1, 21, false, v4, b"7", &mut wire);
        encode_request(
            u64::MAX,
            u32::MAX,
            true,
            v6,
            b"{\"op\":\"hello\"}",
            &mut wire,
        );
        let mut fb = FrameBuf::with_capacity(64);
        let mut got = Vec::new();
        for chunk in wire.chunks(3) {
            fb.spare()[..chunk.len()].copy_from_slice(chunk);
            fb.filled(chunk.len());
            while let Some(ToWorker::Request {
                seq,
                reply_limit,
                keep_reply,
                client,
                payload,
            }) = fb.next_to_worker().unwrap()
            {
                got.push((seq, reply_limit, keep_reply, client, payload.to_vec()));
            }
        }
        fb.finish().unwrap();
        assert_eq!(
            got,
            vec![
                (1, 21, false, v4, b"7".to_vec()),
                (u64::MAX, u32::MAX, true, v6, b"{\"op\":\"hello\"}".to_vec())
            ]
        );

        let mut wire = Vec::new();
        encode_ready(42, &mut wire);
        encode_done(
            9,
            Op::Square,
            Outcome::Error(ErrorCode::Busy),
            b"\"x\"",
            &mut wire,
        );
        encode_stopping(43, &mut wire);
        encode_done_with_reply(
            10,
            Op::Hello,
            Outcome::Ok,
            b"7",
            b"{\"ok\":true,\"id\":7}",
            &mut wire,
        );
        let (f1, used) = decode_to_master(&wire).unwrap().unwrap();
        assert_eq!(f1, ToMaster::Ready { pid: 42 });
        let (f2, used2) = decode_to_master(&wire[used..]).unwrap().unwrap();
        let (f3, used3) = decode_to_master(&wire[used + used2..]).unwrap().unwrap();
        assert_eq!(f3, ToMaster::Stopping { pid: 43 });
        assert_eq!(
            f2,
            ToMaster::Done {
                seq: 9,
                op: Op::Square,
                outcome: Outcome::Error(ErrorCode::Busy),
                id: b"\"x\"",
                reply: None,
            }
        );
        let (f4, used4) = decode_to_master(&wire[used + used2 + used3..])
            .unwrap()
            .unwrap();
        assert_eq!(
            f4,
            ToMaster::Done {
                seq: 10,
                op: Op::Hello,
                outcome: Outcome::Ok,
                id: b"7",
                reply: Some(b"{\"ok\":true,\"id\":7}"),
            }
        );
        assert_eq!(used + used2 + used3 + used4, wire.len());
    }

    #[test]
    fn a_sent_at_frame_is_stamped_in_place() {
        let mut wire = Vec::new();
        encode_ready(42, &mut wire);
        let at = wire.len();
        encode_sent_at(0, &mut wire);
        assert_eq!(wire.len() - at, SENT_AT_LEN);
        encode_done(9, Op::Square, Outcome::Ok, b"", &mut wire);
        stamp_sent_at(&mut wire, at, 0x0102_0304_0506_0708);
        assert_eq!(
            wire[at..at + SENT_AT_LEN],
            [0, 0, 0, 9, 7, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        let (_, used) = decode_to_master(&wire).unwrap().unwrap();
        let (f, _) = decode_to_master(&wire[used..]).unwrap().unwrap();
        assert_eq!(
            f,
            ToMaster::SentAt {
                mono_us: 0x0102_0304_0506_0708
            }
        );
        // A SENT_AT of another length is malformed.
        let bad = [0, 0, 0, 8, 7, 1, 2, 3, 4, 5, 6, 7];
        assert_eq!(
            decode_to_master(&bad),
            Err(FrameError::Malformed("sent_at"))
        );
    }

    /// Bytes written as docs/PROTOCOL.md shows them: hex pairs, spaces.
    fn hex(text: &str) -> Vec<u8> {
        text.split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_byte_level_examples_of_protocol_md() {
        let mut wire = Vec::new();
        let v4 = "127.0.0.1:5555".parse().unwrap();
        encode_request(1, u32::MAX, false, v4, b"7", &mut wire);
        assert_eq!(
            wire,
            hex("00 00 00 15 01 00 00 00 00 00 00 00 01 ff ff ff ff 04 7f 00 00 01 15 b3 37")
        );
        let mut wire = Vec::new();
        encode_request(
            2,
            u32::MAX,
            false,
            "[::1]:5555".parse().unwrap(),
            br#"{"op":"hello"}"#,
            &mut wire,
        );
        assert_eq!((wire.len(), &wire[..4]), (58, &[0, 0, 0, 0x36][..]));
        let reply = br#"{"ok":true,"op":"square","result":9,"worker_pid":4242,"id":7}"#;
        let mut wire = Vec::new();
        encode_done_with_reply(8, Op::Square, Outcome::Ok, b"7", reply, &mut wire);
        let mut want = hex("00 00 00 4a 06 00 00 00 00 00 00 00 08 01 00 01 37");
        want.extend_from_slice(reply);
        assert_eq!(wire, want);
    }

    #[test]
    fn bad_streams_are_errors() {
        assert_eq!(
            decode_to_master(&[0, 0, 0, 0]),
            Err(FrameError::Malformed("empty"))
        );
        assert_eq!(
            decode_to_master(&[255, 0, 0, 0]),
            Err(FrameError::TooLong(0xff00_0000))
        );
        assert_eq!(
            decode_to_master(&[0, 0, 0, 1, 9]),
            Err(FrameError::UnknownKind(9))
        );
        // A DONE_REPLY whose id length runs past its body, or is over the limit.
        let mut bad = vec![0, 0, 0, 13, KIND_DONE_REPLY];
        bad.extend_from_slice(&[0; 8]);
        bad.extend_from_slice(&[1, 0, 5, b'x']);
        assert_eq!(
            decode_to_master(&bad),
            Err(FrameError::Malformed("done_reply"))
        );
        bad[4 + 1 + 8 + 2] = (MAX_DONE_ID + 1) as u8;
        assert_eq!(
            decode_to_master(&bad),
            Err(FrameError::Malformed("done_reply"))
        );
        let mut fb = FrameBuf::with_capacity(64);
        fb.spare()[..3].copy_from_slice(&[0, 0, 0]);
        fb.filled(3);
        assert_eq!(fb.next_to_master(), Ok(None));
        assert_eq!(fb.finish(), Err(FrameError::Truncated(3)));
    }
}
