//! A real node: containerd, runc and kubelet on this machine, registered with the real control
//! plane, running an ordinary pod from an image built without a registry — and leaving the host
//! as it found it.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use plinth_tests::k8s::{ControlPlane, Options};
use plinth_tests::node::{HostState, NODE_NAME, TestNode};
use plinth_tests::require_node;

const NS: &str = "smoke";
const POD: &str = "hello";
/// sha256 of "hello\n", what the pod writes and hashes.
const HELLO_SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

/// Polls `check` until it gives a value; on timeout fails with what `context` says.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
    context: impl AsyncFn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} not within {timeout:?}\n{}", context().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn container_id(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()?.container_id.clone()
}

fn phase(pod: &Pod) -> String {
    pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, containerd and a kubelet: tests/run-all.sh runs it"]
async fn real_node_runs_a_pod() {
    let (binaries, images) = require_node!();
    // Leftovers of a killed earlier run would otherwise be part of "before".
    plinth_tests::node::sweep_stale();
    let before = HostState::capture();
    let plane =
        ControlPlane::start_with_node_controllers(&binaries, Options { controller_manager: true, scheduler: true })
            .await;
    let started = Instant::now();
    let mut node = TestNode::start(&plane, &binaries, &images).await;
    eprintln!("node {NODE_NAME} Ready in {:.1?}", started.elapsed());
    let node_dir = node.dir().to_owned();
    let kubelet_dir = node.kubelet_dir().display().to_string();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(kubelet_dir.as_str()) && l.contains(" shared:")),
        "the kubelet dir is a shared mount (Bidirectional propagation needs it)"
    );
    let socket = node.containerd_socket().display().to_string();
    assert_eq!(node.host_state(), &before, "nothing changed the host between the two snapshots");

    let client = plane.client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": NS}})).unwrap();
    namespaces.create(&PostParams::default(), &namespace).await.expect("namespace");
    // The ServiceAccount admission plugin refuses pods until the controller made "default".
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    wait_for(
        "the default ServiceAccount",
        Duration::from_secs(30),
        async || accounts.get_opt("default").await.ok().flatten(),
        async || plane.log_tail("kube-controller-manager"),
    )
    .await;

    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": POD},
        "spec": {
            // sh as PID 1 ignores SIGTERM: do not wait the default 30 s on delete.
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "main",
                "image": images.base.reference,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo hello > /data/x; sha256sum /data/x; sleep 3600"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }
    }))
    .unwrap();
    let created = Instant::now();
    pods.create(&PostParams::default(), &pod).await.expect("create pod");
    let running = wait_for(
        "pod Running",
        Duration::from_secs(120),
        async || pods.get(POD).await.ok().filter(|p| phase(p) == "Running"),
        async || {
            let status = pods.get(POD).await.ok().and_then(|p| p.status);
            format!("{status:#?}\nkubelet:\n{}", node.kubelet_log_tail())
        },
    )
    .await;
    eprintln!("pod Running {:.1?} after create", created.elapsed());
    assert_eq!(running.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some(NODE_NAME));
    let first_container = container_id(&running).expect("container ID");

    let log = wait_for(
        "the checksum in the pod's log",
        Duration::from_secs(30),
        async || Some(node.pod_log(NS, POD, "main")).filter(|l| l.contains(HELLO_SHA256)),
        async || node.pod_log(NS, POD, "main"),
    )
    .await;
    assert!(log.contains(&format!("{HELLO_SHA256}  /data/x")), "{log}");

    let output = node.exec_in_container(NS, POD, "main", &["cat", "/data/x"]);
    assert!(output.status.success(), "exec: {}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello\n");
    let containerd_id = node.container_id(NS, POD, "main").expect("running container");
    assert!(first_container.ends_with(&containerd_id), "{first_container} is containerd's {containerd_id}");

    let metrics = node.kubelet_metrics().await;
    assert!(metrics.contains("kubelet_running_pods"), "kubelet /metrics");

    // The plinth image (when run-all.sh built one): its ENTRYPOINT is the binary.
    if let Some(plinth) = &images.plinth {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "plinth-version"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "plinth", "image": plinth.reference, "imagePullPolicy": "Never", "args": ["--version"]}],
            }
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.expect("create plinth pod");
        wait_for(
            "the plinth pod Succeeded",
            Duration::from_secs(60),
            async || pods.get("plinth-version").await.ok().filter(|p| phase(p) == "Succeeded"),
            async || format!("{:#?}", pods.get("plinth-version").await.ok().and_then(|p| p.status)),
        )
        .await;
        let log = node.pod_log(NS, "plinth-version", "plinth");
        assert!(log.starts_with("plinth "), "plinth --version printed {log:?}");
        pods.delete("plinth-version", &DeleteParams::default()).await.expect("delete plinth pod");
    }

    // A kubelet restart leaves the pod alone: same container, still running, no restart. Wait
    // until the new kubelet has seen the pod running, give its pod worker a moment to act on it.
    node.restart_kubelet().await;
    wait_for(
        "the restarted kubelet to see the pod",
        Duration::from_secs(60),
        async || node.kubelet_metrics().await.lines().any(|l| l == "kubelet_running_pods 1").then_some(()),
        async || node.kubelet_log_tail(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pods.get(POD).await.expect("pod after the restart");
    assert_eq!(phase(&after), "Running");
    assert_eq!(container_id(&after).as_deref(), Some(first_container.as_str()), "same container");
    let restarts = after.status.as_ref().and_then(|s| s.container_statuses.as_ref()).map(|c| c[0].restart_count);
    assert_eq!(restarts, Some(0));
    assert_eq!(node.container_id(NS, POD, "main").as_deref(), Some(containerd_id.as_str()));
    assert_eq!(node.container_ids(NS, POD, "main"), std::slice::from_ref(&containerd_id), "no new container was made");
    let output = node.exec_in_container(NS, POD, "main", &["cat", "/data/x"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello\n", "the emptyDir survived");

    pods.delete(POD, &DeleteParams::default()).await.expect("delete pod");
    wait_for(
        "the pod gone",
        Duration::from_secs(60),
        async || pods.get_opt(POD).await.ok().and_then(|p| p.is_none().then_some(())),
        async || node.kubelet_log_tail(),
    )
    .await;
    assert_eq!(node.container_id(NS, POD, "main"), None, "no container of the pod runs");

    let teardown = Instant::now();
    drop(node);
    eprintln!("node torn down in {:.1?}", teardown.elapsed());
    drop(plane);
    assert!(plinth_tests::loop_devices_under(&node_dir).is_empty(), "loop devices left");
    assert!(
        plinth_tests::mounts_under(&node_dir).is_empty(),
        "mounts left: {:?}",
        plinth_tests::mounts_under(&node_dir)
    );
    assert!(!node_dir.exists(), "{} removed", node_dir.display());
    let shims: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("containerd-shim") && c.contains(&socket))
        .collect();
    assert!(shims.is_empty(), "shims left: {shims:?}");
    let now = HostState::capture();
    assert!(now == before, "the host differs from before the node:\n{}", before.diff(&now));
}
