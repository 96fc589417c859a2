#!/usr/bin/env bash
# Fuzzes the protocol crate's parsers for a bounded time (docs/FUZZING.md).
#
#   scripts/fuzz.sh [datagram|frames|all] [seconds]     (default: all 60)
#
# Each target runs for the given time in one libFuzzer process, seeded from
# the committed corpus fuzz/corpus/<target>/, which it only reads: what it
# finds goes to fuzz/scratch/<target>/ (git-ignored), and a crash or a failed
# check stops it with the input saved under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:-all}
seconds=${2:-60}
case $target in
    all) targets=(datagram frames) ;;
    datagram | frames) targets=("$target") ;;
    *)
        echo "usage: scripts/fuzz.sh [datagram|frames|all] [seconds]" >&2
        exit 2
        ;;
esac

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz builds with -Z flags (-Zsanitizer=address), which only a nightly
# rustc accepts; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

for t in "${targets[@]}"; do
    mkdir -p "fuzz/scratch/$t"
    dict=()
    if [[ -f fuzz/dicts/$t.dict ]]; then
        dict=("-dict=fuzz/dicts/$t.dict")
    fi
    echo "fuzz.sh: $t for ${seconds}s" >&2
    cargo fuzz run "$t" "fuzz/scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}"
done
