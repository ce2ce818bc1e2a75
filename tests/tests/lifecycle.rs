//! Volume lifecycle against a real plinth process: real loop devices, filesystems and mounts.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use plinth_proto::csi_v1 as csi;
use plinth_tests::*;

fn write_file(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::File::create(path).expect("create file on volume");
    file.write_all(bytes).expect("write");
    file.sync_all().expect("fsync");
}

async fn create(clients: &mut Clients, request: csi::CreateVolumeRequest) -> csi::Volume {
    clients.controller.create_volume(request).await.expect("CreateVolume").into_inner().volume.expect("volume")
}

async fn stage_and_publish(clients: &mut Clients, id: &str, staging: &Path, target: &Path, cap: csi::VolumeCapability) {
    clients.node.node_stage_volume(stage_request(id, staging, cap.clone())).await.expect("NodeStageVolume");
    clients.node.node_publish_volume(publish_request(id, staging, target, cap)).await.expect("NodePublishVolume");
}

async fn unpublish_and_unstage(clients: &mut Clients, id: &str, staging: &Path, target: &Path) {
    clients
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnpublishVolume");
    clients
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.to_owned(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("NodeUnstageVolume");
}

async fn delete(clients: &mut Clients, id: &str) {
    clients
        .controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: id.to_owned(), ..Default::default() })
        .await
        .expect("DeleteVolume");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn data_survives_restage_and_process_restart_on_every_filesystem() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let mut volumes = Vec::new();
    for fs in ["ext4", "xfs", "btrfs"] {
        let volume = create(&mut clients, create_request(&format!("data-{fs}"), 64 * MIB, mount_cap(fs))).await;
        let staging = sandbox.root().join(format!("staging-{fs}"));
        let target = sandbox.root().join(format!("target-{fs}"));
        stage_and_publish(&mut clients, &volume.volume_id, &staging, &target, mount_cap(fs)).await;
        let payload = format!("written to {fs} before everything").repeat(1000);
        write_file(&target.join("payload"), payload.as_bytes());
        unpublish_and_unstage(&mut clients, &volume.volume_id, &staging, &target).await;
        assert!(!target.exists(), "unpublish removes the target it created");
        assert!(loop_devices_under(sandbox.path()).is_empty(), "unstage detaches the loop device");
        stage_and_publish(&mut clients, &volume.volume_id, &staging, &target, mount_cap(fs)).await;
        assert_eq!(std::fs::read_to_string(target.join("payload")).unwrap(), payload, "{fs} after restage");
        unpublish_and_unstage(&mut clients, &volume.volume_id, &staging, &target).await;
        volumes.push((fs, volume, staging, target, payload));
    }

    assert!(plinth.stop().success(), "SIGTERM exits 0");
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let listed = clients.controller.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.entries.len(), 3, "a restarted plinth lists the same volumes");
    for (fs, volume, staging, target, payload) in &volumes {
        stage_and_publish(&mut clients, &volume.volume_id, staging, target, mount_cap(fs)).await;
        assert_eq!(&std::fs::read_to_string(target.join("payload")).unwrap(), payload, "{fs} after restart");
        unpublish_and_unstage(&mut clients, &volume.volume_id, staging, target).await;
        delete(&mut clients, &volume.volume_id).await;
    }
    assert!(sandbox.pool_images().is_empty(), "delete removes every image: {:?}", sandbox.pool_images());
    assert!(loop_devices_under(sandbox.path()).is_empty());
    assert!(mounts_under(sandbox.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn staged_volume_comes_back_after_a_crash_and_lost_mounts() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let volume = create(&mut clients, create_request("reboot", 32 * MIB, mount_cap("ext4"))).await;
    let (staging, target) = (sandbox.root().join("staging"), sandbox.root().join("target"));
    stage_and_publish(&mut clients, &volume.volume_id, &staging, &target, mount_cap("ext4")).await;
    write_file(&target.join("survivor"), b"still here");

    // A crash plus a reboot: the process dies and every mount and loop device is gone.
    plinth.kill();
    sweep(sandbox.path());
    assert!(mounts_under(sandbox.path()).is_empty() && loop_devices_under(sandbox.path()).is_empty());

    let plinth = Plinth::start(&sandbox, &[]);
    assert_eq!(std::fs::read(target.join("survivor")).unwrap(), b"still here", "restored before anyone asked");
    assert_eq!(loop_devices_under(sandbox.path()).len(), 1);
    let mut clients = plinth.clients().await;
    let refused = clients
        .controller
        .delete_volume(csi::DeleteVolumeRequest { volume_id: volume.volume_id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "a staged volume is never deleted");
    unpublish_and_unstage(&mut clients, &volume.volume_id, &staging, &target).await;
    delete(&mut clients, &volume.volume_id).await;
    assert!(sandbox.pool_images().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn leaked_loop_device_is_detached_on_start() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let volume = create(&mut clients, create_request("leak", 16 * MIB, block_cap())).await;
    drop(clients);
    plinth.kill();
    // Something attached the image behind plinth's back (or a crash between attach and record).
    let image = sandbox.data_dir().join("pool").join(format!("{}.img", volume.volume_id));
    let device = plinth_engine::sys::loopdev::attach(&std::fs::canonicalize(&image).unwrap(), false).unwrap();
    assert_eq!(loop_devices_under(sandbox.path()), vec![device.path()]);
    let plinth = Plinth::start(&sandbox, &[]);
    assert!(loop_devices_under(sandbox.path()).is_empty(), "start-up reconcile detaches unused devices");
    let mut clients = plinth.clients().await;
    delete(&mut clients, &volume.volume_id).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn block_volume_round_trips_bytes_through_its_device() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let mut request = create_request("raw", 8 * MIB, block_cap());
    request.parameters.insert("provisioning".into(), "thick".into());
    let volume = create(&mut clients, request).await;
    assert_eq!(volume.capacity_bytes, 8 * MIB);
    let image = sandbox.data_dir().join("pool").join(format!("{}.img", volume.volume_id));
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap()) * 512;
    assert!(allocated >= 8 * MIB as u64, "thick volumes are preallocated ({allocated} bytes on disk)");

    let (staging, target) = (sandbox.root().join("staging"), sandbox.root().join("dev"));
    stage_and_publish(&mut clients, &volume.volume_id, &staging, &target, block_cap()).await;
    let devices = loop_devices_under(sandbox.path());
    assert_eq!(devices.len(), 1);
    let device = plinth_engine::sys::loopdev::LoopDevice::from_path(&devices[0]).unwrap();
    if pool_supports_direct_io(&sandbox) {
        assert!(device.direct_io(), "the loop device must bypass the page cache (direct I/O)");
    }
    {
        let mut device = std::fs::OpenOptions::new().read(true).write(true).open(&target).unwrap();
        device.seek(SeekFrom::Start(4 * MIB as u64)).unwrap();
        device.write_all(b"raw bytes at 4 MiB").unwrap();
        device.sync_all().unwrap();
    }
    let stats = clients
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, 8 * MIB, "block stats report the device size");
    unpublish_and_unstage(&mut clients, &volume.volume_id, &staging, &target).await;
    stage_and_publish(&mut clients, &volume.volume_id, &staging, &target, block_cap()).await;
    let mut device = std::fs::File::open(&target).unwrap();
    device.seek(SeekFrom::Start(4 * MIB as u64)).unwrap();
    let mut back = [0u8; 18];
    device.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"raw bytes at 4 MiB");
    drop(device);
    unpublish_and_unstage(&mut clients, &volume.volume_id, &staging, &target).await;
    delete(&mut clients, &volume.volume_id).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn filesystem_stats_and_readonly_publish() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let mut clients = plinth.clients().await;
    let volume = create(&mut clients, create_request("stats", 64 * MIB, mount_cap("ext4"))).await;
    let (staging, target, ro_target) =
        (sandbox.root().join("staging"), sandbox.root().join("rw"), sandbox.root().join("ro"));
    stage_and_publish(&mut clients, &volume.volume_id, &staging, &target, mount_cap("ext4")).await;
    let mut ro = publish_request(&volume.volume_id, &staging, &ro_target, mount_cap("ext4"));
    ro.readonly = true;
    clients.node.node_publish_volume(ro.clone()).await.expect("read-only publish");
    clients.node.node_publish_volume(ro).await.expect("publish is idempotent");
    let err = std::fs::File::create(ro_target.join("nope")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_erofs()), "read-only publish refuses writes");
    write_file(&target.join("visible"), b"x");
    assert!(ro_target.join("visible").exists(), "both targets show the same filesystem");

    let stats = clients
        .node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");
    let bytes = &stats.usage[0];
    assert!(bytes.total > 50 * MIB && bytes.total <= 64 * MIB, "total {}", bytes.total);
    assert!(bytes.available > 0 && bytes.used > 0);
    assert!(stats.usage[1].total > 0, "inode total");

    clients
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            target_path: ro_target.display().to_string(),
        })
        .await
        .unwrap();
    unpublish_and_unstage(&mut clients, &volume.volume_id, &staging, &target).await;
    delete(&mut clients, &volume.volume_id).await;
}

/// Whether the pool's filesystem accepts O_DIRECT (tmpfs, for one, does not).
fn pool_supports_direct_io(sandbox: &Sandbox) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = sandbox.data_dir().join("pool").join(".dio-probe");
    let supported = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(probe);
    supported
}

fn libc_erofs() -> i32 {
    30 // EROFS
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn concurrent_operations_on_one_volume_are_serialised() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &[]);
    let clients = plinth.clients().await;
    let mut c = clients.clone();
    let volume = create(&mut c, create_request("busy", 128 * MIB, mount_cap("ext4"))).await;
    let staging = sandbox.root().join("staging");

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = clients.clone();
        let request = stage_request(&volume.volume_id, &staging, mount_cap("ext4"));
        tasks.push(tokio::spawn(async move { c.node.node_stage_volume(request).await.map(|_| ()) }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => ok += 1,
            Err(status) => assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}"),
        }
    }
    assert!(ok >= 1, "at least one stage succeeds");
    assert_eq!(loop_devices_under(sandbox.path()).len(), 1, "exactly one loop device, however many raced");
    assert_eq!(mounts_under(sandbox.path()).len(), 1, "exactly one staging mount");

    // Different volumes do not wait for each other.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut c = clients.clone();
        tasks.push(tokio::spawn(async move {
            c.controller.create_volume(create_request(&format!("parallel-{i}"), 16 * MIB, mount_cap("ext4"))).await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("parallel creates of different volumes all succeed");
    }
    let mut c = clients.clone();
    c.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
    let listed = c.controller.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    for entry in listed.entries {
        delete(&mut c, &entry.volume.unwrap().volume_id).await;
    }
    assert!(sandbox.pool_images().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs root (loop devices, mounts): tests/run-all.sh runs it"]
async fn full_pool_refuses_with_resource_exhausted_and_leaves_nothing() {
    require_root!();
    let sandbox = Sandbox::new();
    let plinth = Plinth::start(&sandbox, &["--pool-capacity", "100MiB"]);
    let mut clients = plinth.clients().await;
    let first = create(&mut clients, create_request("first", 64 * MIB, block_cap())).await;
    let err = clients.controller.create_volume(create_request("second", 64 * MIB, block_cap())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert_eq!(sandbox.pool_images().len(), 1, "no partial image left: {:?}", sandbox.pool_images());
    let capacity = clients.controller.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner();
    assert_eq!(capacity.available_capacity, 36 * MIB);
    let elsewhere = clients
        .controller
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: [(plinth_proto::TOPOLOGY_NODE_KEY.to_owned(), "other-node".to_owned())].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0, "another node's segment has none of this pool");
    delete(&mut clients, &first.volume_id).await;
    create(&mut clients, create_request("second", 64 * MIB, block_cap())).await;
}
