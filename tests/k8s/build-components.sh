#!/usr/bin/env bash
# Build real Kubernetes binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kubectl), the etcd server and the standard CSI
# infrastructure a cluster admin installs beside them (the common
# snapshot-controller with the snapshot CRDs, and the csi-snapshotter,
# csi-resizer and csi-provisioner sidecars) from the Go module proxy, and cache
# them outside the repository.
#
# Layout (PLINTH_TEST_CACHE defaults to /var/cache/plinth-test):
#   $PLINTH_TEST_CACHE/k8s-$K8S_VERSION/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kubectl}
#   $PLINTH_TEST_CACHE/etcd-$ETCD_VERSION/bin/etcd
#   $PLINTH_TEST_CACHE/external-snapshotter-$SNAPSHOTTER_VERSION/bin/{snapshot-controller,csi-snapshotter}
#   $PLINTH_TEST_CACHE/external-snapshotter-$SNAPSHOTTER_VERSION/crd/*.yaml   (client/v8's config/crd)
#   $PLINTH_TEST_CACHE/external-resizer-$RESIZER_VERSION/bin/csi-resizer
#   $PLINTH_TEST_CACHE/external-provisioner-$PROVISIONER_VERSION/bin/csi-provisioner
#
# Printed, one per line, in this order: the five Kubernetes binaries, etcd,
# snapshot-controller, csi-snapshotter, the snapshot CRD directory, csi-resizer,
# csi-provisioner (tests/k8s/env.sh exports them).
#
# If every binary is already cached (and runs `--version`), this exits 0 in
# seconds after printing the paths. Otherwise the missing component(s) are
# built into a staging directory inside the cache root and renamed into place
# atomically, under a flock so that concurrent invocations build only once.
#
# Requirements: Go (any reasonably recent release; if the release needs a newer
# Go, GOTOOLCHAIN is set automatically and the toolchain is fetched through the
# module proxy), plus coreutils/flock/sed/awk/grep. Needs network access to the
# Go module proxy (and checksum DB) only.
#
# Environment:
#   K8S_VERSION        Kubernetes release (k8s.io/kubernetes module version)
#   ETCD_VERSION       etcd release (go.etcd.io/etcd/server/v3 module version)
#   SNAPSHOTTER_VERSION  github.com/kubernetes-csi/external-snapshotter/v8 (and client/v8) version
#   RESIZER_VERSION    github.com/kubernetes-csi/external-resizer/v2 version
#   PROVISIONER_VERSION  github.com/kubernetes-csi/external-provisioner/v6 version
#   PLINTH_TEST_CACHE  cache root (default /var/cache/plinth-test)
#   GO                 go binary to use (default: `go` in PATH, else /usr/local/go/bin/go)
#   PLINTH_GOTOOLCHAIN force a GOTOOLCHAIN value (e.g. go1.27.3) for all builds
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
SNAPSHOTTER_VERSION="${SNAPSHOTTER_VERSION:-v8.7.0}"
RESIZER_VERSION="${RESIZER_VERSION:-v2.3.0}"
PROVISIONER_VERSION="${PROVISIONER_VERSION:-v6.4.0}"

CACHE_ROOT="${PLINTH_TEST_CACHE:-/var/cache/plinth-test}"
K8S_DIR="${CACHE_ROOT}/k8s-${K8S_VERSION}"
ETCD_DIR="${CACHE_ROOT}/etcd-${ETCD_VERSION}"
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)
SNAPSHOTTER_DIR="${CACHE_ROOT}/external-snapshotter-${SNAPSHOTTER_VERSION}"
SNAPSHOTTER_BINS=(snapshot-controller csi-snapshotter)
RESIZER_DIR="${CACHE_ROOT}/external-resizer-${RESIZER_VERSION}"
PROVISIONER_DIR="${CACHE_ROOT}/external-provisioner-${PROVISIONER_VERSION}"

SCRIPT_START=$(date +%s)

log() { printf '[build-components %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------
# Cache checks
# ---------------------------------------------------------------------------

# bin_ok PATH: the file exists, is executable and `PATH --version` succeeds.
bin_ok() {
    [[ -f "$1" && -x "$1" ]] || return 1
    if [[ "$(basename "$1")" == kubectl ]]; then
        timeout 30 "$1" version --client >/dev/null 2>&1   # kubectl has no --version flag
    else
        timeout 30 "$1" --version >/dev/null 2>&1
    fi
}

k8s_cached() {
    local b
    for b in "${K8S_BINS[@]}"; do
        bin_ok "${K8S_DIR}/bin/${b}" || return 1
    done
}

etcd_cached() { bin_ok "${ETCD_DIR}/bin/etcd"; }

# The snapshot CRDs come with the binaries: a cache entry without them is incomplete.
snapshotter_cached() {
    local b
    for b in "${SNAPSHOTTER_BINS[@]}"; do
        bin_ok "${SNAPSHOTTER_DIR}/bin/${b}" || return 1
    done
    [[ -f "${SNAPSHOTTER_DIR}/crd/snapshot.storage.k8s.io_volumesnapshots.yaml" \
        && -f "${SNAPSHOTTER_DIR}/crd/groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml" ]]
}

resizer_cached() { bin_ok "${RESIZER_DIR}/bin/csi-resizer"; }
provisioner_cached() { bin_ok "${PROVISIONER_DIR}/bin/csi-provisioner"; }

all_cached() { k8s_cached && etcd_cached && snapshotter_cached && resizer_cached && provisioner_cached; }

print_paths() {
    local b
    for b in "${K8S_BINS[@]}"; do
        echo "${K8S_DIR}/bin/${b}"
    done
    echo "${ETCD_DIR}/bin/etcd"
    for b in "${SNAPSHOTTER_BINS[@]}"; do
        echo "${SNAPSHOTTER_DIR}/bin/${b}"
    done
    echo "${SNAPSHOTTER_DIR}/crd"
    echo "${RESIZER_DIR}/bin/csi-resizer"
    echo "${PROVISIONER_DIR}/bin/csi-provisioner"
}

# Fast path: no lock, no Go, no network.
if all_cached; then
    log "all components cached (k8s ${K8S_VERSION}, etcd ${ETCD_VERSION}, external-snapshotter ${SNAPSHOTTER_VERSION}, external-resizer ${RESIZER_VERSION}, external-provisioner ${PROVISIONER_VERSION})"
    print_paths
    exit 0
fi

# ---------------------------------------------------------------------------
# Go setup
# ---------------------------------------------------------------------------

if [[ -n "${GO:-}" ]]; then
    :
elif command -v go >/dev/null 2>&1; then
    GO=$(command -v go)
elif [[ -x /usr/local/go/bin/go ]]; then
    GO=/usr/local/go/bin/go
else
    die "no Go toolchain found (set GO=/path/to/go or put go in PATH)"
fi

# The wrapper modules live in temp dirs outside any repository/workspace.
export GOWORK=off
export GOFLAGS="${GOFLAGS:+${GOFLAGS} }-mod=mod"
export CGO_ENABLED=0

mkdir -p "${CACHE_ROOT}"

# One builder at a time per cache root.
LOCK="${CACHE_ROOT}/.build.lock"
exec 9>"$LOCK"
if ! flock -n 9; then
    log "another build holds ${LOCK}; waiting"
    flock 9
fi

# We hold the lock: any leftover .partial-* dirs (wrapper modules, staged
# binaries) or {k8s,etcd}-*.old.* dirs are from builds that were killed.
chmod -R u+w -- "${CACHE_ROOT}"/.partial-* 2>/dev/null || true
rm -rf -- "${CACHE_ROOT}"/.partial-* "${CACHE_ROOT}"/k8s-*.old.* "${CACHE_ROOT}"/etcd-*.old.* \
    "${CACHE_ROOT}"/external-*.old.* 2>/dev/null || true

# Throwaway wrapper modules go here (outside any repository; on the cache
# filesystem so a SIGKILLed run's leftovers are swept by the line above).
WORK=$(mktemp -d "${CACHE_ROOT}/.partial-work.XXXXXX")
# The binaries are cached by version; Go's build cache for them (several GB for Kubernetes) would
# only take disk a CI machine needs for the rest of the run, so it lives and dies with WORK.
export GOCACHE="${WORK}/gocache"
STAGE_DIRS=()
STAGE=""
cleanup() {
    local d
    for d in "${STAGE_DIRS[@]}"; do
        [[ -n "$d" ]] && rm -rf -- "$d"
    done
    # Be robust against read-only files (e.g. if go wrote any) in WORK.
    chmod -R u+w -- "${WORK}" 2>/dev/null || true
    rm -rf -- "${WORK}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Run go from a neutral directory so no stray go.mod/go.work is picked up.
LOCAL_GOVERSION=$(cd "${WORK}" && GOTOOLCHAIN=local "${GO}" env GOVERSION)
LOCAL_GOVERSION="${LOCAL_GOVERSION#go}"
LOCAL_GOVERSION="${LOCAL_GOVERSION%%[ -]*}"
log "using ${GO} (go${LOCAL_GOVERSION}), cache root ${CACHE_ROOT}"

# version_ge A B: dotted version A >= B (e.g. 1.26.8 >= 1.26.0).
version_ge() {
    local IFS=.
    local -a a=($1) b=($2)
    local i x y
    for i in 0 1 2; do
        x="${a[i]:-0}"; y="${b[i]:-0}"
        x="${x%%[!0-9]*}"; y="${y%%[!0-9]*}"
        x="${x:-0}"; y="${y:-0}"
        if ((10#$x > 10#$y)); then return 0; fi
        if ((10#$x < 10#$y)); then return 1; fi
    done
    return 0
}

# normalize_gover 1.27 -> 1.27.0 (toolchain names since Go 1.21 have 3 parts).
normalize_gover() {
    local v="$1"
    if [[ "$v" =~ ^[0-9]+\.[0-9]+$ ]]; then
        v="${v}.0"
    fi
    echo "$v"
}

# pick_toolchain GOMOD_FILE: prints the GOTOOLCHAIN value to use for a release
# whose go.mod is GOMOD_FILE. "local" if this Go satisfies the `go` line;
# otherwise the release's `toolchain` version (if it is at least the `go`
# version), else the `go` version itself, downloaded through the module proxy.
pick_toolchain() {
    local gomod="$1" need tc
    if [[ -n "${PLINTH_GOTOOLCHAIN:-}" ]]; then
        echo "${PLINTH_GOTOOLCHAIN}"
        return
    fi
    need=$(awk '$1 == "go" && NF == 2 { print $2; exit }' "$gomod")
    tc=$(awk '$1 == "toolchain" && NF == 2 { sub(/^go/, "", $2); print $2; exit }' "$gomod")
    [[ -n "$need" ]] || { echo local; return; }
    need=$(normalize_gover "$need")
    if version_ge "${LOCAL_GOVERSION}" "$need"; then
        echo local
    elif [[ -n "$tc" ]] && version_ge "$tc" "$need"; then
        echo "go${tc}"
    else
        echo "go${need}"
    fi
}

# gomod_of MODULE@VERSION: download the module and print the path of its .mod.
gomod_of() {
    local json file
    json=$(cd "${WORK}" && GOTOOLCHAIN=local "${GO}" mod download -json "$1") \
        || die "go mod download $1 failed: ${json}"
    file=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [[ -n "$file" && -f "$file" ]] || die "could not find go.mod of $1 in: ${json}"
    echo "$file"
}

# build_date GOMOD_FILE: release commit time from the proxy's .info file,
# used as a reproducible build date. SOURCE_DATE_EPOCH wins if set.
build_date() {
    local gomod="$1" info t
    if [[ -n "${SOURCE_DATE_EPOCH:-}" ]]; then
        date -u -d "@${SOURCE_DATE_EPOCH}" +%Y-%m-%dT%H:%M:%SZ
        return
    fi
    info="${gomod%.mod}.info"
    t=""
    if [[ -f "$info" ]]; then
        t=$(sed -n 's/.*"Time":"\([0-9T:-]*\)\(\.[0-9]*\)\{0,1\}Z".*/\1Z/p' "$info")
    fi
    if [[ "$t" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$ ]]; then
        echo "$t"
    else
        date -u +%Y-%m-%dT%H:%M:%SZ
    fi
}

# copy_header GOMOD_FILE: the `go` line and any `godebug` lines/blocks.
copy_header() {
    awk '
        $1 == "go" && NF == 2 { print; next }
        $1 == "godebug" && $2 == "(" { inblk = 1; print; next }
        inblk { print; if ($1 == ")") inblk = 0; next }
        $1 == "godebug" { print }
    ' "$1"
}

# new_stage NAME: create a staging dir on the cache filesystem (same fs =>
# atomic mv) and store its path in STAGE (not via $(...), so that the EXIT
# trap's STAGE_DIRS list sees it).
new_stage() {
    STAGE=$(mktemp -d "${CACHE_ROOT}/.partial-$1.XXXXXX")
    STAGE_DIRS+=("$STAGE")
    chmod 0755 "$STAGE"   # mktemp -d makes it 0700; keep the cache readable
    mkdir -p "$STAGE/bin"
}

# install_stage STAGE FINAL: atomically replace FINAL with STAGE.
install_stage() {
    local stage="$1" final="$2" old=""
    if [[ -e "$final" ]]; then
        old="${final}.old.$$"
        mv -- "$final" "$old"
    fi
    mv -T -- "$stage" "$final"
    [[ -n "$old" ]] && rm -rf -- "$old"
    return 0
}

elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------
build_k8s() {
    local t0 gomod tc mod_dir stage ver minor major date b staging_mods m
    t0=$(date +%s)
    log "kubernetes ${K8S_VERSION}: resolving release go.mod"
    gomod=$(gomod_of "k8s.io/kubernetes@${K8S_VERSION}")

    ver="${K8S_VERSION#v}"
    major="${ver%%.*}"
    minor="${ver#*.}"; minor="${minor%%.*}"
    local patch="${ver#*.*.}"
    [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]] \
        || die "cannot parse K8S_VERSION=${K8S_VERSION}"
    local staging_ver="v0.${minor}.${patch}"

    # Staging modules: those the release replaces with ./staging/src/k8s.io/...
    staging_mods=$(awk '
        $2 == "=>" && $3 ~ /^\.\/staging\/src\/k8s\.io\// { print $1 }
        $1 == "replace" && $3 == "=>" && $4 ~ /^\.\/staging\/src\/k8s\.io\// { print $2 }
    ' "$gomod" | sort -u)
    [[ -n "$staging_mods" ]] || die "no staging modules found in ${gomod}"
    log "kubernetes: $(wc -w <<<"$staging_mods") staging modules -> ${staging_ver}"

    tc=$(pick_toolchain "$gomod")
    log "kubernetes: GOTOOLCHAIN=${tc}"

    mod_dir="${WORK}/k8s-wrapper"
    mkdir -p "$mod_dir"
    {
        echo "module plinth.test/k8s-components"
        echo
        copy_header "$gomod"
        echo
        echo "require k8s.io/kubernetes ${K8S_VERSION}"
        echo
        echo "replace ("
        for m in $staging_mods; do
            echo "	${m} => ${m} ${staging_ver}"
        done
        echo ")"
    } >"${mod_dir}/go.mod"

    local -a pkgs=()
    for b in "${K8S_BINS[@]}"; do
        pkgs+=("k8s.io/kubernetes/cmd/${b}")
    done

    log "kubernetes: resolving module graph (go get)"
    (cd "$mod_dir" && GOTOOLCHAIN="$tc" "${GO}" get "${pkgs[@]/%/@${K8S_VERSION}}") \
        || die "kubernetes: go get failed"

    date=$(build_date "$gomod")
    local -a ld=(-s -w)
    local pkgpath
    for pkgpath in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        if ! (cd "$mod_dir" && GOTOOLCHAIN="$tc" "${GO}" list "$pkgpath" >/dev/null 2>&1); then
            log "kubernetes: ${pkgpath} not in this release, skipping its version ldflags"
            continue
        fi
        ld+=(
            -X "'${pkgpath}.gitVersion=${K8S_VERSION}'"
            -X "'${pkgpath}.gitMajor=${major}'"
            -X "'${pkgpath}.gitMinor=${minor}'"
            -X "'${pkgpath}.gitCommit=unknown'"
            -X "'${pkgpath}.gitTreeState=archive'"
            -X "'${pkgpath}.buildDate=${date}'"
        )
    done

    new_stage "k8s-${K8S_VERSION}"
    stage="$STAGE"
    log "kubernetes: compiling ${K8S_BINS[*]} (this is the slow part)"
    (cd "$mod_dir" && GOTOOLCHAIN="$tc" "${GO}" build -trimpath -buildvcs=false \
        -tags "selinux,notest,grpcnotrace" \
        -ldflags "${ld[*]}" \
        -o "${stage}/bin/" "${pkgs[@]}") \
        || die "kubernetes: go build failed"

    for b in "${K8S_BINS[@]}"; do
        bin_ok "${stage}/bin/${b}" || die "kubernetes: built ${b} does not run --version"
    done
    install_stage "$stage" "$K8S_DIR"
    log "kubernetes ${K8S_VERSION}: done in $(elapsed "$t0")"
}

# ---------------------------------------------------------------------------
# etcd
# ---------------------------------------------------------------------------
build_etcd() {
    local t0 gomod tc mod_dir stage
    t0=$(date +%s)
    log "etcd ${ETCD_VERSION}: resolving release go.mod"
    gomod=$(gomod_of "go.etcd.io/etcd/server/v3@${ETCD_VERSION}")

    tc=$(pick_toolchain "$gomod")
    log "etcd: GOTOOLCHAIN=${tc}"

    mod_dir="${WORK}/etcd-wrapper"
    mkdir -p "$mod_dir"
    {
        echo "module plinth.test/etcd-components"
        echo
        copy_header "$gomod"
        echo
        echo "require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"
    } >"${mod_dir}/go.mod"

    # Sibling modules (api/v3, client/v3, client/pkg/v3, pkg/v3) come in at the
    # versions the release's go.mod requires (same tag) through MVS.
    log "etcd: resolving module graph (go get)"
    (cd "$mod_dir" && GOTOOLCHAIN="$tc" "${GO}" get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}") \
        || die "etcd: go get failed"

    local -a ld=(-s -w -X "'go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}-modproxy'")

    new_stage "etcd-${ETCD_VERSION}"
    stage="$STAGE"
    log "etcd: compiling"
    (cd "$mod_dir" && GOTOOLCHAIN="$tc" "${GO}" build -trimpath -buildvcs=false \
        -ldflags "${ld[*]}" \
        -o "${stage}/bin/etcd" "go.etcd.io/etcd/server/v3") \
        || die "etcd: go build failed"

    bin_ok "${stage}/bin/etcd" || die "etcd: built binary does not run --version"
    install_stage "$stage" "$ETCD_DIR"
    log "etcd ${ETCD_VERSION}: done in $(elapsed "$t0")"
}

# ---------------------------------------------------------------------------
# kubernetes-csi commands (external-snapshotter, external-resizer, external-provisioner)
# ---------------------------------------------------------------------------

# build_csi_cmds NAME MODULE VERSION STAGE [EXTRA_MODULE...] -- CMD...: a wrapper module that
# requires MODULE@VERSION (and each EXTRA_MODULE@VERSION, so MVS cannot pick an older copy of a
# sibling module the release's go.mod names), `go build` of MODULE/cmd/CMD into STAGE/bin/CMD,
# with main.version set as the release's Makefile sets it.
build_csi_cmds() {
    local name="$1" module="$2" version="$3" stage="$4"
    shift 4
    local -a extra=() cmds=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do extra+=("$1"); shift; done
    shift
    cmds=("$@")
    local gomod tc mod_dir m c
    log "${name} ${version}: resolving release go.mod"
    gomod=$(gomod_of "${module}@${version}")
    tc=$(pick_toolchain "$gomod")
    log "${name}: GOTOOLCHAIN=${tc}"
    mod_dir="${WORK}/${name}-wrapper"
    mkdir -p "$mod_dir"
    {
        echo "module plinth.test/${name}"
        echo
        copy_header "$gomod"
        echo
        echo "require ${module} ${version}"
        for m in "${extra[@]}"; do
            echo "require ${m} ${version}"
        done
    } >"${mod_dir}/go.mod"
    log "${name}: resolving module graph (go get)"
    (cd "$mod_dir" && GOTOOLCHAIN="$tc" "${GO}" get "${module}@${version}" "${extra[@]/%/@${version}}") \
        || die "${name}: go get failed"
    for c in "${cmds[@]}"; do
        log "${name}: compiling ${c}"
        (cd "$mod_dir" && GOTOOLCHAIN="$tc" "${GO}" build -trimpath -buildvcs=false \
            -ldflags "-s -w -X main.version=${version}" \
            -o "${stage}/bin/${c}" "${module}/cmd/${c}") \
            || die "${name}: go build of ${c} failed"
        bin_ok "${stage}/bin/${c}" || die "${name}: built ${c} does not run --version"
    done
}

build_snapshotter() {
    local t0 stage client_dir
    t0=$(date +%s)
    new_stage "external-snapshotter-${SNAPSHOTTER_VERSION}"
    stage="$STAGE"
    # The release's go.mod names an older client/v8; the CRDs and the binaries must agree, so
    # both come from the same client release.
    build_csi_cmds external-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 \
        "${SNAPSHOTTER_VERSION}" "$stage" github.com/kubernetes-csi/external-snapshotter/client/v8 \
        -- "${SNAPSHOTTER_BINS[@]}"
    client_dir=$(cd "${WORK}" && GOTOOLCHAIN=local "${GO}" mod download -json \
        "github.com/kubernetes-csi/external-snapshotter/client/v8@${SNAPSHOTTER_VERSION}" \
        | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
    [[ -d "${client_dir}/config/crd" ]] || die "external-snapshotter: no config/crd in client/v8 (${client_dir})"
    mkdir -p "${stage}/crd"
    cp -- "${client_dir}"/config/crd/*.yaml "${stage}/crd/"
    rm -f -- "${stage}/crd/kustomization.yaml"
    chmod -R u+w,a+rX -- "${stage}/crd"
    install_stage "$stage" "$SNAPSHOTTER_DIR"
    log "external-snapshotter ${SNAPSHOTTER_VERSION}: done in $(elapsed "$t0")"
}

build_resizer() {
    local t0 stage
    t0=$(date +%s)
    new_stage "external-resizer-${RESIZER_VERSION}"
    stage="$STAGE"
    build_csi_cmds external-resizer github.com/kubernetes-csi/external-resizer/v2 "${RESIZER_VERSION}" "$stage" \
        -- csi-resizer
    install_stage "$stage" "$RESIZER_DIR"
    log "external-resizer ${RESIZER_VERSION}: done in $(elapsed "$t0")"
}

build_provisioner() {
    local t0 stage
    t0=$(date +%s)
    new_stage "external-provisioner-${PROVISIONER_VERSION}"
    stage="$STAGE"
    build_csi_cmds external-provisioner github.com/kubernetes-csi/external-provisioner/v6 "${PROVISIONER_VERSION}" \
        "$stage" -- csi-provisioner
    install_stage "$stage" "$PROVISIONER_DIR"
    log "external-provisioner ${PROVISIONER_VERSION}: done in $(elapsed "$t0")"
}

# ---------------------------------------------------------------------------
# Main: re-check under the lock (someone else may have built), build missing.
# ---------------------------------------------------------------------------
if k8s_cached; then
    log "kubernetes ${K8S_VERSION}: cached"
else
    build_k8s
fi

if etcd_cached; then
    log "etcd ${ETCD_VERSION}: cached"
else
    build_etcd
fi

if snapshotter_cached; then
    log "external-snapshotter ${SNAPSHOTTER_VERSION}: cached"
else
    build_snapshotter
fi

if resizer_cached; then
    log "external-resizer ${RESIZER_VERSION}: cached"
else
    build_resizer
fi

if provisioner_cached; then
    log "external-provisioner ${PROVISIONER_VERSION}: cached"
else
    build_provisioner
fi

k8s_cached || die "kubernetes binaries missing after build"
etcd_cached || die "etcd binary missing after build"
snapshotter_cached || die "external-snapshotter binaries or CRDs missing after build"
resizer_cached || die "csi-resizer missing after build"
provisioner_cached || die "csi-provisioner missing after build"

log "all components ready in $(elapsed "$SCRIPT_START")"
print_paths
