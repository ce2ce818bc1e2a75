//! plinth deployed as a cluster runs it, on the real node of `crate::node`: deploy/ applied with
//! `kubectl apply -k` through a test overlay that only points it at this machine, and the helpers
//! the node tests share (claims, pods, waits, logs, what is on the host).
//!
//! The overlay, and why: the kubelet dir is the test node's (not /var/lib/kubelet), the image is
//! the locally built one (no registry), and the plinth pods use the host network with
//! KUBERNETES_SERVICE_HOST=127.0.0.1 because the test apiserver listens on loopback only and there
//! is no kube-proxy. Workload pods use the node's bridge network. Everything else is deploy/ (and
//! deploy/snapshots/) as shipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Namespace, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::k8s::{ControlPlane, Options};
use crate::node::TestNode;

/// The namespace the workload pods and claims live in.
pub const NS: &str = "apps";
pub const MIB: u64 = 1 << 20;
/// The node's pool is capped here, so a claim can be too large for it.
pub const POOL_CAPACITY: &str = "3GiB";
pub const POOL_BYTES: u64 = 3 << 30;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A path from `from` to `to` through `..` (kustomize takes no absolute resource paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let depth = from.components().count() - 1;
    let mut path = PathBuf::new();
    for _ in 0..depth {
        path.push("..");
    }
    path.join(to.strip_prefix("/").unwrap())
}

pub struct Cluster {
    pub plane: ControlPlane,
    pub node: TestNode,
    pub client: Client,
    pub kubectl: PathBuf,
    /// The node plugin's data dir on the host (pool images, records).
    pub data_dir: PathBuf,
    pub overlay: PathBuf,
}

impl Cluster {
    pub fn kubectl(&self, args: &[&str]) -> String {
        let output = Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.plane.kubeconfig.display()))
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub fn pool_images(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.data_dir.join("pool"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "img"))
            .collect()
    }

    /// Loop devices attached since the node started: plinth's (attached in its container, so
    /// their backing paths are not the host's: they are found by identity).
    pub fn pool_devices(&self) -> Vec<PathBuf> {
        self.node.loop_devices_added().iter().map(|d| d.path()).collect()
    }

    /// Host mount points below the kubelet dir, other than the kubelet dir itself and pods'
    /// service-account token volumes (they come and go with every pod, plinth's own included).
    pub fn kubelet_mounts(&self) -> Vec<PathBuf> {
        let dir = self.node.kubelet_dir();
        let mut mounts: Vec<PathBuf> = crate::mounts_under(&dir)
            .into_iter()
            .filter(|m| *m != dir && !m.to_string_lossy().contains("kubernetes.io~projected"))
            .collect();
        mounts.sort();
        mounts
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub async fn context(&self) -> String {
        let mut out = String::new();
        let events: Api<Event> = Api::all(self.client.clone());
        if let Ok(list) = events.list(&ListParams::default()).await {
            for e in list.items.iter().rev().take(25) {
                out.push_str(&format!(
                    "event {}/{}: {} {}\n",
                    e.involved_object.kind.as_deref().unwrap_or(""),
                    e.involved_object.name.as_deref().unwrap_or(""),
                    e.reason.as_deref().unwrap_or(""),
                    e.message.as_deref().unwrap_or("")
                ));
            }
        }
        let plinth_pods: Api<Pod> = Api::namespaced(self.client.clone(), "plinth-system");
        for pod in plinth_pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let log = self.node.pod_log("plinth-system", &name, "plinth");
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            out.push_str(&format!(
                "--- {name} ({}):\n{}\n",
                phase(&pod),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out.push_str(&format!("--- kubelet:\n{}\n", self.node.kubelet_log_tail()));
        out
    }

    pub async fn wait<T>(&self, what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if Instant::now() > deadline {
                panic!("{what}: not within {timeout:?}\n{}", self.context().await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn create_claim(&self, name: &str, class: &str, bytes: u64, block: bool) {
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "volumeMode": if block { "Block" } else { "Filesystem" },
                "resources": {"requests": {"storage": bytes.to_string()}}
            }
        }))
        .unwrap();
        self.claims().create(&PostParams::default(), &claim).await.expect("create claim");
    }

    /// A Filesystem claim with extra spec fields (`dataSource`, `volumeAttributesClassName`, …).
    pub async fn create_claim_with(&self, name: &str, class: &str, bytes: u64, extra: serde_json::Value) {
        let mut spec = json!({
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": bytes.to_string()}}
        });
        for (key, value) in extra.as_object().cloned().unwrap_or_default() {
            spec[key] = value;
        }
        let claim: PersistentVolumeClaim =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
        self.claims().create(&PostParams::default(), &claim).await.expect("create claim");
    }

    /// A pod running `script` (sh -c) with `claim` at /data (or as /dev/xvda when `block`).
    pub async fn create_pod(&self, name: &str, claim: &str, script: &str, extra: serde_json::Value) {
        let block = extra.get("block").and_then(|b| b.as_bool()).unwrap_or(false);
        let read_only = extra.get("readOnly").and_then(|b| b.as_bool()).unwrap_or(false);
        let mut container = json!({
            "name": "main",
            "image": self.base_image(),
            "imagePullPolicy": "Never",
            "command": ["sh", "-c", script],
        });
        if block {
            container["volumeDevices"] = json!([{"name": "data", "devicePath": "/dev/xvda"}]);
        } else {
            container["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
        }
        let mut spec = json!({
            // sh as PID 1 ignores SIGTERM: do not wait the default 30 s on delete.
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}],
        });
        if let Some(security) = extra.get("securityContext") {
            spec["securityContext"] = security.clone();
        }
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
        self.pods().create(&PostParams::default(), &pod).await.expect("create pod");
    }

    pub fn base_image(&self) -> String {
        std::env::var("PLINTH_BASE_IMAGE").expect("PLINTH_BASE_IMAGE (tests/k8s/build-images.sh)")
    }

    pub async fn running(&self, name: &str) -> Pod {
        self.wait(&format!("pod {name} Running"), Duration::from_secs(120), async || {
            self.pods().get(name).await.ok().filter(|p| phase(p) == "Running")
        })
        .await
    }

    /// Waits until the pod's log contains `text`; returns the log.
    pub async fn log_contains(&self, pod: &str, text: &str) -> String {
        self.wait(&format!("{text:?} in the log of {pod}"), Duration::from_secs(60), async || {
            Some(self.node.pod_log(NS, pod, "main")).filter(|log| log.contains(text))
        })
        .await
    }

    pub fn exec(&self, pod: &str, script: &str) -> String {
        let output = self.node.exec_in_container(NS, pod, "main", &["sh", "-c", script]);
        assert!(
            output.status.success(),
            "exec in {pod}: {script}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    pub async fn delete_pod(&self, name: &str) {
        self.pods().delete(name, &DeleteParams::default()).await.expect("delete pod");
        self.wait(&format!("pod {name} gone"), Duration::from_secs(90), async || {
            self.pods().get_opt(name).await.ok().filter(Option::is_none).map(drop)
        })
        .await;
    }

    pub async fn bound_pv(&self, claim: &str) -> PersistentVolume {
        let name = self
            .wait(&format!("claim {claim} Bound"), Duration::from_secs(60), async || {
                let claim = self.claims().get(claim).await.ok()?;
                (claim.status.as_ref()?.phase.as_deref() == Some("Bound")).then(|| claim.spec?.volume_name)?
            })
            .await;
        Api::<PersistentVolume>::all(self.client.clone()).get(&name).await.expect("PV")
    }

    /// The plinth node pod and its uid.
    pub async fn node_plugin(&self) -> (String, String) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "plinth-system");
        self.wait("the plinth node pod Ready", Duration::from_secs(120), async || {
            let list = pods.list(&ListParams::default().labels("app.kubernetes.io/name=plinth-node")).await.ok()?;
            let pod = list.items.into_iter().find(|p| ready(p) && p.metadata.deletion_timestamp.is_none())?;
            Some((pod.metadata.name?, pod.metadata.uid?))
        })
        .await
    }

    pub fn plinth_log(&self, pod: &str) -> String {
        self.node.pod_log("plinth-system", pod, "plinth")
    }
}

pub fn phase(pod: &Pod) -> String {
    pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default()
}

pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn container_id(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()?.container_id.clone()
}

pub fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

pub fn handle(pv: &PersistentVolume) -> String {
    pv.spec.as_ref().unwrap().csi.as_ref().unwrap().volume_handle.clone()
}

/// A JSON 6902 patch list that first checks the list entry it replaces is the one it means.
pub fn checked(path: &str, name: &str) -> serde_json::Value {
    json!({"op": "test", "path": format!("{path}/name"), "value": name})
}

/// Writes the test overlay over deploy/ (and, with `snapshots`, the snapshot add-on
/// deploy/snapshots/) into `dir` and returns its path.
pub fn write_overlay(
    dir: &Path,
    plane: &ControlPlane,
    kubelet_dir: &Path,
    data_dir: &Path,
    image: &str,
    snapshots: bool,
) -> PathBuf {
    let overlay = dir.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let (image_name, image_tag) = image.rsplit_once(':').expect("image reference with a tag");
    let k = kubelet_dir.display().to_string();
    let api_env = json!([
        {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": true},
        {"op": "add", "path": "/spec/template/spec/dnsPolicy", "value": "ClusterFirstWithHostNet"},
        {"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"},
        {"op": "add", "path": "/spec/template/spec/containers/0/env/-",
         "value": {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}},
        {"op": "add", "path": "/spec/template/spec/containers/0/env/-",
         "value": {"name": "KUBERNETES_SERVICE_PORT", "value": plane.api_port().to_string()}},
    ]);
    let mut node_patch = api_env.as_array().unwrap().clone();
    node_patch.extend([
        json!({"op": "replace", "path": "/spec/template/spec/containers/0/args", "value": [
            "node",
            "--node-id=$(NODE_NAME)",
            format!("--endpoint=unix://{k}/plugins/plinth.csi.dev/csi.sock"),
            format!("--kubelet-dir={k}"),
            "--data-dir=/var/lib/plinth",
            format!("--allowed-root={k}"),
            "--http-address=127.0.0.1:9809",
            format!("--pool-capacity={POOL_CAPACITY}"),
            "--log-format=json",
        ]}),
        checked("/spec/template/spec/containers/0/volumeMounts/0", "kubelet-dir"),
        json!({"op": "replace", "path": "/spec/template/spec/containers/0/volumeMounts/0/mountPath", "value": k}),
        checked("/spec/template/spec/volumes/0", "kubelet-dir"),
        json!({"op": "replace", "path": "/spec/template/spec/volumes/0/hostPath/path", "value": k}),
        checked("/spec/template/spec/volumes/1", "pool"),
        json!({"op": "replace", "path": "/spec/template/spec/volumes/1/hostPath/path", "value": data_dir}),
        // Probes of a host-network pod: the plugin listens on loopback here.
        json!({"op": "add", "path": "/spec/template/spec/containers/0/livenessProbe/httpGet/host", "value": "127.0.0.1"}),
        json!({"op": "add", "path": "/spec/template/spec/containers/0/readinessProbe/httpGet/host", "value": "127.0.0.1"}),
    ]);
    let mut controller_patch = api_env.as_array().unwrap().clone();
    controller_patch.extend([
        // One node: two host-network replicas would fight over the HTTP port.
        json!({"op": "replace", "path": "/spec/replicas", "value": 1}),
    ]);
    let mut resources = vec![relative(&overlay, &repo().join("deploy"))];
    if snapshots {
        resources.push(relative(&overlay, &repo().join("deploy/snapshots")));
    }
    let kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": resources,
        "images": [{"name": "ghcr.io/plinth-csi/plinth", "newName": image_name, "newTag": image_tag}],
        "patches": [
            {"target": {"kind": "DaemonSet", "name": "plinth-node"}, "patch": serde_json::to_string(&node_patch).unwrap()},
            {"target": {"kind": "Deployment", "name": "plinth-controller"}, "patch": serde_json::to_string(&controller_patch).unwrap()},
        ],
    });
    std::fs::write(overlay.join("kustomization.yaml"), serde_json::to_string_pretty(&kustomization).unwrap()).unwrap();
    overlay
}

/// A control plane, a real node and the overlay, nothing deployed yet. With `snapshots`, the
/// cluster first gets what an admin installs for snapshots (the external-snapshotter CRDs and
/// the common snapshot-controller) and the overlay includes plinth's snapshot add-on.
pub async fn start(snapshots: bool) -> Cluster {
    let (binaries, images) = crate::require_node!();
    let plinth = images.plinth.clone().expect("PLINTH_IMAGE: run tests/k8s/build-images.sh with a plinth binary");
    let kubectl = binaries.kubectl.clone().expect("PLINTH_KUBECTL");
    let mut plane =
        ControlPlane::start_with_node_controllers(&binaries, Options { controller_manager: true, scheduler: true })
            .await;
    if snapshots {
        plane.install_snapshot_controller(&binaries).await;
    }
    let node = TestNode::start(&plane, &binaries, &images).await;
    let client = plane.client().await;
    let data_dir = node.dir().join("plinth");
    let overlay = write_overlay(node.dir(), &plane, &node.kubelet_dir(), &data_dir, &plinth.reference, snapshots);
    Cluster { plane, node, client, kubectl, data_dir, overlay }
}

impl Cluster {
    /// `kubectl apply -k` of the overlay, then the workload namespace with its default
    /// ServiceAccount (pods are refused until it exists). Returns what kubectl said.
    pub async fn deploy(&self) -> String {
        let applied = self.kubectl(&["apply", "--server-side", "-k", self.overlay.to_str().unwrap()]);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        namespaces
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap())
            .await
            .unwrap();
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), NS);
        self.wait("the default ServiceAccount", Duration::from_secs(30), async || {
            accounts.get_opt("default").await.ok().flatten()
        })
        .await;
        applied
    }
}
