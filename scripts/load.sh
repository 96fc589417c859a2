#!/usr/bin/env bash
# Stress-test udp-pool: build (release), start a master on a free 127.0.0.1
# port, run loadgen against it, print the report, and stop the master on any
# exit (SIGTERM, then SIGKILL after a deadline). Leaves no process behind.
#
# usage: scripts/load.sh [--workers N] [--duration S] [--journal] [loadgen args...]
#   --workers N    worker processes (default 4; 0 answers inline in the master)
#   --duration S   seconds of load (default 5)
#   --journal      keep the request journal (in a temporary directory);
#                  without it the master runs with --journal none
# Any other argument goes to loadgen (see target/release/loadgen --help),
# e.g. --rate 20000, --sockets 4, --mix square=90,hello=10, --json, --plot FILE.svg.
set -euo pipefail

workers=4
duration=5
journal=0
loadgen_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --workers) workers="${2:?--workers needs a number}"; shift 2 ;;
        --workers=*) workers="${1#*=}"; shift ;;
        --duration) duration="${2:?--duration needs seconds}"; shift 2 ;;
        --duration=*) duration="${1#*=}"; shift ;;
        --journal) journal=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) loadgen_args+=("$1"); shift ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="$root/target/release"

echo "load.sh: building (release)..." >&2
cargo build --release --quiet

tmp="$(mktemp -d "${TMPDIR:-/tmp}/udp-pool-load.XXXXXX")"
master_pid=""
worker_pids=""
loadgen_pid=""

stop_master() {
    [[ -n "$master_pid" ]] || return 0
    if kill -0 "$master_pid" 2>/dev/null; then
        # Remember the workers: if the master has to be killed, they go too.
        worker_pids="$(pgrep -P "$master_pid" || true)"
        kill -TERM "$master_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$master_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$master_pid" 2>/dev/null; then
            echo "load.sh: master $master_pid ignored SIGTERM for 5 s: killing it" >&2
            kill -KILL "$master_pid" 2>/dev/null || true
        fi
    fi
    wait "$master_pid" 2>/dev/null || true
    for pid in $worker_pids; do
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "load.sh: worker $pid outlived its master: killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    master_pid=""
}

# shellcheck disable=SC2329 # invoked by cleanup
stop_loadgen() {
    [[ -n "$loadgen_pid" ]] || return 0
    # loadgen stops sending on SIGINT and reports; it is bounded by its own
    # --timeout-ms drain, but this wait has a deadline too.
    kill -INT "$loadgen_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$loadgen_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$loadgen_pid" 2>/dev/null || true
    wait "$loadgen_pid" 2>/dev/null || true
    loadgen_pid=""
}

# shellcheck disable=SC2329 # invoked by the EXIT trap
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_loadgen
    stop_master
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port="$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
server="127.0.0.1:$port"
journal_arg=none
if [[ "$journal" == 1 ]]; then
    journal_arg="$tmp/journal.db"
fi

echo "load.sh: master --bind $server --workers $workers --journal $journal_arg" >&2
"$bin/master" --bind "$server" --workers "$workers" --journal "$journal_arg" >"$tmp/master.log" 2>&1 &
master_pid=$!

# Wait until it answers: at most 50 tries of 200 ms, 100 ms apart.
ready=0
for _ in $(seq 1 50); do
    if ! kill -0 "$master_pid" 2>/dev/null; then
        echo "load.sh: master exited before answering; its log:" >&2
        tail -n 20 "$tmp/master.log" >&2
        exit 1
    fi
    if "$bin/client" --server "$server" --timeout-ms 200 --retries 0 hello >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
if [[ "$ready" != 1 ]]; then
    echo "load.sh: master did not answer within 15 s; its log:" >&2
    tail -n 20 "$tmp/master.log" >&2
    exit 1
fi

# loadgen runs in the background so that a signal reaches this script's
# traps at once: they pass it on (loadgen then stops sending, drains and
# still reports), and the master is stopped after.
"$bin/loadgen" --server "$server" --duration "$duration" "${loadgen_args[@]}" &
loadgen_pid=$!
status=0
wait "$loadgen_pid" || status=$?
loadgen_pid=""
if [[ "$status" != 0 ]]; then
    echo "load.sh: loadgen failed ($status); the master's log:" >&2
    tail -n 20 "$tmp/master.log" >&2
fi
stop_master
exit "$status"
