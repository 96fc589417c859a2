#!/usr/bin/env bash
# Fuzzes the protocol crate's parsers for a bounded time (docs/FUZZING.md).
#
#   scripts/fuzz.sh [datagram|frames|all] [seconds]   run each target (default: all 60)
#   scripts/fuzz.sh cmin [datagram|frames|all]        fold what runs found into the corpus
#
# A run uses one libFuzzer process per target, one after the other, seeded
# from the committed corpus fuzz/corpus/<target>/, which it only reads: what
# it finds goes to fuzz/scratch/<target>/ (git-ignored), and a crash or a
# failed check stops it with the input saved under fuzz/artifacts/<target>/.
# `cmin` merges fuzz/scratch/<target>/ into the corpus and minimizes it to
# the fewest inputs that keep every edge covered.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '4,5s/^# *//p' "$0" >&2
    exit 2
}

mode=run
if [[ ${1:-} == cmin ]]; then
    mode=cmin
    shift
fi
target=${1:-all}
seconds=${2:-60}
case $target in
    all) targets=(datagram frames) ;;
    datagram | frames) targets=("$target") ;;
    *) usage ;;
esac
[[ $seconds =~ ^[0-9]+$ ]] || usage

if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz builds with -Z flags (-Zsanitizer=address), which only a nightly
# rustc accepts; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t
    scratch=fuzz/scratch/$t
    mkdir -p "$scratch"
    if [[ $mode == cmin ]]; then
        find "$scratch" -type f -exec cp -t "$corpus" {} +
        cargo fuzz cmin "$t" "$corpus" -- -set_cover_merge=1 -use_counters=0
        rm -rf "$scratch"
        echo "fuzz.sh: $corpus: $(find "$corpus" -type f | wc -l) files" >&2
        continue
    fi
    dict=()
    if [[ -f fuzz/dicts/$t.dict ]]; then
        dict=("-dict=fuzz/dicts/$t.dict")
    fi
    echo "fuzz.sh: $t for ${seconds}s" >&2
    cargo fuzz run "$t" "$scratch" "$corpus" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}"
done
