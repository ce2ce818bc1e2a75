#!/usr/bin/env bash
# Benchmark: 100 claims to Bound on a real control plane with three plinth nodes and two
# controllers; prints p50/p95/max. Needs root and the Kubernetes components (built and cached by
# tests/k8s/build-components.sh on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
CACHE=${PLINTH_TEST_CACHE:-/var/cache/plinth-test}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
source tests/k8s/env.sh
cargo build --release --bin plinth
PLINTH_BIN=$TARGET/release/plinth cargo test --release -p plinth-tests --test cluster bench_bind_100_claims \
  -- --ignored --nocapture 2>&1 | grep -E '^(plinth cluster bench|  )'
