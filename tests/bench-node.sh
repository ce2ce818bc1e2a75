#!/usr/bin/env bash
# Benchmark: a pod with a new claim, create → Running, 20 pods each for ext4 and block, on a real
# node (kubelet + containerd) with plinth deployed from deploy/; prints p50/p95 and how the time
# splits. Needs root, containerd, and the components and images tests/run-all.sh sets up.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
CACHE=${PLINTH_TEST_CACHE:-/var/cache/plinth-test}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
source tests/k8s/env.sh
cargo build --release --bin plinth
source tests/k8s/images-env.sh "$TARGET/release/plinth" >/dev/null
cargo test --release -p plinth-tests --test plinth_on_a_node bench_pod_with_new_claim \
  -- --ignored --nocapture 2>&1 | grep -E '^(plinth node bench|  )'
