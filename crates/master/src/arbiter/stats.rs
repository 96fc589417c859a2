//! The body of a `stats` reply: the pool, each worker, and the totals.

use std::time::Instant;

use protocol::ErrorCode;

use super::Arbiter;

/// The body of a `stats` reply.
pub(super) fn stats_json(a: &Arbiter, now: Instant) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{json, Value};
    let t = &a.ledger.totals;
    let errors: serde_json::Map<String, Value> = ErrorCode::ALL
        .iter()
        .filter(|c| t.errors[**c as usize] > 0)
        .map(|c| (c.as_str().to_owned(), json!(t.errors[*c as usize])))
        .collect();
    let workers: Vec<Value> = a
        .slots
        .iter()
        .map(|s| {
            json!({
                "pid": s.pid.as_raw(),
                "age_s": (now.duration_since(s.started).as_secs_f64() * 1000.0).round() / 1000.0,
                "served": s.served,
                "in_flight": s.inflight.len(),
                "state": s.state_name(),
            })
        })
        .collect();
    let (shed, written, cluster_shed) = a.ledger.journal.as_ref().map_or((0, 0, 0), |j| {
        (j.shed_rows(), j.written_rows(), j.shed_cluster_events())
    });
    let clock = &a.cfg.clock;
    let d = &a.dedup;
    let limits = d.limits();
    let dedup = json!({
        "window_s": limits.window.as_secs_f64(),
        "max_entries": if d.enabled() { limits.entries } else { 0 },
        "max_bytes": if d.enabled() { limits.bytes } else { 0 },
        "entries": d.entries(),
        "bytes": d.bytes(),
        "replayed": t.replayed,
        "dropped_in_progress": t.duplicates,
        "evicted": d.evicted,
        "expired": d.expired,
        "replaced": d.replaced,
    });
    let body = json!({
        "master_pid": a.master_pid,
        // The causal link a client may carry to another server (`"hlc"`):
        // later than everything this master has journaled so far.
        "hlc": clock.now().to_string(),
        "clock": {
            "id": clock.id().to_string(),
            "max_delta_ms": clock.max_delta().as_millis() as u64,
            "links": t.hlc_links,
            "refused": t.hlc_refused,
            "debug_skew_ms": crate::clock::skew_us() / 1000,
        },
        "uptime_s": (now.duration_since(a.started).as_secs_f64() * 1000.0).round() / 1000.0,
        "pool": {
            "target": a.target,
            "active": a.slots.iter().filter(|s| s.is_active()).count(),
            "max_inflight": a.cfg.max_inflight,
        },
        "workers": workers,
        "totals": {
            "received": t.received,
            "answered": t.answered(),
            "ok": t.ok,
            "errors": errors,
            "busy": t.errors[ErrorCode::Busy as usize],
            "crashes": t.crashes,
            "timeouts": t.timeouts,
            "restarts": t.restarts,
            "redispatched": t.redispatched,
            "replies_dropped": a.responder.dropped,
            "withheld": t.withheld,
            "dropped": t.dropped,
            "journal_written": written,
            "journal_shed": shed,
            "journal_cluster_shed": cluster_shed,
        },
        "dedup": dedup,
    });
    match body {
        Value::Object(m) => m,
        _ => unreachable!("json! of an object literal"),
    }
}
