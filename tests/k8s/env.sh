# Sourced by tests/run-all.sh and the bench scripts: builds (or finds cached) the Kubernetes
# components and the standard CSI infrastructure beside them (snapshot-controller and the snapshot
# CRDs, the csi-snapshotter, csi-resizer and csi-provisioner sidecars) and exports where they are.
# Needs CACHE set (the cache root).
mapfile -t components < <(PLINTH_TEST_CACHE=$CACHE tests/k8s/build-components.sh)
[ ${#components[@]} -eq 11 ] || { echo "build-components.sh printed ${#components[@]} paths, expected 11" >&2; exit 1; }
export PLINTH_KUBE_APISERVER=${components[0]} PLINTH_KUBE_CONTROLLER_MANAGER=${components[1]}
export PLINTH_KUBE_SCHEDULER=${components[2]} PLINTH_KUBELET=${components[3]} PLINTH_KUBECTL=${components[4]}
export PLINTH_ETCD=${components[5]}
export PLINTH_SNAPSHOT_CONTROLLER=${components[6]} PLINTH_CSI_SNAPSHOTTER=${components[7]}
export PLINTH_SNAPSHOT_CRDS=${components[8]}
export PLINTH_CSI_RESIZER=${components[9]} PLINTH_CSI_PROVISIONER=${components[10]}
PLINTH_K8S_VERSION=$("$PLINTH_KUBE_APISERVER" --version | awk '{print $2}')
export PLINTH_K8S_VERSION
