#!/usr/bin/env bash
# Benchmark: 100 claims to Bound on a real control plane with three plinth nodes and two
# controllers; prints p50/p95/max. Needs root and the Kubernetes components (built and cached by
# tests/k8s/build-components.sh on first use).
#
#   tests/bench-cluster.sh                       one run of this checkout's release build
#   tests/bench-cluster.sh --against OTHER [N]   N pairs (default 4), this build and the plinth
#                                                binary OTHER alternating, then one line per run
# This VM's speed drifts by a third from one hour to the next, so two builds are compared in
# alternating pairs, never by runs made at different times.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
CACHE=${PLINTH_TEST_CACHE:-/var/cache/plinth-test}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
source tests/k8s/env.sh
cargo build --release --bin plinth

run() { # $1: the plinth binary
  PLINTH_BIN=$1 cargo test --release -p plinth-tests --test cluster bench_bind_100_claims \
    -- --ignored --nocapture 2>&1 | grep -E '^(plinth cluster bench|  )'
}

if [ "${1:-}" != "--against" ]; then
  run "$TARGET/release/plinth"
  exit
fi
other=$(realpath "${2:?--against needs the other plinth binary}")
pairs=${3:-4}
# A copy: a build during the runs must not change what is measured.
this=$(mktemp /tmp/plinth-bench-this.XXXXXX)
trap 'rm -f "$this"' EXIT
cp "$TARGET/release/plinth" "$this"
chmod 0755 "$this"
summary=()
for pair in $(seq 1 "$pairs"); do
  for side in this other; do
    binary=$this
    [ "$side" = other ] && binary=$other
    out=$(run "$binary") || { echo "$out"; echo "the run of $binary failed" >&2; exit 1; }
    echo "$out"
    figure() { echo "$out" | awk -v key="$1" '$0 ~ key { print $(NF-1); exit }'; }
    summary+=("pair $pair  $side   p50 $(figure 'Bound  p50') s  p95 $(figure 'Bound  p95') s  fixed CPU work $(figure 'fixed CPU work') s")
  done
done
echo "alternating runs (this = $(git rev-parse --short HEAD), other = $other):"
printf '  %s\n' "${summary[@]}"
