#!/usr/bin/env bash
# plinth's whole test suite on a fresh Debian machine, as root: installs what it needs (Debian
# packages, rustfmt/clippy, csi-sanity), then lint, unit tests, integration tests on real loop
# devices and mounts, the cluster tests on a real control plane and a real node (containerd, runc,
# kubelet), and csi-sanity for ext4, xfs, btrfs and block.
set -euo pipefail
cd "$(dirname "$0")/.."

CSI_SANITY_VERSIONS=(v5.5.0 v5.4.0)   # the first the Go module proxy serves wins
CACHE=${PLINTH_TEST_CACHE:-/var/cache/plinth-test}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}   # where cargo puts the plinth binary the tests run
export PATH="$PATH:/usr/local/go/bin:$HOME/.cargo/bin"

step() { printf '\n==> %s\n' "$*"; }

# A fresh clone gains nothing from incremental compilation; it only costs disk.
export CARGO_INCREMENTAL=0
# A run with a warm cache takes about 3 GB of disk at its peak (measured on a fresh clone: target/
# 2.3 GB, then images, pools and logs); a cold cache adds the Go module downloads and, while the
# Kubernetes binaries build, Go's build cache. Said up front, so a run that dies of ENOSPC is
# recognised as one.
disk_report() { df -h --output=avail,target "$PWD" "$(dirname "$CACHE")" /tmp 2>/dev/null | sed 's/^/    /'; }

if [ "$(id -u)" -ne 0 ]; then
  echo "run the test suite as root: it attaches loop devices and mounts filesystems" >&2
  exit 1
fi

# What is attached now is not this run's: the leak check at the end compares with it.
loops_before=$(losetup -a 2>/dev/null | sort || true)

step "free disk at the start"
disk_report

step "system packages"
missing=()
for pair in mkfs.ext4:e2fsprogs mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs blkid:util-linux losetup:mount \
            modprobe:kmod containerd:containerd runc:runc iptables:iptables ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
if ! command -v go >/dev/null 2>&1; then missing+=(golang-go); fi
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -e /dev/loop-control ] || modprobe loop
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install Rust (rustup) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi

step "csi-sanity"
CSI_SANITY=""
for version in "${CSI_SANITY_VERSIONS[@]}"; do
  bin_dir=$CACHE/csi-sanity-$version
  if [ -x "$bin_dir/csi-sanity" ] || GOBIN=$bin_dir GOFLAGS=-mod=mod \
      go install "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$version"; then
    CSI_SANITY=$bin_dir/csi-sanity
    echo "using csi-sanity $version ($CSI_SANITY)"
    break
  fi
done
[ -n "$CSI_SANITY" ] || { echo "could not install csi-sanity" >&2; exit 1; }
export CSI_SANITY

step "Kubernetes components for the cluster tests, the snapshot-controller, its CRDs and the kubernetes-csi sidecars (built once, cached under $CACHE)"
source tests/k8s/env.sh
echo "kube-apiserver $PLINTH_K8S_VERSION, $("$PLINTH_ETCD" --version | head -1)"
echo "snapshot-controller $("$PLINTH_SNAPSHOT_CONTROLLER" --version 2>&1 | head -1), CRDs in $PLINTH_SNAPSHOT_CRDS"
echo "sidecars: $PLINTH_CSI_PROVISIONER $PLINTH_CSI_SNAPSHOTTER $PLINTH_CSI_RESIZER"

step "interop clients: grpc-go dialing like kubelet, Python grpcio (gRPC C-core)"
mkdir -p target/interop
(cd tests/interop/go && GOFLAGS=-mod=mod GOTOOLCHAIN=local go build -o ../../../target/interop/plinth-interop-go .)
export PLINTH_GO_INTEROP=$PWD/target/interop/plinth-interop-go
python_env=$CACHE/python-interop-$(sha256sum tests/interop/python/requirements.txt | cut -c1-12)
if [ ! -x "$python_env/bin/python" ]; then
  command -v python3 >/dev/null 2>&1 || { apt-get update -qq; apt-get install -y -qq python3 python3-venv >/dev/null; }
  rm -rf "$python_env.partial"
  python3 -m venv "$python_env.partial"
  "$python_env.partial/bin/pip" install -q -r tests/interop/python/requirements.txt
  mv -T "$python_env.partial" "$python_env"
fi
export PLINTH_PYTHON_INTEROP=$python_env/bin/python
echo "go client $PLINTH_GO_INTEROP, python $("$PLINTH_PYTHON_INTEROP" -c 'import grpc; print("grpcio", grpc.__version__)')"

step "format and lint"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build"
cargo build --workspace --all-targets --locked

step "node images (pause, base cached under $CACHE/images; plinth from $TARGET/debug)"
source tests/k8s/images-env.sh "$TARGET/debug/plinth"

step "unit and integration tests"
# Root-only and cluster tests are #[ignore]d for a plain `cargo test`; here they all run.
cargo test --workspace --locked -- --include-ignored --skip bench_

step "csi-sanity against plinth standalone"
PLINTH_BIN=$TARGET/debug/plinth tests/csi-sanity.sh

step "leak check"
# Every loop device, not just those whose path names plinth: what a container attached shows a
# path relative to its own mounts (and "(deleted)" once its image is gone).
loops_after=$(losetup -a 2>/dev/null | sort || true)
if [ "$loops_after" != "$loops_before" ]; then
  echo "loop devices left behind:"; comm -13 <(echo "$loops_before") <(echo "$loops_after"); exit 1
fi
if grep -q '/tmp/plinth-' /proc/self/mountinfo; then echo "mounts left behind:"; grep '/tmp/plinth-' /proc/self/mountinfo; exit 1; fi
if pgrep -f '/tmp/plinth-k8s-|kube-apiserver --etcd-servers=http://127.0.0.1' >/dev/null; then
  echo "control-plane processes left behind:"; pgrep -af 'kube-|etcd'; exit 1
fi
if pgrep -f '/tmp/plinth-node-' >/dev/null; then
  echo "node processes (containerd, shims, kubelet) left behind:"; pgrep -af '/tmp/plinth-node-'; exit 1
fi
if iptables -w -S INPUT 2>/dev/null | grep -q plinth-test-silenced; then
  echo "netfilter rules left behind:"; iptables -w -S INPUT | grep plinth-test-silenced; exit 1
fi
if ls -d /tmp/plinth-node-* >/dev/null 2>&1; then echo "node dirs left behind:"; ls -d /tmp/plinth-node-*; exit 1; fi
echo "no loop devices, mounts, processes or netfilter rules left behind"

step "free disk at the end"
disk_report
