//! Crash at every step: for each fail point of each mutating operation, plinth is aborted there
//! (SIGABRT, not a clean exit: `PLINTH_FAILPOINT=<name>`, compiled into test builds only), started
//! again, the operation retried as a client would — and then nothing may be left half-made: no
//! intent record, partial image or temp file, no loop device or mount that the records do not
//! account for, and every acknowledged volume holds exactly the data it held.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plinth_proto::csi_v1::{self as csi, group_controller_client::GroupControllerClient, volume_content_source};
use plinth_tests::*;
use tonic::transport::Channel;

const PAYLOAD: &[u8] = b"acknowledged data must survive every crash\n";

/// What runs before the crash, what crashes, and what the retried call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    CreateFromSnapshot,
    Clone,
    Delete,
    Snapshot,
    DeleteSnapshot,
    GroupSnapshot,
    DeleteGroupSnapshot,
    Expand,
    Modify,
    Stage,
    /// The first stage of a blank volume of this filesystem: it formats. xfs and btrfs grow
    /// only while mounted, so a crash between their format and its record takes another path
    /// than ext4's.
    FirstStage(&'static str),
    Publish,
    Unpublish,
    Unstage,
    NodeExpand,
    Reconcile,
}

/// Every fail point, with the operation that reaches it.
const POINTS: &[(&str, Op)] = &[
    ("create.intent_saved", Op::Create),
    ("create.image_made", Op::Create),
    ("create.intent_saved", Op::CreateFromSnapshot),
    ("pool.copy_written", Op::CreateFromSnapshot),
    ("create.image_made", Op::CreateFromSnapshot),
    ("pool.copy_written", Op::Clone),
    ("create.image_made", Op::Clone),
    ("delete.intent_saved", Op::Delete),
    ("delete.image_removed", Op::Delete),
    ("snapshot.frozen", Op::Snapshot),
    ("snapshot.intent_saved", Op::Snapshot),
    ("snapshot.copied", Op::Snapshot),
    ("snapshot_delete.intent_saved", Op::DeleteSnapshot),
    ("group.member", Op::GroupSnapshot),
    ("group.members_taken", Op::GroupSnapshot),
    ("group_delete.intent_saved", Op::DeleteGroupSnapshot),
    ("expand.image_grown", Op::Expand),
    ("modify.preallocated", Op::Modify),
    ("stage.attached", Op::Stage),
    ("stage.formatted", Op::FirstStage("ext4")),
    ("stage.mounted", Op::FirstStage("ext4")),
    ("stage.formatted", Op::FirstStage("xfs")),
    ("stage.mounted", Op::FirstStage("xfs")),
    ("stage.formatted", Op::FirstStage("btrfs")),
    ("stage.mounted", Op::Stage),
    ("publish.bound", Op::Publish),
    ("unpublish.unmounted", Op::Unpublish),
    ("unstage.unmounted", Op::Unstage),
    ("unstage.detached", Op::Unstage),
    ("node_expand.grown", Op::NodeExpand),
    ("reconcile.restaged", Op::Reconcile),
];

struct Case<'a> {
    sandbox: &'a Sandbox,
}

impl Case<'_> {
    fn staging(&self, name: &str) -> PathBuf {
        self.sandbox.root().join(format!("staging-{name}"))
    }
    fn target(&self, name: &str) -> PathBuf {
        self.sandbox.root().join(format!("target-{name}"))
    }
}

fn volume_id(name: &str) -> String {
    plinth_engine::VolumeId::for_name(name).to_string()
}

fn snapshot_source(name: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: plinth_engine::ids::SnapshotId::for_name(name).to_string(),
        })),
    }
}

fn volume_source(name: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(volume_content_source::VolumeSource {
            volume_id: volume_id(name),
        })),
    }
}

/// Creates, stages, publishes and writes PAYLOAD into volume `name`; `keep_published` decides
/// whether it stays published (else it is unpublished and unstaged again).
async fn volume_with_data(clients: &mut Clients, case: &Case<'_>, name: &str, keep_published: bool) {
    volume_with_data_on(clients, case, name, keep_published, "ext4").await
}

/// A small volume this filesystem's mkfs accepts.
fn minimum_size(fs: &str) -> i64 {
    match fs {
        "xfs" => 320 * MIB,
        "btrfs" => 128 * MIB,
        _ => 64 * MIB,
    }
}

async fn volume_with_data_on(clients: &mut Clients, case: &Case<'_>, name: &str, keep_published: bool, fs: &str) {
    let size = minimum_size(fs);
    clients.controller.create_volume(create_request(name, size, mount_cap(fs))).await.expect("create");
    let (staging, target) = (case.staging(name), case.target(name));
    clients.node.node_stage_volume(stage_request(&volume_id(name), &staging, mount_cap(fs))).await.expect("stage");
    clients
        .node
        .node_publish_volume(publish_request(&volume_id(name), &staging, &target, mount_cap(fs)))
        .await
        .expect("publish");
    std::fs::write(target.join("payload"), PAYLOAD).unwrap();
    nix::unistd::sync();
    if !keep_published {
        unpublish(clients, case, name).await;
        unstage(clients, case, name).await;
    }
}

async fn unpublish(clients: &mut Clients, case: &Case<'_>, name: &str) {
    clients
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id(name),
            target_path: case.target(name).display().to_string(),
        })
        .await
        .expect("unpublish");
}

async fn unstage(clients: &mut Clients, case: &Case<'_>, name: &str) {
    clients
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume_id(name),
            staging_target_path: case.staging(name).display().to_string(),
        })
        .await
        .expect("unstage");
}

async fn group_client(sandbox: &Sandbox) -> GroupControllerClient<Channel> {
    GroupControllerClient::new(Clients::channel(&sandbox.socket()).await)
}

/// The state before the operation under test.
async fn prepare(op: Op, clients: &mut Clients, case: &Case<'_>) {
    match op {
        Op::Create | Op::Reconcile => {}
        Op::FirstStage(fs) => {
            let request = create_request("src", minimum_size(fs), mount_cap(fs));
            clients.controller.create_volume(request).await.expect("create");
        }
        Op::CreateFromSnapshot | Op::DeleteSnapshot => {
            volume_with_data(clients, case, "src", false).await;
            let request = csi::CreateSnapshotRequest {
                name: "snap".into(),
                source_volume_id: volume_id("src"),
                ..Default::default()
            };
            clients.controller.create_snapshot(request).await.expect("snapshot");
        }
        Op::Clone | Op::Delete | Op::Expand | Op::Modify | Op::Stage => {
            volume_with_data(clients, case, "src", false).await;
        }
        Op::Snapshot | Op::Unpublish => volume_with_data(clients, case, "src", true).await,
        // ext4 cannot grow online on this VM (no CAP_SYS_RESOURCE): xfs can.
        Op::NodeExpand => volume_with_data_on(clients, case, "src", true, "xfs").await,
        Op::GroupSnapshot | Op::DeleteGroupSnapshot => {
            volume_with_data(clients, case, "src", true).await;
            volume_with_data(clients, case, "other", false).await;
            if op == Op::DeleteGroupSnapshot {
                take_group(case.sandbox).await.expect("group snapshot");
            }
        }
        Op::Publish => {
            volume_with_data(clients, case, "src", false).await;
            clients
                .node
                .node_stage_volume(stage_request(&volume_id("src"), &case.staging("src"), mount_cap("ext4")))
                .await
                .expect("stage");
        }
        Op::Unstage => {
            volume_with_data(clients, case, "src", true).await;
            unpublish(clients, case, "src").await;
        }
    }
    if op == Op::NodeExpand {
        let request = csi::ControllerExpandVolumeRequest {
            volume_id: volume_id("src"),
            capacity_range: Some(csi::CapacityRange { required_bytes: 640 * MIB, limit_bytes: 0 }),
            ..Default::default()
        };
        clients.controller.controller_expand_volume(request).await.expect("controller expand");
    }
}

async fn take_group(sandbox: &Sandbox) -> Result<(), tonic::Status> {
    let request = csi::CreateVolumeGroupSnapshotRequest {
        name: "group".into(),
        source_volume_ids: vec![volume_id("src"), volume_id("other")],
        ..Default::default()
    };
    group_client(sandbox).await.create_volume_group_snapshot(request).await.map(drop)
}

/// The operation under test, as a client issues (and retries) it.
async fn run(op: Op, clients: &mut Clients, case: &Case<'_>) -> Result<(), tonic::Status> {
    let id = volume_id("src");
    match op {
        Op::Create => {
            clients.controller.create_volume(create_request("src", 64 * MIB, mount_cap("ext4"))).await.map(drop)
        }
        Op::CreateFromSnapshot => {
            let mut request = create_request("restored", 64 * MIB, mount_cap("ext4"));
            request.volume_content_source = Some(snapshot_source("snap"));
            clients.controller.create_volume(request).await.map(drop)
        }
        Op::Clone => {
            let mut request = create_request("clone", 64 * MIB, mount_cap("ext4"));
            request.volume_content_source = Some(volume_source("src"));
            clients.controller.create_volume(request).await.map(drop)
        }
        Op::Delete => clients
            .controller
            .delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() })
            .await
            .map(drop),
        Op::Snapshot => {
            let request =
                csi::CreateSnapshotRequest { name: "snap".into(), source_volume_id: id, ..Default::default() };
            clients.controller.create_snapshot(request).await.map(drop)
        }
        Op::DeleteSnapshot => {
            let snapshot_id = plinth_engine::ids::SnapshotId::for_name("snap").to_string();
            let request = csi::DeleteSnapshotRequest { snapshot_id, ..Default::default() };
            clients.controller.delete_snapshot(request).await.map(drop)
        }
        Op::GroupSnapshot => take_group(case.sandbox).await,
        Op::DeleteGroupSnapshot => {
            let group_snapshot_id = plinth_engine::ids::GroupSnapshotId::for_name("group").to_string();
            let request = csi::DeleteVolumeGroupSnapshotRequest { group_snapshot_id, ..Default::default() };
            group_client(case.sandbox).await.delete_volume_group_snapshot(request).await.map(drop)
        }
        Op::Expand => {
            let request = csi::ControllerExpandVolumeRequest {
                volume_id: id,
                capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
                ..Default::default()
            };
            clients.controller.controller_expand_volume(request).await.map(drop)
        }
        Op::Modify => {
            let request = csi::ControllerModifyVolumeRequest {
                volume_id: id,
                mutable_parameters: [("provisioning".to_owned(), "thick".to_owned())].into(),
                ..Default::default()
            };
            clients.controller.controller_modify_volume(request).await.map(drop)
        }
        Op::Stage => {
            clients.node.node_stage_volume(stage_request(&id, &case.staging("src"), mount_cap("ext4"))).await.map(drop)
        }
        Op::FirstStage(fs) => {
            clients.node.node_stage_volume(stage_request(&id, &case.staging("src"), mount_cap(fs))).await.map(drop)
        }
        Op::Publish => clients
            .node
            .node_publish_volume(publish_request(&id, &case.staging("src"), &case.target("src"), mount_cap("ext4")))
            .await
            .map(drop),
        Op::Unpublish => clients
            .node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id,
                target_path: case.target("src").display().to_string(),
            })
            .await
            .map(drop),
        Op::Unstage => clients
            .node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id,
                staging_target_path: case.staging("src").display().to_string(),
            })
            .await
            .map(drop),
        Op::NodeExpand => {
            let request = csi::NodeExpandVolumeRequest {
                volume_id: id,
                volume_path: case.staging("src").display().to_string(),
                ..Default::default()
            };
            clients.node.node_expand_volume(request).await.map(drop)
        }
        Op::Reconcile => Ok(()),
    }
}

/// Files a crash may leave behind and a restart must not: intents, partial images, temp records.
fn half_made_files(data: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut walk = vec![data.to_owned()];
    while let Some(dir) = walk.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() && !name.starts_with("staging") {
                walk.push(path);
                continue;
            }
            if name.ends_with(".partial") || name.starts_with(".tmp-") {
                found.push(path.display().to_string());
            }
            if name.ends_with(".json") {
                let record: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                if record.get("phase").is_some() {
                    found.push(format!("{} ({})", path.display(), record["phase"]));
                }
            }
        }
    }
    found
}

/// Loop devices and mounts below the sandbox must be exactly what the records say is staged
/// and published.
fn devices_and_mounts_match_records(sandbox: &Sandbox) -> Result<(), String> {
    let mut staged = 0;
    let mut expected_mounts: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(sandbox.data_dir().join("volumes")).unwrap().flatten() {
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        if let Some(stage) = record["staged"].as_object() {
            staged += 1;
            if stage["filesystem_mounted"] == true {
                expected_mounts.push(PathBuf::from(stage["staging_path"].as_str().unwrap()));
            }
        }
        for target in record["published"].as_object().into_iter().flatten().map(|(k, _)| k) {
            expected_mounts.push(PathBuf::from(target));
        }
    }
    let devices = loop_devices_under(sandbox.path());
    let mut mounts = mounts_under(sandbox.path());
    mounts.sort();
    expected_mounts.sort();
    if devices.len() != staged || mounts != expected_mounts {
        return Err(format!(
            "{} loop device(s) for {staged} staged volume(s); mounts {mounts:?}, records say {expected_mounts:?}",
            devices.len()
        ));
    }
    Ok(())
}

/// Every volume the records hold is readable and writable, and those in `with_payload` (written
/// before the crash, or copied from such a volume) hold PAYLOAD.
async fn data_intact(clients: &mut Clients, case: &Case<'_>, with_payload: &[&str]) {
    let volumes = clients.controller.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    for entry in volumes.entries {
        let volume = entry.volume.unwrap();
        let name = volume.volume_context.get("plinth.csi.dev/name").cloned().unwrap_or_default();
        let target = case.target(&name);
        let published_here = mounts_under(case.sandbox.path()).contains(&target);
        if !published_here {
            let staging = case.staging(&name);
            // No filesystem named: the volume's own.
            let (id, cap) = (volume.volume_id.clone(), mount_cap(""));
            clients.node.node_stage_volume(stage_request(&id, &staging, cap.clone())).await.expect("restage");
            clients.node.node_publish_volume(publish_request(&id, &staging, &target, cap)).await.expect("republish");
        }
        if with_payload.contains(&name.as_str()) {
            let held = std::fs::read(target.join("payload")).unwrap_or_default();
            assert_eq!(held, PAYLOAD, "{name}: the acknowledged bytes");
        }
        // A filesystem left frozen by the crash would hang this write forever.
        let probe = target.join("writable");
        let (done, waiter) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = std::fs::write(&probe, b"x");
            let _ = done.send(());
        });
        assert!(waiter.recv_timeout(Duration::from_secs(10)).is_ok(), "{name}: writes hang: left frozen?");
    }
}

/// Puts everything away; the pool must end empty.
async fn tear_down(clients: &mut Clients, case: &Case<'_>) {
    let group_snapshot_id = plinth_engine::ids::GroupSnapshotId::for_name("group").to_string();
    let request = csi::DeleteVolumeGroupSnapshotRequest { group_snapshot_id, ..Default::default() };
    group_client(case.sandbox).await.delete_volume_group_snapshot(request).await.expect("delete group");
    let snapshot_id = plinth_engine::ids::SnapshotId::for_name("snap").to_string();
    let request = csi::DeleteSnapshotRequest { snapshot_id, ..Default::default() };
    clients.controller.delete_snapshot(request).await.expect("delete snapshot");
    let volumes = clients.controller.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    for entry in volumes.entries {
        let volume = entry.volume.unwrap();
        let name = volume.volume_context.get("plinth.csi.dev/name").cloned().unwrap_or_default();
        if mounts_under(case.sandbox.path()).contains(&case.target(&name)) {
            unpublish(clients, case, &name).await;
        }
        // Unstaging what is not staged is a no-op.
        let request = csi::NodeUnstageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: case.staging(&name).display().to_string(),
        };
        clients.node.node_unstage_volume(request).await.expect("unstage");
        let request = csi::DeleteVolumeRequest { volume_id: volume.volume_id, ..Default::default() };
        clients.controller.delete_volume(request).await.expect("delete");
    }
    assert!(case.sandbox.pool_images().is_empty(), "{:?}", case.sandbox.pool_images());
    assert!(loop_devices_under(case.sandbox.path()).is_empty() && mounts_under(case.sandbox.path()).is_empty());
}

fn wait_for_exit(plinth: &mut Plinth) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = plinth.try_wait() {
            return status;
        }
        assert!(Instant::now() < deadline, "plinth did not stop at its fail point");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn crash_at(point: &str, op: Op) {
    let sandbox = Sandbox::new();
    let case = Case { sandbox: &sandbox };
    let server = Plinth::start(&sandbox, &[]);
    let mut clients = server.clients().await;
    prepare(op, &mut clients, &case).await;
    assert!(server.stop().success());

    if op == Op::Reconcile {
        // The start-up reconcile after a reboot: nothing attached, nothing mounted.
        let server = Plinth::start(&sandbox, &[]);
        let mut clients = server.clients().await;
        volume_with_data(&mut clients, &case, "src", true).await;
        assert!(server.stop().success());
        sweep(sandbox.path());
    }
    let mut doomed = Plinth::start_with_env(
        &sandbox.socket(),
        &sandbox.root(),
        "standalone",
        &sandbox.data_dir(),
        &[],
        op != Op::Reconcile,
        &[("PLINTH_FAILPOINT", point)],
    );
    if op != Op::Reconcile {
        let mut clients = doomed.clients().await;
        let outcome = run(op, &mut clients, &case).await;
        assert!(outcome.is_err(), "{point}: the call must not succeed: the process aborts there");
    }
    let status = wait_for_exit(&mut doomed);
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGABRT as i32),
        "{point}: plinth aborted there ({status})"
    );
    drop(doomed);

    let server = Plinth::start(&sandbox, &[]);
    let mut clients = server.clients().await;
    run(op, &mut clients, &case).await.unwrap_or_else(|e| panic!("{point}: the retried call converges: {e:?}"));
    assert_eq!(half_made_files(&sandbox.data_dir()), Vec::<String>::new(), "{point}: half-made files");
    devices_and_mounts_match_records(&sandbox).unwrap_or_else(|e| panic!("{point}: {e}"));
    let with_payload: &[&str] = match op {
        Op::Create | Op::Delete | Op::FirstStage(_) => &[],
        Op::CreateFromSnapshot => &["src", "restored"],
        Op::Clone => &["src", "clone"],
        Op::GroupSnapshot | Op::DeleteGroupSnapshot => &["src", "other"],
        _ => &["src"],
    };
    data_intact(&mut clients, &case, with_payload).await;
    tear_down(&mut clients, &case).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn a_crash_at_every_step_leaves_nothing_half_made() {
    require_root!();
    for (point, op) in POINTS {
        eprintln!("crash at {point} during {op:?}");
        crash_at(point, *op).await;
    }
}
