#!/usr/bin/env bash
# Build the container images the real-node tests run, without Docker or a registry:
#
#   pause   localhost/plinth-pause:test  the pod sandbox image: a static C program that sleeps
#                                         until SIGTERM/SIGINT and reaps orphans (containerd's
#                                         sandbox_image; nothing can be pulled here)
#   base    localhost/plinth-base:test   Debian bookworm (mmdebstrap, variant essential) with the
#                                         filesystem tools plinth runs; also the workload image
#                                         (sh, sha256sum, dd, df)
#   plinth  localhost/plinth:test        base + a plinth binary at /usr/local/bin/plinth,
#                                         ENTRYPOINT /usr/local/bin/plinth; only when a binary is
#                                         given (argument 1, else PLINTH_BIN)
#
# umoci builds OCI layouts, skopeo turns them into docker-archive tars that keep the full image
# name through `ctr -n k8s.io images import`. pause and base are cached under
# $PLINTH_TEST_CACHE/images/ by a key of their recipe (source, package list), so a warm run takes
# seconds; the plinth image is rebuilt every time (its binary changes every build) from a
# hard-linked copy of the cached base layout: one new layer, no mmdebstrap.
#
# stdout: KEY=VALUE lines for the test harness (tests/src/node.rs reads them from the
# environment): PLINTH_{PAUSE,BASE}_{IMAGE,ARCHIVE} and, with a binary, PLINTH_IMAGE{,_ARCHIVE}.
# Logs go to stderr. Builds are staged in .partial-* dirs and renamed into place under a flock,
# so a run killed halfway leaves nothing a later run would use (the next run sweeps it).
#
# Environment:
#   PLINTH_TEST_CACHE     cache root (default /var/cache/plinth-test)
#   PLINTH_BIN            plinth binary for the plinth image (the first argument wins)
#   PLINTH_IMAGE_NAME     the plinth image's name (default localhost/plinth:test)
#   PLINTH_DEBIAN_MIRROR  a mirror for mmdebstrap (default: deb.debian.org with updates and
#                         security, mmdebstrap's own default for a stable suite)
set -euo pipefail

SUITE=bookworm
VARIANT=essential
# The tools plinth runs (blkid, mkfs.*, resize2fs/e2fsck, xfs_growfs, btrfs, mount) and a shell
# with coreutils for workload pods. Changing this list changes the cache key.
BASE_PACKAGES=(bash coreutils util-linux mount e2fsprogs xfsprogs btrfs-progs)
# Bump when the recipe below changes in a way the key does not see.
RECIPE=1

PAUSE_IMAGE=localhost/plinth-pause:test
BASE_IMAGE=localhost/plinth-base:test
PLINTH_IMAGE=${PLINTH_IMAGE_NAME:-localhost/plinth:test}

CACHE_ROOT="${PLINTH_TEST_CACHE:-/var/cache/plinth-test}"
IMAGES="${CACHE_ROOT}/images"
BIN="${1:-${PLINTH_BIN:-}}"

SCRIPT_START=$(date +%s)
log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

[[ $(id -u) -eq 0 ]] || die "run as root: mmdebstrap and umoci keep file ownership only as root"
if [[ -n "$BIN" ]]; then
    [[ -f "$BIN" && -x "$BIN" ]] || die "plinth binary ${BIN} is not an executable file"
    BIN=$(realpath -- "$BIN")
fi

# The pause program. Like Kubernetes' own pause: PID 1 of the pod sandbox, it holds the pod's
# namespaces, reaps zombies re-parented to it (shareProcessNamespace) and exits on SIGTERM/SIGINT.
PAUSE_C=$(cat <<'EOF'
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("plinth-pause 1");
        return 0;
    }
    if (getpid() != 1) fputs("plinth-pause: warning: not PID 1\n", stderr);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) return 1;
    sa.sa_handler = on_child;
    sa.sa_flags = SA_NOCLDSTOP;
    if (sigaction(SIGCHLD, &sa, NULL) < 0) return 2;
    for (;;) pause();
}
EOF
)

# ---------------------------------------------------------------------------
# Host tools (Debian packages), installed only when missing
# ---------------------------------------------------------------------------
missing=()
for pair in mmdebstrap:mmdebstrap umoci:umoci skopeo:skopeo gcc:gcc strip:binutils flock:util-linux \
            sha256sum:coreutils unshare:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[[ -f /usr/lib/x86_64-linux-gnu/libc.a || -f /usr/lib/libc.a ]] || missing+=(libc6-dev)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# ---------------------------------------------------------------------------
# Cache keys: what goes into each image
# ---------------------------------------------------------------------------
key_of() { sha256sum | cut -c1-16; }
PAUSE_KEY=$( { echo "recipe ${RECIPE}"; gcc --version | head -1; printf '%s\n' "$PAUSE_C"; } | key_of)
BASE_KEY=$( { echo "recipe ${RECIPE} ${SUITE} ${VARIANT} ${PLINTH_DEBIAN_MIRROR:-default}";
              printf '%s\n' "${BASE_PACKAGES[@]}" | sort; } | key_of)
PAUSE_TAR="${IMAGES}/pause-${PAUSE_KEY}.tar"
BASE_DIR="${IMAGES}/base-${BASE_KEY}"          # oci/ (layout, for the plinth image) + image.tar
BASE_TAR="${BASE_DIR}/image.tar"
PLINTH_TAR="${IMAGES}/plinth.tar"

mkdir -p "$IMAGES"
exec 9>"${IMAGES}/.lock"
if ! flock -n 9; then
    log "another build holds ${IMAGES}/.lock; waiting"
    flock 9
fi

# Under the lock: anything staged is from a run that was killed; earlier keys are stale.
rm -rf --one-file-system -- "${IMAGES}"/.partial-* 2>/dev/null || true
for old in "${IMAGES}"/pause-*.tar "${IMAGES}"/base-*; do
    [[ -e "$old" && "$old" != "$PAUSE_TAR" && "$old" != "$BASE_DIR" ]] || continue
    log "removing stale ${old}"
    rm -rf --one-file-system -- "$old"
done

STAGE=""
cleanup() { [[ -n "$STAGE" ]] && rm -rf --one-file-system -- "$STAGE"; return 0; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
new_stage() { STAGE=$(mktemp -d "${IMAGES}/.partial-$1.XXXXXX"); }

# to_archive LAYOUT:TAG OUT NAME: docker-archive with the full image name (skopeo's local
# transports need no signature policy).
to_archive() {
    skopeo --insecure-policy copy --quiet "oci:$1" "docker-archive:$2:$3" >&2
}

# ---------------------------------------------------------------------------
# pause
# ---------------------------------------------------------------------------
if [[ -s "$PAUSE_TAR" ]]; then
    log "pause: cached (${PAUSE_KEY})"
else
    t0=$(date +%s)
    new_stage pause
    printf '%s\n' "$PAUSE_C" >"${STAGE}/pause.c"
    gcc -static -Os -s -Wall -Werror -o "${STAGE}/pause" "${STAGE}/pause.c"
    umoci init --layout "${STAGE}/oci"
    umoci new --image "${STAGE}/oci:pause"
    umoci insert --image "${STAGE}/oci:pause" "${STAGE}/pause" /pause
    umoci config --image "${STAGE}/oci:pause" --config.entrypoint /pause --config.user 65535:65535 \
        --config.workingdir /
    to_archive "${STAGE}/oci:pause" "${STAGE}/pause.tar" "$PAUSE_IMAGE"
    mv -f -- "${STAGE}/pause.tar" "$PAUSE_TAR"
    rm -rf -- "$STAGE"; STAGE=""
    log "pause: built in $(elapsed "$t0")"
fi

# ---------------------------------------------------------------------------
# base
# ---------------------------------------------------------------------------
if [[ -s "$BASE_TAR" && -f "${BASE_DIR}/oci/index.json" ]]; then
    log "base: cached (${BASE_KEY})"
else
    t0=$(date +%s)
    new_stage base
    include=$(IFS=,; echo "${BASE_PACKAGES[*]}")
    mirrors=()
    [[ -n "${PLINTH_DEBIAN_MIRROR:-}" ]] && mirrors=("$PLINTH_DEBIAN_MIRROR")
    log "base: mmdebstrap ${SUITE} (${VARIANT} + ${include})"
    # A private mount namespace: the /proc, /sys, /dev mounts mmdebstrap makes in its chroot
    # vanish with it even if it is killed; TMPDIR in the stage dir, so its chroot is swept too.
    TMPDIR="$STAGE" unshare --mount --propagation private \
        mmdebstrap --quiet --mode=root --variant="$VARIANT" --include="$include" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$SUITE" "${STAGE}/rootfs.tar" "${mirrors[@]}" >&2
    umoci init --layout "${STAGE}/oci"
    umoci new --image "${STAGE}/oci:base"
    umoci raw add-layer --image "${STAGE}/oci:base" --history.created_by "mmdebstrap ${SUITE} ${include}" \
        "${STAGE}/rootfs.tar"
    rm -f -- "${STAGE}/rootfs.tar"
    umoci config --image "${STAGE}/oci:base" --config.cmd /bin/sh --config.workingdir / \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    to_archive "${STAGE}/oci:base" "${STAGE}/image.tar" "$BASE_IMAGE"
    mkdir -p "${STAGE}/out"
    mv -- "${STAGE}/oci" "${STAGE}/image.tar" "${STAGE}/out/"
    rm -rf --one-file-system -- "$BASE_DIR"
    mv -T -- "${STAGE}/out" "$BASE_DIR"
    rm -rf --one-file-system -- "$STAGE"; STAGE=""
    log "base: built in $(elapsed "$t0") ($(du -sh "$BASE_TAR" | cut -f1))"
fi

# ---------------------------------------------------------------------------
# plinth: base + the binary (never cached)
# ---------------------------------------------------------------------------
if [[ -n "$BIN" ]]; then
    t0=$(date +%s)
    new_stage plinth
    # Blobs are immutable and content-addressed: hard links are a free copy of the base layout.
    # index.json is rewritten by umoci, so it gets a real copy.
    cp -al -- "${BASE_DIR}/oci" "${STAGE}/oci"
    rm -f -- "${STAGE}/oci/index.json"
    cp -- "${BASE_DIR}/oci/index.json" "${STAGE}/oci/index.json"
    # Debug info is most of a debug build's size; the image does not need it.
    strip --strip-debug -o "${STAGE}/plinth" -- "$BIN"
    chmod 0755 "${STAGE}/plinth"
    umoci insert --image "${STAGE}/oci:base" --tag plinth "${STAGE}/plinth" /usr/local/bin/plinth
    umoci config --image "${STAGE}/oci:plinth" --config.entrypoint /usr/local/bin/plinth --clear=config.cmd
    to_archive "${STAGE}/oci:plinth" "${STAGE}/plinth.tar" "$PLINTH_IMAGE"
    mv -f -- "${STAGE}/plinth.tar" "$PLINTH_TAR"
    rm -rf --one-file-system -- "$STAGE"; STAGE=""
    log "plinth: built in $(elapsed "$t0") from ${BIN}"
fi

log "images ready in $(elapsed "$SCRIPT_START")"
echo "PLINTH_PAUSE_IMAGE=${PAUSE_IMAGE}"
echo "PLINTH_PAUSE_ARCHIVE=${PAUSE_TAR}"
echo "PLINTH_BASE_IMAGE=${BASE_IMAGE}"
echo "PLINTH_BASE_ARCHIVE=${BASE_TAR}"
if [[ -n "$BIN" ]]; then
    echo "PLINTH_IMAGE=${PLINTH_IMAGE}"
    echo "PLINTH_IMAGE_ARCHIVE=${PLINTH_TAR}"
fi
