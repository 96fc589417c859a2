//! The pipe-stream oracle: any bytes, decoded in both directions two ways:
//! frame by frame with `decode_to_worker` / `decode_to_master` over the whole
//! buffer, and through a `FrameBuf` fed in reads of given sizes, as the master
//! and the workers read their pipes.
//!
//! Checked: nothing panics; every decoded frame re-encodes to exactly the
//! bytes it was decoded from (so encode then decode gives the frame back);
//! the `FrameBuf` hands out the same frames as the plain decoders however
//! the stream is split, and ends the same way (the same error, or a clean end
//! or `Truncated` with the count of bytes after the last whole frame).

use std::net::SocketAddr;

use protocol::frame::{
    decode_to_master, decode_to_worker, encode_done, encode_done_with_reply, encode_ready,
    encode_request, encode_sent_at, encode_stopping, FrameBuf, FrameError, ToMaster, ToWorker,
};
use protocol::{Op, Outcome};

/// A decoded frame of either direction, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Request {
        seq: u64,
        reply_limit: u32,
        keep_reply: bool,
        client: SocketAddr,
        payload: Vec<u8>,
    },
    Ready {
        pid: u32,
    },
    Stopping {
        pid: u32,
    },
    Done {
        seq: u64,
        op: Op,
        outcome: Outcome,
        id: Vec<u8>,
        reply: Option<Vec<u8>>,
    },
    SentAt {
        mono_us: u64,
    },
}

impl Frame {
    fn from_worker(f: ToWorker<'_>) -> Frame {
        let ToWorker::Request {
            seq,
            reply_limit,
            keep_reply,
            client,
            payload,
        } = f;
        Frame::Request {
            seq,
            reply_limit,
            keep_reply,
            client,
            payload: payload.to_vec(),
        }
    }

    fn from_master(f: ToMaster<'_>) -> Frame {
        match f {
            ToMaster::Ready { pid } => Frame::Ready { pid },
            ToMaster::Stopping { pid } => Frame::Stopping { pid },
            ToMaster::Done {
                seq,
                op,
                outcome,
                id,
                reply,
            } => Frame::Done {
                seq,
                op,
                outcome,
                id: id.to_vec(),
                reply: reply.map(<[u8]>::to_vec),
            },
            ToMaster::SentAt { mono_us } => Frame::SentAt { mono_us },
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Request {
                seq,
                reply_limit,
                keep_reply,
                client,
                payload,
            } => encode_request(*seq, *reply_limit, *keep_reply, *client, payload, out),
            Frame::Ready { pid } => encode_ready(*pid, out),
            Frame::Stopping { pid } => encode_stopping(*pid, out),
            Frame::Done {
                seq,
                op,
                outcome,
                id,
                reply: None,
            } => encode_done(*seq, *op, *outcome, id, out),
            Frame::Done {
                seq,
                op,
                outcome,
                id,
                reply: Some(reply),
            } => encode_done_with_reply(*seq, *op, *outcome, id, reply, out),
            Frame::SentAt { mono_us } => encode_sent_at(*mono_us, out),
        }
    }
}

/// The two directions a stream can be read as.
#[derive(Clone, Copy)]
enum Direction {
    ToWorker,
    ToMaster,
}

impl Direction {
    /// The plain decoder of this direction, with the frame owned.
    fn decode(self, buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        Ok(match self {
            Direction::ToWorker => decode_to_worker(buf)?.map(|(f, n)| (Frame::from_worker(f), n)),
            Direction::ToMaster => decode_to_master(buf)?.map(|(f, n)| (Frame::from_master(f), n)),
        })
    }

    /// The next frame a `FrameBuf` hands out in this direction.
    fn take(self, fb: &mut FrameBuf) -> Result<Option<Frame>, FrameError> {
        Ok(match self {
            Direction::ToWorker => fb.next_to_worker()?.map(Frame::from_worker),
            Direction::ToMaster => fb.next_to_master()?.map(Frame::from_master),
        })
    }
}

/// Decodes `stream` frame by frame over the whole buffer; returns the frames
/// and how a reader that got exactly these bytes must end.
fn decode_whole(dir: Direction, stream: &[u8]) -> (Vec<Frame>, Result<(), FrameError>) {
    let mut frames = Vec::new();
    let mut at = 0;
    let mut again = Vec::new();
    loop {
        match dir.decode(&stream[at..]) {
            Ok(Some((frame, used))) => {
                assert!(used >= 5, "a frame of {used} bytes");
                assert!(at + used <= stream.len(), "a frame past the end");
                // decode then encode is the identity on the wire bytes, so
                // encode then decode is the identity on frames.
                again.clear();
                frame.encode(&mut again);
                assert_eq!(again, &stream[at..at + used], "{frame:?} re-encoded");
                frames.push(frame);
                at += used;
            }
            Ok(None) => {
                let end = match stream.len() - at {
                    0 => Ok(()),
                    n => Err(FrameError::Truncated(n)),
                };
                return (frames, end);
            }
            Err(e) => return (frames, Err(e)),
        }
    }
}

/// Feeds `stream` through a `FrameBuf` in reads of the given sizes
/// (cycled), as a pipe reader would, taking frames with `take` after each
/// read; returns the frames and how the stream ended.
pub fn feed<T>(
    stream: &[u8],
    reads: &[usize],
    capacity: usize,
    mut take: impl FnMut(&mut FrameBuf) -> Result<Option<T>, FrameError>,
) -> (Vec<T>, Result<(), FrameError>) {
    let mut fb = FrameBuf::with_capacity(capacity);
    let mut got = Vec::new();
    let mut rest = stream;
    let mut sizes = reads.iter().cycle();
    while !rest.is_empty() {
        let spare = fb.spare();
        assert!(!spare.is_empty(), "spare() must leave room to read");
        let n = (*sizes.next().expect("reads is not empty"))
            .min(rest.len())
            .min(spare.len());
        spare[..n].copy_from_slice(&rest[..n]);
        fb.filled(n);
        rest = &rest[n..];
        loop {
            match take(&mut fb) {
                Ok(Some(frame)) => got.push(frame),
                Ok(None) => break,
                Err(e) => return (got, Err(e)),
            }
        }
    }
    (got, fb.finish())
}

/// [`feed`] in direction `dir`.
fn decode_fed(
    dir: Direction,
    stream: &[u8],
    reads: &[usize],
    capacity: usize,
) -> (Vec<Frame>, Result<(), FrameError>) {
    feed(stream, reads, capacity, |fb| dir.take(fb))
}

/// Checks one input of the `frames` fuzz target, laid out as
/// `[capacity/8] [k-1] [k read sizes - 1] stream...` with `k = 1..=8` (the
/// second byte is taken mod 8), so that seeds can be written by hand
/// (`fuzz/examples/seed_corpus.rs`). Inputs too short for their header are
/// skipped.
pub fn check_input(data: &[u8]) {
    let [capacity, k, rest @ ..] = data else {
        return;
    };
    let k = usize::from(k % 8) + 1;
    if rest.len() < k {
        return;
    }
    let (reads, stream) = rest.split_at(k);
    let reads: Vec<usize> = reads.iter().map(|r| usize::from(*r) + 1).collect();
    check_stream(stream, &reads, usize::from(*capacity) * 8);
}

/// Checks one pipe stream, read through a `FrameBuf` of `capacity` in reads
/// of `reads` sizes (cycled, each at least 1), in both directions.
pub fn check_stream(stream: &[u8], reads: &[usize], capacity: usize) {
    for dir in [Direction::ToWorker, Direction::ToMaster] {
        let whole = decode_whole(dir, stream);
        let fed = decode_fed(dir, stream, reads, capacity);
        assert_eq!(fed, whole, "a FrameBuf fed in reads of {reads:?}");
    }
}
