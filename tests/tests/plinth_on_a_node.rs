//! plinth as a cluster runs it, on a real node: deploy/ applied with `kubectl apply -k` (through
//! the test overlay of `plinth_tests::deployed`, which only points it at this machine), the
//! controller Deployment and the node DaemonSet running as pods on a real kubelet + containerd,
//! kubelet finding the node plugin through plinth's own registration socket, and ordinary pods
//! using plinth claims.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node, PersistentVolume, Pod};
use k8s_openapi::api::storage::v1::CSINode;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use plinth_tests::deployed::{Cluster, MIB, NS, POOL_BYTES, container_id, handle, phase, ready, restarts, start};
use plinth_tests::node::NODE_NAME;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root, containerd and a kubelet: tests/run-all.sh runs it"]
async fn plinth_serves_pods_on_a_real_node() {
    let mut cluster = start(false).await;

    // deploy/ applies to a cluster without the snapshot CRDs, as most clusters are.
    let applied = cluster.deploy().await;
    assert!(applied.contains("daemonset.apps/plinth-node serverside-applied"), "{applied}");

    scenario_registration(&cluster).await;
    let (node_pod, _) = cluster.node_plugin().await;
    let log = cluster.plinth_log(&node_pod);
    assert!(log.contains("kubelet registered plinth"), "NotifyRegistrationStatus arrived:\n{log}");
    scenario_data_survives_pods(&cluster).await;
    scenario_xfs_and_block(&cluster).await;
    scenario_fs_group_and_read_only(&cluster).await;
    scenario_expansion(&cluster).await;
    scenario_kubelet_restart(&mut cluster).await;
    scenario_plugin_restart(&cluster).await;
    scenario_reboot(&mut cluster).await;
    scenario_stats_metrics(&cluster).await;
    scenario_too_large_and_cleanup(&cluster).await;
}

/// Scenario 1: kubelet registered plinth through its own registration socket (no registrar sidecar).
async fn scenario_registration(cluster: &Cluster) {
    let csinodes: Api<CSINode> = Api::all(cluster.client.clone());
    let driver = cluster
        .wait("CSINode lists plinth.csi.dev", Duration::from_secs(120), async || {
            let node = csinodes.get_opt(NODE_NAME).await.ok()??;
            node.spec.drivers.into_iter().find(|d| d.name == "plinth.csi.dev")
        })
        .await;
    assert_eq!(driver.node_id, NODE_NAME);
    assert_eq!(driver.topology_keys, Some(vec!["topology.plinth.csi.dev/node".to_owned()]));
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let labels = nodes.get(NODE_NAME).await.unwrap().metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("topology.plinth.csi.dev/node").map(String::as_str), Some(NODE_NAME));
    assert!(
        !plinth_tests::mounts_under(&cluster.node.kubelet_dir().join("plugins_registry"))
            .iter()
            .any(|m| m.ends_with("plugins_registry")),
        "nothing is mounted on plugins_registry"
    );
}

/// Scenario 2: A claim of the default class (ext4, WaitForFirstConsumer): scheduled by capacity, bound,
/// staged and published by kubelet; the data outlives the pod.
async fn scenario_data_survives_pods(cluster: &Cluster) {
    cluster.create_claim("data", "plinth", 64 * MIB, false).await;
    let writer = "dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null && sha256sum /data/blob > /data/sum \
                  && sync && echo WRITTEN && cat /data/sum; sleep 3600";
    cluster.create_pod("writer", "data", writer, json!({})).await;
    let pod = cluster.running("writer").await;
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(NODE_NAME));
    let log = cluster.log_contains("writer", "WRITTEN").await;
    let sum = log.lines().find(|l| l.ends_with("/data/blob")).unwrap().to_owned();
    let pv = cluster.bound_pv("data").await;
    let claim = cluster.claims().get("data").await.unwrap();
    let selected = claim.metadata.annotations.unwrap_or_default();
    assert_eq!(selected.get("volume.kubernetes.io/selected-node").map(String::as_str), Some(NODE_NAME));
    assert!(
        cluster.pool_images().iter().any(|p| p.to_string_lossy().contains(&handle(&pv))),
        "the image is in the pool"
    );
    assert_eq!(cluster.exec("writer", "mount | grep ' /data ' | cut -d' ' -f5"), "ext4\n");
    cluster.delete_pod("writer").await;
    assert!(cluster.pool_devices().is_empty(), "unstaged when its last pod went: {:?}", cluster.pool_devices());

    cluster.create_pod("reader", "data", "sha256sum -c /data/sum && echo VERIFIED; sleep 3600", json!({})).await;
    cluster.running("reader").await;
    let log = cluster.log_contains("reader", "VERIFIED").await;
    assert!(log.contains("/data/blob: OK"), "{log}");
    assert_eq!(cluster.exec("reader", "cat /data/sum"), format!("{sum}\n"));
    cluster.delete_pod("reader").await;
}

/// Scenario 3: plinth-xfs (filesystem) and plinth-block (the raw device in the pod).
async fn scenario_xfs_and_block(cluster: &Cluster) {
    cluster.create_claim("xfs", "plinth-xfs", 300 * MIB, false).await;
    cluster.create_pod("xfs", "xfs", "echo xfs-data > /data/f && sync && echo WRITTEN; sleep 3600", json!({})).await;
    cluster.running("xfs").await;
    cluster.log_contains("xfs", "WRITTEN").await;
    assert_eq!(cluster.exec("xfs", "mount | grep ' /data ' | cut -d' ' -f5"), "xfs\n");
    cluster.delete_pod("xfs").await;
    cluster.create_pod("xfs2", "xfs", "cat /data/f; sleep 3600", json!({})).await;
    cluster.running("xfs2").await;
    cluster.log_contains("xfs2", "xfs-data").await;
    cluster.delete_pod("xfs2").await;

    cluster.create_claim("raw", "plinth-block", 64 * MIB, true).await;
    let writer = "dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null && dd if=/tmp/b of=/dev/xvda bs=1M conv=fsync 2>/dev/null \
                  && echo SUM $(sha256sum < /tmp/b); sleep 3600";
    cluster.create_pod("raw", "raw", writer, json!({"block": true})).await;
    cluster.running("raw").await;
    let log = cluster.log_contains("raw", "SUM ").await;
    let sum = log.lines().find_map(|l| l.strip_prefix("SUM ")).unwrap().to_owned();
    assert_eq!(cluster.exec("raw", "test -b /dev/xvda && echo block"), "block\n");
    cluster.delete_pod("raw").await;
    cluster
        .create_pod(
            "raw2",
            "raw",
            "echo SUM $(dd if=/dev/xvda bs=1M count=4 2>/dev/null | sha256sum); sleep 3600",
            json!({"block": true}),
        )
        .await;
    cluster.running("raw2").await;
    let log = cluster.log_contains("raw2", "SUM ").await;
    assert_eq!(log.lines().find_map(|l| l.strip_prefix("SUM ")).unwrap(), sum, "the device kept its bytes");
    cluster.delete_pod("raw2").await;
}

/// Scenario 4: fsGroup (CSIDriver fsGroupPolicy: File) and a read-only claim mount.
async fn scenario_fs_group_and_read_only(cluster: &Cluster) {
    cluster.create_claim("shared", "plinth", 64 * MIB, false).await;
    let security = json!({"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 4321}});
    cluster.create_pod("grouped", "shared", "touch /data/mine && echo READY; sleep 3600", security).await;
    cluster.running("grouped").await;
    cluster.log_contains("grouped", "READY").await;
    assert_eq!(cluster.exec("grouped", "stat -c %g /data"), "4321\n", "the volume root carries the fsGroup");
    assert_eq!(cluster.exec("grouped", "stat -c %g /data/mine"), "4321\n", "new files carry the fsGroup");
    assert_eq!(cluster.exec("grouped", "stat -c %u /data/mine"), "1000\n");
    cluster.delete_pod("grouped").await;

    cluster.create_pod("reader-only", "shared", "sleep 3600", json!({"readOnly": true})).await;
    cluster.running("reader-only").await;
    let output = cluster.node.exec_in_container(NS, "reader-only", "main", &["sh", "-c", "touch /data/nope"]);
    assert!(!output.status.success(), "a readOnly claim refuses writes");
    assert!(String::from_utf8_lossy(&output.stderr).contains("Read-only file system"), "{output:?}");
    assert_eq!(cluster.exec("reader-only", "ls /data"), "lost+found\nmine\n");
    cluster.delete_pod("reader-only").await;
}

async fn grow_claim(cluster: &Cluster, claim: &str, bytes: u64) {
    let patch = json!({"spec": {"resources": {"requests": {"storage": bytes.to_string()}}}});
    cluster.claims().patch(claim, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("grow claim");
}

/// The claim's status shows `bytes` and no resize is pending or failing.
async fn wait_resized(cluster: &Cluster, claim: &str, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let current = cluster.claims().get(claim).await.expect("claim");
        let status = current.status.clone().unwrap_or_default();
        let capacity = status.capacity.as_ref().and_then(|c| c.get("storage")).map(|q| q.0.clone());
        // Kubernetes 1.37 also keeps an "Unused" condition on claims; only resize ones matter.
        const RESIZE: [&str; 4] = ["Resizing", "FileSystemResizePending", "ControllerResizeError", "NodeResizeError"];
        let settled = !status.conditions.iter().flatten().any(|c| RESIZE.contains(&c.type_.as_str()))
            && status.allocated_resource_statuses.as_ref().is_none_or(BTreeMap::is_empty);
        if capacity.and_then(|c| c.parse::<u64>().ok()) == Some(bytes) && settled {
            return;
        }
        if Instant::now() > deadline {
            let pv = match current.spec.as_ref().and_then(|s| s.volume_name.clone()) {
                Some(name) => format!(
                    "{:#?}",
                    Api::<PersistentVolume>::all(cluster.client.clone())
                        .get(&name)
                        .await
                        .ok()
                        .and_then(|p| p.spec)
                        .map(|s| s.capacity)
                ),
                None => "no PV".into(),
            };
            panic!(
                "claim {claim} not resized to {bytes} within 90 s: {status:#?}\nPV capacity {pv}\n{}",
                cluster.context().await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn df_bytes(cluster: &Cluster, pod: &str) -> u64 {
    cluster.exec(pod, "df -B1 /data | tail -1 | awk '{print $2}'").trim().parse().unwrap()
}

/// Scenario 5: Expansion: xfs grows while its pod runs; ext4 (no online growth on this VM: root lacks
/// CAP_SYS_RESOURCE) grows when the next pod stages it.
async fn scenario_expansion(cluster: &Cluster) {
    cluster.create_claim("grow-xfs", "plinth-xfs", 300 * MIB, false).await;
    cluster.create_pod("grow-xfs", "grow-xfs", "sleep 3600", json!({})).await;
    cluster.running("grow-xfs").await;
    let before = df_bytes(cluster, "grow-xfs");
    grow_claim(cluster, "grow-xfs", 600 * MIB).await;
    wait_resized(cluster, "grow-xfs", 600 * MIB).await;
    let after = df_bytes(cluster, "grow-xfs");
    assert!(after > before + 250 * MIB, "the running pod sees the new size: {before} → {after}");
    let pod = cluster.pods().get("grow-xfs").await.unwrap();
    assert_eq!(restarts(&pod), 0);
    cluster.delete_pod("grow-xfs").await;

    cluster.create_claim("grow-ext4", "plinth", 64 * MIB, false).await;
    cluster.create_pod("grow-ext4", "grow-ext4", "sleep 3600", json!({})).await;
    cluster.running("grow-ext4").await;
    let before = df_bytes(cluster, "grow-ext4");
    grow_claim(cluster, "grow-ext4", 128 * MIB).await;
    // The volume grows at once; the filesystem waits for the next stage.
    let pv_name = cluster.claims().get("grow-ext4").await.unwrap().spec.unwrap().volume_name.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(cluster.client.clone());
    cluster
        .wait("the PV grown", Duration::from_secs(60), async || {
            let pv = pvs.get(&pv_name).await.ok()?;
            let capacity = pv.spec?.capacity?.get("storage")?.0.clone();
            (capacity.parse::<u64>().ok()? == 128 * MIB).then_some(())
        })
        .await;
    cluster.delete_pod("grow-ext4").await;
    cluster.create_pod("grow-ext4-next", "grow-ext4", "sleep 3600", json!({})).await;
    cluster.running("grow-ext4-next").await;
    wait_resized(cluster, "grow-ext4", 128 * MIB).await;
    let after = df_bytes(cluster, "grow-ext4-next");
    assert!(after > before + 50 * MIB, "the next pod sees the new size: {before} → {after}");
    cluster.delete_pod("grow-ext4-next").await;
}

/// Scenario 6: kubelet restarts while a pod runs: the pod and its mount stay; kubelet reconstructs the
/// volume, and a later pod deletion unmounts and unstages cleanly.
async fn scenario_kubelet_restart(cluster: &mut Cluster) {
    cluster.create_claim("steady", "plinth", 64 * MIB, false).await;
    cluster.create_pod("steady", "steady", "echo before > /data/f && echo READY; sleep 3600", json!({})).await;
    let pod = cluster.running("steady").await;
    cluster.log_contains("steady", "READY").await;
    let container = container_id(&pod);
    let mounts_before = cluster.kubelet_mounts();
    cluster.node.restart_kubelet().await;
    cluster
        .wait("the restarted kubelet reports the pod Ready", Duration::from_secs(60), async || {
            cluster.pods().get("steady").await.ok().filter(ready)
        })
        .await;
    let pod = cluster.pods().get("steady").await.unwrap();
    assert_eq!(container_id(&pod), container, "the same container runs on");
    assert_eq!(restarts(&pod), 0);
    assert_eq!(cluster.kubelet_mounts(), mounts_before, "the mounts stayed");
    assert_eq!(cluster.exec("steady", "cat /data/f && echo after > /data/g && cat /data/g"), "before\nafter\n");
    cluster.delete_pod("steady").await;
    cluster
        .wait("staging and publish mounts gone", Duration::from_secs(60), async || {
            (cluster.pool_devices().is_empty()
                && cluster.kubelet_mounts().iter().all(|m| !m.to_string_lossy().contains("plinth.csi.dev")))
            .then_some(())
        })
        .await;
}

/// Scenario 7: The plinth node pod is deleted (the DaemonSet makes a new one) while a pod writes: the
/// writer never sees an error, new pods keep mounting, nothing leaks onto the host.
async fn scenario_plugin_restart(cluster: &Cluster) {
    cluster.create_claim("busy", "plinth", 64 * MIB, false).await;
    let writer = "i=0; while true; do i=$((i+1)); if echo $i > /data/n && sync /data/n; then echo ok $i; \
                  else echo WRITE-FAILED $i; fi; sleep 0.1; done";
    cluster.create_pod("busy", "busy", writer, json!({})).await;
    cluster.running("busy").await;
    cluster.log_contains("busy", "ok 5\n").await;
    let mounts_before = cluster.kubelet_mounts();
    let (old_pod, old_uid) = cluster.node_plugin().await;
    let plugins: Api<Pod> = Api::namespaced(cluster.client.clone(), "plinth-system");
    plugins.delete(&old_pod, &DeleteParams::default()).await.unwrap();
    let (new_pod, new_uid) = cluster
        .wait("a new plinth node pod Ready", Duration::from_secs(120), async || {
            let (name, uid) = cluster.node_plugin().await;
            (uid != old_uid).then_some((name, uid))
        })
        .await;
    assert_ne!(new_uid, old_uid);
    let seen = cluster.node.pod_log(NS, "busy", "main");
    let count = |log: &str| log.lines().filter(|l| l.starts_with("ok ")).count();
    let before = count(&seen);
    cluster.log_contains("busy", &format!("ok {}\n", before + 10)).await;
    let log = cluster.node.pod_log(NS, "busy", "main");
    assert!(!log.contains("WRITE-FAILED"), "the writer saw no error:\n{log}");
    assert_eq!(cluster.kubelet_mounts(), mounts_before, "no mount was added or lost on the host");

    cluster.create_claim("after-restart", "plinth", 64 * MIB, false).await;
    cluster
        .create_pod("after-restart", "after-restart", "echo fresh > /data/f && echo READY; sleep 3600", json!({}))
        .await;
    cluster.running("after-restart").await;
    cluster.log_contains("after-restart", "READY").await;
    let log = cluster.plinth_log(&new_pod);
    assert!(log.contains("kubelet registered plinth"), "the new pod registered again:\n{log}");
    cluster.delete_pod("after-restart").await;
    cluster.delete_pod("busy").await;
    // The busy volume was attached by the old plinth pod; the new one must find that attachment
    // (its backing path reads differently from a new mount namespace) and detach it on unstage.
    cluster
        .wait("every loop device detached after the pods went", Duration::from_secs(60), async || {
            cluster.pool_devices().is_empty().then_some(())
        })
        .await;
}

/// Scenario 8: A reboot, simulated: kubelet stops, every container dies, every mount below the kubelet
/// dir and every loop device of the pool vanish behind everyone's back; kubelet starts again
/// and the pod's volume comes back with its data.
async fn scenario_reboot(cluster: &mut Cluster) {
    cluster.create_claim("durable", "plinth", 64 * MIB, false).await;
    let script = "if [ -f /data/sum ]; then sha256sum -c /data/sum && echo VERIFIED; else \
                  dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null && sha256sum /data/blob > /data/sum && sync \
                  && echo WRITTEN; fi; sleep 3600";
    cluster.create_pod("durable", "durable", script, json!({})).await;
    cluster.running("durable").await;
    cluster.log_contains("durable", "WRITTEN").await;

    cluster.node.stop_kubelet();
    cluster.node.power_cut();
    assert!(cluster.pool_devices().is_empty(), "the power is off");
    assert!(plinth_tests::mounts_under(&cluster.node.kubelet_dir()).len() == 1, "only the kubelet dir itself is left");
    cluster.node.start_kubelet();
    cluster.node.wait_ready(Duration::from_secs(120)).await;
    cluster
        .wait("the pod running again after the reboot", Duration::from_secs(180), async || {
            cluster.pods().get("durable").await.ok().filter(|p| ready(p) && restarts(p) >= 1)
        })
        .await;
    let log = cluster.log_contains("durable", "VERIFIED").await;
    assert!(log.contains("/data/blob: OK"), "{log}");
    cluster.delete_pod("durable").await;
    cluster
        .wait("every loop device detached after the pod went", Duration::from_secs(60), async || {
            cluster.pool_devices().is_empty().then_some(())
        })
        .await;
}

/// Scenario 10: NodeGetVolumeStats reaches kubelet: kubelet_volume_stats_* for a plinth claim.
async fn scenario_stats_metrics(cluster: &Cluster) {
    cluster.create_claim("measured", "plinth", 64 * MIB, false).await;
    cluster
        .create_pod(
            "measured",
            "measured",
            "dd if=/dev/zero of=/data/z bs=1M count=10 && sync && echo WRITTEN && sleep 3600",
            json!({}),
        )
        .await;
    cluster.running("measured").await;
    cluster.log_contains("measured", "WRITTEN").await;
    // kubelet samples every volumeStatsAggPeriod (2 s here): a sample from before the write
    // ended may show less; it must come to show the 10 MiB.
    let used_bytes = async || {
        let metrics = cluster.node.kubelet_metrics().await;
        let line = metrics.lines().find(|l| {
            l.starts_with("kubelet_volume_stats_used_bytes{") && l.contains("persistentvolumeclaim=\"measured\"")
        })?;
        line.rsplit(' ').next()?.parse::<f64>().ok()
    };
    cluster
        .wait("kubelet_volume_stats_used_bytes to show the 10 MiB written", Duration::from_secs(60), async || {
            used_bytes().await.filter(|used| *used >= 10.0 * MIB as f64)
        })
        .await;
    let metrics = cluster.node.kubelet_metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("kubelet_volume_stats_capacity_bytes{") && l.contains("\"measured\""))
    );
    assert!(metrics.lines().any(|l| l.starts_with("kubelet_volume_stats_inodes{") && l.contains("\"measured\"")));
    cluster.delete_pod("measured").await;
}

/// Scenario 9: A claim larger than the node's free pool: the pod stays Pending with the scheduler's
/// reason and nothing is created on the node. Then every claim goes: PVs, Volumes and images
/// with it, the pool is empty, no loop device or mount is left.
async fn scenario_too_large_and_cleanup(cluster: &Cluster) {
    let images_before = cluster.pool_images();
    cluster.create_claim("huge", "plinth", 50 << 30, false).await;
    cluster.create_pod("huge", "huge", "sleep 3600", json!({})).await;
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), NS);
    let message = cluster
        .wait("the scheduler says why the pod waits", Duration::from_secs(60), async || {
            let list = events.list(&ListParams::default().fields("involvedObject.name=huge")).await.ok()?;
            list.items.into_iter().filter_map(|e| e.message).find(|m| m.contains("did not have enough free storage"))
        })
        .await;
    assert!(message.contains("0/1 nodes are available"), "{message}");
    assert_eq!(phase(&cluster.pods().get("huge").await.unwrap()), "Pending");
    assert_eq!(cluster.pool_images(), images_before, "nothing was created on the node");
    let volumes = cluster.kubectl(&["get", "volumes.plinth.csi.dev", "-o", "name"]);
    assert!(!volumes.contains("huge"), "{volumes}");
    cluster.delete_pod("huge").await;

    let claims = cluster.claims().list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = claims.items.iter().filter_map(|c| c.metadata.name.clone()).collect();
    for name in &names {
        cluster.claims().delete(name, &DeleteParams::default()).await.unwrap();
    }
    let pvs: Api<PersistentVolume> = Api::all(cluster.client.clone());
    cluster
        .wait("every PV, Volume and image gone", Duration::from_secs(120), async || {
            let pvs_left = pvs.list(&ListParams::default()).await.ok()?.items.len();
            let volumes_left = cluster.kubectl(&["get", "volumes.plinth.csi.dev", "-o", "name"]);
            (pvs_left == 0 && volumes_left.trim().is_empty() && cluster.pool_images().is_empty()).then_some(())
        })
        .await;
    assert!(cluster.pool_devices().is_empty(), "{:?}", cluster.pool_devices());
    let leftovers: Vec<PathBuf> =
        cluster.kubelet_mounts().into_iter().filter(|m| m.to_string_lossy().contains("plinth.csi.dev")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The capacity the scheduler sees is the whole pool again: the node republishes a settled
    // second after its last volume change (and everything every 10 s), not at the instant the
    // last image goes.
    cluster
        .wait("the published capacity back to the whole pool", Duration::from_secs(15), async || {
            let capacities = cluster.kubectl(&[
                "get",
                "csistoragecapacities",
                "-n",
                "plinth-system",
                "-o",
                "jsonpath={.items[*].capacity}",
            ]);
            let published: Vec<u64> = capacities.split_whitespace().map(|c| c.parse().expect("bytes")).collect();
            (!published.is_empty() && published.iter().all(|&c| c == POOL_BYTES)).then_some(())
        })
        .await;
}

/// The plinth node plugin's summed NodeStage+NodePublish seconds and call count so far (its
/// /metrics on the host network).
async fn stage_publish_seconds() -> (f64, f64) {
    let Ok(mut stream) = tokio::net::TcpStream::connect("127.0.0.1:9809").await else { return (0.0, 0.0) };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    let (mut seconds, mut calls) = (0.0, 0.0);
    for line in text.lines() {
        for method in ["NodeStageVolume", "NodePublishVolume"] {
            let value = |l: &str| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            if line.starts_with("plinth_rpc_duration_seconds_sum{") && line.contains(method) {
                seconds += value(line);
            }
            if line.starts_with("plinth_rpc_duration_seconds_count{")
                && line.contains("NodeStageVolume")
                && method == "NodeStageVolume"
            {
                calls += value(line);
            }
        }
    }
    (seconds, calls)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Pod with a new claim, create → Running, one at a time, per class; how the time splits.
/// Printed, not asserted: `tests/bench-node.sh`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run with tests/bench-node.sh"]
async fn bench_pod_with_new_claim() {
    const PODS: usize = 20;
    let cluster = start(false).await;
    cluster.deploy().await;
    scenario_registration(&cluster).await;
    cluster.node_plugin().await;
    // One warm-up pod: the first one pays for image and cache warm-up, not for plinth.
    cluster.create_claim("warm", "plinth", 64 * MIB, false).await;
    cluster.create_pod("warm", "warm", "sleep 3600", json!({})).await;
    cluster.running("warm").await;
    cluster.delete_pod("warm").await;
    // Gone with the first class's claims (the wait below wants no claim left).
    cluster.claims().delete("warm", &DeleteParams::default()).await.unwrap();

    println!("plinth node bench: pod with a new claim, create → Running, {PODS} pods per class, one at a time");
    println!(
        "  {:<8} {:>7} {:>7} | {:>10} {:>12} {:>8} {:>9} {:>14} {:>12}",
        "class", "p50 s", "p95 s", "schedule", "provision", "bind", "pod bind", "stage+publish", "container"
    );
    for (class, block) in [("plinth", false), ("plinth-block", true)] {
        let mut totals = Vec::new();
        let mut phases = [const { Vec::<f64>::new() }; 5];
        let (stage_before, calls_before) = stage_publish_seconds().await;
        for i in 0..PODS {
            let name = format!("b-{}-{i}", if block { "blk" } else { "fs" });
            let started = Instant::now();
            cluster.create_claim(&name, class, 64 * MIB, block).await;
            cluster.create_pod(&name, &name, "sleep 3600", json!({"block": block})).await;
            let (mut selected, mut pv, mut bound, mut scheduled) = (None, None, None, None);
            let total = loop {
                let claim = cluster.claims().get(&name).await.unwrap();
                let now = started.elapsed().as_secs_f64();
                let annotations = claim.metadata.annotations.clone().unwrap_or_default();
                if selected.is_none() && annotations.contains_key("volume.kubernetes.io/selected-node") {
                    selected = Some(now);
                }
                if pv.is_none() && claim.spec.as_ref().and_then(|s| s.volume_name.as_ref()).is_some() {
                    pv = Some(now);
                }
                if bound.is_none() && claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                    bound = Some(now);
                }
                let pod = cluster.pods().get(&name).await.unwrap();
                if scheduled.is_none() && pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                    scheduled = Some(now);
                }
                if phase(&pod) == "Running" {
                    break started.elapsed().as_secs_f64();
                }
                assert!(now < 120.0, "pod {name} not Running after 120 s\n{}", cluster.context().await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let at = |t: Option<f64>| t.unwrap_or(total);
            let (selected, pv, bound, scheduled) = (at(selected), at(pv).max(at(selected)), at(bound), at(scheduled));
            totals.push(total);
            phases[0].push(selected);
            phases[1].push(pv - selected);
            phases[2].push((bound - pv).max(0.0));
            phases[3].push((scheduled - bound).max(0.0));
            phases[4].push(total - scheduled);
        }
        let (stage_after, calls_after) = stage_publish_seconds().await;
        let stage =
            if calls_after > calls_before { (stage_after - stage_before) / (calls_after - calls_before) } else { 0.0 };
        totals.sort_by(f64::total_cmp);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            percentile(v, 0.5)
        };
        let kubelet = median(&mut phases[4]);
        println!(
            "  {:<8} {:>7.2} {:>7.2} | {:>10.2} {:>12.2} {:>8.2} {:>9.2} {:>14.3} {:>12.2}",
            if block { "block" } else { "ext4" },
            percentile(&totals, 0.5),
            percentile(&totals, 0.95),
            median(&mut phases[0]),
            median(&mut phases[1]),
            median(&mut phases[2]),
            median(&mut phases[3]),
            stage,
            (kubelet - stage).max(0.0),
        );
        for i in 0..PODS {
            let name = format!("b-{}-{i}", if block { "blk" } else { "fs" });
            cluster.pods().delete(&name, &DeleteParams::default()).await.unwrap();
            cluster.claims().delete(&name, &DeleteParams::default()).await.unwrap();
        }
        cluster
            .wait("the bench claims gone", Duration::from_secs(180), async || {
                cluster.claims().list(&ListParams::default()).await.ok().filter(|l| l.items.is_empty()).map(drop)
            })
            .await;
    }
    println!(
        "  (medians: schedule = until the scheduler picked the node; provision = until plinth's PV; bind = claim Bound;"
    );
    println!(
        "   pod bind = pod assigned; stage+publish = plinth's own NodeStage+NodePublish time; container = the rest of kubelet's work)"
    );
}
