#!/usr/bin/env bash
# Benchmark: 100 claims to Bound on a real control plane with three plinth nodes and two
# controllers; prints p50/p95/max. Needs root and the Kubernetes components (built and cached by
# tests/k8s/build-components.sh on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"
mapfile -t components < <(tests/k8s/build-components.sh)
export PLINTH_KUBE_APISERVER=${components[0]} PLINTH_KUBE_CONTROLLER_MANAGER=${components[1]}
export PLINTH_KUBE_SCHEDULER=${components[2]} PLINTH_ETCD=${components[3]}
PLINTH_K8S_VERSION=$("$PLINTH_KUBE_APISERVER" --version | awk '{print $2}')
export PLINTH_K8S_VERSION
cargo build --release --bin plinth
PLINTH_BIN=$PWD/target/release/plinth cargo test --release -p plinth-tests --test cluster bench_bind_100_claims \
  -- --ignored --nocapture 2>&1 | grep -E '^(plinth cluster bench|  )'
