//! Answering one datagram: the one function that a worker and the master's
//! inline mode (`--workers 0`) both call, so the two cannot drift apart.
//!
//! Everything that depends on where a request runs goes through [`Host`]:
//! whether `sleep` may block (a worker: yes; the master's loop: never) and
//! whether `crash` may abort (a worker with fault injection on), and where
//! the reply is written. The function itself does no I/O.

use crate::{
    bound_reply, parse, write_error, write_reply, ErrorCode, Op, Outcome, ReplyContext, Request,
};

/// What a request does to the process that answers it, besides replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// `sleep` with more than 0 ms: block that long, then reply.
    Sleep {
        /// How long.
        ms: u64,
    },
    /// `crash`: abort the process while holding the request.
    Crash,
}

/// What the host made of an [`Effect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It happened (the sleep is over): the reply is written as usual.
    Done,
    /// It may not happen here: the request is answered `disabled` with
    /// this message.
    Refused(&'static str),
    /// It was cut short because the process is stopping: no reply is
    /// written, and whoever handed the request over answers it.
    Abandoned,
}

/// The process answering requests.
pub trait Host {
    /// What the host's own operations may fail with.
    type Error;

    /// Called before a request with an effect. A host that blocks or aborts
    /// sends the replies it has gathered first, so that fast requests never
    /// wait behind a slow one.
    ///
    /// # Errors
    /// When sending what it has gathered fails.
    fn perform(&mut self, effect: Effect) -> Result<Verdict, Self::Error>;

    /// An empty buffer for the next reply, after making room if needed.
    ///
    /// # Errors
    /// When making room (sending a full batch) fails.
    fn reply_buf(&mut self) -> Result<&mut Vec<u8>, Self::Error>;
}

/// How a datagram was answered: what the completion frame or the journal
/// records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered<'p> {
    /// What was asked.
    pub op: Op,
    /// How it ended. When [`Outcome::sent`], a reply was written into the
    /// buffer [`Host::reply_buf`] gave, and the caller sends it.
    pub outcome: Outcome,
    /// The request's raw JSON id, or empty.
    pub id: &'p [u8],
}

/// The effect of `request`, if it has one.
pub fn effect_of(request: &Request) -> Option<Effect> {
    match *request {
        Request::Sleep { ms } if ms > 0 => Some(Effect::Sleep { ms }),
        Request::Crash => Some(Effect::Crash),
        _ => None,
    }
}

/// Answers `payload`: parses it, lets `host` perform its effect, and writes
/// the reply into the host's buffer, held to `reply_limit` bytes
/// ([`bound_reply`]: a reply over it is [`Outcome::Withheld`]). `None`: the
/// host abandoned the request (nothing written). An empty datagram gets no
/// reply ([`Outcome::NoReply`], nothing written).
///
/// # Errors
/// Whatever the host's operations fail with.
pub fn answer<'p, H: Host>(
    payload: &'p [u8],
    ctx: &ReplyContext,
    reply_limit: usize,
    host: &mut H,
) -> Result<Option<Answered<'p>>, H::Error> {
    let Some(parsed) = parse(payload) else {
        return Ok(Some(Answered {
            op: Op::Invalid,
            outcome: Outcome::NoReply,
            id: b"",
        }));
    };
    let verdict = match parsed.request.as_ref().ok().and_then(effect_of) {
        Some(effect) => host.perform(effect)?,
        None => Verdict::Done,
    };
    if verdict == Verdict::Abandoned {
        return Ok(None);
    }
    let out = host.reply_buf()?;
    let outcome = match verdict {
        Verdict::Refused(message) => write_error(
            parsed.dialect,
            parsed.id,
            ErrorCode::Disabled,
            message,
            Some(ctx.worker_pid),
            out,
        ),
        _ => write_reply(&parsed, ctx, out),
    };
    let outcome = bound_reply(outcome, parsed.dialect, parsed.id, reply_limit, out);
    Ok(Some(Answered {
        op: parsed.op(),
        outcome,
        id: parsed.id.unwrap_or("").as_bytes(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that records effects and answers each with a fixed verdict.
    struct Recorder {
        verdict: Verdict,
        effects: Vec<Effect>,
        buf: Vec<u8>,
    }

    impl Host for Recorder {
        type Error = std::convert::Infallible;
        fn perform(&mut self, effect: Effect) -> Result<Verdict, Self::Error> {
            self.effects.push(effect);
            Ok(self.verdict)
        }
        fn reply_buf(&mut self) -> Result<&mut Vec<u8>, Self::Error> {
            Ok(&mut self.buf)
        }
    }

    const NO_LIMIT: usize = usize::MAX;

    fn host(verdict: Verdict) -> Recorder {
        Recorder {
            verdict,
            effects: Vec::new(),
            buf: Vec::new(),
        }
    }

    fn ctx() -> ReplyContext {
        ReplyContext {
            worker_pid: 42,
            client: "127.0.0.1:5555".parse().unwrap(),
        }
    }

    #[test]
    fn a_plain_request_has_no_effect_and_is_answered() {
        let mut h = host(Verdict::Abandoned);
        let a = answer(
            br#"{"op":"square","n":12,"id":7}"#,
            &ctx(),
            NO_LIMIT,
            &mut h,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (a.op, a.outcome, a.id),
            (Op::Square, Outcome::Ok, &b"7"[..])
        );
        assert!(h.effects.is_empty());
        assert!(String::from_utf8_lossy(&h.buf).contains(r#""result":144"#));
    }

    #[test]
    fn a_sleep_goes_through_the_host() {
        let mut h = host(Verdict::Done);
        let a = answer(br#"{"op":"sleep","ms":5}"#, &ctx(), NO_LIMIT, &mut h)
            .unwrap()
            .unwrap();
        assert_eq!(h.effects, vec![Effect::Sleep { ms: 5 }]);
        assert_eq!(a.outcome, Outcome::Ok);
        // A zero sleep blocks nothing.
        let mut h = host(Verdict::Abandoned);
        answer(br#"{"op":"sleep","ms":0}"#, &ctx(), NO_LIMIT, &mut h)
            .unwrap()
            .unwrap();
        assert!(h.effects.is_empty());
    }

    #[test]
    fn a_refused_effect_is_answered_disabled() {
        let mut h = host(Verdict::Refused("not here"));
        let a = answer(
            br#"{"op":"sleep","ms":5,"id":"s"}"#,
            &ctx(),
            NO_LIMIT,
            &mut h,
        )
        .unwrap()
        .unwrap();
        assert_eq!(a.outcome, Outcome::Error(ErrorCode::Disabled));
        let text = String::from_utf8_lossy(&h.buf);
        assert!(
            text.contains("not here") && text.contains(r#""id":"s""#),
            "{text}"
        );
    }

    #[test]
    fn an_abandoned_request_writes_nothing() {
        let mut h = host(Verdict::Abandoned);
        assert_eq!(
            answer(br#"{"op":"crash"}"#, &ctx(), NO_LIMIT, &mut h).unwrap(),
            None
        );
        assert_eq!(h.effects, vec![Effect::Crash]);
        assert!(h.buf.is_empty());
    }

    #[test]
    fn an_empty_datagram_gets_no_reply() {
        let mut h = host(Verdict::Done);
        let a = answer(b"", &ctx(), NO_LIMIT, &mut h).unwrap().unwrap();
        assert_eq!(a.outcome, Outcome::NoReply);
        assert!(h.buf.is_empty());
    }

    #[test]
    fn a_reply_over_the_amplification_bound_is_withheld_or_compact() {
        // A greeting is 3x a short text datagram and more: withheld.
        let mut h = host(Verdict::Done);
        let a = answer(b"hi", &ctx(), 6, &mut h).unwrap().unwrap();
        assert_eq!(a.outcome, Outcome::Withheld);
        assert!(h.buf.is_empty());
        // An error keeps its code and id when its message does not fit.
        let mut h = host(Verdict::Done);
        let req = br#"{"op":"nope","id":12345}"#;
        let a = answer(req, &ctx(), 3 * req.len(), &mut h).unwrap().unwrap();
        assert_eq!(a.outcome, Outcome::Error(ErrorCode::UnknownOp));
        assert!(h.buf.len() <= 3 * req.len());
        let text = String::from_utf8_lossy(&h.buf);
        assert!(
            text.contains("unknown_op") && text.contains("12345"),
            "{text}"
        );
    }
}
