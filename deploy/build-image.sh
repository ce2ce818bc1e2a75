#!/usr/bin/env bash
# plinth's container image without Docker or a registry, from Debian packages: an mmdebstrap
# bookworm root filesystem with the tools plinth runs (e2fsprogs, xfsprogs, btrfs-progs,
# util-linux), the plinth binary at /usr/local/bin/plinth as the entrypoint; packed with umoci and
# skopeo. Run as root on Debian/Ubuntu (installs mmdebstrap, umoci and skopeo when missing).
#
#   deploy/build-image.sh [BINARY] [IMAGE]
#     BINARY  default target/release/plinth (built with cargo when missing)
#     IMAGE   default ghcr.io/plinth-csi/plinth:0.1.0 (what deploy/kustomization.yaml names)
#
# Writes target/image/plinth.oci.tar (OCI archive: `skopeo copy oci-archive:… docker://…` pushes
# it) and target/image/plinth.docker.tar (`ctr -n k8s.io images import`, `docker load`,
# `podman load`). The base root filesystem is cached under /var/cache/plinth-test/images, so a
# rebuild with a new binary takes seconds. deploy/Dockerfile builds the same image with Docker.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/plinth}
IMAGE=${2:-ghcr.io/plinth-csi/plinth:0.1.0}
OUT=target/image
if [[ ! -x "$BIN" ]]; then
    cargo build --release --locked --bin plinth
fi
archive=$(PLINTH_IMAGE_NAME="$IMAGE" tests/k8s/build-images.sh "$BIN" | sed -n 's/^PLINTH_IMAGE_ARCHIVE=//p')
[[ -s "$archive" ]] || { echo "the image build printed no archive" >&2; exit 1; }
mkdir -p "$OUT"
cp -- "$archive" "$OUT/plinth.docker.tar"
rm -f -- "$OUT/plinth.oci.tar"
skopeo --insecure-policy copy --quiet "docker-archive:$OUT/plinth.docker.tar" "oci-archive:$OUT/plinth.oci.tar:$IMAGE"
echo "$IMAGE: $OUT/plinth.oci.tar, $OUT/plinth.docker.tar"
