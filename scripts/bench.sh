#!/usr/bin/env bash
# Benchmark udp-pool side by side with its reference points, in one run:
#   master --workers 4 --journal none, master --workers 0 (inline),
#   master --workers 4 with the journal on, and the lecture's Python
#   Pool.apply_async server (scripts/bench/pool_server.py); `guarded` (every
#   source untrusted) and `nodedup` (the duplicate request cache off) give
#   the cost of those features against `pool`.
# Alternating configurations, several rounds, medians; prints a markdown
# table (for docs/PERFORMANCE.md) and the targets it meets or misses.
#
# usage: scripts/bench.sh [--out DIR] [--rounds N] [--seconds S] [--rate R]
#                         [--sockets K] [--window W] [--loadgen-nice N]
#                         [--configs pool,pool1,pool2,inline,journal,python,guarded,nodedup,tokio]
#                         [--baseline DIR]
# The same settings can come from the environment: BENCH_ROUNDS (3),
# BENCH_SECONDS (5), BENCH_RATE (half the pool's peak), BENCH_SOCKETS (4),
# BENCH_WINDOW (32), BENCH_LOADGEN_NICE (-10, latency phase only),
# BENCH_CONFIGS, BENCH_BASELINE. With the defaults it takes about 4 minutes;
# it refuses settings that would take more than 9.
# Beside every measurement scripts/bench/stall_probe.py (SCHED_FIFO, as
# root) watches for host stalls; one over 5 ms is measured again, at most twice.
# Only 127.0.0.1 is loaded; every server started is stopped on any exit.
#
# Comparing two builds: --baseline DIR, where DIR holds another build's
# master and worker (scripts/bench/build-baseline.sh REV DIR makes one),
# adds pool@baseline, journal@baseline and trimmed@baseline (for those of pool,
# journal and trimmed that
# --configs selects): the same flags, run from DIR, loaded by this build's
# loadgen, alternating with the others in every round and at the same latency
# rate. It then prints current/baseline ratios of peak throughput, CPU per
# request and p99. For example:
#   scripts/bench/build-baseline.sh 380d513 /tmp/base
#   scripts/bench.sh --baseline /tmp/base --configs pool,journal    # ~3 minutes
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
case "${1:-}" in
    # The header comment above, up to the first line that is not one.
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
esac

echo "bench.sh: building (release)..." >&2
cargo build --release --quiet
exec python3 "$root/scripts/bench/bench.py" --bin-dir "$root/target/release" "$@"
