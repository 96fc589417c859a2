//! Issue 11, item 7: causal order across journals. Two masters, the second
//! with its clock 2 s behind (`--debug-clock-skew-ms -2000`); a client
//! asks A, then carries A's HLC stamp (from A's `stats` reply) to B in its
//! request's `"hlc"`; `master report --journal a --journal b` lists A's
//! request before B's, although B's wall clock put B's first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use tempfile::TempDir;

use crate::harness::{self, bin, describe, run_with_deadline, Server};

/// A graceful stop flushes the journal within this.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// `master report` on a few rows.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);

/// Starts `master --journal <dir>/NAME ARGS`.
fn start(dir: &Path, name: &str, args: &[&str]) -> (Server, PathBuf) {
    let path = dir.join(name);
    let text = path.to_str().expect("a UTF-8 temp path").to_owned();
    let mut full = vec!["--journal", text.as_str(), "--workers", "1"];
    full.extend_from_slice(args);
    (Server::start(&full), path)
}

/// Stops a master with SIGTERM, so its journal is complete.
fn stop(s: &Server) {
    s.signal(Signal::SIGTERM);
    if s.wait_exit(STOP_DEADLINE).is_none() {
        s.fail("the master did not stop within 10 s of SIGTERM");
    }
}

/// `master report ARGS`' stdout; fails unless it exits 0.
fn report(s: &Server, args: &[&str]) -> String {
    let mut cmd = Command::new(bin("master"));
    cmd.arg("report").args(args);
    let (out, in_time) = run_with_deadline(&mut cmd, COMMAND_DEADLINE);
    s.check(in_time && out.status.success(), || {
        format!("master report failed: {}", describe(&cmd, &out))
    });
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The time part of an HLC stamp's text form (`<ntp64>/<hex id>`).
fn stamp_time(text: &str) -> u64 {
    text.split('/')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not an HLC stamp: {text:?}"))
}

#[test]
fn a_causal_link_orders_requests_across_servers_whose_clocks_disagree_by_2_s() {
    let _g = harness::shared();
    let dir = TempDir::new().expect("temp dir");
    let (a, a_path) = start(dir.path(), "a.db", &[]);
    let (b, b_path) = start(
        dir.path(),
        "b.db",
        &[
            "--debug-clock-skew-ms",
            "-2000",
            "--hlc-max-delta-ms",
            "5000",
        ],
    );
    b.check(b.log().contains("--debug-clock-skew-ms -2000"), || {
        "B should warn that its clock is skewed".to_owned()
    });

    // Request 1 to A; then A's stamp, which is later than all A journaled.
    let r1 = a.ask(r#"{"op":"square","n":11,"id":"r1"}"#);
    a.check(r1.is_ok(), || format!("request 1: {}", r1.text()));
    let a_stats = a.stats();
    let link = a_stats["hlc"]
        .as_str()
        .unwrap_or_else(|| a.fail(&format!("stats has no hlc: {a_stats}")))
        .to_owned();
    assert_eq!(a_stats["clock"]["debug_skew_ms"], 0);

    // Request 2 to B, carrying the link.
    let r2 = b.ask(&format!(
        r#"{{"op":"square","n":22,"id":"r2","hlc":"{link}"}}"#
    ));
    b.check(r2.is_ok(), || format!("request 2: {}", r2.text()));
    let b_stats = b.stats();
    b.check(
        b_stats["clock"]["links"] == 1 && b_stats["clock"]["refused"] == 0,
        || format!("B should have followed one link: {}", b_stats["clock"]),
    );
    assert_eq!(b_stats["clock"]["debug_skew_ms"], -2000);
    assert_eq!(b_stats["clock"]["max_delta_ms"], 5000);
    // B's clock now runs past A's stamp, though its wall clock is 2 s behind.
    b.check(
        stamp_time(b_stats["hlc"].as_str().unwrap()) > stamp_time(&link),
        || format!("B's stamp {} is not after the link {link}", b_stats["hlc"]),
    );

    // Links that must not move B's clock: too far ahead (12 s), or not a
    // stamp. Both requests are answered all the same, and counted.
    let id = link.split('/').nth(1).unwrap();
    let ahead = format!("{}/{id}", stamp_time(&link) + (10u64 << 32));
    for (i, bad) in [ahead.as_str(), "not-a-stamp"].into_iter().enumerate() {
        let r = b.ask(&format!(
            r#"{{"op":"square","n":3,"id":"bad{i}","hlc":"{bad}"}}"#
        ));
        b.check(r.is_ok(), || {
            format!("a request with a refused link: {}", r.text())
        });
    }
    let b_stats = b.stats();
    b.check(
        b_stats["clock"]["links"] == 1 && b_stats["clock"]["refused"] == 2,
        || format!("B should have refused two links: {}", b_stats["clock"]),
    );
    b.check(
        stamp_time(b_stats["hlc"].as_str().unwrap()) < stamp_time(&ahead),
        || {
            format!(
                "a refused link moved B's clock: {} vs {ahead}",
                b_stats["hlc"]
            )
        },
    );

    stop(&a);
    stop(&b);

    let (a_text, b_text) = (a_path.to_str().unwrap(), b_path.to_str().unwrap());
    let args = ["--journal", a_text, "--journal", b_text, "--rows", "50"];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = report(&a, &json_args);
    let json: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| a.fail(&format!("report --json is not JSON ({e}):\n{out}")));
    let rows = json["rows"].as_array().expect("rows");
    let find = |id: &str| {
        rows.iter()
            .position(|r| r["request_id"] == id)
            .unwrap_or_else(|| a.fail(&format!("request {id} is not in the report:\n{out}")))
    };
    let (i1, i2) = (find("r1"), find("r2"));
    let (row1, row2) = (&rows[i1], &rows[i2]);
    eprintln!(
        "causal: r1 at {} (wall {}), r2 at {} (wall {}); listed {i1} then {i2}",
        row1["hlc_at"], row1["ts"], row2["hlc_at"], row2["ts"]
    );
    assert_eq!(row1["server"], a.addr().to_string());
    assert_eq!(row2["server"], b.addr().to_string());
    // The causal order: request 1 happened before request 2.
    a.check(i1 < i2, || {
        format!("the merged report lists r2 before r1:\n{out}")
    });
    let stamp = |r: &Value| -> u64 { r["hlc"].as_str().unwrap().parse().unwrap() };
    assert!(stamp(row1) < stamp(row2));
    // And the wall clocks alone would have got it wrong: B's receipt of r2
    // is stamped over a second before A's receipt of r1 (ISO times compare
    // as text).
    let (ts1, ts2) = (row1["ts"].as_str().unwrap(), row2["ts"].as_str().unwrap());
    a.check(ts2 < ts1, || {
        format!("B's wall clock should put r2 ({ts2}) before r1 ({ts1})")
    });
    // Per-server figures.
    let servers = json["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[1]["server"], b.addr().to_string());
    assert_eq!(
        servers[1]["hlc_id"], b_stats["clock"]["id"],
        "the journal names its master's HLC id"
    );
    let b_requests = servers[1]["requests"].as_u64().unwrap();
    // r2, two refused links, two `stats` (more if a datagram was resent).
    assert!(b_requests >= 5, "{}", servers[1]);
    assert_eq!(
        json["requests"].as_u64().unwrap(),
        servers[0]["requests"].as_u64().unwrap() + b_requests
    );

    // The text form lists them in the same order.
    let text = report(&a, &args);
    let line = |id: &str| {
        text.lines()
            .position(|l| l.split_whitespace().any(|w| w == id))
            .unwrap_or_else(|| a.fail(&format!("{id} is not in the text report:\n{text}")))
    };
    a.check(line("r1") < line("r2"), || {
        format!("the text report lists r2 before r1:\n{text}")
    });
}

/// A causal link from a source outside `--trusted` is not even looked at:
/// it neither moves the clock nor counts as refused.
#[test]
fn an_untrusted_sources_link_is_ignored() {
    let _g = harness::shared();
    let s = Server::start(&["--workers", "1", "--trusted", "127.0.0.1"]);
    let far = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    far.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let hlc = s.stats()["hlc"].as_str().unwrap().to_owned();
    let id = hlc.split('/').nth(1).unwrap();
    let ahead = format!("{}/{id}", stamp_time(&hlc) + (60u64 << 32));
    let mut answered = false;
    for _ in 0..3 {
        far.send_to(
            format!(r#"{{"op":"square","n":5,"id":"far","hlc":"{ahead}"}}"#).as_bytes(),
            s.addr(),
        )
        .unwrap();
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = far.recv_from(&mut buf) {
            let reply: Value = serde_json::from_slice(&buf[..n]).unwrap();
            s.check(reply["ok"] == true, || {
                format!("reply to 127.0.0.2: {reply}")
            });
            answered = true;
            break;
        }
    }
    s.check(answered, || {
        "no reply to 127.0.0.2 after 3 attempts".to_owned()
    });
    let clock = &s.stats()["clock"];
    s.check(clock["links"] == 0 && clock["refused"] == 0, || {
        format!("an untrusted link was looked at: {clock}")
    });
}
