//! Cluster mode on a real control plane: three simulated nodes (Node objects plus a
//! `plinth node` process each, with its own pool and socket), two leader-elected
//! `plinth controller` replicas, the real PV controller binding what plinth provisions. Every
//! plinth process acts through a kubeconfig that impersonates its service account, so deploy/'s
//! RBAC is exercised for real.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use plinth_proto::csi_v1 as csi;
use plinth_tests::k8s::{self, ControlPlane, Options};
use plinth_tests::*;
use serde_json::json;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

thread_local! {
    static PROBLEMS_DIR: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}
const MI: i64 = 1 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Fields drop in order: plinth processes first (while the API still answers), then the
/// sandbox (mounts, loop devices, files), then the control plane.
struct Cluster {
    controllers: Vec<Option<Plinth>>,
    nodes: BTreeMap<String, Plinth>,
    client: Client,
    sandbox: Sandbox,
    plane: ControlPlane,
}

impl Cluster {
    fn node_dir(&self, node: &str) -> PathBuf {
        self.sandbox.path().join(node)
    }
    fn node_socket(&self, node: &str) -> PathBuf {
        self.sandbox.path().join(format!("{node}.sock"))
    }

    fn start_node(&mut self, node: &str, pool: &str) {
        let kubeconfig = self.plane.kubeconfig_as_service_account("plinth-system", "plinth-node");
        let process = Plinth::start_at(
            &self.node_socket(node),
            &self.sandbox.root(),
            "node",
            &self.node_dir(node),
            &["--node-id", node, "--kubeconfig", kubeconfig.to_str().unwrap(), "--pool-capacity", pool],
            true,
        );
        self.nodes.insert(node.to_owned(), process);
    }

    fn start_controller(&mut self, index: usize) {
        let kubeconfig = self.plane.kubeconfig_as_service_account("plinth-system", "plinth-controller");
        let identity = format!("controller-{index}");
        let process = Plinth::start_at(
            &self.sandbox.path().join(format!("{identity}.sock")),
            &self.sandbox.root(),
            "controller",
            &self.sandbox.path().join(&identity),
            &[
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--leader-elect",
                "--lease-duration-seconds",
                "4",
                "--identity",
                &identity,
            ],
            false,
        );
        if self.controllers.len() <= index {
            self.controllers.resize_with(index + 1, || None);
        }
        self.controllers[index] = Some(process);
    }
}

async fn setup() -> Cluster {
    let binaries = plinth_tests::require_control_plane!();
    assert!(is_root(), "the cluster tests need root (loop devices, mounts): run tests/run-all.sh");
    let plane = ControlPlane::start(&binaries, Options { controller_manager: true, scheduler: false }).await;
    let client = plane.client().await;
    for object in k8s::kustomize(&binaries, &repo().join("deploy")) {
        let applied = k8s::apply(&client, &object).await;
        if object["kind"] == "CustomResourceDefinition" {
            k8s::wait_crd_established(&client, &applied.name_any()).await;
        }
    }
    for (name, binding, reclaim) in
        [("plinth-immediate", "Immediate", "Delete"), ("plinth-retain", "Immediate", "Retain")]
    {
        k8s::apply(
            &client,
            &json!({
                "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": name}, "provisioner": "plinth.csi.dev",
                "volumeBindingMode": binding, "reclaimPolicy": reclaim, "allowVolumeExpansion": true,
                "parameters": {"csi.storage.k8s.io/fstype": "ext4"}
            }),
        )
        .await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    for node in NODES {
        k8s::apply(&client, &json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node, "topology.plinth.csi.dev/node": node}}
        }))
        .await;
        let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        nodes.patch_status(node, &PatchParams::default(), &Patch::Merge(&ready)).await.unwrap();
    }
    let sandbox = Sandbox::new();
    let mut cluster = Cluster { plane, sandbox, client, nodes: BTreeMap::new(), controllers: Vec::new() };
    PROBLEMS_DIR.with(|d| *d.borrow_mut() = Some(cluster.sandbox.path().to_owned()));
    for (node, pool) in [("node-a", "2GiB"), ("node-b", "2GiB"), ("node-c", "256MiB")] {
        cluster.start_node(node, pool);
    }
    cluster.start_controller(0);
    cluster.start_controller(1);
    cluster
}

fn claim(name: &str, class: &str, bytes: i64, node: Option<&str>, block: bool) -> PersistentVolumeClaim {
    let mut annotations = serde_json::Map::new();
    if let Some(node) = node {
        annotations.insert("volume.kubernetes.io/selected-node".into(), json!(node));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "volumeMode": if block { "Block" } else { "Filesystem" },
            "resources": {"requests": {"storage": bytes.to_string()}}
        }
    }))
    .unwrap()
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            let problems = PROBLEMS_DIR.with(|d| d.borrow().clone()).map(|dir| {
                let mut out = String::new();
                for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let path = entry.path();
                    if path.extension().is_some_and(|e| e == "log") {
                        let text = std::fs::read_to_string(&path).unwrap_or_default();
                        for line in text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(15) {
                            out.push_str(&format!("{}: {line}\n", path.file_name().unwrap().to_string_lossy()));
                        }
                    }
                }
                out
            });
            panic!("timed out waiting for {what}\n{}", problems.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn bound_volume(client: &Client, name: &str) -> Option<PersistentVolume> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let claim = claims.get_opt(name).await.ok()??;
    if claim.status.as_ref()?.phase.as_deref() != Some("Bound") {
        return None;
    }
    let pv_name = claim.spec?.volume_name?;
    Api::<PersistentVolume>::all(client.clone()).get_opt(&pv_name).await.ok()?
}

fn pv_node(pv: &PersistentVolume) -> String {
    pv.spec.as_ref().unwrap().node_affinity.as_ref().unwrap().required.as_ref().unwrap().node_selector_terms[0]
        .match_expressions
        .as_ref()
        .unwrap()[0]
        .values
        .as_ref()
        .unwrap()[0]
        .clone()
}

fn handle(pv: &PersistentVolume) -> String {
    pv.spec.as_ref().unwrap().csi.as_ref().unwrap().volume_handle.clone()
}

fn image(cluster: &Cluster, node: &str, handle: &str) -> PathBuf {
    cluster.node_dir(node).join("pool").join(format!("{handle}.img"))
}

async fn events_for(client: &Client, claim: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let list = events.list(&ListParams::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(claim))
        .map(|e| format!("{}: {}", e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Acts as kubelet on `node`: stage + publish, write, unpublish, republish, read back.
async fn use_like_kubelet(cluster: &Cluster, node: &str, pv: &PersistentVolume) {
    let mut clients = Clients::connect(&cluster.node_socket(node)).await;
    let id = handle(pv);
    let block = pv.spec.as_ref().unwrap().volume_mode.as_deref() == Some("Block");
    let fs = pv.spec.as_ref().unwrap().csi.as_ref().unwrap().fs_type.clone().unwrap_or_default();
    let cap = if block { block_cap() } else { mount_cap(&fs) };
    let staging = cluster.sandbox.root().join(format!("staging-{id}"));
    let target = cluster.sandbox.root().join(format!("target-{id}"));
    clients.node.node_stage_volume(stage_request(&id, &staging, cap.clone())).await.expect("stage");
    let publish = publish_request(&id, &staging, &target, cap);
    clients.node.node_publish_volume(publish.clone()).await.expect("publish");
    let payload = format!("written through {node}");
    let read_back = |target: &Path| -> String {
        if block {
            let mut bytes = vec![0u8; payload.len()];
            use std::io::Read;
            std::fs::File::open(target).unwrap().read_exact(&mut bytes).unwrap();
            String::from_utf8_lossy(&bytes).into_owned()
        } else {
            std::fs::read_to_string(target.join("data")).unwrap()
        }
    };
    if block {
        use std::io::Write;
        let mut device = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
        device.write_all(payload.as_bytes()).unwrap();
        device.sync_all().unwrap();
    } else {
        std::fs::write(target.join("data"), &payload).unwrap();
    }
    let unpublish =
        csi::NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: target.display().to_string() };
    clients.node.node_unpublish_volume(unpublish.clone()).await.unwrap();
    clients.node.node_publish_volume(publish).await.expect("republish");
    assert_eq!(read_back(&target), payload, "data survives unpublish/republish on {node}");
    clients.node.node_unpublish_volume(unpublish).await.unwrap();
    clients
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id,
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and the Kubernetes binaries: tests/run-all.sh runs it"]
async fn cluster_mode_provisions_binds_reclaims_expands_and_fails_over() {
    let mut cluster = setup().await;
    let client = cluster.client.clone();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");

    // 30 claims across classes and binding modes.
    let mut wanted: Vec<(String, Option<&str>)> = Vec::new();
    let mut create = Vec::new();
    for i in 0..10 {
        let node = ["node-a", "node-b", "node-c"][i % 3];
        create.push(claim(&format!("wffc-{i}"), "plinth", 32 * MI, Some(node), false));
        wanted.push((format!("wffc-{i}"), Some(node)));
    }
    for i in 0..10 {
        create.push(claim(&format!("immediate-{i}"), "plinth-immediate", 48 * MI, None, false));
        wanted.push((format!("immediate-{i}"), None));
    }
    for i in 0..4 {
        let node = ["node-a", "node-b"][i % 2];
        create.push(claim(&format!("block-{i}"), "plinth-block", 16 * MI, Some(node), true));
        wanted.push((format!("block-{i}"), Some(node)));
    }
    for i in 0..3 {
        let node = ["node-a", "node-b"][i % 2];
        create.push(claim(&format!("xfs-{i}"), "plinth-xfs", 300 * MI, Some(node), false));
        wanted.push((format!("xfs-{i}"), Some(node)));
    }
    for i in 0..3 {
        let node = ["node-a", "node-b"][i % 2];
        create.push(claim(&format!("thick-{i}"), "plinth-thick", 16 * MI, Some(node), false));
        wanted.push((format!("thick-{i}"), Some(node)));
    }
    for pvc in &create {
        claims.create(&PostParams::default(), pvc).await.unwrap();
    }
    let mut bound = BTreeMap::new();
    for (name, node) in &wanted {
        let pv =
            wait_for(&format!("claim {name} bound"), Duration::from_secs(120), || bound_volume(&client, name)).await;
        let on = pv_node(&pv);
        if let Some(node) = node {
            assert_eq!(&on, node, "{name}: WaitForFirstConsumer honours the selected node");
        } else {
            assert_ne!(on, "node-c", "{name}: the small node (256 MiB, mostly used) is never chosen for Immediate");
        }
        assert!(image(&cluster, &on, &handle(&pv)).exists(), "{name}: the image is in {on}'s pool");
        bound.insert(name.clone(), pv);
    }
    assert_eq!(bound.len(), 30);

    // Act as kubelet on an ext4, an xfs and a block volume.
    for name in ["wffc-0", "xfs-1", "block-2"] {
        let pv = &bound[name];
        use_like_kubelet(&cluster, &pv_node(pv), pv).await;
    }

    // CSIStorageCapacity objects match the pools: the operator's ceiling minus what the node's
    // volume records provision (the pool filesystem itself has far more room).
    let capacities: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), "plinth-system");
    for (node, ceiling) in [("node-a", 2048 * MI), ("node-b", 2048 * MI), ("node-c", 256 * MI)] {
        let records = cluster.node_dir(node).join("volumes");
        wait_for(&format!("capacity of {node} published"), Duration::from_secs(30), || {
            let (capacities, records) = (capacities.clone(), records.clone());
            async move {
                let provisioned: i64 = std::fs::read_dir(&records)
                    .ok()?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .filter_map(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
                    .filter_map(|record| record["capacity_bytes"].as_i64())
                    .sum();
                let object = capacities.get_opt(&format!("plinth-{node}-plinth")).await.ok()??;
                let published = plinth_engine::size::parse_size(&object.capacity?.0).ok()? as i64;
                (published == (ceiling - provisioned).max(0)).then_some(())
            }
        })
        .await;
    }

    // A claim that fits nowhere: ProvisioningFailed, then it binds once space is freed.
    claims.create(&PostParams::default(), &claim("big", "plinth-immediate", 1700 * MI, None, false)).await.unwrap();
    wait_for("ProvisioningFailed on the big claim", Duration::from_secs(30), || async {
        events_for(&client, "big").await.iter().any(|e| e.starts_with("ProvisioningFailed")).then_some(())
    })
    .await;
    assert!(bound_volume(&client, "big").await.is_none());
    // Free node-b: delete every claim placed there (reclaim policy Delete removes PV, Volume, image).
    let on_b: Vec<(String, PersistentVolume)> =
        bound.iter().filter(|(_, pv)| pv_node(pv) == "node-b").map(|(n, pv)| (n.clone(), pv.clone())).collect();
    for (name, _) in &on_b {
        claims.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for (name, pv) in &on_b {
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        wait_for(&format!("PV of {name} deleted"), Duration::from_secs(60), || async {
            pvs.get_opt(&pv.name_any()).await.ok()?.is_none().then_some(())
        })
        .await;
        assert!(!image(&cluster, "node-b", &handle(pv)).exists(), "{name}: the image is gone");
    }
    let big =
        wait_for("big claim bound after space was freed", Duration::from_secs(60), || bound_volume(&client, "big"))
            .await;
    assert_eq!(pv_node(&big), "node-b");

    // Retain keeps the PV, the Volume and the image.
    claims.create(&PostParams::default(), &claim("kept", "plinth-retain", 16 * MI, None, false)).await.unwrap();
    let kept = wait_for("kept bound", Duration::from_secs(60), || bound_volume(&client, "kept")).await;
    claims.delete("kept", &DeleteParams::default()).await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    wait_for("kept released", Duration::from_secs(60), || async {
        let pv = pvs.get_opt(&kept.name_any()).await.ok()??;
        (pv.status?.phase.as_deref() == Some("Released")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(pvs.get_opt(&kept.name_any()).await.unwrap().is_some(), "Retain keeps the PV");
    assert!(image(&cluster, &pv_node(&kept), &handle(&kept)).exists(), "Retain keeps the image");

    // Expansion: the claim asks for more; Volume, image and PV grow; kubelet is told to finish.
    let grow = json!({"spec": {"resources": {"requests": {"storage": (64 * MI).to_string()}}}});
    claims.patch("wffc-0", &PatchParams::default(), &Patch::Merge(&grow)).await.unwrap();
    let pv_name = bound["wffc-0"].name_any();
    wait_for("PV capacity grows", Duration::from_secs(60), || async {
        let pv = pvs.get_opt(&pv_name).await.ok()??;
        let storage = pv.spec?.capacity?.get("storage")?.0.clone();
        (plinth_engine::size::parse_size(&storage).ok()? == (64 * MI) as u64).then_some(())
    })
    .await;
    let grown = std::fs::metadata(image(&cluster, "node-a", &handle(&bound["wffc-0"]))).unwrap().len();
    assert_eq!(grown, (64 * MI) as u64, "the image grew");
    let status = claims.get("wffc-0").await.unwrap().status.unwrap();
    assert_eq!(
        status.allocated_resource_statuses.unwrap().get("storage").map(String::as_str),
        Some("NodeResizePending"),
        "kubelet is asked to finish the resize on the node"
    );

    // Leader failover mid-provisioning: kill the leader, the standby takes over.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "plinth-system");
    let leader = leases.get("plinth-controller").await.unwrap().spec.unwrap().holder_identity.unwrap();
    let index: usize = leader.trim_start_matches("controller-").parse().unwrap();
    cluster.controllers[index].take().unwrap().kill();
    claims
        .create(&PostParams::default(), &claim("after-failover", "plinth-immediate", 16 * MI, None, false))
        .await
        .unwrap();
    wait_for("claim bound by the new leader", Duration::from_secs(60), || bound_volume(&client, "after-failover"))
        .await;
    let new_leader = leases.get("plinth-controller").await.unwrap().spec.unwrap().holder_identity.unwrap();
    assert_ne!(new_leader, leader, "the standby holds the lease now");

    // Restarts: the killed controller comes back as a standby; a node agent restarts. No
    // duplicate Volume or PV appears, and provisioning continues.
    cluster.start_controller(index);
    cluster.nodes.remove("node-a").unwrap().stop();
    cluster.start_node("node-a", "2GiB");
    claims
        .create(&PostParams::default(), &claim("after-restart", "plinth", 16 * MI, Some("node-a"), false))
        .await
        .unwrap();
    wait_for("claim bound after restarts", Duration::from_secs(60), || bound_volume(&client, "after-restart")).await;
    let all_volumes: Api<plinth_cluster::crd::Volume> = Api::all(client.clone());
    let volume_count = all_volumes.list(&ListParams::default()).await.unwrap().items.len();
    let pv_count = pvs.list(&ListParams::default()).await.unwrap().items.len();
    let claim_count = claims.list(&ListParams::default()).await.unwrap().items.len();
    assert_eq!(pv_count, claim_count + 1, "one PV per claim, plus the retained one");
    assert_eq!(volume_count, pv_count, "one Volume per PV, never a duplicate");
}

/// Benchmark, not a timed test: 100 claims created at once, time until each is Bound.
/// Run with `tests/bench-cluster.sh` (cargo test … -- --ignored --nocapture).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run with tests/bench-cluster.sh"]
async fn bench_bind_100_claims() {
    let cluster = setup().await;
    let client = cluster.client.clone();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    const COUNT: usize = 100;
    let started = Instant::now();
    for i in 0..COUNT {
        claims
            .create(&PostParams::default(), &claim(&format!("bench-{i}"), "plinth-immediate", 8 * MI, None, false))
            .await
            .unwrap();
    }
    let created = started.elapsed();
    let mut bound_at: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while bound_at.len() < COUNT {
        assert!(Instant::now() < deadline, "only {} of {COUNT} claims bound after 10 minutes", bound_at.len());
        for pvc in claims.list(&ListParams::default()).await.unwrap().items {
            if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                bound_at.entry(pvc.name_any()).or_insert_with(|| started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut times: Vec<Duration> = bound_at.values().copied().collect();
    times.sort();
    let pick = |q: f64| times[((times.len() as f64 * q).ceil() as usize).saturating_sub(1).min(times.len() - 1)];
    println!("\nplinth cluster bench: {COUNT} claims (Immediate, 8 MiB, 3 nodes, 2 controllers)");
    println!("  created all claims in   {:>8.2} s", created.as_secs_f64());
    println!("  time to Bound  p50      {:>8.2} s", pick(0.50).as_secs_f64());
    println!("  time to Bound  p95      {:>8.2} s", pick(0.95).as_secs_f64());
    println!("  time to Bound  max      {:>8.2} s", times.last().unwrap().as_secs_f64());
    println!("  all {COUNT} Bound after  {:>8.2} s", times.last().unwrap().as_secs_f64());
    println!(
        "  reference: OpenEBS hostpath LocalPV bound 100 claims in 95 s (openebs/openebs#4050): ratio {:.1}x",
        95.0 / times.last().unwrap().as_secs_f64()
    );
}

/// The standard external-provisioner/resizer sidecars talk CSI to the controller; the same
/// `Volume` objects and node agents do the work.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root and the Kubernetes binaries: tests/run-all.sh runs it"]
async fn csi_controller_for_sidecars_shares_the_cluster_implementation() {
    let cluster = setup().await;
    let socket = cluster.sandbox.path().join("controller-0.sock");
    wait_for("controller CSI socket", Duration::from_secs(30), || async { socket.exists().then_some(()) }).await;
    let mut csi_client = Clients::connect(&socket).await;
    let topology = |node: &str| csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: [(plinth_proto::TOPOLOGY_NODE_KEY.to_owned(), node.to_owned())].into(),
        }],
        preferred: vec![],
    };
    let mut request = create_request("pvc-from-sidecar", 32 * MI, mount_cap("ext4"));
    request.accessibility_requirements = Some(topology("node-b"));
    let volume =
        csi_client.controller.create_volume(request.clone()).await.expect("CreateVolume").into_inner().volume.unwrap();
    assert!(volume.volume_id.starts_with("vol-"), "{volume:?}");
    assert_eq!(volume.accessible_topology[0].segments[plinth_proto::TOPOLOGY_NODE_KEY], "node-b");
    assert!(image(&cluster, "node-b", &volume.volume_id).exists(), "the node agent made the image");
    let again = csi_client.controller.create_volume(request).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, volume.volume_id, "idempotent by name");

    let expanded = csi_client
        .controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 64 * MI, limit_bytes: 0 }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 64 * MI);
    assert_eq!(std::fs::metadata(image(&cluster, "node-b", &volume.volume_id)).unwrap().len(), (64 * MI) as u64);

    let no_topology = create_request("pvc-nowhere", 32 * MI, mount_cap("ext4"));
    let err = csi_client.controller.create_volume(no_topology).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    csi_client
        .controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: volume.volume_id.clone(), ..Default::default() })
        .await
        .expect("DeleteVolume");
    assert!(!image(&cluster, "node-b", &volume.volume_id).exists(), "the image is gone");
    csi_client
        .controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: volume.volume_id, ..Default::default() })
        .await
        .expect("DeleteVolume is idempotent");
}
