#!/usr/bin/env bash
# Benchmark: plinth against a raw baseline, side by side, in one run — the control path against
# the raw tool chain, the data path against the pool's own filesystem (fio), RSS, scale to 1000
# volumes, and snapshots/clones/restores against cp. Prints a table with ratios and the targets
# of issue 12, and writes plinth-bench.json, plinth-bench.txt and latency.svg to
# target/plinth-bench/. Needs root. Options go to the harness, e.g.:
#   tests/bench.sh --quick                     # a short run while developing
#   tests/bench.sh --wait-quiet 3600           # the published figures: waits for a quiet machine
#   tests/bench.sh --only data --knobs         # the loop queue knobs, one at a time
#   tests/bench.sh --only control --plinth tests/plinth-without-fsync.sh   # the floor without fsync
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$HOME/.cargo/bin"
missing=()
for tool in fio:fio eatmydata:eatmydata mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs mkfs.ext4:e2fsprogs; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  apt-get install -y "${missing[@]}" || { apt-get update && apt-get install -y "${missing[@]}"; }
fi
# -p plinth: the plinth binary alone, with the features a release has (a workspace-wide build
# would unify the test crate's fail points into it).
cargo build --release -p plinth --bin plinth
cargo run --release -p plinth-tests --bin plinth-bench -- "$@"
