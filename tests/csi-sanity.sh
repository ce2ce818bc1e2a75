#!/usr/bin/env bash
# Runs csi-sanity against a real `plinth standalone` for ext4, xfs, btrfs (mount) and block.
# Each run gets its own data dir and allowed root under a temp dir; after each run the script
# checks that no loop device or mount of that run is left behind. Exits non-zero on any failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
plinth=${PLINTH_BIN:-$repo/target/debug/plinth}
sanity=${CSI_SANITY:-$(go env GOPATH)/bin/csi-sanity}
failed=()
current_work=""
total_passed=0 total_failed=0 total_skipped=0

# Unmounts and detaches whatever a run left below its work dir, then removes it. Runs on every
# exit path (trap), so an aborted run cleans up too.
cleanup_run() {
  local work=$1
  [ -n "$work" ] && [ -d "$work" ] || return 0
  grep -F "$work" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount 2>/dev/null || true
  losetup -a 2>/dev/null | grep -F "$work" | cut -d: -f1 | xargs -r -n1 losetup -d 2>/dev/null || true
  rm -rf "$work"
}
trap 'cleanup_run "$current_work"' EXIT

run_one() {
  local label=$1 access=$2 fstype=$3 size_mib=$4
  # Each run's test size sits above its filesystem's minimum (xfs 300 MB, btrfs 109 MiB), so the
  # exact-size specs (required == limit) are satisfiable; images are sparse, so this costs nothing.
  local size=$((size_mib * 1024 * 1024))
  local work
  work=$(mktemp -d /tmp/plinth-sanity-XXXXXX)
  current_work=$work
  local root=$work/root
  mkdir -p "$root"  # csi-sanity creates mount/ and staging/ itself and fails if they exist
  printf 'fsType: %s\n' "$fstype" >"$work/params.yaml"
  printf 'provisioning: thick\n' >"$work/mutable.yaml"
  # plinth takes no snapshot parameters of its own; Kubernetes' informational keys are accepted.
  printf 'csi.storage.k8s.io/volumesnapshot/name: sanity\n' >"$work/snapshot.yaml"
  local params=(--csi.testvolumemutableparameters "$work/mutable.yaml" --csi.testvolumeexpandsize $((2 * size))
                --csi.testsnapshotparameters "$work/snapshot.yaml")
  [ "$access" = mount ] && params+=(--csi.testvolumeparameters "$work/params.yaml")

  "$plinth" standalone --data-dir "$work/data" --allowed-root "$root" --node-id sanity-node \
    --max-volumes-per-node 16 --endpoint "unix://$work/csi.sock" >"$work/plinth.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done

  echo "=== csi-sanity: $label"
  local rc=0
  "$sanity" --csi.endpoint "unix://$work/csi.sock" \
    --csi.mountdir "$root/mount" --csi.stagingdir "$root/staging" \
    --csi.testvolumeaccesstype "$access" --csi.testvolumesize "$size" \
    --csi.testnodevolumeattachlimit "${params[@]}" \
    --ginkgo.no-color --ginkgo.v --ginkgo.timeout 20m >"$work/sanity.log" 2>&1 || rc=$?
  grep -E '^(Ran |FAIL|SUCCESS|PASS|\[FAIL\])|Passed \| ' "$work/sanity.log" || true
  local counts
  counts=$(grep -E '^(SUCCESS|FAIL)! -- ' "$work/sanity.log" | tail -1 || true)
  if [[ $counts =~ ([0-9]+)\ Passed\ \|\ ([0-9]+)\ Failed\ \|\ [0-9]+\ Pending\ \|\ ([0-9]+)\ Skipped ]]; then
    total_passed=$((total_passed + BASH_REMATCH[1]))
    total_failed=$((total_failed + BASH_REMATCH[2]))
    total_skipped=$((total_skipped + BASH_REMATCH[3]))
  else
    rc=1
  fi
  # Why specs were skipped (each must be a capability plinth does not advertise).
  grep -E '^\s+\[SKIPPED\] ' "$work/sanity.log" | grep -v '\[SKIPPED\] in \[' | sed 's/^ *\[SKIPPED\] /  skipped: /' | sort | uniq -c || true
  if [ -n "${SANITY_KEEP_LOG:-}" ]; then cp "$work/sanity.log" "$SANITY_KEEP_LOG.$label"; fi

  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true

  local leaks
  leaks=$( (losetup -a 2>/dev/null | grep -F "$work" || true; grep -F "$work" /proc/self/mountinfo || true) )
  if [ -n "$leaks" ]; then
    echo "--- $label left devices or mounts behind:"; echo "$leaks"
    rc=1
  fi
  if [ "$rc" -ne 0 ]; then
    echo "--- $label FAILED; csi-sanity output:"; { grep -B2 -A25 "\[FAIL\]" "$work/sanity.log" || tail -50 "$work/sanity.log"; } | head -200
    echo "--- plinth log (errors):"; { grep -E 'WARN|ERROR' "$work/plinth.log" || true; } | tail -20
    failed+=("$label")
  fi
  cleanup_run "$work"
  current_work=""
}

selected=${1:-all}
for config in "mount-ext4 mount ext4 64" "mount-xfs mount xfs 320" "mount-btrfs mount btrfs 128" "block block ext4 64"; do
  set -- $config
  if [ "$selected" = all ] || [ "$selected" = "$1" ]; then run_one "$@"; fi
done

echo "csi-sanity: $total_passed passed, $total_failed failed, $total_skipped skipped"
if [ ${#failed[@]} -gt 0 ]; then
  echo "csi-sanity failed for: ${failed[*]}"
  exit 1
fi
