//! What a load run counted ([`Tally`]), and how it is reported: a readable
//! text report or one JSON object.
//!
//! A [`Tally`] is mergeable, so `--processes` children each send theirs to
//! the parent as JSON and the parent reports the sum.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Width of one throughput-over-time bucket.
pub const BUCKET_NS: u64 = 100_000_000;

/// The largest latency the histogram tracks (one hour); longer ones saturate.
const MAX_TRACKED_NS: u64 = 3_600_000_000_000;

/// Everything a load run counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tally {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered in time (ok or error replies), each counted once.
    pub answered: u64,
    /// Requests with no reply within `--timeout-ms` of being sent.
    pub lost: u64,
    /// Further copies of a reply already counted, to requests sent once.
    pub duplicates: u64,
    /// Further replies to requests sent more than once (a retry or a
    /// failover crossed the first reply): expected, and not duplicates.
    #[serde(default)]
    pub resent_replies: u64,
    /// Replies that came after their request was counted lost.
    pub late: u64,
    /// `"ok":true` replies whose content is wrong (a square, greeting or sleep
    /// that does not match the request).
    pub wrong: u64,
    /// Replies that name no request this run sent.
    pub unmatched: u64,
    /// ICMP port-unreachable errors seen on the sockets (nothing listening).
    pub refused: u64,
    /// Error replies by code.
    pub errors: BTreeMap<String, u64>,
    /// Answered requests by the PID of the worker that answered.
    pub per_pid: BTreeMap<u32, u64>,
    /// Latency of answered requests, in nanoseconds: from the intended send
    /// time in open loop, from the actual send in closed loop.
    #[serde(with = "histogram_pairs")]
    pub latency_ns: Histogram<u64>,
    /// Open loop only: latency from the actual send, in nanoseconds. Where it
    /// is much lower than `latency_ns`, the load generator itself ran late.
    #[serde(with = "histogram_pairs")]
    pub service_ns: Histogram<u64>,
    /// Answers received per [`BUCKET_NS`] since the start.
    pub buckets: Vec<u64>,
    /// How long requests were being sent, in nanoseconds.
    pub send_ns: u64,
    /// When the last answer arrived, in nanoseconds since the start.
    pub last_answer_ns: u64,
    /// The most an open-loop send ran behind its schedule, in nanoseconds.
    pub max_send_lag_ns: u64,
    /// Sending stopped early on SIGINT or SIGTERM.
    #[serde(default)]
    pub interrupted: bool,
    /// What each server did, in `--server` order.
    #[serde(default)]
    pub servers: Vec<ServerTally>,
}

/// What one server did in a load run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTally {
    /// The server's address.
    pub server: String,
    /// Datagrams sent to it: first attempts, retries and failed-over requests.
    pub sent: u64,
    /// Requests it answered (the first reply to each).
    pub answered: u64,
    /// Timed-out attempts it was sent again (`--retries`).
    pub retried: u64,
    /// Requests that left it for the next server: timed out after every
    /// retry, `busy`, `shutting_down` or port unreachable.
    pub failed_over: u64,
    /// Requests lost with it as the last server tried.
    pub lost: u64,
    /// ICMP port-unreachable errors on sockets connected to it.
    pub refused: u64,
}

impl ServerTally {
    /// Nothing counted yet for `server`.
    pub fn new(server: String) -> ServerTally {
        ServerTally {
            server,
            ..ServerTally::default()
        }
    }

    fn merge(&mut self, other: &ServerTally) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.retried += other.retried;
        self.failed_over += other.failed_over;
        self.lost += other.lost;
        self.refused += other.refused;
    }
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            sent: 0,
            answered: 0,
            lost: 0,
            duplicates: 0,
            late: 0,
            wrong: 0,
            unmatched: 0,
            refused: 0,
            errors: BTreeMap::new(),
            per_pid: BTreeMap::new(),
            latency_ns: new_histogram(),
            service_ns: new_histogram(),
            buckets: Vec::new(),
            send_ns: 0,
            last_answer_ns: 0,
            max_send_lag_ns: 0,
            interrupted: false,
            servers: Vec::new(),
            resent_replies: 0,
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_NS, 3).expect("valid histogram bounds")
}

impl Tally {
    /// Counts one answer arriving at `at_ns` after `latency_ns`.
    pub fn answer(&mut self, at_ns: u64, latency_ns: u64) {
        self.answered += 1;
        self.latency_ns.saturating_record(latency_ns.max(1));
        self.last_answer_ns = self.last_answer_ns.max(at_ns);
        let b = (at_ns / BUCKET_NS) as usize;
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
    }

    /// Records the latency of an open-loop answer from its actual send.
    pub fn service(&mut self, ns: u64) {
        self.service_ns.saturating_record(ns.max(1));
    }

    /// Counts one error reply with this code.
    pub fn error(&mut self, code: &str) {
        match self.errors.get_mut(code) {
            Some(n) => *n += 1,
            None => {
                self.errors.insert(code.to_string(), 1);
            }
        }
    }

    /// Counts one reply from this worker.
    pub fn worker(&mut self, pid: u32) {
        *self.per_pid.entry(pid).or_insert(0) += 1;
    }

    /// Adds another process's tally to this one. Times are taken as the
    /// longest, since the processes ran side by side.
    pub fn merge(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.resent_replies += other.resent_replies;
        self.late += other.late;
        self.wrong += other.wrong;
        self.unmatched += other.unmatched;
        self.refused += other.refused;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_insert(0) += n;
        }
        for (pid, n) in &other.per_pid {
            *self.per_pid.entry(*pid).or_insert(0) += n;
        }
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_ns.add(&other.latency_ns);
        let _ = self.service_ns.add(&other.service_ns);
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (b, n) in self.buckets.iter_mut().zip(&other.buckets) {
            *b += n;
        }
        self.send_ns = self.send_ns.max(other.send_ns);
        self.last_answer_ns = self.last_answer_ns.max(other.last_answer_ns);
        self.max_send_lag_ns = self.max_send_lag_ns.max(other.max_send_lag_ns);
        self.interrupted |= other.interrupted;
        // Every process loads the same servers, in the same order.
        for (i, theirs) in other.servers.iter().enumerate() {
            match self.servers.get_mut(i) {
                Some(ours) => ours.merge(theirs),
                None => self.servers.push(theirs.clone()),
            }
        }
    }

    /// Error replies of every code.
    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The seconds the run was active: sending, and receiving the answers.
    pub fn active_s(&self) -> f64 {
        self.send_ns.max(self.last_answer_ns) as f64 / 1e9
    }

    /// Answers per second over [`Tally::active_s`].
    pub fn throughput(&self) -> f64 {
        let s = self.active_s();
        if s > 0.0 {
            self.answered as f64 / s
        } else {
            0.0
        }
    }

    /// The latency at `q` (0..=100), in nanoseconds.
    pub fn latency_at(&self, q: f64) -> u64 {
        self.latency_ns.value_at_percentile(q)
    }
}

/// Serializes a histogram as `[[value, count], ...]` pairs of its recorded
/// buckets: simple, and lossless for a histogram with the same bounds.
mod histogram_pairs {
    use hdrhistogram::Histogram;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u64, u64)> = h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        pairs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let pairs = Vec::<(u64, u64)>::deserialize(d)?;
        let mut h = super::new_histogram();
        for (value, count) in pairs {
            h.saturating_record_n(value, count);
        }
        Ok(h)
    }
}

/// How the load was applied, for the report's header.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// The servers loaded, in `--server` order.
    pub servers: Vec<String>,
    /// `first` or `round-robin`.
    pub policy: &'static str,
    /// Resends of a timed-out request to the same server.
    pub retries: u8,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Outstanding requests per socket (closed loop).
    pub window: Option<u32>,
    /// Target requests per second over all sockets and processes (open loop).
    pub rate: Option<f64>,
    /// Sockets per process.
    pub sockets: u32,
    /// Processes.
    pub processes: u32,
    /// The request mix, as `square=90,hello=10`.
    pub mix: String,
    /// When a request without reply counts as lost.
    pub timeout_ms: u64,
}

/// Formats a duration given in nanoseconds for people: `85 µs`, `1.20 ms`,
/// `2.50 s`.
pub fn human_ns(ns: u64) -> String {
    let us = ns as f64 / 1e3;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The percentiles every report shows, with their labels and JSON keys.
pub const PERCENTILES: [(f64, &str, &str); 4] = [
    (50.0, "p50", "p50"),
    (90.0, "p90", "p90"),
    (99.0, "p99", "p99"),
    (99.9, "p99.9", "p999"),
];

/// The readable report.
pub fn render_text(setup: &Setup, t: &Tally) -> String {
    let mut out = String::new();
    let shape = match (setup.mode, setup.window, setup.rate) {
        ("open", _, Some(rate)) => format!("open loop at {rate:.0} req/s"),
        (_, Some(w), _) => format!("closed loop, window {w}"),
        _ => setup.mode.to_string(),
    };
    let _ = writeln!(
        out,
        "loadgen -> {}: {shape}, {} socket(s) x {} process(es), mix {}, {:.2} s",
        setup.servers.join(", "),
        setup.sockets,
        setup.processes,
        setup.mix,
        t.send_ns as f64 / 1e9
    );
    if t.interrupted {
        let _ = writeln!(out, "            interrupted: sending stopped early");
    }
    let _ = writeln!(
        out,
        "requests    sent {}  answered {}  lost {} ({:.3}%)  duplicates {}  late {}  wrong {}",
        t.sent,
        t.answered,
        t.lost,
        percent(t.lost, t.sent),
        t.duplicates,
        t.late,
        t.wrong
    );
    if t.unmatched > 0 || t.refused > 0 || t.resent_replies > 0 {
        let _ = writeln!(
            out,
            "            unmatched replies {}  port unreachable {}  replies to resent requests {}",
            t.unmatched, t.refused, t.resent_replies
        );
    }
    if t.errors.is_empty() {
        let _ = writeln!(out, "errors      none");
    } else {
        let list: Vec<String> = t.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let _ = writeln!(out, "errors      {}", list.join("  "));
    }
    let _ = writeln!(out, "throughput  {:.0} replies/s", t.throughput());
    if t.answered > 0 {
        let mut line = String::from("latency    ");
        for (q, label, _) in PERCENTILES {
            let _ = write!(line, " {label} {} ", human_ns(t.latency_at(q)));
        }
        let _ = write!(line, " max {}", human_ns(t.latency_ns.max()));
        let _ = writeln!(out, "{}", line.trim_end());
    } else {
        let _ = writeln!(out, "latency     no answers");
    }
    if setup.mode == "open" && !t.service_ns.is_empty() {
        let h = &t.service_ns;
        let _ = writeln!(
            out,
            "            (from the intended send time; from the actual send: p50 {}  p99 {}  max {};\n             loadgen ran at most {} behind its schedule)",
            human_ns(h.value_at_percentile(50.0)),
            human_ns(h.value_at_percentile(99.0)),
            human_ns(h.max()),
            human_ns(t.max_send_lag_ns)
        );
    }
    if setup.servers.len() > 1 || t.servers.iter().any(|s| s.retried > 0) {
        let _ = write!(out, "{}", render_servers(setup, &t.servers));
    }
    let _ = write!(out, "{}", render_spread(&t.per_pid));
    let named: u64 = t.per_pid.values().sum();
    if named < t.answered {
        let _ = writeln!(
            out,
            "            ({} answers name no worker: the master's own errors and text replies carry none)",
            t.answered - named
        );
    }
    out
}

/// What each server did: one line each.
pub fn render_servers(setup: &Setup, servers: &[ServerTally]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "servers     {} ({}, {} retries per server)",
        servers.len(),
        setup.policy,
        setup.retries
    );
    let width = servers.iter().map(|s| s.server.len()).max().unwrap_or(0);
    for s in servers {
        let _ = writeln!(
            out,
            "  {:<width$}  sent {}  answered {}  retried {}  failed over {}  lost {}  refused {}",
            s.server, s.sent, s.answered, s.retried, s.failed_over, s.lost, s.refused
        );
    }
    out
}

/// The spread of replies over worker PIDs: count, share and a bar each.
pub fn render_spread(per_pid: &BTreeMap<u32, u64>) -> String {
    const BAR: usize = 40;
    let mut out = String::new();
    let total: u64 = per_pid.values().sum();
    let _ = writeln!(out, "workers     {} PID(s) answered", per_pid.len());
    let max = per_pid.values().copied().max().unwrap_or(0);
    for (pid, n) in per_pid {
        let len = if max == 0 {
            0
        } else {
            ((*n as f64 / max as f64) * BAR as f64).round() as usize
        };
        let _ = writeln!(
            out,
            "  pid {pid:>8}  {n:>10}  {:>5.1}%  {}",
            percent(*n, total),
            "#".repeat(len.max(usize::from(*n > 0)))
        );
    }
    out
}

/// The report as one JSON object.
pub fn render_json(setup: &Setup, t: &Tally) -> serde_json::Value {
    let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
    let mut latency = serde_json::Map::new();
    for (q, _, key) in PERCENTILES {
        latency.insert(key.to_string(), json!(us(t.latency_at(q))));
    }
    latency.insert("max".into(), json!(us(t.latency_ns.max())));
    latency.insert("mean".into(), json!(us(t.latency_ns.mean() as u64)));
    let mut service = serde_json::Map::new();
    if !t.service_ns.is_empty() {
        for (q, _, key) in PERCENTILES {
            let v = t.service_ns.value_at_percentile(q);
            service.insert(key.to_string(), json!(us(v)));
        }
        service.insert("max".into(), json!(us(t.service_ns.max())));
    }
    let per_pid: serde_json::Map<String, serde_json::Value> = t
        .per_pid
        .iter()
        .map(|(pid, n)| (pid.to_string(), json!(n)))
        .collect();
    let series: Vec<f64> = t
        .buckets
        .iter()
        .map(|n| *n as f64 * 1e9 / BUCKET_NS as f64)
        .collect();
    let servers: Vec<serde_json::Value> = t
        .servers
        .iter()
        .map(|s| serde_json::to_value(s).unwrap_or_default())
        .collect();
    json!({
        "server": setup.servers.join(","),
        "servers": servers,
        "policy": setup.policy,
        "retries": setup.retries,
        "mode": setup.mode,
        "window": setup.window,
        "rate": setup.rate,
        "sockets": setup.sockets,
        "processes": setup.processes,
        "mix": setup.mix,
        "timeout_ms": setup.timeout_ms,
        "sent": t.sent,
        "answered": t.answered,
        "ok": t.answered.saturating_sub(t.error_total() + t.wrong),
        "lost": t.lost,
        "duplicates": t.duplicates,
        "resent_replies": t.resent_replies,
        "late": t.late,
        "wrong": t.wrong,
        "unmatched": t.unmatched,
        "refused": t.refused,
        "errors": t.errors,
        "throughput_rps": (t.throughput() * 10.0).round() / 10.0,
        "latency_us": latency,
        "latency_from_send_us": service,
        "per_pid": per_pid,
        "duration_s": t.send_ns as f64 / 1e9,
        "interrupted": t.interrupted,
        "active_s": t.active_s(),
        "max_send_lag_us": us(t.max_send_lag_ns),
        "throughput_series_rps": series,
        "bucket_ms": BUCKET_NS / 1_000_000,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            servers: vec!["127.0.0.1:10001".into()],
            policy: "first",
            retries: 0,
            mode: "closed",
            window: Some(32),
            rate: None,
            sockets: 2,
            processes: 1,
            mix: "square=100".into(),
            timeout_ms: 1000,
        }
    }

    fn sample() -> Tally {
        let mut t = Tally {
            sent: 10,
            send_ns: 1_000_000_000,
            ..Tally::default()
        };
        for i in 0..8u64 {
            t.answer(i * 100_000_000, (i + 1) * 100_000);
            t.worker(100 + (i % 2) as u32);
        }
        t.lost = 2;
        t.error("busy");
        t
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ns(85_000), "85 µs");
        assert_eq!(human_ns(1_204_000), "1.20 ms");
        assert_eq!(human_ns(12_340_000), "12.3 ms");
        assert_eq!(human_ns(2_500_000_000), "2.50 s");
    }

    #[test]
    fn text_report_has_every_part() {
        let text = render_text(&setup(), &sample());
        assert!(
            text.contains("sent 10  answered 8  lost 2 (20.000%)"),
            "{text}"
        );
        assert!(text.contains("errors      busy 1"), "{text}");
        assert!(text.contains("throughput  8 replies/s"), "{text}");
        assert!(text.contains("p50 400 µs"), "{text}");
        assert!(text.contains("max 800 µs"), "{text}");
        assert!(text.contains("2 PID(s) answered"), "{text}");
        assert!(
            text.contains(
                "pid      100           4   50.0%  ########################################"
            ),
            "{text}"
        );
    }

    #[test]
    fn json_report_has_the_documented_keys() {
        let v = render_json(&setup(), &sample());
        for key in [
            "sent",
            "answered",
            "lost",
            "duplicates",
            "late",
            "wrong",
            "errors",
            "throughput_rps",
            "latency_us",
            "per_pid",
            "duration_s",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert_eq!(v["errors"]["busy"], 1);
        assert_eq!(v["per_pid"]["101"], 4);
        // hdrhistogram keeps three significant digits.
        let max = v["latency_us"]["max"].as_f64().unwrap();
        assert!((799.0..=801.0).contains(&max), "{max}");
        assert_eq!(v["latency_us"]["p999"], v["latency_us"]["max"]);
        assert_eq!(v["ok"], 7);
        assert_eq!(v["throughput_series_rps"][0], 10.0);
    }

    #[test]
    fn tallies_merge_through_json() {
        let a = sample();
        let wire = serde_json::to_string(&a).unwrap();
        let b: Tally = serde_json::from_str(&wire).unwrap();
        let mut sum = a.clone();
        sum.merge(&b);
        assert_eq!(sum.sent, 20);
        assert_eq!(sum.answered, 16);
        assert_eq!(sum.latency_ns.len(), 16);
        assert_eq!(sum.latency_at(50.0), a.latency_at(50.0));
        assert_eq!(sum.errors["busy"], 2);
        assert_eq!(sum.per_pid[&100], 8);
        assert_eq!(sum.buckets[0], 2);
        assert_eq!(sum.send_ns, a.send_ns);
    }
}
