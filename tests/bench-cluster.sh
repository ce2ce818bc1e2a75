#!/usr/bin/env bash
# Benchmark: 100 claims to Bound on a real control plane with three plinth nodes and two
# controllers; prints p50/p95/max. Needs root and the Kubernetes components (built and cached by
# tests/k8s/build-components.sh on first use).
#
#   tests/bench-cluster.sh                       one run of this checkout's release build
#   tests/bench-cluster.sh --against OTHER [N]   N pairs (default 4), this build and the plinth
#                                                binary OTHER alternating, then one line per run
#   PLINTH_BENCH_CPUS=1 tests/bench-cluster.sh   the same with every process of the runs held to
#                                                that many cores (a CPU quota): a slow hour, on demand
# This VM's speed drifts by a third from one hour to the next, so two builds are compared in
# alternating pairs, never by runs made at different times.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
CACHE=${PLINTH_TEST_CACHE:-/var/cache/plinth-test}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
source tests/k8s/env.sh
cargo build --release --bin plinth

group= this=
cleanup() {
  [ -z "$this" ] || rm -f "$this"
  # Leave the group before removing it (the runs' processes have all ended by then).
  [ -z "$group" ] || { echo $$ > "$(dirname "$group")/cgroup.procs"; rmdir "$group"; }
}
trap cleanup EXIT

# A slow hour of this VM costs the burst about twice the CPU time: a quota of one core
# reproduces it whenever asked, so a change can be judged there too.
if [ -n "${PLINTH_BENCH_CPUS:-}" ]; then
  quota=$(awk -v cores="$PLINTH_BENCH_CPUS" 'BEGIN { printf "%d", cores * 100000 }')
  [ "$quota" -ge 1000 ] || { echo "PLINTH_BENCH_CPUS must be a number of cores, such as 1 or 1.5" >&2; exit 2; }
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir /sys/fs/cgroup/plinth-bench-$$ && group=/sys/fs/cgroup/plinth-bench-$$
    echo "$quota 100000" > "$group/cpu.max"
  else
    mkdir /sys/fs/cgroup/cpu/plinth-bench-$$ && group=/sys/fs/cgroup/cpu/plinth-bench-$$
    echo 100000 > "$group/cpu.cfs_period_us"
    echo "$quota" > "$group/cpu.cfs_quota_us"
  fi
  echo $$ > "$group/cgroup.procs"
  echo "every process of the runs is held to $PLINTH_BENCH_CPUS core(s)"
fi

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
