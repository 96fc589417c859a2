#!/usr/bin/env python3
"""Measure udp-pool side by side with its reference points, in one run.

Run through scripts/bench.sh, which builds the release binaries first.

Configurations (each started fresh for every measurement, on a free
127.0.0.1 port):
  pool     master --workers 4 --journal none
  pool1    master --workers 1 --journal none   (scaling: one worker)
  pool2    master --workers 2 --journal none   (scaling: two workers)
  inline   master --workers 0 --journal none   (no pool: the local limit)
  journal  master --workers 4 --journal <temp file>   (the default configuration)
  trimmed  journal with --journal-max-rows 10000: a journal at its row limit,
           where retention deletes the oldest requests as new ones come, as
           in a server that has run long enough (the bench's fresh journals
           otherwise never reach the default limit of 1,000,000)
  python   scripts/bench/pool_server.py --workers 4   (the lecture's design)
  guarded  pool with the load's source outside --trusted (rate limiter, reply bound)
  nodedup  pool with --dedup-window 0: the duplicate request cache off (pool has
           it on, as by default; loadgen gives every request a distinct id, the
           cache's worst case: an entry made and filled per request)
  tokio    scripts/bench/tokio-peer: one tokio socket + 4 blocking threads
           answering with the same protocol crate (what a Rust user might
           write instead; no process isolation)

With --baseline DIR (the master, worker and loadgen of another build, e.g.
from scripts/bench/build-baseline.sh), every selected `pool`, `journal` and
`trimmed` gets a twin, `pool@baseline`, ...: the same flags, with
DIR's master (which starts DIR's worker). loadgen is always the current
build's, so only the server differs. The twins run in every round with the
others and at the same latency rate, and a line per twin gives the ratios
current/baseline of peak throughput, CPU per request and p99.

Two phases, each of several rounds; within a round every configuration runs
once, and the order rotates from round to round, so slow drifts of the
machine spread over all of them. Reported values are medians over rounds.
  peak     closed loop (loadgen --sockets S --window W): replies/s, and
           server CPU per request (user+sys of the server and its children,
           from /proc, sampled before and after the run).
  latency  open loop at a fixed rate (default: half the pool's median peak;
           the Python server gets at most half of its own peak, the
           journal at most half of its own): p50/p99/p99.9 and busy replies.
  load80   the journal (the default configuration) only: open loop at 80%
           of its own peak, to count busy replies near the limit.
CPU per request is also split into the master's own and its children's
(the workers'), so the cost of the hop is visible. During each peak run the
CPU that loadgen and the server's master last ran on are sampled every
10 ms: the share of samples where they were the same says how often the
scheduler stacked them (the one- and two-worker pools lose their peak
then; inline's spread between rounds is mostly not that). The
pool and inline are also compared round by round (both run in every
round), beside the medians the targets read.
Beside every measurement runs stall_probe.py, a SCHED_FIFO task that
sleeps 2 ms at a time: when it wakes over 5 ms late (STALL_LIMIT_MS), the
host held the whole virtual machine back, and the measurement is made
again (at most twice; the last is kept, and the output says which ones
were made again and which stayed disturbed).
For every start: the time from exec to N distinct workers answering hello
(1 for inline), and after every run the peak RSS (VmHWM) of the master and
of its largest worker.

Load goes to 127.0.0.1 only; every wait has a deadline, every server is
stopped (SIGTERM, then SIGKILL of its process group) whatever happens.
Python 3.11 standard library only.
"""

import argparse
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

CONFIGS = {
    "pool": "master --workers 4 --journal none",
    "inline": "master --workers 0 --journal none",
    "journal": "master --workers 4 --journal (temp file)",
    "trimmed": "master --workers 4 --journal (temp file) --journal-max-rows 10000",
    "python": "pool_server.py --workers 4 (multiprocessing.Pool + apply_async)",
    # The load's source (127.0.0.1) untrusted: each datagram goes through the
    # rate limiter's table and each reply through the amplification bound
    # (the limit is set high enough that the load is never held back). Only
    # the readiness probe, sent from 127.0.0.3, is trusted.
    "guarded": "master --workers 4 --journal none --trusted 127.0.0.3 --rate-limit 10000000",
    "pool1": "master --workers 1 --journal none",
    "pool2": "master --workers 2 --journal none",
    "tokio": "tokio-peer --threads 4 (tokio UDP socket + spawn_blocking pool of 4)",
    # The duplicate request cache off; `pool` has it on (the default).
    "nodedup": "master --workers 4 --journal none --dedup-window 0",
}
# Distinct answering pids (thread ids for tokio) that mean "ready".
WORKERS = {"pool": 4, "inline": 1, "journal": 4, "trimmed": 4, "python": 4, "guarded": 4, "pool1": 1, "pool2": 2, "tokio": 1,
           "nodedup": 4}
# The configurations that also run the load80 phase.
LOAD80 = ("journal",)
# Configurations that --baseline runs a second time from the baseline's binaries.
BASELINE_OF = {"pool@baseline": "pool", "journal@baseline": "journal", "trimmed@baseline": "trimmed"}

# Whole-run budget: stop starting new measurements past this.
BUDGET_S = 9 * 60
# A measurement during which the host held the whole machine back for
# longer than this (stall_probe.py under SCHED_FIFO) is made again, at most
# RERUNS times; the last one is kept (flagged when still disturbed).
STALL_LIMIT_MS = 5.0
RERUNS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env_num(name, default, kind=float):
    value = os.environ.get(name)
    return kind(value) if value not in (None, "") else default


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_config(config):
    """The configuration whose flags `config` runs (`pool` for `pool@baseline`)."""
    return BASELINE_OF.get(config, config)


def server_command(config, bin_dir, port, tmp):
    bind = "127.0.0.1:%d" % port
    config = base_config(config)
    if config == "python":
        return [sys.executable, os.path.join(HERE, "pool_server.py"), "--port", str(port), "--workers", "4"]
    if config == "tokio":
        return [os.path.join(ROOT, "target", "bench-peer", "release", "tokio-peer"), "--bind", bind,
                "--threads", "4"]
    master = os.path.join(bin_dir, "master")
    workers = {"inline": "0", "pool1": "1", "pool2": "2"}.get(config, "4")
    journal = os.path.join(tmp, "journal.db") if config in ("journal", "trimmed") else "none"
    extra = {
        "trimmed": ["--journal-max-rows", "10000"],
        "guarded": ["--trusted", "127.0.0.3", "--rate-limit", "10000000"],
        "nodedup": ["--dedup-window", "0"],
    }.get(config, [])
    return [master, "--bind", bind, "--workers", workers, "--journal", journal] + extra


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (the first is
    the state, field 3), or None if the process is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def read_stat(pid):
    """(ppid, utime+stime ticks) of a process, or None if it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[1]), int(fields[11]) + int(fields[12]))


def process_tree(root):
    """The pids of `root` and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st:
                children.setdefault(st[0], []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_sample(root):
    """CPU ticks per pid of the process tree under `root`."""
    sample = {}
    for pid in process_tree(root):
        st = read_stat(pid)
        if st:
            sample[pid] = st[1]
    return sample


def cpu_used(before, after, only=None, but=None):
    """Ticks used between two samples (of pid `only`, or of every pid but
    `but`); processes that exited in between are lost (their last ticks are
    not seen), new ones count from zero."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()
               if (only is None or pid == only) and (but is None or pid != but))


def switches_sample(root):
    """Context switches (voluntary and not) per pid of the process tree
    under `root`, summed over each process's threads."""
    sample = {}
    for pid in process_tree(root):
        total = 0
        try:
            for tid in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                    for line in f:
                        if "ctxt_switches:" in line:
                            total += int(line.split()[1])
        except OSError:
            continue
        sample[pid] = total
    return sample


def last_cpu(pid):
    """The CPU a process last ran on (/proc/PID/stat field 39), or None."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[36])


def run_sampling_cpus(cmd, master, timeout_s, sample):
    """Runs loadgen `cmd` to its end; meanwhile, if `sample`, notes every
    10 ms whether the `master` process last ran on the CPU loadgen last
    ran on (only the peak phase samples: the latency phase's loadgen is
    left alone). Returns (exit status, stdout, stderr, the share of
    samples where they shared a CPU, or None). A pool of one or two
    workers loses its peak when its master shares loadgen's CPU
    (docs/PERFORMANCE.md, fifth round)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout_s
        same = total = 0
        try:
            while sample and load.poll() is None and time.monotonic() < deadline:
                a, b = last_cpu(master), last_cpu(load.pid)
                if a is not None and b is not None:
                    total += 1
                    same += a == b
                time.sleep(0.01)
            load.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError("loadgen did not finish within %g s" % timeout_s)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        out.seek(0)
        err.seek(0)
        return (load.returncode, out.read().decode(), err.read().decode(),
                same / total if total else None)


class StallProbe:
    """stall_probe.py, running beside one measurement: how long the host
    held the whole machine back meanwhile."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "stall_probe.py")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 5.0)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.kill()
            raise RuntimeError("stall_probe.py did not start within 5 s")

    def finish(self):
        """Stops the probe; the latest wake-up in ms beyond the period, or
        None when it could not run under SCHED_FIFO (not as root), where
        its lateness would include the server's own load."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("stall_probe.py did not stop within 5 s")
        seen = json.loads(out.strip().splitlines()[-1])
        return seen["worst_ms"] if seen["policy"] == "SCHED_FIFO" else None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def vm_hwm_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def wait_ready(port, want, started, proc, deadline_s=10.0):
    """Seconds from `started` until `want` distinct worker pids answered a
    JSON hello; None if that did not happen within the deadline."""
    seen = set()
    n = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        # From 127.0.0.3: trusted by every configuration (the `guarded` one
        # trusts only it), so the greeting is not held to the reply bound.
        s.bind(("127.0.0.3", 0))
        s.settimeout(0.002)
        while time.monotonic() - started < deadline_s:
            if proc.poll() is not None:
                return None
            for _ in range(8):
                n += 1
                msg = '{"op":"hello","pid":%d,"id":%d}' % (os.getpid(), n)
                s.sendto(msg.encode(), ("127.0.0.1", port))
            while True:
                try:
                    data = s.recv(65535)
                except (socket.timeout, BlockingIOError, ConnectionRefusedError):
                    break
                try:
                    reply = json.loads(data)
                except ValueError:
                    continue
                if reply.get("ok") and "worker_pid" in reply:
                    seen.add(reply["worker_pid"])
            if len(seen) >= want:
                return time.monotonic() - started
    return None


def stop(proc, log):
    """SIGTERM, wait up to 5 s, then SIGKILL the whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            print("bench: server %d ignored SIGTERM for 5 s: killing it" % proc.pid, file=sys.stderr)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()


def run_one(config, phase, args, rate=None, plot=None):
    """Start `config`, load it once, stop it; return what was measured."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="udp-pool-bench.") as tmp:
        log_path = os.path.join(tmp, "server.log")
        log = open(log_path, "w")
        server_bin_dir = args.baseline if config in BASELINE_OF else args.bin_dir
        cmd = server_command(config, server_bin_dir, port, tmp)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        try:
            want = WORKERS[base_config(config)]
            ready = wait_ready(port, want, started, proc)
            if ready is None:
                with open(log_path) as f:
                    tail = f.read()[-2000:]
                raise RuntimeError("%s did not answer with %d workers within 10 s: %s\n%s"
                                   % (" ".join(cmd), want, proc.poll(), tail))
            # In the latency phase loadgen runs at a higher priority (when
            # allowed), so that it sends on time although it shares the CPUs
            # with the server: the schedule is the measurement's clock.
            nice = ["nice", "-n", str(args.loadgen_nice)] if phase == "latency" and args.loadgen_nice else []
            load = nice + [os.path.join(args.bin_dir, "loadgen"), "--server", "127.0.0.1:%d" % port,
                    "--duration", str(args.seconds), "--sockets", str(args.sockets), "--json", "--quiet"]
            if phase == "peak":
                load += ["--window", str(args.window)]
            else:
                load += ["--rate", "%.0f" % rate]
            if plot:
                load += ["--plot", plot]
            probe = StallProbe()
            try:
                before = cpu_sample(proc.pid)
                switches_before = switches_sample(proc.pid)
                returncode, stdout, stderr, shared = run_sampling_cpus(load, proc.pid, args.seconds + 60,
                                                                     sample=phase == "peak")
                after = cpu_sample(proc.pid)
                switches_after = switches_sample(proc.pid)
                host_stall_ms = probe.finish()
            finally:
                probe.kill()
            tree = process_tree(proc.pid)
            if returncode != 0:
                raise RuntimeError("loadgen failed (%d): %s" % (returncode, stderr.strip()))
            report = json.loads(stdout.strip().splitlines()[-1])
            ticks = cpu_used(before, after)
            master_ticks = cpu_used(before, after, only=proc.pid)
            worker_ticks = cpu_used(before, after, but=proc.pid)
            worker_rss = [vm_hwm_kib(p) for p in tree if p != proc.pid]
            ok = report["ok"]
            return {
                "config": config,
                "phase": phase,
                "startup_ms": ready * 1000,
                "ok_rps": ok / report["active_s"] if report["active_s"] else 0.0,
                "cpu_us_per_req": ticks / CLK_TCK * 1e6 / ok if ok else None,
                "master_cpu_us_per_req": master_ticks / CLK_TCK * 1e6 / ok if ok else None,
                "worker_cpu_us_per_req": worker_ticks / CLK_TCK * 1e6 / ok if ok else None,
                "switches_per_req": cpu_used(switches_before, switches_after) / ok if ok else None,
                "master_on_loadgen_cpu": shared,
                "host_stall_ms": host_stall_ms,
                "master_rss_kib": vm_hwm_kib(proc.pid),
                "max_worker_rss_kib": max([r for r in worker_rss if r] or [0]) or None,
                "report": report,
            }
        finally:
            stop(proc, log)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec, unit=""):
    return "n/a" if v is None else format(v, spec) + unit


def pct(share):
    """A share (0..1, or None) as a whole percentage."""
    return fmt(None if share is None else 100 * share, ".0f", "%")


def ratio(a, b):
    return None if a is None or not b else a / b


def summarize(results, configs, rates):
    """Medians per configuration."""
    summary = {}
    for c in configs:
        peak = [r for r in results if r["config"] == c and r["phase"] == "peak"]
        lat = [r for r in results if r["config"] == c and r["phase"] == "latency"]
        l80 = [r for r in results if r["config"] == c and r["phase"] == "load80"]
        every = peak + lat + l80
        summary[c] = {
            "peak_rps": median([r["ok_rps"] for r in peak]),
            "cpu_us_per_req": median([r["cpu_us_per_req"] for r in peak]),
            "master_cpu_us_per_req": median([r["master_cpu_us_per_req"] for r in peak]),
            "worker_cpu_us_per_req": median([r["worker_cpu_us_per_req"] for r in peak]),
            "switches_per_req": median([r.get("switches_per_req") for r in peak]),
            "master_on_loadgen_cpu": median([r.get("master_on_loadgen_cpu") for r in peak]),
            "lat_switches_per_req": median([r.get("switches_per_req") for r in lat]),
            "lat_busy": sum(r["report"]["errors"].get("busy", 0) for r in lat),
            "lat_runs": len(lat),
            "load80_busy": sum(r["report"]["errors"].get("busy", 0) for r in l80) if l80 else None,
            "load80_p99_us": median([r["report"]["latency_us"]["p99"] for r in l80]),
            "load80_lost": sum(r["report"]["lost"] for r in l80) if l80 else None,
            "load80_rate": rates.get((c, "load80")),
            "p50_us": median([r["report"]["latency_us"]["p50"] for r in lat]),
            "p99_us": median([r["report"]["latency_us"]["p99"] for r in lat]),
            "p999_us": median([r["report"]["latency_us"]["p999"] for r in lat]),
            "max_us": median([r["report"]["latency_us"]["max"] for r in lat]),
            "p99_from_send_us": median([r["report"]["latency_from_send_us"].get("p99") for r in lat]),
            "loadgen_lag_us": median([r["report"]["max_send_lag_us"] for r in lat]),
            "lat_lost": sum(r["report"]["lost"] for r in lat),
            "peak_lost": sum(r["report"]["lost"] for r in peak),
            "errors": sum(sum(r["report"]["errors"].values()) for r in every),
            "wrong": sum(r["report"]["wrong"] for r in every),
            "rate": rates.get(c),
            "master_rss_mib": max([r["master_rss_kib"] or 0 for r in every] or [0]) / 1024 or None,
            "worker_rss_mib": max([r["max_worker_rss_kib"] or 0 for r in every] or [0]) / 1024 or None,
            "startup_ms": median([r["startup_ms"] for r in every]),
            "runs": len(every),
        }
    return summary


def us(v):
    if v is None:
        return "n/a"
    return "%.0f µs" % v if v < 1000 else "%.2f ms" % (v / 1000)


def label(config):
    if config in BASELINE_OF:
        return "`%s` (baseline)" % CONFIGS[BASELINE_OF[config]]
    return "`%s`" % CONFIGS[config]


def table(summary, configs):
    inline = summary.get("inline", {})
    python = summary.get("python", {})
    rows = [
        "| server | peak replies/s | vs inline | vs Python | CPU/request | vs inline "
        "| latency at | p50 | p99 | p99.9 | p99 from send | master RSS | max worker RSS | start to N answering |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in configs:
        s = summary[c]
        rows.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            label(c),
            fmt(s["peak_rps"], ",.0f"),
            fmt(ratio(s["peak_rps"], inline.get("peak_rps")), ".2f", "x"),
            fmt(ratio(s["peak_rps"], python.get("peak_rps")), ".0f", "x"),
            fmt(s["cpu_us_per_req"], ".1f", " µs"),
            fmt(ratio(s["cpu_us_per_req"], inline.get("cpu_us_per_req")), ".2f", "x"),
            fmt(s["rate"], ",.0f", "/s"),
            us(s["p50_us"]), us(s["p99_us"]), us(s["p999_us"]), us(s["p99_from_send_us"]),
            fmt(s["master_rss_mib"], ".1f", " MiB"),
            fmt(s["worker_rss_mib"], ".1f", " MiB"),
            fmt(s["startup_ms"], ".0f", " ms"),
        ))
    return "\n".join(rows)


def scaling_table(summary, configs):
    """Throughput and CPU per request with 1, 2 and 4 workers (and inline,
    and the tokio peer), the master's CPU apart from its children's."""
    inline = summary.get("inline", {})
    rows = [
        "| server | peak replies/s | vs inline | CPU/request | master | children (workers) | vs inline "
        "| context switches/request at peak | at the latency rate | master on loadgen's CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in ("inline", "pool1", "pool2", "pool", "pool@baseline", "journal", "journal@baseline", "trimmed",
              "trimmed@baseline", "tokio"):
        if c not in configs:
            continue
        s = summary[c]
        rows.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            label(c),
            fmt(s["peak_rps"], ",.0f"),
            fmt(ratio(s["peak_rps"], inline.get("peak_rps")), ".2f", "x"),
            fmt(s["cpu_us_per_req"], ".2f", " µs"),
            fmt(s["master_cpu_us_per_req"], ".2f", " µs"),
            fmt(s["worker_cpu_us_per_req"], ".2f", " µs"),
            fmt(ratio(s["cpu_us_per_req"], inline.get("cpu_us_per_req")), ".2f", "x"),
            fmt(s["switches_per_req"], ".2f"),
            fmt(s["lat_switches_per_req"], ".2f"),
            pct(s["master_on_loadgen_cpu"]),
        ))
    return "\n".join(rows)


def targets(summary):
    """The targets (issue 12 and the earlier ones), checked where the run
    measured them."""
    lines = []

    def check(name, value, ok, shown):
        if value is None:
            lines.append("- [ ] %s: not measured" % name)
        else:
            lines.append("- [%s] %s: %s" % ("x" if ok(value) else " ", name, shown(value)))

    s = {c: summary.get(c, {}) for c in CONFIGS}
    check("pool throughput >= 0.85x inline", ratio(s["pool"].get("peak_rps"), s["inline"].get("peak_rps")),
          lambda v: v >= 0.85, lambda v: "%.2fx" % v)
    check("pool CPU per request <= 1.35x inline",
          ratio(s["pool"].get("cpu_us_per_req"), s["inline"].get("cpu_us_per_req")),
          lambda v: v <= 1.35, lambda v: "%.2fx" % v)
    journal_cpu = None
    if s["journal"].get("cpu_us_per_req") is not None and s["pool"].get("cpu_us_per_req") is not None:
        journal_cpu = s["journal"]["cpu_us_per_req"] - s["pool"]["cpu_us_per_req"]
    check("the journal adds <= 1.5 µs of CPU per request", journal_cpu, lambda v: v <= 1.5,
          lambda v: "%+.2f µs" % v)
    trimmed_cpu = None
    if s["trimmed"].get("cpu_us_per_req") is not None and s["pool"].get("cpu_us_per_req") is not None:
        trimmed_cpu = s["trimmed"]["cpu_us_per_req"] - s["pool"]["cpu_us_per_req"]
    check("the journal at its row limit (trimmed) adds <= 1.5 µs of CPU per request", trimmed_cpu,
          lambda v: v <= 1.5, lambda v: "%+.2f µs" % v)
    check("default configuration (journal on): p99 < 2 ms at half of its peak", s["journal"].get("p99_us"),
          lambda v: v < 2000, lambda v: "%s at %s/s" % (us(v), fmt(s["journal"].get("rate"), ",.0f")))
    check("default configuration: no busy at half of its peak",
          s["journal"].get("lat_busy") if s["journal"].get("lat_runs") else None,
          lambda v: v == 0, lambda v: "%d busy" % v)
    check("default configuration: no busy at 80% of its peak", s["journal"].get("load80_busy"),
          lambda v: v == 0, lambda v: "%d busy at %s/s (and, not a target: %s lost, p99 %s)" % (
              v, fmt(s["journal"].get("load80_rate"), ",.0f"), fmt(s["journal"].get("load80_lost"), ",d"),
              us(s["journal"].get("load80_p99_us"))))
    check("pool >= 0.9x the tokio peer", ratio(s["pool"].get("peak_rps"), s["tokio"].get("peak_rps")),
          lambda v: v >= 0.9, lambda v: "%.2fx" % v)
    check("pool >= 100x the Python Pool server", ratio(s["pool"].get("peak_rps"), s["python"].get("peak_rps")),
          lambda v: v >= 100, lambda v: "%.0fx" % v)
    check("pool p99 at half of peak < 1 ms", s["pool"].get("p99_us"), lambda v: v < 1000,
          lambda v: "%s at %s/s" % (us(v), fmt(s["pool"].get("rate"), ",.0f")))
    masters = [s[c].get("master_rss_mib") for c in ("pool", "inline", "journal") if s[c].get("master_rss_mib")]
    check("master RSS < 20 MiB", max(masters) if masters else None, lambda v: v < 20,
          lambda v: "%.1f MiB at most" % v)
    workers = [s[c].get("worker_rss_mib") for c in ("pool", "journal") if s[c].get("worker_rss_mib")]
    check("each worker < 8 MiB", max(workers) if workers else None, lambda v: v < 8,
          lambda v: "%.1f MiB at most" % v)
    check("4 workers answering within 100 ms of start", s["pool"].get("startup_ms"), lambda v: v < 100,
          lambda v: "%.0f ms (median)" % v)
    check("defences (every source untrusted) cost < 5% of peak",
          ratio(s["guarded"].get("peak_rps"), s["pool"].get("peak_rps")),
          lambda v: v >= 0.95, lambda v: "%.2fx the pool's peak" % v)
    check("duplicate request cache (a distinct id per request) costs < 10% of peak",
          ratio(s["pool"].get("peak_rps"), s["nodedup"].get("peak_rps")),
          lambda v: v >= 0.90, lambda v: "%.2fx the peak without it (CPU/request %s)" % (
              v, fmt(ratio(s["pool"].get("cpu_us_per_req"), s["nodedup"].get("cpu_us_per_req")), ".2f", "x")))
    return "\n".join(lines)


def baseline_ratios(summary, configs):
    """One line per baseline twin: current/baseline of peak, CPU per request
    and p99 (both sides at the same latency rate)."""
    lines = []
    for twin in configs:
        current = BASELINE_OF.get(twin)
        if current not in summary:
            continue
        s, b = summary[current], summary[twin]
        lines.append("- %s: peak %s, CPU/request %s, p99 %s at %s/s (%s vs %s)" % (
            current,
            fmt(ratio(s["peak_rps"], b["peak_rps"]), ".2f", "x"),
            fmt(ratio(s["cpu_us_per_req"], b["cpu_us_per_req"]), ".2f", "x"),
            fmt(ratio(s["p99_us"], b["p99_us"]), ".2f", "x"),
            fmt(s["rate"], ",.0f"), us(s["p99_us"]), us(b["p99_us"])))
    return "\n".join(lines)


def paired_rounds(results):
    """Pool against inline round by round (both are measured in every
    round, one after the other): the ratios whose medians the targets
    read, and beside each round how often inline's master shared
    loadgen's CPU (rarely the cause of inline's spread: docs/PERFORMANCE.md,
    fifth round) and each side's host stall. Empty without both."""
    pool = [r for r in results if r["config"] == "pool" and r["phase"] == "peak"]
    inline = [r for r in results if r["config"] == "inline" and r["phase"] == "peak"]
    rounds = list(zip(pool, inline))
    if not rounds:
        return ""
    rows = ["| round | pool replies/s | inline replies/s | throughput pool/inline | CPU/request pool/inline "
            "| inline's master on loadgen's CPU | host stall, pool / inline |", "|--:|--:|--:|--:|--:|--:|--:|"]
    tput, cpu = [], []
    for k, (p, i) in enumerate(rounds, 1):
        tput.append(ratio(p["ok_rps"], i["ok_rps"]))
        cpu.append(ratio(p["cpu_us_per_req"], i["cpu_us_per_req"]))
        rows.append("| %d | %s | %s | %s | %s | %s | %s / %s ms |" % (
            k, fmt(p["ok_rps"], ",.0f"), fmt(i["ok_rps"], ",.0f"), fmt(tput[-1], ".2f", "x"),
            fmt(cpu[-1], ".2f", "x"), pct(i.get("master_on_loadgen_cpu")),
            fmt(p.get("host_stall_ms"), ".1f"), fmt(i.get("host_stall_ms"), ".1f")))
    rows.append("| median | | | %s | %s | | |" % (fmt(median(tput), ".2f", "x"), fmt(median(cpu), ".2f", "x")))
    return "\n".join(rows)


def disturbed(res):
    """Whether the host held the machine back during a measurement for
    longer than STALL_LIMIT_MS (never when the probe could not tell)."""
    return (res.get("host_stall_ms") or 0) > STALL_LIMIT_MS


def stall_note(results):
    """One line on the host's stalls over the run's kept measurements, and
    on the measurements made again because of them."""
    seen = [r["host_stall_ms"] for r in results if r.get("host_stall_ms") is not None]
    if not seen:
        return ("Host stalls: not probed (stall_probe.py needs SCHED_FIFO, i.e. root); "
                "no measurement was made again.")
    again = sum(r.get("reruns", 0) for r in results)
    kept = [r for r in results if disturbed(r)]
    return ("Host stalls (stall_probe.py: a SCHED_FIFO task's latest wake-up beyond its 2 ms sleep, "
            "beside every measurement): at most %.1f ms in the measurements kept, median %.1f ms; "
            "%d measurement(s) made again because the host held the machine back for over %.0f ms, "
            "%d kept although still disturbed (%s)." % (
                max(seen), median(seen), again, STALL_LIMIT_MS, len(kept),
                ", ".join("%s %s round %d" % (r["phase"], r["config"], r["round"]) for r in kept) or "none"))


def revision(bin_dir):
    """What a binary directory was built from, shortened to a line: its
    REVISION file (written by build-baseline.sh), else, for this checkout's
    target/release, the checkout's HEAD; None if not known."""
    text = full_revision(bin_dir)
    return text if text is None or len(text) <= 72 else text[:71] + "…"


def full_revision(bin_dir):
    try:
        with open(os.path.join(bin_dir, "REVISION")) as f:
            return f.readline().strip() or None
    except OSError:
        pass
    if os.path.realpath(bin_dir) != os.path.realpath(os.path.join(ROOT, "target", "release")):
        return None
    try:
        head = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def main():
    p = argparse.ArgumentParser(description="udp-pool benchmark (see the module doc)")
    p.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    p.add_argument("--rounds", type=int, default=env_num("BENCH_ROUNDS", 3, int))
    p.add_argument("--seconds", type=float, default=env_num("BENCH_SECONDS", 5.0))
    p.add_argument("--rate", type=float, default=env_num("BENCH_RATE", None),
                   help="open-loop rate for the latency phase (default: half the pool's peak)")
    p.add_argument("--sockets", type=int, default=env_num("BENCH_SOCKETS", 4, int))
    p.add_argument("--window", type=int, default=env_num("BENCH_WINDOW", 32, int),
                   help="outstanding per socket in the peak phase; sockets x window stays under the "
                        "pool's 4 x --max-inflight (128) so the pool is not measured answering busy")
    p.add_argument("--loadgen-nice", type=int, default=env_num("BENCH_LOADGEN_NICE", -10, int),
                   help="niceness of loadgen in the latency phase (default -10; 0 leaves it alone)")
    p.add_argument("--configs", default=os.environ.get("BENCH_CONFIGS", ",".join(CONFIGS)),
                   help="comma-separated subset of: " + ", ".join(CONFIGS) + " (--baseline adds the twins)")
    p.add_argument("--baseline", metavar="DIR", default=os.environ.get("BENCH_BASELINE") or None,
                   help="also run pool and journal (where selected) from DIR's master and worker, as "
                        "pool@baseline, journal@baseline and trimmed@baseline, and print current/baseline ratios")
    p.add_argument("--out", help="also write table.md, results.json and plots into this directory")
    args = p.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS and c not in BASELINE_OF:
            p.error("unknown configuration %r (known: %s)" % (c, ", ".join(list(CONFIGS) + list(BASELINE_OF))))
    configs = list(dict.fromkeys(configs))
    if args.baseline:
        args.baseline = os.path.abspath(args.baseline)
        for name in ("master", "worker"):
            if not os.access(os.path.join(args.baseline, name), os.X_OK):
                p.error("--baseline %s: no executable %s in it" % (args.baseline, name))
        # Each twin runs right after its current side; naming it too is allowed.
        for c in configs:
            if c in BASELINE_OF and BASELINE_OF[c] not in configs:
                p.error("%s needs %s in --configs (it is compared with it)" % (c, BASELINE_OF[c]))
        current = [c for c in configs if c not in BASELINE_OF]
        configs = []
        for c in current:
            configs.append(c)
            if c + "@baseline" in BASELINE_OF:
                configs.append(c + "@baseline")
        if not any(c in BASELINE_OF for c in configs):
            p.error("--baseline compares pool and journal: --configs has neither")
    elif any(c in BASELINE_OF for c in configs):
        p.error("pool@baseline and journal@baseline need --baseline DIR")
    if not (1 <= args.rounds <= 20 and 0.5 <= args.seconds <= 60):
        p.error("--rounds must be 1..20 and --seconds 0.5..60")
    runs = 2 * args.rounds * len(configs) + args.rounds * len([c for c in configs if c in LOAD80])
    if runs * (args.seconds + 3) > BUDGET_S:
        p.error("%d runs of %.1f s would not fit in %d s: fewer rounds or seconds" % (runs, args.seconds, BUDGET_S))
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    if "tokio" in configs:
        # Built only for the benchmark, with its own lock file, into target/bench-peer.
        print("bench: building scripts/bench/tokio-peer (release)...", file=sys.stderr, flush=True)
        env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(ROOT, "target", "bench-peer"))
        subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path",
                        os.path.join(HERE, "tokio-peer", "Cargo.toml")], env=env, check=True, timeout=1800)

    t0 = time.monotonic()
    results = []

    def log(msg):
        print("bench [%5.1fs] %s" % (time.monotonic() - t0, msg), file=sys.stderr, flush=True)

    width = max([7] + [len(c) for c in configs])

    def rounds(phase, configs, rate_of):
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for c in order:
                if time.monotonic() - t0 > BUDGET_S:
                    log("time budget spent: skipping the rest")
                    return
                plot = None
                if args.out and r == args.rounds - 1:
                    plot = os.path.join(args.out, "%s-%s.svg" % (c, phase))
                for attempt in range(RERUNS + 1):
                    res = run_one(c, phase, args, rate=rate_of(c), plot=plot)
                    stall = res["host_stall_ms"]
                    rep = res["report"]
                    log("%-7s %-*s round %d: %8.0f ok/s  p99 %8.1f µs  lost %d  errors %d  cpu %s µs/req  "
                        "start %.0f ms  loadgen lag %.1f ms  host stall %s ms" % (
                            phase, width, c, r + 1, res["ok_rps"], rep["latency_us"]["p99"], rep["lost"],
                            sum(rep["errors"].values()), fmt(res["cpu_us_per_req"], ".2f"), res["startup_ms"],
                            rep["max_send_lag_us"] / 1000, fmt(stall, ".1f")))
                    res["reruns"] = attempt
                    res["round"] = r + 1
                    if not disturbed(res) or attempt == RERUNS or time.monotonic() - t0 > BUDGET_S:
                        break
                    log("the host held the machine back for %.1f ms (over %.0f): measuring again"
                        % (stall, STALL_LIMIT_MS))
                results.append(res)

    rounds("peak", configs, lambda c: None)
    peaks = {c: median([r["ok_rps"] for r in results if r["config"] == c]) for c in configs}
    # The current build's peak sets the rate; a baseline twin runs at its side's.
    current_peaks = [v or 0 for c, v in peaks.items() if c not in BASELINE_OF]
    base = args.rate or (peaks.get("pool") or max(current_peaks)) / 2
    rates = {}
    for c in configs:
        rates[c] = base
        if c in ("python", "journal") and peaks.get(c) and not args.rate:
            rates[c] = min(base, peaks[c] / 2)
        rates[c] = max(rates[c], 10.0)
    rounds("latency", configs, lambda c: rates[c])
    near = [c for c in configs if c in LOAD80 and peaks.get(c)]
    for c in near:
        rates[(c, "load80")] = 0.8 * peaks[c]
    if near:
        rounds("load80", near, lambda c: rates[(c, "load80")])

    summary = summarize(results, configs, rates)
    header = "\n".join([
        "udp-pool benchmark: %s, %d CPUs, Linux %s, Python %s" % (
            time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(), platform.release(), platform.python_version()),
        "",
        "%d round(s) x %.1f s per measurement, medians; peak: closed loop, loadgen --sockets %d --window %d; "
        "latency: open loop at the rate shown (%s), loadgen at nice %d; loadgen runs on the same machine." % (
            args.rounds, args.seconds, args.sockets, args.window,
            "--rate %.0f" % args.rate if args.rate else
            "half of the pool's peak; Python and the journal at most half of their own",
            args.loadgen_nice),
        "CPU/request: user+sys of the server and its children during the peak runs, per ok reply.",
        "Latency is from the intended send time (wrk2-style); 'p99 from send' is from the actual send: "
        "where the two differ, loadgen itself was delayed (it shares the CPUs with the server).",
        "RSS: VmHWM, the most over all runs. Start: exec to N distinct worker pids answering hello.",
        stall_note(results),
    ])
    if args.baseline:
        header += "\n" + "\n".join([
            "Current: %s (%s)." % (args.bin_dir, revision(args.bin_dir) or "revision unknown"),
            "Baseline: %s (%s); the (baseline) rows run its master and worker with the same flags, "
            "loadgen is the current one." % (args.baseline, revision(args.baseline) or "revision unknown"),
        ])
    parts = [header, table(summary, configs)]
    if any(c in configs for c in ("pool1", "pool2", "tokio")):
        parts.append("Scaling and the cost of the hop (peak phase; CPU per ok reply, the master's own "
                     "apart from its children's):\n\n" + scaling_table(summary, configs))
    paired = paired_rounds(results)
    if paired:
        parts.append("Pool against inline, round by round (peak phase):\n\n" + paired)
    if args.baseline:
        parts.append("Current / baseline (peak and CPU/request at peak; p99 at the same rate; "
                     "above 1 means more for the current build):\n\n" + baseline_ratios(summary, configs))
    parts.append("Targets:\n\n" + targets(summary))
    text = "\n\n".join(parts)
    problems = [c for c in configs if summary[c]["wrong"] or summary[c]["errors"]]
    if problems:
        text += "\n\nNote: wrong results or error replies seen for: " + ", ".join(
            "%s (wrong %d, errors %d)" % (c, summary[c]["wrong"], summary[c]["errors"]) for c in problems)
    print(text)
    if args.out:
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": results}, f, indent=1)
        log("wrote %s" % args.out)
    log("done")


if __name__ == "__main__":
    # SIGTERM unwinds like an exception, so every started server is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
