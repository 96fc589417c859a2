#!/usr/bin/env bash
# Build another revision's release binaries for `scripts/bench.sh --baseline`.
#
# usage: scripts/bench/build-baseline.sh REV DIR
# Checks REV out into a temporary `git worktree` (detached: no branch is
# made), runs `cargo build --release --workspace` there, and copies master,
# worker and loadgen into DIR, with a REVISION file naming the commit (the
# bench prints it). The temporary worktree and its target dir are removed on
# any exit; the caller's work tree, index and target dir are left alone.
# To save rebuilding the dependencies, the temporary target dir starts as a
# copy of this checkout's target/release (or $CARGO_TARGET_DIR/release) when
# there is one; set BASELINE_SEED=0 to build from scratch.
set -euo pipefail

if [ $# -ne 2 ] || [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
    exit 2
fi
rev="$1"
out="$2"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
commit="$(git -C "$root" rev-parse --verify --quiet "$rev^{commit}")" || {
    echo "build-baseline.sh: $rev: not a revision of $root" >&2
    exit 1
}

tmp="$(mktemp -d "${TMPDIR:-/tmp}/udp-pool-baseline.XXXXXX")"
cleanup() {
    git -C "$root" worktree remove --force "$tmp/src" 2>/dev/null || true
    rm -rf "$tmp"
    git -C "$root" worktree prune
}
trap cleanup EXIT
trap 'exit 130' INT TERM

git -C "$root" worktree add --quiet --detach "$tmp/src" "$commit"

seed="${CARGO_TARGET_DIR:-$root/target}/release"
if [ "${BASELINE_SEED:-1}" != 0 ] && [ -d "$seed" ]; then
    echo "build-baseline.sh: seeding the build with a copy of $seed" >&2
    mkdir -p "$tmp/target"
    cp -a --reflink=auto "$seed" "$tmp/target/release"
    # So that a binary REV does not build cannot pass for one of REV's.
    rm -f "$tmp/target/release/"{master,worker,loadgen}
fi

echo "build-baseline.sh: building $(git -C "$root" log -1 --format='%h %s' "$commit")" >&2
(cd "$tmp/src" && CARGO_TARGET_DIR="$tmp/target" cargo build --release --quiet --workspace)

mkdir -p "$out"
for bin in master worker loadgen; do
    cp "$tmp/target/release/$bin" "$out/$bin"
done
git -C "$root" log -1 --format='%h %s' "$commit" > "$out/REVISION"
echo "build-baseline.sh: $out: master, worker, loadgen of $(cat "$out/REVISION")" >&2
