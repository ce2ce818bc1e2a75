//! deploy/ and the cluster half, tested on a real control plane (etcd, kube-apiserver,
//! kube-controller-manager) built from the Go module proxy.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::PostParams;
use plinth_tests::k8s::{self, ControlPlane, Options};
use plinth_tests::require_control_plane;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Kubernetes binaries: tests/run-all.sh runs it"]
async fn apiserver_reports_its_version() {
    let binaries = require_control_plane!();
    let plane = ControlPlane::start(&binaries, Options::default()).await;
    let info = plane.client().await.apiserver_version().await.expect("version");
    assert_eq!(info.git_version, binaries.version, "the apiserver we built is the one running");
}

/// What each plinth component must be allowed to do, and a few things it must not.
const CONTROLLER: (&str, &str) = ("plinth-system", "plinth-controller");
const NODE: (&str, &str) = ("plinth-system", "plinth-node");

type Check = (&'static str, &'static str, &'static str, Option<&'static str>);

const CONTROLLER_NEEDS: &[Check] = &[
    ("list", "", "persistentvolumeclaims", None),
    ("watch", "", "persistentvolumeclaims", None),
    ("patch", "", "persistentvolumeclaims", Some("team-a")),
    ("patch", "", "persistentvolumeclaims/status", Some("team-a")),
    ("create", "", "persistentvolumes", None),
    ("delete", "", "persistentvolumes", None),
    ("patch", "", "persistentvolumes", None),
    ("patch", "", "persistentvolumes/status", None),
    ("list", "", "nodes", None),
    ("create", "", "events", Some("team-a")),
    ("create", "events.k8s.io", "events", Some("team-a")),
    ("list", "storage.k8s.io", "storageclasses", None),
    ("list", "storage.k8s.io", "csinodes", None),
    ("list", "storage.k8s.io", "csistoragecapacities", None),
    ("create", "plinth.csi.dev", "volumes", None),
    ("delete", "plinth.csi.dev", "volumes", None),
    ("watch", "plinth.csi.dev", "volumes", None),
    ("create", "plinth.csi.dev", "snapshots", None),
    ("delete", "plinth.csi.dev", "groupsnapshots", None),
    ("list", "storage.k8s.io", "volumeattributesclasses", None),
    ("create", "coordination.k8s.io", "leases", Some("plinth-system")),
    ("update", "coordination.k8s.io", "leases", Some("plinth-system")),
];
const CONTROLLER_MUST_NOT: &[Check] = &[
    ("delete", "", "nodes", None),
    ("get", "", "secrets", None),
    ("list", "", "secrets", Some("plinth-system")),
    ("create", "", "pods", Some("team-a")),
    ("update", "coordination.k8s.io", "leases", Some("kube-system")),
    ("update", "plinth.csi.dev", "volumes/status", None),
    ("create", "storage.k8s.io", "csistoragecapacities", Some("plinth-system")),
    ("update", "plinth.csi.dev", "snapshots/status", None),
];
/// What the snapshot add-on (deploy/snapshots/) grants the controller, and what it still must not.
const CONTROLLER_SNAPSHOT_NEEDS: &[Check] = &[
    ("watch", "snapshot.storage.k8s.io", "volumesnapshotcontents", None),
    ("patch", "snapshot.storage.k8s.io", "volumesnapshotcontents", None),
    ("patch", "snapshot.storage.k8s.io", "volumesnapshotcontents/status", None),
    ("get", "snapshot.storage.k8s.io", "volumesnapshots", Some("team-a")),
    ("get", "snapshot.storage.k8s.io", "volumesnapshotclasses", None),
    ("patch", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", None),
    ("get", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", None),
];
const CONTROLLER_SNAPSHOT_MUST_NOT: &[Check] = &[
    ("create", "snapshot.storage.k8s.io", "volumesnapshotcontents", None),
    ("delete", "snapshot.storage.k8s.io", "volumesnapshots", Some("team-a")),
    ("patch", "snapshot.storage.k8s.io", "volumesnapshots", Some("team-a")),
    ("delete", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", None),
];
const NODE_NEEDS: &[Check] = &[
    ("get", "", "nodes", None),
    ("create", "", "events", Some("team-a")),
    ("list", "storage.k8s.io", "storageclasses", None),
    ("watch", "plinth.csi.dev", "volumes", None),
    ("patch", "plinth.csi.dev", "volumes", None),
    ("update", "plinth.csi.dev", "volumes/status", None),
    ("watch", "plinth.csi.dev", "snapshots", None),
    ("patch", "plinth.csi.dev", "groupsnapshots", None),
    ("update", "plinth.csi.dev", "snapshots/status", None),
    ("create", "storage.k8s.io", "csistoragecapacities", Some("plinth-system")),
    ("update", "storage.k8s.io", "csistoragecapacities", Some("plinth-system")),
    ("delete", "storage.k8s.io", "csistoragecapacities", Some("plinth-system")),
];
const NODE_MUST_NOT: &[Check] = &[
    ("delete", "", "nodes", None),
    ("list", "", "secrets", None),
    ("create", "", "persistentvolumes", None),
    ("create", "plinth.csi.dev", "volumes", None),
    ("delete", "plinth.csi.dev", "volumes", None),
    ("create", "plinth.csi.dev", "snapshots", None),
    ("get", "snapshot.storage.k8s.io", "volumesnapshotcontents", None),
    ("create", "storage.k8s.io", "csistoragecapacities", Some("default")),
    ("list", "", "pods", None),
];

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Kubernetes binaries: tests/run-all.sh runs it"]
async fn deploy_manifests_apply_and_rbac_is_least_privilege() {
    let binaries = require_control_plane!();
    let plane = ControlPlane::start(&binaries, Options::default()).await;
    let client = plane.client().await;

    // deploy/ as a user applies it, to a cluster without the snapshot CRDs (most clusters).
    let deploy = repo().join("deploy");
    let applied = k8s::kubectl(&binaries, &plane, &["apply", "--server-side", "-k", deploy.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("kubectl apply -k deploy/ on a cluster without snapshot CRDs: {e}"));
    assert!(applied.contains("customresourcedefinition.apiextensions.k8s.io/volumes.plinth.csi.dev"), "{applied}");
    k8s::wait_crd_established(&client, "volumes.plinth.csi.dev").await;
    let objects = k8s::kustomize(&binaries, &deploy);
    let kinds: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for expected in ["CSIDriver", "StorageClass", "CustomResourceDefinition", "DaemonSet", "Deployment"] {
        assert!(kinds.contains(&expected), "deploy/ has a {expected}");
    }
    assert!(!kinds.contains(&"VolumeSnapshotClass"), "the snapshot class is an add-on (deploy/snapshots/)");
    let rules = serde_json::to_string(&objects).unwrap();
    assert!(!rules.contains("snapshot.storage.k8s.io"), "RBAC for snapshot objects is in the add-on too");

    // The snapshot add-on, once the cluster has the external-snapshotter's CRDs (the real ones,
    // from the client module of the snapshot-controller release the tests run).
    let snapshots = repo().join("deploy/snapshots");
    let refused = k8s::kubectl(&binaries, &plane, &["apply", "--server-side", "-k", snapshots.to_str().unwrap()]);
    assert!(refused.is_err(), "without the CRDs the add-on cannot apply");
    let crds = binaries.snapshot_crds.clone().expect("PLINTH_SNAPSHOT_CRDS (tests/k8s/build-components.sh)");
    for entry in std::fs::read_dir(&crds).unwrap() {
        for object in k8s::read_manifests(&entry.unwrap().path()) {
            let applied = k8s::apply(&client, &object).await;
            k8s::wait_crd_established(&client, applied.metadata.name.as_deref().unwrap()).await;
        }
    }
    k8s::kubectl(&binaries, &plane, &["apply", "--server-side", "-k", snapshots.to_str().unwrap()])
        .unwrap_or_else(|e| panic!("kubectl apply -k deploy/snapshots/: {e}"));
    let class = k8s::kubectl(&binaries, &plane, &["get", "volumesnapshotclass", "plinth", "-o", "jsonpath={.driver}"]);
    assert_eq!(class.unwrap(), "plinth.csi.dev");
    let group_class =
        k8s::kubectl(&binaries, &plane, &["get", "volumegroupsnapshotclass", "plinth", "-o", "jsonpath={.driver}"]);
    assert_eq!(group_class.unwrap(), "plinth.csi.dev");
    for (verb, group, resource, ns) in CONTROLLER_SNAPSHOT_NEEDS {
        assert!(
            k8s::allowed(&client, CONTROLLER, verb, group, resource, *ns).await,
            "with the add-on, plinth-controller must be allowed to {verb} {group}/{resource}"
        );
    }
    for (verb, group, resource, ns) in CONTROLLER_SNAPSHOT_MUST_NOT {
        assert!(
            !k8s::allowed(&client, CONTROLLER, verb, group, resource, *ns).await,
            "plinth-controller must NOT be allowed to {verb} {group}/{resource}"
        );
    }

    // Everything reads back, with the one image reference substituted.
    for object in &objects {
        let read = k8s::apply(&client, object).await;
        assert_eq!(read.metadata.name.as_deref(), object["metadata"]["name"].as_str());
        if let Some(containers) = read.data.pointer("/spec/template/spec/containers").and_then(|c| c.as_array()) {
            for container in containers {
                assert_eq!(container["image"], "ghcr.io/plinth-csi/plinth:0.1.0", "{}", object["metadata"]["name"]);
            }
        }
    }
    let driver: Api<k8s_openapi::api::storage::v1::CSIDriver> = Api::all(client.clone());
    let spec = driver.get("plinth.csi.dev").await.unwrap().spec;
    assert_eq!(spec.attach_required, Some(false));
    assert_eq!(spec.fs_group_policy.as_deref(), Some("File"));
    assert_eq!(spec.storage_capacity, Some(true));
    assert_eq!(spec.pod_info_on_mount, Some(true));
    let classes: Api<k8s_openapi::api::storage::v1::StorageClass> = Api::all(client.clone());
    let default = classes.get("plinth").await.unwrap();
    assert_eq!(default.volume_binding_mode.as_deref(), Some("WaitForFirstConsumer"));
    assert_eq!(default.allow_volume_expansion, Some(true));
    assert_eq!(default.reclaim_policy.as_deref(), Some("Delete"));

    for (account, needs, must_not) in
        [(CONTROLLER, CONTROLLER_NEEDS, CONTROLLER_MUST_NOT), (NODE, NODE_NEEDS, NODE_MUST_NOT)]
    {
        for (verb, group, resource, ns) in needs {
            assert!(
                k8s::allowed(&client, account, verb, group, resource, *ns).await,
                "{} must be allowed to {verb} {group}/{resource} in {ns:?}",
                account.1
            );
        }
        for (verb, group, resource, ns) in must_not {
            assert!(
                !k8s::allowed(&client, account, verb, group, resource, *ns).await,
                "{} must NOT be allowed to {verb} {group}/{resource} in {ns:?}",
                account.1
            );
        }
    }

    // And for real, through impersonation.
    let controller = plane.client_as_service_account(CONTROLLER.0, CONTROLLER.1).await;
    let claims: Api<PersistentVolumeClaim> = Api::all(controller.clone());
    claims.list(&Default::default()).await.expect("the controller lists claims");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(controller.clone(), "plinth-system");
    let denied = secrets.list(&Default::default()).await.unwrap_err();
    assert!(matches!(denied, kube::Error::Api(ref e) if e.code == 403), "{denied:?}");
    let node = plane.client_as_service_account(NODE.0, NODE.1).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(node.clone());
    let denied = nodes.delete("some-node", &Default::default()).await.unwrap_err();
    assert!(matches!(denied, kube::Error::Api(ref e) if e.code == 403), "{denied:?}");
    let as_node: Api<plinth_cluster::crd::Volume> = Api::all(node);
    as_node.list(&Default::default()).await.expect("the node agent lists Volumes");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Kubernetes binaries: tests/run-all.sh runs it"]
async fn pv_controller_binds_a_preprovisioned_volume() {
    let binaries = require_control_plane!();
    let plane = ControlPlane::start(&binaries, Options { controller_manager: true, scheduler: false }).await;
    let client = plane.client().await;
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": "pre-provisioned"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "manual",
            "persistentVolumeReclaimPolicy": "Retain",
            "csi": {"driver": "plinth.csi.dev", "volumeHandle": "vol-0123456789abcdef0123456789abcdef", "fsType": "ext4"}
        }
    }))
    .unwrap();
    let pvc: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "claim", "namespace": "default"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "manual",
            "resources": {"requests": {"storage": "1Gi"}}
        }
    }))
    .unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    pvs.create(&PostParams::default(), &pv).await.expect("create PV");
    pvcs.create(&PostParams::default(), &pvc).await.expect("create PVC");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let claim = pvcs.get("claim").await.unwrap();
        let volume = pvs.get("pre-provisioned").await.unwrap();
        let claim_phase = claim.status.and_then(|s| s.phase).unwrap_or_default();
        let volume_phase = volume.status.and_then(|s| s.phase).unwrap_or_default();
        if claim_phase == "Bound" && volume_phase == "Bound" {
            assert_eq!(claim.spec.unwrap().volume_name.as_deref(), Some("pre-provisioned"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not bound after 60 s (claim {claim_phase}, volume {volume_phase}):\n{}",
            plane.log_tail("kube-controller-manager")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
