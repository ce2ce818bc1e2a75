//! A real Kubernetes node for tests: containerd and runc from Debian's packages and a real kubelet
//! (built by `tests/k8s/build-components.sh`), registered with a [`ControlPlane`], running images
//! built without a registry by `tests/k8s/build-images.sh`.
//!
//! Everything lives in a temp dir `/tmp/plinth-node-XXXXXX`: containerd's config, root, state,
//! socket and runc root, the CNI config and IPAM state, kubelet's root dir (a shared bind mount of
//! itself, so a node plugin can later mount into it with Bidirectional propagation), its config,
//! certificates and pod logs. kubelet's pods live under their own cgroup root
//! `/plinth-node-XXXXXX` in every hierarchy, pods get addresses on their own bridge.
//!
//! kubelet and containerd still change the host in places no flag moves (sysctls, iptables
//! chains, a few hard-coded directories): [`HostState`] is captured before anything starts, saved
//! in the temp dir, and put back on drop — also after a panic, and by the next [`TestNode`] when a
//! test process was killed outright (its temp dir is then swept as stale). For the same reason
//! only one node runs on a machine at a time (a lock serialises them).
//!
//! kubelet listens on 127.0.0.1 only, but the Node's InternalIP is the machine's address (kubelet
//! refuses a loopback node IP), so the apiserver cannot reach it: no `kubectl exec` or `logs`.
//! [`TestNode::exec_in_container`] goes through containerd, [`TestNode::pod_log`] reads the log
//! files. Pods must use images imported here (`imagePullPolicy: Never`): there is no registry.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use serde::{Deserialize, Serialize};

use crate::k8s::{Binaries, ControlPlane};

/// The node's name in the API.
pub const NODE_NAME: &str = "plinth-e2e";
/// containerd's namespace for the CRI.
const NAMESPACE: &str = "k8s.io";
const DIR_PREFIX: &str = "plinth-node-";

/// An image archive (docker-archive, from `tests/k8s/build-images.sh`) and the name it carries.
#[derive(Debug, Clone)]
pub struct Image {
    pub reference: String,
    pub archive: PathBuf,
}

/// The images `tests/k8s/build-images.sh` built, from the environment `tests/run-all.sh` sets.
#[derive(Debug, Clone)]
pub struct Images {
    /// The pod sandbox image (containerd's `sandbox_image`).
    pub pause: Image,
    /// Debian with the filesystem tools, sh and coreutils: for workload pods.
    pub base: Image,
    /// The base plus a plinth binary, when one was given to the script.
    pub plinth: Option<Image>,
}

impl Images {
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let image = |name: &str, archive: &str| Some(Image { reference: var(name)?, archive: var(archive)?.into() });
        Some(Images {
            pause: image("PLINTH_PAUSE_IMAGE", "PLINTH_PAUSE_ARCHIVE")?,
            base: image("PLINTH_BASE_IMAGE", "PLINTH_BASE_ARCHIVE")?,
            plinth: image("PLINTH_IMAGE", "PLINTH_IMAGE_ARCHIVE"),
        })
    }
}

/// Everything a real node needs, or why it cannot start here.
pub fn requirements() -> Result<(Binaries, Images), String> {
    if !crate::is_root() {
        return Err("a real node needs root".into());
    }
    let binaries = Binaries::from_env().ok_or("Kubernetes components not built (tests/k8s/build-components.sh)")?;
    if binaries.kubelet.is_none() {
        return Err("PLINTH_KUBELET is not set (tests/k8s/build-components.sh builds kubelet)".into());
    }
    let images = Images::from_env().ok_or("node images not built (tests/k8s/build-images.sh)")?;
    for tool in ["containerd", "containerd-shim-runc-v2", "ctr", "runc", "ip"] {
        if find_in_path(tool).is_none() {
            return Err(format!("{tool} is not installed (apt-get install containerd runc iproute2)"));
        }
    }
    if !Path::new("/usr/lib/cni/bridge").exists() {
        return Err("the CNI plugins are not installed (apt-get install containernetworking-plugins)".into());
    }
    Ok((binaries, images))
}

/// `(Binaries, Images)` for a real node, or skip the test (under CI a missing piece fails it).
#[macro_export]
macro_rules! require_node {
    () => {
        match $crate::node::requirements() {
            Ok(found) => found,
            Err(why) => panic!("a real node cannot start: {why} (tests/run-all.sh sets everything up)"),
        }
    };
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("port").port()
}

/// A real node: containerd + kubelet. Torn down completely on drop.
pub struct TestNode {
    dir: PathBuf,
    kubelet_bin: PathBuf,
    kubeconfig: PathBuf,
    kubelet: Option<Child>,
    containerd: Option<Child>,
    kubelet_port: u16,
    healthz_port: u16,
    client: kube::Client,
    host: HostState,
    /// Loop devices attached before the node started: any others at teardown are the node's.
    loops: crate::LoopSet,
    /// Held until the drop has cleaned up (fields drop after `Drop::drop`).
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// One node at a time on a machine: two would fight over the host state (each restores the
/// sysctls and iptables chains the other's kubelet still relies on). Blocks until free.
fn exclusive() -> nix::fcntl::Flock<std::fs::File> {
    use nix::fcntl::{Flock, FlockArg};
    let path = "/tmp/.plinth-node.lock";
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).expect("node lock");
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((file, _)) => {
            eprintln!("another test node runs on this machine: waiting for {path}");
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e).expect("node lock")
        }
    }
}

/// Names derived from a node's temp dir, so a stale dir alone says what to clean.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn suffix(&self) -> String {
        let name = self.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name.trim_start_matches(DIR_PREFIX).to_owned()
    }
    /// kubelet's `cgroupRoot`: pods' cgroups go below it in every hierarchy.
    fn cgroup_root(&self) -> String {
        format!("{DIR_PREFIX}{}", self.suffix())
    }
    /// The pods' bridge (at most 15 characters).
    fn bridge(&self) -> String {
        format!("plbr-{}", self.suffix())
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }
    fn kubelet_dir(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    fn pod_logs(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }
    fn fifo_dir(&self) -> PathBuf {
        self.dir.join("ctr-fifo")
    }
    fn host_state(&self) -> PathBuf {
        self.dir.join("host-state.json")
    }
    fn owner(&self) -> PathBuf {
        self.dir.join("owner")
    }
    fn ctr(&self) -> Command {
        let mut command = Command::new("ctr");
        command.arg("--address").arg(self.socket()).arg("--namespace").arg(NAMESPACE);
        command
    }
}

impl TestNode {
    /// Starts containerd and kubelet for `plane` (started with
    /// [`ControlPlane::start_with_node_controllers`] and a scheduler), imports `images`, and waits
    /// until the node is Ready and schedulable.
    pub async fn start(plane: &ControlPlane, binaries: &Binaries, images: &Images) -> Self {
        assert!(crate::is_root(), "a real node needs root");
        let kubelet_bin = binaries.kubelet.clone().expect("PLINTH_KUBELET (tests/k8s/build-components.sh)");
        let lock = exclusive();
        sweep_stale();
        let started = Instant::now();
        let host = HostState::capture();
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir_in("/tmp").expect("temp dir").keep();
        let layout = Layout { dir: dir.clone() };
        std::fs::write(layout.owner(), owner_id(std::process::id()).unwrap_or_default()).expect("owner file");
        std::fs::write(layout.host_state(), serde_json::to_vec_pretty(&host).expect("host state")).expect("save");
        // From here on, Drop cleans up whatever the rest of start() got to.
        let mut node = TestNode {
            dir,
            kubelet_bin,
            kubeconfig: plane.kubeconfig.clone(),
            kubelet: None,
            containerd: None,
            kubelet_port: free_port(),
            healthz_port: free_port(),
            client: plane.client().await,
            host,
            loops: crate::LoopSet::now(),
            _lock: lock,
        };
        node.prepare_host();
        node.start_containerd(&images.pause.reference);
        let containerd_up = started.elapsed();
        for image in std::iter::once(&images.pause).chain([&images.base]).chain(&images.plinth) {
            node.import_image(&image.archive);
        }
        let imported = started.elapsed();
        node.write_kubelet_config();
        node.start_kubelet();
        node.wait_ready(Duration::from_secs(120)).await;
        eprintln!(
            "node {NODE_NAME}: containerd up {containerd_up:.1?}, images imported {imported:.1?}, Ready {:.1?}",
            started.elapsed()
        );
        node
    }

    fn layout(&self) -> Layout {
        Layout { dir: self.dir.clone() }
    }

    /// Loop devices attached since the node started (by whom or in which namespace ever).
    pub fn loop_devices_added(&self) -> Vec<plinth_engine::sys::loopdev::LoopDevice> {
        self.loops.added_since()
    }

    /// The node's temp dir (everything it has lives below it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// kubelet's `--root-dir`: a shared mount (Bidirectional mount propagation works below it).
    pub fn kubelet_dir(&self) -> PathBuf {
        self.layout().kubelet_dir()
    }

    /// containerd's socket (for `ctr --address`).
    pub fn containerd_socket(&self) -> PathBuf {
        self.layout().socket()
    }

    /// The host as it was before this node started; drop puts it back.
    pub fn host_state(&self) -> &HostState {
        &self.host
    }

    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The kubelet dir as a shared mount of itself (`/` is private here), the cgroup root, the
    /// CNI config and the directories the processes are pointed at.
    fn prepare_host(&self) {
        let layout = self.layout();
        for sub in ["kubelet", "kubelet-pki", "pod-logs", "volume-plugins", "ctr-fifo", "cni/net.d", "cni/ipam"] {
            std::fs::create_dir_all(self.dir.join(sub)).expect("node dir");
        }
        let kubelet_dir = layout.kubelet_dir();
        use nix::mount::{MsFlags, mount};
        mount(Some(&kubelet_dir), &kubelet_dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .expect("bind kubelet dir");
        mount(None::<&str>, &kubelet_dir, None::<&str>, MsFlags::MS_SHARED | MsFlags::MS_REC, None::<&str>)
            .expect("make the kubelet dir rshared");
        create_cgroup_root(&layout.cgroup_root());
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "plinth-node",
            "plugins": [{
                "type": "bridge",
                "bridge": layout.bridge(),
                // No address on the bridge and no routes: pods reach each other on it and nothing
                // else; the host's ip_forward stays as it is (isGateway would turn it on).
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.0.0/24"}]],
                    "dataDir": self.dir.join("cni/ipam"),
                }
            }]
        });
        std::fs::write(self.dir.join("cni/net.d/10-plinth.conflist"), conflist.to_string()).expect("CNI config");
    }

    fn start_containerd(&mut self, sandbox_image: &str) {
        let layout = self.layout();
        let d = self.dir.display();
        // containerd 1.6 (Debian). Every path it takes from the config is in the temp dir; what it
        // still hard-codes (/run/containerd/s for shim sockets) is covered by HostState.
        let config = format!(
            r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
temp = "{d}/containerd/tmp"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  # There is no registry: the sandbox image is imported before kubelet starts.
  sandbox_image = "{sandbox_image}"
  # No AppArmor here; root lacks CAP_SYS_RESOURCE, so containers may not lower their OOM score.
  disable_apparmor = true
  restrict_oom_score_adj = true
  # Pod network namespaces under the state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        # kubelet's cgroupDriver is cgroupfs (no systemd here).
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
"#,
            socket = layout.socket().display(),
        );
        let path = self.dir.join("containerd.toml");
        std::fs::write(&path, config).expect("containerd config");
        let child =
            spawn_logged(Command::new("containerd").arg("--config").arg(&path), &self.dir.join("containerd.log"));
        self.containerd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.containerd.as_mut().map(Child::try_wait) {
                panic!("containerd exited ({status}):\n{}", self.log_tail("containerd.log"));
            }
            if layout.ctr().arg("version").output().is_ok_and(|o| o.status.success()) {
                return;
            }
            assert!(Instant::now() < deadline, "containerd not up after 30 s:\n{}", self.log_tail("containerd.log"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Imports a docker-archive into containerd's CRI namespace (names as the archive has them).
    pub fn import_image(&self, archive: &Path) {
        let output = self.layout().ctr().arg("images").arg("import").arg(archive).output().expect("ctr");
        assert!(
            output.status.success(),
            "importing {}: {}",
            archive.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn write_kubelet_config(&self) {
        let layout = self.layout();
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // kubelet serves on loopback only; the Node's InternalIP is still the machine's
            // address (kubelet refuses a loopback node IP), so the apiserver cannot reach kubelet:
            // no `kubectl exec/logs` — exec_in_container and pod_log go around it.
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.healthz_port,
            // Anyone on loopback may read /metrics (kubelet_metrics); nothing listens elsewhere.
            "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": format!("unix://{}", layout.socket().display()),
            // cgroup v1 (hybrid) and no systemd on this machine.
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", layout.cgroup_root()),
            "failSwapOn": false,
            "podLogsDir": layout.pod_logs(),
            "volumePluginDir": self.dir.join("volume-plugins"),
            // Images cannot be pulled back after a collection: never collect.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            // Nothing is evicted for a full disk or memory on a shared test machine.
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
                "imagefs.inodesFree": "1%",
            },
            // NodeGetVolumeStats every 2 s (default 1 min), so kubelet_volume_stats_* show soon.
            "volumeStatsAggPeriod": "2s",
            "registerNode": true,
            "serializeImagePulls": false,
            "resolvConf": "/etc/resolv.conf",
        });
        std::fs::write(self.dir.join("kubelet.yaml"), config.to_string()).expect("kubelet config");
    }

    /// Starts kubelet (after [`stop_kubelet`](Self::stop_kubelet)); does not wait (see
    /// [`wait_ready`](Self::wait_ready)).
    pub fn start_kubelet(&mut self) {
        assert!(self.kubelet.is_none(), "kubelet is already running");
        let layout = self.layout();
        let mut command = Command::new(&self.kubelet_bin);
        command
            .arg(format!("--config={}", self.dir.join("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--root-dir={}", layout.kubelet_dir().display()))
            .arg(format!("--cert-dir={}", self.dir.join("kubelet-pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg("--v=2");
        self.kubelet = Some(spawn_logged(&mut command, &self.dir.join("kubelet.log")));
    }

    /// Stops kubelet (SIGTERM, then SIGKILL after 20 s). Pods keep running: their containers
    /// belong to containerd's shims.
    pub fn stop_kubelet(&mut self) {
        if let Some(child) = self.kubelet.take() {
            terminate(child, Duration::from_secs(20));
        }
    }

    /// Stops and starts kubelet, then waits until it answers /healthz and the node is Ready.
    pub async fn restart_kubelet(&mut self) {
        self.stop_kubelet();
        self.start_kubelet();
        self.wait_ready(Duration::from_secs(60)).await;
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// kubelet's log, last lines (for failure messages).
    pub fn kubelet_log_tail(&self) -> String {
        self.log_tail("kubelet.log")
    }

    fn healthz(&self) -> bool {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.healthz_port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.starts_with("HTTP/1.") && response.contains(" 200 ") && response.ends_with("ok")
    }

    /// Waits for kubelet's /healthz, the Node Ready, and the not-ready taint gone (the node
    /// lifecycle controller lifts it; kubelet registers with it). Panics with kubelet's log if
    /// kubelet exits or `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no Node object yet");
        loop {
            if let Some(Ok(Some(status))) = self.kubelet.as_mut().map(Child::try_wait) {
                panic!("kubelet exited ({status}):\n{}", self.kubelet_log_tail());
            }
            if self.healthz()
                && let Ok(node) = nodes.get(NODE_NAME).await
            {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let taints: Vec<String> = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|t| format!("{}:{}", t.key, t.effect))
                    .collect();
                if ready && taints.is_empty() {
                    return;
                }
                last = format!("ready: {ready}, taints: {taints:?} (is node-lifecycle-controller running?)");
            }
            assert!(
                Instant::now() < deadline,
                "node {NODE_NAME} not Ready after {timeout:?}: {last}\nkubelet:\n{}",
                self.kubelet_log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// containerd's IDs of a pod's container, running or not (kubelet keeps exited ones until
    /// it collects them), found by the CRI labels.
    pub fn container_ids(&self, namespace: &str, pod: &str, container: &str) -> Vec<String> {
        let filter = format!(
            r#"labels."io.kubernetes.pod.namespace"=={namespace},labels."io.kubernetes.pod.name"=={pod},labels."io.kubernetes.container.name"=={container}"#
        );
        let Ok(output) = self.layout().ctr().args(["containers", "ls", "-q", &filter]).output() else {
            return Vec::new();
        };
        String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
    }

    /// The ID of the pod's container that has a running task.
    pub fn container_id(&self, namespace: &str, pod: &str, container: &str) -> Option<String> {
        let running = running_tasks(&self.layout());
        self.container_ids(namespace, pod, container).into_iter().find(|id| running.contains(id))
    }

    /// Runs `argv` in a pod's container through containerd (`ctr tasks exec`): the apiserver
    /// cannot reach this kubelet, so `kubectl exec` does not work here.
    pub fn exec_in_container(&self, namespace: &str, pod: &str, container: &str, argv: &[&str]) -> Output {
        let id = self
            .container_id(namespace, pod, container)
            .unwrap_or_else(|| panic!("no running container {container} in pod {namespace}/{pod}"));
        static EXEC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let exec_id = format!("test-exec-{}", EXEC.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let layout = self.layout();
        layout
            .ctr()
            .args(["tasks", "exec", "--exec-id", &exec_id, "--fifo-dir"])
            .arg(layout.fifo_dir())
            .arg(&id)
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .expect("ctr tasks exec")
    }

    /// What a pod's container wrote (stdout and stderr, latest restart), from the log files
    /// kubelet keeps in its podLogsDir (`<ns>_<pod>_<uid>/<container>/<restart>.log`, CRI format).
    pub fn pod_log(&self, namespace: &str, pod: &str, container: &str) -> String {
        let prefix = format!("{namespace}_{pod}_");
        let Some(pod_dir) = std::fs::read_dir(self.layout().pod_logs())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        else {
            return String::new();
        };
        let latest = std::fs::read_dir(pod_dir.path().join(container))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                Some((name.strip_suffix(".log")?.parse::<u32>().ok()?, e.path()))
            })
            .max();
        let Some((_, file)) = latest else { return String::new() };
        cri_log_text(&std::fs::read_to_string(file).unwrap_or_default())
    }

    /// What a power cut does to this node's storage and processes, with kubelet stopped first:
    /// every container dies, everything mounted below the kubelet dir is gone (the dir itself,
    /// the machine's own mount, stays) and every loop device attached since the node started is
    /// detached. Start kubelet again to "boot".
    pub fn power_cut(&mut self) {
        assert!(self.kubelet.is_none(), "stop kubelet first");
        let layout = self.layout();
        let tasks = || -> Vec<String> {
            let output = layout.ctr().args(["tasks", "ls", "-q"]).output();
            output.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect()).unwrap_or_default()
        };
        for task in tasks() {
            let _ = layout.ctr().args(["tasks", "kill", "--all", "--signal", "SIGKILL", &task]).output();
        }
        for task in tasks() {
            let _ = layout.ctr().args(["tasks", "delete", "--force", &task]).output();
        }
        // Detach first: the kernel frees each device once its last mount is gone below. (By
        // identity, not path: what a container attached shows another path here.)
        for device in self.loops.added_since() {
            let _ = plinth_engine::sys::loopdev::detach(device);
        }
        let kubelet_dir = layout.kubelet_dir();
        let mut mounts: Vec<PathBuf> =
            crate::mounts_under(&kubelet_dir).into_iter().filter(|m| *m != kubelet_dir).collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for mount in mounts {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// kubelet's Prometheus metrics (GET /metrics on its port; anonymous access is allowed on
    /// loopback, its serving certificate is self-signed).
    pub async fn kubelet_metrics(&self) -> String {
        let url: http::Uri = format!("https://127.0.0.1:{}", self.kubelet_port).parse().expect("kubelet URL");
        let mut config = kube::Config::new(url);
        config.accept_invalid_certs = true;
        let client = kube::Client::try_from(config).expect("kubelet client");
        let request = http::Request::get("/metrics").body(Vec::new()).expect("request");
        client.request_text(request).await.expect("kubelet /metrics")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The logs go with the temp dir: show their ends now.
            eprintln!("--- kubelet.log (tail)\n{}", self.kubelet_log_tail());
            eprintln!("--- containerd.log (tail)\n{}", self.log_tail("containerd.log"));
        }
        self.stop_kubelet();
        let layout = self.layout();
        remove_containers(&layout);
        if let Some(child) = self.containerd.take() {
            terminate(child, Duration::from_secs(20));
        }
        for device in self.loops.added_since() {
            let _ = plinth_engine::sys::loopdev::detach(device);
        }
        clean_up(&layout, &self.host);
    }
}

/// The message text of a CRI log file (`<time> <stream> <P|F> <message>` lines; P is a partial
/// line continued by the next).
fn cri_log_text(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut fields = line.splitn(4, ' ');
        let (_, _, tag, message) = (fields.next(), fields.next(), fields.next(), fields.next().unwrap_or(""));
        out.push_str(message);
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

fn running_tasks(layout: &Layout) -> BTreeSet<String> {
    let Ok(output) = layout.ctr().args(["tasks", "ls"]).output() else { return BTreeSet::new() };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() == 3 && fields[2] == "RUNNING").then(|| fields[0].to_owned())
        })
        .collect()
}

/// Kills and deletes every task and container through containerd, while it still runs: the
/// shims unmount the rootfs, runc removes the containers' cgroups, and the shims exit.
fn remove_containers(layout: &Layout) {
    if !layout.socket().exists() {
        return;
    }
    let list = |what: &str| -> Vec<String> {
        let output = layout.ctr().args([what, "ls", "-q"]).output();
        output.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect()).unwrap_or_default()
    };
    for task in list("tasks") {
        let _ = layout.ctr().args(["tasks", "kill", "--all", "--signal", "SIGKILL", &task]).output();
    }
    for task in list("tasks") {
        let _ = layout.ctr().args(["tasks", "delete", "--force", &task]).output();
    }
    for container in list("containers") {
        let _ = layout.ctr().args(["containers", "delete", &container]).output();
    }
}

fn spawn_logged(command: &mut Command, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing. The process dies with
    // the test (the shims do not: clean_up and sweep_stale find them).
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()))
}

fn terminate(mut child: Child, grace: Duration) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `<pid> <start time>`: tells a live owner from a dead one whose pid was reused.
fn owner_id(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.to_owned();
    Some(format!("{pid} {start}"))
}

/// Tears down what nodes of test processes that were killed outright (before their drop ran)
/// left behind, and puts back the host state saved by the oldest of them. [`TestNode::start`]
/// calls it; a test that captures a [`HostState`] before starting a node calls it first.
pub fn sweep_stale() {
    let mut stale: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir("/tmp")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(DIR_PREFIX))
        .filter(|e| match std::fs::read_to_string(e.path().join("owner")) {
            Ok(owner) if !owner.is_empty() => {
                let pid = owner.split_whitespace().next().and_then(|p| p.parse().ok());
                pid.and_then(owner_id).as_deref() != Some(owner.as_str())
            }
            // No owner yet: a node starting right now in another process, unless it is old.
            _ => e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().unwrap_or_default().as_secs() > 300),
        })
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
        .collect();
    // Newest first, so the oldest snapshot (the host before any of them) is restored last.
    stale.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, dir) in stale {
        eprintln!("sweeping stale node dir {}", dir.display());
        let layout = Layout { dir };
        let host: Option<HostState> =
            std::fs::read(layout.host_state()).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok());
        match host {
            Some(host) => clean_up(&layout, &host),
            None => clean_up(&layout, &HostState::capture()),
        }
    }
}

/// Everything after the processes we own are stopped: leftover processes (shims, containers),
/// mounts, cgroups, network links, then the host state, then the dir itself.
fn clean_up(layout: &Layout, host: &HostState) {
    kill_leftovers(layout);
    crate::sweep(&layout.dir);
    remove_cgroup_root(&layout.cgroup_root());
    delete_link(&layout.bridge());
    host.restore();
    if crate::mounts_under(&layout.dir).is_empty() {
        if let Err(e) = std::fs::remove_dir_all(&layout.dir) {
            eprintln!("cannot remove {}: {e}", layout.dir.display());
        }
    } else {
        // Never recurse into something still mounted (a hostPath bind would take host files along).
        eprintln!("{} keeps mounts, left in place: {:?}", layout.dir.display(), crate::mounts_under(&layout.dir));
    }
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| bytes.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
        .unwrap_or_default()
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Processes of this node still alive: any whose command line names the node dir (containerd,
/// kubelet, the shims with `-address <dir>/containerd.sock`) and anything in its cgroups (the
/// containers). SIGKILL until none is left (10 s at most).
fn kill_leftovers(layout: &Layout) {
    let dir = format!("{}/", layout.dir.display());
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids: BTreeSet<i32> = all_pids()
            .into_iter()
            .filter(|pid| *pid != me && cmdline(*pid).iter().any(|arg| arg.contains(&dir)))
            .collect();
        pids.extend(cgroup_procs(&layout.cgroup_root()));
        pids.remove(&me);
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Mount points of every cgroup hierarchy (v1 controllers, name=systemd, the unified v2 one).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    plinth_engine::sys::mountinfo::parse(&text)
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fs_type == "cgroup" || m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .collect()
}

/// kubelet insists its cgroupRoot exists in every hierarchy before it starts.
fn create_cgroup_root(name: &str) {
    for hierarchy in cgroup_hierarchies() {
        let dir = hierarchy.join(name);
        if let Err(e) = std::fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            panic!("creating cgroup {}: {e}", dir.display());
        }
        // A v1 cpuset child starts with no CPUs and no memory nodes: give it its parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                std::fs::write(dir.join(file), value.trim()).unwrap_or_else(|e| panic!("{file}: {e}"));
            }
        }
    }
}

fn cgroup_procs(name: &str) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for hierarchy in cgroup_hierarchies() {
        let mut stack = vec![hierarchy.join(name)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            stack.extend(entries.filter_map(Result::ok).filter(|e| e.path().is_dir()).map(|e| e.path()));
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    pids
}

/// Removes a cgroup and everything below it (children first; a cgroup dir is removed with rmdir,
/// its control files go with it). Retries briefly: a cgroup stays busy a moment after its last
/// process died.
fn remove_cgroup_tree(dir: &Path) -> bool {
    let mut children = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.filter_map(Result::ok) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
                children.push(entry.path());
            }
        }
    }
    children.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    children.push(dir.to_owned());
    let deadline = Instant::now() + Duration::from_secs(10);
    for cgroup in children {
        while let Err(e) = std::fs::remove_dir(&cgroup) {
            if e.kind() == std::io::ErrorKind::NotFound {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("cannot remove cgroup {}: {e}", cgroup.display());
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    true
}

fn remove_cgroup_root(name: &str) {
    for hierarchy in cgroup_hierarchies() {
        remove_cgroup_tree(&hierarchy.join(name));
    }
}

fn delete_link(name: &str) {
    if Path::new("/sys/class/net").join(name).exists() {
        let _ = Command::new("ip").args(["link", "delete", name]).output();
    }
}

/// The host state a node changes: the sysctls kubelet sets (and forwarding, which CNI plugins
/// may), iptables (kubelet adds KUBE-FIREWALL and canary chains), the directories kubelet and
/// containerd hard-code, top-level cgroups, network links and mounts outside /tmp (other tests'
/// temp dirs come and go there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    pub sysctls: BTreeMap<String, String>,
    /// Per command (`iptables`, `ip6tables`): per table, its rules as `*-save` prints them,
    /// without comments and counters.
    pub iptables: BTreeMap<String, BTreeMap<String, String>>,
    /// Per hard-coded directory: its entries two levels deep ("s", "s/<hash>"), or None when it
    /// did not exist.
    pub paths: BTreeMap<PathBuf, Option<BTreeSet<String>>>,
    /// Per cgroup hierarchy: its top-level cgroups.
    pub cgroups: BTreeMap<PathBuf, BTreeSet<String>>,
    pub links: BTreeSet<String>,
    pub mounts: BTreeSet<PathBuf>,
}

/// kubelet's kernel tunables (it sets them unless protectKernelDefaults) and IP forwarding.
const SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/forwarding",
    "net/ipv6/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
];

/// Directories kubelet, containerd, its shims and CNI use whatever their configuration says.
const HARD_CODED: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd",
    "/run/netns",
    "/var/lib/containerd",
    "/opt/containerd",
    "/opt/cni",
    "/etc/cni",
    "/etc/kubernetes",
    "/usr/libexec/kubernetes",
];

const IPTABLES: &[&str] = &["iptables", "ip6tables"];

/// A directory's entries and its subdirectories' entries (`name`, `name/child`).
fn tree(dir: &Path) -> Option<BTreeSet<String>> {
    let mut all = BTreeSet::new();
    for entry in entries(dir)? {
        let path = dir.join(&entry);
        if path.is_dir() && !path.is_symlink() {
            all.extend(entries(&path).into_iter().flatten().map(|child| format!("{entry}/{child}")));
        }
        all.insert(entry);
    }
    Some(all)
}

fn entries(dir: &Path) -> Option<BTreeSet<String>> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
}

fn iptables_tables(command: &str) -> BTreeMap<String, String> {
    let Ok(output) = Command::new(format!("{command}-save")).output() else { return BTreeMap::new() };
    let mut tables = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(table) = line.strip_prefix('*') {
            current = Some((table.to_owned(), String::new()));
        } else if line == "COMMIT" {
            if let Some((table, rules)) = current.take() {
                tables.insert(table, rules);
            }
        } else if let Some((_, rules)) = current.as_mut() {
            // ":CHAIN POLICY [packets:bytes]": the counters change all the time.
            let line = match line.rsplit_once(" [") {
                Some((head, _)) if line.starts_with(':') => head,
                _ => line,
            };
            rules.push_str(line);
            rules.push('\n');
        }
    }
    tables
}

impl HostState {
    pub fn capture() -> Self {
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|key| {
                let value = std::fs::read_to_string(Path::new("/proc/sys").join(key)).ok()?;
                Some((key.replace('/', "."), value.trim().to_owned()))
            })
            .collect();
        let iptables = IPTABLES.iter().map(|c| (c.to_string(), iptables_tables(c))).collect();
        let paths = HARD_CODED.iter().map(|p| (PathBuf::from(p), tree(Path::new(p)))).collect();
        let cgroups = cgroup_hierarchies()
            .into_iter()
            .map(|h| {
                let children = std::fs::read_dir(&h)
                    .into_iter()
                    .flatten()
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                (h, children)
            })
            .collect();
        let links = entries(Path::new("/sys/class/net")).unwrap_or_default();
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounts = plinth_engine::sys::mountinfo::parse(&text)
            .unwrap_or_default()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| !p.starts_with("/tmp"))
            .collect();
        HostState { sysctls, iptables, paths, cgroups, links, mounts }
    }

    /// Puts back what differs from `self` now: mounts below the hard-coded directories,
    /// sysctls, iptables tables, new hard-coded directories or entries in them, new top-level
    /// cgroups, new bridges and veths.
    pub fn restore(&self) {
        let now = HostState::capture();
        for mount in now.mounts.difference(&self.mounts) {
            if HARD_CODED.iter().any(|p| mount.starts_with(p)) {
                crate::sweep(mount);
            }
        }
        for (key, value) in &self.sysctls {
            if now.sysctls.get(key) != Some(value) {
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                if let Err(e) = std::fs::write(&path, value) {
                    eprintln!("cannot restore sysctl {key}={value}: {e}");
                }
            }
        }
        for (command, tables) in &now.iptables {
            let before = self.iptables.get(command);
            for (table, rules) in tables {
                let old = before.and_then(|b| b.get(table));
                if old == Some(rules) {
                    continue;
                }
                // A table absent before is restored empty; with iptables-nft that deletes it.
                let input = format!("*{table}\n{}COMMIT\n", old.map(String::as_str).unwrap_or(""));
                restore_table(command, &input);
            }
        }
        for (path, old) in &self.paths {
            let Some(current) = tree(path) else { continue };
            match old {
                None => remove_tree(path),
                // A new directory goes with its contents ("s" before "s/<hash>", which then is
                // gone already: remove_tree tolerates that).
                Some(old) => current.difference(old).for_each(|entry| remove_tree(&path.join(entry))),
            }
        }
        for (hierarchy, old) in &self.cgroups {
            for child in now.cgroups.get(hierarchy).into_iter().flatten().filter(|c| !old.contains(*c)) {
                remove_cgroup_tree(&hierarchy.join(child));
            }
        }
        for link in now.links.difference(&self.links) {
            let kind = std::fs::read_link(Path::new("/sys/class/net").join(link).join("device"));
            let bridge = Path::new("/sys/class/net").join(link).join("bridge").exists();
            // Only what CNI makes (bridges, veths: virtual devices without a "device" link).
            if bridge || (kind.is_err() && link.starts_with("veth")) {
                delete_link(link);
            }
        }
    }

    /// A readable account of what differs between two states (empty when equal).
    pub fn diff(&self, other: &HostState) -> String {
        let a = serde_json::to_value(self).expect("state");
        let b = serde_json::to_value(other).expect("state");
        let mut out = String::new();
        diff_values("", &a, &b, &mut out);
        out
    }
}

fn diff_values(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let (va, vb) = (x.get(key).unwrap_or(&Value::Null), y.get(key).unwrap_or(&Value::Null));
                diff_values(&format!("{path}/{key}"), va, vb, out);
            }
        }
        _ if a == b => {}
        _ => out.push_str(&format!("{path}: {a} -> {b}\n")),
    }
}

fn restore_table(command: &str, input: &str) {
    let child = Command::new(format!("{command}-restore"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else { return };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    match child.wait_with_output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!("{command}-restore failed: {}", String::from_utf8_lossy(&output.stderr)),
        Err(e) => eprintln!("{command}-restore: {e}"),
    }
}

/// Removes a directory tree that kubelet or containerd created, after unmounting anything below
/// it; never while something below is still mounted.
fn remove_tree(path: &Path) {
    crate::sweep(path);
    if !crate::mounts_under(path).is_empty() {
        eprintln!("{} keeps mounts, left in place", path.display());
        return;
    }
    let result =
        if path.is_dir() && !path.is_symlink() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    if let Err(e) = result
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("cannot remove {}: {e}", path.display());
    }
}
