//! Snapshots, restores, clones and VolumeAttributesClasses with real pods on the real node:
//! the cluster first gets what an admin installs for snapshots (the external-snapshotter CRDs and
//! the common snapshot-controller v8.7.0, from the Go module proxy), then plinth from deploy/ and
//! deploy/snapshots/ (`plinth_tests::deployed`). plinth's own controller does the driver side of
//! snapshots; its node plugin takes them (with the source mounted in a running pod: frozen for
//! the copy) and restores them.
//!
//! Restoring onto a node that does not hold the data needs two nodes: tests/tests/cluster.rs.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::CSINode;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use plinth_cluster::snapshot_api::{VolumeSnapshot, VolumeSnapshotContent};
use plinth_tests::deployed::{Cluster, MIB, NS, handle, start};
use plinth_tests::k8s;
use plinth_tests::node::NODE_NAME;
use serde_json::json;

fn snapshot_images(cluster: &Cluster) -> Vec<PathBuf> {
    std::fs::read_dir(cluster.data_dir.join("pool").join("snapshots"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .collect()
}

fn snapshot_image(cluster: &Cluster, id: &str) -> PathBuf {
    cluster.data_dir.join("pool").join("snapshots").join(format!("{id}.img"))
}

/// Bytes the image file really takes on the host (thin images are sparse).
fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

async fn create_snapshot(cluster: &Cluster, name: &str, claim: &str, class: &str) {
    k8s::apply(
        &cluster.client,
        &json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"volumeSnapshotClassName": class, "source": {"persistentVolumeClaimName": claim}}
        }),
    )
    .await;
}

fn snapshots(cluster: &Cluster) -> Api<VolumeSnapshot> {
    Api::namespaced(cluster.client.clone(), NS)
}

fn is_ready(snapshot: &VolumeSnapshot) -> bool {
    snapshot.status.as_ref().and_then(|s| s.ready_to_use) == Some(true)
}

/// Waits for the VolumeSnapshot to be readyToUse; returns its bound content.
async fn ready_content(cluster: &Cluster, name: &str, within: Duration) -> VolumeSnapshotContent {
    let contents: Api<VolumeSnapshotContent> = Api::all(cluster.client.clone());
    cluster
        .wait(&format!("VolumeSnapshot {name} readyToUse"), within, async || {
            let snapshot = snapshots(cluster).get_opt(name).await.ok()??;
            let content_name = snapshot.status.as_ref()?.bound_volume_snapshot_content_name.clone()?;
            if !is_ready(&snapshot) {
                return None;
            }
            contents.get_opt(&content_name).await.ok()?
        })
        .await
}

fn snapshot_id(content: &VolumeSnapshotContent) -> String {
    content.status.as_ref().and_then(|s| s.snapshot_handle.clone()).expect("snapshotHandle")
}

async fn delete_snapshot(cluster: &Cluster, name: &str) {
    snapshots(cluster).delete(name, &DeleteParams::default()).await.expect("delete VolumeSnapshot");
    cluster
        .wait(&format!("VolumeSnapshot {name} gone"), Duration::from_secs(90), async || {
            snapshots(cluster).get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, containerd, a kubelet and the snapshot-controller: tests/run-all.sh runs it"]
async fn snapshots_restores_clones_and_attribute_classes_on_a_real_node() {
    let cluster = start(true).await;
    let applied = cluster.deploy().await;
    assert!(applied.contains("volumesnapshotclass.snapshot.storage.k8s.io/plinth serverside-applied"), "{applied}");
    let csinodes: Api<CSINode> = Api::all(cluster.client.clone());
    cluster
        .wait("kubelet registered plinth", Duration::from_secs(120), async || {
            let node = csinodes.get_opt(NODE_NAME).await.ok()??;
            node.spec.drivers.iter().any(|d| d.name == "plinth.csi.dev").then_some(())
        })
        .await;
    cluster.node_plugin().await;
    k8s::apply(
        &cluster.client,
        &json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": {"name": "plinth-retain"}, "driver": "plinth.csi.dev", "deletionPolicy": "Retain"
        }),
    )
    .await;
    k8s::apply(&cluster.client, &json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttributesClass",
        "metadata": {"name": "plinth-thick"}, "driverName": "plinth.csi.dev", "parameters": {"provisioning": "thick"}
    }))
    .await;

    scenario_snapshot_restore_clone(&cluster).await;
    scenario_retain(&cluster).await;
    scenario_agent_down(&cluster).await;
    scenario_thin_to_thick(&cluster).await;
    scenario_cleanup(&cluster).await;
}

/// A pod writes data; a snapshot is taken while it runs (the filesystem frozen for the copy);
/// the pod then changes the data. A larger claim restored from the snapshot has the snapshot's
/// data and the larger filesystem; a clone of the claim has its current data. Deleting the
/// snapshot (class policy Delete) removes it from the node's pool; the restore keeps its data.
async fn scenario_snapshot_restore_clone(cluster: &Cluster) {
    cluster.create_claim("source", "plinth", 64 * MIB, false).await;
    let writer = "dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null && sha256sum /data/blob > /data/sum \
                  && sync && echo WRITTEN; while [ ! -f /tmp/go ]; do sleep 0.2; done; echo later > /data/later && sync \
                  && echo CHANGED; sleep 3600";
    cluster.create_pod("writer", "source", writer, json!({})).await;
    cluster.running("writer").await;
    cluster.log_contains("writer", "WRITTEN").await;
    let before = snapshot_images(cluster).len();
    create_snapshot(cluster, "snap", "source", "plinth").await;
    let content = ready_content(cluster, "snap", Duration::from_secs(90)).await;
    let id = snapshot_id(&content);
    assert!(snapshot_image(cluster, &id).exists(), "the snapshot is in the node's pool");
    assert_eq!(snapshot_images(cluster).len(), before + 1);
    assert_eq!(content.status.as_ref().unwrap().restore_size, Some((64 * MIB) as i64));
    cluster.exec("writer", "touch /tmp/go");
    cluster.log_contains("writer", "CHANGED").await;

    let from_snapshot = json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"});
    cluster.create_claim_with("restored", "plinth", 128 * MIB, json!({"dataSource": from_snapshot})).await;
    let reader = "sha256sum -c /data/sum && echo VERIFIED; ls /data; df -B1 /data | tail -1 | awk '{print \"SIZE \" $2}'; sleep 3600";
    cluster.create_pod("restore-reader", "restored", reader, json!({})).await;
    cluster.running("restore-reader").await;
    let log = cluster.log_contains("restore-reader", "SIZE ").await;
    assert!(log.contains("/data/blob: OK") && log.contains("VERIFIED"), "the restore has the data:\n{log}");
    assert!(!log.contains("later"), "the restore is the snapshot, not the volume now:\n{log}");
    let size: u64 = log.lines().find_map(|l| l.strip_prefix("SIZE ")).unwrap().trim().parse().unwrap();
    assert!(size > 100 * MIB, "the filesystem grew to the larger claim on its first stage: {size}");

    let from_claim = json!({"kind": "PersistentVolumeClaim", "name": "source"});
    cluster.create_claim_with("cloned", "plinth", 64 * MIB, json!({"dataSource": from_claim})).await;
    cluster
        .create_pod(
            "clone-reader",
            "cloned",
            "sha256sum -c /data/sum && cat /data/later && echo CLONED; sleep 3600",
            json!({}),
        )
        .await;
    cluster.running("clone-reader").await;
    let log = cluster.log_contains("clone-reader", "CLONED").await;
    assert!(log.contains("/data/blob: OK") && log.contains("later"), "the clone is the claim as it is now:\n{log}");
    let pv = cluster.bound_pv("cloned").await;
    assert!(cluster.pool_images().iter().any(|p| p.to_string_lossy().contains(&handle(&pv))));

    delete_snapshot(cluster, "snap").await;
    cluster
        .wait("the snapshot removed from the node's pool", Duration::from_secs(60), async || {
            (!snapshot_image(cluster, &id).exists()).then_some(())
        })
        .await;
    let contents: Api<VolumeSnapshotContent> = Api::all(cluster.client.clone());
    assert!(contents.get_opt(&content.name_any()).await.unwrap().is_none(), "Delete removes the content");
    cluster.delete_pod("restore-reader").await;
    cluster
        .create_pod("restore-again", "restored", "sha256sum -c /data/sum && echo STILL; sleep 3600", json!({}))
        .await;
    cluster.running("restore-again").await;
    cluster.log_contains("restore-again", "STILL").await;
    cluster.delete_pod("restore-again").await;
    cluster.delete_pod("clone-reader").await;
}

/// Retain: deleting the VolumeSnapshot keeps its content and the snapshot on the node.
async fn scenario_retain(cluster: &Cluster) {
    create_snapshot(cluster, "kept", "source", "plinth-retain").await;
    let content = ready_content(cluster, "kept", Duration::from_secs(90)).await;
    let id = snapshot_id(&content);
    delete_snapshot(cluster, "kept").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let contents: Api<VolumeSnapshotContent> = Api::all(cluster.client.clone());
    assert!(contents.get_opt(&content.name_any()).await.unwrap().is_some(), "Retain keeps the content");
    assert!(snapshot_image(cluster, &id).exists(), "Retain keeps the snapshot on the node");
}

/// The node agent is down (its DaemonSet pod gone) while a snapshot is asked for: the snapshot
/// waits, not failed; once the agent is back it completes.
async fn scenario_agent_down(cluster: &Cluster) {
    let daemonsets: Api<DaemonSet> = Api::namespaced(cluster.client.clone(), "plinth-system");
    let plugins: Api<Pod> = Api::namespaced(cluster.client.clone(), "plinth-system");
    let off = json!({"spec": {"template": {"spec": {"nodeSelector": {"plinth.test/agent": "off"}}}}});
    daemonsets.patch("plinth-node", &PatchParams::default(), &Patch::Merge(&off)).await.unwrap();
    cluster
        .wait("the plinth node pod gone", Duration::from_secs(120), async || {
            let list = plugins.list(&ListParams::default().labels("app.kubernetes.io/name=plinth-node")).await.ok()?;
            list.items.is_empty().then_some(())
        })
        .await;
    create_snapshot(cluster, "while-down", "source", "plinth").await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let waiting = snapshots(cluster).get("while-down").await.unwrap();
    assert!(!is_ready(&waiting), "no agent, no snapshot yet: {:?}", waiting.status);
    let error = waiting.status.as_ref().and_then(|s| s.error.as_ref()).and_then(|e| e.message.clone());
    assert_eq!(error, None, "waiting for the node is not an error");
    let on = json!({"spec": {"template": {"spec": {"nodeSelector": null}}}});
    daemonsets.patch("plinth-node", &PatchParams::default(), &Patch::Merge(&on)).await.unwrap();
    cluster.node_plugin().await;
    let content = ready_content(cluster, "while-down", Duration::from_secs(120)).await;
    assert!(snapshot_image(cluster, &snapshot_id(&content)).exists());
    delete_snapshot(cluster, "while-down").await;
}

/// thin → thick through a VolumeAttributesClass change on a claim in use: the image on the host
/// becomes fully allocated, the claim's status says so.
async fn scenario_thin_to_thick(cluster: &Cluster) {
    cluster.create_claim("growing", "plinth", 64 * MIB, false).await;
    cluster
        .create_pod("thick-user", "growing", "echo hello > /data/f && sync && echo READY; sleep 3600", json!({}))
        .await;
    cluster.running("thick-user").await;
    cluster.log_contains("thick-user", "READY").await;
    let pv = cluster.bound_pv("growing").await;
    let image = cluster.data_dir.join("pool").join(format!("{}.img", handle(&pv)));
    assert!(allocated(&image) < 32 * MIB, "thin to begin with: {} bytes allocated", allocated(&image));
    let claims: Api<PersistentVolumeClaim> = cluster.claims();
    let to_thick = json!({"spec": {"volumeAttributesClassName": "plinth-thick"}});
    claims.patch("growing", &PatchParams::default(), &Patch::Merge(&to_thick)).await.unwrap();
    cluster
        .wait("the claim modified to plinth-thick", Duration::from_secs(90), async || {
            let status = claims.get("growing").await.ok()?.status?;
            (status.current_volume_attributes_class_name.as_deref() == Some("plinth-thick")
                && status.modify_volume_status.is_none())
            .then_some(())
        })
        .await;
    assert!(allocated(&image) >= 64 * MIB, "thick: {} bytes allocated", allocated(&image));
    assert_eq!(cluster.exec("thick-user", "cat /data/f"), "hello\n", "the data is untouched");
    cluster.delete_pod("thick-user").await;
}

/// Everything goes: pods, claims, snapshots; no loop device or mount is left.
async fn scenario_cleanup(cluster: &Cluster) {
    cluster.delete_pod("writer").await;
    for claim in ["source", "restored", "cloned", "growing"] {
        cluster.claims().delete(claim, &DeleteParams::default()).await.unwrap();
    }
    cluster
        .wait("the claims' images gone", Duration::from_secs(120), async || {
            cluster.pool_images().is_empty().then_some(())
        })
        .await;
    assert!(cluster.pool_devices().is_empty(), "{:?}", cluster.pool_devices());
}
